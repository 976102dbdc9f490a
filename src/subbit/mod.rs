//! Sub-1-bit expert weights (QMoE-style): ternary weights per row ({0, +pos, -neg}) compressed with a
//! dictionary code of 2^16 16-bit codewords, each a run of up to 32 ternary symbols (see [`tunstall`]).
//!
//! # Format, version 1 (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MKT1` |
//! | 4 | 2 | version = 1 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | matrices (experts) M >= 1 |
//! | 12 | 4 | rows R >= 1 (output features) |
//! | 16 | 4 | cols C >= 1 (input features, the GEMM's K) |
//! | 20 | 4 | tile_cols: a power of two in 256..=65536; decoding can start at every tile of a row |
//! | 24 | 4 | dictionary entries D (3..=65536, as built) |
//! | 28 | 6 | symbol statistics: three u16 (zero, positive, negative) the dictionary is built from |
//! | 34 | 2 | reserved, 0 |
//! | 36 | 8 | codes: number of 16-bit codewords |
//! | 44 | 4 | reserved, 0 |
//! | 48 | 4·M·R | scales: per matrix and row, the positive then the negative level's magnitude, f16 |
//! | .. | 4·(M·R·tiles + 1) | tile offsets: index of each tile's first codeword (rows in order, then tiles), then the total |
//! | .. | 2·codes | codewords |
//!
//! A tile's codewords decode to at least its column count; the symbols past it (padding of the last
//! phrase) are dropped. [`Compressed::parse`] checks every field, every offset and every tile's
//! codeword lengths before anything decodes, so a kernel given a parsed buffer never reads out of bounds.

pub mod gemm;
pub mod gpu;
pub mod image;
pub mod tunstall;

pub use gemm::grouped_gemm;
pub use gpu::{decode as decode_on_gpu, matvec, DeviceWeights, Experts};

use crate::error::{Error, Result, Status};
use half::f16;
use tunstall::{Dictionary, SymbolStats, MAX_ENTRIES, SYMBOLS};

const MAGIC: &[u8; 4] = b"MKT1";
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 48;

/// One matrix of ternary weights: symbols (0 zero, 1 positive, 2 negative) and per-row levels.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    /// [rows, cols] symbols in 0..3.
    pub symbols: Vec<u8>,
    /// Per row: the value of symbol 1.
    pub positive: Vec<f32>,
    /// Per row: the magnitude of symbol 2 (its value is minus this).
    pub negative: Vec<f32>,
}

impl TernaryMatrix {
    /// The dense values: [rows, cols].
    pub fn dense(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let levels = [0.0, self.positive[r], -self.negative[r]];
            out.extend(self.symbols[r * self.cols..(r + 1) * self.cols].iter().map(|&s| levels[s as usize]));
        }
        out
    }
}

/// An i.i.d. ternary matrix with P(0) = `p0`, the two other symbols equally likely, and random row
/// levels in 0.01..0.1: the synthetic input the format's size targets are stated on.
pub fn random_iid(rng: &mut impl rand::Rng, rows: usize, cols: usize, p0: f64) -> TernaryMatrix {
    let symbols = (0..rows * cols)
        .map(|_| {
            let u: f64 = rng.random();
            if u < p0 {
                0
            } else if u < p0 + (1.0 - p0) / 2.0 {
                1
            } else {
                2
            }
        })
        .collect();
    TernaryMatrix {
        rows,
        cols,
        symbols,
        positive: (0..rows).map(|_| rng.random_range(0.01f32..0.1)).collect(),
        negative: (0..rows).map(|_| rng.random_range(0.01f32..0.1)).collect(),
    }
}

