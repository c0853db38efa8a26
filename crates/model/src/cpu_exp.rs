//! Vectorised exponentials on the CPU: a softmax row's `e[i] = exp(e[i] - m)` and their sum, the same down
//! the columns of the encoder's transposed attention scores, and the GELU.
//!
//! libm's `expf` is one call per element and does not vectorise: it was ~10 % of a bf16 prefill and, in the
//! encoder, runs once per score of every 1500 x 1500 head (1.4 G calls per 30 s window). With AVX-512 the
//! row is done 16 lanes at a time: Cephes' `expf` (`x = n ln2 + r`, ln2 in two parts, a degree-7 polynomial
//! in `r`, `scalef` for the `2^n`), within ~1 ulp of the correctly rounded value. With AVX2 and FMA but no
//! AVX-512 (AMD's Zen 1-3), the same algorithm 8 lanes at a time ([`avx2`]; what this module says of
//! AVX-512 holds for it too). Without either: libm. Either way a row's result depends only on the row.

/// The vector `exp`'s constants, shared by its AVX-512 and AVX2 kernels (and the test's scalar model of
/// them). Below `EXP_LO` it underflows to 0 (as libm's does, give or take the last subnormals); above
/// `EXP_HI` it overflows.
const EXP_LO: f32 = -87.336_55;
const EXP_HI: f32 = 88.722_83;
/// ln 2 in two parts: `r = x - n ln2` as `x - n LN2_HI - n LN2_LO`, the first product exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `(exp(r) - 1 - r) / r^2`, highest degree first (Horner's order).
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// Abramowitz and Stegun 7.1.26: `erf(z) = 1 - t P(t) exp(-z^2)`, `t = 1 / (1 + ERF_P |z|)`, `P`'s
/// coefficients highest degree first.
const ERF_P: f32 = 0.327_591_1;
const ERF_POLY: [f32; 5] = [
    1.061_405_4,
    -1.453_152_1,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];

/// Replaces every `e[i]` with `exp(e[i] - m)` and returns their sum. `-inf` inputs give exact zeros; a NaN
/// stays NaN. With AVX-512, results below f32's normal range (libm's subnormals) are 0: a softmax row's
/// maximum contributes 1, so they never change its result.
pub(crate) fn exp_shifted_sum(e: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_features::avx512f() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { avx512::exp_shifted_sum(e, m) };
        }
        if crate::cpu_features::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::exp_shifted_sum(e, m) };
        }
    }
    let mut s = 0f32;
    for v in e.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    s
}

/// [`exp_shifted_sum`] where `m` is the maximum of `e` (a softmax row's): the same values and sum, bit for
/// bit. With AVX2 it takes the shorter exp of arguments `<= 0`; a decode step's attention over 45 000
/// positions of context computes ~15 M of these exponentials.
pub(crate) fn exp_below_max_sum(e: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if !crate::cpu_features::avx512f() && crate::cpu_features::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { avx2::exp_below_max_sum(e, m) };
    }
    exp_shifted_sum(e, m)
}

/// `e[i] = exp(e[i])` for every element (the SiLU's `exp(-x)`): with AVX-512 16 lanes at a time within ~1 ulp
/// (torch's vectorised SiLU also uses a vectorised `exp`), else libm. Underflow gives 0, overflow `+inf`.
pub(crate) fn exp_in_place(e: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_features::avx512f() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { avx512::exp_in_place(e) };
        }
        if crate::cpu_features::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::exp_in_place(e) };
        }
    }
    for v in e.iter_mut() {
        *v = v.exp();
    }
}

/// `y[i] = silu(g[i]) * u[i]` over f32 (`bf16 = false`) or bf16 bit patterns (`bf16 = true`), rounding as
/// [`crate::elementwise`]'s scalar loop does (to the dtype after the SiLU and after the product), with this
/// module's `exp`: the same bits as that loop, 16 lanes at a time. Returns false (nothing written) without
/// AVX-512.
///
/// # Safety
/// `y`, `g` and `u` hold `n` elements of the dtype each (4 bytes for f32, 2 for bf16).
pub(crate) unsafe fn silu_mul(
    y: *mut u8,
    g: *const u8,
    u: *const u8,
    n: usize,
    bf16: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_features::avx512f() {
            // SAFETY: the CPU has AVX-512F; the caller vouches for the buffers.
            unsafe {
                if bf16 {
                    avx512::silu_mul_bf16(y as *mut u16, g as *const u16, u as *const u16, n);
                } else {
                    avx512::silu_mul_f32(y as *mut f32, g as *const f32, u as *const f32, n);
                }
            }
            return true;
        }
        if crate::cpu_features::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; the caller vouches for the buffers.
            unsafe {
                if bf16 {
                    avx2::silu_mul_bf16(y as *mut u16, g as *const u16, u as *const u16, n);
                } else {
                    avx2::silu_mul_f32(y as *mut f32, g as *const f32, u as *const f32, n);
                }
            }
            return true;
        }
    }
    let _ = (y, g, u, n, bf16);
    false
}

