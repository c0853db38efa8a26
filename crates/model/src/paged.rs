//! The decoder's paged KV cache and the attention that reads it, for the serving engine.
//!
//! Keys and values of every layer live in one pool of fixed-size blocks: tensors of shape
//! `[num_blocks * block_size, kv_heads * head_dim]`, written in place (`slice_set` per run of consecutive
//! slots for long steps, `scatter_set` for short ones; on any candle device).
//! A sequence owns a block table (block ids in position order); position `p` of the sequence lives in slot
//! `table[p / block_size] * block_size + p % block_size`. Which blocks are free, shared or cached is decided by
//! the engine's block manager; this module only reads and writes slots.
//!
//! On the CPU, attention reads the pool in place through `paged_cpu` and `attn_cpu` (the decoder dispatches
//! there). On other devices, [`attend`] takes a step's new queries in blocks of at most [`ATTN_BLOCK`] rows
//! (fewer when the context is long: a block's scores stay under [`SCORE_BUDGET`] bytes), so the score matrix
//! of a 45 000-token prompt is never materialised. A block attends to exactly the keys it can see,
//! `0..=its last position`: no work on future keys, and no mask: [`softmax_rows`] limits each row to its own
//! causal prefix, in f32 with one rounding (no f32 copy of bf16 scores). Each block's rows are whole, so the softmax is the reference's,
//! not an online rescaling; the GQA query heads of one kv head are the rows of one matmul, and the visible
//! keys are strided views of the gathered context, so keys are never copied per head or per block.

use candle_core::{DType, Device, Tensor};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::softmax::softmax_rows_scaled;

/// Query rows per attention block (default; tests use small values to exercise many blocks).
pub const ATTN_BLOCK: usize = 2048;

/// Bytes a block's scores and probabilities may take (`heads x rows x visible keys`, two values each in
/// the work dtype): 1 GiB bounds a 45 000-token context to blocks of ~100 rows with 28 heads in bf16.
pub const SCORE_BUDGET: usize = 1 << 30;

/// Steps with at least this many new rows write the cache with one copy per run of consecutive slots
/// (candle's scatter kernel walks a column's rows serially: 4 ms per layer for a 8 192-row step on an H100).
const RUN_WRITE_ROWS: usize = 64;

/// Decode steps (one new row per sequence) on a GPU attend for all sequences at once when the batch's padded
/// key count (sequences x longest context) is at most this: one gather and two batched matmuls per layer
/// instead of a handful of small kernels per sequence (kernel launches dominate decode on a GPU). Bounds the
/// gathered keys and values to 2 x this x kv width per layer.
pub const DECODE_BATCH_KEYS: usize = 1 << 19;

/// The block pool of every layer.
#[derive(Debug)]
pub struct PagedKv {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    attn_block: usize,
    decode_batch_keys: usize,
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
            attn_block: ATTN_BLOCK,
            // The CPU has its own fused decode path (paged_cpu); batching by padding only pays on a GPU.
            decode_batch_keys: if dev.is_cpu() { 0 } else { DECODE_BATCH_KEYS },
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

    /// Sets the query rows per attention block (tests use small values to exercise many blocks).
    pub fn with_attn_block(mut self, keys: usize) -> Self {
        self.attn_block = keys.max(1);
        self
    }

    /// Sets the padded-key limit of the batched decode attention (0 turns it off; tests turn it on on the
    /// CPU to compare it with the per-sequence path).
    pub fn with_decode_batch_keys(mut self, keys: usize) -> Self {
        self.decode_batch_keys = keys;
        self
    }

