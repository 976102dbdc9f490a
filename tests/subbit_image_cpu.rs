//! The device image read the way `cuda/subbit.cu` reads it, on the CPU: dictionary entries as nonzero
//! and sign masks with the end marker, codewords renumbered by use. Two readings, one per kernel: the
//! decode's (32 codewords a chunk, a scan of the lengths, nonzeros into a ring of two halves written out
//! half by half) and the fused matvec's (every (row, tile) split at the image's restarts into 1..=per-tile
//! sub-streams, each walked one nonzero a trip, its codewords read in aligned groups of 8, dictionary
//! entries two codewords ahead). Both must give the CPU decoder's symbols exactly: this checks
//! the image layout and the kernels' arithmetic where no GPU is at hand.

use half::bf16;
use moe_kernels::reference::subbit as reference;
use moe_kernels::subbit::image::{restarts_at, RESTART_COLS};
use moe_kernels::subbit::{encode, random_iid, Compressed};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const RING: usize = 2048;
const HALF: usize = RING / 2;
const NO_PHRASE: u64 = 1 << 32;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The kernels' phrase_of: (nonzero, sign, length).
fn phrase(e: u64) -> (u32, u32, usize) {
    let (nonzero, sign) = (e as u32, (e >> 32) as u32);
    let end = sign & !nonzero;
    (nonzero, sign, if end != 0 { end.trailing_zeros() as usize } else { 32 })
}

struct Img<'a> {
    image: &'a [u8],
    d: moe_kernels::sys::moek_subbit_weights,
}

impl Img<'_> {
    fn entry(&self, code: u32) -> u64 {
        let code = code.min(self.d.dictionary_entries as u32 - 1) as usize;
        u64::from_le_bytes(self.image[self.d.dictionary_at + 8 * code..][..8].try_into().unwrap())
    }
    fn code(&self, i: usize) -> u32 {
        u32::from(u16::from_le_bytes(self.image[self.d.codes_at + 2 * i..][..2].try_into().unwrap()))
    }
    /// Codeword group g (8 codewords, 16 aligned bytes), as the matvec loads it.
    fn group(&self, g: usize) -> [u32; 8] {
        std::array::from_fn(|k| self.code(8 * g + k))
    }
    /// Restart j of all (row, tile) restarts (see src/subbit/image.rs).
    fn restart(&self, j: usize) -> u32 {
        u32_at(self.image, restarts_at(&self.d) + 4 * j)
    }
    fn range(&self, tile: usize) -> (usize, usize) {
        let codes = self.d.codes as u32;
        let lo = u32_at(self.image, self.d.offsets_at + 4 * tile).min(codes);
        let hi = u32_at(self.image, self.d.offsets_at + 4 * tile + 4).clamp(lo, codes);
        (lo as usize, hi as usize)
    }
}

/// The decode kernel's reading: every tile's symbols (0, 1, 2) through the ring.
fn decode_like_the_kernel(img: &Img) -> Vec<u8> {
    let d = &img.d;
    let (rows_total, tiles) = ((d.matrices * d.rows) as usize, d.tiles_per_row as usize);
    let (cols, tile_cols) = (d.cols as usize, d.tile_cols as usize);
    let mut out = vec![9u8; rows_total * cols];
    for tile in 0..rows_total * tiles {
        let (row, t) = (tile / tiles, tile % tiles);
        let width = tile_cols.min(cols - t * tile_cols);
        let dst = row * cols + t * tile_cols;
        let mut ring = [0u8; RING];
        let (lo, hi) = img.range(tile);
        let (mut done, mut written) = (0usize, 0usize);
        let mut flush = |ring: &mut [u8; RING], from: usize, to: usize| {
            for c in from..to {
                out[dst + c] = ring[c % RING];
                ring[c % RING] = 0;
            }
        };
        let mut base = lo;
        while base < hi && done < width {
            let phrases: Vec<_> = (0..32)
                .map(|l| phrase(if base + l < hi { img.entry(img.code(base + l)) } else { NO_PHRASE }))
                .collect();
            let mut start = done;
            for &(nonzero, sign, length) in &phrases {
                assert!(start >= written && start < written + 2 * HALF);
                let mut m = nonzero;
                while m != 0 {
                    let j = m.trailing_zeros();
                    let c = start + j as usize;
                    if c < width {
                        ring[c % RING] = if (sign >> j) & 1 == 1 { 2 } else { 1 };
                    }
                    m &= m - 1;
                }
                start += length;
            }
            done = start;
            while written + HALF <= done.min(width) {
                flush(&mut ring, written, written + HALF);
                written += HALF;
            }
            base += 32;
        }
        while written < width {
            let to = (written + HALF).min(width);
            flush(&mut ring, written, to);
            written = to;
        }
    }
    out
}

