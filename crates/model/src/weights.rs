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
    source: Source,
    dtype: DType,
    device: Device,
}

enum Source {
    /// A checkpoint on disk.
    Files {
        st: MmapedSafetensors,
        names: BTreeSet<String>,
    },
    /// Random weights of any shape asked for (benchmarks at full size without a checkpoint): matrices
    /// N(0, 1/fan_in), norm weights 1, biases 0; the lm_head is absent when the embeddings are tied.
    Random { seed: u64, tied_lm_head: bool },
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tensors = match &self.source {
            Source::Files { names, .. } => names.len().to_string(),
            Source::Random { seed, .. } => format!("random (seed {seed})"),
        };
        f.debug_struct("Weights")
            .field("tensors", &tensors)
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
            source: Source::Files { st, names },
            dtype,
            device: device.clone(),
        })
    }

    /// Random weights for any configuration, created on `device` in `dtype` as they are asked for.
    pub fn random(seed: u64, tied_lm_head: bool, dtype: DType, device: &Device) -> Self {
        Weights {
            source: Source::Random { seed, tied_lm_head },
            dtype,
            device: device.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The stored name of a legacy-layout name, trying every accepted layout.
    fn resolve(&self, name: &str) -> Result<String> {
        let names = match &self.source {
            Source::Files { names, .. } => names,
            Source::Random { tied_lm_head, .. } => {
                if *tied_lm_head && name == "language_model.lm_head.weight" {
                    return Err(ModelError::MissingTensor {
                        name: name.into(),
                        looked_for: "random weights with tied embeddings".into(),
                    });
                }
                return Ok(name.to_string());
            }
        };
        let candidates = candidates(name);
        candidates
            .iter()
            .find(|c| names.contains(c.as_str()))
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
        let st = match &self.source {
            Source::Files { st, .. } => st,
            Source::Random { seed, .. } => {
                return random_tensor(*seed, name, shape, dtype, &self.device)
            }
        };
        checked_view(st, &stored, shape)?;
        Ok(st.load(&stored, &self.device)?.to_dtype(dtype)?)
    }
}

/// Which part of a 2-D weight one tensor-parallel rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Rows `start..start + len` (output features of `[out, in]`, rows of an embedding table).
    Rows(std::ops::Range<usize>),
    /// Columns `start..start + len` (input features).
    Cols(std::ops::Range<usize>),
}

impl Weights {
    /// Loads part of the 2-D tensor `name` of full shape `shape` (or of the 1-D `shape` for [`Part::Rows`]).
    /// From a checkpoint only the part's bytes are read from the memory map, so a rank never touches the
    /// rest of the model; random weights are generated whole and cut (benchmarks only).
    pub fn get_part(&self, name: &str, shape: &[usize], part: &Part) -> Result<Tensor> {
        let (dim, range) = match part {
            Part::Rows(r) => (0, r.clone()),
            Part::Cols(r) => (1, r.clone()),
        };
        let bad = |problem: String| ModelError::Config {
            field: format!("tensor-parallel part of {name}"),
            problem,
        };
        if dim >= shape.len() || range.end > shape[dim] || range.is_empty() {
            return Err(bad(format!(
                "{part:?} is outside the tensor's shape {shape:?}"
            )));
        }
        let stored = self.resolve(name)?;
        let st = match &self.source {
            Source::Files { st, .. } => st,
            Source::Random { seed, .. } => {
                let full = random_tensor(*seed, name, shape, self.dtype, &self.device)?;
                return Ok(full.narrow(dim, range.start, range.len())?.contiguous()?);
            }
        };
        let view = checked_view(st, &stored, shape)?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(bad(format!(
                    "stored as {other:?}; expected f32, bf16 or f16"
                )))
            }
        };
        let es = dtype.size_in_bytes();
        let data = view.data();
        let row_len: usize = shape[1..].iter().product::<usize>() * es;
        let (bytes, out_shape): (Vec<u8>, Vec<usize>) = if dim == 0 {
            let mut s = shape.to_vec();
            s[0] = range.len();
            (data[range.start * row_len..range.end * row_len].to_vec(), s)
        } else {
            let cols = shape[1];
            let mut b = Vec::with_capacity(shape[0] * range.len() * es);
            for r in 0..shape[0] {
                let off = (r * cols + range.start) * es;
                b.extend_from_slice(&data[off..off + range.len() * es]);
            }
            (b, vec![shape[0], range.len()])
        };
        Ok(
            Tensor::from_raw_buffer(&bytes, dtype, &out_shape, &self.device)?
                .to_dtype(self.dtype)?,
        )
    }
}

/// The stored tensor `stored`, which must have `shape` (the error names the tensor and both shapes).
fn checked_view<'a>(
    st: &'a MmapedSafetensors,
    stored: &str,
    shape: &[usize],
) -> Result<safetensors::tensor::TensorView<'a>> {
    let view = st.get(stored)?;
    if view.shape() != shape {
        return Err(ModelError::ShapeMismatch {
            name: stored.to_string(),
            expected: shape.to_vec(),
            got: view.shape().to_vec(),
        });
    }
    Ok(view)
}

fn random_tensor(
    seed: u64,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let is_norm = name.ends_with("norm.weight") || name.ends_with("layernorm.weight");
    if is_norm {
        return Ok(Tensor::ones(shape, dtype, device)?);
    }
    if name.ends_with(".bias") {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    // Per-tensor seed: the same name gives the same tensor whatever the load order.
    let h = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    let std = (1.0 / fan_in as f64).sqrt() as f32;
    let a = std * 3f32.sqrt();
    if device.is_cuda() {
        // Full-size benchmarks on a GPU: 8 billion values are drawn by cuRAND on the device in well under a
        // second (uniform, same variance as the normal). The values differ from the CPU generator's; only
        // their distribution matters to a benchmark.
        device.set_seed(h)?;
        let u = Tensor::rand(-a, a, shape, device)?;
        return Ok(u.to_dtype(dtype)?);
    }
    let n: usize = shape.iter().product();
    // A cheap xorshift uniform in [-sqrt(3) std, sqrt(3) std] (same variance as the normal): generating
    // billions of values for full-size benchmarks must not take minutes.
    let mut x = h | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
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
