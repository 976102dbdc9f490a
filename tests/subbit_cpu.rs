//! The sub-1-bit format on the CPU: lossless round trips on odd shapes, a validator that refuses
//! mutated or truncated buffers without panicking, and the size target on i.i.d. ternary matrices.

use moe_kernels::subbit::{encode, entropy, quantize, random_iid as iid, Compressed, TernaryMatrix};
use proptest::prelude::*;
use rand::SeedableRng;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn decode_of_encode_is_the_identity(
        matrices in 1usize..4, rows in 1usize..9, cols in 1usize..1300, p0 in 0.0f64..1.0,
        tile in prop_oneof![Just(256usize), Just(512), Just(1024)], seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ms: Vec<TernaryMatrix> = (0..matrices).map(|_| iid(&mut rng, rows, cols, p0)).collect();
        let bytes = encode(&ms, tile).unwrap();
        let view = Compressed::parse(&bytes).unwrap();
        for (i, m) in ms.iter().enumerate() {
            let back = view.decode(i);
            prop_assert_eq!(&back.symbols, &m.symbols);
            for r in 0..rows {
                prop_assert!((back.positive[r] - m.positive[r]).abs() <= 1e-3 * m.positive[r]);
                prop_assert!((back.negative[r] - m.negative[r]).abs() <= 1e-3 * m.negative[r]);
            }
        }
    }

    #[test]
    fn mutated_buffers_are_refused_or_decode_without_panicking(
        seed in any::<u64>(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(), truncate in any::<bool>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ms = vec![iid(&mut rng, 3, 700, 0.885)];
        let mut bytes = encode(&ms, 256).unwrap();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value.max(1);
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        // Either refused with a message, or (a flip inside the codewords that keeps every tile's length
        // right) a buffer that decodes to the right shape.
        match Compressed::parse(&bytes) {
            Err(e) => prop_assert!(e.message.contains("corrupt")),
            Ok(v) => {
                let m = v.decode(0);
                prop_assert_eq!(m.symbols.len(), v.rows * v.cols);
            }
        }
    }
}

#[test]
fn iid_ternary_at_p0_0885_fits_in_0_72_bits_per_parameter() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let m = iid(&mut rng, 2080, 6144, 0.885);
    let bytes = encode(std::slice::from_ref(&m), 2048).unwrap();
    let view = Compressed::parse(&bytes).unwrap();
    let bits = view.bits_per_parameter();
    let limit = entropy([0.885, 0.0575, 0.0575]);
    eprintln!("P(0)=0.885: {bits:.4} bit/parameter, everything included (Shannon limit {limit:.4})");
    assert!(bits <= 0.72, "{bits} bit/parameter");
    assert_eq!(view.decode(0).symbols, m.symbols);
}

#[test]
fn quantize_picks_levels_that_minimise_the_error() {
    // A row of exact ternary values is reproduced exactly.
    let w = [0.0, 0.5, -0.25, 0.0, 0.5, -0.25, 0.0, 0.0];
    let q = quantize(&w, 1, 8);
    assert_eq!(q.symbols, vec![0, 1, 2, 0, 1, 2, 0, 0]);
    assert!((q.positive[0] - 0.5).abs() < 1e-6 && (q.negative[0] - 0.25).abs() < 1e-6);
    assert_eq!(q.dense(), w.to_vec());
}
