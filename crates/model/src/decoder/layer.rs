//! One decoder layer (spec 9): input norm, q/k/v with RoPE, attention over either cache layout, output
//! projection, post-attention norm and the SwiGLU MLP, each projection through [`ParallelLinear`].
//!
//! Both forward passes take the rows whose output the caller needs ([`Keep`]). Every layer but the last
//! needs all of them; the last needs only the rows whose logits are sampled (the last position of a prompt,
//! none at all for a prompt's earlier chunks), while the keys and values of every row still go into the
//! cache. For the other rows the last layer then skips attention, the output projection and the MLP: 3.9 % of
//! the projections of a Qwen2.5-0.5B-shaped prefill (24 layers). A kept row gets the bits it gets in a pass over all rows: each row's
//! attention is its own (the few-query kernel computes rows independently, and a query's result in the
//! blocked kernel does not depend on the block it is in), and the projections, norms and elementwise steps
//! compute every row alone (`crate::cpu_gemm` sums each element in the same order whatever the row count).

use std::sync::Arc;

use afnext_collectives::Collective;
use candle_core::{Tensor, D};

use super::{LayerKv, RmsNorm, Rope};
use crate::config::TextConfig;
use crate::error::Result;
use crate::linear::{ParallelLinear, StackedPart};
use crate::paged::{self, SeqStep, StepIndex};
use crate::paged_cpu;
use crate::softmax::softmax_rows_scaled;
use crate::tp::TextShard;
use crate::weights::Weights;

/// The rows of a pass whose hidden states the caller needs from a layer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Keep<'a> {
    All,
    /// These rows, in this order (row indices into the pass, ascending); may be empty.
    Rows(&'a [usize]),
}

/// `t`'s rows `rows` along dimension `dim`.
fn select(t: &Tensor, dim: usize, rows: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, rows.len(), t.device())?;
    Ok(t.index_select(&idx, dim)?)
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
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
    pub(super) fn load(
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

    /// The layer over `h` `(1, l, hidden)` of the single-sequence cache; returns the rows `keep` of its
    /// output `(1, kept, hidden)`. The cache gets the keys and values of all `l` rows.
    pub(super) fn forward(
        &self,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        (cache, reserve): (&mut Option<LayerKv>, usize),
        c: &TextConfig,
        keep: Keep<'_>,
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
        if let Keep::Rows(&[]) = keep {
            return Ok(h.narrow(1, 0, 0)?);
        }
        let stored = cache.as_ref().expect("appended above");
        let total = stored.len;
        let start = total - l;
        if h.device().is_cpu() && b == 1 {
            // The CPU kernels read the cache in place (no casts, GQA copies or score tensors), as the
            // engine's paged steps do: decode steps and short chunks fused, longer chunks blocked.
            let g = paged_cpu::Heads { nh, nkv, hd };
            let q = q.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            let rows = match keep {
                Keep::All => None,
                Keep::Rows(r) => Some(r),
            };
            let o = paged_cpu::attend_contiguous(&q, start, (&stored.k, &stored.v), g, rows)?;
            let n = o.len() / (nh * hd);
            let o = Tensor::from_vec(o, (1, n, nh * hd), h.device())?.to_dtype(h.dtype())?;
            return match keep {
                Keep::All => self.output(h, &o),
                Keep::Rows(r) => self.output(&select(h, 1, r)?, &o),
            };
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
        match keep {
            Keep::All => self.output(h, &o),
            // Other devices: attention for all rows (one batched product), the rest for the kept ones.
            Keep::Rows(r) => self.output(&select(h, 1, r)?, &select(&o, 1, r)?),
        }
    }

    /// One layer over the rows `h` `[T, hidden]` of a batched step (see [`crate::paged`]); returns the rows
    /// `keep` of its output `[kept, hidden]`. The pool gets the keys and values of all `T` rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_paged(
        &self,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        seqs: &[SeqStep],
        index: &StepIndex,
        kv: (&Tensor, &Tensor),
        c: &TextConfig,
        keep: Keep<'_>,
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
        let rows = match keep {
            Keep::All => None,
            Keep::Rows(&[]) => return Ok(h.narrow(0, 0, 0)?),
            Keep::Rows(r) => Some(r),
        };
        // The output part over the kept rows, given the attention of the kept rows.
        let finish = |o: &Tensor| match rows {
            None => self.output(h, o),
            Some(r) => self.output(&select(h, 0, r)?, o),
        };
        // The kept rows of an attention computed for all rows.
        let kept = |o: Tensor| match rows {
            None => Ok(o),
            Some(r) => select(&o, 0, r),
        };
        if let Some(d) = &index.decode {
            return finish(&kept(paged::attend_decode(&q, d, kv, c)?)?);
        }
        if h.device().is_cpu() {
            // Few-query sequences: one fused pass over the pool for all of them; longer chunks: the blocked
            // causal kernel, one sequence at a time (parallel inside). Both in f32 from the pool in place.
            let g = paged_cpu::Heads { nh, nkv, hd };
            let width = nh * hd;
            let geometry = (g, index.block_size);
            // The queries in f32 once for both kernels.
            let qf = paged_cpu::f32_queries(&q)?;
            // Rows of short sequences that are wanted, for the few-query kernel.
            let mut few = vec![false; t];
            let mut row = 0;
            for s in seqs {
                if s.len <= paged_cpu::MAX_QUERY_ROWS {
                    for (i, f) in few[row..row + s.len].iter_mut().enumerate() {
                        *f = paged_cpu::wanted(rows, row + i);
                    }
                }
                row += s.len;
            }
            let mut out = vec![0f32; t * width];
            if few.iter().any(|&b| b) {
                paged_cpu::attend_rows(&qf, seqs, &few, kv, geometry, &mut out)?;
            }
            let mut row = 0;
            for s in seqs {
                if s.len > paged_cpu::MAX_QUERY_ROWS {
                    // The wanted rows of this chunk, counted from its first.
                    let local: Option<Vec<usize>> = rows.map(|r| {
                        let (a, b) = (
                            r.partition_point(|&x| x < row),
                            r.partition_point(|&x| x < row + s.len),
                        );
                        r[a..b].iter().map(|&x| x - row).collect()
                    });
                    let span = row * width..(row + s.len) * width;
                    paged_cpu::attend_chunk(
                        &qf[span.clone()],
                        s,
                        local.as_deref(),
                        kv,
                        geometry,
                        &mut out[span],
                    )?;
                }
                row += s.len;
            }
            let out = paged_cpu::take_rows(out, width, rows);
            let n = out.len() / width;
            let o = Tensor::from_vec(out, (n, width), h.device())?.to_dtype(h.dtype())?;
            return finish(&o);
        }
        // Other devices: blocked matmuls per sequence.
        let mut outs = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for (s, slots) in seqs.iter().zip(&index.read) {
            let qs = q.narrow(0, row, s.len)?.transpose(0, 1)?.contiguous()?;
            outs.push(paged::attend(&qs, s.start, slots, kv, c, index.attn_block)?);
            row += s.len;
        }
        finish(&kept(Tensor::cat(&outs, 0)?)?)
    }
}
