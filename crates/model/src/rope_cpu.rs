//! Half-split RoPE on the CPU for f32 and bf16, with the bits of candle's fused kernel (and so of the
//! reference's separate operations): per pair `x1 * cos - x2 * sin` and `x1 * sin + x2 * cos`, each product
//! and each sum rounded to the dtype.
//!
//! candle's CPU kernel runs those bf16 operations through `half`, one element at a time with branchy
//! conversions, on one thread when the batch is one: ~140 us per call for a 16-row decode step's queries, 7 %
//! of the step (`step_probe bf16 16`). Here the pairs of a vector are converted and rounded branch-free (the
//! loop vectorises) and large inputs are split over the pool.

use candle_core::{DType, Device, Tensor, WithDType};
use half::bf16;
use rayon::prelude::*;

use crate::elementwise::{to_bf16, widen_bf16};
use crate::error::Result;
use crate::linear::with_slice;

/// Vectors (of `head_dim` values) per parallel task; fewer in all run on the calling thread.
const CHUNK: usize = 256;

/// Where the cos / sin row of vector `v` (the `v`-th `head_dim` slice of `x`) is.
#[derive(Clone, Copy)]
pub(crate) enum Rows {
    /// `x` is `(t, heads, head_dim)`: vector `v` is at position row `v / heads`.
    Thd { heads: usize },
    /// `x` is `(b, heads, t, head_dim)`: vector `v` is at position row `v % t`.
    Bhtd { t: usize },
}

impl Rows {
    fn of(self, v: usize) -> usize {
        match self {
            Rows::Thd { heads } => v / heads,
            Rows::Bhtd { t } => v % t,
        }
    }
}

/// RoPE of `x` with `cos` and `sin` `(positions, head_dim / 2)`, or `None` where this kernel does not apply
/// (another device or dtype: the caller uses candle's).
pub(crate) fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, rows: Rows) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let half = d / 2;
    let shape = x.dims();
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let positions = cos.elem_count() / half.max(1);
    let vectors = x.elem_count() / d.max(1);
    if d == 0 || d % 2 != 0 || (0..vectors).any(|v| rows.of(v) >= positions) {
        return Err(crate::ModelError::Input(format!(
            "rope of {shape:?} with {positions} positions of {half} frequencies"
        )));
    }
    if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() || sin.elem_count() != cos.elem_count()
    {
        return Err(crate::ModelError::Input(format!(
            "rope of {:?} {shape:?} with tables {:?} {:?} and {:?} {:?}",
            x.dtype(),
            cos.dtype(),
            cos.dims(),
            sin.dtype(),
            sin.dims()
        )));
    }
    Ok(Some(match x.dtype() {
        DType::BF16 => rope(&x, (&cos, &sin), rows, pair_bf16)?,
        _ => rope(&x, (&cos, &sin), rows, pair_f32)?,
    }))
}

/// [`rotate`] of a contiguous CPU tensor whose dtype is `T`'s, as a tensor of `x`'s shape. The tables are
/// small (positions x half) and copied; `x` is read in place.
fn rope<T: WithDType + Default>(
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    rows: Rows,
    pair: impl Fn(T, T, T, T) -> (T, T) + Sync,
) -> Result<Tensor> {
    let (c, s) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
    let d = x.dim(candle_core::D::Minus1)?;
    let y = with_slice(x, |x| Ok(rotate(x, (&c, &s), d, rows, pair)))?;
    Ok(Tensor::from_vec(y, x.dims(), &Device::Cpu)?)
}

#[inline(always)]
fn pair_f32(a: f32, b: f32, c: f32, s: f32) -> (f32, f32) {
    (a * c - b * s, a * s + b * c)
}

/// As `half`'s bf16 operators compute it: widen, operate in f32, round, for each product and each sum.
#[inline(always)]
fn pair_bf16(a: bf16, b: bf16, c: bf16, s: bf16) -> (bf16, bf16) {
    let w = widen_bf16;
    let (a, b, c, s) = (w(a), w(b), w(c), w(s));
    let r = |v: f32| w(to_bf16(v));
    (to_bf16(r(a * c) - r(b * s)), to_bf16(r(a * s) + r(b * c)))
}

fn rotate<T: Copy + Default + Send + Sync>(
    x: &[T],
    (cos, sin): (&[T], &[T]),
    d: usize,
    rows: Rows,
    // One pair's two outputs from `(x1, x2, cos, sin)`, in the dtype's arithmetic (generic, so that it is
    // inlined and the loop vectorises).
    pair: impl Fn(T, T, T, T) -> (T, T) + Sync,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::default(); x.len()];
    let chunk = |(i, (src, dst)): (usize, (&[T], &mut [T]))| {
        for (j, (src, dst)) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)).enumerate() {
            let r = rows.of(i * CHUNK + j);
            let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
            let (x1, x2) = src.split_at(half);
            let (o1, o2) = dst.split_at_mut(half);
            for i in 0..half {
                (o1[i], o2[i]) = pair(x1[i], x2[i], c[i], s[i]);
            }
        }
    };
    let n = CHUNK * d;
    if x.len() > n {
        x.par_chunks(n)
            .zip(out.par_chunks_mut(n))
            .enumerate()
            .for_each(chunk);
    } else {
        x.chunks(n)
            .zip(out.chunks_mut(n))
            .enumerate()
            .for_each(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        match t.dtype() {
            DType::BF16 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u32)
                .collect(),
            _ => t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        }
    }

    /// Both layouts, both dtypes, sizes above and below the parallel threshold: the bits of candle's kernels.
    #[test]
    fn gives_the_bits_of_candles_kernels() {
        for dtype in [DType::BF16, DType::F32] {
            for (t, heads, d) in [(1, 14, 64), (3, 2, 6), (40, 16, 64), (5, 7, 128)] {
                let (cos, sin) = (random(&[t, d / 2], dtype, 1), random(&[t, d / 2], dtype, 2));
                let x = random(&[t, heads, d], dtype, 3);
                let ours = apply(&x, &cos, &sin, Rows::Thd { heads }).unwrap().unwrap();
                let theirs = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0).unwrap(), &cos, &sin)
                    .unwrap()
                    .squeeze(0)
                    .unwrap();
                assert_eq!(bits(&ours), bits(&theirs), "thd {dtype:?} {t}x{heads}x{d}");
                let x = random(&[2, heads, t, d], dtype, 4);
                let ours = apply(&x, &cos, &sin, Rows::Bhtd { t }).unwrap().unwrap();
                let theirs = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
                assert_eq!(bits(&ours), bits(&theirs), "bhtd {dtype:?} {t}x{heads}x{d}");
            }
        }
    }

    #[test]
    fn too_few_positions_is_an_error_and_other_dtypes_are_left_to_candle() {
        let (cos, sin) = (
            random(&[2, 4], DType::F32, 1),
            random(&[2, 4], DType::F32, 2),
        );
        let x = random(&[3, 1, 8], DType::F32, 3);
        assert!(apply(&x, &cos, &sin, Rows::Thd { heads: 1 }).is_err());
        let x = random(&[2, 1, 7], DType::F32, 3);
        assert!(apply(&x, &cos, &sin, Rows::Thd { heads: 1 }).is_err());
        let x = random(&[2, 1, 8], DType::F16, 3);
        assert!(apply(&x, &cos, &sin, Rows::Thd { heads: 1 })
            .unwrap()
            .is_none());
    }
}
