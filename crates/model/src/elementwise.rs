//! Fused element-wise operations for the GPU, each the exact result of the candle operations it replaces
//! (rounding where they round): a linear layer's bias (candle's broadcast add walks every element's strides:
//! the largest single kernel in the first profile after attention) and the MLP's `silu(gate) * up` (one pass
//! instead of two). CPU: plain Rust, in parallel; CUDA (feature `cuda`): `kernels/elementwise.cu`.

use candle_core::cpu_backend::{Map1, Map2};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType, D};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// `x + bias` for `x` `[..., n]` and `bias` `[n]`, both of one dtype.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    bias_op(x, bias, AddBias { gelu: false })
}

/// `gelu_erf(x + bias)`, the sum rounded to the dtype first: a linear layer and its GELU (the encoder's fc1).
pub fn add_bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    bias_op(x, bias, AddBias { gelu: true })
}

/// `gelu_erf(x)`: an f32 CPU tensor in parallel with the vectorised GELU of [`crate::cpu_exp`] (the encoder's
/// convolutions), anything else through candle (one thread on the CPU).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return Ok(x.gelu_erf()?);
    }
    let mut v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    v.par_chunks_mut(1 << 14)
        .for_each(crate::cpu_exp::gelu_erf_in_place);
    Ok(Tensor::from_vec(v, x.shape(), x.device())?)
}

fn bias_op(x: &Tensor, bias: &Tensor, op: AddBias) -> Result<Tensor> {
    check_row_vector(x, bias, "bias")?;
    Ok(x.contiguous()?.apply_op2_no_bwd(&bias.contiguous()?, &op)?)
}

/// `v` must be one value per column of `x` (`[n]` for `x` `[..., n]`) in `x`'s dtype: a bias or a norm's
/// weight (`what` names it in the error).
pub(crate) fn check_row_vector(x: &Tensor, v: &Tensor, what: &str) -> Result<()> {
    let n = x.dims().last().copied().unwrap_or(0);
    if v.dims() != [n] || v.dtype() != x.dtype() {
        return Err(ModelError::Input(format!(
            "{what} {:?} {:?} does not fit rows of {n} {:?}",
            v.dims(),
            v.dtype(),
            x.dtype()
        )));
    }
    Ok(())
}

/// `silu(gate) * up` for tensors of one shape and dtype.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !same_shape(gate, up) {
        return Err(ModelError::Input(format!(
            "silu_mul of {:?} {:?} and {:?} {:?}",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        )));
    }
    Ok(gate
        .contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &Pointwise::SiluMul)?)
}

/// `silu(gate) * up` where `x` `[..., 2 n]` holds `gate` in its first `n` columns and `up` in the last `n`
/// (a stacked gate and up projection, see [`crate::linear::ParallelLinear::load_column_stacked`]): the same
/// values as [`silu_mul`] of the two halves, read in place on the CPU (two copies of a prefill's halves
/// would cost more than the stacking saves).
pub fn silu_mul_halves(x: &Tensor) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(0);
    if width % 2 != 0 {
        return Err(ModelError::Input(format!(
            "silu_mul_halves of {:?}: the last dimension must be even",
            x.dims()
        )));
    }
    let n = width / 2;
    if !x.device().is_cpu() {
        return silu_mul(&x.narrow(D::Minus1, 0, n)?, &x.narrow(D::Minus1, n, n)?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&SiluMulHalves)?)
}

/// See [`silu_mul_halves`] (CPU only).
struct SiluMulHalves;

impl CustomOp1 for SiluMulHalves {
    fn name(&self) -> &'static str {
        "afnext-silu-mul-halves"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let half = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        Ok((self.map(s, l)?, Shape::from(dims)))
    }
}

impl Map1 for SiluMulHalves {
    fn f<T: WithDType>(&self, x: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
        const OP: &str = "silu_mul_halves";
        check_float(T::DTYPE, OP)?;
        let x = contiguous(x, l, OP)?;
        let n = l.dims().last().copied().unwrap_or(0) / 2;
        if n == 0 {
            return Ok(Vec::new());
        }
        // Chunks of a row's columns in parallel (one row, a decode step, still splits).
        const CHUNK: usize = 1 << 12;
        Ok(written(x.len() / 2, |y| {
            y.par_chunks_mut(n)
                .zip(x.par_chunks(2 * n))
                .for_each(|(y, x)| {
                    let (g, u) = x.split_at(n);
                    y.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                        .for_each(|(y, (g, u))| silu_mul_chunk(y, g, u));
                });
        }))
    }
}

