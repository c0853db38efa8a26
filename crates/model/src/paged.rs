//! The decoder's paged KV cache and the attention that reads it, for the serving engine.
//!
//! Keys and values of every layer live in one pool of fixed-size blocks: tensors of shape
//! `[num_blocks * block_size, kv_heads * head_dim]`, written in place (`scatter_set`, on any candle device).
//! A sequence owns a block table (block ids in position order); position `p` of the sequence lives in slot
//! `table[p / block_size] * block_size + p % block_size`. Which blocks are free, shared or cached is decided by
//! the engine's block manager; this module only reads and writes slots.
//!
//! Attention walks the context in chunks of at most [`KEY_CHUNK`] keys with an online softmax, so the score
//! matrix of a 45 000-token prompt is never materialised: memory is `heads x query_rows x KEY_CHUNK`. When the
//! whole context fits in one chunk (every fixture, most requests) the arithmetic is exactly the single-sequence
//! path's: one matmul, a causal mask, softmax in f32.

use candle_core::{DType, Device, Tensor, D};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};

/// Keys attended per online-softmax step (default).
pub const KEY_CHUNK: usize = 2048;

/// The block pool of every layer.
#[derive(Debug)]
pub struct PagedKv {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    key_chunk: usize,
}

impl PagedKv {
    /// Allocates `num_blocks` blocks of `block_size` positions for every layer of `cfg` (zeros).
    pub fn new(
        cfg: &TextConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::Input(
                "the KV cache needs at least one block of at least one position".into(),
            ));
        }
        let width = cfg.num_key_value_heads * cfg.head_dim;
        let slots = num_blocks * block_size;
        let mk = || Tensor::zeros((slots, width), dtype, dev);
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k.push(mk()?);
            v.push(mk()?);
        }
        Ok(PagedKv {
            k,
            v,
            block_size,
            num_blocks,
            key_chunk: KEY_CHUNK,
        })
    }

    /// Bytes per block over all layers (keys and values), for sizing the pool from a memory budget.
    pub fn bytes_per_block(cfg: &TextConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers
            * block_size
            * cfg.num_key_value_heads
            * cfg.head_dim
            * dtype.size_in_bytes()
    }

    /// Sets the keys per online-softmax step (tests use small values to exercise the multi-chunk path).
    pub fn with_key_chunk(mut self, keys: usize) -> Self {
        self.key_chunk = keys.max(1);
        self
    }

    pub fn key_chunk(&self) -> usize {
        self.key_chunk
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub(crate) fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.k[i], &self.v[i])
    }
}

/// One sequence's share of a batched forward step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    /// Positions already in the cache (the first new token's position).
    pub start: usize,
    /// New positions computed in this step (rows of the step's input).
    pub len: usize,
    /// Block ids covering at least `start + len` positions.
    pub block_table: Vec<u32>,
}

impl SeqStep {
    pub fn context_len(&self) -> usize {
        self.start + self.len
    }
}

/// Slot indices of positions `from..to` of a sequence.
pub(crate) fn slots(table: &[u32], block_size: usize, from: usize, to: usize) -> Result<Vec<u32>> {
    if to.div_ceil(block_size) > table.len() {
        return Err(ModelError::Input(format!(
            "block table of {} blocks cannot hold {to} positions",
            table.len()
        )));
    }
    Ok((from..to)
        .map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32)
        .collect())
}

/// Precomputed per-step indices shared by every layer.
#[derive(Debug)]
pub(crate) struct StepIndex {
    pub block_size: usize,
    /// Write index `[T, width]` for `scatter_set` of the new keys/values.
    pub write: Tensor,
    /// Per sequence: key chunks as (first position, slot indices tensor).
    pub read: Vec<Vec<(usize, Tensor)>>,
}

impl StepIndex {
    pub fn new(seqs: &[SeqStep], kv: &PagedKv, width: usize, dev: &Device) -> Result<Self> {
        let (block_size, key_chunk) = (kv.block_size, kv.key_chunk);
        let total: usize = seqs.iter().map(|s| s.len).sum();
        let mut write = Vec::with_capacity(total * width);
        let mut read = Vec::with_capacity(seqs.len());
        for s in seqs {
            for slot in slots(&s.block_table, block_size, s.start, s.context_len())? {
                write.extend(std::iter::repeat_n(slot, width));
            }
            let mut chunks = Vec::new();
            let ctx = s.context_len();
            for from in (0..ctx).step_by(key_chunk) {
                let to = (from + key_chunk).min(ctx);
                let idx = slots(&s.block_table, block_size, from, to)?;
                chunks.push((from, Tensor::from_vec(idx, to - from, dev)?));
            }
            read.push(chunks);
        }
        Ok(StepIndex {
            block_size,
            write: Tensor::from_vec(write, (total, width), dev)?,
            read,
        })
    }
}

