//! Run-time CPU feature checks shared by the CPU kernels, each of which keeps a portable path for CPUs
//! without the feature (std caches the query, so a call costs an atomic load).

/// AVX-512 Foundation: 16-lane f32 vectors and masks (the attention, exponential and GEMM kernels).
pub(crate) fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 Byte and Word: 16-bit lanes (the GEMM's bf16 widening, with [`avx512f`]).
pub(crate) fn avx512bw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 with FMA: 8-lane f32 vectors and fused multiply-adds (the GEMM's tile on CPUs without AVX-512).
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
