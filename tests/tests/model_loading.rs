//! Checkpoint loading: both weight-name layouts, sharded files, bf16 storage, clear errors for a missing or
//! mis-shaped tensor; RoTE and RoPE tables against transformers and the spec's bit-exact tables.

use std::collections::BTreeMap;
use std::path::Path;

use afnext_e2e::{ckpt, fixtures_dir, get, load_tensors, tempdir, Tensor as FxTensor};
use afnext_model::config::RoteConfig;
use afnext_model::decoder::Rope;
use afnext_model::{rote, AfNext, ModelError};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Copies tiny-a into `dst`, rewriting its weights through `map` (return None to drop a tensor) into `shards`
/// files (with an index when more than one).
fn rewrite(dst: &Path, shards: usize, map: impl Fn(&str, &FxTensor) -> Option<(String, FxTensor)>) {
    let src = ckpt("tiny-a");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    let tensors: BTreeMap<String, FxTensor> = load_tensors(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(n, t)| map(&n, &t))
        .collect();
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let views: Vec<(String, TensorView<'_>)> = chunk
            .iter()
            .map(|n| {
                let t = &tensors[*n];
                (
                    (*n).clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
                )
            })
            .collect();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
        safetensors::tensor::serialize_to_file(views, None, &dst.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// transformers' in-memory names for a legacy (saved) name.
fn in_memory_name(n: &str) -> String {
    if let Some(r) = n.strip_prefix("language_model.model.") {
        format!("model.language_model.{r}")
    } else if n == "language_model.lm_head.weight" {
        "lm_head.weight".into()
    } else {
        format!("model.{n}")
    }
}

fn to_bf16(t: &FxTensor) -> FxTensor {
    let v = t.f32().unwrap();
    let bytes = v
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    FxTensor {
        dtype: Dtype::BF16,
        shape: t.shape.clone(),
        bytes,
    }
}

/// Logits of a short text prompt (no audio): enough to tell two loads apart.
fn logits(dir: &Path, dtype: DType) -> Vec<f32> {
    let m = AfNext::load(dir, dtype, &Device::Cpu).unwrap();
    let e = m.embed_prompt(&[385, 10, 20, 30, 386], None).unwrap();
    let mut cache = m.new_cache();
    let h = m.prefill(&e, &mut cache, 64, true).unwrap();
    m.decoder
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sharded_in_memory_layout_equals_single_file() {
    let base = logits(&ckpt("tiny-a"), DType::F32);
    let d = tempdir("load-sharded");
    rewrite(&d, 3, |n, t| Some((in_memory_name(n), t.clone())));
    assert!(d.join("model-00002-of-00003.safetensors").exists());
    assert_eq!(logits(&d, DType::F32), base);
}

#[test]
fn bf16_weights_load_in_f32_and_bf16() {
    let d = tempdir("load-bf16");
    rewrite(&d, 1, |n, t| Some((n.to_string(), to_bf16(t))));
    let base = logits(&ckpt("tiny-a"), DType::F32);
    let up = logits(&d, DType::F32);
    let worst = base
        .iter()
        .zip(&up)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // bf16 storage rounds every weight by up to 2^-9 relative; on this 2-layer model that moves logits by
    // a few hundredths, never by whole units.
    eprintln!("bf16-stored weights computed in f32: logits max abs diff {worst:e}");
    assert!(worst > 0.0 && worst < 0.25, "{worst}");
    let b = logits(&d, DType::BF16);
    assert_eq!(b.len(), base.len());
}

#[test]
fn missing_tensor_is_named() {
    let d = tempdir("load-missing");
    rewrite(&d, 1, |n, t| {
        (n != "language_model.model.norm.weight").then(|| (n.to_string(), t.clone()))
    });
    let e = AfNext::load(&d, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    assert!(
        e.to_string().contains("language_model.model.norm.weight"),
        "{e}"
    );
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let d = tempdir("load-shape");
    rewrite(&d, 1, |n, t| {
        let mut t = t.clone();
        if n == "audio_tower.layers.1.fc1.weight" {
            // [128, 64] stored as [64, 128]: same bytes, wrong shape.
            t.shape = vec![64, 128];
        }
        Some((n.to_string(), t))
    });
    let e = AfNext::load(&d, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("audio_tower.layers.1.fc1.weight")
            && e.contains("[64, 128]")
            && e.contains("[128, 64]"),
        "{e}"
    );
}

#[test]
fn flat_rope_theta_spelling_is_accepted() {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt("tiny-a").join("config.json")).unwrap())
            .unwrap();
    let nested = afnext_model::AfNextConfig::from_json(&v).unwrap();
    let t = v["text_config"].as_object_mut().unwrap();
    t.remove("rope_parameters");
    t.insert("rope_theta".into(), serde_json::json!(15300000.0));
    let top = v.as_object_mut().unwrap();
    top.remove("rope_parameters");
    top.insert("rope_theta".into(), serde_json::json!(1200.0));
    top.insert("partial_rotary_factor".into(), serde_json::json!(0.2));
    // Overwritten-at-load fields must not leak into the model.
    top.insert("head_dim".into(), serde_json::json!(7));
    top.insert("max_position_embeddings".into(), serde_json::json!(3));
    assert_eq!(afnext_model::AfNextConfig::from_json(&v).unwrap(), nested);
}

#[test]
fn fields_the_reference_ignores_are_ignored_and_unsupported_ones_refused() {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt("tiny-a").join("config.json")).unwrap())
            .unwrap();
    let base = afnext_model::AfNextConfig::from_json(&v).unwrap();
    // transformers 5.23 computes `embed_scale` from `scale_embedding` and never applies it.
    let mut w = v.clone();
    w["audio_config"]["scale_embedding"] = serde_json::json!(true);
    assert_eq!(afnext_model::AfNextConfig::from_json(&w).unwrap(), base);
    // A sliding window that no layer uses (Qwen2's rules) is full attention.
    let mut w = v.clone();
    w["text_config"]["use_sliding_window"] = serde_json::json!(true);
    w["text_config"]["sliding_window"] = serde_json::json!(4096);
    assert_eq!(afnext_model::AfNextConfig::from_json(&w).unwrap(), base);
    let layers = v["text_config"]["num_hidden_layers"].as_u64().unwrap();
    let t = w["text_config"].as_object_mut().unwrap();
    t.remove("layer_types");
    t.insert("max_window_layers".into(), serde_json::json!(layers - 1));
    let e = afnext_model::AfNextConfig::from_json(&w)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("use_sliding_window") && e.contains("1 sliding-window layers"),
        "{e}"
    );
    for (section, key, value) in [
        ("text_config", "hidden_act", "gelu"),
        ("audio_config", "activation_function", "relu"),
    ] {
        let mut w = v.clone();
        w[section][key] = serde_json::json!(value);
        let e = afnext_model::AfNextConfig::from_json(&w)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{section}.{key}")) && e.contains(value),
            "{e}"
        );
    }
}

