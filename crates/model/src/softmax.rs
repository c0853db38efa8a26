//! Row softmax for attention scores, computed in f32 with one rounding to the scores' dtype, with an
//! optional causal limit per row: attention over bf16 scores needs no f32 copy of them and no additive mask
//! (on a GPU, an f32 copy, a mask and the casts back cost more memory traffic than the two matmuls).
//!
//! CPU: plain Rust over rows in parallel. CUDA (feature `cuda`): `kernels/softmax.cu`, compiled to PTX by
//! `build.rs`. Rows of up to 2 048 columns: one warp per row, read once into registers; longer rows: one
//! block per row, an online (max, sum) in the first pass and the normalised values in the second.

use candle_core::cpu_backend::Map1;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::elementwise::{check_float, contiguous};
use crate::error::Result;

/// Softmax over the last dimension of `x`. With `causal = Some((n, first))`, row `r` (counting rows over all
/// leading dimensions) keeps its columns `0..=first + r % n` and gets exact zeros after them: the rows of
/// a block of `n` queries at positions `first..first + n` (repeated over heads) against keys from position
/// 0. A row always sees at least its own key, so no row is empty.
pub fn softmax_rows(x: &Tensor, causal: Option<(usize, usize)>) -> Result<Tensor> {
    softmax_rows_scaled(x, causal, 1.0)
}

/// [`softmax_rows`] of `scale * x`, the product taken in f32: attention's `1/sqrt(head_dim)` without a pass
/// over the queries or the scores.
pub fn softmax_rows_scaled(
    x: &Tensor,
    causal: Option<(usize, usize)>,
    scale: f32,
) -> Result<Tensor> {
    let (diag, first) = causal.unwrap_or((0, 0));
    Ok(x.contiguous()?
        .apply_op1_no_bwd(&RowSoftmax { diag, first, scale })?)
}

/// Rows of at most this many columns take the warp-per-row kernel (`kernels/softmax.cu`: 32 lanes x 64).
#[cfg(feature = "cuda")]
const WARP_COLS: usize = 2048;

struct RowSoftmax {
    /// 0: every column is visible; else the causal block's query count `n`.
    diag: usize,
    first: usize,
    scale: f32,
}

impl RowSoftmax {
    fn visible(&self, row: usize, ncols: usize) -> usize {
        if self.diag == 0 {
            ncols
        } else {
            (self.first + row % self.diag + 1).min(ncols)
        }
    }

    fn cpu<T: WithDType>(&self, x: &[T], ncols: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        if ncols == 0 {
            return y;
        }
        y.par_chunks_mut(ncols)
            .zip(x.par_chunks(ncols))
            .enumerate()
            // One f32 scratch row per rayon job, not per row (the encoder has 30 000 rows per window).
            .for_each_init(Vec::new, |e: &mut Vec<f32>, (row, (yr, xr))| {
                let vis = self.visible(row, ncols);
                e.clear();
                e.extend(
                    xr[..vis]
                        .iter()
                        .map(|&v| crate::elementwise::f(v) * self.scale),
                );
                let m = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s = crate::cpu_exp::exp_below_max_sum(e, m);
                for (y, e) in yr.iter_mut().zip(e.iter()) {
                    *y = crate::elementwise::round(e / s);
                }
            });
        y
    }
}

impl Map1 for RowSoftmax {
    fn f<T: WithDType>(&self, vs: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
        check_float(T::DTYPE, "softmax_rows")?;
        let ncols = l.dims().last().copied().unwrap_or(1);
        Ok(self.cpu(contiguous(vs, l, "softmax_rows")?, ncols))
    }
}

