//! Unit tests of [`super`]: against a plain reference, bf16 against f32 bits, and a row alone against the
//! same row in a batch.

use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// Plain triple loop in f64: the reference.
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|kk| f64::from(x[i * k + kk]) * f64::from(w[j * k + kk]))
                .sum();
            y[i * n + j] = s as f32;
        }
    }
    y
}

#[test]
fn matches_the_reference_on_awkward_shapes() {
    let mut s = 7u64;
    for &(m, n, k) in &[
        (1, 1, 1),
        (1, 33, 5),
        (3, 64, 384),
        (9, 70, 385),
        (17, 31, 800),
        (50, 100, 1000),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let want = reference(&x, &w, m, n, k);
        let got = PackedWeight::from_f32(&w, n, k).matmul(&x, m, Some(&b));
        for i in 0..m * n {
            let d = (got[i] - (want[i] + b[i % n])).abs();
            assert!(
                d <= 1e-4 * (k as f32).sqrt(),
                "f32 ({m},{n},{k}) [{i}]: off by {d}"
            );
        }
        // bf16 weights: the same as f32 weights rounded to bf16.
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let want = reference(&x, &wr, m, n, k);
        let got = PackedWeight::from_bf16(&wb, n, k).matmul(&x, m, None);
        for i in 0..m * n {
            let d = (got[i] - want[i]).abs();
            assert!(
                d <= 1e-4 * (k as f32).sqrt(),
                "bf16 ({m},{n},{k}) [{i}]: off by {d}"
            );
        }
    }
}

#[test]
fn bf16_weights_give_the_bits_of_their_f32_values() {
    // Few rows widen in registers, many rows widen a group of panels at a time (several groups here,
    // and several K blocks): both must sum exactly what the f32 kernel sums.
    let mut seed = 11;
    for &(m, n, k) in &[
        (1, 1610, 800),
        (2, 1600, 800),
        (5, 1600, 800),
        (16, 1610, 800),
        (60, 1600, 800),
        (49, 40, 390),
    ] {
        let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        assert_eq!(
            PackedWeight::from_bf16(&w, n, k).matmul(&x, m, None),
            PackedWeight::from_f32(&wide, n, k).matmul(&x, m, None),
            "({m},{n},{k})"
        );
    }
}

#[test]
fn bf16_activations_give_the_bits_of_widening_them_first() {
    let mut seed = 7;
    for &(m, n, k) in &[(1, 40, 33), (16, 70, 100), (60, 33, 450)] {
        let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let wide: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let pw = PackedWeight::from_bf16(&w, n, k);
        assert_eq!(
            pw.matmul_bf16(&x, m, Some(&bias)),
            pw.matmul(&wide, m, Some(&bias)),
            "({m},{n},{k})"
        );
    }
}

#[test]
fn panels_are_dealt_evenly_and_completely() {
    for panels in 1..80 {
        for tasks in 1..=panels.min(12) {
            let ranges: Vec<_> = (0..tasks).map(|t| deal(panels, tasks, t)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[tasks - 1].end, panels);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{panels} panels in {tasks} tasks: {sizes:?}");
        }
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
    let mut s = 3u64;
    // 3 panels, the last part-empty; 43 panels: groups of MAX_PANELS side by side for one and two rows,
    // and shorter groups at the ends of the tasks' ranges.
    for (n, k) in [(77, 900), (1370, 900)] {
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..60 * k).map(|_| lcg(&mut s)).collect();
        let pw = PackedWeight::from_f32(&w, n, k);
        // Up to FEW_ROWS rows are transposed k-major, more are packed in row tiles: both against one
        // row; one and two rows read panels side by side, more one panel at a time.
        for m in [2, 3, 37, 16, 32, 60] {
            let all = pw.matmul(&x[..m * k], m, None);
            for r in [0, 1, 5, 8, 15, m - 1].into_iter().filter(|&r| r < m) {
                let one = pw.matmul(&x[r * k..(r + 1) * k], 1, None);
                assert_eq!(
                    one,
                    all[r * n..(r + 1) * n].to_vec(),
                    "row {r} of {m}, n {n}"
                );
            }
        }
    }
}

