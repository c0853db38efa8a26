//! Attention over the paged KV cache on the CPU, computed straight from the block pool: this module's kernel
//! for few-query sequences (decode steps, short chunks), and the blocked causal kernel of
//! [`crate::attn_cpu`] for longer chunks (prefill), both behind one dispatch on the cache's dtype (f32, bf16
//! or f16, computed in f32).
//!
//! A decode step of 16 sequences through candle ops costs ~20 small tensor operations per sequence and layer
//! (gathers, GQA copies, two matmuls, softmax, casts); on a CPU their fixed cost per call dominates the step.
//! Here every (row, kv head) pair is one task over the rayon pool, for the query heads of its GQA group: scores
//! against the sequence's keys read in place from the pool (no gather, no GQA copy; each key converted once for
//! the group), a max-subtracted softmax in f32, and the weighted sum of the values. The task's code is compiled
//! for AVX-512 where the CPU has it, and scores up to 8 heads of the group side by side, one per vector lane
//! (a 16-row decode step over 1 000-token contexts: its layers 148 -> 128 ms, docs/PERFORMANCE.md).
//! Each row's result depends only on its own sequence, so it is the same alone or batched. The single-sequence
//! contiguous cache of the CLI and the tests uses the same kernels.

use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::paged::SeqStep;

#[cfg(target_arch = "x86_64")]
mod key_lanes;

/// Query rows per sequence up to which this kernel is used (longer chunks take [`crate::attn_cpu`]'s blocked
/// kernel).
pub const MAX_QUERY_ROWS: usize = 16;

/// A cache element, read as f32.
pub(crate) trait Kv: Copy + Sync {
    fn f(self) -> f32;
    /// bf16 (of the two 2-byte types).
    const BF16: bool = false;
}
impl Kv for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl Kv for f16 {
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
}
impl Kv for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        crate::elementwise::widen_bf16(self)
    }
    const BF16: bool = true;
}

/// Geometry of the attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

/// Computes `out[t]` (`[nh * hd]` f32) for every row `t` of the step with `selected[t]`; `q` is the step's
/// `[T, nh, hd]` queries (after RoPE) in f32, the pools `[slots, nkv * hd]` in blocks of `bs` slots. Each row
/// is computed alone: the rows selected do not change any row's result.
pub(crate) fn attend_rows(
    q: &[f32],
    seqs: &[SeqStep],
    selected: &[bool],
    pools: (&Tensor, &Tensor),
    (g, bs): (Heads, usize),
    out: &mut [f32],
) -> Result<()> {
    // Row -> (sequence, position).
    let mut rows: Vec<Option<(usize, usize)>> = Vec::with_capacity(selected.len());
    for (s, seq) in seqs.iter().enumerate() {
        for i in 0..seq.len {
            rows.push(selected[rows.len()].then_some((s, seq.start + i)));
        }
    }
    let slot = |s: usize, j: usize, kvh: usize| pool_offset(&seqs[s].block_table, bs, g, j, kvh);
    attend(q, Job::Rows(&rows), pools, g, slot, out)
}

/// Causal attention of one sequence's long chunk over the pool ([`crate::attn_cpu::causal_chunk`]): `q` its
/// `[len, nh, hd]` queries (after RoPE) in f32, at positions `seq.start..seq.start + len`. Writes `out`
/// `[len, nh * hd]`: every row, or with `only` the rows `only` (ascending, within the chunk), with the bits
/// they get among all rows (see [`causal_rows`]); the other rows of `out` are left as they are.
pub(crate) fn attend_chunk(
    q: &[f32],
    seq: &SeqStep,
    only: Option<&[usize]>,
    pools: (&Tensor, &Tensor),
    (g, bs): (Heads, usize),
    out: &mut [f32],
) -> Result<()> {
    let slot = |_: usize, j: usize, kvh: usize| pool_offset(&seq.block_table, bs, g, j, kvh);
    causal_rows(q, (seq.start, seq.len), only, pools, g, slot, out)
}

/// Whether row `i` is computed: every row without `only`, else the rows `only` (ascending).
pub(crate) fn wanted(only: Option<&[usize]>, i: usize) -> bool {
    only.is_none_or(|r| r.binary_search(&i).is_ok())
}