/// The exact (erf) GELU of every `v[i]`, in place, in the reference's form `x / 2 (1 + erf(x / sqrt 2))`.
///
/// With AVX-512, 16 lanes at a time with the erf of Abramowitz and Stegun's 7.1.26 (`1 - t P(t) exp(-z^2)`,
/// `t = 1 / (1 + 0.3275911 |z|)`, absolute error below 1.5e-7): the approximation torch's vectorised CPU GELU
/// uses, so the encoder's activations stay as close to the reference as libm's erf would keep them, at a
/// fraction of the cost (one scalar libm erf per element was ~5 % of the encoder). Without AVX-512: libm.
pub(crate) fn gelu_erf_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_features::avx512f() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { avx512::gelu_erf_in_place(v) };
        }
        if crate::cpu_features::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::gelu_erf_in_place(v) };
        }
    }
    for x in v.iter_mut() {
        *x = crate::elementwise::gelu_erf_f32(*x);
    }
}

/// The unnormalised softmax down every column of `scale * s` (`[rows, cols]` row-major, `rows >= 1`), in
/// place: with `x = scale * s` (one f32 product, as sdpa scales its scores), `s[r][c] = exp(x[r][c] -
/// max_r x[r][c])`; returns each column's `1 / sum`. `-inf` entries (keys a causal query cannot see) give
/// exact zeros and leave the sums unchanged. The encoder's attention
/// computes its scores as `k q^T`, one column per query, and scales its output rows by these reciprocals
/// (as flash attention does) instead of the `1500 x queries` probabilities. Two passes over the rows
/// (maximum; exponentials and their sums, a column's sum taken over the rows in order). With AVX-512, 128
/// columns at a time with the maxima and sums of all of them in registers (kept in memory, each row's update
/// waited on the previous row's masked store).
pub(crate) fn exp_columns(s: &mut [f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    assert_eq!(s.len(), rows * cols, "exp_columns: buffer size");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_features::avx512f() {
            // SAFETY: the CPU has AVX-512F (checked above); the buffer holds rows x cols values.
            return unsafe { avx512::exp_columns(s, rows, cols, scale) };
        }
        if crate::cpu_features::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked above); the buffer holds rows x cols values.
            return unsafe { avx2::exp_columns(s, rows, cols, scale) };
        }
    }
    let mut m = vec![f32::NEG_INFINITY; cols];
    for row in s.chunks(cols) {
        for (m, &v) in m.iter_mut().zip(row) {
            *m = m.max(v * scale);
        }
    }
    let mut sum = vec![0f32; cols];
    for row in s.chunks_mut(cols) {
        for ((v, &m), s) in row.iter_mut().zip(&m).zip(sum.iter_mut()) {
            *v = (*v * scale - m).exp();
            *s += *v;
        }
    }
    sum.iter().map(|&v| 1.0 / v).collect()
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Column groups of `exp_columns`: 8 vectors of maxima and 8 of sums stay in registers.
    const GROUP: usize = 8;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_columns(s: &mut [f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        let base = s.as_mut_ptr();
        let vs = _mm512_set1_ps(scale);
        let mut inv = vec![0f32; cols];
        for g in (0..cols).step_by(GROUP * 16) {
            let width = (cols - g).min(GROUP * 16);
            // Lanes past the group's width are masked: loaded as 0, never stored.
            let mut k = [0 as __mmask16; GROUP];
            for (j, k) in k.iter_mut().enumerate() {
                let lanes = width.saturating_sub(j * 16).min(16);
                *k = ((1u32 << lanes) - 1) as u16;
            }
            let row = |r: usize| base.add(r * cols + g);
            let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); GROUP];
            for r in 0..rows {
                let p = row(r);
                for j in 0..GROUP {
                    let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k[j], p.add(j * 16)), vs);
                    m[j] = _mm512_max_ps(m[j], x);
                }
            }
            let mut sum = [_mm512_setzero_ps(); GROUP];
            for r in 0..rows {
                let p = row(r);
                for j in 0..GROUP {
                    let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k[j], p.add(j * 16)), vs);
                    let e = exp16(_mm512_sub_ps(x, m[j]));
                    _mm512_mask_storeu_ps(p.add(j * 16), k[j], e);
                    sum[j] = _mm512_add_ps(sum[j], e);
                }
            }
            for j in 0..GROUP {
                let v = _mm512_div_ps(_mm512_set1_ps(1.0), sum[j]);
                _mm512_mask_storeu_ps(inv.as_mut_ptr().add(g + j * 16), k[j], v);
            }
        }
        inv
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_erf_in_place(v: &mut [f32]) {
        map16(v, |x| gelu16(x));
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(v: &mut [f32]) {
        map16(v, |x| exp16(x));
    }

    /// `v[i] = op(v[i])`, 16 lanes at a time, the tail masked.
    #[inline(always)]
    unsafe fn map16(v: &mut [f32], op: impl Fn(__m512) -> __m512) {
        let n = v.len();
        let p = v.as_mut_ptr();
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(p.add(i), op(_mm512_loadu_ps(p.add(i))));
            i += 16;
        }
        if i < n {
            let k: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let y = op(_mm512_maskz_loadu_ps(k, p.add(i)));
            _mm512_mask_storeu_ps(p.add(i), k, y);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn gelu16(x: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        let z = _mm512_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
        let a = _mm512_abs_ps(z);
        let t = _mm512_div_ps(c(1.0), _mm512_fmadd_ps(c(ERF_P), a, c(1.0)));
        let mut r = c(ERF_POLY[0]);
        for k in &ERF_POLY[1..] {
            r = _mm512_fmadd_ps(r, t, c(*k));
        }
        // exp(-z^2) (0 where it underflows, as the erf is then 1 to f32 precision).
        let e = exp16(_mm512_sub_ps(c(0.0), _mm512_mul_ps(z, z)));
        let erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, c(1.0));
        // erf is odd: give it z's sign.
        let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
        _mm512_mul_ps(_mm512_mul_ps(x, c(0.5)), _mm512_add_ps(erf, c(1.0)))
    }

    use super::{ERF_P, ERF_POLY, EXP_HI as HI, EXP_LO as LO, EXP_POLY, LN2_HI, LN2_LO};

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

    /// `silu(g) * u` of 16 f32 lanes, each rounded by `round` (to the dtype) where the scalar loop rounds.
    #[inline(always)]
    unsafe fn silu_mul16(g: __m512, u: __m512, round: impl Fn(__m512) -> __m512) -> __m512 {
        let e = exp16(_mm512_xor_ps(g, _mm512_set1_ps(-0.0)));
        let s = round(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e)));
        round(_mm512_mul_ps(s, u))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul_f32(y: *mut f32, g: *const f32, u: *const f32, n: usize) {
        let mut i = 0;
        while i + 16 <= n {
            let v = silu_mul16(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i)), |x| x);
            _mm512_storeu_ps(y.add(i), v);
            i += 16;
        }
        if i < n {
            let k: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let v = silu_mul16(
                _mm512_maskz_loadu_ps(k, g.add(i)),
                _mm512_maskz_loadu_ps(k, u.add(i)),
                |x| x,
            );
            _mm512_mask_storeu_ps(y.add(i), k, v);
        }
    }

    /// bf16 bit patterns in the low halves of 32-bit lanes, widened to f32 (exact).
    #[inline(always)]
    unsafe fn widen16(h: __m512i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
    }

    /// `x` rounded to bf16 as `crate::elementwise::to_bf16` rounds it (to nearest even; a NaN keeps its top
    /// bits, quieted), in the low halves of the lanes.
    #[inline(always)]
    unsafe fn bf16_bits16(x: __m512) -> __m512i {
        let b = _mm512_castps_si512(x);
        let hi = _mm512_srli_epi32::<16>(b);
        let bias = _mm512_add_epi32(
            _mm512_set1_epi32(0x7fff),
            _mm512_and_si512(hi, _mm512_set1_epi32(1)),
        );
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let nan = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
        _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), nan)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul_bf16(y: *mut u16, g: *const u16, u: *const u16, n: usize) {
        let load = |p: *const u16| {
            widen16(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                p as *const __m256i,
            )))
        };
        let round = |x: __m512| widen16(bf16_bits16(x));
        let mut i = 0;
        while i + 16 <= n {
            let v = silu_mul16(load(g.add(i)), load(u.add(i)), round);
            _mm256_storeu_si256(
                y.add(i) as *mut __m256i,
                _mm512_cvtepi32_epi16(bf16_bits16(v)),
            );
            i += 16;
        }
        if i < n {
            // The tail through a zero-padded copy (lanes past it compute silu(0) * 0 and are dropped).
            let (mut gt, mut ut, mut yt) = ([0u16; 16], [0u16; 16], [0u16; 16]);
            std::ptr::copy_nonoverlapping(g.add(i), gt.as_mut_ptr(), n - i);
            std::ptr::copy_nonoverlapping(u.add(i), ut.as_mut_ptr(), n - i);
            let v = silu_mul16(load(gt.as_ptr()), load(ut.as_ptr()), round);
            _mm256_storeu_si256(
                yt.as_mut_ptr() as *mut __m256i,
                _mm512_cvtepi32_epi16(bf16_bits16(v)),
            );
            std::ptr::copy_nonoverlapping(yt.as_ptr(), y.add(i), n - i);
        }
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
        let r = _mm512_fnmadd_ps(n, c(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, c(LN2_LO), r);
        let mut q = c(EXP_POLY[0]);
        for k in &EXP_POLY[1..] {
            q = _mm512_fmadd_ps(q, r, c(*k));
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
        // The plain exponential (the SiLU's) is the same function: the same bits as a shift by 0, with
        // the specials, over full vectors and a masked tail.
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 200.0)
            .chain([f32::NEG_INFINITY, 0.0, -0.0, 200.0, -200.0])
            .collect();
        let (mut a, mut b) = (x.clone(), x);
        exp_in_place(&mut a);
        exp_shifted_sum(&mut b, 0.0);
        assert_eq!(a, b);
    }

    #[test]
    fn exp_below_the_maximum_is_the_shifted_exp_bit_for_bit() {
        let mut seed = 77u64;
        for len in [1, 7, 8, 9, 100, 1001] {
            for spread in [30f32, 300.0] {
                let mut x: Vec<f32> = (0..len)
                    .map(|_| crate::attn_cpu::tests::lcg(&mut seed) / 4.0 * spread)
                    .collect();
                // Causal masks' -inf entries.
                for v in x.iter_mut().skip(3).step_by(5) {
                    *v = f32::NEG_INFINITY;
                }
                let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (mut a, mut b) = (x.clone(), x);
                let (sa, sb) = (exp_below_max_sum(&mut a, m), exp_shifted_sum(&mut b, m));
                assert_eq!(sa.to_bits(), sb.to_bits(), "sum, len {len}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "len {len}, spread {spread}");
            }
        }
    }

    /// The vector kernels' `exp`, one lane at a time in scalar f32 (the same fused multiply-adds, rounding
    /// to nearest even, and `scalef` as the correctly rounded `y * 2^n`, here through f64 where it is exact).
    fn exp_model(x: f32) -> f32 {
        if x.is_nan() {
            return x;
        }
        if x < EXP_LO {
            return 0.0;
        }
        if x > EXP_HI {
            return f32::INFINITY;
        }
        let n = (x * std::f32::consts::LOG2_E).round_ties_even();
        let r = (-n).mul_add(LN2_HI, x);
        let r = (-n).mul_add(LN2_LO, r);
        let mut q = EXP_POLY[0];
        for &k in &EXP_POLY[1..] {
            q = q.mul_add(r, k);
        }
        let y = q.mul_add(r * r, r + 1.0);
        (f64::from(y) * 2f64.powi(n as i32)) as f32
    }

    #[test]
    fn the_vector_exp_is_its_algorithm_bit_for_bit() {
        // On AVX-512 (`scalef`) and on AVX2 (two power-of-two factors) alike; libm is another function.
        if !crate::cpu_features::avx512f() && !crate::cpu_features::avx2_fma() {
            return;
        }
        let (lo, hi) = (EXP_LO, EXP_HI);
        let mut x: Vec<f32> = (-9000..=9000).map(|i| i as f32 / 100.0).collect();
        // Results that are subnormal (n = -126) or need 2^128 (n = 128), and the bounds themselves.
        for edge in [lo, hi] {
            let mut v = edge;
            for _ in 0..2000 {
                x.push(v);
                v = f32::from_bits(v.to_bits() - 1);
            }
            x.push(f32::from_bits(edge.to_bits() + 1));
        }
        x.extend((0..1000).map(|i| -87.0 - i as f32 * 4e-4));
        x.extend((0..1000).map(|i| 88.0 + i as f32 * 8e-4));
        x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-30]);
        let mut got = x.clone();
        exp_in_place(&mut got);
        for (&x, &g) in x.iter().zip(&got) {
            let want = exp_model(x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "exp({x:e}) = {g:e}, the algorithm gives {want:e}"
            );
        }
    }

    #[test]
    fn gelu_is_close_to_the_exact_one() {
        // Every 1/97 from -12 to 12, and lengths off the 16-lane blocks.
        let x: Vec<f32> = (-1164..=1164).map(|i| i as f32 / 97.0).collect();
        for len in [x.len(), 15, 1] {
            let mut g = x[..len].to_vec();
            gelu_erf_in_place(&mut g);
            let mut worst = 0f64;
            for (&g, &x) in g.iter().zip(&x[..len]) {
                let x = f64::from(x);
                let want = 0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2));
                // An erf error of 2e-7 (A&S 7.1.26's 1.5e-7 plus the f32 rounding of its terms) scaled by
                // x / 2, plus a few roundings of the result.
                let bound = 1.0e-7 * x.abs() + 4.0 * f64::from(f32::EPSILON) * want.abs() + 1e-30;
                worst = worst.max((f64::from(g) - want).abs() / bound);
            }
            assert!(worst <= 1.0, "len {len}: {worst} of the bound");
        }
        // Special values as the scalar formula gives them (-inf: -inf * 0, NaN, in both).
        let specials = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-30];
        let mut s = specials;
        gelu_erf_in_place(&mut s);
        for (&g, &x) in s.iter().zip(&specials) {
            let want = crate::elementwise::gelu_erf_f32(x);
            assert!(
                g == want || (g.is_nan() && want.is_nan()),
                "gelu({x}) = {g}, want {want}"
            );
        }
    }

    #[test]
    fn column_softmax_matches_f64() {
        // 37 columns: two full 16-lane blocks and a masked tail; 150: more than one group of 128.
        // Unscaled (the encoder) and scaled with causal -inf entries (the decoder's chunks).
        // A spread of 300: exponentials that underflow to 0 or come out subnormal.
        for (rows, cols, scale, spread) in [
            (150, 37, 1.0, 30.0),
            (9, 150, 1.0, 30.0),
            (150, 37, 0.125, 30.0),
            (40, 150, 0.3, 30.0),
            (200, 64, 1.0, 300.0),
            (60, 96, 0.5, 300.0),
        ] {
            column_softmax_case(rows, cols, scale, spread);
        }
    }

    fn column_softmax_case(rows: usize, cols: usize, scale: f32, spread: f32) {
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * spread)
            .collect();
        if scale != 1.0 {
            // Column c sees rows 0..=c % rows, as a causal block's queries see their keys.
            for (i, v) in x.iter_mut().enumerate() {
                if i / cols > (i % cols) % rows {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        let mut s = x.clone();
        let inv = exp_columns(&mut s, rows, cols, scale);
        // Each exponential is the vector exp's algorithm's, bit for bit (the AVX2 build takes a shorter
        // path for arguments <= 0); the portable build calls libm's.
        if crate::cpu_features::avx512f() || crate::cpu_features::avx2_fma() {
            for c in 0..cols {
                let m = (0..rows).fold(f32::NEG_INFINITY, |m, r| m.max(x[r * cols + c] * scale));
                for r in 0..rows {
                    let want = exp_model(x[r * cols + c] * scale - m);
                    let got = s[r * cols + c];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "({r}, {c}): {got:e} vs {want:e}"
                    );
                }
            }
        }
        for row in s.chunks_mut(cols) {
            for (v, f) in row.iter_mut().zip(&inv) {
                *v *= f;
            }
        }
        for c in 0..cols {
            let col: Vec<f32> = (0..rows).map(|r| x[r * cols + c] * scale).collect();
            let m = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // The differences as f32 computes them (their rounding is every f32 softmax's), the rest in f64.
            let e: Vec<f64> = col.iter().map(|&v| f64::from(v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for r in 0..rows {
                let want = e[r] / z;
                let got = f64::from(s[r * cols + c]);
                assert!(
                    (got - want).abs() <= 4.0 * f64::from(f32::EPSILON) * want + 1e-30,
                    "({r}, {c}): {got} vs {want}"
                );
            }
        }
    }

    /// erf in f64 (candle's libm binding), the reference for the GELU test.
    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
