//! [`super`]'s kernels 8 lanes at a time with AVX2 and FMA (x86-64 CPUs without AVX-512, such as AMD's
//! Zen 1-3), with the same polynomials and operations as the AVX-512 ones: each element's `exp`, GELU and
//! SiLU come out as they do there (`2^n` is applied as two exact power-of-two factors, which rounds once,
//! as `scalef` does). Sums over lanes are taken in another order than with 16 lanes, so a softmax's sum can
//! differ from the AVX-512 one in its last bits; on one machine it depends only on its row, as there.
//!
//! Without masked loads and stores of single lanes, tails go through zero-padded copies.

use std::arch::x86_64::*;

use super::{ERF_P, ERF_POLY, EXP_HI as HI, EXP_LO as LO, EXP_POLY, LN2_HI, LN2_LO};

/// `f` over `n` values at `src` into `dst` (which may be `src`), 8 at a time, the tail through a copy padded
/// with `pad`.
#[inline(always)]
unsafe fn map8(dst: *mut f32, src: *const f32, n: usize, pad: f32, f: impl Fn(__m256) -> __m256) {
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(dst.add(i), f(_mm256_loadu_ps(src.add(i))));
        i += 8;
    }
    if i < n {
        let mut t = [pad; 8];
        std::ptr::copy_nonoverlapping(src.add(i), t.as_mut_ptr(), n - i);
        _mm256_storeu_ps(t.as_mut_ptr(), f(_mm256_loadu_ps(t.as_ptr())));
        std::ptr::copy_nonoverlapping(t.as_ptr(), dst.add(i), n - i);
    }
}

/// Lanes where `mask` is set take `b`, the others `a`.
#[inline(always)]
unsafe fn select(a: __m256, b: __m256, mask: __m256) -> __m256 {
    _mm256_blendv_ps(a, b, mask)
}

/// The part of `exp(xc)` that [`exp8`] and [`exp8_nonpos`] share, for `xc` clamped to `LO..=HI`: `n =
/// round(xc / ln2)` as integers and `y = exp(r)` by the polynomial, `r = xc - n ln2` (`LN2_HI` + `LN2_LO`),
/// so that `exp(xc) = y * 2^n`.
#[inline(always)]
unsafe fn reduced(xc: __m256) -> (__m256i, __m256) {
    let c = _mm256_set1_ps;
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        c(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, c(LN2_HI), xc);
    let r = _mm256_fnmadd_ps(n, c(LN2_LO), r);
    let mut q = c(EXP_POLY[0]);
    for k in &EXP_POLY[1..] {
        q = _mm256_fmadd_ps(q, r, c(*k));
    }
    let y = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), _mm256_add_ps(r, c(1.0)));
    (_mm256_cvtps_epi32(n), y)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let (ni, y) = reduced(_mm256_min_ps(_mm256_max_ps(x, c(LO)), c(HI)));
    // y * 2^n for n in -126..=128: 2^(n >> 1) then 2^(n - (n >> 1)), both normal; the first product is
    // exact, the second rounds once (to a subnormal or to infinity where the result is one).
    let n1 = _mm256_srai_epi32::<1>(ni);
    let n2 = _mm256_sub_epi32(ni, n1);
    let pow2 = |e: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    };
    let y = _mm256_mul_ps(_mm256_mul_ps(y, pow2(n1)), pow2(n2));
    // Out of range and NaN, as libm: 0 below, +inf above, NaN through.
    let y = select(y, c(0.0), _mm256_cmp_ps::<_CMP_LT_OQ>(x, c(LO)));
    let y = select(y, c(f32::INFINITY), _mm256_cmp_ps::<_CMP_GT_OQ>(x, c(HI)));
    select(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}

