//! The model path against transformers 5.23 on this machine, one run, same random-weight shapes, same
//! threads: the real-size AF-Whisper encoder (f32) and a Qwen2.5-0.5B-shaped decoder (f32 and bf16), plus
//! the machine's memory bandwidth (the decode-at-batch-1 limit). `cargo bench -p afnext-model --bench model`
//!
//! Each stage runs in rounds alternated with transformers' (one `tools/bench/model_ref.py` process for the whole
//! run), so that a VM whose speed drifts within minutes slows both sides alike.
//!
//! Env: AFNEXT_REF_PYTHON / AFNEXT_REF_VENV (the fixture venv of tools/fixtures/run.sh), AFNEXT_BENCH_THREADS
//! (default 2), AFNEXT_BENCH_ROUNDS (default 3), AFNEXT_BENCH_QUICK=1 (one round, shorter prompt and decode),
//! AFNEXT_BENCH_SKIP_ENCODER=1 (decoder rows only), AFNEXT_BENCH_DTYPES=bf16 (decoder rows of one dtype only,
//! e.g. to profile it; default f32,bf16).

use std::time::Instant;

use afnext_model::config::AfNextConfig;
use afnext_model::decoder::{KvCache, Qwen2};
use afnext_model::encoder::AudioEncoder;
use afnext_model::generate::argmax_last;
use afnext_model::weights::Weights;
use candle_core::{DType, Device, Tensor};

#[path = "../../../tools/bench/reference.rs"]
mod reference;
use reference::{spread, RefProcess};

fn best<T>(iters: usize, mut f: impl FnMut() -> T) -> f64 {
    f();
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn config() -> AfNextConfig {
    // The Qwen2.5-0.5B-shaped decoder of every CPU benchmark (and of tools/bench/model_ref.py).
    let text: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tools/bench/configs/qwen2.5-0.5b-text.json"
    ))
    .expect("bench text config");
    let v = serde_json::json!({
        "audio_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                         "intermediate_size": 5120, "num_mel_bins": 128, "max_source_positions": 1500},
        "text_config": text,
    });
    AfNextConfig::from_json(&v).expect("bench config")
}

/// Weight-streaming bandwidth of this machine: the decode kernel's own matrix-vector product over a 1 GiB
/// f32 matrix (what a decode step does, without anything else around it).
fn bandwidth_gb_s() -> f64 {
    let (rows, cols) = (1usize << 14, 1usize << 14);
    let w = afnext_model::cpu_gemm::PackedWeight::from_f32(&vec![1.0; rows * cols], rows, cols);
    let x = vec![1.0f32; cols];
    let t = best(3, || w.matmul(&x, 1, None));
    (rows * cols * 4) as f64 / t / 1e9
}

/// Seconds of one prefill of an `n`-token prompt, in 512-token chunks as the CLI and the engine prefill.
fn prefill_s(dec: &Qwen2, n: usize, dtype: DType) -> f64 {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % 151_000).collect();
    let t = Instant::now();
    let e = dec.embed(&ids).unwrap().to_dtype(dtype).unwrap();
    let mut cache = KvCache::new(dec.config().num_hidden_layers);
    let mut last = None;
    for start in (0..n).step_by(512) {
        let len = 512.min(n - start);
        // As `afnext generate` and the engine prefill: the last layer computes the last row only.
        let rows: &[usize] = if start + len == n { &[len - 1] } else { &[] };
        last = Some(
            dec.forward_rows(&e.narrow(1, start, len).unwrap(), &mut cache, rows)
                .unwrap(),
        );
    }
    dec.logits(&last.unwrap()).unwrap();
    t.elapsed().as_secs_f64()
}

fn greedy(dec: &Qwen2, h: &Tensor) -> u32 {
    argmax_last(&dec.logits(h).unwrap()).unwrap()[0]
}

/// Seconds of `steps` greedy decode steps at batch 1 after a 100-token prompt (the steps only).
fn decode_s(dec: &Qwen2, steps: usize) -> f64 {
    let prompt: Vec<u32> = (0..100u32).collect();
    let mut cache = KvCache::new(dec.config().num_hidden_layers);
    let h = dec
        .forward(&dec.embed(&prompt).unwrap(), &mut cache)
        .unwrap();
    let mut tok = greedy(dec, &h.narrow(1, 99, 1).unwrap());
    let t = Instant::now();
    for _ in 0..steps {
        let h = dec
            .forward(&dec.embed(&[tok]).unwrap(), &mut cache)
            .unwrap();
        tok = greedy(dec, &h);
    }
    t.elapsed().as_secs_f64()
}

