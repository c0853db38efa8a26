//! The CPU matrix multiply behind every projection: `y = x W^T (+ b)` with `W` packed once at load.
//!
//! candle's CPU GEMM reaches about half of this machine's f32 peak and a tenth of it with bf16 weights, and its
//! one-row products are far from the memory bandwidth (docs/PERFORMANCE.md). This kernel:
//!
//! * packs `W` `[N, K]` into panels of [`NR`] = 32 output columns stored k-major (`[K][32]`, the last panel
//!   zero-padded; for the AVX2 kernel, f32 panels store each K block's two halves of 16 columns one after
//!   the other, `[kl][16]` twice: see [`block_index`]), in f32 or bf16 (bf16 is widened to f32 exactly: in
//!   registers with a shift and a mask for few rows, its panel rows being stored interleaved for that
//!   (`Elem::slot`), a group of panels at a time into an f32 buffer for many), held in memory of their
//!   own on huge pages where the system allows (`crate::page_buf`: a decode step streams them all from
//!   memory);
//! * computes an `MR x 32` tile of `y` (MR <= 14 rows) with 2 x MR AVX-512 accumulators, broadcasting one `x`
//!   element per row and FMA-ing it with two vectors of the panel;
//! * for many rows, blocks K by [`KC`] and runs in BLIS's order: a row tile's KC slice stays in L1 while the
//!   slices of a group of panels (in L2) stream past it; for few rows (decode), streams each panel once
//!   (for one or two rows, four panels side by side: see `tile::FEW_PANEL_ROWS`);
//! * splits the panels (output columns) over the rayon pool; each task then adds the bias (and the GELU, for
//!   the encoder's fc1) to its own columns while they are in cache.
//!
//! `x` is packed into k-major tiles of MR rows (many rows), transposed whole to k-major (few rows: no padding
//! rows), or read in place when the caller has it k-major already (the encoder's attention scores, see
//! [`crate::encoder_cpu`]).
//!
//! Every output element is accumulated in the same order whatever the number of rows (k in order, one
//! accumulator per KC block, blocks added in order), so a row's result does not depend on which other rows
//! share the product: a request gives the same logits alone or batched with 15 others. Accumulation is in
//! f32 for both weight types, as torch does for bf16.
//!
//! Without AVX-512, an AVX2 + FMA tile computes the same tile in passes of up to 6 rows and 16 columns
//! (`tile::avx2`; many-rows products then run tiles of 12 rows, two passes of 6 per panel half), and without
//! those a portable kernel with the same loop structure; all three sum in the same order, so the result's
//! bits do not depend on the CPU's vector width (nor on the tile height).

use crate::page_buf::PageBuf;
use half::bf16;
use rayon::prelude::*;

mod pack;
mod tile;
#[cfg(target_arch = "x86_64")]
pub(crate) use pack::avx512::transpose as transpose16;
#[cfg(target_arch = "x86_64")]
pub(crate) use tile::avx512::store_tile;
#[cfg(target_arch = "x86_64")]
use tile::{avx2, avx512};
use tile::{portable_tile, Prefetch, Tile, FEW_PANEL_ROWS, MAX_PANELS};

/// Output columns per panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows per micro-tile: 14 x 2 accumulators, two panel vectors and the broadcast fill the 32 AVX-512
/// registers (the same shape as oneDNN's and BLIS's f32 kernels), so each panel load feeds 14 FMAs.
pub const MR: usize = 14;
/// Rows per tile of the AVX2 kernel in a many-rows product ([`Isa::tile_rows`]).
const AVX2_MR: usize = 12;
/// K block: a row tile's KC slice (21 KiB in f32) stays in L1 while the panels of a group stream past it.
pub const KC: usize = 384;
/// Up to this many rows, every panel is streamed once from memory, front to back (decode steps).
pub const FEW_ROWS: usize = 48;
/// Panels per group in the many-rows order: a group's KC slices (1.1 MiB in f32) stay in L2 while every
/// row tile passes over them.
const GROUP: usize = 24;

