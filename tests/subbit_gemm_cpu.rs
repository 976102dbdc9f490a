//! The fused decode + grouped GEMM's walkers (`cuda/subbit_gemm.cu`, `struct Walker`) replayed on the
//! CPU, line for line: one walker per weight row and K slice, writing the row's next 64 columns into a
//! shared-memory W stage (its swizzled layout included) every step, the phrase that crosses a step
//! boundary carried over, tiles entered one after another, the slices cut at tile boundaries. What they
//! write must be the decode's bf16 weights (`reference::dense_bf16`) bit for bit, on every shape, tile
//! size and slice count; on a corrupt image they must still end, read only inside the image and write
//! only inside their row of the stage. This is the only check of the kernel's decoding where no GPU is
//! at hand (it has not run on one yet).

use half::{bf16, f16};
use moe_kernels::reference::subbit as reference;
use moe_kernels::subbit::{encode, random_iid, Compressed};
use moe_kernels::sys::moek_subbit_weights;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// cuda/subbit_gemm.cu's kBK, kBN (one walker per stage row), kAhead, and cuda/subbit_image.cuh's kNoPhrase.
const BK: i64 = 64;
const BN: usize = 128;
const AHEAD: usize = 4;
const NO_PHRASE: u64 = 1 << 32;
const CH: usize = BK as usize / 8;
const STAGE_BYTES: usize = BN * BK as usize * 2;

/// grouped_gemm_kernel.cuh's swizzled<8>: the byte offset of 16-byte chunk `chunk` of stage row `row`.
fn swizzled(row: usize, chunk: usize) -> usize {
    (row * CH + (chunk ^ (row & 7))) * 16
}

/// subbit_gemm.cu's stage_col: the byte offset of column c (0..64) of stage row `row`.
fn stage_col(row: usize, c: usize) -> usize {
    swizzled(row, c >> 3) + (c & 7) * 2
}

/// The device image and its descriptor, read with Rust's bounds checks: a read outside the image (which
/// the kernel must never make) panics.
struct Img {
    image: Vec<u8>,
    d: moek_subbit_weights,
}

impl Img {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.image[at..at + 4].try_into().unwrap())
    }
    fn offset(&self, i: usize) -> u32 {
        assert!(i <= (self.d.matrices * self.d.rows * self.d.tiles_per_row) as usize, "tile offset {i} read");
        self.u32_at(self.d.offsets_at + 4 * i)
    }
    fn code(&self, k: u32) -> u32 {
        assert!(u64::from(k) < self.d.codes as u64, "codeword {k} read past the codewords");
        let at = self.d.codes_at + 2 * k as usize;
        u32::from(u16::from_le_bytes(self.image[at..at + 2].try_into().unwrap()))
    }
    fn dict(&self, code: u32) -> u64 {
        assert!(code < self.d.dictionary_entries as u32, "dictionary entry {code} read");
        let at = self.d.dictionary_at + 8 * code as usize;
        u64::from_le_bytes(self.image[at..at + 8].try_into().unwrap())
    }
    fn levels(&self, row: usize) -> u32 {
        self.u32_at(self.d.scales_at + 4 * row)
    }
}

/// The kernels' phrase_of: (nonzero, sign, length).
fn phrase_of(e: u64) -> (u32, u32, i64) {
    let (nonzero, sign) = (e as u32, (e >> 32) as u32);
    let end = sign & !nonzero;
    (nonzero, sign, if end != 0 { i64::from(end.trailing_zeros()) } else { 32 })
}

/// subbit_gemm.cu's Walker, field for field (ints as i64, so a negative intermediate is seen as such).
struct Walker<'a> {
    img: &'a Img,
    ahead: [u64; AHEAD],
    next: u32,
    i: u32,
    stop: u32,
    last: u32,
    tile: i64,
    tile_stop: i64,
    col0: i64,
    width: i64,
    at: i64,
    nonzero: u32,
    sign: u32,
    length: i64,
    levels: u32,
    tiles_at: usize,
    live: bool,
    /// Not in the kernel: trips of its loops, to prove they end.
    trips: u64,
}

