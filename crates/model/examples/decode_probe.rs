//! Decode steps of the CLI's path in isolation: the model bench's Qwen2.5-0.5B-shaped random decoder with
//! bf16 weights over the contiguous cache (`KvCache`, what `afnext generate` and the model bench's decode
//! row run; the engine's paged steps are `step_probe`). Prefills a prompt of `AFNEXT_PROBE_PROMPT` tokens
//! (default 100, the bench's), then times `AFNEXT_PROBE_STEPS` greedy steps (default 64) and prints the mean
//! step split into the forward pass, the logits and the argmax.
//! Run: `RAYON_NUM_THREADS=2 cargo run --release -p afnext-model --example decode_probe`.

use afnext_model::config::AfNextConfig;
use afnext_model::decoder::{KvCache, Qwen2};
use afnext_model::weights::Weights;
use candle_core::{DType, Device, Tensor, D};
use std::time::{Duration, Instant};

/// The number in environment variable `name`, or `default` when it is unset or not a number.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn greedy(logits: &Tensor) -> u32 {
    logits
        .argmax(D::Minus1)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<u32>())
        .expect("argmax of the logits")[0]
}

fn main() {
    // As the CLI does.
    afnext_model::alloc::retain_freed_memory();
    let v = serde_json::json!({
        "audio_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 128, "num_mel_bins": 128, "max_source_positions": 1500},
        "text_config": {"vocab_size": 151672, "hidden_size": 896, "intermediate_size": 4864,
                        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000.0},
                        "tie_word_embeddings": true, "max_position_embeddings": 32768},
    });
    let cfg = AfNextConfig::from_json(&v).expect("probe config");
    let weights = Weights::random(0, true, DType::BF16, &Device::Cpu);
    let dec = Qwen2::load(&weights, &cfg.text).expect("decoder");
    let prompt_len = env_usize("AFNEXT_PROBE_PROMPT", 100).max(1);
    let steps = env_usize("AFNEXT_PROBE_STEPS", 64).max(1);

    let prompt: Vec<u32> = (0..prompt_len as u32).collect();
    let mut cache = KvCache::new(cfg.text.num_hidden_layers);
    let h = dec
        .forward(&dec.embed(&prompt).expect("embed"), &mut cache)
        .expect("prefill");
    let last = h.narrow(1, prompt_len - 1, 1).expect("last position");
    let mut tok = greedy(&dec.logits(&last).expect("logits"));

    let (mut forward, mut logits, mut argmax) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let start = Instant::now();
    for _ in 0..steps {
        let t0 = Instant::now();
        let h = dec
            .forward(&dec.embed(&[tok]).expect("embed"), &mut cache)
            .expect("forward");
        let t1 = Instant::now();
        let l = dec.logits(&h).expect("logits");
        let t2 = Instant::now();
        tok = greedy(&l);
        forward += t1 - t0;
        logits += t2 - t1;
        argmax += t2.elapsed();
    }
    let total = start.elapsed().as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() / steps as f64 * 1e3;
    println!(
        "prompt {prompt_len}, {steps} steps: {:.2} ms per step ({:.2} tok/s): forward {:.2}, logits {:.2}, argmax {:.2}",
        total / steps as f64 * 1e3,
        steps as f64 / total,
        ms(forward),
        ms(logits),
        ms(argmax)
    );
}
