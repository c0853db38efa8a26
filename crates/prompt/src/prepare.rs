//! From a conversation to everything the model needs before the encoder: each audio decoded, resampled
//! and cut into windows, and the prompt tokenized with the right number of `<sound>` tokens per audio.

use afnext_audio::{
    decode_bytes, decode_file, plan_windows, AudioFeatures, Frontend, Overflow, WindowPlan,
};

use crate::conversation::{AudioSource, Conversation};
use crate::error::{PromptError, Result};
use crate::processor::{EncodedPrompt, PromptProcessor};

/// One audio part, ready for the front end.
#[derive(Debug, Clone)]
pub struct PreparedAudio {
    /// Mono samples at the model rate (only the first `plan.used_samples` are used).
    pub samples: Vec<f32>,
    pub plan: WindowPlan,
    /// Rate and channel count of the file as decoded, for reporting.
    pub source_rate_hz: u32,
    pub source_channels: usize,
}

impl PreparedAudio {
    /// Seconds of audio the model sees.
    pub fn duration_s(&self, sampling_rate: u32) -> f64 {
        self.plan.used_samples as f64 / f64::from(sampling_rate)
    }
}

#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub prompt: EncodedPrompt,
    pub audios: Vec<PreparedAudio>,
}

/// Decodes and plans one audio. `location` names it in errors ("audio 0").
pub fn prepare_audio(
    proc: &PromptProcessor,
    src: &AudioSource,
    overflow: Overflow,
    location: &str,
) -> Result<PreparedAudio> {
    let cfg = &proc.config().frontend;
    let wrap = |source| PromptError::Audio {
        location: location.to_string(),
        source,
    };
    let decoded = match src {
        AudioSource::Path(p) => decode_file(p),
        AudioSource::Bytes { data, format_hint } => decode_bytes(data, format_hint.as_deref()),
    }
    .map_err(wrap)?;
    let (rate, channels) = (decoded.sample_rate, decoded.channels);
    // Planned on the resampled length before resampling: audio over the limit is refused at once, and
    // truncated audio is resampled only as far as its windows reach. A corrupt rate is named first.
    afnext_audio::check_rates(rate, cfg.sampling_rate).map_err(wrap)?;
    let n = afnext_audio::resampled_len(decoded.samples.len(), rate, cfg.sampling_rate);
    let plan = plan_windows(n, cfg, overflow).map_err(wrap)?;
    let samples =
        afnext_audio::load_mono(decoded, cfg.sampling_rate, plan.used_samples).map_err(wrap)?;
    Ok(PreparedAudio {
        samples,
        plan,
        source_rate_hz: rate,
        source_channels: channels,
    })
}

/// Loads every audio of `conv` and tokenizes the prompt.
pub fn prepare(
    proc: &PromptProcessor,
    conv: &Conversation,
    overflow: Overflow,
) -> Result<PreparedPrompt> {
    conv.validate()?;
    let audios = conv
        .audios()
        .into_iter()
        .enumerate()
        .map(|(i, src)| prepare_audio(proc, src, overflow, &describe(i, src)))
        .collect::<Result<Vec<_>>>()?;
    let counts: Vec<usize> = audios.iter().map(|a| a.plan.total_tokens()).collect();
    let prompt = proc.encode(conv, &counts)?;
    Ok(PreparedPrompt { prompt, audios })
}

/// Log-mel features of one prepared audio.
pub fn features(
    frontend: &Frontend,
    audio: &PreparedAudio,
    threads: usize,
) -> Result<AudioFeatures> {
    frontend
        .features(&audio.samples, &audio.plan, threads)
        .map_err(|source| PromptError::Audio {
            location: "features".into(),
            source,
        })
}

/// How errors name the `i`-th audio part: `audio 0 (path)` or `audio 0 (1234 bytes)`.
pub fn describe(i: usize, src: &AudioSource) -> String {
    match src {
        AudioSource::Path(p) => format!("audio {i} ({})", p.display()),
        AudioSource::Bytes { data, .. } => format!("audio {i} ({} bytes)", data.len()),
    }
}
