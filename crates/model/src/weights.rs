//! Checkpoint weights: memory-mapped safetensors (one file, or shards listed in
//! `model.safetensors.index.json`), either weight-name layout of spec 1.1, converted to the compute dtype.
//!
//! Names used by the model code are the legacy (saved) names: `audio_tower.*`, `multi_modal_projector.*`,
//! `language_model.model.*`, `language_model.lm_head.weight`. transformers' in-memory names
//! (`model.audio_tower.*`, `model.language_model.*`, `lm_head.weight`) and the original projector names
//! (`layers.0.*` / `layers.2.*`) are accepted too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result};

pub struct Weights {
    st: MmapedSafetensors,
    names: BTreeSet<String>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("tensors", &self.names.len())
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish()
    }
}

/// The safetensors files of a checkpoint directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Config {
                field: "model.safetensors.index.json: weight_map".into(),
                problem: "is missing".into(),
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

impl Weights {
    /// Memory-maps the checkpoint's safetensors; tensors are read (and converted to `dtype`) on demand.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = weight_files(dir)?;
        for f in &files {
            if !f.exists() {
                return Err(ModelError::Io {
                    path: f.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on nobody truncating
        // the checkpoint while it is served (documented in the README).
        let st = unsafe { MmapedSafetensors::multi(&files)? };
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Weights {
            st,
            names,
            dtype,
            device: device.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The stored name of a legacy-layout name, trying every accepted layout.
    fn resolve(&self, name: &str) -> Result<String> {
        let candidates = candidates(name);
        candidates
            .iter()
            .find(|c| self.names.contains(c.as_str()))
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                looked_for: candidates.join(", "),
            })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_ok()
    }

    /// Loads `name` with the expected `shape` in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_dtype(name, shape, self.dtype)
    }

    /// Loads `name` with the expected `shape` in `dtype`.
    pub fn get_dtype(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let stored = self.resolve(name)?;
        let view = self.st.get(&stored)?;
        if view.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: stored,
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        Ok(self.st.load(&stored, &self.device)?.to_dtype(dtype)?)
    }
}

fn candidates(name: &str) -> Vec<String> {
    let mut c = vec![name.to_string()];
    if let Some(rest) = name.strip_prefix("audio_tower.") {
        c.push(format!("model.audio_tower.{rest}"));
    } else if let Some(rest) = name.strip_prefix("multi_modal_projector.") {
        c.push(format!("model.multi_modal_projector.{rest}"));
        let orig = rest
            .replace("linear_1.", "layers.0.")
            .replace("linear_2.", "layers.2.");
        if orig != rest {
            c.push(format!("multi_modal_projector.{orig}"));
            c.push(format!("model.multi_modal_projector.{orig}"));
        }
    } else if let Some(rest) = name.strip_prefix("language_model.model.") {
        c.push(format!("model.language_model.{rest}"));
    } else if name == "language_model.lm_head.weight" {
        c.push("lm_head.weight".into());
    }
    c
}