/// Attention of one sequence's new queries `q` `[nh, len, hd]` (positions `start..start+len`) over its
/// cached keys and values, returning `[len, nh * hd]` in `q`'s dtype.
pub(crate) fn attend(
    q: &Tensor,
    start: usize,
    chunks: &[(usize, Tensor)],
    kv: (&Tensor, &Tensor),
    c: &TextConfig,
) -> Result<Tensor> {
    let (nh, len, hd) = q.dims3()?;
    let nkv = c.num_key_value_heads;
    let group = nh / nkv;
    let act = q.dtype();
    // As in the single-sequence path: on the CPU bf16 matmuls are slow, work in f32 there.
    let work = if q.device().is_cpu() && act == DType::BF16 {
        DType::F32
    } else {
        act
    };
    let q = q.to_dtype(work)?;
    let scale = (hd as f64).powf(-0.5);
    let gather = |t: &Tensor, idx: &Tensor| -> Result<Tensor> {
        let n = idx.dim(0)?;
        let x = t
            .index_select(idx, 0)?
            .reshape((n, nkv, hd))?
            .transpose(0, 1)?;
        let x = if group == 1 {
            x
        } else {
            x.unsqueeze(1)?
                .expand((nkv, group, n, hd))?
                .reshape((nh, n, hd))?
        };
        Ok(x.to_dtype(work)?.contiguous()?)
    };
    let scores_of = |from: usize, idx: &Tensor| -> Result<(Tensor, Tensor)> {
        let k = gather(kv.0, idx)?;
        let v = gather(kv.1, idx)?;
        let n = k.dim(1)?;
        let s = (q.matmul(&k.t()?)? * scale)?;
        // Query i (position start + i) sees keys up to start + i.
        let s = if from + n > start + 1 {
            let mask = mask(len, start, from, n, s.device())?.to_dtype(s.dtype())?;
            s.broadcast_add(&mask)?
        } else {
            s
        };
        Ok((s.to_dtype(DType::F32)?, v))
    };
    let out = if chunks.len() == 1 {
        let (from, idx) = &chunks[0];
        let (s, v) = scores_of(*from, idx)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(work)?;
        p.matmul(&v)?
    } else {
        // Online softmax: running max m, running sum l, running output acc, all f32.
        let mut m: Option<Tensor> = None;
        let mut l: Option<Tensor> = None;
        let mut acc: Option<Tensor> = None;
        for (from, idx) in chunks {
            if *from > start + len - 1 {
                break; // every key of this chunk is in the future of every query
            }
            let (s, v) = scores_of(*from, idx)?;
            let cm = s.max_keepdim(D::Minus1)?;
            let m_new = match &m {
                Some(m) => m.maximum(&cm)?,
                None => cm,
            };
            let p = s.broadcast_sub(&m_new)?.exp()?;
            let ps = p.sum_keepdim(D::Minus1)?;
            let pv = p.to_dtype(work)?.matmul(&v)?.to_dtype(DType::F32)?;
            (l, acc) = match (&m, l, acc) {
                (Some(m_old), Some(l_old), Some(a_old)) => {
                    let alpha = (m_old - &m_new)?.exp()?;
                    (
                        Some((l_old.broadcast_mul(&alpha)? + ps)?),
                        Some((a_old.broadcast_mul(&alpha)? + pv)?),
                    )
                }
                _ => (Some(ps), Some(pv)),
            };
            m = Some(m_new);
        }
        let (Some(l), Some(acc)) = (l, acc) else {
            return Err(ModelError::Input("attention over an empty context".into()));
        };
        acc.broadcast_div(&l)?.to_dtype(work)?
    };
    Ok(out
        .transpose(0, 1)?
        .reshape((len, nh * hd))?
        .to_dtype(act)?)
}

/// `(len, n)` additive mask for keys `from..from+n` and queries at `start..start+len`.
fn mask(len: usize, start: usize, from: usize, n: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..n).map(move |j| {
                if from + j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (len, n), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_block_table() {
        assert_eq!(slots(&[5, 2], 4, 2, 7).unwrap(), vec![22, 23, 8, 9, 10]);
        assert!(slots(&[5], 4, 0, 5).is_err());
    }
}
