//! The exponentials of a softmax row on the CPU: `e[i] = exp(e[i] - m)` and their sum.
//!
//! libm's `expf` is one call per element and does not vectorise: it was ~10 % of a bf16 prefill and, in the
//! encoder, runs once per score of every 1500 x 1500 head (1.4 G calls per 30 s window). With AVX-512 the
//! row is done 16 lanes at a time: Cephes' `expf` (`x = n ln2 + r`, ln2 in two parts, a degree-7 polynomial
//! in `r`, `scalef` for the `2^n`), within ~1 ulp of the correctly rounded value. Without AVX-512: libm.
//! Either way a row's result depends only on the row.

/// Replaces every `e[i]` with `exp(e[i] - m)` and returns their sum. `-inf` inputs give exact zeros; a NaN
/// stays NaN. With AVX-512, results below f32's normal range (libm's subnormals) are 0: a softmax row's
/// maximum contributes 1, so they never change its result.
pub(crate) fn exp_shifted_sum(e: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // (std caches the CPU feature query.)
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { avx512::exp_shifted_sum(e, m) };
        }
    }
    let mut s = 0f32;
    for v in e.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Below this `exp` underflows to 0 (as libm's does, give or take the last subnormals).
    const LO: f32 = -87.336_55;
    /// Above this `exp` overflows.
    const HI: f32 = 88.722_83;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_sum(e: &mut [f32], m: f32) -> f32 {
        let n = e.len();
        let p = e.as_mut_ptr();
        let vm = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let y = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vm));
            _mm512_storeu_ps(p.add(i), y);
            acc = _mm512_add_ps(acc, y);
            i += 16;
        }
        if i < n {
            let k: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let y = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), vm));
            let y = _mm512_maskz_mov_ps(k, y);
            _mm512_mask_storeu_ps(p.add(i), k, y);
            acc = _mm512_add_ps(acc, y);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        let xc = _mm512_min_ps(_mm512_max_ps(x, c(LO)), c(HI));
        // n = round(x / ln2), r = x - n ln2 with ln2 = 0.693359375 - 2.12194440e-4 (exact first part).
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, c(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, c(0.693_359_4), xc);
        let r = _mm512_fnmadd_ps(n, c(-2.121_944_4e-4), r);
        let mut q = c(1.987_569_2e-4);
        for k in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            q = _mm512_fmadd_ps(q, r, c(k));
        }
        let y = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), _mm512_add_ps(r, c(1.0)));
        let y = _mm512_scalef_ps(y, n);
        // Out of range and NaN, as libm: 0 below, +inf above, NaN through.
        let y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, c(LO)), c(0.0));
        let y = _mm512_mask_mov_ps(
            y,
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, c(HI)),
            c(f32::INFINITY),
        );
        _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_libm_within_an_ulp_or_two() {
        let mut worst_ulp = 0f64;
        for len in (0..40).chain([1000, 1500]) {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 180.0)
                .collect();
            let m = 3.25f32;
            let mut e = x.clone();
            let s = exp_shifted_sum(&mut e, m);
            let mut want_sum = 0f64;
            for (&g, &v) in e.iter().zip(&x) {
                let want = ((v - m) as f64).exp();
                want_sum += want;
                if want < f32::MIN_POSITIVE as f64 * 4.0 || want > f32::MAX as f64 / 4.0 {
                    continue;
                }
                let ulp = (want as f32).abs() * f32::EPSILON;
                worst_ulp = worst_ulp.max((g as f64 - want).abs() / ulp as f64);
            }
            // (Sums below f32's normal range are libm's subnormals, flushed to 0 here; above it, inf.)
            if want_sum > f32::MIN_POSITIVE as f64 * 4.0 && want_sum < f32::MAX as f64 / 4.0 {
                assert!(((s as f64) - want_sum).abs() / want_sum < 1e-5, "{len}");
            }
        }
        eprintln!("exp_shifted_sum: worst {worst_ulp:.2} ulp");
        assert!(worst_ulp <= 2.0, "{worst_ulp} ulp");
        let mut e = vec![f32::NEG_INFINITY, 0.0, f32::NAN, 200.0];
        exp_shifted_sum(&mut e, 0.0);
        assert_eq!(e[0], 0.0);
        assert_eq!(e[1], 1.0);
        assert!(e[2].is_nan());
        assert_eq!(e[3], f32::INFINITY);
    }
}
