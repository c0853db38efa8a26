//! One engine step of the decoder in isolation: a Qwen2.5-0.5B-shaped random decoder (the load bench's)
//! over the paged KV cache, `B` sequences of a 40-token prompt each (`AFNEXT_PROBE_PROMPT`), then decode
//! steps of `B` rows (one per sequence), timed without the server. A diagnostic for batching work (the load
//! bench over gRPC is `cargo bench -p afnext-server --bench load`).
//! Run: `RAYON_NUM_THREADS=2 cargo run --release -p afnext-model --example step_probe [bf16|f32] [B,...]`.
//! Prints per batch size the median step time split into layers (`forward_paged`) and lm_head.
//! `... step_probe [bf16|f32] prefill [N,...]` times instead the prefill of one N-token prompt in one step
//! (the engine's chunk for prompts within its token budget), the median of `AFNEXT_PROBE_STEPS` runs; its last
//! layer computes the last row only, as the engine's does (`AFNEXT_PROBE_ALL_ROWS=1`: every row).
//! `... step_probe [bf16|f32] contiguous` times batch-1 greedy steps over the contiguous cache instead (`KvCache`:
//! what `afnext generate` and the model bench's decode row run; `AFNEXT_PROBE_PROMPT=100` is the bench's
//! prompt).

use afnext_model::generate::argmax_last;
use afnext_model::paged::{PagedKv, SeqStep};
use afnext_model::tp::StepPlan;
use afnext_model::{AfNext, AfNextConfig};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::time::Instant;

const BLOCK: usize = 16;

#[path = "../../../tools/bench/tiny_a_qwen.rs"]
mod tiny_a_qwen;

fn config() -> AfNextConfig {
    tiny_a_qwen::config(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ckpt/tiny-a"),
    )
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dtype = match args.next().as_deref() {
        Some("f32") => DType::F32,
        _ => DType::BF16,
    };
    // AFNEXT_PROBE_STEPS: decode steps per batch size (more for profiling).
    let steps = env_usize("AFNEXT_PROBE_STEPS", 12);
    let mut list = args.next();
    let prefill = list.as_deref() == Some("prefill");
    let contiguous = list.as_deref() == Some("contiguous");
    if prefill || contiguous {
        list = args.next();
    }
    let batches: Vec<usize> = list
        .map(|s| s.split(',').map(|b| b.parse().unwrap()).collect())
        .unwrap_or(if prefill { vec![1000] } else { vec![1, 4, 16] });
    // As the CLI does (`--return-freed-memory` turns it off there); AFNEXT_PROBE_MALLOC=default skips it.
    if std::env::var("AFNEXT_PROBE_MALLOC").as_deref() != Ok("default") {
        afnext_model::alloc::retain_freed_memory();
    }
    let model = AfNext::random(config(), 0, dtype, &Device::Cpu).unwrap();
    if prefill {
        return prefill_rows(&model, dtype, &batches, steps.min(5));
    }
    // AFNEXT_PROBE_PROMPT: each sequence's prompt length before the decode steps (default 40).
    let prompt = env_usize("AFNEXT_PROBE_PROMPT", 40).max(1);
    if contiguous {
        return contiguous_steps(&model, dtype, prompt, steps);
    }
    let d = &model.decoder;
    let v = d.config().vocab_size as u32;
    let max_b = *batches.iter().max().unwrap();
    let per_seq = (prompt + steps + 2).div_ceil(BLOCK);
    let kv = PagedKv::new(d.config(), max_b * per_seq, BLOCK, dtype, &Device::Cpu).unwrap();
    println!("decode step, {dtype:?}, {prompt}-token prompts, median of {steps} steps");
    println!("| rows | step (ms) | layers (ms) | lm_head (ms) | tok/s |");
    println!("|---:|---:|---:|---:|---:|");
    for &b in &batches {
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        // Prefill every sequence in one step.
        let plan = StepPlan {
            seqs: tables
                .iter()
                .map(|t| SeqStep {
                    start: 0,
                    len: prompt,
                    block_table: t.clone(),
                })
                .collect(),
            ids: (0..b * prompt)
                .map(|i| (i as u32 * 7919 + 13) % v)
                .collect(),
            sample_rows: (0..b as u32).map(|s| (s + 1) * prompt as u32 - 1).collect(),
            copies: Vec::new(),
        };
        d.run_step(&plan, None, &kv).unwrap();
        let (mut total, mut layers, mut head) = (vec![], vec![], vec![]);
        for step in 0..steps {
            let seqs: Vec<SeqStep> = tables
                .iter()
                .map(|t| SeqStep {
                    start: prompt + step,
                    len: 1,
                    block_table: t.clone(),
                })
                .collect();
            let ids: Vec<u32> = (0..b).map(|i| (i as u32 * 31 + step as u32) % v).collect();
            let t0 = Instant::now();
            let embeds = d.embed_rows(&ids).unwrap();
            let h = d.forward_paged(&embeds, &seqs, &kv).unwrap();
            let t1 = Instant::now();
            let logits: Tensor = d.logits(&h).unwrap();
            let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            std::hint::black_box(&rows);
            let t2 = Instant::now();
            total.push((t2 - t0).as_secs_f64());
            layers.push((t1 - t0).as_secs_f64());
            head.push((t2 - t1).as_secs_f64());
        }
        let s = median(total);
        println!(
            "| {b} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s * 1e3,
            median(layers) * 1e3,
            median(head) * 1e3,
            b as f64 / s
        );
    }
}

