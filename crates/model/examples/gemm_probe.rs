//! The CPU GEMM of `cpu_gemm` in isolation, at the encoder's shapes by default, against nothing: a
//! diagnostic for kernel work (the comparison with transformers is `cargo bench -p afnext-model --bench
//! model`). Run: `RAYON_NUM_THREADS=2 cargo run --release -p afnext-model --example gemm_probe [MxNxK;...]`.
//! Prints the best and median GFLOP/s of repeated `y = x W^T` products. `gemm_probe amx [MxNxK;...]` times
//! the bf16 AMX kernel of `cpu_amx` instead (where the CPU has it); `gemm_probe bf16 [MxNxK;...]` the same
//! kernel with bf16 weights (what a bf16 model runs on a CPU without AMX); `gemm_probe dp [MxNxK;...]` the
//! bf16 kernel of `cpu_dpbf16` (`vdpbf16ps`, where the CPU has AVX512-BF16). `AFNEXT_PROBE_COLD_MB=N` cycles
//! through copies of the weight, N MiB in all, so that every product streams it from memory.

use afnext_model::cpu_amx::AmxWeight;
use afnext_model::cpu_dpbf16::DpWeight;
use afnext_model::cpu_gemm::PackedWeight;
use half::bf16;
use std::time::Instant;

fn main() {
    // As the CLI does: results are not faulted in afresh on every product.
    afnext_model::alloc::retain_freed_memory();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let amx = args.first().map(String::as_str) == Some("amx");
    if amx {
        args.remove(0);
        assert!(afnext_model::cpu_amx::available(), "no AMX-BF16 here");
    }
    let bf16_weights = args.first().map(String::as_str) == Some("bf16");
    if bf16_weights {
        args.remove(0);
    }
    let dp = args.first().map(String::as_str) == Some("dp");
    if dp {
        args.remove(0);
        assert!(afnext_model::cpu_dpbf16::available(), "no AVX512-BF16 here");
    }
    let shapes: Vec<(usize, usize, usize)> = args
        .first()
        .map(|s| {
            s.split(';')
                .map(|t| {
                    let v: Vec<usize> = t.split('x').map(|x| x.parse().unwrap()).collect();
                    (v[0], v[1], v[2])
                })
                .collect()
        })
        .unwrap_or(vec![
            (1500, 1280, 1280),
            (1500, 5120, 1280),
            (1500, 1280, 5120),
        ]);
    for (m, n, k) in shapes {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        // Only the kernel timed is packed (the other's copy of a large weight is wasted memory).
        let x = std::sync::Arc::new(x);
        let to_bf16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<bf16>>();
        let pack = || -> Box<dyn Fn() -> Vec<f32>> {
            let x = x.clone();
            if amx {
                let (aw, ax) = (AmxWeight::pack(&to_bf16(&w), n, k), to_bf16(&x));
                Box::new(move || aw.matmul(&ax, m, None))
            } else if dp {
                let (dw, dx) = (DpWeight::pack(&to_bf16(&w), n, k), to_bf16(&x));
                Box::new(move || dw.matmul(&dx, m, None))
            } else if bf16_weights {
                let pw = PackedWeight::from_bf16(&to_bf16(&w), n, k);
                Box::new(move || pw.matmul(&x, m, None))
            } else {
                let pw = PackedWeight::from_f32(&w, n, k);
                Box::new(move || pw.matmul(&x, m, None))
            }
        };
        // Copies of the weight, taken in turn, so that each product reads it from memory as a decode step
        // does (`AFNEXT_PROBE_COLD_MB` in all, beyond the last-level cache); one copy by default.
        let elem = if amx || dp || bf16_weights { 2 } else { 4 };
        let copies = std::env::var("AFNEXT_PROBE_COLD_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(1, |mb| (mb << 20).div_ceil(n * k * elem).max(1));
        let products: Vec<_> = (0..copies).map(|_| pack()).collect();
        let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(5.0, 2000.0) as usize;
        let mut ts = vec![];
        for rep in 0..reps {
            let product = &products[rep % copies];
            let t = Instant::now();
            let y = product();
            std::hint::black_box(&y);
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let g = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "{m}x{n}x{k}: best {:.1} GFLOP/s, median {:.1}",
            g(ts[0]),
            g(ts[reps / 2])
        );
    }
}
