//! The one linear-layer abstraction every projection goes through, so that tensor parallelism can split a
//! layer by column or by row without a second copy of the model code.

use candle_core::{DType, Module, Tensor};

use crate::error::Result;
use crate::weights::Weights;

/// `y = x W^T + b` with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub enum ParallelLinear {
    /// The whole layer on this device (world size 1).
    Dense(candle_nn::Linear),
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
        Ok(ParallelLinear::Dense(candle_nn::Linear::new(weight, bias)))
    }

    /// A dense layer from tensors already in memory (tied embeddings, tests).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        ParallelLinear::Dense(candle_nn::Linear::new(weight, bias))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ParallelLinear::Dense(l) => {
                // Decode-sized products (a few rows) on the CPU are memory-bound: use the streaming kernel.
                if let Some(y) = crate::cpu_gemv::try_forward(x, l.weight(), l.bias())? {
                    return Ok(y);
                }
                if x.device().is_cpu() && x.dtype() == DType::BF16 {
                    // candle's CPU bf16 GEMM is ~10x slower than its f32 one; widening the weight per call
                    // costs a few percent of a prefill chunk's GEMM and accumulates in f32 like torch does.
                    let y = x
                        .to_dtype(DType::F32)?
                        .broadcast_matmul(&l.weight().to_dtype(DType::F32)?.t()?)?;
                    let y = match l.bias() {
                        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                        None => y,
                    };
                    return Ok(y.to_dtype(DType::BF16)?);
                }
                Ok(l.forward(x)?)
            }
        }
    }
}
