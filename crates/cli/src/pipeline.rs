//! One request through the single-process model path, shared by `generate` and `inspect`: processor, front
//! end, audio path per audio (window indices restart at 0 for each audio), prompt embeddings.

use std::time::{Duration, Instant};

use afnext_audio::{AudioFeatures, Frontend, Overflow};
use afnext_model::{AfNext, AudioStages};
use afnext_prompt::{prepare, Conversation, PreparedPrompt, PromptProcessor};
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Windows per encoder forward: bounds the (b, heads, 1500, 1500) attention scores of a long recording.
pub const ENCODER_BATCH: usize = 4;

pub struct Encoded {
    pub prepared: PreparedPrompt,
    /// One per audio part.
    pub stages: Vec<AudioStages>,
    /// (1, l, h).
    pub embeds: Tensor,
    /// Log-mel features of each audio part (what the encoder was given).
    pub features: Vec<AudioFeatures>,
    pub frontend_time: Duration,
    pub encode_time: Duration,
}

impl Encoded {
    pub fn audio_seconds(&self, sampling_rate: u32) -> f64 {
        self.prepared
            .audios
            .iter()
            .map(|a| a.duration_s(sampling_rate))
            .sum()
    }
    pub fn audio_tokens(&self) -> usize {
        self.prepared
            .audios
            .iter()
            .map(|a| a.plan.total_tokens())
            .sum()
    }
}

pub fn encode(
    proc: &PromptProcessor,
    model: &AfNext,
    conv: &Conversation,
    overflow: Overflow,
    threads: usize,
) -> Result<Encoded> {
    let t0 = Instant::now();
    let prepared = prepare(proc, conv, overflow)?;
    let frontend = Frontend::new(&proc.config().frontend)?;
    let mut feats = Vec::new();
    for audio in &prepared.audios {
        feats.push(afnext_prompt::prepare::features(&frontend, audio, threads)?);
    }
    let frontend_time = t0.elapsed();
    let t1 = Instant::now();
    let mut stages = Vec::new();
    let mut rows = Vec::new();
    for f in &feats {
        let mut parts = Vec::new();
        for chunk in f.plan.windows.chunks(ENCODER_BATCH) {
            let first = chunk[0].index;
            let wl = f.n_mels * f.frames;
            let data = f.features[first * wl..(first + chunk.len()) * wl].to_vec();
            let x = Tensor::from_vec(data, (chunk.len(), f.n_mels, f.frames), &Device::Cpu)?;
            let valid: Vec<usize> = chunk.iter().map(|w| w.valid_frames).collect();
            let idx: Vec<usize> = chunk.iter().map(|w| w.index).collect();
            parts.push(model.encode_windows(&x, &valid, &idx)?);
        }
        let s = concat_stages(parts)?;
        rows.push(s.embeddings()?);
        stages.push(s);
    }
    let audio = if rows.is_empty() {
        None
    } else {
        Some(Tensor::cat(&rows, 0)?)
    };
    let embeds = model.embed_prompt(&prepared.prompt.input_ids, audio.as_ref())?;
    Ok(Encoded {
        prepared,
        stages,
        embeds,
        features: feats,
        frontend_time,
        encode_time: t1.elapsed(),
    })
}

fn concat_stages(parts: Vec<AudioStages>) -> Result<AudioStages> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let cat = |f: fn(&AudioStages) -> &Tensor| -> Result<Tensor> {
        Ok(Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)?)
    };
    Ok(AudioStages {
        encoder_output: cat(|s| &s.encoder_output)?,
        post_rote: cat(|s| &s.post_rote)?,
        projected: cat(|s| &s.projected)?,
        tokens: parts
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect(),
    })
}
