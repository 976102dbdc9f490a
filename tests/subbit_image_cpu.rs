//! The device image read the way `cuda/subbit.cu` reads it, on the CPU: dictionary entries decoded with
//! the kernels' bit tricks (length from the first slot holding 3, positive and negative masks), tiles
//! taken 128 codewords at a time with each lane's start from a scan of the lengths, columns past the
//! tile's width dropped. It must give the CPU decoder's symbols exactly: this checks the image layout and
//! the kernels' arithmetic where no GPU is at hand.

use moe_kernels::subbit::{encode, random_iid, Compressed};
use proptest::prelude::*;
use rand::SeedableRng;

const EVEN: u64 = 0x5555_5555_5555_5555;
const LANES: usize = 32;
const CODES_PER_LANE: usize = 4;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The kernels' phrase_length, positive_mask and negative_mask.
fn length(e: u64) -> usize {
    let end = e & (e >> 1) & EVEN;
    if end != 0 {
        end.trailing_zeros() as usize / 2
    } else {
        32
    }
}
fn positive(e: u64) -> u64 {
    e & !(e >> 1) & EVEN
}
fn negative(e: u64) -> u64 {
    (e >> 1) & !e & EVEN
}

/// Symbols of every matrix, decoded from the image as the kernels do.
fn decode_like_the_kernels(view: &Compressed, image: &[u8]) -> Vec<u8> {
    let d = view.descriptor().unwrap();
    let (rows_total, tiles) = ((d.matrices * d.rows) as usize, d.tiles_per_row as usize);
    let (cols, tile_cols) = (d.cols as usize, d.tile_cols as usize);
    let max_code = d.dictionary_entries as u32 - 1;
    let entry = |code: u32| u64::from_le_bytes(image[d.dictionary_at + 8 * code as usize..][..8].try_into().unwrap());
    let mut out = vec![9u8; rows_total * cols];
    for tile in 0..rows_total * tiles {
        let (row, t) = (tile / tiles, tile % tiles);
        let width = tile_cols.min(cols - t * tile_cols);
        let codes = d.codes as u32;
        let lo = u32_at(image, d.offsets_at + 4 * tile).min(codes);
        let hi = u32_at(image, d.offsets_at + 4 * tile + 4).clamp(lo, codes);
        let mut done = 0usize;
        let mut base = lo as usize;
        while base < hi as usize && done < width {
            // Each lane's entries (absent codewords: all 3s, length 0).
            let lanes: Vec<[u64; CODES_PER_LANE]> = (0..LANES)
                .map(|lane| {
                    std::array::from_fn(|u| {
                        let i = base + lane * CODES_PER_LANE + u;
                        if i < hi as usize {
                            let code = u16::from_le_bytes(image[d.codes_at + 2 * i..][..2].try_into().unwrap());
                            entry(u32::from(code).min(max_code))
                        } else {
                            u64::MAX
                        }
                    })
                })
                .collect();
            let sums: Vec<usize> = lanes.iter().map(|l| l.iter().map(|&e| length(e)).sum()).collect();
            let total: usize = sums.iter().sum();
            let mut start = 0usize;
            for (lane, entries) in lanes.iter().enumerate() {
                let mut at = done + start;
                for &e in entries {
                    for (mask, symbol) in [(positive(e), 1u8), (negative(e), 2u8)] {
                        let mut m = mask;
                        while m != 0 {
                            let c = at + m.trailing_zeros() as usize / 2;
                            m &= m - 1;
                            if c < width {
                                out[row * cols + t * tile_cols + c] = symbol;
                            }
                        }
                    }
                    for j in 0..length(e) {
                        let c = at + j;
                        if c < width && out[row * cols + t * tile_cols + c] == 9 {
                            out[row * cols + t * tile_cols + c] = 0;
                        }
                    }
                    at += length(e);
                }
                start += sums[lane];
            }
            done += total;
            base += LANES * CODES_PER_LANE;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn the_kernels_reading_of_the_image_is_the_cpu_decode(
        matrices in 1usize..3, rows in 1usize..6, cols in 1usize..3000, p0 in 0.0f64..1.0,
        tile in prop_oneof![Just(256usize), Just(1024), Just(2048)], seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ms: Vec<_> = (0..matrices).map(|_| random_iid(&mut rng, rows, cols, p0)).collect();
        let bytes = encode(&ms, tile).unwrap();
        let view = Compressed::parse(&bytes).unwrap();
        let got = decode_like_the_kernels(&view, &view.image().unwrap());
        let want: Vec<u8> = ms.iter().flat_map(|m| m.symbols.iter().copied()).collect();
        prop_assert_eq!(got, want);
    }
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