/// Round-to-nearest ternary quantization of [rows, cols] weights, per row: levels +pos and -neg chosen
/// to minimise the squared error (alternating nearest assignment and per-level means, from the
/// 0.7·mean|w| threshold of ternary weight networks).
pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> TernaryMatrix {
    assert!(weights.len() >= rows * cols, "weights shorter than [rows, cols]");
    let mut symbols = vec![0u8; rows * cols];
    let (mut positive, mut negative) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    for r in 0..rows {
        let w = &weights[r * cols..(r + 1) * cols];
        let mean_abs = w.iter().map(|x| f64::from(x.abs())).sum::<f64>() / cols as f64;
        let (mut pos, mut neg) = (mean_abs, mean_abs);
        let mut threshold = (0.7 * mean_abs, 0.7 * mean_abs);
        for _ in 0..8 {
            let (mut sp, mut np, mut sn, mut nn) = (0.0f64, 0u64, 0.0f64, 0u64);
            for &x in w {
                let x = f64::from(x);
                if x > threshold.0 {
                    sp += x;
                    np += 1;
                } else if -x > threshold.1 {
                    sn -= x;
                    nn += 1;
                }
            }
            pos = if np > 0 { sp / np as f64 } else { pos };
            neg = if nn > 0 { sn / nn as f64 } else { neg };
            // Nearest level: zero below half the level.
            threshold = (pos / 2.0, neg / 2.0);
        }
        for (s, &x) in symbols[r * cols..(r + 1) * cols].iter_mut().zip(w) {
            let x = f64::from(x);
            *s = if x > threshold.0 {
                1
            } else if -x > threshold.1 {
                2
            } else {
                0
            };
        }
        positive[r] = pos as f32;
        negative[r] = neg as f32;
    }
    TernaryMatrix { rows, cols, symbols, positive, negative }
}

fn corrupt(message: impl Into<String>) -> Error {
    Error::new(Status::InvalidValue, format!("corrupt sub-1-bit buffer: {}", message.into()))
}

