//! The CPU matrix multiply behind every projection: `y = x W^T (+ b)` with `W` packed once at load.
//!
//! candle's CPU GEMM reaches about half of this machine's f32 peak and a tenth of it with bf16 weights, and its
//! one-row products are far from the memory bandwidth (docs/PERFORMANCE.md). This kernel:
//!
//! * packs `W` `[N, K]` into panels of [`NR`] = 32 output columns stored k-major (`[K][32]`, the last panel
//!   zero-padded), in f32 or bf16 (bf16 is widened to f32 in registers with a shift: exact);
//! * computes an `MR x 32` tile of `y` (MR <= 8 rows) with 2 x MR AVX-512 accumulators, broadcasting one `x`
//!   element per row and FMA-ing it with two vectors of the panel;
//! * blocks K by [`KC`] and M by [`MC`] so that a panel slice stays in L1/L2 while it is reused across row
//!   blocks, and the row block stays in L2 while it is reused across panels;
//! * splits the panels (output columns) over the rayon pool.
//!
//! Every output element is accumulated in the same order whatever the number of rows (k in order, one
//! accumulator per KC block, blocks added in order), so a row's result does not depend on which other rows
//! share the product: a request gives the same logits alone or batched with 15 others. Accumulation is in
//! f32 for both weight types, as torch does for bf16.
//!
//! Without AVX-512 a portable kernel with the same loop structure (and the same summation order) runs.

use half::bf16;
use rayon::prelude::*;

/// Output columns per panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows per micro-tile.
pub const MR: usize = 8;
/// K block: one panel slice is KC x 32 values (48 KiB in f32).
pub const KC: usize = 384;
/// Rows per M block (their KC slice, 72 KiB in f32, stays in L2 while the panels pass).
pub const MC: usize = 48;

#[derive(Debug, Clone)]
enum Panels {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
}

/// `W` `[n, k]` packed into k-major panels of 32 columns.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    panels: Panels,
    n: usize,
    k: usize,
}

impl PackedWeight {
    fn panel_count(n: usize) -> usize {
        n.div_ceil(NR)
    }

    /// Packs a row-major `[n, k]` f32 matrix.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight buffer size");
        let mut p = vec![0f32; Self::panel_count(n) * k * NR];
        pack_into(w, n, k, &mut p);
        PackedWeight {
            panels: Panels::F32(p),
            n,
            k,
        }
    }

    /// Packs a row-major `[n, k]` bf16 matrix (kept in bf16).
    pub fn from_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight buffer size");
        let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
        let mut p = vec![0u16; Self::panel_count(n) * k * NR];
        pack_into(&bits, n, k, &mut p);
        PackedWeight {
            panels: Panels::Bf16(p),
            n,
            k,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }
    pub fn in_dim(&self) -> usize {
        self.k
    }
    pub fn is_bf16(&self) -> bool {
        matches!(self.panels, Panels::Bf16(_))
    }

    /// `y[m][n] = sum_k x[m][k] W[n][k] (+ bias[n])` for `x` `[m, k]` row-major.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "activation buffer size");
        let n = self.n;
        let mut y = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return y;
        }
        let xp = pack_rows(x, m, self.k);
        let x = xp.as_slice();
        let avx512 = has_avx512();
        par_panels(&mut y, n, bias, |range, out| match &self.panels {
            Panels::F32(w) => run_panels(w, x, m, self.k, n, range, out, avx512),
            Panels::Bf16(w) => run_panels(w, x, m, self.k, n, range, out, avx512),
        });
        y
    }
}