/// [`exp8`] for arguments that are at most 0, or NaN: a softmax's `x - max`. It gives the same bits there
/// with 8 vector operations fewer, a quarter of the column softmax's work (an encoder window's attention
/// spends a fifth of its time in it on an EPYC Zen 3): `n` is then in `-126..=0`, so `2^n` is one normal
/// float and `y * 2^n` rounds once, as the two factors of [`exp8`] do; nothing overflows.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8_nonpos(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let (n, y) = reduced(_mm256_max_ps(x, c(LO)));
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        n,
        _mm256_set1_epi32(127),
    )));
    // Below `LO`: +0 (the mask is clear there, and for NaN, which the select passes through).
    let y = _mm256_and_ps(
        _mm256_mul_ps(y, pow2),
        _mm256_cmp_ps::<_CMP_GE_OQ>(x, c(LO)),
    );
    select(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_in_place(v: &mut [f32]) {
    let p = v.as_mut_ptr();
    map8(p, p, v.len(), 0.0, |x| exp8(x));
}

/// `e[i] = f(e[i] - m)`, returning their sum (the tail's own lanes only).
#[inline(always)]
unsafe fn shifted_sum(e: &mut [f32], m: f32, f: impl Fn(__m256) -> __m256) -> f32 {
    let n = e.len();
    let p = e.as_mut_ptr();
    let vm = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let y = f(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
        _mm256_storeu_ps(p.add(i), y);
        acc = _mm256_add_ps(acc, y);
        i += 8;
    }
    if i < n {
        let mut t = [0f32; 8];
        std::ptr::copy_nonoverlapping(p.add(i), t.as_mut_ptr(), n - i);
        let y = f(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), vm));
        _mm256_storeu_ps(t.as_mut_ptr(), y);
        std::ptr::copy_nonoverlapping(t.as_ptr(), p.add(i), n - i);
        // Only the tail's own lanes go into the sum.
        t[n - i..].fill(0.0);
        acc = _mm256_add_ps(acc, _mm256_loadu_ps(t.as_ptr()));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum()
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_shifted_sum(e: &mut [f32], m: f32) -> f32 {
    shifted_sum(e, m, |x| exp8(x))
}

/// [`exp_shifted_sum`] for an `m` that is the maximum of `e`: every argument is then at most 0 (or NaN),
/// where [`exp8_nonpos`] gives [`exp8`]'s bits.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_below_max_sum(e: &mut [f32], m: f32) -> f32 {
    shifted_sum(e, m, |x| exp8_nonpos(x))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu8(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let z = _mm256_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
    let sign_bit = c(-0.0);
    let a = _mm256_andnot_ps(sign_bit, z);
    let t = _mm256_div_ps(c(1.0), _mm256_fmadd_ps(c(ERF_P), a, c(1.0)));
    let mut r = c(ERF_POLY[0]);
    for k in &ERF_POLY[1..] {
        r = _mm256_fmadd_ps(r, t, c(*k));
    }
    // exp(-z^2) (0 where it underflows, as the erf is then 1 to f32 precision).
    let e = exp8(_mm256_sub_ps(c(0.0), _mm256_mul_ps(z, z)));
    let erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, c(1.0));
    // erf is odd: give it z's sign.
    let erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, sign_bit));
    _mm256_mul_ps(_mm256_mul_ps(x, c(0.5)), _mm256_add_ps(erf, c(1.0)))
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu_erf_in_place(v: &mut [f32]) {
    let p = v.as_mut_ptr();
    map8(p, p, v.len(), 0.0, |x| gelu8(x));
}

/// `silu(g) * u` of 8 f32 lanes, each rounded by `round` (to the dtype) where the scalar loop rounds.
#[inline(always)]
unsafe fn silu_mul8(g: __m256, u: __m256, round: impl Fn(__m256) -> __m256) -> __m256 {
    let e = exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0)));
    let s = round(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)));
    round(_mm256_mul_ps(s, u))
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu_mul_f32(y: *mut f32, g: *const f32, u: *const f32, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        let v = silu_mul8(_mm256_loadu_ps(g.add(i)), _mm256_loadu_ps(u.add(i)), |x| x);
        _mm256_storeu_ps(y.add(i), v);
        i += 8;
    }
    if i < n {
        let (mut gt, mut ut) = ([0f32; 8], [0f32; 8]);
        std::ptr::copy_nonoverlapping(g.add(i), gt.as_mut_ptr(), n - i);
        std::ptr::copy_nonoverlapping(u.add(i), ut.as_mut_ptr(), n - i);
        let v = silu_mul8(
            _mm256_loadu_ps(gt.as_ptr()),
            _mm256_loadu_ps(ut.as_ptr()),
            |x| x,
        );
        _mm256_storeu_ps(gt.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(gt.as_ptr(), y.add(i), n - i);
    }
}

/// `x` rounded to bf16 as `crate::elementwise::to_bf16` rounds it (to nearest even; a NaN keeps its top bits,
/// quieted), in the low halves of the lanes.
#[inline(always)]
unsafe fn bf16_bits8(x: __m256) -> __m256i {
    let b = _mm256_castps_si256(x);
    let hi = _mm256_srli_epi32::<16>(b);
    let bias = _mm256_add_epi32(
        _mm256_set1_epi32(0x7fff),
        _mm256_and_si256(hi, _mm256_set1_epi32(1)),
    );
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
    let nan = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    _mm256_blendv_epi8(rounded, nan, is_nan)
}