impl<'a> Walker<'a> {
    fn entry(&self, k: u32) -> u64 {
        let d = &self.img.d;
        if k < self.last {
            self.img.dict(self.img.code(k).min(d.dictionary_entries as u32 - 1))
        } else {
            NO_PHRASE
        }
    }

    fn take(&mut self, k: u32) -> u64 {
        if k != self.next {
            for j in 0..AHEAD {
                self.ahead[j] = self.entry(k.wrapping_add(j as u32));
            }
            self.next = k;
        }
        let e = self.ahead[0];
        self.ahead.copy_within(1.., 0);
        self.ahead[AHEAD - 1] = self.entry(k.wrapping_add(AHEAD as u32));
        self.next = k.wrapping_add(1);
        e
    }

    fn load(&mut self, e: u64) {
        let (nonzero, sign, length) = phrase_of(e);
        let room = length.min(self.width - self.at);
        assert!(self.at < self.width, "a phrase is loaded at column {} of a {}-column tile", self.at, self.width);
        self.nonzero = nonzero & if room >= 32 { !0 } else { (1u32 << room.max(0)) - 1 };
        self.sign = sign;
        self.length = length;
    }

    fn enter_next_tile(&mut self) -> bool {
        let d = self.img.d;
        loop {
            self.trips += 1;
            self.tile += 1;
            if self.tile >= self.tile_stop {
                return false;
            }
            self.col0 += i64::from(d.tile_cols);
            self.width = i64::from(d.tile_cols).min(i64::from(d.cols) - self.col0);
            self.at = 0;
            let t = self.tiles_at + self.tile as usize;
            self.i = self.img.offset(t).max(self.stop).min(self.last);
            self.stop = self.img.offset(t + 1).max(self.i).min(self.last);
            if self.i < self.stop {
                let e = self.take(self.i);
                self.load(e);
                return true;
            }
        }
    }

    fn start(img: &'a Img, row: usize, t0: i64, t1: i64, active: bool) -> Self {
        let d = img.d;
        let mut w = Walker {
            img,
            ahead: [0; AHEAD],
            next: !0,
            i: 0,
            stop: 0,
            last: 0,
            tile: 0,
            tile_stop: 0,
            col0: 0,
            width: 0,
            at: 0,
            nonzero: 0,
            sign: 0,
            length: 0,
            levels: 0,
            tiles_at: row * d.tiles_per_row as usize,
            live: false,
            trips: 0,
        };
        if !active {
            return w;
        }
        let pair = img.levels(row);
        let level = |h: u32| f16::from_bits(h as u16).to_f32();
        w.levels = u32::from(bf16::from_f32(level(pair & 0xffff)).to_bits())
            | u32::from(bf16::from_f32(-level(pair >> 16)).to_bits()) << 16;
        let codes = d.codes as u32;
        let lo = img.offset(w.tiles_at + t0 as usize).min(codes);
        w.last = img.offset(w.tiles_at + t1 as usize).max(lo).min(codes);
        w.stop = lo;
        w.tile = t0 - 1;
        w.tile_stop = t1;
        w.col0 = (t0 - 1) * i64::from(d.tile_cols);
        w.live = w.enter_next_tile();
        w
    }

    fn advance(&mut self) {
        self.at += self.length;
        self.i += 1;
        if self.at >= self.width || self.i >= self.stop {
            self.live = self.enter_next_tile();
            return;
        }
        let e = self.take(self.i);
        self.load(e);
    }

