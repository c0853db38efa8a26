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
    /// The K blocks of `panels` consecutive panels, `next` elements apart, each its stored rows (`kl` or
    /// more) x 32: from the first block's start to the last block's end.
    pub(super) panel: &'a [T],
    /// Panel rows summed (the block stores at least as many).
    pub(super) kl: usize,
    /// f32 panels: elements from one panel row of a 16-column half to the next ([`NR`], or 16 when the
    /// block stores its halves one after the other, see `super::block_index`), and from a row's first
    /// half to its second (16, or 16 x the block's stored rows). bf16 panels keep rows of [`NR`] with the
    /// halves interleaved (`Elem::slot`) and ignore both.
    pub(super) row: usize,
    pub(super) half: usize,
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
    /// How this tile prefetches the panels when they are read as one sequential stream (few rows).
    pub(super) prefetch: Prefetch,
}

/// Software prefetch of a decode step's weight stream (into L2), since the hardware prefetcher alone leaves
/// the loads waiting on memory between bursts of FMAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prefetch {
    /// Not streamed, or another tile of the block prefetches.
    None,
    /// 64 panel rows ahead of the loads, in the tile's first pass (by the first half of each panel).
    Ahead,
    /// [`super::KC`] panel rows ahead (the next block of the stream: blocks, then panels, are contiguous),
    /// spread evenly over the `passes` passes that all the tiles of a block make: the block's pass number
    /// `first + i` (its tile's `i`th) prefetches for the rows `kk` with `kk % passes == first + i`. Each
    /// stream row is then prefetched once, and the memory is busy for the whole block, not only during one
    /// pass (AVX2 only: see `Blocks::spread`).
    Spread { first: usize, passes: usize },
}

impl<T> Tile<'_, T> {
    /// Where the software prefetch of a streamed tile aims, `ahead` panel rows past row `kk` of half `h`
    /// (bf16: of the row), as an offset from the block's start. Rows of 32 columns are one stream; f32
    /// halves are two, and past its block's end a half's target is the same half of the next block (taken
    /// as a whole K block), where that half's rows will be read, not the other half of this block.
    #[inline(always)]
    fn ahead(&self, kk: usize, h: usize, ahead: usize) -> usize {
        let r = kk + ahead;
        if self.row == NR {
            return r * NR + h * 16;
        }
        let stored = self.half / 16;
        if r < stored {
            h * self.half + r * 16
        } else {
            stored * NR + h * super::KC * 16 + (r - stored) * 16
        }
    }
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
                for (col, a) in acc.iter_mut().enumerate() {
                    let at = if T::IS_BF16 {
                        kk * NR + T::slot(col)
                    } else {
                        kk * t.row + (col / 16) * t.half + col % 16
                    };
                    *a = xv.mul_add(panel[at].widen(), *a);
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
    use super::{Elem, Prefetch, Tile, FEW_PANEL_ROWS, MAX_PANELS, MR, NR};
    use std::arch::x86_64::*;

    /// Panel row `kk` of the panel at `panel`, widened to f32: columns 0..16 and 16..32 (f32 halves `half`
    /// elements apart, rows `row` apart: see [`Tile::row`]).
    #[inline(always)]
    unsafe fn load_w<T: Elem>(
        panel: *const T,
        kk: usize,
        (row, half): (usize, usize),
    ) -> (__m512, __m512) {
        if T::IS_BF16 {
            let p = panel.add(kk * NR);
            // Lane c: column c in the low half, column c + 16 in the high half (`Elem::slot`).
            let v = _mm512_loadu_si512(p as *const __m512i);
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))),
            )
        } else {
            let f = (panel as *const f32).add(kk * row);
            (_mm512_loadu_ps(f), _mm512_loadu_ps(f.add(half)))
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
        // In f32 the line of each half (`Tile::ahead`).
        const AHEAD: usize = 64;
        let halves = if T::IS_BF16 { 1 } else { 2 };
        for kk in 0..t.kl {
            if t.prefetch == Prefetch::Ahead {
                for j in 0..P {
                    for h in 0..halves {
                        let p = panel.wrapping_add(j * t.next + t.ahead(kk, h, AHEAD));
                        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
                    }
                }
            }
            let mut w0 = [_mm512_setzero_ps(); P];
            let mut w1 = [_mm512_setzero_ps(); P];
            for j in 0..P {
                (w0[j], w1[j]) = load_w(panel.add(j * t.next), kk, (t.row, t.half));
            }
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(kk * t.xs + r));
                for j in 0..P {
                    a0[j][r] = _mm512_fmadd_ps(xb, w0[j], a0[j][r]);
                    a1[j][r] = _mm512_fmadd_ps(xb, w1[j], a1[j][r]);
                }
            }
        }
        store_tile(&a0, &a1, t.c, t.ldc, t.cols, t.accumulate);
    }

    /// Stores an `R x 32P` tile's accumulators (`a0`: columns 0..16 of each panel, `a1`: 16..32) into `c`,
    /// rows `ldc` apart, only the first `cols` columns; with `accumulate`, adds them to what `c` holds (a
    /// later K block). Shared with [`crate::cpu_dpbf16`]'s tile.
    #[inline(always)]
    pub(crate) unsafe fn store_tile<const R: usize, const P: usize>(
        a0: &[[__m512; R]; P],
        a1: &[[__m512; R]; P],
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        for j in 0..P {
            // Columns 0..16 and 16..32 of panel j, masked to the valid ones.
            let valid = cols.saturating_sub(j * NR).min(NR) as u32;
            let m0: __mmask16 = ((1u32 << valid.min(16)) - 1) as u16;
            let m1: __mmask16 = ((1u32 << valid.saturating_sub(16)) - 1) as u16;
            for r in 0..R {
                let c = c.add(r * ldc + j * NR);
                let (mut v0, mut v1) = (a0[j][r], a1[j][r]);
                if accumulate {
                    v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), v0);
                    v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c.add(16)), v1);
                }
                _mm512_mask_storeu_ps(c, m0, v0);
                _mm512_mask_storeu_ps(c.add(16), m1, v1);
            }
        }
    }
}

