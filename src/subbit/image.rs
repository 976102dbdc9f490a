//! The device image of a parsed buffer: what the kernels read, and the descriptor
//! (`moek_subbit_weights`) that says where its sections are.
//!
//! | section | contents | size |
//! |---|---|---|
//! | dictionary | per codeword, its phrase's 2-bit symbols with every slot past the phrase set to 3 | 8·D |
//! | levels | the buffer's f16 scales, per matrix and row: positive level, negative magnitude | 4·M·R |
//! | tile offsets | the buffer's u32 offsets | 4·(M·R·tiles + 1) |
//! | codewords | the buffer's u16 codewords | 2·codes |
//! | restarts | per (matrix, row, tile) and per [`RESTART_COLS`] columns of the tile: where decoding may start | 4·M·R·tiles·(tile_cols / 256) |
//!
//! A restart j of a tile names the first phrase that starts at column j·256 of the tile or later: the
//! codeword's index counted from the tile's first (bits 5..32) and how far past j·256 the phrase starts
//! (bits 0..5, 0..=31 as phrases are at most 32 symbols); a restart past the tile's last phrase start is
//! the tile's codeword count with 0. The fused matvec splits every tile into sub-streams at restarts
//! (each phrase belongs to the one where it starts), so a tile is walked by several threads at once. The
//! restarts are not in the on-disk format: [`Compressed::write_image`] derives them.
//!
//! Each section starts at a multiple of 16 bytes. The image is rebuilt from a validated buffer only, and
//! its layout is a function of the descriptor's shape fields, so a call can check a descriptor against
//! itself (`check_descriptor`, run by every call).

use super::tunstall::MAX_PHRASE;
use super::Compressed;
use crate::error::{bail, Result};
use crate::sys;

const ALIGN: u64 = 16;

/// Columns between two restarts of a tile in the image (tile_cols is a power of two of at least this).
pub const RESTART_COLS: usize = 256;

fn align(v: u64) -> Option<u64> {
    v.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN)
}

/// Byte offsets of the sections, the restarts' offset and the image's size, or None when they overflow
/// 64 bits.
fn layout(matrices: u64, rows: u64, tiles: u64, tile_cols: u64, entries: u64, codes: u64) -> Option<[u64; 6]> {
    let dictionary_at = 0u64;
    let scales_at = align(entries.checked_mul(8)?)?;
    let rows_total = matrices.checked_mul(rows)?;
    let offsets_at = align(scales_at.checked_add(rows_total.checked_mul(4)?)?)?;
    let offset_count = rows_total.checked_mul(tiles)?.checked_add(1)?;
    let codes_at = align(offsets_at.checked_add(offset_count.checked_mul(4)?)?)?;
    let restarts_at = align(codes_at.checked_add(codes.checked_mul(2)?)?)?;
    let restarts = rows_total.checked_mul(tiles)?.checked_mul(tile_cols / RESTART_COLS as u64)?;
    let bytes = align(restarts_at.checked_add(restarts.checked_mul(4)?)?)?;
    Some([dictionary_at, scales_at, offsets_at, codes_at, restarts_at, bytes])
}

/// Byte offset of the restarts section in an image with this (checked) descriptor: right after the
/// codewords, 16-byte aligned (the kernels compute it the same way; the descriptor has no field for it).
pub fn restarts_at(w: &sys::moek_subbit_weights) -> usize {
    (w.codes_at + 2 * w.codes as usize).div_ceil(ALIGN as usize) * ALIGN as usize
}

/// The dictionary entry of a phrase of `length` symbols, symbol j in bits 2j..2j+2 of `symbols` (see
/// the module's doc).
fn entry(length: u8, symbols: u64) -> u64 {
    let (mut nonzero, mut sign) = (0u32, 0u32);
    for j in 0..u32::from(length).min(MAX_PHRASE as u32) {
        match (symbols >> (2 * j)) & 3 {
            1 => nonzero |= 1 << j,
            2 => {
                nonzero |= 1 << j;
                sign |= 1 << j;
            }
            _ => {}
        }
    }
    if (length as usize) < MAX_PHRASE {
        sign |= 1 << length;
    }
    u64::from(nonzero) | u64::from(sign) << 32
}