    /// Writes stage row `row` for columns [k0, k0 + 64); every store is checked to fall in that row's
    /// 64 columns (the kernel's invariant).
    fn emit(&mut self, stage: &mut [u8], row: usize, k0: i64) {
        for ch in 0..CH {
            stage[swizzled(row, ch)..swizzled(row, ch) + 16].fill(0);
        }
        let k_end = k0 + BK;
        while self.live {
            self.trips += 1;
            while self.nonzero != 0 {
                self.trips += 1;
                let j = self.nonzero.trailing_zeros();
                let c = self.col0 + self.at + i64::from(j);
                if c >= k_end {
                    return;
                }
                assert!(c >= k0, "column {c} written in the step from {k0}");
                let v = if (self.sign >> j) & 1 == 1 { self.levels >> 16 } else { self.levels } as u16;
                let at = stage_col(row, (c - k0) as usize);
                stage[at..at + 2].copy_from_slice(&v.to_le_bytes());
                self.nonzero &= self.nonzero - 1;
            }
            self.advance();
            if self.col0 + self.at >= k_end {
                return;
            }
        }
    }
}

/// The kernel's slice s of `splits`: its tiles and columns (subbit_gemm_kernel's t0, t1, k_begin, k_stop).
fn slice(d: &moek_subbit_weights, s: i64, splits: i64) -> (i64, i64, i64, i64) {
    let tiles = i64::from(d.tiles_per_row);
    let (t0, t1) = (tiles * s / splits, tiles * (s + 1) / splits);
    (t0, t1, t0 * i64::from(d.tile_cols), (t1 * i64::from(d.tile_cols)).min(i64::from(d.cols)))
}

/// Every weight row of every matrix as the walkers write it into the W stage, read back through the
/// stage's layout (bf16 bits, [M, R, C]), with the image's tiles cut into `splits` slices. Columns past C
/// in a slice's last step must be zeros (x is zero there, and 0 * NaN would not be).
fn weights_the_walkers_write(img: &Img, splits: i64) -> (Vec<u16>, u64) {
    let d = img.d;
    let (m, r, c) = (d.matrices as usize, d.rows as usize, d.cols as usize);
    let splits = splits.clamp(1, i64::from(d.tiles_per_row));
    let mut out = vec![0xffffu16; m * r * c];
    let mut trips = 0;
    let mut stage = vec![0xa5u8; STAGE_BYTES];
    for matrix in 0..m {
        for n in 0..r {
            let row = matrix * r + n;
            let local = n % BN;
            for s in 0..splits {
                let (t0, t1, k_begin, k_stop) = slice(&d, s, splits);
                assert!(t0 < t1 && k_begin < k_stop, "slice {s} of {splits} is empty");
                let mut w = Walker::start(img, row, t0, t1, true);
                let steps = (k_stop - k_begin + BK - 1) / BK;
                for step in 0..steps {
                    let k0 = k_begin + step * BK;
                    w.emit(&mut stage, local, k0);
                    for col in 0..BK {
                        let at = stage_col(local, col as usize);
                        let v = u16::from_le_bytes([stage[at], stage[at + 1]]);
                        let g = k0 + col;
                        if g < k_stop {
                            out[row * c + g as usize] = v;
                        } else {
                            assert_eq!(v, 0, "column {g} past C is not zero");
                        }
                    }
                }
                trips += w.trips;
            }
        }
    }
    (out, trips)
}

fn image_of(bytes: &[u8]) -> Img {
    let view = Compressed::parse(bytes).unwrap();
    Img { image: view.image().unwrap(), d: view.descriptor().unwrap() }
}