/// The fused kernel's walk of every (row, tile) stream split into `subs` sub-streams at the image's
/// restarts (as `sub_stream` in cuda/subbit.cu: `per_tile / subs` restarts each, the last one to the
/// tile's end), calling `feed(row, tile of the row, sub-stream, column of the tile, negative)` for each
/// nonzero it feeds to the FMA, in the order it does.
fn walk_like_the_kernel(img: &Img, subs: usize, mut feed: impl FnMut(usize, usize, usize, usize, bool)) {
    let d = &img.d;
    let (rows_total, tiles) = ((d.matrices * d.rows) as usize, d.tiles_per_row as usize);
    let (cols, tile_cols) = (d.cols as usize, d.tile_cols as usize);
    let per_tile = tile_cols / RESTART_COLS;
    let subs = subs.min(per_tile);
    let stride = per_tile / subs;
    let last_group = (d.codes as usize).saturating_sub(1) >> 3;
    for tile in 0..rows_total * tiles {
        let (row, t) = (tile / tiles, tile % tiles);
        let width = tile_cols.min(cols - t * tile_cols);
        let whole = img.range(tile);
        for s in 0..subs {
            let ((lo, hi), mut at) = if subs == 1 {
                (whole, 0)
            } else {
                let restart = |j: usize| img.restart(tile * per_tile + j);
                let (j0, j1) = (s * stride, (s + 1) * stride);
                let first = restart(j0);
                let count = whole.1 - whole.0;
                let lo = whole.0 + ((first >> 5) as usize).min(count);
                let end = if s + 1 < subs && j1 < per_tile {
                    whole.0 + ((restart(j1) >> 5) as usize).min(count)
                } else {
                    whole.1
                };
                ((lo, end.max(lo)), j0 * RESTART_COLS + (first & 31) as usize)
            };
            if lo >= hi || at >= width {
                continue;
            }
            let mut group = lo >> 3;
            let mut now = img.group(group);
            let mut ahead = img.group((group + 1).min(last_group));
            let mut next_code = |k: usize| {
                if k >> 3 != group {
                    assert_eq!(k >> 3, group + 1, "codewords are asked for in order");
                    group = k >> 3;
                    now = ahead;
                    ahead = img.group((group + 1).min(last_group));
                }
                now[k & 7]
            };
            let mut i = lo;
            let (mut nonzero, mut sign, mut length) = phrase(img.entry(img.group(lo >> 3)[lo & 7]));
            let mut pending = if lo + 1 < hi { img.entry(next_code(lo + 1)) } else { NO_PHRASE };
            let mut pending2 = if lo + 2 < hi { img.entry(next_code(lo + 2)) } else { NO_PHRASE };
            loop {
                if nonzero != 0 {
                    let j = nonzero.trailing_zeros();
                    let c = at + j as usize;
                    if c < width {
                        feed(row, t, s, c, (sign >> j) & 1 == 1);
                    }
                    nonzero &= nonzero - 1;
                }
                if nonzero == 0 {
                    at += length;
                    i += 1;
                    if i >= hi || at >= width {
                        break;
                    }
                    (nonzero, sign, length) = phrase(pending);
                    pending = pending2;
                    if i + 2 < hi {
                        pending2 = img.entry(next_code(i + 2));
                    }
                }
            }
        }
    }
}

/// The symbols the fused kernel's walk feeds (0 where it feeds none); a column fed twice is an error
/// (phrases must belong to exactly one sub-stream).
fn symbols_the_kernel_feeds(img: &Img, subs: usize) -> Vec<u8> {
    let (rows_total, cols, tile_cols) =
        ((img.d.matrices * img.d.rows) as usize, img.d.cols as usize, img.d.tile_cols as usize);
    let mut out = vec![0u8; rows_total * cols];
    walk_like_the_kernel(img, subs, |row, t, _, c, negative| {
        let slot = &mut out[row * cols + t * tile_cols + c];
        assert_eq!(*slot, 0, "column {c} of row {row}'s tile {t} fed twice");
        *slot = if negative { 2 } else { 1 };
    });
    out
}