#[derive(Debug, Clone)]
enum Panels {
    F32(PageBuf<f32>),
    /// bf16 bit patterns.
    Bf16(PageBuf<u16>),
}

/// `W` `[n, k]` packed into k-major panels of 32 columns.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    panels: Panels,
    n: usize,
    k: usize,
    /// f32 panels in halves ([`block_index`]); false for bf16.
    split: bool,
}

impl PackedWeight {
    fn panel_count(n: usize) -> usize {
        n.div_ceil(NR)
    }

    /// Packs a row-major `[n, k]` f32 matrix.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_f32(w, n, k, split_halves(Isa::detect()))
    }

    /// [`Self::from_f32`] in halves or not (the tests run every kernel on both).
    fn pack_f32(w: &[f32], n: usize, k: usize, split: bool) -> Self {
        assert_eq!(w.len(), n * k, "weight buffer size");
        let mut p = PageBuf::zeroed(Self::panel_count(n) * k * NR);
        pack_into(w, n, k, &mut p, split);
        PackedWeight {
            panels: Panels::F32(p),
            n,
            k,
            split,
        }
    }

    /// Packs an f32 `[n, k]` matrix given element by element, `w(row, kk)`, in the order of the packed
    /// layout (for a fixed `kk`, 32 consecutive rows): a matrix stored transposed is read sequentially.
    pub(crate) fn from_fn(n: usize, k: usize, w: impl Fn(usize, usize) -> f32) -> Self {
        let split = split_halves(Isa::detect());
        let mut p = PageBuf::zeroed(Self::panel_count(n) * k * NR);
        for (pi, panel) in p.chunks_mut(k * NR).enumerate() {
            let cols = NR.min(n - pi * NR);
            for kk in 0..k {
                for c in 0..cols {
                    panel[panel_index::<f32>(k, kk, c, split)] = w(pi * NR + c, kk);
                }
            }
        }
        PackedWeight {
            panels: Panels::F32(p),
            n,
            k,
            split,
        }
    }

    /// Packs a row-major `[n, k]` bf16 matrix (kept in bf16).
    pub fn from_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight buffer size");
        let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
        let mut p = PageBuf::zeroed(Self::panel_count(n) * k * NR);
        pack_into(&bits, n, k, &mut p, false);
        PackedWeight {
            panels: Panels::Bf16(p),
            n,
            k,
            split: false,
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
        self.product(x, m, Epilogue { bias, gelu: false }, true)
    }

    /// [`Self::matmul`] of bf16 activations (a bf16 model on a CPU without AMX), widened as they are packed:
    /// the same bits as widening them first, without the two extra single-threaded copies of converting
    /// the tensor.
    pub fn matmul_bf16(&self, x: &[bf16], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        use half::slice::HalfFloatSliceExt;
        let bits: &[u16] = x.reinterpret_cast();
        self.product(bits, m, Epilogue { bias, gelu: false }, true)
    }

    /// `gelu_erf(matmul(x, m, bias))`, the GELU applied by each task to its own columns while they are in
    /// cache (the encoder's fc1 in f32, where nothing is rounded between the two).
    pub fn matmul_gelu(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        self.product(x, m, Epilogue { bias, gelu: true }, true)
    }

    /// On the calling thread only, for callers that already run many small products in parallel (the
    /// attention kernels, one head per task): the first `m` of `x`'s rows, packed once by the caller (the
    /// keys a causal block of queries can see are a prefix of the sequence's).
    pub(crate) fn matmul_packed_serial(&self, x: &PackedRows, m: usize) -> Vec<f32> {
        assert_eq!(x.k, self.k, "packed rows' width");
        assert!(m <= x.m, "{m} of {} packed rows", x.m);
        let mr = x.mr;
        let x = &x.data[..m.div_ceil(mr) * self.k * mr];
        self.run(
            Rows::Packed { x, mr },
            m,
            self.k,
            Epilogue::default(),
            false,
        )
    }

    /// On the calling thread only, `x` given k-major: row `r`'s element `kk` at `x[kk * stride + r]`
    /// (`m <= stride`), read in place, over the first `k` of the weight's inputs (`k <= in_dim`: the values
    /// a causal block of queries can see).
    pub(crate) fn matmul_kmajor_serial(
        &self,
        x: &[f32],
        m: usize,
        stride: usize,
        k: usize,
    ) -> Vec<f32> {
        assert!(
            k <= self.k && m <= stride && x.len() >= k.saturating_sub(1) * stride + m,
            "k-major activation buffer size"
        );
        self.run(Rows::KMajor { x, stride }, m, k, Epilogue::default(), false)
    }

    /// `x` f32, or bf16 bit patterns (widened as they are packed).
    fn product<A: Elem>(
        &self,
        x: &[A],
        m: usize,
        epilogue: Epilogue<'_>,
        parallel: bool,
    ) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "activation buffer size");
        if m <= FEW_ROWS {
            // Few rows (decode): k-major with stride `m`, not tiles of MR rows. One row packed as a tile was
            // a 56-byte stride per k (13 rows of zeros): 50 KiB of x per 896 inputs, a new cache line of x
            // for every 64 bytes of bf16 weights, taking L1 fill buffers from the weight stream. The tiles
            // read the same values in the same order either way. Written in order and read from the m rows
            // (the other way round, stores m floats apart, took ~5 % of a 16-row step).
            let k = self.k;
            let mut xt = vec![0f32; m * k];
            for (kk, dst) in xt.chunks_exact_mut(m).enumerate() {
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = x[r * k + kk].widen();
                }
            }
            return self.run(Rows::KMajor { x: &xt, stride: m }, m, k, epilogue, parallel);
        }
        let xp = PackedRows::pack(x, m, self.k, parallel);
        let x = Rows::Packed {
            x: &xp.data,
            mr: xp.mr,
        };
        self.run(x, m, self.k, epilogue, parallel)
    }

    /// `y = x W^T` over the first `k` inputs of `W` (all of them but in the attention kernels).
    fn run(
        &self,
        x: Rows<'_>,
        m: usize,
        k: usize,
        epilogue: Epilogue<'_>,
        parallel: bool,
    ) -> Vec<f32> {
        let n = self.n;
        if m == 0 || n == 0 || k == 0 {
            let mut y = vec![0f32; m * n];
            finish(&SyncPtr(y.as_mut_ptr()), m, n, 0..n, epilogue);
            return y;
        }
        let isa = Isa::detect();
        let task = |range, out: &SyncPtr| match &self.panels {
            Panels::F32(w) => run_panels(w, self.split, x, m, (k, self.k), n, range, out, isa),
            Panels::Bf16(w) => run_panels(w, false, x, m, (k, self.k), n, range, out, isa),
        };
        // SAFETY: with k > 0 the first K block of every tile overwrites its elements, and the tiles cover
        // all m rows and n columns (all panels, in one task or spread over the pool).
        unsafe {
            uninit_result(m, n, |out| {
                if parallel {
                    par_panels(out, m, n, epilogue, task);
                } else {
                    task(0..Self::panel_count(n), out);
                    finish(out, m, n, 0..n, epilogue);
                }
            })
        }
    }
}

