//! Matrix-vector products for decode on the CPU.
//!
//! At batch 1 a decode step multiplies one activation row by every weight matrix, so its speed is the rate at
//! which weights stream from memory. candle's general GEMM reaches a fraction of that for one row (and far
//! less in bf16), so `ParallelLinear` sends products with at most [`MAX_ROWS`] rows here: rows of `W` are split
//! over the rayon pool, each dot product runs with 16 independent accumulators (AVX2 + FMA when the CPU has
//! them, chosen at run time), bf16 weights are widened to f32 on the fly, and accumulation is in f32.
//! Checked against a plain reference implementation in the tests below and by the golden tests.

use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;

/// Largest number of activation rows handled here (decode steps of a few sequences).
pub const MAX_ROWS: usize = 16;
/// Output rows per rayon task: enough work per task to hide scheduling, small enough to balance two cores.
const BLOCK: usize = 64;

/// `x (…, in) · W^T (+ b)` for `W` `[out, in]` when it qualifies (CPU, contiguous f32/bf16, few rows);
/// `None` to let the caller use the general path.
pub fn try_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != w.dtype() || !w.is_contiguous() {
        return Ok(None);
    }
    let (out_dim, in_dim) = w.dims2()?;
    let rows = x.elem_count() / in_dim.max(1);
    if rows == 0 || rows > MAX_ROWS || x.dim(candle_core::D::Minus1)? != in_dim {
        return Ok(None);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let bias: Option<Vec<f32>> = b.map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?;
    let mut y = vec![0f32; rows * out_dim];
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let start = layout.start_offset();
    match w.dtype() {
        DType::F32 => {
            let ws = &cpu.as_slice::<f32>()?[start..start + out_dim * in_dim];
            gemv(ws, &xs, rows, in_dim, out_dim, &mut y, dot::<f32>);
        }
        DType::BF16 => {
            let ws = &cpu.as_slice::<bf16>()?[start..start + out_dim * in_dim];
            gemv(ws, &xs, rows, in_dim, out_dim, &mut y, dot::<bf16>);
        }
        _ => return Ok(None),
    }
    drop(storage);
    if let Some(b) = bias {
        for r in y.chunks_mut(out_dim) {
            r.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
        }
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has a last dim") = out_dim;
    Ok(Some(
        Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(x.dtype())?,
    ))
}

/// `y[r][o] = dot(W[o], x[r])`, output rows in parallel blocks.
fn gemv<T: Sync>(
    w: &[T],
    x: &[f32],
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
    dot: fn(&[T], &[f32]) -> f32,
) {
    // Work on y transposed per block: each task owns BLOCK output rows for every activation row.
    let mut yt = vec![0f32; out_dim * rows];
    yt.par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(blk, out)| {
            for (j, o) in out.chunks_mut(rows).enumerate() {
                let row = &w[(blk * BLOCK + j) * in_dim..][..in_dim];
                for (r, v) in o.iter_mut().enumerate() {
                    *v = dot(row, &x[r * in_dim..(r + 1) * in_dim]);
                }
            }
        });
    for (o, vals) in yt.chunks(rows).enumerate() {
        for (r, &v) in vals.iter().enumerate() {
            y[r * out_dim + o] = v;
        }
    }
}

/// A weight element the kernel can stream: widened to f32 for the multiply-add.
trait Weight: Copy + Sync {
    fn widen(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for bf16 {
    /// bf16 is the top half of an f32: widening is a 16-bit shift.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

fn dot<T: Weight>(w: &[T], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: AVX-512 F and BW are present (checked just above).
        return unsafe { dot_avx512(w, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked just above).
        return unsafe { dot_avx2(w, x) };
    }
    dot_impl(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<T: Weight>(w: &[T], x: &[f32]) -> f32 {
    dot_impl(w, x)
}

/// The same loop in 512-bit registers: one widening load and one FMA per 16 weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn dot_avx512<T: Weight>(w: &[T], x: &[f32]) -> f32 {
    dot_impl(w, x)
}

/// 16 independent accumulators so the loop is bound by memory, not by one chain of adds.
#[inline(always)]
fn dot_impl<T: Weight>(w: &[T], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
    let tail: f32 = wc
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(a, b)| a.widen() * b)
        .sum();
    for (a, b) in wc.zip(xc) {
        for i in 0..16 {
            acc[i] = a[i].widen().mul_add(b[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32], rows: usize, in_dim: usize, out_dim: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out_dim];
        for r in 0..rows {
            for o in 0..out_dim {
                y[r * out_dim + o] = (0..in_dim)
                    .map(|i| f64::from(w[o * in_dim + i]) * f64::from(x[r * in_dim + i]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_plain_reference_for_odd_sizes() {
        for (rows, in_dim, out_dim) in [(1, 37, 130), (3, 256, 65), (4, 17, 1)] {
            let w: Vec<f32> = (0..in_dim * out_dim)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 700.0)
                .collect();
            let x: Vec<f32> = (0..rows * in_dim)
                .map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 500.0)
                .collect();
            let b: Vec<f32> = (0..out_dim).map(|i| i as f32 * 0.01).collect();
            let wt = Tensor::from_vec(w.clone(), (out_dim, in_dim), &Device::Cpu).unwrap();
            let xt = Tensor::from_vec(x.clone(), (1, rows, in_dim), &Device::Cpu).unwrap();
            let bt = Tensor::from_vec(b.clone(), out_dim, &Device::Cpu).unwrap();
            let y: Vec<f32> = try_forward(&xt, &wt, Some(&bt))
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut want = reference(&w, &x, rows, in_dim, out_dim);
            for r in want.chunks_mut(out_dim) {
                r.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
            }
            for (a, e) in y.iter().zip(&want) {
                assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{rows}x{in_dim}x{out_dim}: {a} vs {e}"
                );
            }
            // bf16 weights: exact widening, so the result equals the f32 product of the rounded weights.
            let w16: Vec<f32> = w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let x16: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let y16: Vec<f32> = try_forward(
                &xt.to_dtype(DType::BF16).unwrap(),
                &wt.to_dtype(DType::BF16).unwrap(),
                None,
            )
            .unwrap()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
            for (a, e) in y16.iter().zip(reference(&w16, &x16, rows, in_dim, out_dim)) {
                assert!(
                    (a - e).abs() <= 1e-2 * (1.0 + e.abs()),
                    "bf16 {rows}x{in_dim}x{out_dim}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let w = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
        let many = Tensor::zeros((1, 5, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(try_forward(&many, &w, None).unwrap().is_none());
        let f16 = Tensor::zeros((1, 4), DType::F16, &Device::Cpu).unwrap();
        assert!(try_forward(&f16, &w.to_dtype(DType::F16).unwrap(), None)
            .unwrap()
            .is_none());
        assert!(try_forward(&f16, &w, None).unwrap().is_none());
    }
}
