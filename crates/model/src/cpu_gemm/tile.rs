//! The micro-tile of [`super`]: an `MR x 32` block of `y` over one K block, on AVX-512 or portably, both
//! summing every element in the same order (k in order, one f32 accumulator per K block).

use super::{Elem, MR, NR};

/// The most panels one tile reads side by side.
pub(super) const MAX_PANELS: usize = 4;
/// Tiles of up to this many rows read [`MAX_PANELS`] panels side by side (decode at batch 1 and 2).
///
/// Each output element's sum is one chain of dependent FMAs (k in order, the summation order every product
/// keeps). With one row and one panel, a 64-byte line of bf16 weights feeds one FMA per chain: from L1 the
/// loop runs at one line per FMA latency (4 cycles), and it keeps fewer loads in flight than the weight
/// stream from memory could use. Four panels give each k four independent lines and four times the chains,
/// in the same order per element. A batch-1 bf16 step went from 36.9, 39.5, 37.0 to 35.6, 35.8, 36.2 ms
/// (`step_probe bf16 1`, binaries alternated); f32 panel rows are two lines, so f32 gains less.
pub(super) const FEW_PANEL_ROWS: usize = 2;

pub(super) struct Tile<'a, T> {
    /// The row tile at its KC offset: element `(r, kk)` at `x[kk * xs + r]`.
    pub(super) x: &'a [f32],
    /// `x`'s stride in k ([`MR`] when packed).
    pub(super) xs: usize,
    /// The K blocks of `panels` consecutive panels, `next` elements apart, each `kl x 32`: from the first
    /// block's start to the last block's end.
    pub(super) panel: &'a [T],
    pub(super) kl: usize,
    /// Panels side by side in this tile (1 to [`MAX_PANELS`], more than 1 for up to [`FEW_PANEL_ROWS`] rows).
    pub(super) panels: usize,
    /// Elements from one panel's block to the next one's (unused for one panel).
    pub(super) next: usize,
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    /// Valid columns of the `panels` panels (all but in the last panel of a product).
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
    for j in 0..t.panels {
        let panel = &t.panel[j * t.next..];
        for r in 0..rows {
            let mut acc = [0f32; NR];
            for kk in 0..t.kl {
                let xv = t.x[kk * t.xs + r];
                let wrow = &panel[kk * NR..(kk + 1) * NR];
                for (col, a) in acc.iter_mut().enumerate() {
                    *a = xv.mul_add(wrow[T::slot(col)].widen(), *a);
                }
            }
            let cols = t.cols.saturating_sub(j * NR).min(NR);
            for (col, &a) in acc.iter().enumerate().take(cols) {
                // SAFETY: inside the tile (see run_panels).
                unsafe {
                    let p = t.c.add(r * t.ldc + j * NR + col);
                    *p = if t.accumulate { *p + a } else { a };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::{Elem, Tile, FEW_PANEL_ROWS, MAX_PANELS, MR, NR};
    use std::arch::x86_64::*;

    /// Panel row `kk` of the panel at `panel`, widened to f32: columns 0..16 and 16..32.
    #[inline(always)]
    unsafe fn load_w<T: Elem>(panel: *const T, kk: usize) -> (__m512, __m512) {
        let p = panel.add(kk * NR);
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
        debug_assert!(t.panels >= 1 && t.panels <= MAX_PANELS);
        debug_assert!(t.panels == 1 || rows <= FEW_PANEL_ROWS);
        if t.panels > 1 {
            return match (rows, t.panels) {
                (1, 2) => tile_n::<T, 1, 2>(t),
                (1, 3) => tile_n::<T, 1, 3>(t),
                (1, _) => tile_n::<T, 1, 4>(t),
                (_, 2) => tile_n::<T, 2, 2>(t),
                (_, 3) => tile_n::<T, 2, 3>(t),
                _ => tile_n::<T, 2, 4>(t),
            };
        }
        match rows {
            14 => tile_n::<T, 14, 1>(t),
            13 => tile_n::<T, 13, 1>(t),
            12 => tile_n::<T, 12, 1>(t),
            11 => tile_n::<T, 11, 1>(t),
            10 => tile_n::<T, 10, 1>(t),
            9 => tile_n::<T, 9, 1>(t),
            8 => tile_n::<T, 8, 1>(t),
            7 => tile_n::<T, 7, 1>(t),
            6 => tile_n::<T, 6, 1>(t),
            5 => tile_n::<T, 5, 1>(t),
            4 => tile_n::<T, 4, 1>(t),
            3 => tile_n::<T, 3, 1>(t),
            2 => tile_n::<T, 2, 1>(t),
            _ => tile_n::<T, 1, 1>(t),
        }
    }

    /// An `R x 32P` tile: rows `0..R` of `P` panels side by side.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tile_n<T: Elem, const R: usize, const P: usize>(t: &Tile<'_, T>) {
        debug_assert!(R <= MR && P <= MAX_PANELS);
        let mut a0 = [[_mm512_setzero_ps(); R]; P];
        let mut a1 = [[_mm512_setzero_ps(); R]; P];
        let x = t.x.as_ptr();
        let panel = t.panel.as_ptr();
        // 8 KiB ahead in f32 (64 panel rows; beyond this slice lies the next slice or panel of the stream).
        // Into L2 (T1): a decode step's weight stream then ran ~5-10 % faster than prefetching into L1
        // (`step_probe`, batch 1), the L1 fill buffers no longer being held by prefetches.
        const AHEAD: usize = 64 * NR;
        let line = 64 / std::mem::size_of::<T>();
        for kk in 0..t.kl {
            if t.prefetch {
                for j in 0..P {
                    let p = panel.wrapping_add(j * t.next + kk * NR + AHEAD) as *const i8;
                    _mm_prefetch::<_MM_HINT_T1>(p);
                    if !T::IS_BF16 {
                        _mm_prefetch::<_MM_HINT_T1>(
                            p.wrapping_add(line * std::mem::size_of::<T>()),
                        );
                    }
                }
            }
            let mut w0 = [_mm512_setzero_ps(); P];
            let mut w1 = [_mm512_setzero_ps(); P];
            for j in 0..P {
                (w0[j], w1[j]) = load_w(panel.add(j * t.next), kk);
            }
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(kk * t.xs + r));
                for j in 0..P {
                    a0[j][r] = _mm512_fmadd_ps(xb, w0[j], a0[j][r]);
                    a1[j][r] = _mm512_fmadd_ps(xb, w1[j], a1[j][r]);
                }
            }
        }
        for j in 0..P {
            // Columns 0..16 and 16..32 of panel j, masked to the valid ones.
            let valid = t.cols.saturating_sub(j * NR).min(NR) as u32;
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
                let c = t.c.add(r * t.ldc + j * NR);
                let (mut v0, mut v1) = (a0[j][r], a1[j][r]);
                if t.accumulate {
                    v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), v0);
                    v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c.add(16)), v1);
                }
                _mm512_mask_storeu_ps(c, m0, v0);
                _mm512_mask_storeu_ps(c.add(16), m1, v1);
            }
        }
    }
}
