//! bf16 products with AVX512-BF16's `vdpbf16ps`, for bf16 models on CPUs that have it and no AMX (AMD's Zen 4
//! and 5, Intel's Cooper Lake).
//!
//! Without it, [`crate::cpu_gemm`] widens bf16 weights to f32 and multiplies in f32: one FMA per weight and
//! row. `vdpbf16ps` multiplies 16 pairs of bf16 values into 16 f32 lanes, two products per lane, and on Zen 4
//! it issues as often as an f32 FMA of the same width: twice the arithmetic per cycle (a throwaway loop of
//! independent instructions on one core of this project's Zen 4 VM: 234 against 117 GFLOP/s). This is what
//! torch (oneDNN) runs for bf16 on these CPUs.
//!
//! * Weights are packed once at load into panels of [`NR`] = 32 output columns in pair layout,
//!   `[K/2][32][2]` ([`pack_pairs`], shared with [`crate::cpu_amx`]; K padded to even with a zero): one
//!   pair-row is two 64-byte vectors, columns 0..16 and 16..32, each lane a pair of consecutive inputs.
//! * Activations are packed per product into pairs too (`u32`: the even input in the low half): k-major for
//!   few rows (`[K/2][m]`), in tiles of [`MR`] rows for many (`[K/2][MR]` per tile, missing rows zero).
//! * A tile of up to 14 rows x 32 columns holds 28 accumulators; each pair-row's two vectors feed every row,
//!   whose pair is broadcast from memory. For few rows each thread streams its panels once (one or two rows
//!   read [`MAX_PANELS`] panels side by side); for many rows K is blocked and the panels of a group stay in
//!   L2 while every row tile passes over them (BLIS's order), as in [`crate::cpu_gemm`].
//!
//! **Summation order.** Each output element is summed per K block of [`KC`] pairs in one accumulator that
//! starts at zero; for each pair in order, the odd input's product is added and rounded, then the even
//! one's; inputs, the middle sum and the result are flushed to zero when they are denormal. That is the
//! instruction as Intel specifies it, and what Zen 4 computes (checked bit for bit, including denormal
//! cases, by a throwaway program against [`dp`]). The K blocks are added in order. The order is the same
//! whatever the number of rows, so a request gives the same bits alone or batched; it differs from
//! `cpu_gemm`'s (k in order, no flushing), so a bf16 model's last bits depend on whether the CPU has
//! AVX512-BF16 (as they already did on AMX). [`dp`] is the order in plain Rust: the tests hold the vector
//! tile to it, and it runs where the CPU lacks the instruction (tests only: [`available`] is what callers
//! ask).

use std::sync::OnceLock;

use crate::cpu_gemm::{finish, par_panels, uninit_result, Epilogue, SyncPtr, NR};
use crate::page_buf::PageBuf;
use half::bf16;

/// Rows per tile: 14 x 2 accumulators and a pair-row's two vectors take 30 of the 32 registers.
pub const MR: usize = 14;
/// K block, in pairs (2048 inputs: K = 896 is one block). A row tile's slice is 56 KiB, beyond L1, and a
/// panel's block 128 KiB; on Zen 4, with 1 MiB of L2 per core and 32 MiB of L3, the products of a
/// Qwen2.5-0.5B prefill ran at ~400 GFLOP/s on two cores against ~310-390 with blocks of 256 or 448 pairs
/// (`gemm_probe dp`, 1000 rows, same minutes), fewer passes adding to the output.
pub const KC: usize = 1024;
/// Up to this many rows, every panel is streamed once from memory, front to back (decode steps); the same
/// bound as [`crate::cpu_gemm::FEW_ROWS`], which sizes [`par_panels`]' tasks.
const FEW_ROWS: usize = crate::cpu_gemm::FEW_ROWS;
/// Panels per group in the many-rows order: a group's K blocks (2 MiB) are read by every row tile (from L2
/// and L3); 8, 16 and 32 measured alike.
const GROUP: usize = 16;
/// The most panels one tile reads side by side, for up to [`FEW_PANEL_ROWS`] rows: with one row and one
/// panel a pair-row feeds two dependent chains, and the loop keeps too few loads in flight for the
/// weight stream (as in `cpu_gemm`).
const MAX_PANELS: usize = 4;
const FEW_PANEL_ROWS: usize = 2;

/// True when this process can run `vdpbf16ps` (AVX512-F and AVX512-BF16), unless `AFNEXT_DISABLE_DPBF16` is
/// set (then bf16 runs in `cpu_gemm`, e.g. to compare the two).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| std::env::var_os("AFNEXT_DISABLE_DPBF16").is_none() && detected())
}

fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Packs `w` `[n, k]` into panels of 32 columns in pair layout, `[kp/2][32][2]` each (`kp >= k`, even; the
/// inputs past `k` zero): input `kk` of column `c` at `((kk / 2) * 32 + c) * 2 + kk % 2`.
pub(crate) fn pack_pairs(w: &[bf16], n: usize, k: usize, kp: usize) -> PageBuf<u16> {
    assert_eq!(w.len(), n * k, "weight buffer size");
    debug_assert!(kp >= k && kp.is_multiple_of(2));
    let mut panels = PageBuf::zeroed(n.div_ceil(NR) * kp * NR);
    for (p, panel) in panels.chunks_mut(kp * NR).enumerate() {
        for c in 0..NR.min(n - p * NR) {
            let row = &w[(p * NR + c) * k..(p * NR + c + 1) * k];
            for (kk, v) in row.iter().enumerate() {
                panel[((kk / 2) * NR + c) * 2 + kk % 2] = v.to_bits();
            }
        }
    }
    panels
}

/// `W` `[n, k]` bf16 in pair layout.
#[derive(Debug, Clone)]
pub struct DpWeight {
    /// On huge pages where the system allows (see [`crate::page_buf`]).
    panels: PageBuf<u16>,
    n: usize,
    k: usize,
    /// Pairs per panel row: `ceil(k / 2)`.
    pairs: usize,
}

/// The tile a product runs: the vector one, or [`dp`]'s order in plain Rust (the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512Bf16,
    Portable,
}

impl DpWeight {
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Self {
        let pairs = k.div_ceil(2);
        DpWeight {
            panels: pack_pairs(w, n, k, 2 * pairs),
            n,
            k,
            pairs,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }
    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// `y[m][n] = sum_k x[m][k] W[n][k] (+ bias[n])`, `x` bf16 `[m, k]` row-major; f32 result.
    pub fn matmul(&self, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let isa = if detected() {
            Isa::Avx512Bf16
        } else {
            Isa::Portable
        };
        self.product(x, m, bias, isa)
    }

    fn product(&self, x: &[bf16], m: usize, bias: Option<&[f32]>, isa: Isa) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "activation buffer size");
        let (n, pairs) = (self.n, self.pairs);
        let epilogue = Epilogue { bias, gelu: false };
        if m == 0 || n == 0 || self.k == 0 {
            let mut y = vec![0f32; m * n];
            finish(&SyncPtr(y.as_mut_ptr()), m, n, 0..n, epilogue);
            return y;
        }
        let stream = m <= FEW_ROWS;
        // Few rows: k-major, `[pairs][m]`; many: tiles of MR rows, `[pairs][MR]` each.
        let xs = if stream { m } else { MR };
        let xp = pack_rows(x, m, self.k, xs, !stream);
        let task = |range: std::ops::Range<usize>, out: &SyncPtr| {
            let ctx = Blocks {
                x: &xp,
                xs,
                tiled: !stream,
                w: &self.panels,
                pairs,
                n,
                out,
                isa,
            };
            if stream {
                ctx.stream(m, range);
            } else {
                ctx.blis(m, range);
            }
        };
        // SAFETY: with k > 0 the first K block of every tile overwrites its elements, and the tiles cover all
        // m rows and the task's panels; the tasks cover all panels.
        unsafe { uninit_result(m, n, |out| par_panels(out, m, n, epilogue, task)) }
    }
}

/// `x` `[m, k]` in pairs: pair `q` of row `r` (inputs `2q` and `2q + 1`, the second zero past `k`) at
/// `q * xs + r` (k-major, `xs == m`), or, `tiled`, in tiles of `xs` rows at `(r / xs) * pairs * xs + q * xs
/// + r % xs` (rows past `m` zero).
fn pack_rows(x: &[bf16], m: usize, k: usize, xs: usize, tiled: bool) -> Vec<u32> {
    use rayon::prelude::*;
    debug_assert!(tiled || xs == m);
    let pairs = k.div_ceil(2);
    let tiles = m.div_ceil(xs);
    let mut xp = vec![0u32; tiles * pairs * xs];
    let fill = |(t, tile): (usize, &mut [u32])| {
        for r in 0..xs.min(m - t * xs) {
            let row = &x[(t * xs + r) * k..][..k];
            for (q, pair) in row.chunks(2).enumerate() {
                let hi = pair.get(1).map_or(0, |v| v.to_bits());
                tile[q * xs + r] = u32::from(pair[0].to_bits()) | u32::from(hi) << 16;
            }
        }
    };
    if tiles > 1 {
        xp.par_chunks_mut(pairs * xs).enumerate().for_each(fill);
    } else {
        xp.chunks_mut(pairs * xs).enumerate().for_each(fill);
    }
    xp
}

