//! `afnext generate`: one request through the model in this process, streaming the answer.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use afnext_model::config::GenerationDefaults;
use afnext_model::{AfNext, GenerationParams};
use afnext_prompt::PromptProcessor;
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::input::InputArgs;
use crate::model_args::ModelArgs;
use crate::pipeline;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    /// Most tokens to generate (default: the checkpoint's generation_config.json, else 2048).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[command(flatten)]
    pub sampling: crate::input::SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Threads for the log-mel front end.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let dir = args.model.resolve()?;
    let proc = PromptProcessor::load(&dir)
        .with_context(|| format!("cannot load the processor of {}", dir.display()))?;
    let model = AfNext::load(&dir, args.model.dtype.dtype(), &args.model.device()?)
        .with_context(|| format!("cannot load the model of {}", dir.display()))?;
    let defaults = GenerationDefaults::load(&dir, &model.cfg.text)?;
    let load_time = t0.elapsed();

    let conv = args.input.conversation()?;
    let enc = pipeline::encode(&proc, &model, &conv, args.input.overflow(), args.threads)?;
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens.unwrap_or(defaults.max_new_tokens),
        eos_token_ids: defaults.eos_token_ids.clone(),
        stop_strings: args.sampling.stop.clone(),
        sampling: args.sampling.params(),
        prefill_chunk: 512,
    };
    let stream = !args.json;
    let mut out = std::io::stdout().lock();
    let g = afnext_model::generate(
        &model,
        proc.tokenizer(),
        &enc.prepared.prompt.input_ids,
        &enc.embeds,
        &params,
        &AtomicBool::new(false),
        |delta| {
            if stream {
                let _ = out.write_all(delta.as_bytes());
                let _ = out.flush();
            }
        },
    )?;
    let sr = proc.config().frontend.sampling_rate;
    if args.json {
        let decode_s = g.decode_time.as_secs_f64();
        let v = json!({
            "text": g.text,
            "token_ids": g.token_ids,
            "finish_reason": g.finish_reason.as_str(),
            "usage": {
                "prompt_tokens": enc.prepared.prompt.input_ids.len(),
                "audio_tokens": enc.audio_tokens(),
                "completion_tokens": g.token_ids.len(),
                "audio_seconds": enc.audio_seconds(sr),
            },
            "timings": {
                "load_s": load_time.as_secs_f64(),
                "frontend_s": enc.frontend_time.as_secs_f64(),
                "encode_s": enc.encode_time.as_secs_f64(),
                "prefill_s": g.prefill_time.as_secs_f64(),
                "decode_s": decode_s,
                "decode_tokens_per_s": if decode_s > 0.0 { g.token_ids.len() as f64 / decode_s } else { 0.0 },
            },
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        eprintln!(
            "[{} tokens, finish: {}, prompt {} tokens ({} audio)]",
            g.token_ids.len(),
            g.finish_reason.as_str(),
            enc.prepared.prompt.input_ids.len(),
            enc.audio_tokens()
        );
    }
    Ok(())
}
