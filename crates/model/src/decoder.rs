//! The Qwen2 decoder (spec 9): RMSNorm, GQA attention with half-split RoPE, SwiGLU MLP, untied lm_head.
//! Reference: transformers 5.23 `models/qwen2/modeling_qwen2.py`.
//!
//! The KV cache here is a plain per-layer concatenation for single-sequence use (CLI, tests); the serving
//! engine keeps its own paged cache.

use std::sync::Arc;

use afnext_collectives::{Collective, Single};
use candle_core::{DType, Device, Tensor, D};

use crate::config::TextConfig;
use crate::error::Result;
use crate::linear::ParallelLinear;
use crate::paged::{PagedKv, SeqStep, StepIndex};
use crate::tp::{StepPlan, TextShard, AUDIO_ROW};
use crate::weights::Weights;

mod layer;
use layer::{DecoderLayer, Keep};

/// `x * rsqrt(mean(x^2) + eps)` in f32, cast back to the activation dtype, then times the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(name, &[dim])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            // One fused kernel (f32 accumulation) instead of eight launches: decode on a GPU is launch-bound.
            // It rounds once after the weight instead of before it (bf16: within a rounding step).
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        crate::rms_norm::rms_norm_cpu(x, &self.weight, self.eps)
    }
}

/// Half-split RoPE with the bit-exact f32 inverse frequencies of spec 9.
#[derive(Debug, Clone)]
pub struct Rope {
    inv: Vec<f32>,
}

impl Rope {
    pub fn new(theta: f64, head_dim: usize) -> Self {
        Rope {
            inv: crate::inv_freq::inv_freq(theta, head_dim),
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv
    }

    /// cos, sin of shape (len, head_dim) for positions `start..start + len`, in `dtype`.
    fn tables(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.tables_at(start..start + len, dtype, dev)
    }

    /// cos, sin of shape (n, head_dim) for the given positions, in `dtype`.
    fn tables_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv.len();
        let len = positions.len();
        let mut c = Vec::with_capacity(len * half);
        let mut s = Vec::with_capacity(len * half);
        for p in positions {
            let pf = p as f32;
            for &f in &self.inv {
                let a = pf * f;
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        let c = Tensor::from_vec(c, (len, half), dev)?.to_dtype(dtype)?;
        let s = Tensor::from_vec(s, (len, half), dev)?.to_dtype(dtype)?;
        Ok((c, s))
    }

    /// `x * cos + rotate_half(x) * sin`, `x`: (b, heads, len, head_dim) with cos/sin (len, head_dim / 2), or
    /// (rows, heads, head_dim) with cos/sin (rows, 1, head_dim / 2) (the two halves of the reference's tables
    /// are equal). candle's fused rope computes `x1*cos - x2*sin` and `x2*cos + x1*sin` in the dtype, rounding
    /// each product and the sum as the reference's separate operations do, so the result is the same bits.
    fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let rows = match x.rank() {
            3 => crate::rope_cpu::Rows::Thd { heads: x.dim(1)? },
            _ => crate::rope_cpu::Rows::Bhtd { t: x.dim(2)? },
        };
        // f32 and bf16 on the CPU: the same bits as candle's kernel below, several times faster there.
        if let Some(y) = crate::rope_cpu::apply(x, cos, sin, rows)? {
            return Ok(y);
        }
        let hd = x.dim(D::Minus1)?;
        let flat = |t: &Tensor| -> Result<Tensor> {
            let n = t.dim(0)?;
            Ok(t.reshape((n, hd / 2))?)
        };
        let (c, s) = (flat(cos)?, flat(sin)?);
        Ok(match x.rank() {
            3 => candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &c, &s)?
                .squeeze(0)?,
            _ => candle_nn::rotary_emb::rope(&x.contiguous()?, &c, &s)?,
        })
    }
}

