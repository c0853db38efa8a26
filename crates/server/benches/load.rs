//! Load benchmark (not a test): the embedded server over real gRPC on loopback, driven by a bounded Rust load
//! generator, with a Qwen2.5-0.5B-shaped random decoder (24 layers, 896 wide, 14 heads, 2 kv heads, vocab
//! 151 672, tied embeddings) behind tiny-a's small encoder, tokenizer and template. The decoder is what this
//! measures; the real-size encoder is timed by `cargo bench -p afnext-model --bench model`.
//!
//! For each dtype: throughput and time-to-first-token / inter-token latency (p50, p99) at concurrency 1, 4 and
//! 16 (each client sends its requests back to back; every request generates exactly NEW tokens), a follow-up
//! turn on a 5-minute clip against its first turn, and, in the same run, transformers' static batch of 16 on
//! the same shapes (`tools/bench/load_ref.py`, in the venv of `tools/fixtures/run.sh`, `$AFNEXT_REF_VENV` or
//! `$AFNEXT_REF_PYTHON`: tools/bench/reference.rs), with prompts as long as the part the server prefilled at 16
//! (the same work) and as the whole prompts.
//!
//! Concurrency 1, concurrency 16 and transformers' batch run in rounds, alternated (one `load_ref.py` process per
//! dtype), so that a VM whose speed drifts within minutes affects the goal's ratios on both of their sides.
//!
//! `cargo bench -p afnext-server --bench load` (env: AFNEXT_BENCH_THREADS=2, AFNEXT_BENCH_DTYPES=f32,bf16,
//! AFNEXT_BENCH_NEW=48, AFNEXT_BENCH_ROUNDS=2, AFNEXT_BENCH_QUICK=1 for a smoke run).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_engine::{Engine, EngineConfig};
use afnext_model::config::GenerationDefaults;
use afnext_model::{AfNext, AfNextConfig};
use afnext_prompt::PromptProcessor;
use afnext_server::pb;
use afnext_server::pb::af_next_client::AfNextClient;
use afnext_server::ServerConfig;
use candle_core::{DType, Device};
use tonic::transport::Channel;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[path = "../../../tools/bench/tiny_a_qwen.rs"]
mod tiny_a_qwen;

#[path = "../../../tools/bench/reference.rs"]
mod reference;
use reference::{spread, RefProcess};

fn config() -> AfNextConfig {
    tiny_a_qwen::config(&fixtures().join("ckpt/tiny-a"))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct ReqStats {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
    /// Prompt tokens as the server counted them (template included).
    prompt_tokens: u32,
    /// Of those, found in the prefix cache (not prefilled).
    cached_tokens: u32,
    /// The answer.
    text: String,
}

async fn one(c: &mut AfNextClient<Channel>, r: pb::GenerateRequest) -> ReqStats {
    let t0 = Instant::now();
    let mut s = c.generate(r).await.expect("generate").into_inner();
    let mut ttft = f64::NAN;
    let mut last = t0;
    let mut gaps = Vec::new();
    let mut tokens = 0;
    let mut text = String::new();
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    while let Some(m) = s.message().await.expect("stream") {
        match m.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                let now = Instant::now();
                if tokens == 0 {
                    ttft = (now - t0).as_secs_f64();
                } else {
                    gaps.push((now - last).as_secs_f64());
                }
                last = now;
                tokens += d.token_ids.len();
                text.push_str(&d.text);
            }
            Some(pb::generate_response::Event::Started(st)) => {
                (prompt_tokens, cached_tokens) = (st.prompt_tokens, st.cached_tokens)
            }
            _ => {}
        }
    }
    ReqStats {
        ttft,
        gaps,
        tokens,
        prompt_tokens,
        cached_tokens,
        text,
    }
}

fn text_request(prompt: String, new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            parts: vec![pb::Part {
                kind: Some(pb::part::Kind::Text(prompt)),
            }],
        }],
        max_new_tokens: Some(new),
        ignore_eos: true,
        ..Default::default()
    }
}

