//! The one linear-layer abstraction every projection goes through, whole or split for tensor parallelism.
//!
//! * whole: `y = x W^T + b` on one device;
//! * column-parallel: this rank holds rows `r` of `W` (output features) and of `b`; its output is the
//!   slice `r` of `y`, and the next layer consumes the slice (no communication);
//! * row-parallel: this rank holds columns `r` of `W` (input features) and takes the slice `r` of `x`; the
//!   partial products are summed over the group (in f32, before rounding to the activation dtype, so a
//!   bf16 model rounds once as it does whole), then the bias is added once.
//!
//! On the CPU, f32 and bf16 weights are packed once at load for [`crate::cpu_gemm`], or bf16 ones for
//! [`crate::cpu_amx`] or [`crate::cpu_dpbf16`] where the CPU has AMX or AVX512-BF16 (the original tensor is
//! dropped, so the packed copy is the only one); other devices and dtypes use candle's matmul.

use std::ops::Range;
use std::sync::Arc;

use afnext_collectives::Collective;
use candle_core::{DType, Device, Module, Storage, Tensor, WithDType};
use half::bf16;

use crate::cpu_amx::AmxWeight;
use crate::cpu_dpbf16::DpWeight;
use crate::cpu_gemm::PackedWeight;
use crate::error::Result;
use crate::weights::{Part, Weights};

/// The product kernel of one (part of a) layer.
#[derive(Debug, Clone)]
enum Kernel {
    /// Through candle (GPUs, f16, anything not packed): the product (cuBLAS on a GPU), then the bias with
    /// [`crate::elementwise::add_bias`] (candle's broadcast add is several times slower on a GPU).
    Dense {
        linear: candle_nn::Linear,
        bias: Option<Tensor>,
    },
    /// Packed for the CPU GEMM; `bias` in f32.
    Packed {
        w: Arc<PackedWeight>,
        bias: Option<Arc<Vec<f32>>>,
    },
    /// A bf16 layer on a CPU with bf16 products (activations are rounded to bf16, which is exact in a bf16
    /// model).
    Bf16 {
        w: Arc<Bf16Weight>,
        bias: Option<Arc<Vec<f32>>>,
    },
}

/// A bf16 weight packed for the CPU's bf16 product instructions.
#[derive(Debug)]
enum Bf16Weight {
    /// AMX tiles ([`crate::cpu_amx`]).
    Amx(AmxWeight),
    /// AVX512-BF16's `vdpbf16ps` on a CPU without AMX ([`crate::cpu_dpbf16`]).
    Dp(DpWeight),
}

impl Bf16Weight {
    /// `weight` `[n, k]` (bf16, on the CPU) for the CPU's kernel, if it has one.
    fn pack(weight: &Tensor) -> Result<Option<Self>> {
        let amx = crate::cpu_amx::available();
        if !weight.device().is_cpu()
            || weight.dtype() != DType::BF16
            || !(amx || crate::cpu_dpbf16::available())
        {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let v: Vec<bf16> = weight.flatten_all()?.to_vec1()?;
        Ok(Some(if amx {
            Bf16Weight::Amx(AmxWeight::pack(&v, n, k))
        } else {
            Bf16Weight::Dp(DpWeight::pack(&v, n, k))
        }))
    }

    fn dims(&self) -> (usize, usize) {
        match self {
            Bf16Weight::Amx(w) => (w.in_dim(), w.out_dim()),
            Bf16Weight::Dp(w) => (w.in_dim(), w.out_dim()),
        }
    }

    fn matmul(&self, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        match self {
            Bf16Weight::Amx(w) => w.matmul(x, m, bias),
            Bf16Weight::Dp(w) => w.matmul(x, m, bias),
        }
    }
}

/// One layer of [`ParallelLinear::load_column_stacked`]: `{prefix}.weight` `[out_dim, in]` (and
/// `{prefix}.bias` when `bias`), of which this rank takes output features `rows`.
#[derive(Debug, Clone)]
pub struct StackedPart<'a> {
    pub prefix: &'a str,
    pub out_dim: usize,
    pub bias: bool,
    pub rows: Range<usize>,
}