    pub fn attn_block(&self) -> usize {
        self.attn_block
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

    /// Does the copies, in order, on every layer (any candle device). A copy out of the pool's blocks or
    /// past a block's end, or onto its own source, is refused before anything is written.
    pub fn copy_rows(&self, copies: &[BlockCopy]) -> Result<()> {
        for c in copies {
            if c.src as usize >= self.num_blocks
                || c.dst as usize >= self.num_blocks
                || c.src == c.dst
                || c.rows == 0
                || c.rows > self.block_size
            {
                return Err(ModelError::Input(format!(
                    "cannot copy {} rows from block {} to block {} of a pool of {} blocks of {}",
                    c.rows, c.src, c.dst, self.num_blocks, self.block_size
                )));
            }
        }
        for c in copies {
            let (from, to) = (
                c.src as usize * self.block_size,
                c.dst as usize * self.block_size,
            );
            for t in self.k.iter().chain(&self.v) {
                // Through a copy of the rows alone (`slice_set` refuses a source that shares the destination's
                // storage; `Tensor::copy` would clone the whole pool).
                let rows = t.narrow(0, from, c.rows)?.force_contiguous()?;
                t.slice_set(&rows, 0, to)?;
            }
        }
        Ok(())
    }
}

/// The first `rows` positions of block `src` copied into block `dst`, in every layer's keys and values: a
/// new sequence taking the start of a cached block it shares only in part (copy on write; the engine's
/// prefix cache decides, [`PagedKv::copy_rows`] does it before the step's forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u32,
    pub dst: u32,
    pub rows: usize,
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
    /// How the new keys/values are written.
    pub write: Write,
    /// Per sequence: the slots of its whole context (positions `0..start + len`); empty for a batched
    /// decode step and on the CPU.
    pub read: Vec<Tensor>,
    /// Query rows per attention block.
    pub attn_block: usize,
    /// Set for a decode step attended for all sequences at once (see [`DECODE_BATCH_KEYS`]).
    pub decode: Option<DecodeIndex>,
}

/// The padded gather of a batched decode step: sequence `b`'s context is rows `b * ctx .. b * ctx + ctx`
/// of `slots`; positions past its length point at one of its own slots and are masked out.
#[derive(Debug)]
pub struct DecodeIndex {
    ctx: usize,
    slots: Tensor,
    /// `[B, 1, 1, ctx]`: 0 for a key of the sequence, -inf for padding.
    mask: Tensor,
}