/// `a + b` for tensors of one shape and dtype, rounded once to the dtype (candle's and torch's result): the
/// decoder's residual adds. On the CPU a parallel pass of our own; candle's bf16 add cost ~13 ns per element
/// there (6 % of a 16-row decode step). Elsewhere candle's add.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || !same_shape(a, b) {
        return Ok((a + b)?);
    }
    Ok(a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &Pointwise::Add)?)
}

fn same_shape(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && a.dtype() == b.dtype()
}

struct AddBias {
    gelu: bool,
}

/// Element-wise maps of two tensors of one shape and dtype.
#[derive(Clone, Copy)]
enum Pointwise {
    SiluMul,
    Add,
}

/// The elements of a contiguous layout (our kernels' inputs are made contiguous by their callers).
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&v[a..b])
}

/// Our kernels exist for f32, bf16 and f16 (candle's dtype dispatch covers every dtype).
pub(crate) fn check_float(dtype: DType, op: &str) -> candle_core::Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        _ => candle_core::bail!("{op}: unsupported dtype {dtype:?}"),
    }
}

/// `x` rounded to `T` (round to nearest even). The same value as `T::from_f64(x as f64)` (an f32 widens to
/// f64 exactly), without `half`'s f64 conversion, which is a slow software path: our CPU twins convert every
/// element at least twice.
#[inline(always)]
pub(crate) fn round<T: WithDType>(x: f32) -> T {
    // SAFETY: `T::DTYPE` names `T` exactly (one candle `WithDType` impl per type), so each arm reinterprets a
    // value as its own type; the match is on a constant and folds away.
    unsafe {
        match T::DTYPE {
            DType::F32 => std::mem::transmute_copy::<f32, T>(&x),
            DType::BF16 => std::mem::transmute_copy::<half::bf16, T>(&to_bf16(x)),
            DType::F16 => std::mem::transmute_copy::<half::f16, T>(&half::f16::from_f32(x)),
            _ => T::from_f64(x as f64),
        }
    }
}

/// `x` rounded to bf16, to nearest even: `half::bf16::from_f32` without its branches, so loops over it
/// vectorise (a NaN stays a quiet NaN of its sign).
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> half::bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    half::bf16::from_bits(if x.is_nan() { nan } else { rounded })
}

/// `x` widened to f32: exact, and without `half::bf16::to_f32`'s NaN branch, so loops over it vectorise (a
/// signalling NaN stays signalling; the next arithmetic quiets it, as widening would have).
#[inline(always)]
pub(crate) fn widen_bf16(x: half::bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// `x` as f32 (exact for f32, bf16 and f16); see [`round`].
#[inline(always)]
pub(crate) fn f<T: WithDType>(x: T) -> f32 {
    // SAFETY: as in `round`.
    unsafe {
        match T::DTYPE {
            DType::F32 => std::mem::transmute_copy::<T, f32>(&x),
            DType::BF16 => widen_bf16(std::mem::transmute_copy::<T, half::bf16>(&x)),
            DType::F16 => std::mem::transmute_copy::<T, half::f16>(&x).to_f32(),
            _ => x.to_f64() as f32,
        }
    }
}

/// candle's (and torch's) exact GELU in f32: `0.5 x (1 + erf(x / sqrt 2))`, in candle's operation order.
#[inline]
pub(crate) fn gelu_erf_f32(v: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
}

impl AddBias {
    fn cpu<T: WithDType>(gelu: bool, x: &[T], b: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        if !b.is_empty() {
            y.par_chunks_mut(b.len())
                .zip(x.par_chunks(b.len()))
                .for_each(|(yr, xr)| {
                    for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(b) {
                        let v: T = round(f(x) + f(b));
                        *y = if gelu {
                            // candle's gelu_erf: in f32 for f32, in f64 for the 16-bit types.
                            if T::DTYPE == DType::F32 {
                                round(gelu_erf_f32(f(v)))
                            } else {
                                let v = v.to_f64();
                                let erf = candle_core::cpu::erf::erf_f64(
                                    v * std::f64::consts::FRAC_1_SQRT_2,
                                );
                                T::from_f64((erf + 1.0) * 0.5 * v)
                            }
                        } else {
                            v
                        };
                    }
                });
        }
        y
    }
}

impl Pointwise {
    /// The name in error messages.
    fn label(self) -> &'static str {
        match self {
            Pointwise::SiluMul => "silu_mul",
            Pointwise::Add => "add",
        }
    }

    fn cpu<T: WithDType>(self, a: &[T], b: &[T]) -> Vec<T> {
        match self {
            // `exp(-x)` of a chunk at a time through the vectorised exponential (libm's, one call per
            // element, was ~5 % of a bf16 prefill), then the rest of `x / (1 + exp(-x))` element-wise.
            Pointwise::SiluMul => zip_map(a, b, silu_mul_chunk),
            Pointwise::Add => zip_map(a, b, |y, a, b| {
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    y.write(round(f(a) + f(b)));
                }
            }),
        }
    }
}