/// A row-parallel layer's group and the bias it adds after the sum (f32).
type Reduce = (Arc<dyn Collective>, Option<Arc<Vec<f32>>>);

/// A linear layer, whole or one rank's part of it (see the module documentation).
#[derive(Debug, Clone)]
pub struct ParallelLinear {
    kernel: Kernel,
    /// Row-parallel: the group to sum over, and the bias added after the sum (f32).
    reduce: Option<Reduce>,
}

impl ParallelLinear {
    /// Loads the whole `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Self::from_weight(weight, bias)
    }

    /// Whole layers over the same input, stacked into one: `[.., out_dim * parts.len()]`, the parts' outputs
    /// side by side in order (the encoder's q, k and v: one product and one packing of the input instead of
    /// three). Each part is `(prefix, bias)`; a part without a bias gets zeros (adding 0 changes no value).
    pub fn load_stacked(
        w: &Weights,
        parts: &[(&str, bool)],
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        let parts: Vec<StackedPart<'_>> = parts
            .iter()
            .map(|&(prefix, bias)| StackedPart {
                prefix,
                out_dim,
                bias,
                rows: 0..out_dim,
            })
            .collect();
        Self::load_column_stacked(w, &parts, in_dim)
    }

    /// Column-parallel layers over the same input, stacked into one: each part's output features `rows`
    /// side by side in order, `[.., sum of the rows' lengths]` (the decoder's q, k and v, and its gate and
    /// up). One product instead of several: a decode step pays each product's hand-off to the thread pool
    /// and its uneven end once, and a prefill packs the input once. Every output element is the same sum in
    /// the same order as in the part's own product (see [`crate::cpu_gemm`]), so stacking changes no value.
    /// Parts without a bias get zeros when another part has one (adding 0 changes no value).
    pub fn load_column_stacked(
        w: &Weights,
        parts: &[StackedPart<'_>],
        in_dim: usize,
    ) -> Result<Self> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for p in parts {
            let part = Part::Rows(p.rows.clone());
            let weight =
                w.get_part(&format!("{}.weight", p.prefix), &[p.out_dim, in_dim], &part)?;
            biases.push(if p.bias {
                w.get_part(&format!("{}.bias", p.prefix), &[p.out_dim], &part)?
            } else {
                Tensor::zeros(p.rows.len(), weight.dtype(), weight.device())?
            });
            weights.push(weight);
        }
        let bias = parts
            .iter()
            .any(|p| p.bias)
            .then(|| Tensor::cat(&biases, 0))
            .transpose()?;
        Self::from_weight(Tensor::cat(&weights, 0)?, bias)
    }

    /// Column-parallel: output features `rows` of the layer (and their bias). Whole when `rows` is all.
    pub fn load_column(
        w: &Weights,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        rows: Range<usize>,
    ) -> Result<Self> {
        let part = Part::Rows(rows);
        let weight = w.get_part(&format!("{prefix}.weight"), &[out_dim, in_dim], &part)?;
        let bias = if bias {
            Some(w.get_part(&format!("{prefix}.bias"), &[out_dim], &part)?)
        } else {
            None
        };
        Self::from_weight(weight, bias)
    }

    /// Row-parallel: input features `cols` of the layer; outputs are summed over `group`. Whole (no
    /// communication) in a group of one.
    pub fn load_row(
        w: &Weights,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        cols: Range<usize>,
        group: &Arc<dyn Collective>,
    ) -> Result<Self> {
        if group.world_size() == 1 {
            return Self::load(w, prefix, in_dim, out_dim, bias);
        }
        let weight = w.get_part(
            &format!("{prefix}.weight"),
            &[out_dim, in_dim],
            &Part::Cols(cols),
        )?;
        let bias = if bias {
            let b = w.get_dtype(&format!("{prefix}.bias"), &[out_dim], DType::F32)?;
            Some(Arc::new(b.to_vec1::<f32>()?))
        } else {
            None
        };
        let mut l = Self::from_weight(weight, None)?;
        l.reduce = Some((group.clone(), bias));
        Ok(l)
    }

    /// A whole layer from tensors already in memory (tied embeddings, tests).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let f32_bias = |b: Option<Tensor>| -> Result<Option<Arc<Vec<f32>>>> {
            Ok(b.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()?
                .map(Arc::new))
        };
        let kernel = if let Some(w) = Bf16Weight::pack(&weight)? {
            Kernel::Bf16 {
                w: Arc::new(w),
                bias: f32_bias(bias)?,
            }
        } else if let Some(packed) = pack(&weight)? {
            Kernel::Packed {
                w: Arc::new(packed),
                bias: f32_bias(bias)?,
            }
        } else {
            Kernel::Dense {
                linear: candle_nn::Linear::new(weight, None),
                bias,
            }
        };
        Ok(ParallelLinear {
            kernel,
            reduce: None,
        })
    }

    /// `gelu_erf(self.forward(x))`, fused with the bias add where the layer is dense and whole.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.kernel, &self.reduce) {
            (
                Kernel::Dense {
                    linear,
                    bias: Some(b),
                },
                None,
            ) => crate::elementwise::add_bias_gelu(&linear.forward(x)?, b),
            // f32 on the CPU: nothing is rounded between the product and the GELU, so each GEMM task applies
            // it to its own columns (in parallel, in cache) instead of a separate single-threaded pass.
            (Kernel::Packed { w, bias }, None) if x.dtype() == DType::F32 => {
                cpu_forward(x, w.in_dim(), w.out_dim(), |m| {
                    with_slice(x, |xs: &[f32]| {
                        Ok(w.matmul_gelu(xs, m, bias.as_deref().map(|b| b.as_slice())))
                    })
                })
            }
            _ => Ok(self.forward(x)?.gelu_erf()?),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Row-parallel: sum the f32 partial products, then add the bias once.
        let finish = |y: &mut Vec<f32>, out_dim: usize| -> Result<()> {
            if let Some((group, bias)) = &self.reduce {
                group.all_reduce_sum(y)?;
                if let Some(b) = bias {
                    for row in y.chunks_exact_mut(out_dim) {
                        row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v += b);
                    }
                }
            }
            Ok(())
        };
        match &self.kernel {
            Kernel::Dense { linear: l, bias } => match &self.reduce {
                None => {
                    let y = l.forward(x)?;
                    match bias {
                        Some(b) => crate::elementwise::add_bias(&y, b),
                        None => Ok(y),
                    }
                }
                // On devices the group's tensor all-reduce stays there (NCCL); the sum is in f32.
                Some((group, bias)) => {
                    let y = group.all_reduce_tensor(&l.forward(x)?.to_dtype(DType::F32)?)?;
                    let y = match bias {
                        Some(b) => y.broadcast_add(&Tensor::from_slice(b, b.len(), y.device())?)?,
                        None => y,
                    };
                    Ok(y.to_dtype(x.dtype())?)
                }
            },
            Kernel::Packed { w, bias } => cpu_forward(x, w.in_dim(), w.out_dim(), |m| {
                let b = bias.as_deref().map(|b| b.as_slice());
                // bf16 activations (a bf16 model without AMX) are widened by the packing itself.
                let mut y = if x.dtype() == DType::BF16 {
                    with_slice(x, |xs: &[bf16]| Ok(w.matmul_bf16(xs, m, b)))?
                } else {
                    with_slice(x, |xs: &[f32]| Ok(w.matmul(xs, m, b)))?
                };
                finish(&mut y, w.out_dim())?;
                Ok(y)
            }),
            Kernel::Bf16 { w, bias } => {
                let (in_dim, out_dim) = w.dims();
                cpu_forward(x, in_dim, out_dim, |m| {
                    let mut y = with_slice(x, |xs: &[bf16]| {
                        Ok(w.matmul(xs, m, bias.as_deref().map(|b| b.as_slice())))
                    })?;
                    finish(&mut y, out_dim)?;
                    Ok(y)
                })
            }
        }
    }
}

