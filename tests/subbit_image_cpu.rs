//! The device image read the way `cuda/subbit.cu` reads it, on the CPU: dictionary entries as nonzero
//! and sign masks with the end marker, codewords renumbered by use. Two readings, one per kernel: the
//! decode's (32 codewords a chunk, a scan of the lengths, nonzeros into a ring of two halves written out
//! half by half) and the fused matvec's (every (row, tile) split at the image's restarts into 1..=per-tile
//! sub-streams, each walked one nonzero a trip, its codewords read in aligned groups of 8, dictionary
//! entries two codewords ahead). Both must give the CPU decoder's symbols exactly: this checks
//! the image layout and the kernels' arithmetic where no GPU is at hand.

use moe_kernels::subbit::image::{restarts_at, RESTART_COLS};
use moe_kernels::subbit::{encode, random_iid, Compressed};
use proptest::prelude::*;
use rand::SeedableRng;

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
/// restarts (as `sub_stream` in cuda/subbit.cu), recording each nonzero it feeds to the FMA; a column
/// fed twice is an error (phrases must belong to exactly one sub-stream).
fn walk_like_the_kernel(img: &Img, subs: usize) -> Vec<u8> {
    let d = &img.d;
    let (rows_total, tiles) = ((d.matrices * d.rows) as usize, d.tiles_per_row as usize);
    let (cols, tile_cols) = (d.cols as usize, d.tile_cols as usize);
    let per_tile = tile_cols / RESTART_COLS;
    let subs = subs.min(per_tile);
    let stride = per_tile / subs;
    let last_group = (d.codes as usize).saturating_sub(1) >> 3;
    let mut out = vec![0u8; rows_total * cols];
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
                let end = if j1 < per_tile { whole.0 + ((restart(j1) >> 5) as usize).min(count) } else { whole.1 };
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
                        let slot = &mut out[row * cols + t * tile_cols + c];
                        assert_eq!(*slot, 0, "column {c} of tile {tile} fed twice");
                        *slot = if (sign >> j) & 1 == 1 { 2 } else { 1 };
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
    out
}

fn check_both(ms: &[moe_kernels::subbit::TernaryMatrix], tile: usize) -> Result<(), TestCaseError> {
    let bytes = encode(ms, tile).unwrap();
    let view = Compressed::parse(&bytes).unwrap();
    let image = view.image().unwrap();
    let img = Img { image: &image, d: view.descriptor().unwrap() };
    let want: Vec<u8> = ms.iter().flat_map(|m| m.symbols.iter().copied()).collect();
    prop_assert_eq!(decode_like_the_kernel(&img), want.clone(), "decode reading");
    for subs in [1, 2, 4, 8, 256] {
        prop_assert_eq!(walk_like_the_kernel(&img, subs), want.clone(), "matvec reading, {} sub-streams", subs);
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
