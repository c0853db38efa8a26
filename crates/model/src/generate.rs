//! The generation loop for one sequence: prefill, then decode with sampling, stop on eos ids, stop strings,
//! `max_new_tokens` or cancellation, streaming text deltas that never split a multi-byte character.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Tensor, D};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::model::AfNext;
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// Stop when one of these is generated (from `generation_config.json`); the id is not part of the text.
    pub eos_token_ids: Vec<u32>,
    /// Stop when the text contains one of these; the text ends before it.
    pub stop_strings: Vec<String>,
    pub sampling: SamplingParams,
    /// Positions prefilled per forward (bounds attention memory for long prompts).
    pub prefill_chunk: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id was generated.
    Eos,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` was reached.
    Length,
    /// The caller cancelled.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "stop",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Turns ids into text incrementally: a delta is released only when it does not end in an incomplete
/// UTF-8 sequence (the tokenizer's byte-level decoder yields U+FFFD for those).
///
/// It holds no tokenizer (the caller passes it to each call), so a server can keep one per request.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly complete text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = decode(tok, &self.ids[self.prefix..self.read])?;
        let now = decode(tok, &self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let delta = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character at the very end is emitted as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = decode(tok, &self.ids[self.prefix..self.read])?;
        let now = decode(tok, &self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }
}

/// Finds stop strings in streamed text, holding back any tail that could still become one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds a delta; returns (text safe to emit, whether a stop string was found).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for k in (1..s.len().min(self.pending.len() + 1)).rev() {
                if self.pending.is_char_boundary(self.pending.len() - k)
                    && s.is_char_boundary(k)
                    && self.pending.ends_with(&s[..k])
                {
                    keep = keep.max(k);
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The held-back tail at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The text side of generation: ids to UTF-8-safe deltas ([`IncrementalDecoder`]) cut at stop strings
/// ([`StopMatcher`]). Shared by [`generate`] and the serving engine so both stream the same text.
#[derive(Debug, Default)]
pub struct TextStream {
    detok: IncrementalDecoder,
    stops: StopMatcher,
}

impl TextStream {
    pub fn new(stop_strings: &[String]) -> Self {
        TextStream {
            detok: IncrementalDecoder::new(),
            stops: StopMatcher::new(stop_strings),
        }
    }

    /// Adds a generated id: the text now safe to emit, and whether a stop string appeared (the text ends
    /// before it).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<(String, bool)> {
        Ok(match self.detok.push(tok, id)? {
            Some(delta) => self.stops.push(&delta),
            None => (String::new(), false),
        })
    }

    /// End of generation: everything still held back, and whether a stop string appeared in it.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<(String, bool)> {
        let (mut out, hit) = self.stops.push(&self.detok.finish(tok)?);
        if !hit {
            out.push_str(&self.stops.finish());
        }
        Ok((out, hit))
    }
}

/// Generates from prompt embeddings (1, l, h). `on_text` receives each text delta with the id that completed
/// it; `cancel` is polled between steps.
pub fn generate(
    model: &AfNext,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    embeds: &Tensor,
    params: &GenerationParams,
    cancel: &AtomicBool,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    params.sampling.validate().map_err(ModelError::Input)?;
    params
        .sampling
        .validate_lengths(params.max_new_tokens)
        .map_err(ModelError::Input)?;
    let vocab = model.cfg.text.vocab_size;
    let mut sampler = Sampler::new(params.sampling, vocab, prompt_ids, &params.eos_token_ids);
    // Room for the prompt and the longest answer at once (saturating: a huge limit only means growth).
    let positions = embeds.dim(1)?.saturating_add(params.max_new_tokens);
    let mut cache =
        model.new_cache_with_capacity(positions.min(model.cfg.text.max_position_embeddings));
    let t0 = Instant::now();
    let last = model.prefill(embeds, &mut cache, params.prefill_chunk, false)?;
    let mut logits = model.decoder.logits(&last)?.squeeze(0)?.squeeze(0)?;
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut stream = TextStream::new(&params.stop_strings);
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut finish = FinishReason::Length;
    while ids.len() < params.max_new_tokens {
        if cancel.load(Ordering::Relaxed) {
            finish = FinishReason::Cancelled;
            break;
        }
        let mut row: Vec<f32> = logits.to_vec1()?;
        let id = sampler.sample(&mut row);
        if params.eos_token_ids.contains(&id) {
            finish = FinishReason::Eos;
            break;
        }
        ids.push(id);
        sampler.observe(id);
        let (out, hit) = stream.push(tokenizer, id)?;
        if !out.is_empty() {
            on_text(&out);
            text.push_str(&out);
        }
        if hit {
            finish = FinishReason::StopString;
            break;
        }
        if ids.len() == params.max_new_tokens {
            break;
        }
        let e = model.decoder.embed(&[id])?;
        let h = model.decoder.forward(&e, &mut cache)?;
        logits = model.decoder.logits(&h)?.squeeze(0)?.squeeze(0)?;
    }
    if finish != FinishReason::StopString {
        let (tail, hit) = stream.finish(tokenizer)?;
        if hit {
            finish = FinishReason::StopString;
        }
        if !tail.is_empty() {
            on_text(&tail);
            text.push_str(&tail);
        }
    }
    Ok(Generation {
        token_ids: ids,
        text,
        finish_reason: finish,
        prefill_time,
        decode_time: t1.elapsed(),
    })
}

/// Greedy ids of the logits rows (…, vocab), for tests and `inspect`.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_and_prefixes_held_back() {
        let mut m = StopMatcher::new(&["</end>".to_string()]);
        assert_eq!(m.push("hello </e"), ("hello ".to_string(), false));
        assert_eq!(m.push("nd> more"), (String::new(), true));
        let mut m = StopMatcher::new(&["xyz".to_string()]);
        assert_eq!(m.push("ab x"), ("ab ".to_string(), false));
        assert_eq!(m.push("q"), ("xq".to_string(), false));
        assert_eq!(m.push("x"), (String::new(), false));
        assert_eq!(m.finish(), "x");
    }
}