/// A packed CPU layer on `x` (`[..., in_dim]`): checks the width, runs `product(rows)` (the `[rows, out_dim]`
/// f32 result) and returns it as `[..., out_dim]` in `x`'s dtype.
fn cpu_forward(
    x: &Tensor,
    in_dim: usize,
    out_dim: usize,
    product: impl FnOnce(usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let k = *shape.last().unwrap_or(&0);
    if k != in_dim {
        return Err(crate::ModelError::Input(format!(
            "linear layer expects {in_dim} input features, got {k}"
        )));
    }
    let y = product(x.elem_count() / k.max(1))?;
    *shape.last_mut().expect("at least one dim") = out_dim;
    if x.dtype() == DType::BF16 {
        // Rounded in parallel straight into the output (candle's cast is one more pass, on one thread).
        use rayon::prelude::*;
        let mut out = vec![bf16::ZERO; y.len()];
        out.par_chunks_mut(1 << 14)
            .zip(y.par_chunks(1 << 14))
            .for_each(|(o, y)| {
                for (o, &v) in o.iter_mut().zip(y) {
                    *o = crate::elementwise::to_bf16(v);
                }
            });
        return Ok(Tensor::from_vec(out, shape, &Device::Cpu)?);
    }
    Ok(Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
}

/// Runs `f` on `x`'s values as one slice of `T`: borrowed from a contiguous CPU tensor of that dtype (no copy
/// of an encoder window's 7.7 MB activations per projection), else converted.
pub(crate) fn with_slice<T: WithDType, R>(
    x: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    if x.dtype() == T::DTYPE && x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            return f(&cpu.as_slice::<T>()?[layout.start_offset()..][..x.elem_count()]);
        }
    }
    let v: Vec<T> = x.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1()?;
    f(&v)
}