/// The fused kernel's arithmetic for matrix `m` and tokens x ([T, C] bf16): per (row, tile, sub-stream)
/// fp32 FMAs with the row's f16 levels in walk order, the sub-streams added in order from 0, the tiles'
/// partial sums added in order from 0 (the reduce kernel) when a row has several, y rounded to bf16.
fn matvec_like_the_kernel(img: &Img, subs: usize, m: usize, x: &[bf16], tokens: usize) -> Vec<f32> {
    let d = &img.d;
    let (rows, cols, tiles) = (d.rows as usize, d.cols as usize, d.tiles_per_row as usize);
    let (tile_cols, subs) = (d.tile_cols as usize, subs.min(d.tile_cols as usize / RESTART_COLS));
    let mut acc = vec![0f32; d.matrices as usize * rows * tiles * subs * tokens];
    walk_like_the_kernel(img, subs, |row, t, s, c, negative| {
        let pair = u32_at(img.image, d.scales_at + 4 * row);
        let level = |h: u32| half::f16::from_bits(h as u16).to_f32();
        let w = if negative { -level(pair >> 16) } else { level(pair & 0xffff) };
        for j in 0..tokens {
            let a = &mut acc[(((row * tiles + t) * subs + s) * tokens) + j];
            *a = w.mul_add(x[j * cols + t * tile_cols + c].to_f32(), *a);
        }
    });
    let mut y = vec![0f32; tokens * rows];
    for r in 0..rows {
        let row = m * rows + r;
        for j in 0..tokens {
            let tile_sum = |t: usize| {
                let at = |s: usize| acc[((row * tiles + t) * subs + s) * tokens + j];
                if subs == 1 {
                    at(0)
                } else {
                    (0..subs).fold(0f32, |sum, s| sum + at(s))
                }
            };
            let v = if tiles == 1 { tile_sum(0) } else { (0..tiles).fold(0f32, |sum, t| sum + tile_sum(t)) };
            y[j * rows + r] = bf16::from_f32(v).to_f32();
        }
    }
    y
}

/// tests/subbit_gpu.rs's criterion: the relative Frobenius error of `got` against `want`.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        err += (f64::from(g) - f64::from(w)).powi(2);
        norm += f64::from(w).powi(2);
    }
    (err / norm.max(1e-30)).sqrt()
}

fn check_both(ms: &[moe_kernels::subbit::TernaryMatrix], tile: usize) -> Result<(), TestCaseError> {
    let bytes = encode(ms, tile).unwrap();
    let view = Compressed::parse(&bytes).unwrap();
    let image = view.image().unwrap();
    let img = Img { image: &image, d: view.descriptor().unwrap() };
    let want: Vec<u8> = ms.iter().flat_map(|m| m.symbols.iter().copied()).collect();
    prop_assert_eq!(decode_like_the_kernel(&img), want.clone(), "decode reading");
    // 3, 5, 6 and 7 leave per_tile / subs restarts to every sub-stream but the last, which must still
    // reach the tile's end (the launcher only picks powers of two; the kernel must not depend on it).
    for subs in [1, 2, 3, 4, 5, 6, 7, 8, 256] {
        prop_assert_eq!(symbols_the_kernel_feeds(&img, subs), want.clone(), "matvec reading, {} sub-streams", subs);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn the_kernels_readings_of_the_image_are_the_cpu_decode(
        matrices in 1usize..3, rows in 1usize..6, cols in 1usize..3000, p0 in 0.0f64..1.0,
        tile in prop_oneof![Just(256usize), Just(1024), Just(2048), Just(4096)], seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ms: Vec<_> = (0..matrices).map(|_| random_iid(&mut rng, rows, cols, p0)).collect();
        check_both(&ms, tile)?;
    }
}

#[test]
fn wide_tiles_and_extreme_sparsity_read_back_exactly() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Tiles of several ring turns, all-zero runs of 32-symbol phrases, and no zeros at all.
    for (rows, cols, tile, p0) in [(3, 9000, 8192, 0.885), (2, 5000, 4096, 0.999), (4, 700, 256, 0.0)] {
        let ms = vec![random_iid(&mut rng, rows, cols, p0)];
        check_both(&ms, tile).unwrap();
    }
}

#[test]
fn the_image_numbers_codewords_by_use() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let ms = vec![random_iid(&mut rng, 64, 4096, 0.885)];
    let bytes = encode(&ms, 2048).unwrap();
    let view = Compressed::parse(&bytes).unwrap();
    let image = view.image().unwrap();
    let img = Img { image: &image, d: view.descriptor().unwrap() };
    let mut uses = vec![0u64; img.d.dictionary_entries as usize];
    for i in 0..img.d.codes as usize {
        uses[img.code(i) as usize] += 1;
    }
    assert!(uses.windows(2).all(|w| w[0] >= w[1]), "image codewords are not in order of use");
    assert!(uses[0] > uses[uses.len() / 2], "the order of use is flat");
}

