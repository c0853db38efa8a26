//! Flags that choose and place the model: `--model` (directory or hub id), `--dtype`, `--device`, and the
//! Hugging Face environment (`HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`), read here and nowhere else.

use std::path::PathBuf;

use afnext_model::hub::{self, HubConfig};
use afnext_model::weights::Weights;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint directory, or a Hugging Face repo id such as nvidia/audio-flamingo-next-hf.
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Compute dtype (weights are converted at load).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, env = "HF_HOME", hide_env_values = true)]
    pub hf_home: Option<PathBuf>,
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
    /// Only use the local hub cache.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_flag, default_value = "0")]
    pub hf_hub_offline: bool,
    /// Benchmarks only: random weights from this seed for the checkpoint's config.json (tokenizer and
    /// config are still read from --model; no safetensors are needed). Answers are meaningless.
    #[arg(long, value_name = "SEED")]
    pub random_weights: Option<u64>,
}

/// HF-style boolean environment values: 1/true/yes/on.
fn parse_flag(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected 1/0/true/false, got {other:?}")),
    }
}

impl ModelArgs {
    pub fn hub(&self) -> HubConfig {
        HubConfig {
            cache_dir: self.hf_home.as_ref().map(|h| h.join("hub")),
            token: self.hf_token.clone().filter(|t| !t.is_empty()),
            offline: self.hf_hub_offline,
            revision: self.revision.clone(),
            progress: true,
            weights: true,
        }
    }

    /// The checkpoint directory (downloading it when --model is a repo id).
    pub fn resolve(&self) -> Result<PathBuf> {
        Ok(hub::resolve(&self.model, &self.hub())?)
    }

    /// The checkpoint directory with only its tokenizer and configs (the router loads no weights).
    pub fn resolve_without_weights(&self) -> Result<PathBuf> {
        let cfg = HubConfig {
            weights: false,
            ..self.hub()
        };
        Ok(hub::resolve(&self.model, &cfg)?)
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    /// The weights of the checkpoint in `dir` (memory-mapped), or random ones with `--random-weights`.
    pub fn weights(&self, dir: &std::path::Path) -> Result<(afnext_model::AfNextConfig, Weights)> {
        self.weights_on(dir, &self.device()?)
    }

    /// As [`Self::weights`], on a device the caller already opened (a CUDA device is one stream: the NCCL
    /// group of a decoder rank must run on the model's own).
    pub fn weights_on(
        &self,
        dir: &std::path::Path,
        device: &Device,
    ) -> Result<(afnext_model::AfNextConfig, Weights)> {
        let cfg = afnext_model::AfNextConfig::load(dir)?;
        let (dtype, device) = (self.dtype.dtype(), device.clone());
        let w = match self.random_weights {
            Some(seed) => Weights::random(seed, cfg.text.tie_word_embeddings, dtype, &device),
            None => Weights::load(dir, dtype, &device)
                .with_context(|| format!("loading the weights of {}", dir.display()))?,
        };
        Ok((cfg, w))
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    Ok(afnext_model::device::open(s)?)
}