/// What is applied to a product's columns after the whole sum: the bias (as the reference adds it, after
/// the product), then optionally the GELU.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub gelu: bool,
}

/// Applies `e` to columns `cols` of every row of `y` (`[m, n]` behind `out`).
pub(crate) fn finish(
    out: &SyncPtr,
    m: usize,
    n: usize,
    cols: std::ops::Range<usize>,
    e: Epilogue<'_>,
) {
    if e.bias.is_none() && !e.gelu {
        return;
    }
    for r in 0..m {
        // SAFETY: row r's columns `cols` are inside y, and the caller owns them (one task's columns).
        let row =
            unsafe { std::slice::from_raw_parts_mut(out.0.add(r * n + cols.start), cols.len()) };
        if let Some(b) = e.bias {
            for (v, b) in row.iter_mut().zip(&b[cols.clone()]) {
                *v += b;
            }
        }
        if e.gelu {
            crate::cpu_exp::gelu_erf_in_place(row);
        }
    }
}

/// Splits the `ceil(n / 32)` output panels of `y` (`[m, n]` behind `out`) into ranges over the rayon pool
/// (one per thread with many rows, a few per thread with few) and runs `task` on each; tasks write disjoint
/// columns through the pointer. Then each task applies the `epilogue` to its columns. Shared by this kernel and
/// [`crate::cpu_amx`].
pub(crate) fn par_panels(
    out: &SyncPtr,
    m: usize,
    n: usize,
    epilogue: Epilogue<'_>,
    task: impl Fn(std::ops::Range<usize>, &SyncPtr) + Sync,
) {
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    // Every task streams all of x once: with many rows (x of an encoder window's fc2 is 30 MB) that traffic
    // is paid per task, so one task per thread; with few rows (decode) x is tiny and the panel stream is the
    // cost, so a few tasks per thread balance it. The panels are dealt out evenly (sizes differ by at most
    // one): 28 panels (896 outputs) in tasks of 4 were 7 tasks for 2 threads, one thread doing 4 of them
    // while the other waited.
    let tasks = if m > FEW_ROWS {
        threads
    } else {
        (threads * 4).min(panels.div_ceil(2))
    }
    .clamp(1, panels.max(1));
    (0..tasks).into_par_iter().for_each(|t| {
        let range = deal(panels, tasks, t);
        let cols = range.start * NR..(range.end * NR).min(n);
        task(range, out);
        // Each task finishes its own columns, while they are still in cache.
        finish(out, m, n, cols, epilogue);
    });
}