#[test]
fn the_vector_kernels_sum_in_the_portable_order() {
    // Every kernel this CPU can run against the portable one (on a CPU with AVX-512 both vector kernels
    // run; on one without, AVX2's).
    let mut isas = vec![];
    if has_avx512() {
        isas.push(Isa::Avx512);
    }
    if crate::cpu_features::avx2_fma() {
        isas.push(Isa::Avx2);
    }
    let mut s = 11u64;
    // Both loop orders: few rows (panel stream; 1 and 2 rows over several panels side by side, 3 rows,
    // 16, 27 and 32 rows, a decode step's batch, in tiles of the kernel's height: 14 + 2, 14 + 13 and
    // 14 + 14 + 4, or 12 + 4, 12 + 12 + 3 and 12 + 12 + 8 on AVX2; with a last panel of 8 and of 22
    // columns) and many rows (K/M blocking; 55 rows packed 14 high end with a 13-row tile). bf16 weights
    // too: the vector tiles widen their interleaved panel rows (`Elem::slot`) with a shift and a mask, the
    // portable one element by element.
    let shapes = [
        (1, 200, 500),
        (1, 75, 70),
        (2, 150, 500),
        (3, 40, 500),
        (10, 40, 500),
        (16, 40, 500),
        (27, 40, 500),
        (32, 86, 900),
        (55, 40, 500),
        (60, 40, 500),
    ];
    for isa in isas {
        for (m, n, k) in shapes {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            // As `PackedWeight::product` hands them over: k-major up to FEW_ROWS rows, else packed in tiles
            // of either kernel's height (each ISA runs both); and many rows k-major, as the attention's
            // second product.
            let xt: Vec<f32> = (0..m * k).map(|i| x[(i % m) * k + i / m]).collect();
            let packed: Vec<PackedRows> = if m > FEW_ROWS {
                [MR, AVX2_MR]
                    .map(|mr| PackedRows::build(m, k, false, mr, |r, kk| x[r * k + kk]))
                    .into()
            } else {
                vec![]
            };
            let mut layouts = vec![(0, Rows::KMajor { x: &xt, stride: m })];
            layouts.extend(packed.iter().map(|p| {
                (
                    p.mr,
                    Rows::Packed {
                        x: &p.data,
                        mr: p.mr,
                    },
                )
            }));
            // f32 panels in both layouts (rows of 32 columns, and halves), whichever this CPU packs.
            for ((mr, rows), pw) in layouts.into_iter().flat_map(|layout| {
                [
                    PackedWeight::pack_f32(&w, n, k, false),
                    PackedWeight::pack_f32(&w, n, k, true),
                    PackedWeight::from_bf16(&wb, n, k),
                ]
                .map(|pw| (layout, pw))
            }) {
                let run = |isa| {
                    let mut y = vec![0f32; m * n];
                    let out = SyncPtr(y.as_mut_ptr());
                    let panels = 0..n.div_ceil(NR);
                    match &pw.panels {
                        Panels::F32(w) => {
                            run_panels(w, pw.split, rows, m, (k, k), n, panels, &out, isa)
                        }
                        Panels::Bf16(w) => {
                            run_panels(w, false, rows, m, (k, k), n, panels, &out, isa)
                        }
                    }
                    y
                };
                let fast = run(isa);
                let slow = run(Isa::Portable);
                assert!(
                    fast.iter()
                        .zip(&slow)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} m = {m}, n = {n}, k = {k}, bf16 {}, halves {}, packed in tiles of {mr} rows \
                     (0: k-major)",
                    pw.is_bf16(),
                    pw.split
                );
                if isa == Isa::detect() {
                    assert_eq!(pw.matmul(&x, m, None), slow, "matmul, m = {m}");
                }
            }
        }
    }
}

