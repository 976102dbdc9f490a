//! The dictionary of the sub-1-bit format: a Tunstall code over ternary symbols. Every 16-bit codeword
//! stands for a phrase of 1..=32 symbols; the phrases are the leaves of a complete ternary tree grown by
//! always splitting the most probable leaf, so any symbol sequence parses uniquely into phrases and the
//! expected phrase is as long as 2^16 codewords allow (QMoE's idea of fixed-width codes for variable
//! runs, built the classic way).
//!
//! The dictionary is a pure function of the three symbol probabilities as stored in the header (16-bit
//! fixed point), so encoder and decoder rebuild the same one and the file carries a few bytes, not the
//! 576 KB table.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Symbols: 0 for a zero weight, 1 for the row's positive level, 2 for its negative level.
pub const SYMBOLS: usize = 3;
/// Longest phrase: 32 symbols of 2 bits fill a u64.
pub const MAX_PHRASE: usize = 32;
/// Codewords: 16-bit codes.
pub const MAX_ENTRIES: usize = 1 << 16;

/// Symbol probabilities in 16-bit fixed point (each in 1..=65535 after clamping; they need not sum
/// exactly to 65536).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolStats(pub [u16; SYMBOLS]);

impl SymbolStats {
    /// From symbol counts; every symbol gets at least the smallest probability, so every phrase is
    /// encodable whatever the data.
    pub fn from_counts(counts: [u64; SYMBOLS]) -> Self {
        let total: u64 = counts.iter().sum::<u64>().max(1);
        SymbolStats(counts.map(|c| ((c as f64 / total as f64 * 65536.0).round() as u64).clamp(1, 65535) as u16))
    }

    fn probabilities(&self) -> [f64; SYMBOLS] {
        let total: f64 = self.0.iter().map(|&p| f64::from(p)).sum();
        self.0.map(|p| f64::from(p) / total)
    }
}

/// The codewords: phrase i has `lengths[i]` symbols, symbol j in bits 2j..2j+2 of `symbols[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dictionary {
    pub lengths: Vec<u8>,
    pub symbols: Vec<u64>,
    /// The parse tree: node n's child for symbol s is `children[n][s]`, a node (>= 0) or a codeword
    /// (encoded as -1 - code). Node 0 is the root.
    children: Vec<[i32; SYMBOLS]>,
}

/// A leaf waiting to be split, ordered by probability (ties: the earlier-created leaf first, so the
/// construction is deterministic).
#[derive(PartialEq)]
struct Leaf {
    probability: f64,
    order: u64,
    length: u8,
    symbols: u64,
}
impl Eq for Leaf {}
impl PartialOrd for Leaf {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Leaf {
    fn cmp(&self, other: &Self) -> Ordering {
        self.probability.total_cmp(&other.probability).then_with(|| other.order.cmp(&self.order))
    }
}

impl Dictionary {
    /// Grows the Tunstall tree for these statistics to at most `entries` (3..=65536) codewords.
    pub fn build(stats: SymbolStats, entries: usize) -> Self {
        let p = stats.probabilities();
        let entries = entries.clamp(SYMBOLS, MAX_ENTRIES);
        let mut order = 0u64;
        let mut heap = BinaryHeap::new();
        let mut full = Vec::new(); // leaves at the length cap, never split
        for (s, &ps) in p.iter().enumerate() {
            heap.push(Leaf { probability: ps, order, length: 1, symbols: s as u64 });
            order += 1;
        }
        let mut count = SYMBOLS;
        while count + SYMBOLS - 1 <= entries {
            let Some(leaf) = heap.pop() else { break };
            if leaf.length as usize >= MAX_PHRASE {
                full.push(leaf);
                continue;
            }
            for (s, &ps) in p.iter().enumerate() {
                let symbols = leaf.symbols | (s as u64) << (2 * leaf.length as u32);
                heap.push(Leaf { probability: leaf.probability * ps, order, length: leaf.length + 1, symbols });
                order += 1;
            }
            count += SYMBOLS - 1;
        }
        let mut leaves: Vec<Leaf> = heap.into_vec();
        leaves.extend(full);
        // Codewords in a canonical order (by phrase), so the table does not depend on the heap's layout.
        leaves.sort_by_key(|l| (l.length, l.symbols));
        let lengths: Vec<u8> = leaves.iter().map(|l| l.length).collect();
        let symbols: Vec<u64> = leaves.iter().map(|l| l.symbols).collect();
        let children = Self::tree(&lengths, &symbols);
        Dictionary { lengths, symbols, children }
    }

    /// The parse tree of a complete phrase set.
    fn tree(lengths: &[u8], symbols: &[u64]) -> Vec<[i32; SYMBOLS]> {
        let mut children: Vec<[i32; SYMBOLS]> = vec![[i32::MIN; SYMBOLS]];
        for (code, (&len, &sym)) in lengths.iter().zip(symbols).enumerate() {
            let mut node = 0usize;
            for j in 0..len as usize {
                let s = ((sym >> (2 * j)) & 3) as usize;
                if j + 1 == len as usize {
                    children[node][s] = -1 - code as i32;
                } else {
                    if children[node][s] == i32::MIN {
                        children.push([i32::MIN; SYMBOLS]);
                        children[node][s] = (children.len() - 1) as i32;
                    }
                    node = children[node][s] as usize;
                }
            }
        }
        children
    }

    /// Number of codewords.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// True for a dictionary without codewords (never built by [`Dictionary::build`]).
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Symbol j of codeword `code`.
    pub fn symbol(&self, code: usize, j: usize) -> u8 {
        ((self.symbols[code] >> (2 * j)) & 3) as u8
    }

    /// Parses `symbols` into codewords, appending them to `out`. A trailing partial phrase is completed
    /// with zero symbols (the decoder stops at the tile's end, so they are never seen).
    pub fn encode(&self, symbols: &[u8], out: &mut Vec<u16>) {
        let mut node = 0usize;
        for &s in symbols {
            match self.children[node][s as usize] {
                c if c < 0 => {
                    out.push((-1 - c) as u16);
                    node = 0;
                }
                n => node = n as usize,
            }
        }
        while node != 0 {
            match self.children[node][0] {
                c if c < 0 => {
                    out.push((-1 - c) as u16);
                    node = 0;
                }
                n => node = n as usize,
            }
        }
    }
}
