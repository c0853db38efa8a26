//! `processor_config.json` (and the older `preprocessor_config.json`): the front-end settings and the
//! audio marker tokens. Every size comes from the checkpoint; defaults are the class defaults of
//! `WhisperFeatureExtractor` / `MusicFlamingoProcessor` (spec section 0), except `max_audio_len`,
//! whose class default (1200) is not AF-Next's: a missing value is an error rather than a wrong guess.

use std::path::{Path, PathBuf};

use afnext_audio::FrontendConfig;
use serde_json::Value;

use crate::error::{PromptError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub frontend: FrontendConfig,
    /// The placeholder the template emits once per audio (`<sound>`).
    pub audio_token: String,
    pub audio_bos_token: String,
    pub audio_eos_token: String,
}

impl ProcessorConfig {
    /// Reads `processor_config.json` (feature extractor nested under `feature_extractor`), falling back
    /// to `preprocessor_config.json` for the feature-extractor keys.
    pub fn load(dir: &Path) -> Result<Self> {
        let proc_path = dir.join("processor_config.json");
        let proc = read_json_opt(&proc_path)?;
        let pre_path = dir.join("preprocessor_config.json");
        let (fe, fe_path) = match proc.as_ref().and_then(|p| p.get("feature_extractor")) {
            Some(fe) => (Some(fe.clone()), proc_path.clone()),
            None => (read_json_opt(&pre_path)?, pre_path.clone()),
        };
        let top = proc.clone().unwrap_or(Value::Null);
        if proc.is_none() && fe.is_none() {
            return Err(PromptError::ConfigField {
                path: proc_path,
                field: "(file)".into(),
                problem: "is missing: a checkpoint needs processor_config.json (or preprocessor_config.json)".into(),
            });
        }
        let fe = fe.unwrap_or(Value::Null);
        let d = FrontendConfig::default();
        let max_audio_len = match top.get("max_audio_len").or_else(|| fe.get("max_audio_len")) {
            Some(v) => num(&proc_path, "max_audio_len", v)?,
            None => {
                return Err(PromptError::ConfigField {
                    path: proc_path,
                    field: "max_audio_len".into(),
                    problem: "is missing (AF-Next saves 1800; the class default 1200 would silently cut audio)".into(),
                })
            }
        };
        let frontend = FrontendConfig {
            sampling_rate: get_num(&fe_path, &fe, "sampling_rate", f64::from(d.sampling_rate))?
                as u32,
            n_fft: get_num(&fe_path, &fe, "n_fft", d.n_fft as f64)? as usize,
            hop_length: get_num(&fe_path, &fe, "hop_length", d.hop_length as f64)? as usize,
            n_mels: get_num(&fe_path, &fe, "feature_size", d.n_mels as f64)? as usize,
            chunk_length_s: get_num(&fe_path, &fe, "chunk_length", f64::from(d.chunk_length_s))?
                as u32,
            max_audio_len_s: max_audio_len as u32,
        };
        frontend.validate().map_err(PromptError::Frontend)?;
        let s = |key: &str, default: &str| -> Result<String> {
            match top.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(PromptError::ConfigField {
                    path: proc_path.clone(),
                    field: key.into(),
                    problem: "must be a string".into(),
                }),
            }
        };
        Ok(ProcessorConfig {
            frontend,
            audio_token: s("audio_token", "<sound>")?,
            audio_bos_token: s("audio_bos_token", "<|sound_bos|>")?,
            audio_eos_token: s("audio_eos_token", "<|sound_eos|>")?,
        })
    }
}

pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| PromptError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PromptError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn num(path: &Path, field: &str, v: &Value) -> Result<f64> {
    match v.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 && x.fract() == 0.0 => Ok(x),
        _ => Err(PromptError::ConfigField {
            path: PathBuf::from(path),
            field: field.into(),
            problem: format!("must be a positive integer, got {v}"),
        }),
    }
}

fn get_num(path: &Path, obj: &Value, field: &str, default: f64) -> Result<f64> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => num(path, field, v),
    }
}