/// The rows `only` of `out` (`[rows, width]`), in order; all of `out` without `only`.
pub(crate) fn take_rows(out: Vec<f32>, width: usize, only: Option<&[usize]>) -> Vec<f32> {
    match only {
        None => out,
        Some(r) => r
            .iter()
            .flat_map(|&i| out[i * width..(i + 1) * width].iter().copied())
            .collect(),
    }
}

/// The blocked causal kernel over a chunk of `len` queries at positions `start..`: one pass for every row, or
/// with `only` each of the rows `only` (ascending) alone, which gives it the bits it gets among all rows (a
/// query's result in the blocked kernel does not depend on the block it is in). Each such row packs the keys
/// and values it sees once; in practice a chunk has one (a prompt's last position).
fn causal_rows(
    q: &[f32],
    (start, len): (usize, usize),
    only: Option<&[usize]>,
    pools: (&Tensor, &Tensor),
    g: Heads,
    slot: impl Fn(usize, usize, usize) -> usize + Sync,
    out: &mut [f32],
) -> Result<()> {
    let Some(rows) = only else {
        return attend(q, Job::Chunk { start, len }, pools, g, slot, out);
    };
    let width = g.nh * g.hd;
    for &i in rows {
        let span = i * width..(i + 1) * width;
        let job = Job::Chunk {
            start: start + i,
            len: 1,
        };
        attend(&q[span.clone()], job, pools, g, &slot, &mut out[span])?;
    }
    Ok(())
}

/// Element offset in a pool of blocks of `bs` slots of the key (or value) vector of position `j`, kv head
/// `kvh`, of the sequence whose block table is `table`.
#[inline(always)]
fn pool_offset(table: &[u32], bs: usize, g: Heads, j: usize, kvh: usize) -> usize {
    (table[j / bs] as usize * bs + j % bs) * g.nkv * g.hd + kvh * g.hd
}