/// The tile with AVX2 and FMA (x86-64 CPUs without AVX-512, e.g. AMD's Zen 1-3): 16 registers of 8 lanes,
/// so a tile is computed in passes over parts of it, each element still summed k in order in one f32
/// accumulator (the portable order: FMA is what `mul_add` computes).
///
/// A pass covers up to 6 rows of one half of a panel (16 of its columns, see `avx2::half_cols`): 12
/// accumulators, 2 weight vectors and a broadcast, the shape of BLIS's Haswell kernel. One or two rows
/// take whole panels per pass (one row two panels at a time, for the loads in flight of a decode step's
/// weight stream).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{Elem, Prefetch, Tile, MAX_PANELS, MR, NR};
    use std::arch::x86_64::*;

    /// How far a spread prefetch reaches: one K block (two were no faster).
    const SPREAD_AHEAD: usize = super::super::KC * NR;

    /// Passes of [`tile`] over one panel for `rows` rows (what [`tile`] counts, checked there).
    pub(in crate::cpu_gemm) fn passes(rows: usize) -> usize {
        if rows <= 2 {
            1
        } else {
            2 * rows.div_ceil(PASS_ROWS)
        }
    }

    /// Rows per pass over a panel half: 6 x 2 accumulators fill the 16 registers with the two weight
    /// vectors and the broadcast.
    const PASS_ROWS: usize = 6;

    /// The first columns of the two 8-column vectors that half `h` of a panel row holds: for bf16 the
    /// two one 32-byte load widens into (`Elem::slot`: columns `8h..` and `16 + 8h..`), for f32 16
    /// consecutive columns, one 64-byte line (taking `8h..` and `16 + 8h..` instead touched both lines of
    /// the row in every pass, twice the traffic from L2).
    #[inline(always)]
    fn half_cols<T: Elem>(h: usize) -> (usize, usize) {
        if T::IS_BF16 {
            (8 * h, 16 + 8 * h)
        } else {
            (16 * h, 16 * h + 8)
        }
    }

    /// Half `h` of panel row `kk` at `panel`, widened to f32: the columns of [`half_cols`] (f32 halves
    /// `half` elements apart, rows `row` apart: see [`Tile::row`]).
    #[inline(always)]
    unsafe fn load_half<T: Elem>(
        panel: *const T,
        kk: usize,
        h: usize,
        (row, half): (usize, usize),
    ) -> (__m256, __m256) {
        if T::IS_BF16 {
            let p = panel.add(kk * NR);
            // u32 lane c of the row: column c in the low half, c + 16 in the high half.
            let v = _mm256_loadu_si256(p.add(16 * h) as *const __m256i);
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536))),
            )
        } else {
            let f = (panel as *const f32).add(kk * row + h * half);
            (_mm256_loadu_ps(f), _mm256_loadu_ps(f.add(8)))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(in crate::cpu_gemm) unsafe fn tile<T: Elem>(t: &Tile<'_, T>, rows: usize) {
        debug_assert!((1..=MAX_PANELS).contains(&t.panels) && (1..=MR).contains(&rows));
        let mut n = 0;
        if rows <= 2 {
            let mut j = 0;
            while j < t.panels {
                if rows == 1 && j + 1 < t.panels {
                    pass::<T, 1, 4>(t, 0, [(j, 0), (j, 1), (j + 1, 0), (j + 1, 1)], n);
                    j += 2;
                } else {
                    let halves = [(j, 0), (j, 1)];
                    if rows == 1 {
                        pass::<T, 1, 2>(t, 0, halves, n);
                    } else {
                        pass::<T, 2, 2>(t, 0, halves, n);
                    }
                    j += 1;
                }
                n += 1;
            }
            debug_assert!(t.panels > 1 || n == passes(rows));
            return;
        }
        debug_assert_eq!(t.panels, 1);
        // Groups of sizes differing by at most one. Products on AVX2 run tiles of 12 rows, 6 + 6 (see
        // `Isa::tile_rows`: every pass then has 12 accumulators); more rows, up to MR, only come from rows
        // packed for another kernel's height (the tests), and run as 4 + 5 + 5.
        let mut r0 = 0;
        let groups = rows.div_ceil(PASS_ROWS);
        for g in 0..groups {
            let size = (rows - r0) / (groups - g);
            for h in 0..2 {
                let s = [(0, h)];
                match size {
                    6 => pass::<T, 6, 1>(t, r0, s, n),
                    5 => pass::<T, 5, 1>(t, r0, s, n),
                    4 => pass::<T, 4, 1>(t, r0, s, n),
                    3 => pass::<T, 3, 1>(t, r0, s, n),
                    2 => pass::<T, 2, 1>(t, r0, s, n),
                    _ => pass::<T, 1, 1>(t, r0, s, n),
                }
                n += 1;
            }
            r0 += size;
        }
        debug_assert_eq!(n, passes(rows));
    }

    /// Rows `r0..r0 + R` of the tile over `S` panel halves (`(panel, half)`), k in order; the tile's `n`th
    /// pass (from 0).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pass<T: Elem, const R: usize, const S: usize>(
        t: &Tile<'_, T>,
        r0: usize,
        slots: [(usize, usize); S],
        n: usize,
    ) {
        // One loop per kind of prefetch, the kind a constant in each: with the kind tested in the loop, the
        // 16-row bf16 step (no spread) ran 5-10 % slower in four of five alternated `step_probe` rounds.
        match t.prefetch {
            Prefetch::None => pass_pf::<T, R, S, NONE>(t, r0, slots, (usize::MAX, 0)),
            Prefetch::Ahead => pass_pf::<T, R, S, AHEAD>(t, r0, slots, (usize::MAX, 0)),
            Prefetch::Spread { first, passes } => {
                pass_pf::<T, R, S, SPREAD>(t, r0, slots, (first + n, passes))
            }
        }
    }

    const NONE: u8 = 0;
    const AHEAD: u8 = 1;
    const SPREAD: u8 = 2;

    /// [`pass`] with prefetch `PF`; for [`SPREAD`], the rows `kk` it prefetches for are `due.0`, then every
    /// `due.1`th.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pass_pf<T: Elem, const R: usize, const S: usize, const PF: u8>(
        t: &Tile<'_, T>,
        r0: usize,
        slots: [(usize, usize); S],
        (mut due, every): (usize, usize),
    ) {
        let mut a0 = [[_mm256_setzero_ps(); R]; S];
        let mut a1 = [[_mm256_setzero_ps(); R]; S];
        let x = t.x.as_ptr().add(r0);
        let panel = t.panel.as_ptr();
        // As in the AVX-512 tile: 64 panel rows ahead, into L2, once per panel (by its first half; in f32
        // the line of each half, `Tile::ahead`).
        const ROWS_AHEAD: usize = 64;
        let lines = if T::IS_BF16 { 1 } else { 2 };
        for kk in 0..t.kl {
            if PF == AHEAD {
                for &(j, h) in &slots {
                    if h == 0 {
                        for hh in 0..lines {
                            let p = panel.wrapping_add(j * t.next + t.ahead(kk, hh, ROWS_AHEAD));
                            _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
                        }
                    }
                }
            } else if PF == SPREAD && kk == due {
                // The next block's bytes as one range, whatever their layout: over all the block's passes,
                // each 128-byte piece of it once.
                let p = panel.wrapping_add(kk * NR + SPREAD_AHEAD) as *const i8;
                for l in 0..lines {
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * l));
                }
                due += every;
            }
            let mut w0 = [_mm256_setzero_ps(); S];
            let mut w1 = [_mm256_setzero_ps(); S];
            for (s, &(j, h)) in slots.iter().enumerate() {
                (w0[s], w1[s]) = load_half(panel.add(j * t.next), kk, h, (t.row, t.half));
            }
            for r in 0..R {
                let xb = _mm256_set1_ps(*x.add(kk * t.xs + r));
                for s in 0..S {
                    a0[s][r] = _mm256_fmadd_ps(xb, w0[s], a0[s][r]);
                    a1[s][r] = _mm256_fmadd_ps(xb, w1[s], a1[s][r]);
                }
            }
        }
        // The accumulators by value (as in the AVX-512 tile): borrowing the arrays kept them in memory,
        // and the loop above stored every accumulator on every k, as many stores as FMAs.
        for (s, &(j, h)) in slots.iter().enumerate() {
            let (c0, c1) = half_cols::<T>(h);
            let (col0, col1) = (j * NR + c0, j * NR + c1);
            let valid0 = t.cols.saturating_sub(col0).min(8);
            let valid1 = t.cols.saturating_sub(col1).min(8);
            for r in 0..R {
                let c = t.c.add((r0 + r) * t.ldc);
                if valid0 > 0 {
                    store(c.add(col0), a0[s][r], valid0, t.accumulate);
                }
                if valid1 > 0 {
                    store(c.add(col1), a1[s][r], valid1, t.accumulate);
                }
            }
        }
    }

    /// `valid` (1 to 8) columns of `v` to `c`, added to what is there when `accumulate`.
    #[inline(always)]
    unsafe fn store(c: *mut f32, v: __m256, valid: usize, accumulate: bool) {
        if valid == 8 {
            let v = if accumulate {
                _mm256_add_ps(_mm256_loadu_ps(c), v)
            } else {
                v
            };
            _mm256_storeu_ps(c, v);
            return;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        for (i, &a) in lanes.iter().enumerate().take(valid) {
            let p = c.add(i);
            *p = if accumulate { *p + a } else { a };
        }
    }
}
