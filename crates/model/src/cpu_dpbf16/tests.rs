//! Unit tests of [`super`]: the order of [`dp`] against the instruction and against exact sums, the vector
//! tile against [`dp`]'s order bit for bit, and a row alone against the same row in a batch.

use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn random(seed: &mut u64, len: usize) -> Vec<bf16> {
    (0..len).map(|_| bf16::from_f32(lcg(seed))).collect()
}

/// Shapes for both orders: one and two rows over side-by-side panels (and a last group of fewer), 14 and 16
/// rows (a full tile plus a short one), past the few-rows bound (49, 60: row tiles of 14 and a short last
/// one), odd K (the last pair half zero), K over several blocks with a short last one (2500 inputs: 1250
/// pairs), n over several groups of panels with a partial last panel (n = 1000 is 31.25 panels).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 200, 33),
    (2, 130, 2500),
    (3, 70, 7),
    (14, 64, 512),
    (16, 1000, 601),
    (49, 40, 2500),
    (60, 1000, 130),
];

/// The exact sum in f64 (each bf16 product is exact in f32).
fn reference(x: &[bf16], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|kk| f64::from(x[i * k + kk].to_f32()) * f64::from(w[j * k + kk].to_f32()))
                .sum();
        }
    }
    y
}

#[test]
fn dp_order_is_close_to_the_exact_sum() {
    let mut s = 3u64;
    for &(m, n, k) in SHAPES {
        let (x, w) = (random(&mut s, m * k), random(&mut s, n * k));
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let got = DpWeight::pack(&w, n, k).product(&x, m, Some(&bias), Isa::Portable);
        let want = reference(&x, &w, m, n, k);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            let d = (f64::from(*g) - (r + f64::from(bias[i % n]))).abs();
            assert!(
                d < 1e-5 * (k as f64).sqrt(),
                "({m},{n},{k}) [{i}] off by {d}"
            );
        }
    }
}

/// Values with denormal pairs, middle sums and results: every flush in [`dp`] is taken.
fn with_denormals(seed: &mut u64, len: usize) -> Vec<bf16> {
    (0..len)
        .map(|i| {
            let v = lcg(seed);
            match i % 5 {
                // A denormal bf16 (exponent field 0).
                0 => bf16::from_bits((v.to_bits() >> 16) as u16 & 0x807f),
                // Tiny normals, whose products fall below f32's normal range.
                1 => bf16::from_f32(v * 2f32.powi(-60)),
                _ => bf16::from_f32(v),
            }
        })
        .collect()
}

#[test]
fn dp_flushes_denormals_as_the_instruction_does() {
    let b = |v: f32| bf16::from_f32(v).to_bits();
    let tiny = 2f32.powi(-126);
    // The odd product's sum with acc is 2^-127, denormal: flushed to 0 before the even product is added,
    // so the result is that product alone (not 2^-127 - 2^-126).
    let got = dp(2.0 * tiny, (b(1.0), b(1.0)), (b(-tiny), b(-1.5 * tiny)));
    assert_eq!(got.to_bits(), (-tiny).to_bits());
    // A denormal accumulator is read as zero; a denormal product result is flushed, keeping its sign.
    assert_eq!(dp(tiny / 4.0, (0, 0), (0, 0)).to_bits(), 0);
    let tiny_pair = (b(2f32.powi(-65)), 0);
    assert_eq!(
        dp(0.0, tiny_pair, (b(-(2f32.powi(-65))), 0)).to_bits(),
        (-0f32).to_bits()
    );
    // The odd input's product first: with acc = 1, an odd product of half an ulp of 1 (2^-24) and an even
    // one of an ulp (2^-23), odd first rounds 1 + 2^-24 to 1 (a tie, to even) and then adds the ulp; even
    // first gives 1 + 1.5 ulps, a tie rounded to 1 + 2 ulps.
    let (half_ulp, ulp) = (2f32.powi(-24), 2f32.powi(-23));
    let odd_first = (1.0 + half_ulp) + ulp;
    assert_ne!(
        odd_first,
        (1.0 + ulp) + half_ulp,
        "the case must tell the orders apart"
    );
    assert_eq!(dp(1.0, (b(1.0), b(1.0)), (b(ulp), b(half_ulp))), odd_first);
}

#[test]
fn the_vector_tile_sums_in_dp_order() {
    if !detected() {
        eprintln!("skipped: no AVX512-BF16 on this CPU (the portable order is tested above)");
        return;
    }
    let mut s = 9u64;
    for &(m, n, k) in SHAPES {
        for denormals in [false, true] {
            let gen = |s: &mut u64, len| {
                if denormals {
                    with_denormals(s, len)
                } else {
                    random(s, len)
                }
            };
            let (x, w) = (gen(&mut s, m * k), gen(&mut s, n * k));
            let packed = DpWeight::pack(&w, n, k);
            let vector = packed.product(&x, m, None, Isa::Avx512Bf16);
            let portable = packed.product(&x, m, None, Isa::Portable);
            for (i, (v, p)) in vector.iter().zip(&portable).enumerate() {
                assert_eq!(
                    v.to_bits(),
                    p.to_bits(),
                    "({m},{n},{k}) denormals {denormals} [{i}]: {v:e} against {p:e}"
                );
            }
        }
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
    // Alone (one row: side-by-side panels), among 16 (a streamed tile of 14 and one of 2) and among 60
    // (many rows: BLIS's order, row tiles of 14): the same bits for every row.
    let (n, k) = (100, 2500);
    let mut s = 21u64;
    let x = random(&mut s, 60 * k);
    let packed = DpWeight::pack(&random(&mut s, n * k), n, k);
    let batch = packed.matmul(&x, 60, None);
    let sixteen = packed.matmul(&x[..16 * k], 16, None);
    assert_eq!(sixteen, batch[..16 * n].to_vec());
    for r in [0, 13, 14, 15, 59] {
        let one = packed.matmul(&x[r * k..(r + 1) * k], 1, None);
        assert_eq!(one, batch[r * n..(r + 1) * n].to_vec(), "row {r}");
    }
}

#[test]
fn pair_layout_matches_the_amx_packing() {
    // cpu_amx packs with the same function (K padded to 32 there): input kk of column c where both say.
    let (n, k) = (40, 37);
    let w = random(&mut 5, n * k);
    let panels = pack_pairs(&w, n, k, 64);
    for c in 0..n {
        for kk in 0..k {
            let (p, cc) = (c / NR, c % NR);
            let at = p * 64 * NR + ((kk / 2) * NR + cc) * 2 + kk % 2;
            assert_eq!(
                panels[at],
                w[c * k + kk].to_bits(),
                "column {c}, input {kk}"
            );
        }
    }
}
