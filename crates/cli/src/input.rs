//! The request flags shared by `inspect` and (later) `generate`: a single audio + prompt, or a
//! conversation file.

use std::path::PathBuf;

use afnext_audio::Overflow;
use afnext_prompt::{AudioSource, Conversation};
use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct InputArgs {
    /// Audio file (wav, flac, mp3, ogg/vorbis; any rate and channel count).
    #[arg(long, conflicts_with = "conversation")]
    pub audio: Option<PathBuf>,
    /// The user's text, placed after the audio.
    #[arg(long, conflicts_with = "conversation")]
    pub prompt: Option<String>,
    /// A conversation in the Hugging Face message format (JSON); relative audio paths are resolved against
    /// the file's directory.
    #[arg(long)]
    pub conversation: Option<PathBuf>,
    /// A system message (replaces the checkpoint template's default system prompt).
    #[arg(long)]
    pub system: Option<String>,
    /// Keep the first `max_audio_len` seconds of longer audio instead of refusing it.
    #[arg(long)]
    pub truncate: bool,
}

impl InputArgs {
    pub fn overflow(&self) -> Overflow {
        if self.truncate {
            Overflow::Truncate
        } else {
            Overflow::Reject
        }
    }

    pub fn conversation(&self) -> Result<Conversation> {
        if let Some(path) = &self.conversation {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            let mut conv = Conversation::from_json(&value, path.parent())?;
            if let Some(system) = &self.system {
                if conv.messages.first().map(|m| m.role) == Some(afnext_prompt::Role::System) {
                    bail!("--system was given but the conversation already starts with a system message");
                }
                conv.messages.insert(
                    0,
                    afnext_prompt::Message {
                        role: afnext_prompt::Role::System,
                        content: Some(afnext_prompt::Content::Text(system.clone())),
                    },
                );
            }
            return Ok(conv);
        }
        let Some(prompt) = &self.prompt else {
            bail!("give --prompt (with an optional --audio), or --conversation");
        };
        Ok(Conversation::single_turn(
            self.system.as_deref(),
            self.audio.clone().map(AudioSource::Path),
            prompt,
        ))
    }
}

/// Sampling flags (`generate` and `ask`).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// transformers' repetition penalty over prompt and output ids (1 = off; AF-Next's card uses 1.2).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No end-of-sequence token before this many tokens (transformers' min_new_tokens; 0 = off).
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Stop when the text contains this string (repeatable); the text ends before it.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> afnext_model::SamplingParams {
        afnext_model::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            min_new_tokens: self.min_new_tokens,
        }
    }
}
