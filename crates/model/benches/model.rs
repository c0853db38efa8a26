//! The model path against transformers 5.23 on this machine, one run, same random-weight shapes, same
//! threads: the real-size AF-Whisper encoder (f32) and a Qwen2.5-0.5B-shaped decoder (f32 and bf16), plus
//! the machine's memory bandwidth (the decode-at-batch-1 limit). `cargo bench -p afnext-model --bench model`
//!
//! Env: AFNEXT_REF_PYTHON / AFNEXT_REF_VENV (the fixture venv of tools/fixtures/run.sh), AFNEXT_BENCH_THREADS
//! (default 2), AFNEXT_BENCH_QUICK=1 (fewer iterations), AFNEXT_BENCH_SKIP_ENCODER=1 (decoder rows only),
//! AFNEXT_BENCH_DTYPES=bf16 (decoder rows of one dtype only, e.g. to profile it; default f32,bf16).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use afnext_model::config::AfNextConfig;
use afnext_model::decoder::{KvCache, Qwen2};
use afnext_model::encoder::AudioEncoder;
use afnext_model::weights::Weights;
use candle_core::{DType, Device, Tensor, D};

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

fn prefill_tok_s(dec: &Qwen2, n: usize, dtype: DType) -> f64 {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % 151_000).collect();
    // Best of 3 on both sides: one prefill takes a few seconds, and this VM's speed moves by ±30 %.
    let secs = best(3, || {
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
        dec.logits(&last.unwrap()).unwrap()
    });
    n as f64 / secs
}

fn decode_tok_s(dec: &Qwen2, steps: usize) -> f64 {
    let prompt: Vec<u32> = (0..100u32).collect();
    let run = || {
        let mut cache = KvCache::new(dec.config().num_hidden_layers);
        let h = dec
            .forward(&dec.embed(&prompt).unwrap(), &mut cache)
            .unwrap();
        let mut tok: u32 = dec
            .logits(&h.narrow(1, 99, 1).unwrap())
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()[0];
        let t = Instant::now();
        for _ in 0..steps {
            let h = dec
                .forward(&dec.embed(&[tok]).unwrap(), &mut cache)
                .unwrap();
            tok = dec
                .logits(&h)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()[0];
        }
        t.elapsed().as_secs_f64()
    };
    run();
    steps as f64 / run().min(run())
}