#[test]
fn prepacked_k_major_and_fused_gelu_variants_agree_with_the_plain_product() {
    let mut s = 13u64;
    // Few rows (panel stream) and many rows (blocked), K over one block, n off the panel width.
    for (m, n, k) in [(5, 45, 70), (60, 45, 500)] {
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let pw = PackedWeight::from_f32(&w, n, k);
        let plain = pw.matmul(&x, m, None);
        // The same weight packed element by element from its transpose.
        let wt = PackedWeight::from_fn(n, k, |row, kk| w[row * k + kk]);
        assert_eq!(wt.matmul(&x, m, None), plain, "from_fn ({m},{n},{k})");
        // Rows packed once by the caller, and rows read in place k-major (x^T, row stride m + 3).
        let rows = PackedRows::from_fn(m, k, |r, kk| x[r * k + kk]);
        assert_eq!(
            pw.matmul_packed_serial(&rows, m),
            plain,
            "packed ({m},{n},{k})"
        );
        // A prefix of the packed rows (cut inside a row tile) is the product of those rows alone.
        let cut = m - 3;
        assert_eq!(
            pw.matmul_packed_serial(&rows, cut),
            pw.matmul(&x[..cut * k], cut, None),
            "packed prefix ({m},{n},{k})"
        );
        let stride = m + 3;
        let mut xt = vec![f32::NAN; k * stride];
        for r in 0..m {
            for kk in 0..k {
                xt[kk * stride + r] = x[r * k + kk];
            }
        }
        assert_eq!(
            pw.matmul_kmajor_serial(&xt, m, stride, k),
            plain,
            "k-major ({m},{n},{k})"
        );
        // The first `kp` inputs only (not a multiple of the K block): the product with the weight and
        // the rows cut to them.
        let kp = k - 7;
        let cut_w: Vec<f32> = (0..n)
            .flat_map(|row| w[row * k..row * k + kp].to_vec())
            .collect();
        let cut_x: Vec<f32> = (0..m).flat_map(|r| x[r * k..r * k + kp].to_vec()).collect();
        assert_eq!(
            pw.matmul_kmajor_serial(&xt, m, stride, kp),
            PackedWeight::from_f32(&cut_w, n, kp).matmul(&cut_x, m, None),
            "k-major prefix ({m},{n},{kp})"
        );
        // Bias then GELU, applied per task: the scalar GELU of the biased product within its error.
        let fused = pw.matmul_gelu(&x, m, Some(&b));
        let biased = pw.matmul(&x, m, Some(&b));
        for (i, (&g, &y)) in fused.iter().zip(&biased).enumerate() {
            let want = crate::elementwise::gelu_erf_f32(y);
            assert!(
                (g - want).abs() <= 2e-7 * y.abs().max(1.0),
                "gelu ({m},{n},{k}) [{i}]: {g} vs {want}"
            );
        }
    }
}

#[test]
fn packing_by_transposition_equals_element_wise() {
    let mut s = 11u64;
    for &(m, k) in &[(1, 1), (13, 15), (14, 16), (15, 17), (29, 33), (40, 100)] {
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let bits: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let same = |got: PackedRows, want: PackedRows, what: &str| {
            assert!(
                got.data
                    .iter()
                    .zip(&want.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && got.data.len() == want.data.len(),
                "{what} {m}x{k}"
            );
        };
        for parallel in [false, true] {
            let got = PackedRows::pack(&x, m, k, parallel);
            assert_eq!(got.mr, Isa::detect().tile_rows());
            let mr = got.mr;
            same(
                got,
                PackedRows::build(m, k, parallel, mr, |r, kk| x[r * k + kk]),
                "f32",
            );
            same(
                PackedRows::pack(&bits, m, k, parallel),
                PackedRows::build(m, k, parallel, mr, |r, kk| bits[r * k + kk].widen()),
                "bf16",
            );
        }
    }
}
