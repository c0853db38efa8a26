//! afnext's own kernels (row softmax with a scale and a causal limit, bias add, bias add + GELU, silu x up) on the test device
//! (`AFNEXT_TEST_DEVICE`; `scripts/gpu-check.sh` runs this on a lent GPU) against the plain candle
//! compositions they replace, computed on the CPU. Row lengths cover both softmax kernels (one warp per row up
//! to 2 048 columns, one block per row beyond) and their edges.

use afnext_e2e::{max_tensor_diff, test_device};
use afnext_model::elementwise::{add_bias, add_bias_gelu, silu_mul, silu_mul_halves};
use afnext_model::softmax::softmax_rows_scaled;
use candle_core::{DType, Device, IndexOp, Tensor};

/// Deterministic values spread over `[-scale, scale)`.
fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * (2.0 * (((i * 7919 + seed * 104_729) % 10_007) as f32 / 10_007.0) - 1.0))
        .collect()
}

#[test]
fn softmax_rows_match_softmax_over_each_rows_visible_prefix() {
    let dev = test_device();
    for &(rows, cols, causal) in &[
        (6, 7, None),
        (4, 1500, None),
        (3, 2048, Some((3, 2045))),
        (5, 2049, None),
        (8, 2049, Some((4, 2045))),
        (2, 5000, Some((2, 4998))),
        (3, 45_000, Some((3, 44_997))),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::from_vec(values(rows * cols, cols, 8.0), (rows, cols), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // Attention's 1/sqrt(head_dim) where the rows are causal blocks; 1 elsewhere.
            let scale = if causal.is_some() { 0.088_388_35 } else { 1.0 };
            let got = softmax_rows_scaled(&x.to_device(&dev).unwrap(), causal, scale).unwrap();
            for r in 0..rows {
                let vis = causal.map_or(cols, |(n, first): (usize, usize)| first + r % n + 1);
                let xr = x.i(r).unwrap().to_dtype(DType::F32).unwrap();
                let want = candle_nn::ops::softmax_last_dim(
                    &(xr.narrow(0, 0, vis).unwrap() * scale as f64).unwrap(),
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let g = got.i(r).unwrap();
                let d = max_tensor_diff(&g.narrow(0, 0, vis).unwrap(), &want);
                // One rounding of a value below 1 in bf16 (2^-8 relative), f32 summation order.
                let tol = if dtype == DType::F32 { 1e-6 } else { 4e-3 };
                assert!(d <= tol, "{rows}x{cols} {causal:?} {dtype:?} row {r}: {d}");
                if vis < cols {
                    let tail = g.narrow(0, vis, cols - vis).unwrap();
                    let zero = Tensor::zeros(cols - vis, dtype, &Device::Cpu).unwrap();
                    assert_eq!(
                        max_tensor_diff(&tail, &zero),
                        0.0,
                        "{rows}x{cols} row {r} tail"
                    );
                }
            }
        }
    }
}

#[test]
fn bias_add_and_silu_mul_match_candles_operations() {
    let dev = test_device();
    for dtype in [DType::F32, DType::BF16] {
        for &(rows, cols) in &[(1, 3), (7, 1280), (4100, 33)] {
            let mk = |n: usize, seed: usize, shape: &[usize]| {
                Tensor::from_vec(values(n, seed, 4.0), shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let x = mk(rows * cols, 1, &[rows, cols]);
            let b = mk(cols, 2, &[cols]);
            let got = add_bias(&x.to_device(&dev).unwrap(), &b.to_device(&dev).unwrap()).unwrap();
            assert_eq!(
                max_tensor_diff(&got, &x.broadcast_add(&b).unwrap()),
                0.0,
                "add_bias {rows}x{cols} {dtype:?}"
            );
            let got =
                add_bias_gelu(&x.to_device(&dev).unwrap(), &b.to_device(&dev).unwrap()).unwrap();
            let want = x.broadcast_add(&b).unwrap().gelu_erf().unwrap();
            // |y| < 8: erf's last bits in f32, or one bf16 ulp where they tip a rounding.
            let tol = if dtype == DType::F32 {
                1e-5
            } else {
                8.0 / 128.0
            };
            let d = max_tensor_diff(&got, &want);
            assert!(d <= tol, "add_bias_gelu {rows}x{cols} {dtype:?}: {d}");
            let u = mk(rows * cols, 3, &[rows, cols]);
            let got = silu_mul(&x.to_device(&dev).unwrap(), &u.to_device(&dev).unwrap()).unwrap();
            let want = (candle_nn::ops::silu(&x.to_dtype(DType::F32).unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                * u.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            // Each value is |y| < 16: f32 exp's last bits, or one bf16 ulp where they tip a rounding.
            let tol = if dtype == DType::F32 {
                1e-5
            } else {
                16.0 / 128.0
            };
            let d = max_tensor_diff(&got, &want);
            assert!(d <= tol, "silu_mul {rows}x{cols} {dtype:?}: {d}");
        }
    }
}

#[test]
fn silu_mul_of_stacked_halves_equals_silu_mul_of_the_two() {
    let dev = test_device();
    for dtype in [DType::F32, DType::BF16] {
        // One row of a decode step across chunk edges (4 096), several rows, a row of one column.
        for &(rows, cols) in &[(1, 4864), (3, 4097), (5, 1), (2, 33)] {
            let mk = |seed: usize| {
                Tensor::from_vec(values(rows * cols, seed, 6.0), (rows, cols), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap()
            };
            let (g, u) = (mk(5), mk(6));
            let stacked = Tensor::cat(&[&g, &u], 1).unwrap();
            let got = silu_mul_halves(&stacked).unwrap();
            assert_eq!(got.dims(), &[rows, cols]);
            let want = silu_mul(&g, &u).unwrap();
            assert_eq!(
                max_tensor_diff(&got, &want),
                0.0,
                "silu_mul_halves {rows}x{cols} {dtype:?}"
            );
        }
    }
    let odd = Tensor::zeros((2, 7), DType::F32, &dev).unwrap();
    let err = silu_mul_halves(&odd).unwrap_err().to_string();
    assert!(err.contains("must be even"), "{err}");
}
