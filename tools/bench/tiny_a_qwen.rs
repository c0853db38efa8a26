//! The configuration of `step_probe` (crates/model/examples) and the load bench (crates/server/benches), each
//! of which includes this file with `#[path]`: tiny-a's checkpoint configuration (its small encoder, and the
//! special ids of its tokenizer) with the Qwen2.5-0.5B-shaped decoder of every CPU benchmark
//! (`configs/qwen2.5-0.5b-text.json`, which the model bench and the transformers references read too).

use std::path::Path;

use afnext_model::AfNextConfig;

/// `tiny_a`: the directory of the tiny-a fixture checkpoint.
pub fn config(tiny_a: &Path) -> AfNextConfig {
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_a.join("config.json")).expect("tiny-a's config.json"),
    )
    .expect("tiny-a's config.json");
    let mut text: serde_json::Value =
        serde_json::from_str(include_str!("configs/qwen2.5-0.5b-text.json")).expect("text config");
    text["eos_token_id"] = 386.into();
    text["pad_token_id"] = 384.into();
    v["text_config"] = text;
    AfNextConfig::from_json(&v).expect("tiny-a with the Qwen2.5-0.5B-shaped decoder")
}