/// Splits the `ceil(n / 32)` output panels of `y` (`[m, n]`) into ranges over the rayon pool (a few per thread
/// for balance, at least 2 panels each) and runs `task` on each; tasks write disjoint columns through the
/// pointer. Then adds `bias` to every row. Shared by this kernel and [`crate::cpu_amx`].
pub(crate) fn par_panels(
    y: &mut [f32],
    n: usize,
    bias: Option<&[f32]>,
    task: impl Fn(std::ops::Range<usize>, &SyncPtr) + Sync,
) {
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    let per_task = panels.div_ceil(threads * 4).max(2);
    let out = SyncPtr(y.as_mut_ptr());
    (0..panels)
        .into_par_iter()
        .step_by(per_task)
        .for_each(|p0| task(p0..(p0 + per_task).min(panels), &out));
    if let Some(b) = bias {
        for row in y.chunks_mut(n) {
            for (v, b) in row.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
}

/// Activations in tiles of [`MR`] rows, each stored k-major (`[K][MR]`, missing rows zero), so the kernel's
/// broadcasts walk one sequential stream.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let tiles = m.div_ceil(MR);
    let mut out = vec![0f32; tiles * k * MR];
    for (t, tile) in out.chunks_mut(k * MR).enumerate() {
        for r in 0..MR.min(m - t * MR) {
            let row = &x[(t * MR + r) * k..(t * MR + r + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * MR + r] = v;
            }
        }
    }
    out
}

fn pack_into<T: Copy + Default>(w: &[T], n: usize, k: usize, out: &mut [T]) {
    for (p, panel) in out.chunks_mut(k * NR).enumerate() {
        for c in 0..NR {
            let row = p * NR + c;
            if row >= n {
                break;
            }
            let src = &w[row * k..(row + 1) * k];
            for (kk, &v) in src.iter().enumerate() {
                panel[kk * NR + c] = v;
            }
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint column ranges.
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint panels (column ranges) of the output; nothing reads it concurrently.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A packed weight element.
trait Elem: Copy + Sync {
    fn widen(self) -> f32;
    const IS_BF16: bool;
}
impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    const IS_BF16: bool = false;
}
impl Elem for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
    const IS_BF16: bool = true;
}

#[allow(clippy::too_many_arguments)]
fn run_panels<T: Elem>(
    w: &[T],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    panels: std::ops::Range<usize>,
    out: &SyncPtr,
    avx512: bool,
) {
    let stream = m <= MC;
    let block = |p: usize, kc: usize, r0: usize, r1: usize| {
        let kl = KC.min(k - kc);
        let cols = NR.min(n - p * NR);
        let panel = &w[p * k * NR + kc * NR..p * k * NR + (kc + kl) * NR];
        for r in (r0..r1).step_by(MR) {
            let rows = MR.min(r1 - r);
            // SAFETY: rows r..r+rows and columns p*NR..p*NR+cols are inside y (m x n) and belong to this
            // task's panels only.
            let c = unsafe { out.0.add(r * n + p * NR) };
            // `r` is a multiple of MR: the start of a packed row tile.
            let tile = Tile {
                x: &x[r * k + kc * MR..],
                panel,
                kl,
                c,
                ldc: n,
                cols,
                accumulate: kc > 0,
                prefetch: stream && r == r0,
            };
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512 F/BW were detected; the tile's bounds hold by construction.
                unsafe { avx512::tile::<T>(&tile, rows) };
                continue;
            }
            let _ = avx512;
            portable_tile(&tile, rows);
        }
    };
    // Both orders add the same K blocks in the same order to every output element; they differ only in
    // which data stays in cache.
    if m <= MC {
        // Few rows (decode steps): stream each panel once, front to back; the rows stay in L1.
        for p in panels {
            for kc in (0..k).step_by(KC) {
                block(p, kc, 0, m);
            }
        }
    } else {
        // Many rows (prefill, encoder): a KC x 32 panel slice stays in L1/L2 across the row tiles of an M
        // block, and that block's KC slice stays in L2 across the panels.
        for kc in (0..k).step_by(KC) {
            for mc in (0..m).step_by(MC) {
                for p in panels.clone() {
                    block(p, kc, mc, (mc + MC).min(m));
                }
            }
        }
    }
}

struct Tile<'a, T> {
    /// The packed row tile at its KC offset: `x[kk * MR + r]`.
    x: &'a [f32],
    /// `kl x 32` panel slice.
    panel: &'a [T],
    kl: usize,
    c: *mut f32,
    ldc: usize,
    /// Valid columns (32 except in the last panel).
    cols: usize,
    /// Add to `c` (later K blocks) instead of overwriting it.
    accumulate: bool,
    /// The panels are read as one sequential stream (few rows): prefetch it far ahead, since the hardware
    /// prefetcher alone leaves the loads waiting on memory between bursts of FMAs.
    prefetch: bool,
}

