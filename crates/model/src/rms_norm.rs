//! Qwen2's RMSNorm on the CPU as one pass per row (spec 9): `weight * (x_f32 * rsqrt(mean(x_f32^2) + eps))
//! .to(dtype)`, in transformers' order: the f32 product is rounded to the activation dtype, then multiplied by
//! the weight in that dtype (one more rounding for 16-bit types).
//!
//! Composed from candle operations this was seven passes, each allocating a tensor and walking broadcast
//! strides on one thread; at decode and in bf16 prefill these small passes cost as much as the layer's
//! products. Rows run in parallel. On CUDA the decoder uses candle's fused `rms_norm` kernel instead.

use candle_core::cpu_backend::Map2;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::elementwise::{check_float, check_row_vector, contiguous, f, round};
use crate::error::Result;

/// RMSNorm of the rows of `x` `[..., n]` with `weight` `[n]` (same dtype), on the CPU.
pub fn rms_norm_cpu(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_row_vector(x, weight, "rms_norm weight")?;
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps: eps as f32 })?)
}

struct RmsNorm {
    eps: f32,
}

/// Rows per rayon task: enough work per task that a decode row (one task) pays no scheduling.
const ROWS_PER_TASK: usize = 16;

impl RmsNorm {
    fn rows<T: WithDType>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let n = w.len();
        let mut y = vec![T::zero(); x.len()];
        if n == 0 {
            return y;
        }
        let w: Vec<f32> = w.iter().map(|&v| f(v)).collect();
        let f32_out = T::DTYPE == DType::F32;
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(ys, xs)| {
                let mut xf = vec![0f32; n];
                for (yr, xr) in ys.chunks_exact_mut(n).zip(xs.chunks_exact(n)) {
                    for (d, s) in xf.iter_mut().zip(xr) {
                        *d = f(*s);
                    }
                    // Eight partial sums: vectorisable, and the order is fixed per row length, so a row gives
                    // the same bits alone or in a batch.
                    let mut acc = [0f32; 8];
                    let mut chunks = xf.chunks_exact(8);
                    for c in &mut chunks {
                        for (a, v) in acc.iter_mut().zip(c) {
                            *a += v * v;
                        }
                    }
                    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
                    let sum = acc.iter().sum::<f32>() + tail;
                    let r = 1.0 / (sum / n as f32 + self.eps).sqrt();
                    for ((d, &v), &g) in yr.iter_mut().zip(&xf).zip(&w) {
                        // `.to(dtype)` then `weight *` in the dtype: exact for f32, two roundings otherwise.
                        let normed = v * r;
                        *d = if f32_out {
                            round(normed * g)
                        } else {
                            round(f(round::<T>(normed)) * g)
                        };
                    }
                }
            });
        y
    }
}

impl Map2 for RmsNorm {
    const OP: &'static str = "rms_norm";
    fn f<T: WithDType>(
        &self,
        x: &[T],
        lx: &Layout,
        w: &[T],
        lw: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        check_float(T::DTYPE, Self::OP)?;
        Ok(self.rows(contiguous(x, lx, Self::OP)?, contiguous(w, lw, Self::OP)?))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "afnext-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.map(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// transformers' composition, written with candle operations.
    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let xf = x.to_dtype(DType::F32).unwrap();
        let var = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let r = (var + eps).unwrap().sqrt().unwrap().recip().unwrap();
        xf.broadcast_mul(&r)
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    #[test]
    fn equals_the_composed_norm_within_a_rounding() {
        for (dtype, tol) in [(DType::F32, 2e-6f32), (DType::BF16, 1.0 / 64.0)] {
            for (rows, n) in [(1, 896), (37, 13), (3, 64)] {
                let x = Tensor::randn(0f32, 2.0, (rows, n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(1f32, 0.2, n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let got = rms_norm_cpu(&x, &w, 1e-6).unwrap();
                let want = reference(&x, &w, 1e-6);
                // A different summation order moves the f32 scale by an ulp or two; in bf16 that can flip
                // one rounding (relative 2^-8 of values below ~4).
                let d = crate::elementwise::max_diff(&got, &want);
                assert!(d <= tol * 4.0, "{dtype:?} {rows}x{n}: {d}");
                // Each row alone gives the bits it gets in the batch.
                let one = rms_norm_cpu(&x.narrow(0, rows - 1, 1).unwrap(), &w, 1e-6).unwrap();
                assert_eq!(
                    crate::elementwise::max_diff(&one, &got.narrow(0, rows - 1, 1).unwrap()),
                    0.0
                );
            }
        }
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm_cpu(&x, &w, 1e-6).is_err());
    }
}
