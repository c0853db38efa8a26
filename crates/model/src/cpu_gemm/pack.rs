//! Packing row-major activations into the kernel's row tiles (`[K][MR]`, see [`super::PackedRows`]) with
//! AVX-512: 16 k values of each of the tile's rows are loaded, transposed in registers, and stored as 16 rows
//! of the tile. Element by element, each value loaded from another row 4 KiB away and bounds-checked, packing
//! took ~3 % of an f32 prefill (`perf`, `step_probe f32 prefill 1000`); it moves values and widens bf16
//! exactly, so the packed tile is the same either way (test: `packing_by_transposition_equals_element_wise`).

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::super::{Elem, MR};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    // A tile's rows fit the 16 lanes of one transposed column.
    const _: () = assert!(MR <= 16);

    /// Rows `row0..row0 + rows` (`rows <= MR`) of `x` (`[m, k]` row-major) into `dst` (`k * MR` values:
    /// element `(r, kk)` at `kk * MR + r`, rows past `rows` zero).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(in crate::cpu_gemm) unsafe fn pack_tile<A: Elem>(
        x: &[A],
        k: usize,
        (row0, rows): (usize, usize),
        dst: &mut [MaybeUninit<f32>],
    ) {
        debug_assert!(rows <= MR && (row0 + rows) * k <= x.len() && dst.len() == k * MR);
        let out = dst.as_mut_ptr() as *mut f32;
        let store_mask: __mmask16 = (1 << MR) - 1;
        for kk0 in (0..k).step_by(16) {
            let cols = 16.min(k - kk0);
            let mask: __mmask16 = if cols == 16 { 0xffff } else { (1 << cols) - 1 };
            let mut v = [_mm512_setzero_ps(); 16];
            for (r, v) in v.iter_mut().enumerate().take(rows) {
                // SAFETY: row row0 + r < m has k elements; the mask stops at the row's end.
                let p = x.as_ptr().add((row0 + r) * k + kk0);
                *v = if A::IS_BF16 {
                    let h = _mm512_maskz_loadu_epi16(mask as __mmask32, p as *const i16);
                    let w = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(h));
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
                } else {
                    _mm512_maskz_loadu_ps(mask, p as *const f32)
                };
            }
            let t = transpose(v);
            for (j, col) in t.iter().enumerate().take(cols) {
                // SAFETY: column kk0 + j < k: MR values at (kk0 + j) * MR, inside dst.
                _mm512_mask_storeu_ps(out.add((kk0 + j) * MR), store_mask, *col);
            }
        }
    }

    /// The 16 x 16 transpose: lane `r` of result `c` is lane `c` of `v[r]` (also the decode attention's, for
    /// a block of keys: `crate::paged_cpu`).
    #[inline(always)]
    pub(crate) unsafe fn transpose(v: [__m512; 16]) -> [__m512; 16] {
        // 32-bit, then 64-bit interleaves within 128-bit lanes: `u[4 i + c]`'s lane L holds rows 4i..4i+3
        // of column 4 L + c.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
        }
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            u[4 * i] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
            u[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
            u[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
            u[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        }
        // Then a 4 x 4 transpose of 128-bit lanes across u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut o = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let (a, b, cc, d) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
            let p0 = _mm512_shuffle_f32x4::<0x44>(a, b);
            let p1 = _mm512_shuffle_f32x4::<0xEE>(a, b);
            let p2 = _mm512_shuffle_f32x4::<0x44>(cc, d);
            let p3 = _mm512_shuffle_f32x4::<0xEE>(cc, d);
            o[c] = _mm512_shuffle_f32x4::<0x88>(p0, p2);
            o[4 + c] = _mm512_shuffle_f32x4::<0xDD>(p0, p2);
            o[8 + c] = _mm512_shuffle_f32x4::<0x88>(p1, p3);
            o[12 + c] = _mm512_shuffle_f32x4::<0xDD>(p1, p3);
        }
        o
    }
}