/// `y = silu(g) * u` element-wise, rounding where candle's `silu` and `mul` round. `exp(-x)` of the chunk at
/// once through the vectorised exponential (libm's, one call per element, was ~5 % of a bf16 prefill), then
/// the rest of `x / (1 + exp(-x))` element-wise.
fn silu_mul_chunk<T: WithDType>(y: &mut [MaybeUninit<T>], g: &[T], u: &[T]) {
    let n = y.len();
    assert!(g.len() == n && u.len() == n, "silu_mul of unequal lengths");
    // f32 and bf16 16 lanes at a time where the CPU has AVX-512: the same bits as the loop below, which
    // does not vectorise (a decode row's 4 864 in bf16: 7.7 -> 4.4 us; the division bounds the vector loop).
    if matches!(T::DTYPE, DType::F32 | DType::BF16) {
        let bf16 = T::DTYPE == DType::BF16;
        // SAFETY: the three slices hold `n` elements of T, which is f32 or bf16 (`T::DTYPE` names T).
        let done = unsafe {
            crate::cpu_exp::silu_mul(
                y.as_mut_ptr() as *mut u8,
                g.as_ptr() as *const u8,
                u.as_ptr() as *const u8,
                n,
                bf16,
            )
        };
        if done {
            return;
        }
    }
    silu_mul_scalar(y, g, u);
}

/// [`silu_mul_chunk`] element by element (with the vectorised `exp` where there is one).
fn silu_mul_scalar<T: WithDType>(y: &mut [MaybeUninit<T>], g: &[T], u: &[T]) {
    let mut e: Vec<f32> = g.iter().map(|&g| -f(g)).collect();
    crate::cpu_exp::exp_in_place(&mut e);
    for (((y, &g), &u), &e) in y.iter_mut().zip(g).zip(u).zip(&e) {
        let s: T = round(f(g) / (1.0 + e));
        y.write(round(f(s) * f(u)));
    }
}

/// A vector of `len` elements, every one written by `fill` (not zeroed first: zeroing a prefill's 19 MB
/// MLP activations was ~1 % of its time, for values overwritten at once). `fill` must write all of them:
/// the element-wise outputs here, and [`crate::cpu_gemm`]'s packed row tiles.
pub(crate) fn written<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut y: Vec<T> = Vec::with_capacity(len);
    let spare = &mut y.spare_capacity_mut()[..len];
    fill(spare);
    // SAFETY: `fill` wrote all `len` elements (each caller's chunks cover the slice and write every one).
    unsafe { y.set_len(len) };
    y
}

/// `op(y, a, b)` over matching chunks of the output and of `a` and `b`, in parallel.
fn zip_map<T: WithDType>(
    a: &[T],
    b: &[T],
    op: impl Fn(&mut [MaybeUninit<T>], &[T], &[T]) + Sync,
) -> Vec<T> {
    const CHUNK: usize = 1 << 12;
    assert_eq!(a.len(), b.len(), "zip_map of unequal lengths");
    written(a.len(), |y| {
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(y, (a, b))| op(y, a, b));
    })
}

impl Map2 for AddBias {
    const OP: &'static str = "add_bias";
    fn f<T: WithDType>(
        &self,
        x: &[T],
        lx: &Layout,
        b: &[T],
        lb: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        check_float(T::DTYPE, Self::OP)?;
        Ok(AddBias::cpu(
            self.gelu,
            contiguous(x, lx, Self::OP)?,
            contiguous(b, lb, Self::OP)?,
        ))
    }
}

