//! The AF-Whisper audio encoder (spec 5), per 30 s window; windows are independent and batched freely.
//! Reference: transformers 5.23 `models/audioflamingo3/modeling_audioflamingo3.py` (encoder), as used by
//! `models/musicflamingo`.

use candle_core::{DType, Storage, Tensor};

pub use afnext_audio::{conv_len, tokens_for_frames};

use crate::config::AudioConfig;
use crate::elementwise::gelu_erf;
use crate::error::{ModelError, Result};
use crate::linear::ParallelLinear;
use crate::softmax::softmax_rows;
use crate::weights::Weights;

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&format!("{prefix}.weight"), &[dim])?,
            bias: w.get(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    attn_norm: LayerNorm,
    /// q, k and v stacked: `[.., 3 d]`.
    qkv: ParallelLinear,
    out: ParallelLinear,
    ffn_norm: LayerNorm,
    fc1: ParallelLinear,
    fc2: ParallelLinear,
}

impl EncoderLayer {
    fn load(w: &Weights, p: &str, cfg: &AudioConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(EncoderLayer {
            attn_norm: LayerNorm::load(
                w,
                &format!("{p}.self_attn_layer_norm"),
                d,
                cfg.layer_norm_eps,
            )?,
            // k_proj has no bias (spec quirk 5).
            qkv: ParallelLinear::load_stacked(
                w,
                &[
                    (&format!("{p}.self_attn.q_proj"), true),
                    (&format!("{p}.self_attn.k_proj"), false),
                    (&format!("{p}.self_attn.v_proj"), true),
                ],
                d,
                d,
            )?,
            out: ParallelLinear::load(w, &format!("{p}.self_attn.out_proj"), d, d, true)?,
            ffn_norm: LayerNorm::load(w, &format!("{p}.final_layer_norm"), d, cfg.layer_norm_eps)?,
            fc1: ParallelLinear::load(w, &format!("{p}.fc1"), d, cfg.intermediate_size, true)?,
            fc2: ParallelLinear::load(w, &format!("{p}.fc2"), cfg.intermediate_size, d, true)?,
        })
    }

    /// `h`: (b, t, d); `valid_keys[i]`: keys window `i` attends to (the rest are padding).
    fn forward(&self, h: &Tensor, valid_keys: &[usize], heads: usize) -> Result<Tensor> {
        let d = h.dim(2)?;
        let hd = d / heads;
        let y = self.attn_norm.forward(h)?;
        let scale = (hd as f64).powf(-0.5);
        let qkv = self.qkv.forward(&y)?;
        let o = if h.device().is_cpu() && h.dtype() == DType::F32 {
            cpu_attention(&qkv, heads, scale as f32, valid_keys)?
        } else {
            let part = |i: usize| qkv.narrow(2, i * d, d)?.contiguous();
            // The scale is applied to q before the dot product, as the reference does.
            candle_attention(
                &(part(0)? * scale)?,
                &part(1)?,
                &part(2)?,
                heads,
                valid_keys,
            )?
        };
        let h = (h + self.out.forward(&o)?)?;
        let y = self.ffn_norm.forward(&h)?;
        let f = self.fc2.forward(&self.fc1.forward_gelu(&y)?)?;
        Ok((h + f)?)
    }
}

/// Attention through candle's operations (GPUs, 16-bit dtypes) on `[b, t, d]` tensors, `q` already scaled.
fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    valid_keys: &[usize],
) -> Result<Tensor> {
    let (b, t, d) = q.dims3()?;
    let hd = d / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        Ok(x.reshape((b, t, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    // The reference adds finfo.min to the scores of padding keys, which softmax turns into exact zeros:
    // the same as leaving those keys out. So full windows (all but an audio's last) attend with no mask
    // at all, and a partial window attends over its valid keys only. (An additive mask broadcast over
    // heads and queries cost two thirds of the encoder's GPU time.)
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
        // Softmax in the activation dtype, as the reference's eager encoder does (torch computes it in
        // f32 and rounds once; so does softmax_rows).
        let probs = softmax_rows(&q.matmul(&k.t()?)?, None)?;
        Ok(probs.matmul(v)?)
    };
    let mut o = attend(&q, &k, &v)?;
    if valid_keys.iter().any(|&n| n < t) {
        let mut rows = Vec::with_capacity(b);
        for (i, &n) in valid_keys.iter().enumerate() {
            let one = |x: &Tensor| x.narrow(0, i, 1);
            rows.push(if n < t {
                let keys =
                    |x: &Tensor| -> Result<Tensor> { Ok(one(x)?.narrow(2, 0, n)?.contiguous()?) };
                attend(&one(&q)?, &keys(&k)?, &keys(&v)?)?
            } else {
                one(&o)?
            });
        }
        o = Tensor::cat(&rows, 0)?;
    }
    Ok(o.transpose(1, 2)?.reshape((b, t, d))?)
}

/// The f32 CPU attention of [`crate::encoder_cpu`] on the stacked projection `[b, t, 3 d]`; returns
/// `[b, t, d]`.
fn cpu_attention(qkv: &Tensor, heads: usize, scale: f32, valid_keys: &[usize]) -> Result<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Input(
            "the CPU encoder attention got a tensor on another device".into(),
        ));
    };
    let values = &cpu.as_slice::<f32>()?[layout.start_offset()..][..b * t * d3];
    let shape = crate::encoder_cpu::Shape {
        b,
        t,
        heads,
        hd: d / heads,
    };
    let o = crate::encoder_cpu::attention(values, shape, scale, valid_keys);
    Ok(Tensor::from_vec(o, (b, t, d), &candle_core::Device::Cpu)?)
}