/// What the tiles of one product share.
struct Blocks<'a> {
    /// Packed rows ([`pack_rows`]).
    x: &'a [u32],
    xs: usize,
    /// `x` in tiles of [`MR`] rows (else k-major).
    tiled: bool,
    w: &'a [u16],
    pairs: usize,
    n: usize,
    out: &'a SyncPtr,
    isa: Isa,
}

impl Blocks<'_> {
    /// Few rows (decode steps): each panel streamed once, front to back; the rows stay in L1.
    fn stream(&self, m: usize, panels: std::ops::Range<usize>) {
        let side = if m <= FEW_PANEL_ROWS { MAX_PANELS } else { 1 };
        for g in panels.clone().step_by(side) {
            let count = side.min(panels.end - g);
            for qc in (0..self.pairs).step_by(KC) {
                for r in (0..m).step_by(MR) {
                    self.tile(g, count, qc, (r, MR.min(m - r)), r == 0);
                }
            }
        }
    }

    /// Many rows (prefill, encoder), in BLIS's order: a row tile's K block stays in L1 while the K blocks
    /// of a group of panels (in L2) pass it; each pair-row loaded feeds 28 instructions.
    fn blis(&self, m: usize, panels: std::ops::Range<usize>) {
        for qc in (0..self.pairs).step_by(KC) {
            for g in panels.clone().step_by(GROUP) {
                for r in (0..m).step_by(MR) {
                    for p in g..(g + GROUP).min(panels.end) {
                        self.tile(p, 1, qc, (r, MR.min(m - r)), false);
                    }
                }
            }
        }
    }

    /// Rows `r..r + rows` of `count` panels from `p` on, over their K block at pair `qc`.
    fn tile(&self, p: usize, count: usize, qc: usize, (r, rows): (usize, usize), prefetch: bool) {
        let panel = self.pairs * NR * 2;
        let x = if self.tiled {
            // `r` is a multiple of MR: the start of a packed row tile.
            &self.x[r * self.pairs + qc * MR..]
        } else {
            &self.x[qc * self.xs + r..]
        };
        let t = Tile {
            x,
            xs: self.xs,
            w: &self.w[p * panel + qc * NR * 2..],
            next: panel,
            panels: count,
            pairs: KC.min(self.pairs - qc),
            // SAFETY: rows r..r + rows and columns from p * NR are inside y (m x n) and belong to this task.
            c: unsafe { self.out.0.add(r * self.n + p * NR) },
            ldc: self.n,
            cols: (count * NR).min(self.n - p * NR),
            accumulate: qc > 0,
            prefetch,
        };
        match self.isa {
            // SAFETY: AVX512-F and AVX512-BF16 were detected; the tile's bounds hold by construction.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => unsafe { avx512::tile(&t, rows) },
            _ => portable_tile(&t, rows),
        }
    }
}

/// One tile: rows of `x` against the K blocks of `panels` panels side by side.
struct Tile<'a> {
    /// Pair `q` of row `r` at `x[q * xs + r]`.
    x: &'a [u32],
    xs: usize,
    /// The first panel's K block: pair `q` of column `c` at `w[(q * NR + c) * 2..][..2]`; the next panel's
    /// block `next` elements further.
    w: &'a [u16],
    next: usize,
    panels: usize,
    /// Pairs summed.
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    /// Valid columns of the `panels` panels (all but in the last panel of a product).
    cols: usize,
    /// Add to `c` (later K blocks) instead of overwriting it.
    accumulate: bool,
    /// Prefetch the weight stream ahead (the first row tile of a streamed block).
    prefetch: bool,
}

/// `acc + x.1 * w.1 + x.0 * w.0` as `vdpbf16ps` computes one lane (see the module documentation): the odd
/// input's product first, each sum rounded once (a product of two bf16 values is exact in f32), every
/// denormal input, middle sum and result flushed to zero (keeping its sign).
pub(crate) fn dp(acc: f32, x: (u16, u16), w: (u16, u16)) -> f32 {
    fn daz(v: f32) -> f32 {
        if v.is_subnormal() {
            0f32.copysign(v)
        } else {
            v
        }
    }
    let f = |b: u16| daz(f32::from_bits(u32::from(b) << 16));
    let odd = daz(f(x.1).mul_add(f(w.1), daz(acc)));
    daz(f(x.0).mul_add(f(w.0), odd))
}