impl Map2 for Pointwise {
    const OP: &'static str = "pointwise";
    fn f<T: WithDType>(
        &self,
        a: &[T],
        la: &Layout,
        b: &[T],
        lb: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let op = self.label();
        check_float(T::DTYPE, op)?;
        Ok(self.cpu(contiguous(a, la, op)?, contiguous(b, lb, op)?))
    }
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "afnext-add-bias"
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
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kind = if self.gelu {
            cuda::Kind::AddBiasGelu
        } else {
            cuda::Kind::AddBias
        };
        cuda::binary(s1, l1, s2, l2, kind)
    }
}

impl CustomOp2 for Pointwise {
    fn name(&self) -> &'static str {
        match self {
            Pointwise::SiluMul => "afnext-silu-mul",
            Pointwise::Add => "afnext-add",
        }
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
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self {
            Pointwise::SiluMul => cuda::binary(s1, l1, s2, l2, cuda::Kind::SiluMul),
            // `add` takes candle's add on every device but the CPU.
            Pointwise::Add => candle_core::bail!("afnext-add runs on the CPU only"),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{kernel_name, Map2, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Shape, WithDType};

    use super::check_float;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));

    #[derive(Clone, Copy)]
    pub enum Kind {
        AddBias,
        AddBiasGelu,
        SiluMul,
    }

    impl Map2 for Kind {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            a: &CudaSlice<T>,
            l1: &Layout,
            b: &CudaSlice<T>,
            l2: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            let op = match self {
                Kind::SiluMul => "silu_mul",
                _ => "add_bias",
            };
            check_float(T::DTYPE, op)?;
            let off = |l: &Layout| {
                l.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{op}: input must be contiguous"))
                })
            };
            let ((a0, a1), (b0, b1)) = (off(l1)?, off(l2)?);
            let (a, b) = (a.slice(a0..a1), b.slice(b0..b1));
            let n = a1 - a0;
            // SAFETY: every element is written by the kernel below.
            let y = unsafe { dev.alloc::<T>(n)? };
            if n == 0 {
                return Ok(y);
            }
            let (name, cfg) = match self {
                Kind::AddBias | Kind::AddBiasGelu => {
                    let cols = b1 - b0;
                    let rows = (n / cols) as u32;
                    (
                        if let Kind::AddBias = self {
                            "afnext_add_bias"
                        } else {
                            "afnext_add_bias_gelu"
                        },
                        LaunchConfig {
                            grid_dim: (cols.div_ceil(256) as u32, rows.min(4096), 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        },
                    )
                }
                Kind::SiluMul => (
                    "afnext_silu_mul",
                    LaunchConfig {
                        grid_dim: (n.div_ceil(256).min(1 << 16) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    },
                ),
            };
            let func =
                dev.get_or_load_custom_func(&kernel_name::<T>(name), "afnext_elementwise", PTX)?;
            let mut builder = func.builder();
            builder.arg(&a);
            builder.arg(&b);
            builder.arg(&y);
            let n_arg = match self {
                Kind::SiluMul => n as i64,
                _ => (n / (b1 - b0)) as i64,
            };
            let cols = (b1 - b0) as i32;
            builder.arg(&n_arg);
            if !matches!(self, Kind::SiluMul) {
                builder.arg(&cols);
            }
            // SAFETY: the kernel reads `n` elements of `a` (and of `b`, or `cols` for the bias) and writes
            // `n`.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(y)
        }
    }

    pub fn binary(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        kind: Kind,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if !matches!(kind, Kind::SiluMul) && l2.shape().elem_count() > i32::MAX as usize {
            candle_core::bail!("add_bias: rows too wide for the CUDA kernel");
        }
        let dev = s1.device();
        Ok((
            CudaStorage {
                slice: kind.map(&s1.slice, l1, &s2.slice, l2, dev)?,
                device: dev.clone(),
            },
            l1.shape().clone(),
        ))
    }
}

