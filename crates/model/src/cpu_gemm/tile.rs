//! The micro-tile of [`super`]: an `MR x 32` block of `y` over one K block, on AVX-512 or portably, both
//! summing every element in the same order (k in order, one f32 accumulator per K block).

use super::{Elem, MR, NR};

pub(super) struct Tile<'a, T> {
    /// The row tile at its KC offset: element `(r, kk)` at `x[kk * xs + r]`.
    pub(super) x: &'a [f32],
    /// `x`'s stride in k ([`MR`] when packed).
    pub(super) xs: usize,
    /// `kl x 32` panel slice.
    pub(super) panel: &'a [T],
    pub(super) kl: usize,
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    /// Valid columns (32 except in the last panel).
    pub(super) cols: usize,
    /// Add to `c` (later K blocks) instead of overwriting it.
    pub(super) accumulate: bool,
    /// The panels are read as one sequential stream (few rows): prefetch it far ahead, since the hardware
    /// prefetcher alone leaves the loads waiting on memory between bursts of FMAs.
    pub(super) prefetch: bool,
}

/// The reference summation order, also the fallback: per (row, column), k in order, one f32 accumulator per K
/// block, added to the previous blocks' sum.
pub(super) fn portable_tile<T: Elem>(t: &Tile<'_, T>, rows: usize) {
    for r in 0..rows {
        let mut acc = [0f32; NR];
        for kk in 0..t.kl {
            let xv = t.x[kk * t.xs + r];
            let wrow = &t.panel[kk * NR..(kk + 1) * NR];
            for (col, a) in acc.iter_mut().enumerate() {
                *a = xv.mul_add(wrow[T::slot(col)].widen(), *a);
            }
        }
        for (col, &a) in acc.iter().enumerate().take(t.cols) {
            // SAFETY: inside the tile (see run_panels).
            unsafe {
                let p = t.c.add(r * t.ldc + col);
                *p = if t.accumulate { *p + a } else { a };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::{Elem, Tile, MR, NR};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load_w<T: Elem>(panel: &[T], kk: usize) -> (__m512, __m512) {
        let p = panel.as_ptr().add(kk * NR);
        if T::IS_BF16 {
            // Lane c: column c in the low half, column c + 16 in the high half (`Elem::slot`).
            let v = _mm512_loadu_si512(p as *const __m512i);
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))),
            )
        } else {
            let f = p as *const f32;
            (_mm512_loadu_ps(f), _mm512_loadu_ps(f.add(16)))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(in crate::cpu_gemm) unsafe fn tile<T: Elem>(t: &Tile<'_, T>, rows: usize) {
        match rows {
            14 => tile_n::<T, 14>(t),
            13 => tile_n::<T, 13>(t),
            12 => tile_n::<T, 12>(t),
            11 => tile_n::<T, 11>(t),
            10 => tile_n::<T, 10>(t),
            9 => tile_n::<T, 9>(t),
            8 => tile_n::<T, 8>(t),
            7 => tile_n::<T, 7>(t),
            6 => tile_n::<T, 6>(t),
            5 => tile_n::<T, 5>(t),
            4 => tile_n::<T, 4>(t),
            3 => tile_n::<T, 3>(t),
            2 => tile_n::<T, 2>(t),
            _ => tile_n::<T, 1>(t),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tile_n<T: Elem, const R: usize>(t: &Tile<'_, T>) {
        debug_assert!(R <= MR);
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let x = t.x.as_ptr();
        // 8 KiB ahead in f32 (64 panel rows; beyond this slice lies the next slice or panel of the stream).
        // Into L2 (T1): a decode step's weight stream then ran ~5-10 % faster than prefetching into L1
        // (`step_probe`, batch 1), the L1 fill buffers no longer being held by prefetches.
        const AHEAD: usize = 64 * NR;
        let line = 64 / std::mem::size_of::<T>();
        for kk in 0..t.kl {
            if t.prefetch {
                let p = t.panel.as_ptr().wrapping_add(kk * NR + AHEAD) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(p);
                if !T::IS_BF16 {
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line * std::mem::size_of::<T>()));
                }
            }
            let (w0, w1) = load_w(t.panel, kk);
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(kk * t.xs + r));
                a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
                a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
            }
        }
        // Columns 0..16 and 16..32 masked to the valid ones.
        let valid = t.cols as u32;
        let m0: __mmask16 = if valid >= 16 {
            0xffff
        } else {
            ((1u32 << valid) - 1) as u16
        };
        let m1: __mmask16 = if valid >= 32 {
            0xffff
        } else if valid <= 16 {
            0
        } else {
            ((1u32 << (valid - 16)) - 1) as u16
        };
        for r in 0..R {
            let c = t.c.add(r * t.ldc);
            let (mut v0, mut v1) = (a0[r], a1[r]);
            if t.accumulate {
                v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), v0);
                v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c.add(16)), v1);
            }
            _mm512_mask_storeu_ps(c, m0, v0);
            _mm512_mask_storeu_ps(c.add(16), m1, v1);
        }
    }
}