/// One stage's timings, seconds per round, ours and transformers' alternated.
struct Rounds {
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

impl Rounds {
    /// A warm-up on each side, then `n` rounds, ours first in even rounds and theirs first in odd ones. A
    /// reference that fails is dropped (the rest of the run goes on without it).
    fn run(
        n: usize,
        mut ours: impl FnMut() -> f64,
        reference: &mut Option<RefProcess>,
        cmd: &str,
    ) -> Self {
        let theirs_once = |r: &mut Option<RefProcess>| -> Option<f64> {
            let s = r.as_mut()?.ask(cmd).and_then(|v| v["s"].as_f64());
            if s.is_none() {
                eprintln!("reference failed on {cmd:?}; going on without it");
                *r = None;
            }
            s
        };
        let mut r = Rounds {
            ours: vec![],
            theirs: vec![],
        };
        ours();
        theirs_once(reference);
        for i in 0..n {
            if i % 2 == 0 {
                r.ours.push(ours());
                r.theirs.extend(theirs_once(reference));
            } else {
                r.theirs.extend(theirs_once(reference));
                r.ours.push(ours());
            }
        }
        if r.theirs.len() != r.ours.len() {
            r.theirs.clear();
        }
        r
    }

    fn best(v: &[f64]) -> Option<f64> {
        v.iter().copied().reduce(f64::min)
    }

    fn ours(&self) -> f64 {
        Self::best(&self.ours).unwrap_or(f64::NAN)
    }

    fn theirs(&self) -> Option<f64> {
        Self::best(&self.theirs)
    }

