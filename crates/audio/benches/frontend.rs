//! Log-mel time per 30 s window: afnext against transformers' `WhisperFeatureExtractor`, same clip, same
//! machine, one run. `cargo bench -p afnext-audio --bench frontend`
//!
//! The reference runs in the fixture venv (`tools/fixtures/run.sh` makes it; override with
//! `AFNEXT_REF_PYTHON`). Without it only the afnext rows are printed. `AFNEXT_BENCH_ITERS` sets iterations.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use support::{median, run_reference};

use afnext_audio::{decode_file, plan_windows, Frontend, FrontendConfig, Overflow};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let clip = root.join("tests/fixtures/audio/mix_75s.flac");
    let iters: usize = std::env::var("AFNEXT_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let audio = decode_file(&clip).expect("fixture clip");
    let cfg = FrontendConfig::default();
    let fe = Frontend::new(&cfg).unwrap();
    let chunk = &audio.samples[..cfg.window_samples()];
    let mut out = vec![0.0f32; fe.window_len()];

    // One full window on one thread.
    fe.window_features(chunk, &mut out).unwrap();
    let ours_1t = median(
        (0..iters)
            .map(|_| {
                let t = Instant::now();
                fe.window_features(chunk, &mut out).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    // Whole 75 s clip (3 windows, last one half full) on all cores: the throughput a worker sees.
    let plan = plan_windows(audio.samples.len(), &cfg, Overflow::Reject).unwrap();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let ours_clip = median(
        (0..iters / 4 + 1)
            .map(|_| {
                let t = Instant::now();
                fe.features(&audio.samples, &plan, cores).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );

    let mut rows: Vec<(String, f64)> = vec![
        ("afnext, 1 thread".into(), ours_1t),
        (
            format!("afnext, 75 s clip / 3 windows, {cores} threads (per window)"),
            ours_clip / 3.0,
        ),
    ];
    let npy = std::env::temp_dir().join(format!("afnext-frontend-ref-{}.npy", std::process::id()));
    let iters_arg = iters.to_string();
    let args = [clip.as_os_str(), OsStr::new(&iters_arg), npy.as_os_str()];
    let check = match run_reference("frontend_ref.py", &args) {
        Ok(v) => {
            for (key, label) in [
                (
                    "call_1t",
                    "transformers WhisperFeatureExtractor(...), 1 torch thread",
                ),
                (
                    "call_2t",
                    "transformers WhisperFeatureExtractor(...), 2 torch threads",
                ),
                ("torch_1t", "transformers torch path, 1 thread"),
                ("torch_2t", "transformers torch path, 2 threads"),
                ("numpy_1t", "transformers numpy path"),
            ] {
                rows.push((label.to_string(), v[key].as_f64().unwrap()));
            }
            let check = format!(
                "versions: transformers {}, torch {}, numpy {}; features max abs diff vs reference: {:e}",
                v["transformers"], v["torch"], v["numpy"],
                max_diff_npy(&npy, &out)
            );
            let _ = std::fs::remove_file(&npy);
            check
        }
        Err(why) => why,
    };
    println!("\nlog-mel front end, one 30 s window (128 x 3000), median of {iters} runs\n");
    println!("| implementation | ms / window | afnext 1-thread speed-up |");
    println!("|---|---:|---:|");
    for (name, ms) in &rows {
        println!("| {name} | {ms:.2} | {:.1}x |", ms / ours_1t);
    }
    println!("\n{check}");
}

/// Max abs difference between a float32 .npy written by numpy (header + little-endian data) and ours.
fn max_diff_npy(path: &Path, ours: &[f32]) -> f32 {
    let bytes = std::fs::read(path).expect("reference features");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let data = &bytes[10 + header_len..];
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .zip(ours)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}
