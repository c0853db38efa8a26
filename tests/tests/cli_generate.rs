//! `afnext generate` and the model stages of `afnext inspect`, end to end through the real binary: greedy ids
//! equal transformers', streaming text equals the JSON text, a hub id resolves from an offline cache.

use std::process::Command;

use std::collections::HashMap;
use std::path::Path;

use afnext_e2e::{
    afnext_bin, ckpt, fixtures_dir, get, load_tensors, model_reference, tempdir, Tensor,
};

fn afnext(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(afnext_bin());
    c.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn afnext")
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn reference_ids(ck: &str, case: &str, name: &str) -> Vec<u32> {
    get(&model_reference(ck, case).unwrap(), name)
        .unwrap()
        .ids()
        .unwrap()
}

/// `afnext inspect` of `conv` on `model`: the tensors it writes (to a file named after `tag`, removed after).
fn inspect(model: &Path, conv: &Path, tag: &str) -> HashMap<String, Tensor> {
    let out = std::env::temp_dir().join(format!(
        "afnext-inspect-{tag}-{}.safetensors",
        std::process::id()
    ));
    let o = afnext(
        &[
            "inspect",
            "--model",
            model.to_str().unwrap(),
            "--conversation",
            conv.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = load_tensors(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    t
}

fn generate_json(model: &str, extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let audio = fixtures_dir().join("audio/speech_7s.flac");
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--audio",
        audio.to_str().unwrap(),
        "--prompt",
        "Transcribe the audio.",
        "--max-new-tokens",
        "16",
        "--json",
    ];
    args.extend_from_slice(extra);
    json_of(&afnext(&args, env))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

#[test]
fn greedy_json_equals_transformers_with_and_without_penalty() {
    let model = ckpt("tiny-a");
    let v = generate_json(model.to_str().unwrap(), &[], &[]);
    assert_eq!(
        ids(&v),
        reference_ids("tiny-a", "speech_7s", "gen_greedy_ids")
    );
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["audio_tokens"], 175);
    assert_eq!(v["usage"]["prompt_tokens"], 404);
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["usage"]["audio_seconds"], 7.0);
    for key in ["frontend_s", "encode_s", "prefill_s", "decode_s"] {
        assert!(v["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
    let v = generate_json(
        model.to_str().unwrap(),
        &["--repetition-penalty", "1.2"],
        &[],
    );
    assert_eq!(
        ids(&v),
        reference_ids("tiny-a", "speech_7s", "gen_greedy_ids_rp12")
    );
}

#[test]
fn streamed_text_equals_json_text_and_sampling_is_seeded() {
    let model = ckpt("tiny-b");
    let m = model.to_str().unwrap();
    let sample = [
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "50",
        "--seed",
        "11",
    ];
    let a = generate_json(m, &sample, &[]);
    let b = generate_json(m, &sample, &[]);
    assert_eq!(ids(&a), ids(&b), "same seed, same tokens");
    let mut other = sample;
    other[7] = "12";
    let c = generate_json(m, &other, &[]);
    assert_ne!(ids(&a), ids(&c), "another seed, other tokens");
    let audio = fixtures_dir().join("audio/speech_7s.flac");
    let mut args = vec![
        "generate",
        "--model",
        m,
        "--audio",
        audio.to_str().unwrap(),
        "--prompt",
        "Transcribe the audio.",
        "--max-new-tokens",
        "16",
    ];
    args.extend_from_slice(&sample);
    let o = afnext(&args, &[]);
    assert!(o.status.success());
    let streamed = String::from_utf8(o.stdout).unwrap();
    assert_eq!(streamed.trim_end_matches('\n'), a["text"].as_str().unwrap());
}

/// A hub id resolves from the standard cache layout with HF_HUB_OFFLINE=1 (no network here).
#[test]
fn hub_id_from_offline_cache() {
    let home = tempdir("hf-home");
    let repo = home.join("hub/models--afnext-test--tiny-a");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    for f in std::fs::read_dir(ckpt("tiny-a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let env = [("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let v = generate_json("afnext-test/tiny-a", &[], &env);
    assert_eq!(
        ids(&v),
        reference_ids("tiny-a", "speech_7s", "gen_greedy_ids")
    );
    // Not cached: a clear error, no network attempt.
    let o = afnext(
        &["generate", "--model", "afnext-test/absent", "--prompt", "x"],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("afnext-test/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn inspect_writes_model_stages_under_reference_names() {
    let conv = fixtures_dir().join("speech_40s.conversation.json");
    let t = inspect(&ckpt("tiny-b"), &conv, "model");
    let want = model_reference("tiny-b", "speech_40s").unwrap();
    let l = get(&t, "input_ids").unwrap().shape[1];
    let shape = |n: &str| get(&t, n).unwrap().shape.clone();
    assert_eq!(shape("encoder_output"), vec![2, 750, 48]);
    assert_eq!(shape("post_rote_hidden"), vec![2, 750, 48]);
    assert_eq!(shape("audio_embeds_valid"), vec![1000, 96]);
    assert_eq!(shape("prefill_logits"), vec![1, l, 390]);
    let greedy: Vec<i64> = get(&t, "gen_greedy_ids").unwrap().i64().unwrap();
    assert_eq!(greedy, get(&want, "gen_greedy_ids").unwrap().i64().unwrap());
    // The logits rows the fixture stores, within spec 12's 1e-4.
    let rows = get(&want, "prefill_logits__rows").unwrap().i64().unwrap();
    let all = get(&t, "prefill_logits").unwrap().f32().unwrap();
    let ref_rows = get(&want, "prefill_logits").unwrap().f32().unwrap();
    for (j, &r) in rows.iter().enumerate() {
        for v in 0..390 {
            let d = (all[r as usize * 390 + v] - ref_rows[j * 390 + v]).abs();
            assert!(d < 1e-4, "row {r} vocab {v}: {d}");
        }
    }
}

/// tiny-d's greedy decode of the 40 s clip reaches an eos argmax before step 16: `inspect`'s gen_greedy_ids
/// mask it as the reference's `min_new_tokens=16` does. `generate --min-new-tokens` does the same (without it
/// the answer stops there), and refuses a minimum over the maximum.
#[test]
fn min_new_tokens_masks_eos_in_inspect_and_generate() {
    let conv = fixtures_dir().join("speech_40s.conversation.json");
    let model = ckpt("tiny-d");
    let t = inspect(&model, &conv, "min-new");
    let want = reference_ids("tiny-d", "speech_40s", "gen_greedy_ids");
    assert_eq!(get(&t, "gen_greedy_ids").unwrap().ids().unwrap(), want);
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--conversation",
            conv.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        afnext(&args, &[])
    };
    let v = json_of(&generate(&[
        "--max-new-tokens",
        "16",
        "--min-new-tokens",
        "16",
    ]));
    assert_eq!(ids(&v), want);
    let v = json_of(&generate(&["--max-new-tokens", "16"]));
    assert_eq!(v["finish_reason"], "stop");
    assert!(ids(&v).len() < 16 && want.starts_with(&ids(&v)));
    let o = generate(&["--max-new-tokens", "4", "--min-new-tokens", "5"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("min_new_tokens (5) must be at most max_new_tokens (4)"),
        "{err}"
    );
}

/// The router needs only the tokenizer and configs of a hub model: it starts from a cache without weights,
/// where `serve` cannot.
#[test]
fn the_router_starts_from_a_hub_cache_without_weights() {
    use std::io::{BufRead, BufReader};
    let home = tempdir("hf-home-noweights");
    let repo = home.join("hub/models--afnext-test--noweights");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    for f in std::fs::read_dir(ckpt("tiny-a")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "safetensors") {
            continue;
        }
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let env = [("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let mut child = std::process::Command::new(afnext_bin())
        .args([
            "router",
            "--model",
            "afnext-test/noweights",
            "--listen",
            "127.0.0.1:0",
        ])
        .envs(env)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("afnext serving on"), "{line}");
    let o = afnext(
        &[
            "serve",
            "--model",
            "afnext-test/noweights",
            "--listen",
            "127.0.0.1:0",
        ],
        &env,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("model.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&home);
}
