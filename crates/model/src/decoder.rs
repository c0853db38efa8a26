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
use crate::linear::{ParallelLinear, StackedPart};
use crate::paged::{self, PagedKv, SeqStep, StepIndex};
use crate::paged_cpu;
use crate::softmax::softmax_rows_scaled;
use crate::tp::{StepPlan, TextShard, AUDIO_ROW};
use crate::weights::Weights;

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
struct DecoderLayer {
    input_norm: RmsNorm,
    /// This rank's q, k and v projections stacked (see [`ParallelLinear::load_column_stacked`]):
    /// `[.., (heads + 2 kv heads) x head size]` of this rank.
    qkv: ParallelLinear,
    o: ParallelLinear,
    post_norm: RmsNorm,
    /// This rank's gate and up projections stacked: `[.., 2 inter]`.
    gate_up: ParallelLinear,
    down: ParallelLinear,
}

impl DecoderLayer {
    /// This rank's part of layer `p` (see [`crate::tp`]); the whole layer for a group of one.
    fn load(
        w: &Weights,
        p: &str,
        c: &TextConfig,
        s: &TextShard,
        group: &Arc<dyn Collective>,
    ) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let heads = s.heads.start * hd..s.heads.end * hd;
        let kv = s.kv_heads.start * hd..s.kv_heads.end * hd;
        let inter = c.intermediate_size;
        let norm = |n: &str| RmsNorm::load(w, &format!("{p}.{n}.weight"), h, c.rms_norm_eps);
        let names = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ]
        .map(|n| format!("{p}.{n}"));
        let part =
            |i: usize, out_dim: usize, bias: bool, rows: &std::ops::Range<usize>| StackedPart {
                prefix: &names[i],
                out_dim,
                bias,
                rows: rows.clone(),
            };
        let qkv = [
            part(0, qd, true, &heads),
            part(1, kvd, true, &kv),
            part(2, kvd, true, &kv),
        ];
        let gate_up = [
            part(3, inter, false, &s.intermediate),
            part(4, inter, false, &s.intermediate),
        ];
        Ok(DecoderLayer {
            input_norm: norm("input_layernorm")?,
            qkv: ParallelLinear::load_column_stacked(w, &qkv, h)?,
            o: ParallelLinear::load_row(
                w,
                &format!("{p}.self_attn.o_proj"),
                (qd, h),
                false,
                heads.clone(),
                group,
            )?,
            post_norm: norm("post_attention_layernorm")?,
            gate_up: ParallelLinear::load_column_stacked(w, &gate_up, h)?,
            down: ParallelLinear::load_row(
                w,
                &format!("{p}.mlp.down_proj"),
                (inter, h),
                false,
                s.intermediate.clone(),
                group,
            )?,
        })
    }

    /// q, k and v of `y` (`[.., hidden]`): views of one stacked product's columns; `c` is this rank's
    /// configuration (its head counts).
    fn qkv(&self, y: &Tensor, c: &TextConfig) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.qkv.forward(y)?;
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Ok((
            x.narrow(D::Minus1, 0, q)?,
            x.narrow(D::Minus1, q, kv)?,
            x.narrow(D::Minus1, q + kv, kv)?,
        ))
    }

    /// The rest of the layer after attention (shared by both cache layouts): output projection and residual,
    /// post-attention norm, SwiGLU MLP and residual. `o` is the attention output in `h`'s row layout.
    fn output(&self, h: &Tensor, o: &Tensor) -> Result<Tensor> {
        let h = crate::elementwise::add(h, &self.o.forward(o)?)?;
        let y = self.post_norm.forward(&h)?;
        let m = self.down.forward(&crate::elementwise::silu_mul_halves(
            &self.gate_up.forward(&y)?,
        )?)?;
        crate::elementwise::add(&h, &m)
    }

    fn forward(
        &self,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        (cache, reserve): (&mut Option<LayerKv>, usize),
        c: &TextConfig,
    ) -> Result<Tensor> {
        let (b, l, _) = h.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let y = self.input_norm.forward(h)?;
        let split = |x: Tensor, heads: usize| -> Result<Tensor> {
            Ok(x.reshape((b, l, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = self.qkv(&y, c)?;
        let q = Rope::apply(&split(q, nh)?, cos, sin)?;
        let k = Rope::apply(&split(k, nkv)?, cos, sin)?;
        let v = split(v, nkv)?;
        LayerKv::append(cache, &k, &v, reserve)?;
        let stored = cache.as_ref().expect("appended above");
        let total = stored.len;
        let start = total - l;
        if h.device().is_cpu() && b == 1 {
            // The CPU kernels read the cache in place (no casts, GQA copies or score tensors), as the
            // engine's paged steps do: decode steps and short chunks fused, longer chunks blocked.
            let g = paged_cpu::Heads { nh, nkv, hd };
            let q = q.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            let o = paged_cpu::attend_contiguous(&q, start, (&stored.k, &stored.v), g)?;
            let o = Tensor::from_vec(o, (1, l, nh * hd), h.device())?.to_dtype(h.dtype())?;
            return self.output(h, &o);
        }
        let k = stored.k.narrow(2, 0, total)?.contiguous()?;
        let v = stored.v.narrow(2, 0, total)?.contiguous()?;
        // GQA: query head i uses kv head i / (nh / nkv) (consecutive query heads share a kv head).
        let group = nh / nkv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            if group == 1 {
                return Ok(x.clone());
            }
            Ok(x.unsqueeze(2)?
                .expand((b, nkv, group, total, hd))?
                .reshape((b, nh, total, hd))?)
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        // Attention in the working dtype (f32 for bf16 on the CPU), rounded back to the activation dtype.
        let act = q.dtype();
        let work = paged::work_dtype(&q);
        let (q, k, v) = (q.to_dtype(work)?, k.to_dtype(work)?, v.to_dtype(work)?);
        let scores = q.matmul(&k.t()?)?;
        // Query i (position start + i) sees keys 0..=start + i: the softmax applies the causal limit itself,
        // in f32 as the reference does, rounding once to the working dtype.
        let probs = softmax_rows_scaled(&scores, Some((l, start)), (hd as f32).powf(-0.5))?;
        let o = probs
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?
            .to_dtype(act)?;
        self.output(h, &o)
    }
}

impl DecoderLayer {
    /// One layer over the rows `h` `[T, hidden]` of a batched step (see [`crate::paged`]).
    fn forward_paged(
        &self,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        seqs: &[SeqStep],
        index: &StepIndex,
        kv: (&Tensor, &Tensor),
        c: &TextConfig,
    ) -> Result<Tensor> {
        let t = h.dim(0)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let y = self.input_norm.forward(h)?;
        let (q, k, v) = self.qkv(&y, c)?;
        let q = Rope::apply(&q.reshape((t, nh, hd))?, cos, sin)?;
        let k = Rope::apply(&k.reshape((t, nkv, hd))?, cos, sin)?;
        index
            .write
            .apply(kv.0, &k.reshape((t, nkv * hd))?.contiguous()?)?;
        index.write.apply(kv.1, &v.contiguous()?)?;
        if let Some(d) = &index.decode {
            let o = paged::attend_decode(&q, d, kv, c)?;
            return self.output(h, &o);
        }
        if h.device().is_cpu() {
            // Few-query sequences: one fused pass over the pool for all of them; longer chunks: the blocked
            // causal kernel, one sequence at a time (parallel inside). Both in f32 from the pool in place.
            let g = paged_cpu::Heads { nh, nkv, hd };
            let width = nh * hd;
            let short: Vec<bool> = seqs
                .iter()
                .map(|s| s.len <= paged_cpu::MAX_QUERY_ROWS)
                .collect();
            let geometry = (g, index.block_size);
            // The queries in f32 once for both kernels.
            let qf = paged_cpu::f32_queries(&q)?;
            let mut out = vec![0f32; t * width];
            if short.iter().any(|&b| b) {
                paged_cpu::attend_rows(&qf, seqs, &short, kv, geometry, &mut out)?;
            }
            let mut row = 0;
            for (s, &is_short) in seqs.iter().zip(&short) {
                if !is_short {
                    let rows = row * width..(row + s.len) * width;
                    paged_cpu::attend_chunk(&qf[rows.clone()], s, kv, geometry, &mut out[rows])?;
                }
                row += s.len;
            }
            let o = Tensor::from_vec(out, (t, width), h.device())?.to_dtype(h.dtype())?;
            return self.output(h, &o);
        }
        // Other devices: blocked matmuls per sequence.
        let mut outs = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for (s, slots) in seqs.iter().zip(&index.read) {
            let qs = q.narrow(0, row, s.len)?.transpose(0, 1)?.contiguous()?;
            outs.push(paged::attend(&qs, s.start, slots, kv, c, index.attn_block)?);
            row += s.len;
        }
        self.output(h, &Tensor::cat(&outs, 0)?)
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
        crate::pool::on_pool(self.on_cpu_alone(), || self.forward_here(embeds, cache))
    }

    /// A CPU model of a group of one: its forward passes run on rayon's pool ([`crate::pool`]).
    fn on_cpu_alone(&self) -> bool {
        self.shard.world == 1 && self.embed.device().is_cpu()
    }

    fn forward_here(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, l, _) = embeds.dims3()?;
        let start = cache.len();
        let (cos, sin) = self
            .rope
            .tables(start, l, embeds.dtype(), embeds.device())?;
        let mut h = embeds.clone();
        let reserve = cache.reserve;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, &cos, &sin, (slot, reserve), &self.local)?;
        }
        self.norm.forward(&h)
    }

    /// A batched step over the paged cache: `embeds` `[T, hidden]` holds the new rows of every sequence of
    /// `seqs`, in order. Writes their keys and values into `kv` and returns the hidden states after the final
    /// norm, `[T, hidden]`.
    pub fn forward_paged(&self, embeds: &Tensor, seqs: &[SeqStep], kv: &PagedKv) -> Result<Tensor> {
        crate::pool::on_pool(self.on_cpu_alone(), || {
            self.forward_paged_here(embeds, seqs, kv)
        })
    }

    fn forward_paged_here(
        &self,
        embeds: &Tensor,
        seqs: &[SeqStep],
        kv: &PagedKv,
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
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward_paged(&h, (&cos, &sin), seqs, &index, kv.layer(i), c)?;
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
        // awake through it).
        crate::pool::on_pool(self.on_cpu_alone(), || {
            let hidden = self.forward_paged(&embeds, &plan.seqs, kv)?;
            if plan.sample_rows.is_empty() {
                return Ok(None);
            }
            let n = plan.sample_rows.len();
            let idx = Tensor::from_slice(&plan.sample_rows, n, hidden.device())?;
            Ok(Some(self.logits(&hidden.index_select(&idx, 0)?)?))
        })
    }
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