/// Encodes matrices of one shape into the format, with a dictionary built from their symbol
/// statistics; rows are encoded on all available cores.
pub fn encode(matrices: &[TernaryMatrix], tile_cols: usize) -> Result<Vec<u8>> {
    let first = matrices.first().ok_or_else(|| Error::new(Status::InvalidValue, "no matrices to encode"))?;
    let (rows, cols) = (first.rows, first.cols);
    if rows == 0 || cols == 0 || matrices.iter().any(|m| m.rows != rows || m.cols != cols) {
        return Err(Error::new(Status::InvalidValue, "matrices must share one non-empty shape"));
    }
    if !tile_cols.is_power_of_two() || !(256..=65536).contains(&tile_cols) {
        return Err(Error::new(
            Status::InvalidValue,
            format!("tile_cols = {tile_cols}: a power of two in 256..=65536"),
        ));
    }
    let mut counts = [0u64; SYMBOLS];
    for m in matrices {
        if m.symbols.len() != rows * cols || m.symbols.iter().any(|&s| s as usize >= SYMBOLS) {
            return Err(Error::new(Status::InvalidValue, "symbols must be [rows, cols] values in 0..3"));
        }
        for &s in &m.symbols {
            counts[s as usize] += 1;
        }
    }
    let stats = SymbolStats::from_counts(counts);
    let dict = Dictionary::build(stats, MAX_ENTRIES);
    let tiles = cols.div_ceil(tile_cols);

    // Every row's codewords, tile by tile, in parallel over rows.
    let all_rows: Vec<(&TernaryMatrix, usize)> = matrices.iter().flat_map(|m| (0..rows).map(move |r| (m, r))).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = all_rows.len().div_ceil(threads);
    let encoded: Vec<(Vec<u16>, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = all_rows
            .chunks(per)
            .map(|chunk| {
                let dict = &dict;
                s.spawn(move || {
                    let (mut codes, mut tile_lengths) = (Vec::new(), Vec::new());
                    for &(m, r) in chunk {
                        let row = &m.symbols[r * cols..(r + 1) * cols];
                        for t in 0..tiles {
                            let before = codes.len();
                            dict.encode(&row[t * tile_cols..((t + 1) * tile_cols).min(cols)], &mut codes);
                            tile_lengths.push((codes.len() - before) as u32);
                        }
                    }
                    (codes, tile_lengths)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let total_codes: usize = encoded.iter().map(|(c, _)| c.len()).sum();
    if total_codes > u32::MAX as usize {
        return Err(Error::new(Status::InvalidValue, "too many codewords for 32-bit tile offsets"));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + matrices.len() * rows * (4 + 4 * tiles) + 2 * total_codes + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    for v in [matrices.len(), rows, cols, tile_cols, dict.len()] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for p in stats.0 {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(total_codes as u64).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for m in matrices {
        for r in 0..rows {
            out.extend_from_slice(&f16::from_f32(m.positive[r]).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(m.negative[r]).to_le_bytes());
        }
    }
    let mut offset = 0u32;
    for (_, tile_lengths) in &encoded {
        for &n in tile_lengths {
            out.extend_from_slice(&offset.to_le_bytes());
            offset += n;
        }
    }
    out.extend_from_slice(&offset.to_le_bytes());
    for (codes, _) in &encoded {
        for &c in codes {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }
    Ok(out)
}

/// A checked view of an encoded buffer.
#[derive(Debug)]
pub struct Compressed<'a> {
    pub matrices: usize,
    pub rows: usize,
    pub cols: usize,
    pub tile_cols: usize,
    pub dictionary: Dictionary,
    bytes: &'a [u8],
    scales_at: usize,
    offsets_at: usize,
    codes_at: usize,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Compressed<'a> {
    /// Checks a whole buffer (header, sizes, scales, offsets, every codeword and every tile's decoded
    /// length) and returns a view of it, or an error that says what is wrong. Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < HEADER_BYTES {
            return Err(corrupt(format!("{} bytes is shorter than the {HEADER_BYTES}-byte header", bytes.len())));
        }
        if &bytes[0..4] != MAGIC {
            return Err(corrupt("bad magic (not an MKT1 buffer)"));
        }
        let version = u16_at(bytes, 4);
        if version != VERSION {
            return Err(corrupt(format!("version {version}, this library reads {VERSION}")));
        }
        if u16_at(bytes, 6) != 0 || u16_at(bytes, 34) != 0 || u32_at(bytes, 44) != 0 {
            return Err(corrupt("reserved fields are not zero"));
        }
        let [matrices, rows, cols, tile_cols, entries] = [8, 12, 16, 20, 24].map(|at| u32_at(bytes, at) as u64);
        if matrices == 0 || rows == 0 || cols == 0 {
            return Err(corrupt("empty shape"));
        }
        if !tile_cols.is_power_of_two() || !(256..=65536).contains(&tile_cols) {
            return Err(corrupt(format!("tile_cols = {tile_cols}")));
        }
        if !(3..=MAX_ENTRIES as u64).contains(&entries) {
            return Err(corrupt(format!("{entries} dictionary entries")));
        }
        let stats = SymbolStats([28, 30, 32].map(|at| u16_at(bytes, at)));
        if stats.0.contains(&0) {
            return Err(corrupt("a symbol probability of zero"));
        }
        let codes = u64::from_le_bytes(bytes[36..44].try_into().unwrap());
        let tiles = cols.div_ceil(tile_cols);
        // Sizes in u128: no field combination can overflow them.
        let row_count = u128::from(matrices) * u128::from(rows);
        let scales_bytes = 4 * row_count;
        let offsets_bytes = 4 * (row_count * u128::from(tiles) + 1);
        let total = HEADER_BYTES as u128 + scales_bytes + offsets_bytes + 2 * u128::from(codes);
        if total != bytes.len() as u128 {
            return Err(corrupt(format!("the header describes {total} bytes, the buffer has {}", bytes.len())));
        }
        let dictionary = Dictionary::build(stats, entries as usize);
        if dictionary.len() as u64 != entries {
            return Err(corrupt(format!("{entries} dictionary entries cannot come from these statistics")));
        }
        let view = Compressed {
            matrices: matrices as usize,
            rows: rows as usize,
            cols: cols as usize,
            tile_cols: tile_cols as usize,
            dictionary,
            bytes,
            scales_at: HEADER_BYTES,
            offsets_at: HEADER_BYTES + scales_bytes as usize,
            codes_at: HEADER_BYTES + (scales_bytes + offsets_bytes) as usize,
        };
        for i in 0..2 * view.matrices * view.rows {
            let s = f16::from_bits(u16_at(bytes, view.scales_at + 2 * i));
            if !s.is_finite() || s.is_sign_negative() {
                return Err(corrupt(format!("scale {i} is {s}")));
            }
        }
        let tile_count = view.matrices * view.rows * tiles as usize;
        if view.offset(0) != 0 || u64::from(view.offset(tile_count)) != codes {
            return Err(corrupt("tile offsets do not span the codewords"));
        }
        for t in 0..tile_count {
            let (lo, hi) = (view.offset(t) as usize, view.offset(t + 1) as usize);
            if hi < lo || hi as u64 > codes {
                return Err(corrupt(format!("tile {t}'s offsets {lo}..{hi} are not inside the {codes} codewords")));
            }
            let width = view.tile_width(t % tiles as usize);
            let mut produced = 0usize;
            for i in lo..hi {
                let code = view.code(i) as usize;
                if code >= view.dictionary.len() {
                    return Err(corrupt(format!("codeword {i} = {code} is outside the dictionary")));
                }
                if produced >= width {
                    return Err(corrupt(format!("tile {t} has codewords past its {width} columns")));
                }
                produced += view.dictionary.lengths[code] as usize;
            }
            if produced < width {
                return Err(corrupt(format!("tile {t} decodes to {produced} of its {width} columns")));
            }
        }
        Ok(view)
    }

    fn offset(&self, i: usize) -> u32 {
        u32_at(self.bytes, self.offsets_at + 4 * i)
    }

    pub(crate) fn code(&self, i: usize) -> u16 {
        u16_at(self.bytes, self.codes_at + 2 * i)
    }

    fn tiles_per_row(&self) -> usize {
        self.cols.div_ceil(self.tile_cols)
    }

    fn tile_width(&self, t: usize) -> usize {
        (self.cols - t * self.tile_cols).min(self.tile_cols)
    }

    /// Decodes matrix `m` back to its symbols and (f16-rounded) levels.
    pub fn decode(&self, m: usize) -> TernaryMatrix {
        let (rows, cols, tiles) = (self.rows, self.cols, self.tiles_per_row());
        let mut symbols = Vec::with_capacity(rows * cols);
        let (mut positive, mut negative) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for r in 0..rows {
            let row = m * rows + r;
            positive.push(f16::from_bits(u16_at(self.bytes, self.scales_at + 4 * row)).to_f32());
            negative.push(f16::from_bits(u16_at(self.bytes, self.scales_at + 4 * row + 2)).to_f32());
            for t in 0..tiles {
                let tile = row * tiles + t;
                let end = symbols.len() + self.tile_width(t);
                for i in self.offset(tile) as usize..self.offset(tile + 1) as usize {
                    let code = self.code(i) as usize;
                    for j in 0..self.dictionary.lengths[code] as usize {
                        if symbols.len() < end {
                            symbols.push(self.dictionary.symbol(code, j));
                        }
                    }
                }
            }
        }
        TernaryMatrix { rows, cols, symbols, positive, negative }
    }

    /// Bits of the whole buffer per weight.
    pub fn bits_per_parameter(&self) -> f64 {
        self.bytes.len() as f64 * 8.0 / (self.matrices * self.rows * self.cols) as f64
    }
}

/// The Shannon limit, in bits per symbol, of i.i.d. ternary symbols with these probabilities.
pub fn entropy(p: [f64; SYMBOLS]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.log2()).sum()
}