/// Task `t`'s share of `panels` dealt to `tasks` tasks: consecutive ranges covering them all, of sizes that
/// differ by at most one.
fn deal(panels: usize, tasks: usize, t: usize) -> std::ops::Range<usize> {
    t * panels / tasks..(t + 1) * panels / tasks
}

/// An `[m, n]` f32 result allocated without zeroing, filled by `fill` through the pointer. Zeroing an
/// encoder window's 30 MB output was a single-threaded pass before the parallel product (or, for memory fresh
/// from the system, page faults), for values the product overwrites anyway.
///
/// # Safety
/// `fill` must store every one of the `m * n` elements before it returns, and read none it has not stored.
pub(crate) unsafe fn uninit_result(m: usize, n: usize, fill: impl FnOnce(&SyncPtr)) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    fill(&SyncPtr(y.as_mut_ptr()));
    // SAFETY: `fill` stored all m * n elements (the caller's contract); the capacity is m * n.
    unsafe { y.set_len(m * n) };
    y
}

/// `[m, k]` activations in the kernel's layout: tiles of `mr` rows, each stored k-major (`[K][mr]`, missing
/// rows zero), so the kernel's broadcasts walk one sequential stream. Packed per product, or once by a caller
/// that uses them for several (the encoder's attention: a head's keys, for every block of queries). `mr` is
/// the tile height of the kernel the CPU runs ([`Isa::tile_rows`]); the sums do not depend on it.
pub(crate) struct PackedRows {
    data: Vec<f32>,
    m: usize,
    k: usize,
    mr: usize,
}

impl PackedRows {
    /// Packs `[m, k]` rows given element by element: `x(r, kk)`.
    pub(crate) fn from_fn(m: usize, k: usize, x: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        Self::build(m, k, false, Isa::detect().tile_rows(), x)
    }