#[derive(Debug, Clone)]
pub struct AudioEncoder {
    conv1_w: Tensor,
    conv1_b: Tensor,
    conv2_w: Tensor,
    conv2_b: Tensor,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    cfg: AudioConfig,
}

impl AudioEncoder {
    pub fn load(w: &Weights, cfg: &AudioConfig) -> Result<Self> {
        let (d, m) = (cfg.hidden_size, cfg.num_mel_bins);
        let p = "audio_tower";
        Ok(AudioEncoder {
            conv1_w: w.get(&format!("{p}.conv1.weight"), &[d, m, 3])?,
            conv1_b: w.get(&format!("{p}.conv1.bias"), &[d])?,
            conv2_w: w.get(&format!("{p}.conv2.weight"), &[d, d, 3])?,
            conv2_b: w.get(&format!("{p}.conv2.bias"), &[d])?,
            positions: w.get(
                &format!("{p}.embed_positions.weight"),
                &[cfg.max_source_positions, d],
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::load(w, &format!("{p}.layers.{i}"), cfg))
                .collect::<Result<_>>()?,
            final_norm: LayerNorm::load(w, &format!("{p}.layer_norm"), d, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// Mel frames per window the encoder expects (3000).
    pub fn frames(&self) -> usize {
        2 * self.cfg.max_source_positions
    }
    /// Output rows per window (750).
    pub fn rows(&self) -> usize {
        self.cfg.max_source_positions / 2
    }

    /// `features`: (b, n_mels, frames); `valid_frames[i]`: frames of window i that carry signal.
    /// Returns the encoder output (b, rows, d) after avg-pool and the final LayerNorm, all rows computed
    /// (rows past a window's token count are what the reference computes for padding; callers drop them).
    pub fn forward(&self, features: &Tensor, valid_frames: &[usize]) -> Result<Tensor> {
        let (b, m, f) = features.dims3()?;
        if m != self.cfg.num_mel_bins || f != self.frames() || valid_frames.len() != b {
            return Err(ModelError::Input(format!(
                "encoder input is ({b}, {m}, {f}) with {} valid-frame counts; expected (n, {}, {}) and n counts",
                valid_frames.len(),
                self.cfg.num_mel_bins,
                self.frames()
            )));
        }
        let x = features.to_dtype(self.conv1_w.dtype())?;
        let bias = |t: &Tensor| t.reshape((1, (), 1));
        let a = gelu_erf(
            &x.conv1d(&self.conv1_w, 1, 1, 1, 1)?
                .broadcast_add(&bias(&self.conv1_b)?)?,
        )?;
        let c = gelu_erf(
            &a.conv1d(&self.conv2_w, 1, 2, 1, 1)?
                .broadcast_add(&bias(&self.conv2_b)?)?,
        )?;
        // (b, d, t) -> (b, t, d), plus every learned position (no re-basing for partial windows).
        let mut h = c.transpose(1, 2)?.broadcast_add(&self.positions)?;
        let t = self.cfg.max_source_positions;
        // Keys a window attends to: conv positions `< (F - 1) // 2 + 1` (spec 5); queries are never masked.
        let valid_keys: Vec<usize> = valid_frames.iter().map(|&f| conv_len(f).min(t)).collect();
        for layer in &self.layers {
            h = layer.forward(&h, &valid_keys, self.cfg.num_attention_heads)?;
        }
        // Average-pool pairs of rows (kernel 2, stride 2), then the final LayerNorm (after the pool).
        let d = self.cfg.hidden_size;
        let pooled = (h.reshape((b, t / 2, 2, d))?.sum(2)? / 2.0)?;
        self.final_norm.forward(&pooled)
    }
}