/// The queries of a step as the kernels read them: f32, row-major (once per layer, whatever the dtype).
pub(crate) fn f32_queries(q: &Tensor) -> Result<Vec<f32>> {
    Ok(q.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// Attention of the single sequence of the contiguous cache (see [`crate::decoder::KvCache`]): `q`
/// `[l, nh, hd]` (after RoPE) at positions `start..start + l`, keys and values `[1, nkv, capacity, hd]` with
/// positions `0..start + l` filled (nothing past them is read);
/// up to [`MAX_QUERY_ROWS`] queries through this module's kernel, more through the blocked kernel of
/// [`crate::attn_cpu`] (as the paged path splits them). Returns `[l, nh * hd]` f32, or with `only = Some(rows)`
/// (ascending) the rows `rows` alone, each computed by the kernel that computes it among all `l`: the same
/// bits.
pub(crate) fn attend_contiguous(
    q: &Tensor,
    start: usize,
    (k, v): (&Tensor, &Tensor),
    g: Heads,
    only: Option<&[usize]>,
) -> Result<Vec<f32>> {
    let l = q.dim(0)?;
    let total = k.dim(2)?;
    let width = g.nh * g.hd;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let qf = f32_queries(q)?;
    let slot = |_: usize, j: usize, kvh: usize| (kvh * total + j) * g.hd;
    let mut out = vec![0f32; l * width];
    if l <= MAX_QUERY_ROWS {
        let rows: Vec<_> = (0..l)
            .map(|i| wanted(only, i).then_some((0, start + i)))
            .collect();
        attend(&qf, Job::Rows(&rows), (&k, &v), g, slot, &mut out)?;
    } else {
        causal_rows(&qf, (start, l), only, (&k, &v), g, slot, &mut out)?;
    }
    Ok(take_rows(out, width, only))
}

/// What [`attend`] computes.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// Few-query rows, each `Some((sequence, position))` or `None` (not computed here): [`run`].
    Rows(&'a [Option<(usize, usize)>]),
    /// One sequence's chunk of queries at positions `start..start + len`: the blocked causal kernel.
    Chunk { start: usize, len: usize },
}

/// The kernels' dispatch on the cache dtype; `slot(seq, position, kv_head)` is the element offset of a key
/// (or value) vector in the storage of `pools` (`seq` is 0 for a chunk).
fn attend(
    q: &[f32],
    job: Job<'_>,
    pools: (&Tensor, &Tensor),
    g: Heads,
    slot: impl Fn(usize, usize, usize) -> usize + Sync,
    out: &mut [f32],
) -> Result<()> {
    let (ks, kl) = pools.0.storage_and_layout();
    let (vs, vl) = pools.1.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Err(ModelError::Input("CPU attention needs CPU tensors".into()));
    };
    match pools.0.dtype() {
        DType::F32 => {
            let k = &kc.as_slice::<f32>()?[kl.start_offset()..];
            let v = &vc.as_slice::<f32>()?[vl.start_offset()..];
            compute(q, job, (k, v), g, slot, out);
        }
        DType::BF16 => {
            let k = &kc.as_slice::<bf16>()?[kl.start_offset()..];
            let v = &vc.as_slice::<bf16>()?[vl.start_offset()..];
            compute(q, job, (k, v), g, slot, out);
        }
        DType::F16 => {
            let k = &kc.as_slice::<f16>()?[kl.start_offset()..];
            let v = &vc.as_slice::<f16>()?[vl.start_offset()..];
            compute(q, job, (k, v), g, slot, out);
        }
        other => {
            return Err(ModelError::Input(format!(
                "CPU attention supports f32, bf16 and f16 caches, not {other:?}"
            )))
        }
    }
    Ok(())
}

fn compute<T: Kv>(
    q: &[f32],
    job: Job<'_>,
    (k, v): (&[T], &[T]),
    g: Heads,
    slot: impl Fn(usize, usize, usize) -> usize + Sync,
    out: &mut [f32],
) {
    match job {
        Job::Rows(rows) => run(q, rows, k, v, g, slot, out),
        Job::Chunk { start, len } => {
            let slot = |j: usize, kvh: usize| slot(0, j, kvh);
            crate::attn_cpu::causal_chunk(q, (start, len), (k, v), g, slot, out)
        }
    }
}

fn run<T: Kv>(
    q: &[f32],
    rows: &[Option<(usize, usize)>],
    k: &[T],
    v: &[T],
    g: Heads,
    slot: impl Fn(usize, usize, usize) -> usize + Sync,
    out: &mut [f32],
) {
    let (nh, nkv, hd) = (g.nh, g.nkv, g.hd);
    let group = nh / nkv;
    let scale = (hd as f64).powf(-0.5) as f32;
    // With AVX-512F the few-query kernel is compiled for it: its loops vectorise 16 wide (with AVX2, 8
    // wide). Rust does not contract `a += p * v` into an FMA, so every build computes the same bits.
    let avx512 = crate::cpu_features::avx512f();
    let avx2 = crate::cpu_features::avx2_fma();
    // One task per (row, kv head): the query heads of a GQA group are consecutive (head h reads kv head
    // h / group), so the task's heads are `group` consecutive chunks of `q` and `out`, and every key and
    // value vector is read and converted once for all of them. Each head's arithmetic (the dot products'
    // order, the softmax, the order of the weighted sum) is what a task per head computed.
    out.par_chunks_mut(group * hd)
        .enumerate()
        .for_each(|(tk, o)| {
            let (t, kvh) = (tk / nkv, tk % nkv);
            let Some((s, pos)) = rows[t] else { return };
            let qs = &q[tk * group * hd..(tk + 1) * group * hd];
            // Where each visible position's key and value vectors start (one block-table lookup each).
            let at: Vec<usize> = (0..=pos).map(|j| slot(s, j, kvh)).collect();
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F was detected.
                unsafe { row_avx512(qs, o, (k, v), hd, scale, &at) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA were detected.
                unsafe { row_avx2(qs, o, (k, v), hd, scale, &at) };
                return;
            }
            let _ = (avx512, avx2);
            row(qs, o, (k, v), hd, scale, &at, |_| 0);
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<T: Kv>(
    qs: &[f32],
    o: &mut [f32],
    kv: (&[T], &[T]),
    hd: usize,
    scale: f32,
    at: &[usize],
) {
    let mut kt = Vec::new();
    row(qs, o, kv, hd, scale, at, |scores| {
        // SAFETY: AVX-512F is enabled in this function (the caller detected it).
        unsafe { key_lanes::scores(qs, kv.0, at, hd, scale, scores, &mut kt) }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<T: Kv>(
    qs: &[f32],
    o: &mut [f32],
    kv: (&[T], &[T]),
    hd: usize,
    scale: f32,
    at: &[usize],
) {
    row(qs, o, kv, hd, scale, at, |_| 0)
}

/// Query heads per score pass of [`row`] (vector lanes).
const LANES: usize = 8;

/// One (row, kv head) task: the `group` query heads `qs` (`[group, hd]`) attend to the keys and values at
/// offsets `at` (positions `0..at.len()`); writes `o` (`[group, hd]`).
///
/// Scores go up to [`LANES`] heads at a time, one per vector lane: the heads' queries transposed once
/// (`qt[d * LANES + i]`), each key converted to f32 once and its elements broadcast. Each lane sums in
/// exactly the order of a plain dot product with 16 partial sums (partial sum `l` takes elements `l, l + 16,
/// ...`; the partial sums are then added in order, then the tail past the last 16): one such dot product
/// per key and head took a chain of 15 dependent scalar additions, most of a long context's decode step.
///
/// `first(scores)` may score a leading run of keys itself, in the same order, and returns how many
/// ([`key_lanes`] with AVX-512; `|_| 0` elsewhere).
#[inline(always)]
fn row<T: Kv>(
    qs: &[f32],
    o: &mut [f32],
    (k, v): (&[T], &[T]),
    hd: usize,
    scale: f32,
    at: &[usize],
    first: impl FnOnce(&mut [f32]) -> usize,
) {
    let ctx = at.len();
    let group = qs.len() / hd;
    // scores[i * ctx + j]: head i of the group, key j.
    let mut scores = vec![0f32; group * ctx];
    let done = first(&mut scores);
    let mut qt = vec![0f32; hd * LANES];
    let mut key = vec![0f32; hd];
    for h0 in (0..group).step_by(LANES) {
        let heads = LANES.min(group - h0);
        // Lanes past `heads` stay zero; their scores are dropped.
        qt.fill(0.0);
        for i in 0..heads {
            for (d, &x) in qs[(h0 + i) * hd..][..hd].iter().enumerate() {
                qt[d * LANES + i] = x;
            }
        }
        for (j, &a) in at.iter().enumerate().skip(done) {
            widen(&mut key, &k[a..]);
            let sc = dot_heads(&qt, &key);
            for (i, &x) in sc.iter().take(heads).enumerate() {
                scores[(h0 + i) * ctx + j] = x * scale;
            }
        }
    }
    let mut inv = Vec::with_capacity(group);
    for sc in scores.chunks_exact_mut(ctx) {
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        // The same exponentials and sum as `softmax_rows` computes for these scores (the blocked path of
        // longer chunks), so a sequence's numbers do not depend on which path its rows take.
        inv.push(1.0 / crate::cpu_exp::exp_below_max_sum(sc, max));
    }
    weighted_values(&scores, (v, at), hd, o);
    for (oh, &inv) in o.chunks_exact_mut(hd).zip(&inv) {
        oh.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Columns of the value sum held in registers at a time (two 16-lane vectors per head).
const VALUE_COLS: usize = 32;

/// `o[i] = sum over keys j, in order, of scores[i][j] * value_j` for the `group` heads of `o` (`[group, hd]`,
/// `scores` `[group, ctx]`), each product rounded and then added, from 0.
///
/// For up to 8 heads, [`VALUE_COLS`] columns of every head are summed in registers over all keys, then the
/// next columns. Summed into `o` in memory instead, each key's products take a load and a store per 16
/// columns per head (28 stores a key for a group of 7 with 64 columns): those were the hottest lines of a
/// long context's decode step. The columns past the last full chunk, and larger groups, still take that
/// loop. Every element sees the same operations in the same order either way.
#[inline(always)]
fn weighted_values<T: Kv>(scores: &[f32], (v, at): (&[T], &[usize]), hd: usize, o: &mut [f32]) {
    let done = match o.len() / hd {
        1 => value_chunks::<T, 1>(scores, (v, at), hd, o),
        2 => value_chunks::<T, 2>(scores, (v, at), hd, o),
        3 => value_chunks::<T, 3>(scores, (v, at), hd, o),
        4 => value_chunks::<T, 4>(scores, (v, at), hd, o),
        5 => value_chunks::<T, 5>(scores, (v, at), hd, o),
        6 => value_chunks::<T, 6>(scores, (v, at), hd, o),
        7 => value_chunks::<T, 7>(scores, (v, at), hd, o),
        8 => value_chunks::<T, 8>(scores, (v, at), hd, o),
        _ => 0,
    };
    if done == hd {
        return;
    }
    let ctx = at.len();
    let rest = hd - done;
    for oh in o.chunks_exact_mut(hd) {
        oh[done..].iter_mut().for_each(|x| *x = 0.0);
    }
    let mut vrow = vec![0f32; rest];
    for (j, &a) in at.iter().enumerate() {
        widen(&mut vrow, &v[a + done..]);
        for (i, oh) in o.chunks_exact_mut(hd).enumerate() {
            let p = scores[i * ctx + j];
            for (x, &vv) in oh[done..].iter_mut().zip(&vrow) {
                *x += p * vv;
            }
        }
    }
}

/// [`weighted_values`] for `G` heads over the full [`VALUE_COLS`]-column chunks of `hd`; returns how many
/// columns it wrote.
#[inline(always)]
fn value_chunks<T: Kv, const G: usize>(
    scores: &[f32],
    (v, at): (&[T], &[usize]),
    hd: usize,
    o: &mut [f32],
) -> usize {
    let ctx = at.len();
    let mut done = 0;
    while done + VALUE_COLS <= hd {
        let mut acc = [[0f32; VALUE_COLS]; G];
        for (j, &a) in at.iter().enumerate() {
            if done == 0 {
                if let Some(&ahead) = at.get(j + PREFETCH_KEYS) {
                    prefetch(&v[ahead..][..hd]);
                }
            }
            let mut vr = [0f32; VALUE_COLS];
            widen(&mut vr, &v[a + done..]);
            for (i, acc) in acc.iter_mut().enumerate() {
                let p = scores[i * ctx + j];
                for (x, &vv) in acc.iter_mut().zip(&vr) {
                    *x += p * vv;
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            o[i * hd + done..][..VALUE_COLS].copy_from_slice(acc);
        }
        done += VALUE_COLS;
    }
    done
}

/// Keys ahead of the one being read whose key or value vector is prefetched. The pool's vectors of one
/// sequence and kv head are 256 bytes or more apart and in blocks anywhere in the pool, a decode step's
/// contexts are far larger than the caches, and the loop over keys is a chain of dependent additions, so
/// the loads waited on memory one or two at a time: at 1 000 positions, a 16-row bf16 step's attention
/// took ~1.7 ms a layer, most of it in the loads of the values.
pub(crate) const PREFETCH_KEYS: usize = 16;

/// Asks for every cache line of `v` (a key or value vector in the pool) into L1.
#[inline(always)]
pub(crate) fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = v.as_ptr() as *const i8;
        let bytes = std::mem::size_of_val(v);
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults; the address is inside `v` anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.add(off))
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// The first `dst.len()` values of `src` (a key or value vector in the pool) as f32.
#[inline(always)]
fn widen<T: Kv>(dst: &mut [f32], src: &[T]) {
    let n = dst.len();
    for (d, x) in dst.iter_mut().zip(&src[..n]) {
        *d = x.f();
    }
}

/// The dot products of `key` (`hd` values) with the [`LANES`] queries of `qt` (transposed, `[hd][LANES]`),
/// each summed as [`dot`] sums one: 16 partial sums over elements `l, l + 16, ...`, added in order (from
/// -0.0, as `Iterator::sum` does), plus the tail past the last full 16.
#[inline(always)]
fn dot_heads(qt: &[f32], key: &[f32]) -> [f32; LANES] {
    let full = key.len() / 16 * 16;
    let mut part = [[0f32; LANES]; 16];
    for c in (0..full).step_by(16) {
        for (l, p) in part.iter_mut().enumerate() {
            let y = key[c + l];
            let col = &qt[(c + l) * LANES..][..LANES];
            for (a, &x) in p.iter_mut().zip(col) {
                *a += x * y;
            }
        }
    }
    let mut s = [-0.0f32; LANES];
    for p in &part {
        for (a, &b) in s.iter_mut().zip(p) {
            *a += b;
        }
    }
    let mut tail = [0f32; LANES];
    for (d, &y) in key.iter().enumerate().skip(full) {
        let col = &qt[d * LANES..][..LANES];
        for (a, &x) in tail.iter_mut().zip(col) {
            *a += x * y;
        }
    }
    for (a, &t) in s.iter_mut().zip(&tail) {
        *a += t;
    }
    s
}

/// Dot product with 16 independent accumulators, summed lane by lane, then the tail: the order each lane of
/// [`dot_heads`] follows (the reference of its test).
#[cfg(test)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(0.0, |s, (&x, &y)| s + x * y);
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attn_cpu::tests::lcg;

    #[test]
    fn lane_scores_sum_in_the_order_of_one_dot_product() {
        let mut s = 5u64;
        for hd in [64, 80, 128, 7] {
            let key: Vec<f32> = (0..hd).map(|_| lcg(&mut s) * 1e3).collect();
            let qs: Vec<Vec<f32>> = (0..LANES)
                .map(|_| (0..hd).map(|_| lcg(&mut s)).collect())
                .collect();
            let mut qt = vec![0f32; hd * LANES];
            for (i, q) in qs.iter().enumerate() {
                for (d, &x) in q.iter().enumerate() {
                    qt[d * LANES + i] = x;
                }
            }
            let got = dot_heads(&qt, &key);
            for (i, q) in qs.iter().enumerate() {
                assert_eq!(
                    got[i].to_bits(),
                    dot(q, &key).to_bits(),
                    "hd {hd}, head {i}"
                );
            }
        }
    }

    #[test]
    fn value_sums_in_registers_give_the_bits_of_the_plain_loop() {
        let mut s = 13u64;
        // Groups that take the register path (up to 8) and one that does not; head sizes with and without
        // a tail past the last full chunk of columns.
        for (group, hd) in [
            (1, 64),
            (2, 80),
            (7, 64),
            (8, 128),
            (3, 7),
            (9, 64),
            (5, 48),
        ] {
            let ctx = 23;
            let scores: Vec<f32> = (0..group * ctx).map(|_| lcg(&mut s)).collect();
            let v: Vec<bf16> = (0..ctx * hd).map(|_| bf16::from_f32(lcg(&mut s))).collect();
            let at: Vec<usize> = (0..ctx).map(|j| ((j * 7) % ctx) * hd).collect();
            let mut want = vec![0f32; group * hd];
            for (j, &a) in at.iter().enumerate() {
                for i in 0..group {
                    let p = scores[i * ctx + j];
                    for d in 0..hd {
                        want[i * hd + d] += p * v[a + d].to_f32();
                    }
                }
            }
            let mut got = vec![f32::NAN; group * hd];
            weighted_values(&scores, (&v, &at), hd, &mut got);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "group {group}, hd {hd}");
        }
    }

    #[test]
    fn a_task_gives_the_same_bits_on_every_code_path() {
        // The AVX-512 and AVX2 builds of a task (those this CPU runs) and the portable one: more heads than
        // one pass takes, contexts of whole 16-key blocks plus a rest, of one block, of less than one; head
        // sizes with a tail past the last 16 elements and below 16; every cache dtype.
        fn case<T: Kv + std::fmt::Debug>(
            to: impl Fn(f32) -> T,
            (hd, group, ctx): (usize, usize, usize),
        ) {
            let mut s = 9u64 + (hd * 1000 + group * 100 + ctx) as u64;
            let qs: Vec<f32> = (0..group * hd).map(|_| lcg(&mut s)).collect();
            let k: Vec<T> = (0..ctx * hd).map(|_| to(lcg(&mut s) * 4.0)).collect();
            let v: Vec<T> = (0..ctx * hd).map(|_| to(lcg(&mut s))).collect();
            let at: Vec<usize> = (0..ctx).map(|j| ((j * 5) % ctx) * hd).collect();
            let mut want = vec![0f32; group * hd];
            row(&qs, &mut want, (&k, &v), hd, 0.125, &at, |_| 0);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let what = format!(
                "{} hd {hd} group {group} ctx {ctx}",
                std::any::type_name::<T>()
            );
            #[cfg(target_arch = "x86_64")]
            {
                if crate::cpu_features::avx512f() {
                    let mut got = vec![0f32; group * hd];
                    // SAFETY: AVX-512F was detected.
                    unsafe { row_avx512(&qs, &mut got, (&k, &v), hd, 0.125, &at) };
                    assert_eq!(bits(&got), bits(&want), "AVX-512, {what}");
                }
                if crate::cpu_features::avx2_fma() {
                    let mut got = vec![0f32; group * hd];
                    // SAFETY: AVX2 and FMA were detected.
                    unsafe { row_avx2(&qs, &mut got, (&k, &v), hd, 0.125, &at) };
                    assert_eq!(bits(&got), bits(&want), "AVX2, {what}");
                }
            }
            let _ = (bits, what);
        }
        for shape in [
            (64, 11, 37),
            (64, 7, 300),
            (80, 7, 16),
            (128, 2, 33),
            (7, 3, 40),
            (64, 7, 5),
        ] {
            case(bf16::from_f32, shape);
            case(f16::from_f32, shape);
            case(|x| x, shape);
        }
    }
}