    /// Packs row-major `x` (`[m, k]`), the tiles in parallel when asked (products of up to [`FEW_ROWS`]
    /// rows transpose them instead, see [`PackedWeight::product`]).
    fn pack<A: Elem>(x: &[A], m: usize, k: usize, parallel: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            return Self::fill_tiles(m, k, MR, parallel, |t, tile| {
                // SAFETY: AVX-512 F/BW were detected; tile t holds rows t*MR.. of x ([m, k]).
                unsafe { pack::avx512::pack_tile(x, k, (t * MR, MR.min(m - t * MR)), tile) }
            });
        }
        let mr = Isa::detect().tile_rows();
        Self::build(m, k, parallel, mr, |r, kk| x[r * k + kk].widen())
    }

    fn build(
        m: usize,
        k: usize,
        parallel: bool,
        mr: usize,
        x: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Self {
        // Written in order, every element (rows past `m` as zeros), the tile's rows read side by side (each
        // a sequential stream): zeroing the buffer first and then writing it column by column, 56 bytes
        // apart, was ~7 % of an f32 prefill (memset and the scattered stores).
        Self::fill_tiles(m, k, mr, parallel, |t, tile| {
            let rows = mr.min(m - t * mr);
            for (kk, dst) in tile.chunks_exact_mut(mr).enumerate() {
                for (r, d) in dst.iter_mut().enumerate() {
                    d.write(if r < rows { x(t * mr + r, kk) } else { 0.0 });
                }
            }
        })
    }

    /// The tiles of `mr` of `m` rows of width `k`, tile `t` (`k * mr` values) written whole by
    /// `fill(t, tile)`, in parallel when asked.
    fn fill_tiles(
        m: usize,
        k: usize,
        mr: usize,
        parallel: bool,
        fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
    ) -> Self {
        let fill = |(t, tile): (usize, &mut [std::mem::MaybeUninit<f32>])| fill(t, tile);
        // The tiles cover the buffer, each written whole by `fill`.
        let data = crate::elementwise::written(m.div_ceil(mr) * k * mr, |spare| {
            if spare.is_empty() {
                return;
            }
            if parallel {
                spare.par_chunks_mut(k * mr).enumerate().for_each(fill);
            } else {
                spare.chunks_mut(k * mr).enumerate().for_each(fill);
            }
        });
        PackedRows { data, m, k, mr }
    }
}

fn pack_into<T: Elem>(w: &[T], n: usize, k: usize, out: &mut [T], split: bool) {
    for (p, panel) in out.chunks_mut(k * NR).enumerate() {
        for c in 0..NR {
            let row = p * NR + c;
            if row >= n {
                break;
            }
            let src = &w[row * k..(row + 1) * k];
            for (kk, &v) in src.iter().enumerate() {
                panel[panel_index::<T>(k, kk, c, split)] = v;
            }
        }
    }
}

/// Whether f32 panels are packed in halves ([`block_index`]) for the kernel `isa`: for AVX2's, whose
/// passes read one half of a panel at a time. With rows of 32 columns a pass read one of each row's two
/// 64-byte lines, every other line of the stream, and the hardware prefetchers fetched the block from L3
/// or memory at a fraction of its bandwidth; in halves each pass reads one sequential stream. The AVX-512
/// tile reads whole rows and keeps them (not measured in halves: no such CPU here).
fn split_halves(isa: Isa) -> bool {
    isa == Isa::Avx2
}

/// Where element (`kk`, `col`) of a panel of `k` inputs lies in it: `kk * NR + slot(col)`, or, for f32 in
/// halves, within `kk`'s K block at [`block_index`].
fn panel_index<T: Elem>(k: usize, kk: usize, col: usize, split: bool) -> usize {
    if !split || T::IS_BF16 {
        return kk * NR + T::slot(col);
    }
    let kc = kk / KC * KC;
    kc * NR + block_index(KC.min(k - kc), kk - kc, col, true)
}

/// Where element (`kk`, `col`) of an f32 K block of `kl` stored rows lies in it: `kk * NR + col`, or, in
/// halves, the 16 columns of `col`'s half `[kl][16]` after those of the first half.
fn block_index(kl: usize, kk: usize, col: usize, split: bool) -> usize {
    if split {
        (col / 16) * kl * 16 + kk * 16 + col % 16
    } else {
        kk * NR + col
    }
}

/// A raw output pointer shared by tasks that write disjoint column ranges.
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint panels (column ranges) of the output; nothing reads it concurrently.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// Rows per tile of the kernel this CPU runs: callers that choose their own row counts (the attention's
/// blocks of queries) take whole tiles.
pub(crate) fn tile_rows() -> usize {
    Isa::detect().tile_rows()
}

