//! `afnext inspect`: every stage for one input, written under the tensor names of the reference fixtures,
//! for parity checks and debugging. Processor outputs always; model stages when the checkpoint has weights.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

use afnext_audio::Frontend;
use afnext_model::config::GenerationDefaults;
use afnext_model::weights::weight_files;
use afnext_model::{AfNext, GenerationParams, SamplingParams};
use afnext_prompt::{prepare, PromptProcessor};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::input::InputArgs;
use crate::model_args::ModelArgs;
use crate::pipeline;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    /// Output safetensors file.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Threads for the log-mel front end (windows are independent).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Greedy tokens to record as gen_greedy_ids: all of them, with the end-of-sequence ids of
    /// `generation_config.json` masked until then, as transformers' `generate(max_new_tokens=N,
    /// min_new_tokens=N)` gives them (the fixtures' reference).
    #[arg(long, default_value_t = 16)]
    pub greedy_tokens: usize,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = args.model.resolve()?;
    let proc = PromptProcessor::load(&dir)
        .with_context(|| format!("cannot load the processor of {}", dir.display()))?;
    let conv = args.input.conversation()?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let cpu = Device::Cpu;
    let fcfg = proc.config().frontend.clone();
    let frames = fcfg.frames_per_window();

    let has_weights = weight_files(&dir).is_ok() && dir.join("config.json").exists();
    let (prepared, features, model_stages) = if has_weights {
        let model = AfNext::load(&dir, args.model.dtype.dtype(), &args.model.device()?)?;
        let enc = pipeline::encode(&proc, &model, &conv, args.input.overflow(), args.threads)?;
        let mut stages = HashMap::new();
        if !enc.stages.is_empty() {
            let cat = |f: fn(&afnext_model::AudioStages) -> &Tensor| -> Result<Tensor> {
                Ok(
                    Tensor::cat(&enc.stages.iter().map(f).collect::<Vec<_>>(), 0)?
                        .to_dtype(DType::F32)?,
                )
            };
            stages.insert("encoder_output".to_string(), cat(|s| &s.encoder_output)?);
            stages.insert("post_rote_hidden".to_string(), cat(|s| &s.post_rote)?);
            let rows: Vec<Tensor> = enc
                .stages
                .iter()
                .map(|s| s.embeddings())
                .collect::<Result<_, _>>()?;
            stages.insert(
                "audio_embeds_valid".to_string(),
                Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?,
            );
        }
        let mut cache = model.new_cache();
        let hidden = model.prefill(&enc.embeds, &mut cache, 512, true)?;
        stages.insert("prefill_logits".to_string(), model.decoder.logits(&hidden)?);
        let defaults = GenerationDefaults::load(&dir, &model.cfg.text)?;
        let params = GenerationParams {
            max_new_tokens: args.greedy_tokens,
            eos_token_ids: defaults.eos_token_ids,
            stop_strings: vec![],
            sampling: SamplingParams {
                min_new_tokens: args.greedy_tokens,
                ..SamplingParams::default()
            },
            prefill_chunk: 512,
        };
        let g = afnext_model::generate(
            &model,
            proc.tokenizer(),
            &enc.prepared.prompt.input_ids,
            &enc.embeds,
            &params,
            &AtomicBool::new(false),
            |_| {},
        )?;
        let ids: Vec<i64> = g.token_ids.iter().map(|&i| i64::from(i)).collect();
        stages.insert(
            "gen_greedy_ids".to_string(),
            Tensor::from_vec(ids.clone(), ids.len(), &cpu)?,
        );
        (enc.prepared, enc.features, stages)
    } else {
        eprintln!(
            "{} has no weights: writing the processor outputs only",
            dir.display()
        );
        let prepared = prepare(&proc, &conv, args.input.overflow())?;
        let frontend = Frontend::new(&fcfg)?;
        let features = prepared
            .audios
            .iter()
            .map(|a| afnext_prompt::prepare::features(&frontend, a, args.threads))
            .collect::<Result<Vec<_>, _>>()?;
        (prepared, features, HashMap::new())
    };

    let (mut feats, mut mask, mut windows) = (Vec::new(), Vec::new(), 0);
    for (i, (audio, f)) in prepared.audios.iter().zip(&features).enumerate() {
        windows += f.plan.windows.len();
        feats.extend_from_slice(&f.features);
        mask.extend_from_slice(&f.mask);
        eprintln!(
            "audio {i}: {:.3} s ({} Hz, {} ch){}, {} windows, {} tokens",
            audio.duration_s(fcfg.sampling_rate),
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
    out.insert(
        "input_ids".into(),
        Tensor::from_vec(ids.clone(), (1, ids.len()), &cpu)?,
    );
    if windows > 0 {
        out.insert(
            "input_features".into(),
            Tensor::from_vec(feats, (windows, fcfg.n_mels, frames), &cpu)?,
        );
        out.insert(
            "input_features_mask".into(),
            Tensor::from_vec(mask, (windows, frames), &cpu)?,
        );
    }
    for (k, v) in model_stages {
        out.insert(k, v.to_device(&cpu)?);
    }
    candle_core::safetensors::save(&out, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