/// The image's codeword order: `rank[code]` is the image's number of the buffer's `code`, most used
/// codewords first (ties by the buffer's number, so the order is a function of the buffer).
fn ranks(view: &Compressed, codes: usize) -> Vec<u16> {
    let entries = view.dictionary.len();
    let mut counts = vec![0u64; entries];
    for i in 0..codes {
        counts[view.code(i) as usize] += 1;
    }
    let mut order: Vec<usize> = (0..entries).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(counts[c]), c));
    let mut rank = vec![0u16; entries];
    for (r, &c) in order.iter().enumerate() {
        rank[c] = r as u16;
    }
    rank
}

impl Compressed<'_> {
    /// The descriptor of this buffer's device image, with `image` NULL. Fails (naming the field) for a
    /// shape the kernels' 32-bit sizes cannot take: M, R or C above 2^31-1.
    pub fn descriptor(&self) -> Result<sys::moek_subbit_weights> {
        for (name, v) in [("matrices", self.matrices), ("rows", self.rows), ("cols", self.cols)] {
            if v > i32::MAX as usize {
                bail!(InvalidValue, "{name} = {v}: the kernels take at most 2^31-1");
            }
        }
        let tiles = self.tiles_per_row();
        let codes = (self.bytes.len() - self.codes_at) / 2;
        let [dictionary_at, scales_at, offsets_at, codes_at, _, bytes] = layout(
            self.matrices as u64,
            self.rows as u64,
            tiles as u64,
            self.tile_cols as u64,
            self.dictionary.len() as u64,
            codes as u64,
        )
        .expect("a parsed buffer's image fits in 64 bits");
        Ok(sys::moek_subbit_weights {
            matrices: self.matrices as i32,
            rows: self.rows as i32,
            cols: self.cols as i32,
            tile_cols: self.tile_cols as i32,
            tiles_per_row: tiles as i32,
            dictionary_entries: self.dictionary.len() as i32,
            codes: codes as i64,
            image_bytes: bytes as usize,
            dictionary_at: dictionary_at as usize,
            scales_at: scales_at as usize,
            offsets_at: offsets_at as usize,
            codes_at: codes_at as usize,
            image: std::ptr::null(),
        })
    }

    /// Writes the device image into `out` (at least `descriptor().image_bytes` long; padding is zeroed).
    pub fn write_image(&self, out: &mut [u8]) -> Result<()> {
        let d = self.descriptor()?;
        if out.len() < d.image_bytes {
            bail!(BufferTooSmall, "image has {} bytes but {} are needed", out.len(), d.image_bytes);
        }
        out[..d.image_bytes].fill(0);
        let codes = d.codes as usize;
        let rank = ranks(self, codes);
        for (i, (&len, &sym)) in self.dictionary.lengths.iter().zip(&self.dictionary.symbols).enumerate() {
            let at = d.dictionary_at + 8 * rank[i] as usize;
            out[at..at + 8].copy_from_slice(&entry(len, sym).to_le_bytes());
        }
        let copy = |out: &mut [u8], to: usize, from: usize, len: usize| {
            out[to..to + len].copy_from_slice(&self.bytes[from..from + len]);
        };
        copy(out, d.scales_at, self.scales_at, self.offsets_at - self.scales_at);
        copy(out, d.offsets_at, self.offsets_at, self.codes_at - self.offsets_at);
        for (i, slot) in out[d.codes_at..d.codes_at + 2 * codes].chunks_exact_mut(2).enumerate() {
            slot.copy_from_slice(&rank[self.code(i) as usize].to_le_bytes());
        }
        self.write_restarts(&mut out[restarts_at(&d)..d.image_bytes]);
        Ok(())
    }

    /// The restarts section (see the module's doc) into `out`, tile by tile.
    fn write_restarts(&self, out: &mut [u8]) {
        let per_tile = self.tile_cols / RESTART_COLS;
        let tiles = self.tiles_per_row();
        let mut slots = out.chunks_exact_mut(4);
        for tile in 0..self.matrices * self.rows * tiles {
            let (lo, hi) = (self.offset(tile) as usize, self.offset(tile + 1) as usize);
            let (mut i, mut start) = (lo, 0usize); // codeword i's phrase starts at column `start`
            for j in 0..per_tile {
                let col = j * RESTART_COLS;
                while i < hi && start < col {
                    start += self.dictionary.lengths[self.code(i) as usize] as usize;
                    i += 1;
                }
                // invariant: a tile has at most tile_cols <= 2^16 codewords (parse refuses more), so the
                // index fits its 27 bits; a phrase starting at `col` or later starts before col + 32.
                let packed = if i < hi { ((i - lo) << 5 | (start - col)) as u32 } else { ((hi - lo) << 5) as u32 };
                slots.next().expect("the section holds every restart").copy_from_slice(&packed.to_le_bytes());
            }
        }
    }

    /// The device image as a new vector.
    pub fn image(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.descriptor()?.image_bytes];
        self.write_image(&mut out)?;
        Ok(out)
    }
}