/// The spec's bit-exact tables (copied from the model spec; the model crate builds them in).
fn spec_table(key: &str) -> Vec<f32> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/model/tables/rope_inv_freq_tables.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v[key]["inv_freq_f32"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn inverse_frequencies_are_bit_exact() {
    assert_eq!(rote::inv_freq(1200.0, 256), spec_table("rote_audio"));
    assert_eq!(
        Rope::new(15_300_000.0, 128).inv_freq(),
        spec_table("qwen2_decoder").as_slice()
    );
    // The tiny configs' tables (not built in) are computed and matched transformers in the golden tests.
}

/// A 30-minute input: 60 windows of tables at the real width (512), checked against transformers' own
/// MusicFlamingoRotaryEmbedding (fixture `ref/rote_60w`), without an encoder. Timestamps and the window axis
/// are bit-exact; cos/sin of phases up to ~44 000 rad within 2 ulp of torch's.
#[test]
fn rote_tables_for_sixty_windows() {
    let r = load_tensors(&fixtures_dir().join("ref/rote_60w.safetensors")).unwrap();
    assert_eq!(
        rote::inv_freq(1200.0, 256),
        get(&r, "inv_freq").unwrap().f32().unwrap()
    );
    let cfg = RoteConfig {
        theta: 1200.0,
        partial_rotary_factor: 0.2,
        audio_frame_step: 0.01,
    };
    let t = rote::tables(&cfg, 1280, 750, &(0..60).collect::<Vec<_>>());
    let rows: Vec<usize> = get(&r, "rows")
        .unwrap()
        .i64()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let cols: Vec<usize> = get(&r, "cols")
        .unwrap()
        .i64()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let ts: Vec<f32> = (0..60)
        .flat_map(|k| rows.iter().map(move |&t| (k, t)))
        .map(|(k, row)| t.timestamps[k * 750 + row])
        .collect();
    assert_eq!(ts, get(&r, "rote_timestamps").unwrap().f32().unwrap());
    for (name, ours) in [("rote_cos", &t.cos), ("rote_sin", &t.sin)] {
        let want = get(&r, name).unwrap().f32().unwrap();
        let mut i = 0;
        let mut worst = 0i64;
        for k in 0..60 {
            for &row in &rows {
                for &c in &cols {
                    let a = ours[(k * 750 + row) * 512 + c];
                    let b = want[i];
                    i += 1;
                    let ulp = (a.to_bits() as i64 - b.to_bits() as i64).abs();
                    assert!(
                        ulp <= 2 || (a - b).abs() < 1e-7,
                        "{name} window {k} row {row} col {c}: {a} vs {b}"
                    );
                    worst = worst.max(ulp);
                }
            }
        }
        eprintln!("{name}: 60 windows, worst {worst} ulp");
    }
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