#[derive(Clone)]
struct Row {
    conc: usize,
    tok_s: f64,
    /// Mean prompt tokens per request, and of those the ones prefilled (not in the prefix cache).
    prompt_tokens: (f64, f64),
    ttft: (f64, f64),
    itl: (f64, f64),
}

/// `conc` clients sending `per_client` requests each, back to back; `round` tags the prompts so that no
/// request of one level or round finds another's prompt in the prefix cache.
async fn concurrency(
    c: &AfNextClient<Channel>,
    conc: usize,
    per_client: usize,
    new: u32,
    round: usize,
) -> Row {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|k| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..per_client {
                    // Distinct prompts: no prefix-cache help between clients, levels or rounds (only the
                    // chat template's opening is shared).
                    let p = format!(
                        "Client {k} of {conc}, round {round}, request {i}: describe a quiet harbour at dawn."
                    );
                    out.push(one(&mut c, text_request(p, new)).await);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    let tokens: usize = all.iter().map(|s| s.tokens).sum();
    let mean = |f: fn(&ReqStats) -> u32| {
        all.iter().map(|s| f(s) as f64).sum::<f64>() / all.len().max(1) as f64
    };
    let prompt_tokens = (
        mean(|s| s.prompt_tokens),
        mean(|s| s.prompt_tokens - s.cached_tokens),
    );
    let mut ttft: Vec<f64> = all.iter().map(|s| s.ttft).collect();
    let mut gaps: Vec<f64> = all.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    Row {
        conc,
        tok_s: tokens as f64 / wall,
        prompt_tokens,
        ttft: (percentile(&mut ttft, 0.5), percentile(&mut ttft, 0.99)),
        itl: (percentile(&mut gaps, 0.5), percentile(&mut gaps, 0.99)),
    }
}

/// A 5-minute mono 16 kHz clip (tones and noise), as wav bytes.
fn five_minutes() -> Vec<u8> {
    let n = 300 * 16000;
    let mut x = 1u32;
    let s: Vec<f32> = (0..n)
        .map(|i| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            let noise = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            0.2 * (i as f32 * 0.05 * (1.0 + (i / 16000 % 7) as f32)).sin() + 0.05 * noise
        })
        .collect();
    afnext_audio::encode_wav(&s, 16000, 1, afnext_audio::WavFormat::Pcm16)
}

/// The first turn's TTFT, the follow-up's, and the follow-up's prompt tokens and cached ones. The follow-up
/// sends back the first turn's answer, as a chat client does (before the nineteenth session: a fixed text).
async fn follow_up(c: &mut AfNextClient<Channel>) -> (f64, f64, (u32, u32)) {
    let audio = pb::Part {
        kind: Some(pb::part::Kind::Audio(pb::AudioPart {
            source: Some(pb::audio_part::Source::Data(five_minutes())),
            format: 0,
        })),
    };
    let text = |t: &str| pb::Part {
        kind: Some(pb::part::Kind::Text(t.into())),
    };
    let first = vec![pb::Message {
        role: pb::Role::User as i32,
        parts: vec![audio, text("Describe the recording.")],
    }];
    let mut r = text_request(String::new(), 4);
    r.messages = first.clone();
    let a = one(c, r.clone()).await;
    let mut follow = first;
    follow.push(pb::Message {
        role: pb::Role::Assistant as i32,
        parts: vec![text(&a.text)],
    });
    follow.push(pb::Message {
        role: pb::Role::User as i32,
        parts: vec![text("Does the pitch change?")],
    });
    r.messages = follow;
    let mut s = c.generate(r).await.unwrap().into_inner();
    let t0 = Instant::now();
    let mut ttft = f64::NAN;
    let mut cached = (0, 0);
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(pb::generate_response::Event::Delta(_)) if ttft.is_nan() => {
                ttft = t0.elapsed().as_secs_f64()
            }
            Some(pb::generate_response::Event::Started(st)) => {
                cached = (st.prompt_tokens, st.cached_tokens)
            }
            _ => {}
        }
    }
    (a.ttft, ttft, cached)
}