#[cfg(feature = "cuda")]
impl candle_core::cuda_backend::Map1 for RowSoftmax {
    fn f<T: cudarc::driver::DeviceRepr + WithDType + cudarc::driver::ValidAsZeroBits>(
        &self,
        src: &cudarc::driver::CudaSlice<T>,
        dev: &candle_core::CudaDevice,
        l: &Layout,
    ) -> candle_core::Result<cudarc::driver::CudaSlice<T>> {
        use candle_core::cuda_backend::{kernel_name, WrapErr};
        use cudarc::driver::{LaunchConfig, PushKernelArg};

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

        check_float(T::DTYPE, "softmax_rows")?;
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("softmax_rows: input must be contiguous".into())
        })?;
        let src = src.slice(start..end);
        let n = end - start;
        let ncols = l.dims().last().copied().unwrap_or(1);
        // SAFETY: every element is written by the kernel below.
        let dst = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(dst);
        }
        let rows = n / ncols;
        let (nc, diag, first) = (ncols as i32, self.diag as i32, self.first as i32);
        // Short rows (the encoder's 1 500 keys, short prompts): a warp per row, held in registers.
        let warp = ncols <= WARP_COLS;
        let cfg = if warp {
            LaunchConfig {
                grid_dim: (rows.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (if ncols >= 4096 { 256 } else { 128 }, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        let name = kernel_name::<T>(if warp {
            "afnext_softmax_rows_warp"
        } else {
            "afnext_softmax_rows"
        });
        let func = dev.get_or_load_custom_func(&name, "afnext_softmax", PTX)?;
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&dst);
        let nrows = rows as i64;
        if warp {
            b.arg(&nrows);
        }
        b.arg(&nc);
        b.arg(&diag);
        b.arg(&first);
        b.arg(&self.scale);
        // SAFETY: the kernel reads `rows * ncols` elements of `src` and writes as many of `dst`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(dst)
    }
}

impl CustomOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "afnext-softmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((Map1::map(self, s, l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;

        if l.dims().last().copied().unwrap_or(1) > i32::MAX as usize
            || self.first + self.diag > i32::MAX as usize
        {
            candle_core::bail!("softmax_rows: row too long for the CUDA kernel");
        }
        let dev = s.device();
        let slice = candle_core::cuda_backend::Map1::map(self, &s.slice, dev, l)?;
        Ok((
            candle_core::CudaStorage {
                slice,
                device: dev.clone(),
            },
            l.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elementwise::max_diff;
    use candle_core::{DType, Device, IndexOp};

    /// Deterministic scores of a few units' spread, like attention logits.
    fn scores(dtype: DType) -> Tensor {
        let v: Vec<f32> = (0..2 * 6 * 9)
            .map(|i| 3.0 * ((i * 7919 % 101) as f32 / 101.0 * std::f32::consts::TAU).sin())
            .collect();
        Tensor::from_vec(v, (2, 6, 9), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn full_rows_match_candles_softmax() {
        let x = scores(DType::F32);
        let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let got = softmax_rows(&x, None).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn causal_rows_equal_softmax_over_their_visible_prefix() {
        // Rows are 2 kv heads x (2 query heads x 3 queries at positions 6, 7, 8) over keys 0..9.
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = scores(dtype);
            let (n, first) = (3, 6);
            let got = softmax_rows(&x, Some((n, first))).unwrap();
            for h in 0..2 {
                for r in 0..6 {
                    let vis = first + r % n + 1;
                    let row = x.i((h, r)).unwrap();
                    let want = candle_nn::ops::softmax_last_dim(
                        &row.narrow(0, 0, vis).unwrap().to_dtype(DType::F32).unwrap(),
                    )
                    .unwrap();
                    let g = got.i((h, r)).unwrap().to_dtype(DType::F32).unwrap();
                    let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                    let d = max_diff(&g.narrow(0, 0, vis).unwrap(), &want);
                    assert!(d < tol, "{dtype:?} row {h},{r}: {d}");
                    if vis < 9 {
                        let tail = g.narrow(0, vis, 9 - vis).unwrap().abs().unwrap();
                        assert_eq!(tail.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
                    }
                }
            }
            // One rounding: the result in `dtype` is the f32 result (of the same inputs) rounded.
            let f32_then_round = softmax_rows(&x.to_dtype(DType::F32).unwrap(), Some((n, first)))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let same = got
                .eq(&f32_then_round)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .min_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(same, 1.0, "{dtype:?} is not one rounding of the f32 result");
        }
    }
}
