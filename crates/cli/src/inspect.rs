//! `afnext inspect`: the processor's outputs (and, once the model lands, every model stage) for one
//! input, written under the tensor names transformers' fixtures use, for parity checks and debugging.

use std::path::PathBuf;

use afnext_audio::Frontend;
use afnext_prompt::{prepare, PromptProcessor};
use anyhow::{bail, Context, Result};
use clap::Args;
use safetensors::tensor::{Dtype, TensorView};

use crate::input::InputArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint directory (config.json, tokenizer.json, processor_config.json, ...).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Threads for the log-mel front end (windows are independent).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let proc = PromptProcessor::load(&args.model)
        .with_context(|| format!("cannot load the processor of {}", args.model.display()))?;
    let conv = args.input.conversation()?;
    let prepared = prepare(&proc, &conv, args.input.overflow())?;
    let frontend = Frontend::new(&proc.config().frontend)?;

    let mut features = Vec::new();
    let mut mask = Vec::new();
    let mut windows = 0;
    for (i, audio) in prepared.audios.iter().enumerate() {
        let f = afnext_prompt::prepare::features(&frontend, audio, args.threads)?;
        windows += f.plan.windows.len();
        features.extend_from_slice(&f.features);
        mask.extend_from_slice(&f.mask);
        let sr = proc.config().frontend.sampling_rate;
        eprintln!(
            "audio {i}: {:.3} s ({} Hz, {} ch){}, {} windows, {} tokens",
            audio.duration_s(sr),
            audio.source_rate_hz,
            audio.source_channels,
            if audio.plan.truncated() {
                " truncated"
            } else {
                ""
            },
            f.plan.windows.len(),
            audio.plan.total_tokens()
        );
    }
    let ids: Vec<i64> = prepared
        .prompt
        .input_ids
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    eprintln!("prompt: {} tokens", ids.len());
    let fcfg = &proc.config().frontend;
    let frames = fcfg.frames_per_window();

    let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
    let ids_bytes = to_bytes(&ids);
    let feat_bytes = to_bytes(&features);
    let mask_bytes = to_bytes(&mask);
    tensors.push((
        "input_ids".into(),
        view(Dtype::I64, vec![1, ids.len()], &ids_bytes)?,
    ));
    if windows > 0 {
        tensors.push((
            "input_features".into(),
            view(Dtype::F32, vec![windows, fcfg.n_mels, frames], &feat_bytes)?,
        ));
        tensors.push((
            "input_features_mask".into(),
            view(Dtype::I32, vec![windows, frames], &mask_bytes)?,
        ));
    }
    safetensors::tensor::serialize_to_file(tensors, None, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn view<'a>(dtype: Dtype, shape: Vec<usize>, bytes: &'a [u8]) -> Result<TensorView<'a>> {
    match TensorView::new(dtype, shape, bytes) {
        Ok(v) => Ok(v),
        Err(e) => bail!("internal tensor layout error: {e:?}"),
    }
}

/// Little-endian bytes of a plain numeric slice (safetensors is little-endian).
fn to_bytes<T: ToLe>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(v));
    for x in v {
        x.put(&mut out);
    }
    out
}

trait ToLe {
    fn put(&self, out: &mut Vec<u8>);
}
impl ToLe for f32 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl ToLe for i32 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl ToLe for i64 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