/// The tile in plain Rust, in [`dp`]'s order.
fn portable_tile(t: &Tile<'_>, rows: usize) {
    for j in 0..t.panels {
        let w = &t.w[j * t.next..];
        for r in 0..rows {
            let mut acc = [0f32; NR];
            for q in 0..t.pairs {
                let xq = t.x[q * t.xs + r];
                let xq = (xq as u16, (xq >> 16) as u16);
                for (c, a) in acc.iter_mut().enumerate() {
                    let at = (q * NR + c) * 2;
                    *a = dp(*a, xq, (w[at], w[at + 1]));
                }
            }
            let cols = t.cols.saturating_sub(j * NR).min(NR);
            for (c, &a) in acc.iter().enumerate().take(cols) {
                // SAFETY: inside the tile (see `Blocks::tile`).
                unsafe {
                    let p = t.c.add(r * t.ldc + j * NR + c);
                    *p = if t.accumulate { *p + a } else { a };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, FEW_PANEL_ROWS, MAX_PANELS, MR, NR};
    use std::arch::x86_64::*;

    /// How far ahead of the loads the weight stream is prefetched, in pair-rows (8 KiB), into L2: as
    /// `cpu_gemm`'s streamed tiles.
    const AHEAD: usize = 64;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(t: &Tile<'_>, rows: usize) {
        debug_assert!(t.panels >= 1 && t.panels <= MAX_PANELS);
        debug_assert!(t.panels == 1 || rows <= FEW_PANEL_ROWS);
        if t.panels > 1 {
            return match (rows, t.panels) {
                (1, 2) => tile_n::<1, 2>(t),
                (1, 3) => tile_n::<1, 3>(t),
                (1, _) => tile_n::<1, 4>(t),
                (_, 2) => tile_n::<2, 2>(t),
                (_, 3) => tile_n::<2, 3>(t),
                _ => tile_n::<2, 4>(t),
            };
        }
        match rows {
            14 => tile_n::<14, 1>(t),
            13 => tile_n::<13, 1>(t),
            12 => tile_n::<12, 1>(t),
            11 => tile_n::<11, 1>(t),
            10 => tile_n::<10, 1>(t),
            9 => tile_n::<9, 1>(t),
            8 => tile_n::<8, 1>(t),
            7 => tile_n::<7, 1>(t),
            6 => tile_n::<6, 1>(t),
            5 => tile_n::<5, 1>(t),
            4 => tile_n::<4, 1>(t),
            3 => tile_n::<3, 1>(t),
            2 => tile_n::<2, 1>(t),
            _ => tile_n::<1, 1>(t),
        }
    }

    /// An `R x 32P` tile: rows `0..R` of `P` panels side by side.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_n<const R: usize, const P: usize>(t: &Tile<'_>) {
        debug_assert!(R <= MR && P <= MAX_PANELS);
        debug_assert!(t.x.len() >= (t.pairs - 1) * t.xs + R);
        debug_assert!(t.w.len() >= (P - 1) * t.next + t.pairs * NR * 2);
        let mut a0 = [[_mm512_setzero_ps(); R]; P];
        let mut a1 = [[_mm512_setzero_ps(); R]; P];
        let x = t.x.as_ptr();
        let w = t.w.as_ptr();
        for q in 0..t.pairs {
            let mut w0 = [_mm512_setzero_ps(); P];
            let mut w1 = [_mm512_setzero_ps(); P];
            for j in 0..P {
                let p = w.add(j * t.next + q * NR * 2);
                if t.prefetch {
                    // Past the block lies the next block of the stream (or nothing: a prefetch never faults).
                    let ahead = p.wrapping_add(AHEAD * NR * 2) as *const i8;
                    _mm_prefetch::<_MM_HINT_T1>(ahead);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64));
                }
                w0[j] = _mm512_loadu_ps(p as *const f32);
                w1[j] = _mm512_loadu_ps(p.add(32) as *const f32);
            }
            for r in 0..R {
                // The row's pair in every lane (a broadcast load, no arithmetic).
                let xb = _mm512_castsi512_ps(_mm512_set1_epi32(*x.add(q * t.xs + r) as i32));
                for j in 0..P {
                    a0[j][r] = dp(a0[j][r], w0[j], xb);
                    a1[j][r] = dp(a1[j][r], w1[j], xb);
                }
            }
        }
        crate::cpu_gemm::store_tile(&a0, &a1, t.c, t.ldc, t.cols, t.accumulate);
    }

    /// `vdpbf16ps`: `acc` plus the pairs of `w` times those of `x`, lane by lane.
    #[inline(always)]
    unsafe fn dp(acc: __m512, w: __m512, x: __m512) -> __m512 {
        let bh = |v: __m512| std::mem::transmute::<__m512, __m512bh>(v);
        _mm512_dpbf16_ps(acc, bh(w), bh(x))
    }
}

#[cfg(test)]
mod tests;