/// Largest absolute difference of two tensors of one shape, in f32 (the unit tests of our kernels).
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    (f32(a) - f32(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The 16-lane SiLU product gives the scalar loop's bits, in f32 and bf16, on full vectors and tails,
    /// for ordinary values and the edges (zeros, infinities, NaN, subnormals, overflow of `exp(-x)`).
    #[test]
    fn vector_silu_mul_has_the_bits_of_the_scalar_loop() {
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            -1e-40,
            100.0,
            -100.0,
            88.7,
            -88.7,
            3.0e38,
        ];
        for n in [1usize, 15, 16, 17, 100, 4864] {
            let g: Vec<f32> = (0..n)
                .map(|i| {
                    special
                        .get(i % 29)
                        .copied()
                        .unwrap_or(20.0 * (((i * 7919) % 1009) as f32 / 1009.0 - 0.5))
                })
                .collect();
            let u: Vec<f32> = (0..n)
                .map(|i| 3.0 * (((i * 104729) % 997) as f32 / 997.0 - 0.5))
                .collect();
            fn run<T: WithDType>(
                g: &[T],
                u: &[T],
                f: fn(&mut [MaybeUninit<T>], &[T], &[T]),
            ) -> Vec<f64> {
                let y = written(g.len(), |y| f(y, g, u));
                y.iter().map(|v| v.to_f64()).collect()
            }
            let same = |a: &[f64], b: &[f64]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
            };
            let a = run(&g, &u, silu_mul_chunk::<f32>);
            let b = run(&g, &u, silu_mul_scalar::<f32>);
            assert!(same(&a, &b), "f32, {n} elements");
            let gb: Vec<half::bf16> = g.iter().map(|&x| to_bf16(x)).collect();
            let ub: Vec<half::bf16> = u.iter().map(|&x| to_bf16(x)).collect();
            let bits = |g: &[half::bf16], u: &[half::bf16], f: fn(&mut [MaybeUninit<half::bf16>], &[half::bf16], &[half::bf16])| {
                written(g.len(), |y| f(y, g, u)).iter().map(|v| v.to_bits()).collect::<Vec<u16>>()
            };
            assert_eq!(
                bits(&gb, &ub, silu_mul_chunk::<half::bf16>),
                bits(&gb, &ub, silu_mul_scalar::<half::bf16>),
                "bf16, {n} elements"
            );
        }
    }

    fn t(n: usize, seed: usize, shape: &[usize], dtype: DType) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| 4.0 * (((i * 7919 + seed * 104729) % 1009) as f32 / 1009.0 - 0.5))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.to_dtype(DType::F32)
            .unwrap()
            .eq(&b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .min_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 1.0
    }

    #[test]
    fn bf16_rounding_equals_halfs() {
        let mut bits = 0x9e37_79b9u32;
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
        ];
        for i in 0..200_000u32 {
            bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = if (i as usize) < specials.len() {
                specials[i as usize]
            } else {
                f32::from_bits(bits)
            };
            let (got, want) = (to_bf16(x), half::bf16::from_f32(x));
            if x.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn fused_ops_equal_candles_compositions() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = t(2 * 3 * 5, 1, &[2, 3, 5], dtype);
            let b = t(5, 2, &[5], dtype);
            assert!(same(
                &add_bias(&x, &b).unwrap(),
                &x.broadcast_add(&b).unwrap()
            ));
            assert!(same(
                &add_bias_gelu(&x, &b).unwrap(),
                &x.broadcast_add(&b).unwrap().gelu_erf().unwrap()
            ));
            // More elements than one parallel chunk, and a non-contiguous operand.
            let a = t(3 * 4099, 5, &[3, 4099], dtype);
            let c = t(3 * 4099, 6, &[4099, 3], dtype).t().unwrap();
            assert!(same(&add(&a, &c).unwrap(), &(&a + &c).unwrap()));
            // More elements than one chunk of the vectorised exponential.
            let g = t(3 * 4099, 3, &[3, 4099], dtype);
            let u = t(3 * 4099, 4, &[3, 4099], dtype);
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let got = silu_mul(&g, &u).unwrap();
            let d = max_diff(&got, &want);
            // candle's silu rounds in its own order; one ulp of the dtype at |y| < 8.
            let ulp = match dtype {
                DType::F32 => 1e-6,
                DType::BF16 => 8.0 / 128.0,
                _ => 8.0 / 1024.0,
            };
            assert!(d <= ulp, "{dtype:?}: {d}");
        }
        assert!(add_bias(&t(6, 0, &[2, 3], DType::F32), &t(2, 0, &[2], DType::F32)).is_err());
    }
}