/// Keys and values of every layer for one sequence (the CLI's and `inspect`'s cache; the server's is
/// [`crate::paged`]).
///
/// A layer's keys and values are stored in tensors of `(1, kv_heads, capacity, head_dim)`, of which
/// positions `0..len` are filled. New positions are written in place, and the capacity grows by half when
/// it runs out (generation reserves room for the prompt and `max_new_tokens` at once: no growth at all), so
/// a decode step copies its one new position per layer. Appending with `Tensor::cat` copied
/// the whole cache of every layer on every step: 0.35 ms of a 37 ms bf16 step at 130 positions
/// (Qwen2.5-0.5B shape), and it grows with the context.
///
/// Not `Clone`: a copy would share the storage that the next step writes into.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions to allocate room for at the first append ([`KvCache::with_capacity`]), so that a
    /// generation of known length never grows (growing copies the cache and leaves up to half of it unused).
    reserve: usize,
}

/// One layer's cache: see [`KvCache`].
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    /// Filled positions.
    len: usize,
}

/// The smallest capacity allocated (positions): a prompt's first chunk, or a few decode steps after it.
const MIN_CAPACITY: usize = 256;

impl LayerKv {
    /// Appends `k`, `v` `(1, kv_heads, l, head_dim)` to `slot` (growing its storage as needed; a first
    /// allocation has room for at least `reserve` positions).
    fn append(slot: &mut Option<LayerKv>, k: &Tensor, v: &Tensor, reserve: usize) -> Result<()> {
        let (b, nkv, l, hd) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let cap = match slot {
            Some(s) => s.k.dim(2)?,
            None => 0,
        };
        if len + l > cap {
            let first = if cap == 0 { reserve } else { 0 };
            let cap = (len + l).max(cap + cap / 2).max(MIN_CAPACITY).max(first);
            let grown = |old: Option<&Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((b, nkv, cap, hd), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| len > 0) {
                    t.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(t)
            };
            let (ok, ov) = (slot.as_ref().map(|s| &s.k), slot.as_ref().map(|s| &s.v));
            *slot = Some(LayerKv {
                k: grown(ok)?,
                v: grown(ov)?,
                len,
            });
        }
        let s = slot.as_mut().expect("allocated above");
        s.k.slice_set(&k.contiguous()?, 2, len)?;
        s.v.slice_set(&v.contiguous()?, 2, len)?;
        s.len = len + l;
        Ok(())
    }
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self::with_capacity(n_layers, 0)
    }
    /// A cache that allocates room for `positions` positions at once (a prompt and its longest answer).
    pub fn with_capacity(n_layers: usize, positions: usize) -> Self {
        KvCache {
            layers: (0..n_layers).map(|_| None).collect(),
            reserve: positions,
        }
    }
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Qwen2 {
    /// This rank's vocabulary rows of the token table (all of it in a group of one).
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: ParallelLinear,
    rope: Rope,
    /// The checkpoint's configuration.
    cfg: TextConfig,
    /// What this rank computes with (its head counts and MLP width).
    local: TextConfig,
    shard: TextShard,
    group: Arc<dyn Collective>,
}

impl Qwen2 {
    /// The whole decoder on one device.
    pub fn load(w: &Weights, c: &TextConfig) -> Result<Self> {
        Self::load_shard(w, c, Arc::new(Single))
    }

    /// This rank's share of the decoder in `group` (see [`crate::tp`]); only that share is read.
    pub fn load_shard(w: &Weights, c: &TextConfig, group: Arc<dyn Collective>) -> Result<Self> {
        let shard = TextShard::new(c, group.rank(), group.world_size())?;
        let p = "language_model.model";
        let vocab = crate::weights::Part::Rows(shard.vocab.clone());
        let embed = w.get_part(
            &format!("{p}.embed_tokens.weight"),
            &[c.vocab_size, c.hidden_size],
            &vocab,
        )?;
        let lm_head = if c.tie_word_embeddings && !w.contains("language_model.lm_head.weight") {
            ParallelLinear::from_weight(embed.clone(), None)?
        } else {
            ParallelLinear::load_column(
                w,
                "language_model.lm_head",
                (c.hidden_size, c.vocab_size),
                false,
                shard.vocab.clone(),
            )?
        };
        Ok(Qwen2 {
            layers: (0..c.num_hidden_layers)
                .map(|i| DecoderLayer::load(w, &format!("{p}.layers.{i}"), c, &shard, &group))
                .collect::<Result<_>>()?,
            norm: RmsNorm::load(
                w,
                &format!("{p}.norm.weight"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            embed,
            lm_head,
            rope: Rope::new(c.rope_theta, c.head_dim),
            local: shard.local_config(c),
            cfg: c.clone(),
            shard,
            group,
        })
    }

    /// This rank's share (the whole model in a group of one).
    pub fn shard(&self) -> &TextShard {
        &self.shard
    }

    /// The configuration this rank's attention and KV cache use (the checkpoint's in a group of one).
    pub fn local_config(&self) -> &TextConfig {
        &self.local
    }

    pub fn group(&self) -> &Arc<dyn Collective> {
        &self.group
    }

    /// The compute dtype and device of this rank's weights.
    pub fn dtype_device(&self) -> (DType, Device) {
        (self.embed.dtype(), self.embed.device().clone())
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Token embeddings (1, l, h) of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self.embed_rows(ids)?.unsqueeze(0)?)
    }

    /// Runs `embeds` (1, l, h) at positions `cache.len()..` and returns the hidden states after the final
    /// norm (1, l, h).
    pub fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_keep(embeds, cache, Keep::All)
    }

