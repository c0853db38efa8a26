//! AF-Next end to end: audio windows -> encoder -> RoTE -> projector -> merged into the prompt -> Qwen2.

use std::path::Path;
use std::sync::Arc;

use afnext_collectives::{Collective, Single};

use candle_core::{DType, Device, Tensor};

use crate::config::AfNextConfig;
use crate::decoder::{KvCache, Qwen2};
use crate::encoder::{tokens_for_frames, AudioEncoder};
use crate::error::{ModelError, Result};
use crate::linear::ParallelLinear;
use crate::rote;
use crate::weights::Weights;

/// The 2-layer projector (spec 7): linear_1 -> GELU(erf) -> linear_2.
#[derive(Debug, Clone)]
pub struct Projector {
    l1: ParallelLinear,
    l2: ParallelLinear,
}

impl Projector {
    pub fn load(w: &Weights, cfg: &AfNextConfig) -> Result<Self> {
        let (d, h) = (cfg.audio.hidden_size, cfg.text.hidden_size);
        Ok(Projector {
            l1: ParallelLinear::load(
                w,
                "multi_modal_projector.linear_1",
                d,
                h,
                cfg.projector_bias,
            )?,
            l2: ParallelLinear::load(
                w,
                "multi_modal_projector.linear_2",
                h,
                h,
                cfg.projector_bias,
            )?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.gelu_erf()?)
    }
}

/// One batch of audio windows through the audio path, every intermediate kept (for `inspect` and tests).
#[derive(Debug, Clone)]
pub struct AudioStages {
    /// (n, rows, d) after the encoder's final LayerNorm.
    pub encoder_output: Tensor,
    /// (n, rows, d) after RoTE (projector input).
    pub post_rote: Tensor,
    /// (n, rows, h) projector output, all rows.
    pub projected: Tensor,
    /// Valid rows per window.
    pub tokens: Vec<usize>,
}

impl AudioStages {
    /// The rows that replace the `<sound>` tokens: each window's first `tokens[w]` rows, in order (n_audio, h).
    pub fn embeddings(&self) -> Result<Tensor> {
        let parts: Vec<Tensor> = self
            .tokens
            .iter()
            .enumerate()
            .filter(|(_, &t)| t > 0)
            .map(|(w, &t)| self.projected.get(w)?.narrow(0, 0, t))
            .collect::<candle_core::Result<_>>()?;
        if parts.is_empty() {
            return Err(ModelError::Input("no audio window yields a token".into()));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// The audio path alone: encoder, RoTE and projector (what an encoder worker loads).
#[derive(Debug, Clone)]
pub struct AudioTower {
    pub cfg: AfNextConfig,
    pub encoder: AudioEncoder,
    pub projector: Projector,
    device: Device,
}

impl AudioTower {
    /// The audio path of the weights `w` (only its tensors are read).
    pub fn from_weights(cfg: AfNextConfig, w: &Weights) -> Result<Self> {
        Ok(AudioTower {
            encoder: AudioEncoder::load(w, &cfg.audio)?,
            projector: Projector::load(w, &cfg)?,
            device: w.device().clone(),
            cfg,
        })
    }

    /// Runs windows through encoder, RoTE and projector. `features`: (n, mels, frames) f32 log-mel;
    /// `valid_frames[i]` and `window_idx[i]` (index of the window within its own audio) per window.
    pub fn encode_windows(
        &self,
        features: &Tensor,
        valid_frames: &[usize],
        window_idx: &[usize],
    ) -> Result<AudioStages> {
        if window_idx.len() != valid_frames.len() {
            return Err(ModelError::Input(
                "one window index per window is needed".into(),
            ));
        }
        let encoder_output = self
            .encoder
            .forward(&features.to_device(&self.device)?, valid_frames)?;
        let rows = self.encoder.rows();
        let tables = rote::tables(&self.cfg.rote, self.cfg.audio.hidden_size, rows, window_idx);
        let post_rote = rote::apply(&encoder_output, &tables)?;
        let projected = self.projector.forward(&post_rote)?;
        Ok(AudioStages {
            encoder_output,
            post_rote,
            projected,
            tokens: valid_frames.iter().map(|&f| tokens_for_frames(f)).collect(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AfNext {
    pub cfg: AfNextConfig,
    pub audio: AudioTower,
    pub decoder: Qwen2,
    dtype: DType,
    device: Device,
}

impl AfNext {
    /// Loads a checkpoint directory in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = AfNextConfig::load(dir)?;
        let w = Weights::load(dir, dtype, device)?;
        Self::from_weights(cfg, &w)
    }

    /// The model of `cfg` with random weights (benchmarks at any size without a checkpoint).
    pub fn random(cfg: AfNextConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let w = Weights::random(seed, cfg.text.tie_word_embeddings, dtype, device);
        Self::from_weights(cfg, &w)
    }

    pub fn from_weights(cfg: AfNextConfig, w: &Weights) -> Result<Self> {
        Self::from_weights_in(cfg, w, Arc::new(Single))
    }

    /// Rank 0 of a tensor-parallel decoder group: the whole audio path and this rank's decoder share.
    pub fn load_in_group(
        dir: &Path,
        dtype: DType,
        device: &Device,
        group: Arc<dyn Collective>,
    ) -> Result<Self> {
        let cfg = AfNextConfig::load(dir)?;
        let w = Weights::load(dir, dtype, device)?;
        Self::from_weights_in(cfg, &w, group)
    }

    pub fn from_weights_in(
        cfg: AfNextConfig,
        w: &Weights,
        group: Arc<dyn Collective>,
    ) -> Result<Self> {
        Ok(AfNext {
            audio: AudioTower::from_weights(cfg.clone(), w)?,
            decoder: Qwen2::load_shard(w, &cfg.text, group)?,
            dtype: w.dtype(),
            device: w.device().clone(),
            cfg,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The audio path on windows (see [`AudioTower::encode_windows`]).
    pub fn encode_windows(
        &self,
        features: &Tensor,
        valid_frames: &[usize],
        window_idx: &[usize],
    ) -> Result<AudioStages> {
        self.audio
            .encode_windows(features, valid_frames, window_idx)
    }

    /// Prompt embeddings (1, l, h): token embeddings with every `<sound>` position replaced, in order, by the
    /// rows of `audio` (n_audio, h).
    pub fn embed_prompt(&self, ids: &[u32], audio: Option<&Tensor>) -> Result<Tensor> {
        let positions: Vec<u32> = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| id == self.cfg.audio_token_id)
            .map(|(i, _)| i as u32)
            .collect();
        let text = self.decoder.embed(ids)?;
        let n_audio = audio.map(|a| a.dim(0)).transpose()?.unwrap_or(0);
        if positions.len() != n_audio {
            return Err(ModelError::Input(format!(
                "the prompt has {} audio tokens but {n_audio} audio embeddings were given",
                positions.len()
            )));
        }
        let Some(audio) = audio else { return Ok(text) };
        // Gather from [text rows; audio rows]: position p takes text row p, or audio row k for its k-th <sound>.
        let l = ids.len() as u32;
        let mut idx: Vec<u32> = (0..l).collect();
        for (k, &p) in positions.iter().enumerate() {
            idx[p as usize] = l + k as u32;
        }
        let all = Tensor::cat(&[&text.squeeze(0)?, &audio.to_dtype(text.dtype())?], 0)?;
        let idx = Tensor::from_vec(idx, ids.len(), &self.device)?;
        Ok(all.index_select(&idx, 0)?.unsqueeze(0)?)
    }

    /// Prefills `embeds` (1, l, h) in chunks of at most `chunk` positions (bounded attention memory), returning
    /// the hidden states after the final norm of all positions (`all`) or of the last one only. For the last
    /// position alone the decoder's last layer computes only what that position needs
    /// ([`crate::decoder::Qwen2::forward_rows`]).
    pub fn prefill(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        chunk: usize,
        all: bool,
    ) -> Result<Tensor> {
        let l = embeds.dim(1)?;
        if l == 0 {
            return Err(ModelError::Input("empty prompt".into()));
        }
        let chunk = chunk.max(1);
        let mut outs = Vec::new();
        for start in (0..l).step_by(chunk) {
            let len = chunk.min(l - start);
            let part = embeds.narrow(1, start, len)?;
            if all {
                outs.push(self.decoder.forward(&part, cache)?);
            } else {
                // Only the prompt's last position is wanted: none of this chunk's unless it is the last.
                let rows: &[usize] = if start + len == l { &[len - 1] } else { &[] };
                outs.push(self.decoder.forward_rows(&part, cache, rows)?);
            }
        }
        if all {
            Ok(Tensor::cat(&outs, 1)?)
        } else {
            Ok(outs.pop().expect("at least one chunk"))
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.text.num_hidden_layers)
    }

    /// A cache with room for `positions` positions from the start (see [`KvCache::with_capacity`]).
    pub fn new_cache_with_capacity(&self, positions: usize) -> KvCache {
        KvCache::with_capacity(self.cfg.text.num_hidden_layers, positions)
    }
}
