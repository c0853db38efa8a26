//! The one linear-layer abstraction every projection goes through, so that tensor parallelism can split a
//! layer by column or by row without a second copy of the model code.
//!
//! On the CPU, f32 and bf16 weights are packed once at load for [`crate::cpu_gemm`] (the original tensor is
//! dropped, so the packed copy is the only one); other devices and dtypes use candle's matmul.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Storage, Tensor};
use half::bf16;

use crate::cpu_amx::AmxWeight;
use crate::cpu_gemm::PackedWeight;
use crate::error::Result;
use crate::weights::Weights;

/// `y = x W^T + b` with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub enum ParallelLinear {
    /// The whole layer on this device (world size 1), through candle.
    Dense(candle_nn::Linear),
    /// The whole layer on the CPU, packed for the CPU GEMM; `bias` in f32.
    Packed {
        w: Arc<PackedWeight>,
        bias: Option<Arc<Vec<f32>>>,
    },
    /// A bf16 layer on a CPU with AMX: packed for [`crate::cpu_amx`] (activations are rounded to bf16, which
    /// is exact in a bf16 model).
    Amx {
        w: Arc<AmxWeight>,
        bias: Option<Arc<Vec<f32>>>,
    },
}

impl ParallelLinear {
    /// Loads `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
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

    /// A layer from tensors already in memory (tied embeddings, tests).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let f32_bias = |b: Option<Tensor>| -> Result<Option<Arc<Vec<f32>>>> {
            Ok(b.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()?
                .map(Arc::new))
        };
        if weight.device().is_cpu() && weight.dtype() == DType::BF16 && crate::cpu_amx::available()
        {
            let (n, k) = weight.dims2()?;
            let v: Vec<bf16> = weight.flatten_all()?.to_vec1()?;
            return Ok(ParallelLinear::Amx {
                w: Arc::new(AmxWeight::pack(&v, n, k)),
                bias: f32_bias(bias)?,
            });
        }
        if let Some(packed) = pack(&weight)? {
            let bias = f32_bias(bias)?;
            return Ok(ParallelLinear::Packed {
                w: Arc::new(packed),
                bias,
            });
        }
        Ok(ParallelLinear::Dense(candle_nn::Linear::new(weight, bias)))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ParallelLinear::Dense(l) => Ok(l.forward(x)?),
            ParallelLinear::Packed { w, bias } => cpu_forward(x, w.in_dim(), w.out_dim(), |m| {
                let xs: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                Ok(w.matmul(&xs, m, bias.as_deref().map(|b| b.as_slice())))
            }),
            ParallelLinear::Amx { w, bias } => cpu_forward(x, w.in_dim(), w.out_dim(), |m| {
                let xs: Vec<bf16> = x.flatten_all()?.to_dtype(DType::BF16)?.to_vec1()?;
                Ok(w.matmul(&xs, m, bias.as_deref().map(|b| b.as_slice())))
            }),
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
    Ok(Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
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
