//! With feature `cuda`, compiles this crate's CUDA kernels (`kernels/*.cu`) to PTX with `nvcc`, for the
//! compute capability in `CUDA_COMPUTE_CAP` (default 90: H100/H200), as candle's own kernels are built; the
//! PTX is embedded and loaded on first use. Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["softmax", "elementwise"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for k in KERNELS {
        let src = format!("kernels/{k}.cu");
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")])
            .arg("-o")
            .arg(out.join(format!("{k}.ptx")))
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} for {src} (see docs/GPU.md): {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