fn has_avx512() -> bool {
    crate::cpu_features::avx512f() && crate::cpu_features::avx512bw()
}

/// The tile kernel a product runs: all three sum every element in the same order (see `tile`), so the
/// choice changes speed, never a bit of the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    /// AVX2 with FMA (x86-64 CPUs without AVX-512, such as AMD's Zen 1-3).
    Avx2,
    Portable,
}

impl Isa {
    /// Rows per tile (and per packed row tile): [`MR`], but 12 for AVX2, two passes of 6 rows per panel
    /// half (12 accumulators each, see `tile::avx2`). 14 rows take passes of 4 + 5 + 5 rows, whose 8 or 10
    /// accumulators do not cover the FMA latency (4 cycles, 2 FMAs a cycle) whenever a load is late, or
    /// 6 + 6 and a 2-row pass over the whole panel, which ran at ~55 GFLOP/s. A stand-alone loop of the
    /// tile at the encoder's fc1 shape (1500 x 5120 x 1280, one core of an EPYC Zen 3) ran at ~73, ~81 and
    /// ~88 GFLOP/s with the three, in the same runs; the whole product gained less (docs/PERFORMANCE.md).
    fn tile_rows(self) -> usize {
        match self {
            Isa::Avx2 => AVX2_MR,
            _ => MR,
        }
    }

    fn detect() -> Self {
        if has_avx512() {
            Isa::Avx512
        } else if crate::cpu_features::avx2_fma() {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }
}

/// A packed weight element.
trait Elem: Copy + Default + Sync {
    fn widen(self) -> f32;
    /// Where column `col` (`< NR`) of a panel row is stored within the row's `NR` elements.
    fn slot(col: usize) -> usize;
    const IS_BF16: bool;
}
impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn slot(col: usize) -> usize {
        col
    }
    const IS_BF16: bool = false;
}
impl Elem for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::elementwise::widen_bf16(bf16::from_bits(self))
    }
    /// Columns `c` and `c + 16` side by side (`c < 16`): read as 16 u32 lanes, lane `c` holds column `c` in
    /// its low half and column `c + 16` in its high half, so one shift and one mask widen a panel row into
    /// its two f32 vectors. Zero-extending each half first and then shifting took twice the ALU work on
    /// the FMA ports: a 16-row bf16 decode step ran ~5 % faster this way (`step_probe bf16 16`).
    #[inline(always)]
    fn slot(col: usize) -> usize {
        (col % 16) * 2 + col / 16
    }
    const IS_BF16: bool = true;
}