#[test]
fn levels_in_the_image_are_the_buffers_f16_pairs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let ms = vec![random_iid(&mut rng, 4, 300, 0.885), random_iid(&mut rng, 4, 300, 0.885)];
    let bytes = encode(&ms, 256).unwrap();
    let view = Compressed::parse(&bytes).unwrap();
    let (d, image) = (view.descriptor().unwrap(), view.image().unwrap());
    for m in 0..2 {
        let decoded = view.decode(m);
        for r in 0..4 {
            let pair = u32_at(&image, d.scales_at + 4 * (m * 4 + r));
            assert_eq!(half::f16::from_bits(pair as u16).to_f32(), decoded.positive[r]);
            assert_eq!(half::f16::from_bits((pair >> 16) as u16).to_f32(), decoded.negative[r]);
        }
    }
}

/// The reference the GPU test compares the fused matvec against must be the product of the weights the
/// kernel multiplies by: its f16 levels (`reference::dense`). The decode's bf16 weights
/// (`reference::dense_bf16`) move every level by up to 2^-8 of itself, and where a row's positive and
/// negative terms cancel that is far more than 1e-2 of y: the H200 run of MOEK_SEED=4901957154976623329
/// failed 1 x 1 x 300, tile 256, T=1 so (y = 0.00806 against the bf16 reference's 0.00837, 3.73e-2),
/// with the kernel's value exactly what this emulation of its arithmetic gives.
#[test]
fn the_fused_kernels_arithmetic_meets_the_gpu_tests_tolerance() {
    // y's bf16 rounding (2^-8 of y at most) and a margin for the f32 sums; the GPU test allows 1e-2.
    const TOLERANCE: f64 = 5e-3;
    // The H200 run's data: the GPU test's draws for its first two shapes, in its order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(4901957154976623329);
    for (c, p0) in [(1usize, 0.885), (300, 0.5)] {
        let ms = vec![random_iid(&mut rng, 1, c, p0)];
        let bytes = encode(&ms, 256).unwrap();
        let view = Compressed::parse(&bytes).unwrap();
        let image = view.image().unwrap();
        let img = Img { image: &image, d: view.descriptor().unwrap() };
        let dense = reference::dense(&view);
        let dense_bf16: Vec<f32> = reference::dense_bf16(&view).iter().map(|w| w.to_f32()).collect();
        for t in 1..=8usize {
            let _matrix = rng.random_range(0..1usize);
            let x: Vec<bf16> = (0..t * c).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
            let got = matvec_like_the_kernel(&img, 1, 0, &x, t);
            let e = relative_error(&got, &reference::matvec(&dense, 1, c, &x, t));
            assert!(e <= TOLERANCE, "1 x 1 x {c}, T={t}: {e:.3e} against the f16-level reference");
            if (c, t) == (300, 1) {
                let old = relative_error(&got, &reference::matvec(&dense_bf16, 1, c, &x, t));
                assert!((old - 3.730e-2).abs() < 1e-4, "the H200 failure is not reproduced: {old:.4e}");
            }
        }
    }
    // Fresh data on every kind of shape, every sub-stream count the launcher can pick: only the f32
    // accumulation and y's bf16 rounding separate the kernel from the reference.
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let shapes = [
        (1, 1, 300, 256, 0.5),
        (1, 1, 300, 1024, 0.5),
        (2, 3, 700, 256, 0.885),
        (1, 4, 1500, 2048, 0.885),
        (3, 17, 1300, 512, 0.95),
        (1, 37, 2049, 1024, 0.885),
        (1, 5, 3000, 1024, 0.999),
        (2, 6, 1000, 256, 0.0),
        (1, 3, 5000, 8192, 0.885),
    ];
    for (m, r, c, tile, p0) in shapes {
        let ms: Vec<_> = (0..m).map(|_| random_iid(&mut rng, r, c, p0)).collect();
        let bytes = encode(&ms, tile).unwrap();
        let view = Compressed::parse(&bytes).unwrap();
        let image = view.image().unwrap();
        let img = Img { image: &image, d: view.descriptor().unwrap() };
        let dense = reference::dense(&view);
        for t in 1..=8usize {
            let matrix = rng.random_range(0..m);
            let x: Vec<bf16> = (0..t * c).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
            let want = reference::matvec(&dense[matrix * r * c..(matrix + 1) * r * c], r, c, &x, t);
            for subs in [1, 2, 4, 8] {
                let got = matvec_like_the_kernel(&img, subs, matrix, &x, t);
                let e = relative_error(&got, &want);
                assert!(e <= TOLERANCE, "{m} x {r} x {c} tile {tile}, T={t}, {subs} sub-streams: {e:.3e}");
            }
        }
    }
}
