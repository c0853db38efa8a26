//! The model path at full AF-Next size with random weights on one device (the GPU benchmark's afnext side).
//! `scripts/gpu-check.sh` runs it beside `tools/bench/gpu_ref.py` (transformers on the same card) and prints
//! the comparison table; it also runs on the CPU with a tiny config as a smoke test:
//!
//! `cargo bench -p afnext-model --bench device -- --config tests/fixtures/ckpt/tiny-a --device cpu --quick`
//!
//! Measures, in the given dtype (default bf16): audio windows per second through encoder + RoTE + projector
//! (batches of 1, 8, 32 full 30 s windows); prefill tokens per second of one 1 000 / 10 000 / 45 000-token
//! prompt (chunked over the paged KV cache as the engine prefills, last row's logits); decode tokens per
//! second of 1, 8, 32 sequences with 1 000 tokens of context each (greedy, 32 steps, ids back on the host
//! every step as the engine needs them). Prints one JSON object on its last line.

use std::path::PathBuf;
use std::time::Instant;

use afnext_model::config::AfNextConfig;
use afnext_model::paged::{PagedKv, SeqStep};
use afnext_model::rote;
use afnext_model::AfNext;
use candle_core::{DType, Device, Tensor, D};
use serde_json::{json, Map, Value};

struct Args {
    config: PathBuf,
    device: Device,
    dtype: DType,
    quick: bool,
    profile: bool,
    prefill_chunk: usize,
}

