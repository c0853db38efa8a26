//! Cluster benchmark (not a test): a 10-minute clip (20 windows) with a mid-size encoder, through a router,
//! a decoder and 1 or 2 encoder workers as real processes on loopback, each encoder limited to one thread.
//!
//! * encoder scaling: time until every window is encoded and delivered, 1 vs 2 workers (the decoder waits
//!   for all windows, so it does not compete for the cores meanwhile);
//! * streaming prefill: time to first token when the decoder prefills each window as it arrives, against
//!   encode-everything-first (`--no-streaming-prefill`), with 2 workers.
//!
//! Weights are random (`--random-weights`): only speed is measured. Every run sends a different clip so
//! no cache helps. Run: `cargo build --release -p afnext-cli && cargo bench -p afnext-e2e --bench cluster`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use afnext_e2e::cluster::router;
use afnext_e2e::grpc::{text, user};
use afnext_e2e::{afnext_bin, ckpt, Server};
use afnext_server::pb;

/// A mid-size checkpoint directory: tiny-a's tokenizer and processor, a larger config, no weights.
fn mid_size() -> PathBuf {
    let dir = std::env::temp_dir().join("afnext-bench-mid");
    std::fs::create_dir_all(&dir).unwrap();
    let src = ckpt("tiny-a");
    for f in [
        "chat_template.jinja",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let a = &mut c["audio_config"];
    a["hidden_size"] = 384.into();
    a["intermediate_size"] = 1536.into();
    a["num_attention_heads"] = 6.into();
    a["num_hidden_layers"] = 4.into();
    let t = &mut c["text_config"];
    t["hidden_size"] = 256.into();
    t["intermediate_size"] = 1024.into();
    t["num_attention_heads"] = 4.into();
    t["num_key_value_heads"] = 2.into();
    t["num_hidden_layers"] = 4.into();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    dir
}

/// 16-bit mono WAV at 16 kHz of `seconds` of tones and noise; `seed` makes every clip different.
fn clip(seconds: usize, seed: u32) -> Vec<u8> {
    let n = seconds * 16_000;
    let mut b = Vec::with_capacity(44 + 2 * n);
    let le32 = |b: &mut Vec<u8>, x: u32| b.extend_from_slice(&x.to_le_bytes());
    b.extend_from_slice(b"RIFF");
    le32(&mut b, 36 + 2 * n as u32);
    b.extend_from_slice(b"WAVEfmt ");
    le32(&mut b, 16);
    b.extend_from_slice(&[1, 0, 1, 0]);
    le32(&mut b, 16_000);
    le32(&mut b, 32_000);
    b.extend_from_slice(&[2, 0, 16, 0]);
    b.extend_from_slice(b"data");
    le32(&mut b, 2 * n as u32);
    let mut x = seed | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let t = i as f32 / 16_000.0;
        let v = 0.3 * (t * 440.0 * std::f32::consts::TAU).sin()
            + 0.2 * (t * (200.0 + seed as f32) * std::f32::consts::TAU).sin()
            + 0.05 * ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5);
        b.extend_from_slice(&((v * 20_000.0) as i16).to_le_bytes());
    }
    b
}

/// `afnext ARGS`; `one_thread`: its compute limited to one thread.
fn spawn(args: &[&str], one_thread: bool) -> Server {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if one_thread {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let s = Server::spawn(&args);
    std::env::remove_var("RAYON_NUM_THREADS");
    s
}

struct Times {
    encoded: Duration,
    ttft: Duration,
    total: Duration,
}

async fn one_request(router: &Server, seed: u32) -> Times {
    let mut c = router.client().await;
    let r = pb::GenerateRequest {
        messages: vec![user(vec![
            pb::Part {
                kind: Some(pb::part::Kind::Audio(pb::AudioPart {
                    source: Some(pb::audio_part::Source::Data(clip(600, seed))),
                    format: 0,
                })),
            },
            text("Describe the recording."),
        ])],
        max_new_tokens: Some(4),
        ignore_eos: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut s = c.generate(r).await.unwrap().into_inner();
    let (mut encoded, mut ttft) = (None, None);
    while let Some(m) = s.message().await.unwrap() {
        match m.event.unwrap() {
            pb::generate_response::Event::Progress(p) if p.windows_done == p.windows_total => {
                encoded.get_or_insert(t0.elapsed());
            }
            pb::generate_response::Event::Delta(_) => {
                ttft.get_or_insert(t0.elapsed());
            }
            _ => {}
        }
    }
    Times {
        encoded: encoded.expect("progress events"),
        ttft: ttft.expect("a token"),
        total: t0.elapsed(),
    }
}

/// The median (by total time) of `runs` requests through a fresh cluster of `encoders` workers.
async fn measure(dir: &Path, encoders: usize, streaming: bool, runs: u32, seed: &mut u32) -> Times {
    let d = dir.display().to_string();
    let mut dec_args = vec![
        "decoder",
        "--model",
        &d,
        "--random-weights",
        "1",
        "--listen",
        "127.0.0.1:0",
    ];
    if !streaming {
        dec_args.push("--no-streaming-prefill");
    }
    let dec = spawn(&dec_args, false);
    let encs: Vec<Server> = (0..encoders)
        .map(|_| {
            spawn(
                &[
                    "encoder",
                    "--model",
                    &d,
                    "--random-weights",
                    "1",
                    "--listen",
                    "127.0.0.1:0",
                ],
                true,
            )
        })
        .collect();
    let enc_addrs: Vec<&str> = encs.iter().map(|e| e.addr.as_str()).collect();
    let rt = router(&[&dec.addr], &enc_addrs, &[]);
    let mut all = Vec::new();
    for _ in 0..runs {
        *seed += 1;
        all.push(one_request(&rt, *seed).await);
    }
    all.sort_by_key(|t| t.total);
    all.swap_remove(all.len() / 2)
}

#[tokio::main]
async fn main() {
    let _ = afnext_bin();
    let dir = mid_size();
    let mut seed = 0;
    let runs = 3;
    println!(
        "cluster bench: 600 s clip (20 windows), mid-size encoder (4 layers x 384), median of {runs}"
    );
    let one = measure(&dir, 1, false, runs, &mut seed).await;
    let two = measure(&dir, 2, false, runs, &mut seed).await;
    let streamed = measure(&dir, 2, true, runs, &mut seed).await;
    let s = |d: Duration| format!("{:.2}", d.as_secs_f64());
    println!("| setup | all windows encoded (s) | time to first token (s) | total (s) |");
    println!("|---|---|---|---|");
    for (name, t) in [
        ("1 encoder, encode everything first", &one),
        ("2 encoders, encode everything first", &two),
        ("2 encoders, streaming prefill", &streamed),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            s(t.encoded),
            s(t.ttft),
            s(t.total)
        );
    }
    println!(
        "encoder scaling 1 -> 2 workers: {:.2}x (goal >= 1.8x); streaming prefill: time to first token {:.2}x lower",
        one.encoded.as_secs_f64() / two.encoded.as_secs_f64(),
        two.ttft.as_secs_f64() / streamed.ttft.as_secs_f64()
    );
}