impl DecodeIndex {
    fn new(seqs: &[SeqStep], block_size: usize, dev: &Device) -> Result<Self> {
        let ctx = seqs.iter().map(SeqStep::context_len).max().unwrap_or(0);
        let mut slots_v = Vec::with_capacity(seqs.len() * ctx);
        let mut mask_v = Vec::with_capacity(seqs.len() * ctx);
        for s in seqs {
            let own = slots(&s.block_table, block_size, 0, s.context_len())?;
            let pad = own[0];
            slots_v.extend(
                own.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, ctx - own.len())),
            );
            mask_v.extend((0..ctx).map(|j| {
                if j < own.len() {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        Ok(DecodeIndex {
            ctx,
            slots: Tensor::from_vec(slots_v, seqs.len() * ctx, dev)?,
            mask: Tensor::from_vec(mask_v, (seqs.len(), 1, 1, ctx), dev)?,
        })
    }
}

/// The new rows' destination slots.
#[derive(Debug)]
pub(crate) enum Write {
    /// `[T, width]` element index for `scatter_set` (short steps: decode).
    Scatter(Tensor),
    /// `(first row, first slot, rows)` per run of consecutive slots (long steps: prefill).
    Runs(Vec<(usize, usize, usize)>),
}

impl Write {
    /// Writes `rows` `[T, width]` into the pool `dst`.
    pub fn apply(&self, dst: &Tensor, rows: &Tensor) -> Result<()> {
        match self {
            Write::Scatter(index) => dst.scatter_set(index, rows, 0)?,
            Write::Runs(runs) => {
                for &(row, slot, n) in runs {
                    dst.slice_set(&rows.narrow(0, row, n)?, 0, slot)?;
                }
            }
        }
        Ok(())
    }
}

impl StepIndex {
    pub fn new(seqs: &[SeqStep], kv: &PagedKv, width: usize, dev: &Device) -> Result<Self> {
        let block_size = kv.block_size;
        let total: usize = seqs.iter().map(|s| s.len).sum();
        let ctx_max = seqs.iter().map(SeqStep::context_len).max().unwrap_or(0);
        let decode = (!seqs.is_empty()
            && seqs.iter().all(|s| s.len == 1)
            && seqs.len() * ctx_max <= kv.decode_batch_keys)
            .then(|| DecodeIndex::new(seqs, block_size, dev))
            .transpose()?;
        let mut new_slots = Vec::with_capacity(total);
        let mut read = Vec::with_capacity(seqs.len());
        for s in seqs {
            let all = slots(&s.block_table, block_size, 0, s.context_len())?;
            new_slots.extend_from_slice(&all[s.start..]);
            // A batched decode step gathers through its own index, and the CPU's kernels read the block
            // tables; nothing else reads these.
            if decode.is_none() && !dev.is_cpu() {
                read.push(Tensor::from_vec(all, s.context_len(), dev)?);
            }
        }
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (row, &slot) in new_slots.iter().enumerate() {
            match runs.last_mut() {
                Some((r, first, n)) if *r + *n == row && *first + *n == slot as usize => *n += 1,
                _ => runs.push((row, slot as usize, 1)),
            }
        }
        let write = if total >= RUN_WRITE_ROWS && runs.len() * RUN_WRITE_ROWS <= total * 4 {
            Write::Runs(runs)
        } else {
            let index: Vec<u32> = new_slots
                .iter()
                .flat_map(|&slot| std::iter::repeat_n(slot, width))
                .collect();
            Write::Scatter(Tensor::from_vec(index, (total, width), dev)?)
        };
        Ok(StepIndex {
            block_size,
            write,
            read,
            attn_block: kv.attn_block,
            decode,
        })
    }
}

/// The dtype attention computes in for activations `x`: theirs, except bf16 on the CPU, where bf16 matmuls
/// are far slower than f32 ones (f32 accumulation, as torch's bf16 matmul does).
pub(crate) fn work_dtype(x: &Tensor) -> DType {
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        DType::F32
    } else {
        x.dtype()
    }
}

/// Attention of one sequence's new queries `q` `[nh, len, hd]` (positions `start..start+len`) over its
/// cached keys and values (`idx`: the slots of positions `0..start+len`), returning `[len, nh * hd]` in
/// `q`'s dtype. See the module comment for the blocking.
pub(crate) fn attend(
    q: &Tensor,
    start: usize,
    idx: &Tensor,
    kv: (&Tensor, &Tensor),
    c: &TextConfig,
    attn_block: usize,
) -> Result<Tensor> {
    let (nh, len, hd) = q.dims3()?;
    let nkv = c.num_key_value_heads;
    let group = nh / nkv;
    let ctx = start + len;
    let act = q.dtype();
    let work = work_dtype(q);
    // Keys and values of the whole context, once per layer: [nkv, ctx, hd].
    let gather = |t: &Tensor| -> Result<Tensor> {
        Ok(t.index_select(idx, 0)?
            .reshape((ctx, nkv, hd))?
            .transpose(0, 1)?
            .to_dtype(work)?
            .contiguous()?)
    };
    let (k, v) = (gather(kv.0)?, gather(kv.1)?);
    // The softmax scale is applied by the softmax, in f32 (as sdpa does), not by a pass over q.
    let q = q.to_dtype(work)?.reshape((nkv, group, len, hd))?;
    let scale = (hd as f32).powf(-0.5);
    // A block's scores and probabilities, in the work dtype.
    let rows = (SCORE_BUDGET / (2 * work.size_in_bytes() * nh * ctx)).clamp(1, attn_block.max(1));
    let mut outs = Vec::with_capacity(len.div_ceil(rows));
    for r0 in (0..len).step_by(rows) {
        let n = rows.min(len - r0);
        let first = start + r0; // position of the block's first query
        let seen = first + n; // keys 0..seen are visible to some query of the block
        let qb = q
            .narrow(2, r0, n)?
            .contiguous()?
            .reshape((nkv, group * n, hd))?;
        // Strided views of the visible keys (batch stride ctx x hd): the matmuls read them in place.
        let scores = qb.matmul(&k.narrow(1, 0, seen)?.t()?)?;
        // Row (g, i) is query position first + i: it sees keys 0..=first + i (the causal limit is applied
        // by the softmax itself, which computes in f32 and rounds once to the work dtype).
        let p = softmax_rows_scaled(&scores, Some((n, first)), scale)?;
        let o = p.matmul(&v.narrow(1, 0, seen)?)?;
        outs.push(o.reshape((nkv, group, n, hd))?);
    }
    Ok(Tensor::cat(&outs, 2)?
        .reshape((nh, len, hd))?
        .transpose(0, 1)?
        .reshape((len, nh * hd))?
        .to_dtype(act)?)
}

/// Attention of a decode step (one query row per sequence) for every sequence at once. `q` `[B, nh, hd]`;
/// returns `[B, nh * hd]` in `q`'s dtype. GQA without copying keys: the `group` query heads of a kv head are
/// the rows of one matmul against that head's keys. Padded keys get -inf scores, so exp gives exact zeros
/// and the result is the per-sequence softmax's.
pub(crate) fn attend_decode(
    q: &Tensor,
    d: &DecodeIndex,
    kv: (&Tensor, &Tensor),
    c: &TextConfig,
) -> Result<Tensor> {
    let (b, nh, hd) = q.dims3()?;
    let nkv = c.num_key_value_heads;
    let group = nh / nkv;
    let act = q.dtype();
    let work = work_dtype(q);
    let gather = |t: &Tensor| -> Result<Tensor> {
        Ok(t.index_select(&d.slots, 0)?
            .reshape((b, d.ctx, nkv, hd))?
            .transpose(1, 2)?
            .to_dtype(work)?
            .contiguous()?)
    };
    let (k, v) = (gather(kv.0)?, gather(kv.1)?);
    let q = q.reshape((b, nkv, group, hd))?.to_dtype(work)?;
    let s = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
    let s = s.to_dtype(DType::F32)?.broadcast_add(&d.mask)?;
    let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(work)?;
    Ok(p.matmul(&v)?.reshape((b, nh * hd))?.to_dtype(act)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked matmul attention other devices take, run on the CPU, against the CPU kernels that the
    /// CPU takes (`paged_cpu`): the same attention, up to f32 roundings, over a scattered block table, with
    /// GQA, cached positions, and query blocks smaller than the chunk.
    #[test]
    fn blocked_matmul_attention_matches_the_cpu_kernel() {
        let c = TextConfig {
            vocab_size: 1,
            hidden_size: 6 * 24,
            intermediate_size: 1,
            num_hidden_layers: 1,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            head_dim: 24,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            eos_token_id: vec![],
            pad_token_id: None,
        };
        let (nh, nkv, hd, bs) = (6, 2, 24, 4);
        let dev = Device::Cpu;
        let pool = || Tensor::rand(-1f32, 1f32, (40 * bs, nkv * hd), &dev).unwrap();
        let (k, v) = (pool(), pool());
        let table: Vec<u32> = (0..40).rev().step_by(2).collect();
        let (start, len) = (23, 50);
        let seq = SeqStep {
            start,
            len,
            block_table: table.clone(),
        };
        let q = Tensor::rand(-1f32, 1f32, (len, nh, hd), &dev).unwrap();
        let idx = slots(&table, bs, 0, start + len).unwrap();
        let idx = Tensor::from_vec(idx, start + len, &dev).unwrap();
        let qt = q.transpose(0, 1).unwrap().contiguous().unwrap();
        let blocked: Vec<f32> = attend(&qt, start, &idx, (&k, &v), &c, 16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut fused = vec![0f32; len * nh * hd];
        let g = crate::paged_cpu::Heads { nh, nkv, hd };
        let qf = crate::paged_cpu::f32_queries(&q).unwrap();
        crate::paged_cpu::attend_chunk(&qf, &seq, None, (&k, &v), (g, bs), &mut fused).unwrap();
        let worst = crate::attn_cpu::tests::worst_diff(&blocked, &fused);
        assert!(worst < 1e-5, "worst difference {worst}");
    }

    #[test]
    fn copies_take_a_blocks_first_rows_on_every_layer_and_bad_ones_are_refused() {
        let c = TextConfig {
            vocab_size: 1,
            hidden_size: 8,
            intermediate_size: 1,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            eos_token_id: vec![],
            pad_token_id: None,
        };
        let kv = PagedKv::new(&c, 4, 3, DType::F32, &Device::Cpu).unwrap();
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        for (i, t) in kv.k.iter().chain(&kv.v).enumerate() {
            let fill = Tensor::arange(0f32, 48., &Device::Cpu).unwrap() + 100. * i as f64;
            t.slice_set(&fill.unwrap().reshape((12, 4)).unwrap(), 0, 0)
                .unwrap();
        }
        let before: Vec<_> = kv.k.iter().chain(&kv.v).map(rows).collect();
        kv.copy_rows(&[BlockCopy {
            src: 1,
            dst: 3,
            rows: 2,
        }])
        .unwrap();
        for (t, old) in kv.k.iter().chain(&kv.v).zip(&before) {
            let new = rows(t);
            // Slots 3 and 4 (block 1's first two) into slots 9 and 10; everything else as it was.
            let mut want = old.clone();
            want[9] = old[3].clone();
            want[10] = old[4].clone();
            assert_eq!(new, want);
        }
        for bad in [(4, 0, 1), (0, 4, 1), (2, 2, 1), (0, 1, 0), (0, 1, 4)] {
            let e = kv
                .copy_rows(&[BlockCopy {
                    src: bad.0,
                    dst: bad.1,
                    rows: bad.2,
                }])
                .unwrap_err()
                .to_string();
            assert!(e.contains("of a pool of 4 blocks of 3"), "{e}");
        }
    }

    #[test]
    fn slots_follow_the_block_table() {
        assert_eq!(slots(&[5, 2], 4, 2, 7).unwrap(), vec![22, 23, 8, 9, 10]);
        assert!(slots(&[5], 4, 0, 5).is_err());
    }
}