fn args() -> Args {
    let mut a = Args {
        config: PathBuf::from("tools/bench/configs/af-next"),
        device: Device::Cpu,
        dtype: DType::BF16,
        quick: false,
        profile: false,
        prefill_chunk: 8192,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--config" => a.config = PathBuf::from(val()),
            "--device" => {
                let d = val();
                a.device =
                    afnext_model::device::open(&d).unwrap_or_else(|e| panic!("--device: {e}"));
            }
            "--dtype" => {
                a.dtype = match val().as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    _ => DType::BF16,
                }
            }
            "--prefill-chunk" => a.prefill_chunk = val().parse().expect("--prefill-chunk"),
            "--quick" => a.quick = true,
            "--profile" => a.profile = true,
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Median seconds of `reps` timed runs after one warm-up; the device is synchronised around each run.
fn median(dev: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().unwrap();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            dev.synchronize().unwrap();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Hands out consecutive blocks of the pool (every experiment starts from an empty pool).
fn tables(lens: &[usize], block: usize) -> Vec<Vec<u32>> {
    let mut next = 0u32;
    lens.iter()
        .map(|&l| {
            let n = l.div_ceil(block) as u32;
            let t = (next..next + n).collect();
            next += n;
            t
        })
        .collect()
}

fn main() {
    let a = args();
    let dev = &a.device;
    // `cargo bench` runs in crates/model: relative paths are taken from the repository root.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let config = if a.config.exists() {
        a.config.clone()
    } else {
        root.join(&a.config)
    };
    let cfg = AfNextConfig::load(&config).expect("config.json");
    let t0 = Instant::now();
    let model = AfNext::random(cfg.clone(), 7, a.dtype, dev).expect("random model");
    dev.synchronize().unwrap();
    eprintln!(
        "random weights ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if a.profile {
        // Once to warm up (module loads, cuBLAS heuristics), once inside the profiler's window.
        profile(&model, &cfg, dev, a.prefill_chunk);
        profiler(true);
        profile(&model, &cfg, dev, a.prefill_chunk);
        profiler(false);
        return;
    }
    let (windows, prompts, batches, ctx, steps, reps) = if a.quick {
        (
            vec![1, 2, 4],
            vec![16usize, 32, 64],
            vec![1usize, 2, 4],
            16,
            4,
            2,
        )
    } else {
        (
            vec![1, 8, 32],
            vec![1000, 10_000, 45_000],
            vec![1, 8, 32],
            1000,
            32,
            3,
        )
    };
    let mut out = Map::new();
    out.insert("device".into(), json!(format!("{dev:?}")));
    out.insert("dtype".into(), json!(format!("{:?}", a.dtype)));

    // Audio path: full windows of random log-mel features.
    let (mels, frames) = (cfg.audio.num_mel_bins, 2 * cfg.audio.max_source_positions);
    let mut enc = Map::new();
    for &w in &windows {
        let x = Tensor::randn(0f32, 1.0, (w, mels, frames), dev).unwrap();
        let valid = vec![frames; w];
        let idx: Vec<usize> = (0..w).collect();
        let s = median(dev, reps, || {
            model.encode_windows(&x, &valid, &idx).unwrap();
        });
        eprintln!("encoder {w} windows: {s:.4} s");
        enc.insert(w.to_string(), json!(w as f64 / s));
    }
    out.insert("encoder_windows_s".into(), Value::Object(enc));
    out.insert(
        "encoder_stages_ms".into(),
        encoder_stages(&model, &cfg, dev, windows[1], reps),
    );

    // One pool for everything: the longest prompt, or every decode sequence's context plus its steps.
    let block: usize = 16;
    let need = prompts
        .iter()
        .max()
        .copied()
        .unwrap()
        .max(batches.iter().max().unwrap() * (ctx + steps + 8 + block));
    let kv = PagedKv::new(&cfg.text, need.div_ceil(block) + 64, block, a.dtype, dev).unwrap();
    let vocab = cfg.text.vocab_size as u32;
    let ids = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt) % vocab)
            .collect()
    };

    let mut pre = Map::new();
    for &l in &prompts {
        let prompt = ids(l, 1);
        let s = median(dev, if l > 20_000 { 1 } else { reps }, || {
            prefill(&model, &kv, &prompt, a.prefill_chunk, block);
        });
        eprintln!("prefill {l}: {s:.3} s");
        pre.insert(l.to_string(), json!(l as f64 / s));
    }
    out.insert("prefill_tok_s".into(), Value::Object(pre));
    drop(kv);
    let l = prompts[1];
    let mut sweep = Map::new();
    for (chunk, keys) in [(2048, 2048), (8192, 2048), (4096, 4096), (8192, 8192)] {
        let kv = PagedKv::new(&cfg.text, l.div_ceil(block) + 1, block, a.dtype, dev)
            .unwrap()
            .with_attn_block(keys);
        let prompt = ids(l, 1);
        let s = median(dev, 1, || {
            prefill(&model, &kv, &prompt, chunk, block);
        });
        eprintln!("prefill {l} in chunks of {chunk}, key chunks of {keys}: {s:.3} s");
        sweep.insert(format!("chunk {chunk} / keys {keys}"), json!(l as f64 / s));
    }
    out.insert(format!("prefill_{l}_sweep_tok_s"), Value::Object(sweep));
    let kv = PagedKv::new(&cfg.text, need.div_ceil(block) + 64, block, a.dtype, dev).unwrap();

    let mut dec = Map::new();
    for &b in &batches {
        let t = tables(&vec![ctx + steps + 8; b], block);
        // Contexts, not timed: all sequences' prompts in chunks of whole sequences.
        let per = (a.prefill_chunk / ctx).max(1);
        for group in (0..b).collect::<Vec<_>>().chunks(per) {
            let seqs: Vec<SeqStep> = group
                .iter()
                .map(|&i| SeqStep {
                    start: 0,
                    len: ctx,
                    block_table: t[i].clone(),
                })
                .collect();
            let all: Vec<u32> = group.iter().flat_map(|&i| ids(ctx, i as u32)).collect();
            let x = model.decoder.embed_rows(&all).unwrap();
            model.decoder.forward_paged(&x, &seqs, &kv).unwrap();
        }
        // A few untimed steps first (cuBLAS picks its kernels for the new shapes).
        let warm = 4;
        let mut next: Vec<u32> = (0..b as u32).collect();
        let mut t0 = Instant::now();
        for step in 0..warm + steps {
            if step == warm {
                dev.synchronize().unwrap();
                t0 = Instant::now();
            }
            let seqs: Vec<SeqStep> = (0..b)
                .map(|i| SeqStep {
                    start: ctx + step,
                    len: 1,
                    block_table: t[i].clone(),
                })
                .collect();
            let x = model.decoder.embed_rows(&next).unwrap();
            let h = model.decoder.forward_paged(&x, &seqs, &kv).unwrap();
            let logits = model.decoder.logits(&h).unwrap();
            next = logits
                .argmax(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        let s = t0.elapsed().as_secs_f64();
        eprintln!("decode batch {b}: {:.2} ms/step", s / steps as f64 * 1e3);
        dec.insert(b.to_string(), json!((b * steps) as f64 / s));
    }
    out.insert("decode_tok_s".into(), Value::Object(dec));
    // What a decode step must read: every layer's matrices and the lm_head (the embedding table only by row).
    let t = &cfg.text;
    let (h, q, kvw) = (
        t.hidden_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    let per_layer = h * q + 2 * h * kvw + q * h + 3 * h * t.intermediate_size;
    let bytes = (t.num_hidden_layers * per_layer + t.vocab_size * h) * a.dtype.size_in_bytes();
    out.insert("decoder_weight_bytes".into(), json!(bytes));
    println!("{}", Value::Object(out));
}

/// One prompt prefilled in chunks of `chunk` rows over the paged cache (as the engine does: the last layer
/// computes only the prompt's last row), then that row's logits.
fn prefill(model: &AfNext, kv: &PagedKv, prompt: &[u32], chunk: usize, block: usize) {
    let l = prompt.len();
    let table = tables(&[l], block).remove(0);
    let mut h = None;
    for from in (0..l).step_by(chunk) {
        let n = chunk.min(l - from);
        let x = model.decoder.embed_rows(&prompt[from..from + n]).unwrap();
        let step = SeqStep {
            start: from,
            len: n,
            block_table: table.clone(),
        };
        let rows: &[usize] = if from + n == l { &[n - 1] } else { &[] };
        h = Some(
            model
                .decoder
                .forward_paged_rows(&x, &[step], kv, rows)
                .unwrap(),
        );
    }
    model.decoder.logits(&h.unwrap()).unwrap();
}

/// Where the audio path's time goes for `w` windows: encoder, RoTE tables (host), RoTE rotation, projector.
fn encoder_stages(
    model: &AfNext,
    cfg: &AfNextConfig,
    dev: &Device,
    w: usize,
    reps: usize,
) -> Value {
    let (mels, frames) = (cfg.audio.num_mel_bins, 2 * cfg.audio.max_source_positions);
    let x = Tensor::randn(0f32, 1.0, (w, mels, frames), dev).unwrap();
    let valid = vec![frames; w];
    let idx: Vec<usize> = (0..w).collect();
    let enc = model.audio.encoder.forward(&x, &valid).unwrap();
    let rows = model.audio.encoder.rows();
    let tables = rote::tables(&cfg.rote, cfg.audio.hidden_size, rows, &idx);
    let post = rote::apply(&enc, &tables).unwrap();
    let ms = |f: &mut dyn FnMut()| median(dev, reps, f) * 1e3;
    let v = json!({
        "windows": w,
        "encoder": ms(&mut || { model.audio.encoder.forward(&x, &valid).unwrap(); }),
        "rote_tables_host": ms(&mut || { rote::tables(&cfg.rote, cfg.audio.hidden_size, rows, &idx); }),
        "rote_apply": ms(&mut || { rote::apply(&enc, &tables).unwrap(); }),
        "projector": ms(&mut || { model.audio.projector.forward(&post).unwrap(); }),
    });
    eprintln!("audio path stages for {w} windows (ms): {v}");
    v
}

/// A small workload of every kind, run once, for a kernel profiler (`ncu`, ~20 ms per kernel launch): 2
/// windows, a 3 000-token prompt, 2 decode steps of 8 sequences with 300-token contexts.
fn profile(model: &AfNext, cfg: &AfNextConfig, dev: &Device, chunk: usize) {
    let (mels, frames) = (cfg.audio.num_mel_bins, 2 * cfg.audio.max_source_positions);
    let x = Tensor::randn(0f32, 1.0, (2, mels, frames), dev).unwrap();
    model.encode_windows(&x, &[frames; 2], &[0, 1]).unwrap();
    let block = 16;
    let kv = PagedKv::new(&cfg.text, 1024, block, model.dtype(), dev).unwrap();
    let vocab = cfg.text.vocab_size as u32;
    let prompt: Vec<u32> = (0..3000u32).map(|i| (i * 7919) % vocab).collect();
    prefill(model, &kv, &prompt, chunk, block);
    let (ctx, steps) = (300, 2);
    let t = tables(&[ctx + steps; 8], block);
    let seqs = |start: usize, len: usize| -> Vec<SeqStep> {
        t.iter()
            .map(|b| SeqStep {
                start,
                len,
                block_table: b.clone(),
            })
            .collect()
    };
    let all: Vec<u32> = (0..(8 * ctx) as u32).map(|i| (i * 31) % vocab).collect();
    let x = model.decoder.embed_rows(&all).unwrap();
    model.decoder.forward_paged(&x, &seqs(0, ctx), &kv).unwrap();
    for step in 0..steps {
        let x = model.decoder.embed_rows(&[1u32; 8]).unwrap();
        let h = model
            .decoder
            .forward_paged(&x, &seqs(ctx + step, 1), &kv)
            .unwrap();
        model.decoder.logits(&h).unwrap();
    }
    dev.synchronize().unwrap();
    eprintln!("profile workload done");
}

/// Opens or closes the window of `ncu --profile-from-start off` (model set-up stays out of the profile).
fn profiler(on: bool) {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: plain driver calls with no arguments; the context is current (candle made it).
        let r = unsafe {
            if on {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        eprintln!("profiler {}: {r:?}", if on { "start" } else { "stop" });
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("profiler window {on} (no CUDA in this build)");
}