/// Where the kernel finds row `r`'s element `kk` of `x`.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Packed ([`PackedRows`]): tiles of `mr` rows, each `[K][mr]`.
    Packed { x: &'a [f32], mr: usize },
    /// Given k-major: element `(r, kk)` at `kk * stride + r` (`x^T` row-major, e.g. attention scores
    /// computed as `k q^T`), read in place with no packing.
    KMajor { x: &'a [f32], stride: usize },
}

#[allow(clippy::too_many_arguments)]
fn run_panels<T: Elem>(
    w: &[T],
    split: bool,
    x: Rows<'_>,
    m: usize,
    (k, stride): (usize, usize),
    n: usize,
    panels: std::ops::Range<usize>,
    out: &SyncPtr,
    isa: Isa,
) {
    // `k` inputs are summed; `stride` is the packed K of the panels (and of packed rows). bf16 panels are
    // read in their own layout (few rows) or widened into f32 blocks, in halves for the AVX2 kernel.
    let ctx = Blocks {
        x,
        stride,
        n,
        out,
        stream: m <= FEW_ROWS,
        isa,
        split: if T::IS_BF16 { split_halves(isa) } else { split },
    };
    // Rows stored in the K block at `kc` (the last one may be shorter), of which the first `kl` are summed.
    let stored = |kc: usize| KC.min(stride - kc);
    // Panel `p`'s K block at `kc`: `stored(kc) x 32` values.
    let slice = |p: usize, kc: usize| {
        let base = p * stride * NR;
        &w[base + kc * NR..base + (kc + stored(kc)) * NR]
    };
    // Both orders add the same K blocks in the same order to every output element; they differ only in
    // which data stays in cache.
    if ctx.stream {
        // Few rows (decode steps): stream each panel once, front to back; the rows stay in L1. One or two
        // rows read MAX_PANELS panels side by side (see `FEW_PANEL_ROWS`), each K block of each panel once,
        // in order per panel; a task's last group may have fewer.
        let side = if m <= FEW_PANEL_ROWS { MAX_PANELS } else { 1 };
        let step = stride * NR;
        for g in panels.clone().step_by(side) {
            let count = side.min(panels.end - g);
            for kc in (0..k).step_by(KC) {
                let start = g * step + kc * NR;
                let blocks = &w[start..start + (count - 1) * step + stored(kc) * NR];
                ctx.block(blocks, (count, step), g, (kc, KC.min(k - kc)), 0, m);
            }
        }
        return;
    }
    // Many rows (prefill, encoder), in BLIS's order: a row tile's KC slice stays in L1 while the KC slices
    // of a group of panels (in L2) stream past it; each panel load then feeds MR FMAs. bf16 panels are
    // widened once per group into f32 (exact), not once per row tile in registers: the widening's shifts
    // and permutes took FMA ports, and a bf16 prefill ran ~20 % slower than an f32 one.
    // One panel's slice per `ks` values, for the group's panels (fewer in a small product).
    let ks = KC.min(stride) * NR;
    let mut wide = if T::IS_BF16 {
        vec![0f32; GROUP.min(panels.len()) * ks]
    } else {
        Vec::new()
    };
    for kc in (0..k).step_by(KC) {
        // This K block: its start and the rows summed.
        let kb = (kc, KC.min(k - kc));
        for g in panels.clone().step_by(GROUP) {
            let group = g..(g + GROUP).min(panels.end);
            if T::IS_BF16 {
                let rows = stored(kc);
                for p in group.clone() {
                    let src = slice(p, kc);
                    let dst = &mut wide[(p - g) * ks..][..src.len()];
                    for (kk, s) in src.chunks_exact(NR).enumerate() {
                        for c in 0..NR {
                            dst[block_index(rows, kk, c, ctx.split)] = s[T::slot(c)].widen();
                        }
                    }
                }
            }
            let mr = ctx.tile_rows();
            for r in (0..m).step_by(mr) {
                let r1 = (r + mr).min(m);
                for p in group.clone() {
                    let panel = slice(p, kc);
                    if T::IS_BF16 {
                        ctx.block(&wide[(p - g) * ks..][..panel.len()], (1, 0), p, kb, r, r1);
                    } else {
                        ctx.block(panel, (1, 0), p, kb, r, r1);
                    }
                }
            }
        }
    }
}

/// What the blocks of one product share.
struct Blocks<'a> {
    x: Rows<'a>,
    /// The packed K of the panels (and of packed rows).
    stride: usize,
    n: usize,
    out: &'a SyncPtr,
    /// Few rows: the panels are read once, as a stream from memory.
    stream: bool,
    isa: Isa,
    /// The f32 blocks read are in halves ([`block_index`]).
    split: bool,
}