/// Packs a CPU f32 or bf16 `[out, in]` weight; `None` for other devices and dtypes.
fn pack(weight: &Tensor) -> Result<Option<PackedWeight>> {
    if !weight.device().is_cpu() {
        return Ok(None);
    }
    let (n, k) = weight.dims2()?;
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let start = layout.start_offset();
    Ok(match weight.dtype() {
        DType::F32 => Some(PackedWeight::from_f32(
            &cpu.as_slice::<f32>()?[start..start + n * k],
            n,
            k,
        )),
        DType::BF16 => Some(PackedWeight::from_bf16(
            &cpu.as_slice::<bf16>()?[start..start + n * k],
            n,
            k,
        )),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stacked layer gives every part's columns the bits of the part's own layer, whatever the number of
    /// rows (decode's stream and prefill's blocked order), with and without biases, over tensor-parallel
    /// row ranges.
    #[test]
    fn stacked_columns_equal_each_parts_own_layer() {
        for dtype in [DType::F32, DType::BF16] {
            let w = Weights::random(7, false, dtype, &Device::Cpu);
            let k = 72;
            let parts = [
                StackedPart {
                    prefix: "a",
                    out_dim: 96,
                    bias: true,
                    rows: 32..96,
                },
                StackedPart {
                    prefix: "b",
                    out_dim: 40,
                    bias: false,
                    rows: 0..40,
                },
                StackedPart {
                    prefix: "c",
                    out_dim: 50,
                    bias: true,
                    rows: 10..27,
                },
            ];
            let stacked = ParallelLinear::load_column_stacked(&w, &parts, k).unwrap();
            let own: Vec<ParallelLinear> = parts
                .iter()
                .map(|p| {
                    ParallelLinear::load_column(
                        &w,
                        p.prefix,
                        (k, p.out_dim),
                        p.bias,
                        p.rows.clone(),
                    )
                    .unwrap()
                })
                .collect();
            for m in [1, 2, 5, 60] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let got = stacked.forward(&x).unwrap();
                let want: Vec<Tensor> = own.iter().map(|l| l.forward(&x).unwrap()).collect();
                let want = Tensor::cat(&want, 1).unwrap();
                assert_eq!(got.dims(), want.dims());
                let (g, w): (Vec<f32>, Vec<f32>) = (
                    got.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                    want.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                );
                assert!(
                    g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?}, {m} rows"
                );
            }
        }
    }
}