/// transformers' side (`tools/bench/load_ref.py`): one process per dtype, asked for one static batch at a
/// time so that its batches alternate with the server's rounds.
struct LoadRef(RefProcess);

impl LoadRef {
    fn start(threads: usize, dtype: &str) -> Option<Self> {
        let mut p = RefProcess::start("load_ref.py", &[threads.to_string(), dtype.into()])?;
        // The model is built and warmed up once it says hello.
        p.read()?;
        Some(LoadRef(p))
    }

    /// transformers' tokens/s for a static batch of 16 prompts of `prompt` tokens, `new` tokens each.
    fn batch16(&mut self, prompt: usize, new: u32) -> Option<f64> {
        self.0.ask(&format!("16 {prompt} {new}"))?["tok_s"].as_f64()
    }
}

/// One round at the goal's two levels and the reference's static batch on the same work.
struct Round {
    c1: Row,
    c16: Row,
    /// transformers' tokens/s with prompts as long as what the server prefilled per request at 16.
    same: Option<f64>,
}

/// One static batch of the reference, run on this (tokio worker) thread; a reference that fails is dropped
/// and the run goes on without it.
fn ask(reference: &mut Option<LoadRef>, prompt: usize, new: u32) -> Option<f64> {
    let r = tokio::task::block_in_place(|| reference.as_mut()?.batch16(prompt, new));
    if r.is_none() && reference.take().is_some() {
        eprintln!("reference failed; going on without it");
    }
    r
}

fn best(rows: impl Iterator<Item = Row>) -> Row {
    rows.max_by(|a, b| a.tok_s.total_cmp(&b.tok_s))
        .expect("at least one round")
}