/// Batch-1 greedy decode steps over the contiguous cache after a `prompt`-token prompt.
fn contiguous_steps(model: &AfNext, dtype: DType, prompt: usize, steps: usize) {
    let d = &model.decoder;
    let v = d.config().vocab_size as u32;
    let ids: Vec<u32> = (0..prompt).map(|i| (i as u32 * 7919 + 13) % v).collect();
    let mut cache = model.new_cache();
    let h = d.forward(&d.embed(&ids).unwrap(), &mut cache).unwrap();
    let last = h.narrow(1, prompt - 1, 1).unwrap();
    let mut tok = argmax_last(&d.logits(&last).unwrap()).unwrap()[0];
    let (mut total, mut layers, mut head) = (vec![], vec![], vec![]);
    for _ in 0..steps {
        let t0 = Instant::now();
        let h = d.forward(&d.embed(&[tok]).unwrap(), &mut cache).unwrap();
        let t1 = Instant::now();
        tok = argmax_last(&d.logits(&h).unwrap()).unwrap()[0];
        let t2 = Instant::now();
        total.push((t2 - t0).as_secs_f64());
        layers.push((t1 - t0).as_secs_f64());
        head.push((t2 - t1).as_secs_f64());
    }
    println!("decode step over the contiguous cache, {dtype:?}, {prompt}-token prompt, median of {steps} steps");
    println!("| rows | step (ms) | layers (ms) | lm_head + argmax (ms) | tok/s |");
    println!("|---:|---:|---:|---:|---:|");
    let s = median(total);
    println!(
        "| 1 | {:.1} | {:.1} | {:.1} | {:.1} |",
        s * 1e3,
        median(layers) * 1e3,
        median(head) * 1e3,
        1.0 / s
    );
}

/// The prefill of one `n`-token prompt in one step per length (layers only: the lm_head reads one row). The
/// last layer computes the last row only, as the engine's steps do; `AFNEXT_PROBE_ALL_ROWS=1` computes every
/// row through it instead (what that saves).
fn prefill_rows(model: &AfNext, dtype: DType, lengths: &[usize], runs: usize) {
    let d = &model.decoder;
    let v = d.config().vocab_size as u32;
    let all_rows = env_usize("AFNEXT_PROBE_ALL_ROWS", 0) == 1;
    let what = if all_rows { "all rows" } else { "the last row" };
    println!(
        "prefill in one step, {dtype:?}, {what} through the last layer, median of {runs} runs"
    );
    println!("| tokens | step (ms) | tok/s |");
    println!("|---:|---:|---:|");
    for &n in lengths {
        let blocks = n.div_ceil(BLOCK);
        let kv = PagedKv::new(d.config(), blocks, BLOCK, dtype, &Device::Cpu).unwrap();
        let seq = [SeqStep {
            start: 0,
            len: n,
            block_table: (0..blocks as u32).collect(),
        }];
        let ids: Vec<u32> = (0..n).map(|i| (i as u32 * 7919 + 13) % v).collect();
        let times: Vec<f64> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                let x = d.embed_rows(&ids).unwrap();
                let h = if all_rows {
                    d.forward_paged(&x, &seq, &kv)
                } else {
                    d.forward_paged_rows(&x, &seq, &kv, &[n - 1])
                };
                std::hint::black_box(h.unwrap());
                t0.elapsed().as_secs_f64()
            })
            .collect();
        let s = median(times);
        println!("| {n} | {:.1} | {:.1} |", s * 1e3, n as f64 / s);
    }
}