fn check(ms: &[moe_kernels::subbit::TernaryMatrix], tile: usize) -> Result<(), TestCaseError> {
    let bytes = encode(ms, tile).unwrap();
    let view = Compressed::parse(&bytes).unwrap();
    let img = image_of(&bytes);
    let want: Vec<u16> = reference::dense_bf16(&view).iter().map(|v| v.to_bits()).collect();
    let tiles = i64::from(img.d.tiles_per_row);
    let mut counts = vec![1, 2, 3, tiles, tiles + 5];
    counts.sort_unstable();
    counts.dedup();
    for splits in counts {
        let (got, _) = weights_the_walkers_write(&img, splits);
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            let c = img.d.cols as usize;
            return Err(TestCaseError::fail(format!(
                "{splits} slices: row {} col {} is {:#06x}, the decode gives {:#06x}",
                i / c,
                i % c,
                got[i],
                want[i]
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn the_walkers_write_the_decodes_bf16_weights(
        matrices in 1usize..3, rows in 1usize..5, cols in 1usize..3000, p0 in 0.0f64..1.0,
        tile in prop_oneof![Just(256usize), Just(512), Just(1024), Just(2048)], seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ms: Vec<_> = (0..matrices).map(|_| random_iid(&mut rng, rows, cols, p0)).collect();
        check(&ms, tile)?;
    }
}

#[test]
fn the_walkers_handle_the_test_and_bench_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    // tests/subbit_gpu.rs's grouped GEMM shapes (rows cut down: each row's walk is independent), wide
    // tiles, all-zero rows of 32-symbol phrases, no zeros at all, one column, and the K tail past C.
    for (rows, cols, tile, p0) in [
        (3, 1000, 256, 0.885),
        (3, 1000, 512, 0.885),
        (2, 2049, 1024, 0.885),
        (2, 1001, 256, 0.9),
        (2, 5000, 1024, 0.885),
        (2, 9000, 8192, 0.885),
        (2, 4096, 2048, 0.885),
        (2, 5000, 4096, 0.999),
        (2, 700, 256, 0.0),
        (1, 1, 256, 0.5),
        (1, 65, 256, 0.885),
    ] {
        let ms = vec![random_iid(&mut rng, rows, cols, p0), random_iid(&mut rng, rows, cols, p0)];
        check(&ms, tile).unwrap();
    }
}

#[test]
fn the_stage_layout_is_a_permutation_of_the_stage() {
    let mut seen = vec![false; STAGE_BYTES / 2];
    for row in 0..BN {
        for c in 0..BK as usize {
            let at = stage_col(row, c);
            assert!(at % 2 == 0 && at < STAGE_BYTES);
            assert!(!seen[at / 2], "row {row} col {c} shares its slot");
            seen[at / 2] = true;
            // ldmatrix reads chunk c / 8 of the row at swizzled(row, c / 8): the same 16 bytes.
            assert_eq!(at / 16, swizzled(row, c / 8) / 16);
        }
    }
}

/// A corrupt image (codewords, tile offsets and dictionary entries overwritten at random) gives wrong
/// values but the walkers still end, read only inside the image (Img's checks) and write only their
/// row's 64 columns of the stage (emit's checks).
#[test]
fn corrupt_images_never_read_or_write_out_of_bounds_and_always_end() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    for round in 0..40 {
        let (rows, cols, tile) = [(3, 1300, 256), (2, 5000, 1024), (4, 700, 512)][round % 3];
        let ms = vec![random_iid(&mut rng, rows, cols, 0.885)];
        let bytes = encode(&ms, tile).unwrap();
        let mut img = image_of(&bytes);
        let d = img.d;
        let codes = d.codes as usize;
        let offsets = (d.matrices * d.rows * d.tiles_per_row) as usize + 1;
        for _ in 0..rng.random_range(1..20) {
            match rng.random_range(0..3) {
                0 => {
                    let at = d.codes_at + 2 * rng.random_range(0..codes);
                    let v: u16 = rng.random();
                    img.image[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
                1 => {
                    let at = d.offsets_at + 4 * rng.random_range(0..offsets);
                    let v: u32 =
                        if rng.random_bool(0.5) { rng.random() } else { rng.random_range(0..codes as u32 + 9) };
                    img.image[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => {
                    let at = d.dictionary_at + 8 * rng.random_range(0..d.dictionary_entries as usize);
                    let v: u64 = rng.random();
                    img.image[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        for splits in [1, 2, 3] {
            let (_, trips) = weights_the_walkers_write(&img, splits);
            // Each trip consumes a nonzero, a codeword or a tile, or ends a step.
            let steps = (d.matrices * d.rows) as u64 * (cols as u64).div_ceil(BK as u64) * 3;
            let bound = (d.matrices * d.rows) as u64 * (codes as u64 * 34 + 8 * d.tiles_per_row as u64) + steps;
            assert!(trips <= bound, "round {round}: {trips} trips for {codes} codewords");
        }
    }
}
