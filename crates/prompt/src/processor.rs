//! Conversation -> `input_ids`, as `MusicFlamingoProcessor.apply_chat_template(..., tokenize=True)` does:
//! render the chat template, expand each `<sound>` into `<|sound_bos|> <sound> x N <|sound_eos|>`, tokenize.
//!
//! The expansion is done on token ids: the three markers are added special tokens, which the tokenizer
//! splits out whole before BPE, so the text between them tokenizes the same either way; splicing ids
//! avoids building and scanning a 45 000-marker string for a 30-minute recording.

use std::ops::Range;
use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::{read_json_opt, ProcessorConfig};
use crate::conversation::Conversation;
use crate::error::{PromptError, Result};
use crate::template::{ChatTemplate, SpecialTokens};

/// A tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    /// The rendered template text before expansion (one marker per audio).
    pub text: String,
    /// For each audio, the positions of its `<sound>` tokens in `input_ids`.
    pub audio_spans: Vec<Range<usize>>,
}

/// Tokenizer, chat template and processor settings of one checkpoint.
#[derive(Debug)]
pub struct PromptProcessor {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    config: ProcessorConfig,
    special: SpecialTokens,
    audio_id: u32,
    audio_bos_id: u32,
    audio_eos_id: u32,
}

impl PromptProcessor {
    /// Loads `tokenizer.json`, `tokenizer_config.json`, the chat template and `processor_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| PromptError::Tokenizer {
            path: tok_path.clone(),
            detail: e.to_string(),
        })?;
        let config = ProcessorConfig::load(dir)?;
        let template = ChatTemplate::load(dir)?;
        let mut special = SpecialTokens::new();
        if let Some(tc) = read_json_opt(&dir.join("tokenizer_config.json"))? {
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                let s = match tc.get(key) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Object(o)) => {
                        o.get("content").and_then(Value::as_str).map(str::to_string)
                    }
                    _ => None,
                };
                if let Some(s) = s {
                    special.push((key.to_string(), s));
                }
            }
        }
        let id = |token: &str, role: &'static str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| PromptError::MissingToken {
                    token: token.to_string(),
                    role,
                })
        };
        Ok(PromptProcessor {
            audio_id: id(&config.audio_token, "audio_token")?,
            audio_bos_id: id(&config.audio_bos_token, "audio_bos_token")?,
            audio_eos_id: id(&config.audio_eos_token, "audio_eos_token")?,
            tokenizer,
            template,
            config,
            special,
        })
    }

    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
    /// Ids of `<sound>`, `<|sound_bos|>`, `<|sound_eos|>`.
    pub fn audio_token_ids(&self) -> (u32, u32, u32) {
        (self.audio_id, self.audio_bos_id, self.audio_eos_id)
    }

    /// The chat template rendered with the generation prompt (`<|im_start|>assistant\n` at the end).
    pub fn render(&self, conv: &Conversation) -> Result<String> {
        conv.validate()?;
        // User text must not smuggle in audio markers: they would misalign audio embeddings and prompt.
        for (loc, text) in conv.texts() {
            for marker in [
                &self.config.audio_token,
                &self.config.audio_bos_token,
                &self.config.audio_eos_token,
            ] {
                if text.contains(marker.as_str()) {
                    return Err(PromptError::conv(
                        loc,
                        format!("text contains the reserved audio marker {marker:?}"),
                    ));
                }
            }
        }
        self.template
            .render(&conv.template_value(), true, &self.special)
    }

    /// Renders and tokenizes `conv`; `audio_tokens[i]` is the token count of the i-th audio part
    /// (from [`afnext_audio::WindowPlan::total_tokens`]).
    pub fn encode(&self, conv: &Conversation, audio_tokens: &[usize]) -> Result<EncodedPrompt> {
        let audios = conv.audios().len();
        if audios != audio_tokens.len() {
            return Err(PromptError::conv(
                "conversation",
                format!(
                    "has {audios} audio parts but {} audio token counts were given",
                    audio_tokens.len()
                ),
            ));
        }
        let text = self.render(conv)?;
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| PromptError::Encode {
                detail: e.to_string(),
            })?;
        let markers = enc
            .get_ids()
            .iter()
            .filter(|&&id| id == self.audio_id)
            .count();
        if markers != audios {
            return Err(PromptError::MarkerCount {
                marker: self.config.audio_token.clone(),
                markers,
                audios,
            });
        }
        let total: usize = audio_tokens.iter().map(|n| n + 2).sum();
        let mut input_ids = Vec::with_capacity(enc.get_ids().len() + total);
        let mut audio_spans = Vec::with_capacity(audios);
        let mut next = audio_tokens.iter();
        for &id in enc.get_ids() {
            if id == self.audio_id {
                let n = *next
                    .next()
                    .expect("marker count checked above; this is a bug");
                input_ids.push(self.audio_bos_id);
                let start = input_ids.len();
                input_ids.resize(start + n, self.audio_id);
                audio_spans.push(start..start + n);
                input_ids.push(self.audio_eos_id);
            } else {
                input_ids.push(id);
            }
        }
        Ok(EncodedPrompt {
            input_ids,
            text,
            audio_spans,
        })
    }
}