/// Checks a descriptor's shape fields and that its layout fields are the ones its shape gives (a
/// descriptor not made by `moek_subbit_parse` is refused, naming the first wrong field). Does not look
/// at `image`.
pub(crate) fn check_descriptor(w: &sys::moek_subbit_weights) -> Result<()> {
    for (name, v) in [("matrices", w.matrices), ("rows", w.rows), ("cols", w.cols)] {
        if v < 1 {
            bail!(InvalidValue, "weights.{name} = {v} must be at least 1");
        }
    }
    let tile = w.tile_cols;
    if !(256..=65536).contains(&tile) || (tile & (tile - 1)) != 0 {
        bail!(InvalidValue, "weights.tile_cols = {tile} must be a power of two in 256..=65536");
    }
    let tiles = (i64::from(w.cols) + i64::from(tile) - 1) / i64::from(tile);
    if i64::from(w.tiles_per_row) != tiles {
        bail!(InvalidValue, "weights.tiles_per_row = {} but cols and tile_cols give {tiles}", w.tiles_per_row);
    }
    if !(3..=65536).contains(&w.dictionary_entries) {
        bail!(InvalidValue, "weights.dictionary_entries = {} is outside 3..=65536", w.dictionary_entries);
    }
    if !(0..=i64::from(u32::MAX)).contains(&w.codes) {
        bail!(InvalidValue, "weights.codes = {} is outside 0..=2^32-1 (32-bit tile offsets)", w.codes);
    }
    let rows_total = i64::from(w.matrices) * i64::from(w.rows);
    if rows_total.checked_mul(tiles).is_none_or(|n| n >= i64::from(u32::MAX)) {
        bail!(InvalidValue, "weights: {rows_total} rows of {tiles} tiles need more than 32-bit tile indices");
    }
    let Some([dictionary_at, scales_at, offsets_at, codes_at, _, bytes]) = layout(
        w.matrices as u64,
        w.rows as u64,
        tiles as u64,
        tile as u64,
        w.dictionary_entries as u64,
        w.codes as u64,
    ) else {
        bail!(InvalidValue, "weights: the image size overflows 64 bits");
    };
    let expected = [dictionary_at, scales_at, offsets_at, codes_at, bytes];
    let have = [w.dictionary_at, w.scales_at, w.offsets_at, w.codes_at, w.image_bytes];
    let names = ["dictionary_at", "scales_at", "offsets_at", "codes_at", "image_bytes"];
    for ((name, &h), &e) in names.iter().zip(&have).zip(&expected) {
        if h as u64 != e {
            bail!(
                InvalidValue,
                "weights.{name} = {h} but the shape gives {e} (fill the descriptor with moek_subbit_parse)"
            );
        }
    }
    Ok(())
}