fn main() {
    let threads: usize = std::env::var("AFNEXT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    // Before rayon's pool exists: the engine's kernels use it.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // As the CLI does (unless `--return-freed-memory`); AFNEXT_BENCH_MALLOC=default measures without it.
    if std::env::var("AFNEXT_BENCH_MALLOC").as_deref() != Ok("default") {
        afnext_model::alloc::retain_freed_memory();
    }
    let quick = std::env::var("AFNEXT_BENCH_QUICK").is_ok();
    let new: u32 = std::env::var("AFNEXT_BENCH_NEW")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 8 } else { 48 });
    let n_rounds: usize = std::env::var("AFNEXT_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 2 })
        .max(1);
    let dtypes = std::env::var("AFNEXT_BENCH_DTYPES").unwrap_or_else(|_| "f32,bf16".into());
    let dir = fixtures().join("ckpt/tiny-a");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("load benchmark: {threads} threads, {new} new tokens per request, greedy, ignore_eos");
    println!(
        "{n_rounds} rounds of concurrency 1, concurrency 16 and transformers' static batch, alternated"
    );
    for name in dtypes.split(',') {
        let dtype = match name {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            other => panic!("unknown dtype {other}"),
        };
        let mut reference = if quick {
            None
        } else {
            LoadRef::start(threads, name)
        };
        let model = AfNext::random(config(), 0, dtype, &Device::Cpu).unwrap();
        let gen = GenerationDefaults::load(&dir, &model.cfg.text).unwrap();
        let proc = PromptProcessor::load(&dir).unwrap();
        let engine = Arc::new(
            Engine::start(
                Arc::new(model),
                Arc::new(proc),
                gen,
                EngineConfig {
                    kv_cache_bytes: 3 << 30,
                    ..EngineConfig::default()
                },
            )
            .unwrap(),
        );
        let (c4, rounds, whole, fu) = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let srv = tokio::spawn(afnext_server::serve(
                engine.clone(),
                ServerConfig::default(),
                Default::default(),
                l,
                async move {
                    let _ = stop_rx.await;
                },
            ));
            let mut c = AfNextClient::connect(format!("http://{addr}"))
                .await
                .unwrap()
                .max_encoding_message_size(64 << 20);
            // Warm-up.
            one(&mut c, text_request("warm up".into(), 2)).await;
            let per = if quick { 1 } else { 2 };
            let c4 = concurrency(&c, 4, per, new, 0).await;
            // The clients' prompts share the chat template's opening, which the server finds in its prefix
            // cache: it prefills only the rest. The reference, with no such cache, gets prompts as long as
            // what the server prefilled (the same work on both sides: the goal's comparison). Ours first in
            // even rounds, the reference first in odd ones (with the previous round's prompt length).
            let mut rounds = Vec::new();
            let mut prefilled: Option<usize> = None;
            for round in 0..n_rounds {
                let theirs_first = prefilled.filter(|_| round % 2 == 1);
                let mut same = theirs_first.and_then(|p| ask(&mut reference, p, new));
                let c1 = concurrency(&c, 1, per, new, round).await;
                let c16 = concurrency(&c, 16, per, new, round).await;
                let p = c16.prompt_tokens.1.round().max(1.0) as usize;
                prefilled = Some(p);
                if theirs_first.is_none() {
                    same = ask(&mut reference, p, new);
                }
                rounds.push(Round { c1, c16, same });
            }
            // Once, with the whole prompts: what serving these requests with transformers would cost.
            let full = rounds[0].c16.prompt_tokens.0.round() as usize;
            let whole = ask(&mut reference, full, new);
            let fu = if quick {
                None
            } else {
                Some(follow_up(&mut c).await)
            };
            let _ = stop_tx.send(());
            let _ = srv.await;
            (c4, rounds, whole, fu)
        });
        drop(reference);
        println!("\n## {name}");
        println!("| concurrency | tokens/s | x conc. 1 | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) |");
        println!("|---|---|---|---|---|");
        let x16: Vec<f64> = rounds.iter().map(|r| r.c16.tok_s / r.c1.tok_s).collect();
        let same: Vec<f64> = rounds.iter().filter_map(|r| r.same).collect();
        let vs: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.same.map(|t| r.c16.tok_s / t))
            .collect();
        let (full, prefilled) = rounds[0].c16.prompt_tokens;
        let (full, prefilled) = (full.round() as usize, prefilled.round() as usize);
        let (c1, c16) = (
            best(rounds.iter().map(|r| r.c1.clone())),
            best(rounds.iter().map(|r| r.c16.clone())),
        );
        let base = c1.tok_s;
        for r in [&c1, &c4, &c16] {
            println!(
                "| {} | {:.1} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |",
                r.conc,
                r.tok_s,
                r.tok_s / base,
                r.ttft.0 * 1e3,
                r.ttft.1 * 1e3,
                r.itl.0 * 1e3,
                r.itl.1 * 1e3
            );
        }
        println!(
            "(concurrency 1 and 16: the best of {n_rounds} rounds; concurrency 16 over 1 in each round: {})",
            spread(x16)
        );
        match same.iter().copied().reduce(f64::max) {
            Some(t) => println!(
                "transformers static batch 16 ({new} new tokens), {prefilled}-token prompts (what afnext prefilled per request at 16, of {full}): {t:.1} tok/s, best of {} -> afnext at 16 = {:.2}x; per round: {}",
                same.len(),
                c16.tok_s / t,
                spread(vs)
            ),
            None => println!("transformers reference: not run (quick mode or no reference venv)"),
        }
        if let Some(t) = whole {
            println!(
                "transformers static batch 16, the whole {full}-token prompts: {t:.1} tok/s -> afnext at 16 = {:.2}x",
                c16.tok_s / t
            );
        }
        if let Some((first, follow, (prompt, cached))) = fu {
            println!(
                "5-minute clip: first-turn TTFT {:.0} ms, follow-up TTFT {:.0} ms ({:.1}x lower, {cached} of its {prompt} prompt tokens cached)",
                first * 1e3,
                follow * 1e3,
                first / follow
            );
        }
        let st = engine.stats();
        println!(
            "engine: {} steps, {} preemptions, prefix hits {}/{} blocks, {} positions copied from {} partly shared blocks",
            st.steps,
            st.preemptions,
            st.kv.prefix_hits,
            st.kv.prefix_queries,
            st.kv.partial_positions,
            st.kv.partial_hits
        );
        drop(engine);
        std::thread::sleep(Duration::from_millis(100));
    }
}