fn ref_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AFNEXT_REF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("AFNEXT_REF_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/afnext/ref-venv"))
        })?;
    let p = venv.join("bin/python");
    p.exists().then_some(p)
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
    let (mut enc_iters, n_prefill, n_decode) = if quick { (1, 256, 8) } else { (2, 1000, 32) };
    if std::env::var("AFNEXT_BENCH_SKIP_ENCODER").is_ok() {
        enc_iters = 0;
    }
    let cfg = config();
    let cpu = Device::Cpu;
    println!("threads {threads} (candle uses all cores it is given: run with RAYON_NUM_THREADS={threads})");

    let w = Weights::random(0, true, DType::F32, &cpu);
    let enc_s = if enc_iters > 0 {
        let enc = AudioEncoder::load(&w, &cfg.audio).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 128, 3000), &cpu).unwrap();
        best(enc_iters, || enc.forward(&x, &[3000]).unwrap())
    } else {
        f64::NAN
    };
    let dtypes = std::env::var("AFNEXT_BENCH_DTYPES").unwrap_or_else(|_| "f32,bf16".into());
    let decoder_rows = |weights: &Weights, dtype: DType, name: &str| {
        if !dtypes.split(',').any(|d| d.trim() == name) {
            return (f64::NAN, f64::NAN);
        }
        let dec = Qwen2::load(weights, &cfg.text).unwrap();
        (
            prefill_tok_s(&dec, n_prefill, dtype),
            decode_tok_s(&dec, n_decode),
        )
    };
    let (pre32, dec_tok32) = decoder_rows(&w, DType::F32, "f32");
    let wb = Weights::random(0, true, DType::BF16, &cpu);
    let (pre16, dec_tok16) = decoder_rows(&wb, DType::BF16, "bf16");
    let bw = bandwidth_gb_s();

    // Decoder weights read per decode step: every matrix once (the tied embedding as lm_head included).
    let t = &cfg.text;
    let per_layer =
        t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
            + t.num_attention_heads * t.head_dim * t.hidden_size
            + 3 * t.hidden_size * t.intermediate_size;
    let params = (t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size) as f64;
    let roof32 = bw * 1e9 / (params * 4.0);
    let roof16 = bw * 1e9 / (params * 2.0);
    // AF-Whisper FLOPs per window: convs + 32 layers of projections, attention and FFN at 1500 positions.
    let a = &cfg.audio;
    let (tpos, dd) = (a.max_source_positions as f64, a.hidden_size as f64);
    let enc_flops = 2.0 * (3000.0 * 128.0 * 3.0 * dd + tpos * dd * 3.0 * dd)
        + a.num_hidden_layers as f64
            * 2.0
            * tpos
            * (4.0 * dd * dd + 2.0 * dd * a.intermediate_size as f64 + 2.0 * tpos * dd);

    let reference = ref_python().and_then(|py| {
        let o = Command::new(py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/model_ref.py"))
            .args([threads, enc_iters, n_prefill, n_decode].map(|x| x.to_string()))
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!("reference failed: {}", String::from_utf8_lossy(&o.stderr));
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok()
    });
    let r = |k: &str| reference.as_ref().and_then(|v| v[k].as_f64());
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let ratio = |ours: f64, theirs: Option<f64>, higher_better: bool| {
        theirs
            .map(|t| format!("{:.2}x", if higher_better { ours / t } else { t / ours }))
            .unwrap_or_else(|| "-".into())
    };
    println!("\n| stage | afnext | transformers | afnext speed-up | limit |");
    println!("|---|---:|---:|---:|---|");
    let peak = r("matmul_f32_gflops");
    println!(
        "| encoder, 1 window, f32 (s) | {enc_s:.2} | {} | {} | {:.0} GFLOP/s = {} of torch's f32 matmul peak ({} GFLOP/s) |",
        fmt(r("encoder_f32_s_per_window")),
        ratio(enc_s, r("encoder_f32_s_per_window"), false),
        enc_flops / enc_s / 1e9,
        peak.map(|p| format!("{:.0} %", enc_flops / enc_s / 1e9 / p * 100.0)).unwrap_or_else(|| "-".into()),
        fmt(peak)
    );
    println!(
        "| prefill {n_prefill} tokens, f32 (tok/s) | {pre32:.1} | {} | {} | compute |",
        fmt(r("prefill_f32_tok_s")),
        ratio(pre32, r("prefill_f32_tok_s"), true)
    );
    println!(
        "| prefill {n_prefill} tokens, bf16 (tok/s) | {pre16:.1} | {} | {} | compute |",
        fmt(r("prefill_bf16_tok_s")),
        ratio(pre16, r("prefill_bf16_tok_s"), true)
    );
    println!(
        "| decode batch 1, f32 (tok/s) | {dec_tok32:.2} | {} | {} | {roof32:.1} tok/s roofline ({:.0} % reached) |",
        fmt(r("decode_f32_tok_s")),
        ratio(dec_tok32, r("decode_f32_tok_s"), true),
        dec_tok32 / roof32 * 100.0
    );
    println!(
        "| decode batch 1, bf16 (tok/s) | {dec_tok16:.2} | {} | {} | {roof16:.1} tok/s roofline ({:.0} % reached) |",
        fmt(r("decode_bf16_tok_s")),
        ratio(dec_tok16, r("decode_bf16_tok_s"), true),
        dec_tok16 / roof16 * 100.0
    );
    println!(
        "\nweight-streaming bandwidth {bw:.1} GB/s (1 GiB f32 GEMV, {threads} threads); decoder weights {:.2} G params; encoder {:.2} TFLOP/window",
        params / 1e9,
        enc_flops / 1e12
    );
    if let Some(v) = &reference {
        println!(
            "reference: transformers {}, torch {}, {} threads",
            v["transformers"], v["torch"], v["threads"]
        );
    } else {
        println!("reference not run (no Python with transformers found)");
    }
}