    /// Our speed-up in each round (their seconds over ours): median, lowest and highest.
    fn paired(&self) -> String {
        spread(
            self.theirs
                .iter()
                .zip(&self.ours)
                .map(|(t, o)| t / o)
                .collect(),
        )
    }
}

/// A decoder's rows: prefill and decode rounds, and the bandwidth measured right after them.
fn decoder_rows(
    dec: &Qwen2,
    dtype: DType,
    name: &str,
    (rounds, n_prefill, n_decode): (usize, usize, usize),
    reference: &mut Option<RefProcess>,
) -> (Rounds, Rounds, f64) {
    let pre = Rounds::run(
        rounds,
        || prefill_s(dec, n_prefill, dtype),
        reference,
        &format!("prefill {name} {n_prefill}"),
    );
    let step = Rounds::run(
        rounds,
        || decode_s(dec, n_decode),
        reference,
        &format!("decode {name} {n_decode}"),
    );
    (pre, step, bandwidth_gb_s())
}

fn main() {
    let threads: usize = std::env::var("AFNEXT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    // As the CLI does (unless `--return-freed-memory`); AFNEXT_BENCH_MALLOC=default measures without it.
    if std::env::var("AFNEXT_BENCH_MALLOC").as_deref() != Ok("default") {
        afnext_model::alloc::retain_freed_memory();
    }
    let quick = std::env::var("AFNEXT_BENCH_QUICK").is_ok();
    let (n_prefill, n_decode) = if quick { (256, 8) } else { (1000, 32) };
    let rounds: usize = std::env::var("AFNEXT_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 })
        .max(1);
    let skip_encoder = std::env::var("AFNEXT_BENCH_SKIP_ENCODER").is_ok();
    let cfg = config();
    let cpu = Device::Cpu;
    println!("threads {threads} (candle uses all cores it is given: run with RAYON_NUM_THREADS={threads})");
    println!(
        "{rounds} rounds per stage, ours and transformers' alternated, after one warm-up each"
    );

    let mut reference = RefProcess::start("model_ref.py", &[threads.to_string()]);
    let info = reference.as_mut().and_then(|r| r.ask("info"));
    let peak = reference
        .as_mut()
        .and_then(|r| r.ask("matmul"))
        .and_then(|v| v["gflops"].as_f64());

    let w = Weights::random(0, true, DType::F32, &cpu);
    let enc = (!skip_encoder).then(|| {
        let enc = AudioEncoder::load(&w, &cfg.audio).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 128, 3000), &cpu).unwrap();
        let once = || {
            let t = Instant::now();
            enc.forward(&x, &[3000]).unwrap();
            t.elapsed().as_secs_f64()
        };
        let r = Rounds::run(rounds, once, &mut reference, "encoder");
        if let Some(r) = reference.as_mut() {
            r.ask("drop encoder");
        }
        r
    });
    let dtypes = std::env::var("AFNEXT_BENCH_DTYPES").unwrap_or_else(|_| "f32,bf16".into());
    let wanted = |name: &str| dtypes.split(',').any(|d| d.trim() == name);
    let sizes = (rounds, n_prefill, n_decode);
    let f32_rows = wanted("f32").then(|| {
        let dec = Qwen2::load(&w, &cfg.text).unwrap();
        decoder_rows(&dec, DType::F32, "f32", sizes, &mut reference)
    });
    drop(w);
    let bf16_rows = wanted("bf16").then(|| {
        let wb = Weights::random(0, true, DType::BF16, &cpu);
        let dec = Qwen2::load(&wb, &cfg.text).unwrap();
        decoder_rows(&dec, DType::BF16, "bf16", sizes, &mut reference)
    });
    let bw = [&f32_rows, &bf16_rows]
        .iter()
        .filter_map(|r| r.as_ref().map(|r| r.2))
        .fold(f64::NAN, f64::max);

    // Decoder weights read per decode step: every matrix once (the tied embedding as lm_head included).
    let t = &cfg.text;
    let per_layer =
        t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
            + t.num_attention_heads * t.head_dim * t.hidden_size
            + 3 * t.hidden_size * t.intermediate_size;
    let params = (t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size) as f64;
    // AF-Whisper FLOPs per window: convs + 32 layers of projections, attention and FFN at 1500 positions.
    let a = &cfg.audio;
    let (tpos, dd) = (a.max_source_positions as f64, a.hidden_size as f64);
    let enc_flops = 2.0 * (3000.0 * 128.0 * 3.0 * dd + tpos * dd * 3.0 * dd)
        + a.num_hidden_layers as f64
            * 2.0
            * tpos
            * (4.0 * dd * dd + 2.0 * dd * a.intermediate_size as f64 + 2.0 * tpos * dd);

    let fmt = |x: Option<f64>, digits: usize| {
        x.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    // Our speed-up from each side's best round: their seconds over ours.
    let speedup = |r: &Rounds| {
        r.theirs()
            .map(|t| format!("{:.2}x", t / r.ours()))
            .unwrap_or_else(|| "-".into())
    };
    println!("\n| stage | afnext | transformers | afnext speed-up (best rounds) | speed-up per round: median (range) | limit |");
    println!("|---|---:|---:|---:|---:|---|");
    if let Some(r) = &enc {
        let rate = enc_flops / r.ours() / 1e9;
        println!(
            "| encoder, 1 window, f32 (s) | {:.2} | {} | {} | {} | {rate:.0} GFLOP/s = {} of torch's f32 matmul peak ({} GFLOP/s) |",
            r.ours(),
            fmt(r.theirs(), 2),
            speedup(r),
            r.paired(),
            peak.map(|p| format!("{:.0} %", rate / p * 100.0))
                .unwrap_or_else(|| "-".into()),
            fmt(peak, 1)
        );
    }
    for (name, rows) in [("f32", &f32_rows), ("bf16", &bf16_rows)] {
        let Some((pre, _, _)) = rows else { continue };
        let n = n_prefill as f64;
        println!(
            "| prefill {n_prefill} tokens, {name} (tok/s) | {:.1} | {} | {} | {} | compute |",
            n / pre.ours(),
            fmt(pre.theirs().map(|t| n / t), 1),
            speedup(pre),
            pre.paired()
        );
    }
    for (name, rows, bytes) in [("f32", &f32_rows, 4.0), ("bf16", &bf16_rows, 2.0)] {
        let Some((_, step, _)) = rows else { continue };
        let n = n_decode as f64;
        let roof = bw * 1e9 / (params * bytes);
        println!(
            "| decode batch 1, {name} (tok/s) | {:.2} | {} | {} | {} | {roof:.1} tok/s roofline ({:.0} % reached) |",
            n / step.ours(),
            fmt(step.theirs().map(|t| n / t), 2),
            speedup(step),
            step.paired(),
            n / step.ours() / roof * 100.0
        );
    }
    println!(
        "\nweight-streaming bandwidth {bw:.1} GB/s (1 GiB f32 GEMV, {threads} threads, best after each dtype's decode rounds); decoder weights {:.2} G params; encoder {:.2} TFLOP/window",
        params / 1e9,
        enc_flops / 1e12
    );
    match (&info, &reference) {
        (Some(v), Some(_)) => println!(
            "reference: transformers {}, torch {}, {} threads",
            v["transformers"], v["torch"], v["threads"]
        ),
        (Some(_), None) => println!("reference failed during the run (see above)"),
        _ => println!("reference not run (no Python with transformers found)"),
    }
}