    /// [`Qwen2::forward`] returning only the rows `rows` (ascending; `[]` for none) of its result
    /// `(1, rows.len(), h)`, with the bits they have in [`Qwen2::forward`]'s. The cache gets every row; the
    /// last layer computes its attention, output projection and MLP for `rows` only (a prompt needs the
    /// logits of its last position, and none for the chunks before it).
    pub fn forward_rows(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        rows: &[usize],
    ) -> Result<Tensor> {
        let l = embeds.dim(1)?;
        check_rows(rows, l)?;
        self.forward_keep(embeds, cache, Keep::Rows(rows))
    }

    fn forward_keep(&self, embeds: &Tensor, cache: &mut KvCache, keep: Keep<'_>) -> Result<Tensor> {
        crate::pool::on_pool(self.on_cpu_alone(), || {
            self.forward_here(embeds, cache, keep)
        })
    }

    /// A CPU model of a group of one: its forward passes run on rayon's pool ([`crate::pool`]).
    fn on_cpu_alone(&self) -> bool {
        self.shard.world == 1 && self.embed.device().is_cpu()
    }

    fn forward_here(&self, embeds: &Tensor, cache: &mut KvCache, keep: Keep<'_>) -> Result<Tensor> {
        let (_, l, _) = embeds.dims3()?;
        let start = cache.len();
        let (cos, sin) = self
            .rope
            .tables(start, l, embeds.dtype(), embeds.device())?;
        let mut h = embeds.clone();
        let reserve = cache.reserve;
        let last = self.layers.len().saturating_sub(1);
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let keep = if i == last { keep } else { Keep::All };
            h = layer.forward(&h, (&cos, &sin), (slot, reserve), &self.local, keep)?;
        }
        self.norm.forward(&h)
    }

    /// A batched step over the paged cache: `embeds` `[T, hidden]` holds the new rows of every sequence of
    /// `seqs`, in order. Writes their keys and values into `kv` and returns the hidden states after the final
    /// norm, `[T, hidden]`.
    pub fn forward_paged(&self, embeds: &Tensor, seqs: &[SeqStep], kv: &PagedKv) -> Result<Tensor> {
        crate::pool::on_pool(self.on_cpu_alone(), || {
            self.forward_paged_here(embeds, seqs, kv, Keep::All)
        })
    }

    /// [`Qwen2::forward_paged`] returning only the rows `rows` (ascending) of its result `[rows.len(), hidden]`,
    /// with the same bits; every row's keys and values still go into `kv` (see [`Qwen2::forward_rows`]).
    pub fn forward_paged_rows(
        &self,
        embeds: &Tensor,
        seqs: &[SeqStep],
        kv: &PagedKv,
        rows: &[usize],
    ) -> Result<Tensor> {
        check_rows(rows, embeds.dim(0)?)?;
        crate::pool::on_pool(self.on_cpu_alone(), || {
            self.forward_paged_here(embeds, seqs, kv, Keep::Rows(rows))
        })
    }

    fn forward_paged_here(
        &self,
        embeds: &Tensor,
        seqs: &[SeqStep],
        kv: &PagedKv,
        keep: Keep<'_>,
    ) -> Result<Tensor> {
        let t = embeds.dim(0)?;
        let rows: usize = seqs.iter().map(|s| s.len).sum();
        if rows != t {
            return Err(crate::ModelError::Input(format!(
                "step has {t} rows but its sequences cover {rows}"
            )));
        }
        let c = &self.local;
        let positions: Vec<usize> = seqs.iter().flat_map(|s| s.start..s.context_len()).collect();
        let (cos, sin) =
            self.rope
                .tables_at(positions.into_iter(), embeds.dtype(), embeds.device())?;
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let index = StepIndex::new(
            seqs,
            kv,
            c.num_key_value_heads * c.head_dim,
            embeds.device(),
        )?;
        let mut h = embeds.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let keep = if i == last { keep } else { Keep::All };
            h = layer.forward_paged(&h, (&cos, &sin), seqs, &index, kv.layer(i), c, keep)?;
        }
        self.norm.forward(&h)
    }

    /// Token embeddings `[n, hidden]` (no batch dimension). Ids outside the vocabulary are an error.
    pub fn embed_rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(crate::ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        self.embed_rows_masked(ids)
    }

    /// Embeddings of `ids` where ids outside the vocabulary (e.g. [`crate::tp::AUDIO_ROW`]) give zero rows.
    /// In a group each rank looks up its vocabulary rows, zeros elsewhere, and the all-reduce adds the
    /// one non-zero contribution per row: the result is exactly the table's row.
    fn embed_rows_masked(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = self.embed.device();
        let v = &self.shard.vocab;
        if self.shard.world == 1 && ids.iter().all(|&i| v.contains(&(i as usize))) {
            let idx = Tensor::from_slice(ids, ids.len(), dev)?;
            return Ok(self.embed.index_select(&idx, 0)?);
        }
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| {
                if v.contains(&(i as usize)) {
                    (i as usize - v.start) as u32
                } else {
                    0
                }
            })
            .collect();
        let keep: Vec<f32> = ids
            .iter()
            .map(|&i| if v.contains(&(i as usize)) { 1.0 } else { 0.0 })
            .collect();
        let rows = self
            .embed
            .index_select(&Tensor::from_vec(local, ids.len(), dev)?, 0)?;
        let keep = Tensor::from_vec(keep, (ids.len(), 1), dev)?.to_dtype(rows.dtype())?;
        let rows = rows.broadcast_mul(&keep)?;
        Ok(self.group.all_reduce_tensor(&rows)?)
    }

    /// Logits (…, vocab) in f32 of hidden states (…, h); in a group every rank gets all of them.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let local = self.lm_head.forward(hidden)?.to_dtype(DType::F32)?;
        if self.shard.world == 1 {
            return Ok(local);
        }
        let mut shape = local.dims().to_vec();
        let cols = *shape.last().expect("at least one dim");
        let full = self.group.all_gather_cols(&local.reshape(((), cols))?)?;
        *shape.last_mut().expect("at least one dim") = self.cfg.vocab_size;
        Ok(full.reshape(shape)?)
    }

    /// One engine step, run by every rank of the group alike: embeds the step's rows (token ids through
    /// the vocabulary-parallel table, [`crate::tp::AUDIO_ROW`] rows from `audio` `[n, hidden]`), runs the
    /// layers over the paged cache and returns the f32 logits of `plan.sample_rows` (`None` if there are
    /// none).
    pub fn run_step(
        &self,
        plan: &StepPlan,
        audio: Option<&Tensor>,
        kv: &PagedKv,
    ) -> Result<Option<Tensor>> {
        if let Some(&bad) = plan
            .ids
            .iter()
            .find(|&&i| i != AUDIO_ROW && i as usize >= self.cfg.vocab_size)
        {
            return Err(crate::ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        // Before anything of the step reads the cache (the copied rows are the start of a new sequence's block).
        kv.copy_rows(&plan.copies)?;
        let mut embeds = self.embed_rows_masked(&plan.ids)?;
        let audio_rows: Vec<u32> = (0..plan.ids.len() as u32)
            .filter(|&r| plan.ids[r as usize] == AUDIO_ROW)
            .collect();
        if !audio_rows.is_empty() {
            let a = audio.ok_or_else(|| {
                crate::ModelError::Input("the step has audio rows but no audio".into())
            })?;
            if a.dims() != [audio_rows.len(), self.cfg.hidden_size] {
                return Err(crate::ModelError::Input(format!(
                    "the step has {} audio rows of width {}, the audio is {:?}",
                    audio_rows.len(),
                    self.cfg.hidden_size,
                    a.dims()
                )));
            }
            // The masked rows are zeros, so adding places the audio rows exactly.
            let n = audio_rows.len();
            let idx = Tensor::from_vec(audio_rows, n, embeds.device())?;
            embeds = embeds.index_add(&idx, &a.to_dtype(embeds.dtype())?, 0)?;
        }
        // The lm_head in the same pass on the pool as the layers (one hand-off per step, the workers kept
        // awake through it). The last layer computes only the rows that are sampled.
        let sample: Vec<usize> = plan.sample_rows.iter().map(|&r| r as usize).collect();
        check_rows(&sample, plan.ids.len())?;
        crate::pool::on_pool(self.on_cpu_alone(), || {
            let hidden = self.forward_paged_here(&embeds, &plan.seqs, kv, Keep::Rows(&sample))?;
            if sample.is_empty() {
                return Ok(None);
            }
            Ok(Some(self.logits(&hidden)?))
        })
    }
}

/// `rows` must be ascending row indices below `n` (the pass's rows).
fn check_rows(rows: &[usize], n: usize) -> Result<()> {
    if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| r >= n) {
        return Err(crate::ModelError::Input(format!(
            "rows to keep must be ascending and below the pass's {n} rows, got {rows:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{LayerKv, MIN_CAPACITY};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn appending_in_place_keeps_what_concatenation_gives() {
        let dev = Device::Cpu;
        let (nkv, hd) = (2, 3);
        let mut slot = None;
        let mut want: Option<(Tensor, Tensor)> = None;
        // A first chunk, single positions, then chunks that overflow the capacity twice.
        let mut seed = 0f32;
        for l in [5, 1, 1, MIN_CAPACITY - 4, 1, MIN_CAPACITY, 7] {
            let n = nkv * l * hd;
            let k = Tensor::arange(seed, seed + n as f32, &dev)
                .unwrap()
                .reshape((1, nkv, l, hd))
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let v = (k.clone() * -1.0).unwrap();
            seed += n as f32;
            LayerKv::append(&mut slot, &k, &v, 0).unwrap();
            want = Some(match want {
                Some((pk, pv)) => (
                    Tensor::cat(&[&pk, &k], 2).unwrap(),
                    Tensor::cat(&[&pv, &v], 2).unwrap(),
                ),
                None => (k, v),
            });
            let (wk, wv) = want.as_ref().unwrap();
            let s = slot.as_ref().unwrap();
            let len = wk.dim(2).unwrap();
            assert_eq!(s.len, len);
            assert!(s.k.dim(2).unwrap() >= len);
            let got = |t: &Tensor| {
                t.narrow(2, 0, len)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(got(&s.k), got(wk), "keys after {len} positions");
            assert_eq!(got(&s.v), got(wv), "values after {len} positions");
        }
    }

    #[test]
    fn a_reserved_cache_allocates_once() {
        let dev = Device::Cpu;
        let reserve = MIN_CAPACITY * 3;
        let mut slot = None;
        for l in [5, 1, MIN_CAPACITY, 1] {
            let k = Tensor::ones((1, 2, l, 4), DType::F32, &dev).unwrap();
            LayerKv::append(&mut slot, &k, &k, reserve).unwrap();
            assert_eq!(slot.as_ref().unwrap().k.dim(2).unwrap(), reserve);
        }
        // Past the reservation it grows as an unreserved cache does.
        let k = Tensor::ones((1, 2, reserve, 4), DType::F32, &dev).unwrap();
        LayerKv::append(&mut slot, &k, &k, reserve).unwrap();
        let s = slot.as_ref().unwrap();
        assert_eq!(s.len, reserve + MIN_CAPACITY + 7);
        assert!(s.k.dim(2).unwrap() >= s.len);
    }
}
