//! Resampling to 16 kHz: afnext against soxr HQ (what transformers' `load_audio` uses), same signals, same
//! machine, one run. `cargo bench -p afnext-audio --bench resample`
//!
//! The reference runs in the fixture venv (`tools/fixtures/run.sh` makes it; override with
//! `AFNEXT_REF_PYTHON`). Without it only the afnext rows are printed. `AFNEXT_BENCH_SECONDS` sets the signal
//! length (default 600 s), `AFNEXT_BENCH_ITERS` the iterations (default 5).

mod support;

use std::ffi::OsStr;
use std::time::Instant;

use support::{median, run_reference};

const RATES: [u32; 4] = [8000, 22050, 44100, 48000];

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Speech-band tones, a tone near Nyquist and seeded noise (a linear congruential generator).
fn signal(rate: u32, seconds: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ u64::from(rate);
    (0..rate as usize * seconds)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let noise = ((state >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 0.05;
            (0.3 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                + 0.1 * (2.0 * std::f64::consts::PI * 3700.0 * t).sin()
                + noise) as f32
        })
        .collect()
}

fn main() {
    let seconds = env_or("AFNEXT_BENCH_SECONDS", 600);
    let iters = env_or("AFNEXT_BENCH_ITERS", 5);
    let dir = std::env::temp_dir().join(format!("afnext-resample-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ours = Vec::new();
    for rate in RATES {
        let x = signal(rate, seconds);
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{rate}.f32")), bytes).unwrap();
        let y = afnext_audio::resample(&x, rate, 16000).unwrap();
        let ms = median(
            (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(afnext_audio::resample(&x, rate, 16000).unwrap());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        ours.push((rate, ms, y));
    }
    let iters_arg = iters.to_string();
    let reference = run_reference(
        "resample_ref.py",
        &[OsStr::new(&iters_arg), dir.as_os_str()],
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nresampling {seconds} s to 16 kHz, median of {iters} runs (afnext: up to {threads} threads; soxr: one)\n");
    println!("| rate (Hz) | afnext (ms) | soxr HQ (ms) | afnext / soxr | rms diff from soxr | max abs diff |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (rate, ms, y) in &ours {
        let Ok(v) = &reference else {
            println!("| {rate} | {ms:.1} | - | - | - | - |");
            continue;
        };
        let bytes = std::fs::read(dir.join(format!("{rate}.soxr.f32"))).unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(want.len(), y.len(), "{rate} Hz: length");
        let d: Vec<f64> = y
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a - b).abs())
            .collect();
        let rms = (d.iter().map(|v| v * v).sum::<f64>() / d.len() as f64).sqrt();
        let worst = d.iter().copied().fold(0.0, f64::max);
        let soxr_ms = v["ms"][rate.to_string()].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {rate} | {ms:.1} | {soxr_ms:.1} | {:.2}x | {rms:.1e} | {worst:.1e} |",
            ms / soxr_ms
        );
    }
    match &reference {
        Ok(v) => println!("\nsoxr {}", v["soxr"]),
        Err(why) => println!("\n{why}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
