//! `config.json` of a `musicflamingo` checkpoint (spec 1.3), read in both spellings: `rope_parameters`
//! dicts (transformers 5) or flat `rope_theta` / `rope_scaling` keys (older writers). The top-level
//! `head_dim` and `max_position_embeddings` are overwritten by transformers at load time and are ignored.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// The AF-Whisper audio encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub num_mel_bins: usize,
    /// Positions after conv2 (1500); the encoder output has half as many rows (750).
    pub max_source_positions: usize,
    pub layer_norm_eps: f64,
}

/// The Qwen2 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Rotary time embedding of the audio path (spec 6).
#[derive(Debug, Clone, PartialEq)]
pub struct RoteConfig {
    pub theta: f64,
    pub partial_rotary_factor: f64,
    /// Seconds per mel frame (0.01); one encoder output row is 4 frames.
    pub audio_frame_step: f64,
}

impl RoteConfig {
    /// `int(D * partial_rotary_factor)`: the per-axis rotary dim transformers computes.
    pub fn dim(&self, audio_hidden: usize) -> usize {
        (audio_hidden as f64 * self.partial_rotary_factor) as usize
    }
    /// Frequencies per axis: `arange(0, dim, 2)`, i.e. `ceil(dim / 2)` (odd dims included).
    pub fn n_freqs(&self, audio_hidden: usize) -> usize {
        self.dim(audio_hidden).div_ceil(2)
    }
    /// Rotated width of the hidden state: two axes, each frequency in two adjacent slots.
    pub fn rotated_width(&self, audio_hidden: usize) -> usize {
        4 * self.n_freqs(audio_hidden)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AfNextConfig {
    pub audio: AudioConfig,
    pub text: TextConfig,
    pub rote: RoteConfig,
    pub audio_token_id: u32,
    pub audio_bos_token_id: u32,
    pub audio_eos_token_id: u32,
    pub projector_bias: bool,
}

impl AfNextConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let a = v
            .get("audio_config")
            .ok_or_else(|| missing("audio_config"))?;
        let t = v.get("text_config").ok_or_else(|| missing("text_config"))?;
        let act = v
            .get("projector_hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(bad(
                "projector_hidden_act",
                format!("is {act:?}; only \"gelu\" (erf) is implemented"),
            ));
        }
        let audio_act = a
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if audio_act != "gelu" {
            return Err(bad(
                "audio_config.activation_function",
                format!("is {audio_act:?}; only \"gelu\" is implemented"),
            ));
        }
        // `audio_config.scale_embedding` is read and ignored, as transformers 5.23 does: its encoder sets
        // `embed_scale` from it but never applies it (AF-Next has false).
        let text_act = t
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if text_act != "silu" {
            return Err(bad(
                "text_config.hidden_act",
                format!("is {text_act:?}; only \"silu\" (Qwen2's) is implemented"),
            ));
        }
        let audio = AudioConfig {
            hidden_size: usize_of(a, "audio_config.hidden_size", Some(1280))?,
            num_hidden_layers: usize_of(a, "audio_config.num_hidden_layers", Some(32))?,
            num_attention_heads: usize_of(a, "audio_config.num_attention_heads", Some(20))?,
            intermediate_size: usize_of(a, "audio_config.intermediate_size", Some(5120))?,
            num_mel_bins: usize_of(a, "audio_config.num_mel_bins", Some(128))?,
            max_source_positions: usize_of(a, "audio_config.max_source_positions", Some(1500))?,
            layer_norm_eps: 1e-5,
        };
        if !audio.hidden_size.is_multiple_of(audio.num_attention_heads) {
            return Err(bad(
                "audio_config.num_attention_heads",
                "must divide hidden_size".into(),
            ));
        }
        if !audio.max_source_positions.is_multiple_of(2) {
            return Err(bad(
                "audio_config.max_source_positions",
                "must be even (avg-pool by 2)".into(),
            ));
        }
        let num_attention_heads = usize_of(t, "text_config.num_attention_heads", None)?;
        let hidden_size = usize_of(t, "text_config.hidden_size", None)?;
        let num_key_value_heads = usize_of(
            t,
            "text_config.num_key_value_heads",
            Some(num_attention_heads),
        )?;
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(bad(
                "text_config.num_key_value_heads",
                "must divide num_attention_heads".into(),
            ));
        }
        let head_dim = match t.get("head_dim") {
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad("text_config.head_dim", "must be an integer".into()))?,
            _ => hidden_size / num_attention_heads,
        };
        if let Some(n) = sliding_layers(t) {
            return Err(bad(
                "text_config.use_sliding_window",
                format!(
                    "true with {n} sliding-window layers is not supported (AF-Next uses full attention)"
                ),
            ));
        }
        let rope = rope_of(t);
        if let Some(kind) = rope.get("rope_type").and_then(Value::as_str) {
            if kind != "default" {
                return Err(bad(
                    "text_config.rope_parameters.rope_type",
                    format!("{kind:?} is not supported; only \"default\""),
                ));
            }
        }
        let text = TextConfig {
            vocab_size: usize_of(t, "text_config.vocab_size", None)?,
            hidden_size,
            intermediate_size: usize_of(t, "text_config.intermediate_size", None)?,
            num_hidden_layers: usize_of(t, "text_config.num_hidden_layers", None)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: t
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: rope
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            max_position_embeddings: usize_of(
                t,
                "text_config.max_position_embeddings",
                Some(131_072),
            )?,
            tie_word_embeddings: t
                .get("tie_word_embeddings")
                .or_else(|| v.get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            eos_token_id: ids_of(t.get("eos_token_id")),
            pad_token_id: t
                .get("pad_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
        };
        // Top level: the RoTE parameters (theta 1200, factor 0.2 when absent), never the decoder's.
        let top_rope = rope_of(v);
        let rote = RoteConfig {
            theta: top_rope
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(1200.0),
            partial_rotary_factor: top_rope
                .get("partial_rotary_factor")
                .and_then(Value::as_f64)
                .unwrap_or(0.2),
            audio_frame_step: v
                .get("audio_frame_step")
                .and_then(Value::as_f64)
                .unwrap_or(0.01),
        };
        if rote.rotated_width(audio.hidden_size) > audio.hidden_size {
            return Err(bad(
                "rope_parameters.partial_rotary_factor",
                "rotates more dims than the audio hidden size".into(),
            ));
        }
        let id = |key: &str, default: u32| -> Result<u32> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|x| x as u32)
                    .ok_or_else(|| bad(key, "must be a token id".into())),
            }
        };
        Ok(AfNextConfig {
            audio,
            text,
            rote,
            audio_token_id: id("audio_token_id", 151_669)?,
            audio_bos_token_id: id("audio_bos_token_id", 151_670)?,
            audio_eos_token_id: id("audio_eos_token_id", 151_671)?,
            projector_bias: v
                .get("projector_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }
}

/// How many decoder layers attend through a sliding window, as Qwen2's config derives them, when any does:
/// the window is `sliding_window` (default 4096) only with `use_sliding_window`, and a layer slides when
/// `layer_types` says so or, without that list, from `max_window_layers` (default 28) on. With no window every
/// layer attends to everything, whatever `layer_types` says.
fn sliding_layers(t: &Value) -> Option<usize> {
    let on = t.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
    let window = match t.get("sliding_window") {
        Some(Value::Null) => None,
        Some(w) => w.as_u64(),
        None => Some(4096),
    };
    if !on || window.is_none() {
        return None;
    }
    let n = match t.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .filter(|l| l.as_str() == Some("sliding_attention"))
            .count(),
        None => {
            let layers = t
                .get("num_hidden_layers")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let from = t
                .get("max_window_layers")
                .and_then(Value::as_u64)
                .unwrap_or(28);
            layers.saturating_sub(from) as usize
        }
    };
    (n > 0).then_some(n)
}

/// `rope_parameters` (transformers 5), or the flat `rope_theta` / `partial_rotary_factor` keys folded into one map.
fn rope_of(v: &Value) -> serde_json::Map<String, Value> {
    let mut m = match v.get("rope_parameters") {
        Some(Value::Object(o)) => o.clone(),
        _ => serde_json::Map::new(),
    };
    for key in ["rope_theta", "partial_rotary_factor"] {
        if !m.contains_key(key) {
            if let Some(x) = v.get(key) {
                m.insert(key.into(), x.clone());
            }
        }
    }
    if let Some(Value::Object(s)) = v.get("rope_scaling") {
        if let Some(t) = s.get("rope_type").or_else(|| s.get("type")) {
            m.entry("rope_type").or_insert(t.clone());
        }
    }
    m
}

/// `eos_token_id` as an int or a list.
pub fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn usize_of(obj: &Value, field: &str, default: Option<usize>) -> Result<usize> {
    let key = field.rsplit('.').next().unwrap_or(field);
    match obj.get(key) {
        None | Some(Value::Null) => default.ok_or_else(|| missing(field)),
        Some(x) => match x.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(bad(field, format!("must be a positive integer, got {x}"))),
        },
    }
}

fn missing(field: &str) -> ModelError {
    ModelError::Config {
        field: field.into(),
        problem: "is missing".into(),
    }
}

fn bad(field: &str, problem: String) -> ModelError {
    ModelError::Config {
        field: field.into(),
        problem,
    }
}

/// `generation_config.json`: the stop ids and default length (missing file: the text config's eos id, 2048).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub max_new_tokens: usize,
}

impl GenerationDefaults {
    pub fn load(dir: &Path, text: &TextConfig) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let v: Value = match std::fs::read_to_string(&path) {
            Ok(t) => {
                serde_json::from_str(&t).map_err(|source| ModelError::Json { path, source })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(source) => return Err(ModelError::Io { path, source }),
        };
        let mut eos = ids_of(v.get("eos_token_id"));
        if eos.is_empty() {
            eos = text.eos_token_id.clone();
        }
        Ok(GenerationDefaults {
            eos_token_ids: eos,
            max_new_tokens: v
                .get("max_new_tokens")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .unwrap_or(2048),
        })
    }
}
