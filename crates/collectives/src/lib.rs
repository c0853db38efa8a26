//! Collective operations between the ranks of one tensor-parallel group.
//!
//! [`Collective`] is what the model needs from a group: its rank and size, a sum all-reduce (after each
//! row-parallel layer), an all-gather (vocabulary-parallel logits) and a broadcast (rank 0 telling the other
//! ranks what to run each step, and bootstrapping NCCL's unique id). Implementations:
//!
//! * [`Single`]: a group of one; every operation is the identity.
//! * [`tcp::TcpGroup`]: processes on CPUs connected by TCP in a star around rank 0. Rank 0 adds the
//!   contributions in rank order, so every rank gets the same bits and a run is reproducible.
//! * `nccl::NcclGroup` (feature `nccl`, or `cuda` for the GPU build): GPUs, through cudarc's NCCL bindings, bootstrapped over a TCP
//!   group.
//!
//! Errors are typed: a peer that went away or stalled past the operation timeout fails the operation (and,
//! in the decoder, the whole group) instead of hanging.

use std::time::Duration;

use candle_core::{DType, Tensor};

#[cfg(all(feature = "nccl", feature = "cuda"))]
compile_error!(
    "features `nccl` (cudarc loaded at run time, for CPU-only CI) and `cuda` (cudarc linked as candle links it) \
     cannot be combined: pick one"
);

#[cfg(any(feature = "nccl", feature = "cuda"))]
pub mod nccl;
pub mod tcp;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank} of the group is gone: {reason}")]
    PeerGone { rank: usize, reason: String },
    #[error("rank {rank} did not answer {op} within {after:?}")]
    Timeout {
        rank: usize,
        op: &'static str,
        after: Duration,
    },
    #[error("group protocol violation: {0}")]
    Protocol(String),
    #[error("cannot form the group: {0}")]
    Setup(String),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl CollectiveError {
    /// True when the group can no longer work (a rank died or stalled); the caller should stop using it.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CollectiveError::Tensor(_))
    }
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// A length sent through an f32 collective as two 24-bit halves: one f32 holds integers exactly only up to
/// 2^24, and a step's gathered logits can exceed that (76k vocabulary rows x 256 sampled rows at TP 2).
#[cfg_attr(not(any(feature = "nccl", feature = "cuda")), allow(dead_code))]
pub(crate) fn len_as_f32s(n: usize) -> [f32; 2] {
    [(n >> 24) as f32, (n & 0xFF_FFFF) as f32]
}

/// The length [`len_as_f32s`] encoded.
#[cfg_attr(not(any(feature = "nccl", feature = "cuda")), allow(dead_code))]
pub(crate) fn len_from_f32s(v: &[f32]) -> Result<usize> {
    match v {
        [hi, lo] if *hi >= 0.0 && (0.0..16_777_216.0).contains(lo) => {
            Ok(((*hi as usize) << 24) | *lo as usize)
        }
        _ => Err(CollectiveError::Protocol(format!(
            "malformed length {v:?} in a gather"
        ))),
    }
}

/// The operations of a tensor-parallel group. Every rank must call the same operations in the same order
/// with compatible sizes; a mismatch is reported as [`CollectiveError::Protocol`] where it can be detected.
pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Element-wise sum of `buf` over all ranks, written back into `buf` on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;

    /// Every rank's `buf`, in rank order, on every rank (sizes may differ between ranks).
    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>>;

    /// `root`'s `bytes` on every rank (what other ranks pass is ignored).
    fn broadcast(&self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>>;

    /// Sum of a tensor over all ranks, in its dtype; the sum itself is done in f32. Device implementations
    /// (NCCL) override this to stay on the device.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if self.world_size() == 1 {
            return Ok(t.clone());
        }
        let mut v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        self.all_reduce_sum(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }

    /// Concatenation along the last dimension of every rank's `[rows, cols_r]` tensor (f32).
    fn all_gather_cols(&self, t: &Tensor) -> Result<Tensor> {
        if self.world_size() == 1 {
            return Ok(t.clone());
        }
        let (rows, _) = t.dims2()?;
        let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let parts = self.all_gather(&v)?;
        let mut tensors = Vec::with_capacity(parts.len());
        for (r, p) in parts.into_iter().enumerate() {
            if rows == 0 || p.len() % rows != 0 {
                return Err(CollectiveError::Protocol(format!(
                    "rank {r} sent {} values, not a multiple of {rows} rows",
                    p.len()
                )));
            }
            let cols = p.len() / rows;
            tensors.push(Tensor::from_vec(p, (rows, cols), t.device())?);
        }
        Ok(Tensor::cat(&tensors, 1)?)
    }
}

/// A group of one rank.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(vec![buf.to_vec()])
    }
    fn broadcast(&self, _root: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_past_what_one_f32_holds_round_trip() {
        for n in [
            0,
            1,
            16_777_215,
            16_777_216,
            16_777_217,
            19_414_016,
            (1 << 40) + 12_345,
        ] {
            assert_eq!(len_from_f32s(&len_as_f32s(n)).unwrap(), n);
            // One f32 would not have held it.
            if n == 16_777_217 {
                assert_ne!(n as f32 as usize, n);
            }
        }
        assert!(len_from_f32s(&[1.0]).is_err());
        assert!(len_from_f32s(&[0.0, -1.0]).is_err());
    }
}