/// 8 bf16 bit patterns widened to f32 (exact).
#[inline(always)]
unsafe fn load_bf16(p: *const u16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// The low halves of 8 lanes (each at most 0xffff) as 8 u16 at `p`.
#[inline(always)]
unsafe fn store_bf16(p: *mut u16, bits: __m256i) {
    // Unsigned saturation leaves values up to 0xffff as they are; the pack works per 128-bit half.
    let packed = _mm256_packus_epi32(bits, bits);
    let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
    _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(ordered));
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu_mul_bf16(y: *mut u16, g: *const u16, u: *const u16, n: usize) {
    let round = |x: __m256| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bf16_bits8(x)));
    let mut i = 0;
    while i + 8 <= n {
        let v = silu_mul8(load_bf16(g.add(i)), load_bf16(u.add(i)), round);
        store_bf16(y.add(i), bf16_bits8(v));
        i += 8;
    }
    if i < n {
        // The tail through a zero-padded copy (lanes past it compute silu(0) * 0 and are dropped).
        let (mut gt, mut ut, mut yt) = ([0u16; 8], [0u16; 8], [0u16; 8]);
        std::ptr::copy_nonoverlapping(g.add(i), gt.as_mut_ptr(), n - i);
        std::ptr::copy_nonoverlapping(u.add(i), ut.as_mut_ptr(), n - i);
        let v = silu_mul8(load_bf16(gt.as_ptr()), load_bf16(ut.as_ptr()), round);
        store_bf16(yt.as_mut_ptr(), bf16_bits8(v));
        std::ptr::copy_nonoverlapping(yt.as_ptr(), y.add(i), n - i);
    }
}

/// Column groups of `exp_columns`: 4 vectors of maxima and 4 of sums stay in registers.
const GROUP: usize = 4;

#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_columns(s: &mut [f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    let mut inv = vec![0f32; cols];
    // A scale of 1 (the encoder's queries come scaled) multiplies by nothing: `x * 1` is `x`.
    let scaled = scale != 1.0;
    for g in (0..cols).step_by(GROUP * 8) {
        match (cols - g >= GROUP * 8, scaled) {
            (true, true) => exp_group::<true, true>(s, rows, cols, scale, g, &mut inv),
            (true, false) => exp_group::<true, false>(s, rows, cols, scale, g, &mut inv),
            (false, true) => exp_group::<false, true>(s, rows, cols, scale, g, &mut inv),
            (false, false) => exp_group::<false, false>(s, rows, cols, scale, g, &mut inv),
        }
    }
    inv
}

/// [`exp_columns`] over the columns `g..g + GROUP * 8` (fewer at the end). `FULL`: all of them exist, and
/// plain loads and stores replace the masked ones, which are slow on AMD's Zen 3: in a 1000-token f32
/// prefill (`step_probe f32 prefill 1000`, an EPYC Zen 3) this function took a third of the attention's
/// time with masked moves everywhere, and ~25 % less with plain ones (docs/PERFORMANCE.md). Both read and
/// write the same values. `SCALED`: the scale is not 1.
#[inline(always)]
unsafe fn exp_group<const FULL: bool, const SCALED: bool>(
    s: &mut [f32],
    rows: usize,
    cols: usize,
    scale: f32,
    g: usize,
    inv: &mut [f32],
) {
    let base = s.as_mut_ptr();
    let vs = _mm256_set1_ps(scale);
    let width = (cols - g).min(GROUP * 8);
    // Lanes past the group's width are loaded as 0 and never stored (AVX2's masked moves).
    let mut k = [_mm256_setzero_si256(); GROUP];
    for (j, k) in k.iter_mut().enumerate() {
        let lanes = width.saturating_sub(j * 8).min(8) as i32;
        *k = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(lanes),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
    }
    let load = |p: *const f32, k: __m256i| {
        if FULL {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, k)
        }
    };
    let scaled = |x: __m256| if SCALED { _mm256_mul_ps(x, vs) } else { x };
    let row = |r: usize| base.add(r * cols + g);
    let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); GROUP];
    for r in 0..rows {
        let p = row(r);
        for j in 0..GROUP {
            let x = scaled(load(p.add(j * 8), k[j]));
            m[j] = _mm256_max_ps(m[j], x);
        }
    }
    let mut sum = [_mm256_setzero_ps(); GROUP];
    for r in 0..rows {
        let p = row(r);
        for j in 0..GROUP {
            let x = scaled(load(p.add(j * 8), k[j]));
            // `x - max <= 0` (or NaN where the column has a NaN or +inf).
            let e = exp8_nonpos(_mm256_sub_ps(x, m[j]));
            if FULL {
                _mm256_storeu_ps(p.add(j * 8), e);
            } else {
                _mm256_maskstore_ps(p.add(j * 8), k[j], e);
            }
            sum[j] = _mm256_add_ps(sum[j], e);
        }
    }
    for j in 0..GROUP {
        let v = _mm256_div_ps(_mm256_set1_ps(1.0), sum[j]);
        _mm256_maskstore_ps(inv.as_mut_ptr().add(g + j * 8), k[j], v);
    }
}
