//! Decode-attention scores with AVX-512, 16 keys at a time, one key per vector lane, in the order of
//! [`super::dot_heads`] (the bits of the portable task).
//!
//! `dot_heads` puts a GQA group's heads in the lanes (7 of 8 lanes of a 256-bit vector for Qwen2.5's groups of
//! 7) and broadcasts every element of every key: ~4 instructions per key element for the group. Here a block
//! of 16 keys is transposed once (16 x 16 blocks of f32, in registers, by `cpu_gemm`'s packing transpose), so each head multiplies a broadcast
//! query element by 16 keys at once; the 16 partial sums of `dot_heads` become 16 accumulators whose lanes
//! are keys, added in the same order, then the tail past the last 16 elements. Every score is the same
//! operations on the same values in the same order, so a row's numbers do not change. One (row, kv head)
//! task over 1 000 bf16 keys (7 heads of 64), alone on one core of the Zen 4 VM: 38-47 us against 78-86
//! with `dot_heads` (its scores 21-29 us, the values 13 us, the softmax 3 us).

use super::Kv;

use std::arch::x86_64::*;

/// Keys per block (vector lanes).
pub(super) const KEYS: usize = 16;

/// 16 consecutive elements of a cache vector as f32 (`src` holds at least 16).
#[inline(always)]
unsafe fn widen16<T: Kv>(src: &[T]) -> __m512 {
    debug_assert!(src.len() >= 16);
    match std::mem::size_of::<T>() {
        // f32.
        4 => _mm512_loadu_ps(src.as_ptr() as *const f32),
        _ => {
            let h = _mm256_loadu_si256(src.as_ptr() as *const __m256i);
            if T::BF16 {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_cvtph_ps(h)
            }
        }
    }
}

/// The scores of the first `16 * (at.len() / 16)` keys for the `group` heads of `qs` (`[group, hd]`):
/// `scores[i * ctx + j]` (`ctx = at.len()`), key `j`'s vector at `k[at[j]..][..hd]`, scaled by `scale` as
/// the portable task scales them. Returns how many keys it scored. `kt` is scratch for one block's keys
/// transposed (`hd * 16` values; resized here).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores<T: Kv>(
    qs: &[f32],
    k: &[T],
    at: &[usize],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    kt: &mut Vec<f32>,
) -> usize {
    let ctx = at.len();
    let group = qs.len() / hd;
    let full = hd / 16 * 16;
    let blocks = ctx / KEYS;
    kt.resize(hd * KEYS, 0.0);
    for b in 0..blocks {
        let keys = &at[b * KEYS..][..KEYS];
        // The next block's keys (or the first keys the portable loop scores after the last block).
        for &a in at.iter().skip((b + 1) * KEYS).take(KEYS) {
            super::prefetch(&k[a..][..hd]);
        }
        // kt[d * 16 + j]: element d of the block's key j.
        for c in (0..full).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, &a) in keys.iter().enumerate() {
                r[j] = widen16(&k[a + c..]);
            }
            let r = crate::cpu_gemm::transpose16(r);
            for (l, v) in r.iter().enumerate() {
                _mm512_storeu_ps(kt.as_mut_ptr().add((c + l) * KEYS), *v);
            }
        }
        for d in full..hd {
            for (j, &a) in keys.iter().enumerate() {
                kt[d * KEYS + j] = k[a + d].f();
            }
        }
        let kt = kt.as_ptr();
        for h in 0..group {
            let q = &qs[h * hd..][..hd];
            // Partial sum l: elements l, l + 16, ... (each product rounded, then added, from zero).
            let mut part = [_mm512_setzero_ps(); 16];
            for c in (0..full).step_by(16) {
                for (l, p) in part.iter_mut().enumerate() {
                    let prod = _mm512_mul_ps(
                        _mm512_set1_ps(q[c + l]),
                        _mm512_loadu_ps(kt.add((c + l) * KEYS)),
                    );
                    *p = _mm512_add_ps(*p, prod);
                }
            }
            let mut s = _mm512_set1_ps(-0.0);
            for p in part {
                s = _mm512_add_ps(s, p);
            }
            let mut tail = _mm512_setzero_ps();
            for (d, &x) in q.iter().enumerate().skip(full) {
                tail = _mm512_add_ps(
                    tail,
                    _mm512_mul_ps(_mm512_set1_ps(x), _mm512_loadu_ps(kt.add(d * KEYS))),
                );
            }
            s = _mm512_add_ps(s, tail);
            let out = scores.as_mut_ptr().add(h * ctx + b * KEYS);
            _mm512_storeu_ps(out, _mm512_mul_ps(s, _mm512_set1_ps(scale)));
        }
    }
    blocks * KEYS
}