/// The reference summation order, also the fallback: per (row, column), k in order, one f32 accumulator per K
/// block, added to the previous blocks' sum.
fn portable_tile<T: Elem>(t: &Tile<'_, T>, rows: usize) {
    for r in 0..rows {
        let mut acc = [0f32; NR];
        for kk in 0..t.kl {
            let xv = t.x[kk * MR + r];
            let wrow = &t.panel[kk * NR..(kk + 1) * NR];
            for (a, &wv) in acc.iter_mut().zip(wrow) {
                *a = xv.mul_add(wv.widen(), *a);
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
mod avx512 {
    use super::{Elem, Tile, MR, NR};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load_w<T: Elem>(panel: &[T], kk: usize) -> (__m512, __m512) {
        let p = panel.as_ptr().add(kk * NR);
        if T::IS_BF16 {
            let v = _mm512_loadu_si512(p as *const __m512i);
            let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v));
            let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(v));
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)),
            )
        } else {
            let f = p as *const f32;
            (_mm512_loadu_ps(f), _mm512_loadu_ps(f.add(16)))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn tile<T: Elem>(t: &Tile<'_, T>, rows: usize) {
        match rows {
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
        const AHEAD: usize = 64 * NR;
        let line = 64 / std::mem::size_of::<T>();
        for kk in 0..t.kl {
            if t.prefetch {
                let p = t.panel.as_ptr().wrapping_add(kk * NR + AHEAD) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(p);
                if !T::IS_BF16 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * std::mem::size_of::<T>()));
                }
            }
            let (w0, w1) = load_w(t.panel, kk);
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(kk * MR + r));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Plain triple loop in f64: the reference.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|kk| f64::from(x[i * k + kk]) * f64::from(w[j * k + kk]))
                    .sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matches_the_reference_on_awkward_shapes() {
        let mut s = 7u64;
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 33, 5),
            (3, 64, 384),
            (9, 70, 385),
            (17, 31, 800),
            (50, 100, 1000),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let want = reference(&x, &w, m, n, k);
            let got = PackedWeight::from_f32(&w, n, k).matmul(&x, m, Some(&b));
            for i in 0..m * n {
                let d = (got[i] - (want[i] + b[i % n])).abs();
                assert!(
                    d <= 1e-4 * (k as f32).sqrt(),
                    "f32 ({m},{n},{k}) [{i}]: off by {d}"
                );
            }
            // bf16 weights: the same as f32 weights rounded to bf16.
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want = reference(&x, &wr, m, n, k);
            let got = PackedWeight::from_bf16(&wb, n, k).matmul(&x, m, None);
            for i in 0..m * n {
                let d = (got[i] - want[i]).abs();
                assert!(
                    d <= 1e-4 * (k as f32).sqrt(),
                    "bf16 ({m},{n},{k}) [{i}]: off by {d}"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let mut s = 3u64;
        let (n, k) = (77, 900);
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..37 * k).map(|_| lcg(&mut s)).collect();
        let pw = PackedWeight::from_f32(&w, n, k);
        let all = pw.matmul(&x, 37, None);
        for r in [0, 5, 8, 36] {
            let one = pw.matmul(&x[r * k..(r + 1) * k], 1, None);
            assert_eq!(one, all[r * n..(r + 1) * n].to_vec(), "row {r}");
        }
    }

    #[test]
    fn the_avx512_kernel_sums_in_the_portable_order() {
        if !has_avx512() {
            return;
        }
        let mut s = 11u64;
        // Both loop orders: few rows (panel stream) and many rows (K/M blocking).
        for (m, n, k) in [(10, 40, 500), (60, 40, 500)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let pw = PackedWeight::from_f32(&w, n, k);
            let fast = pw.matmul(&x, m, None);
            let Panels::F32(panels) = &pw.panels else {
                unreachable!()
            };
            let mut slow = vec![0f32; m * n];
            let xp = pack_rows(&x, m, k);
            let out = SyncPtr(slow.as_mut_ptr());
            run_panels(panels, &xp, m, k, n, 0..n.div_ceil(NR), &out, false);
            assert_eq!(fast, slow, "m = {m}");
        }
    }
}