impl Blocks<'_> {
    /// Rows per tile: the packing's, else the kernel's. On AVX2 a decode step of 16 rows then runs 12 + 4
    /// rows, not 14 + 2: fewer passes over each panel, each widening its bf16 half again (`step_probe`, 16
    /// rows, four alternated runs, best: bf16 119.4 -> 115.5 ms, f32 157.2 -> 150.7 ms).
    fn tile_rows(&self) -> usize {
        match self.x {
            Rows::Packed { mr, .. } => mr,
            Rows::KMajor { .. } => self.isa.tile_rows(),
        }
    }

    /// Whether a streamed block of `rows` rows prefetches its successor spread over all its passes
    /// (`Prefetch::Spread`), not ahead of its first pass only. On AVX2, for more than [`FEW_PANEL_ROWS`]
    /// rows of f32 weights: a 16-row step makes six passes over each block, and prefetching in the first
    /// one only fetched the whole block from memory during a sixth of the time, at ~12 GB/s a core; the
    /// rest of the passes then left the memory idle. Spread, 16 x 4864 x 896 ran at ~150 GFLOP/s on two
    /// cores of an EPYC Zen 3, against ~115 (best of four alternated runs), and a 16-row f32 step took
    /// ~12 % less time. bf16 blocks are half the bytes, the step is bound by its FMAs, and the spread
    /// prefetch made the lm_head slower (~95 against ~120 GFLOP/s), so they keep the other. The AVX-512
    /// tile takes 14 rows in one pass and is unchanged (not measured: no such CPU here).
    fn spread<E: Elem>(&self, rows: usize) -> bool {
        self.stream && self.isa == Isa::Avx2 && !E::IS_BF16 && rows > FEW_PANEL_ROWS
    }

    /// Rows `r0..r1` of `count` panels from panel `p` on, over the first `kl` rows of their K blocks at
    /// `kc`, in tiles of [`Self::tile_rows`] rows:
    /// `blocks` runs from the first panel's block start to the last one's end, each block its stored rows x
    /// 32 values, `step` elements from one panel's block to the next (unused for one panel). More than one
    /// panel only for up to [`FEW_PANEL_ROWS`] rows, read side by side in one tile.
    fn block<E: Elem>(
        &self,
        blocks: &[E],
        (count, step): (usize, usize),
        p: usize,
        (kc, kl): (usize, usize),
        r0: usize,
        r1: usize,
    ) {
        let (n, stride) = (self.n, self.stride);
        let stored = (blocks.len() - (count - 1) * step) / NR;
        debug_assert!(kl <= stored);
        let (row, half) = if self.split && !E::IS_BF16 {
            (16, stored * 16)
        } else {
            (NR, 16)
        };
        let cols = (count * NR).min(n - p * NR);
        let mr = self.tile_rows();
        // A spread prefetch (`Prefetch::Spread`) counts the AVX2 tiles' passes over the block: all of them,
        // and those before each tile's (`first`). Only the AVX2 tile spreads ([`Self::spread`]).
        let passes = |rows: usize| match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::passes(rows),
            _ => unreachable!("only the AVX2 tile spreads its prefetch"),
        };
        let spread = self.spread::<E>(r1 - r0);
        let total: usize = if spread {
            (r0..r1).step_by(mr).map(|r| passes(mr.min(r1 - r))).sum()
        } else {
            0
        };
        let mut first = 0;
        for r in (r0..r1).step_by(mr) {
            let rows = mr.min(r1 - r);
            let prefetch = if spread {
                let tile = Prefetch::Spread {
                    first,
                    passes: total,
                };
                first += passes(rows);
                tile
            } else if self.stream && r == r0 {
                Prefetch::Ahead
            } else {
                Prefetch::None
            };
            // SAFETY: rows r..r+rows and columns p*NR..p*NR+cols are inside y (m x n) and belong to this
            // task's panels only.
            let c = unsafe { self.out.0.add(r * n + p * NR) };
            let (x, xs) = match self.x {
                // `r` is a multiple of `mr`: the start of a packed row tile.
                Rows::Packed { x, mr } => (&x[r * stride + kc * mr..], mr),
                Rows::KMajor { x, stride } => (&x[kc * stride + r..], stride),
            };
            let tile = Tile {
                x,
                xs,
                panel: blocks,
                kl,
                panels: count,
                next: step,
                row,
                half,
                c,
                ldc: n,
                cols,
                accumulate: kc > 0,
                prefetch,
            };
            match self.isa {
                // SAFETY: the ISA was detected (`Isa::detect`); the tile's bounds hold by construction.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512::tile::<E>(&tile, rows) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::tile::<E>(&tile, rows) },
                _ => portable_tile(&tile, rows),
            }
        }
    }
}

#[cfg(test)]
mod tests;
