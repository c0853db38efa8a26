//! Attention of many queries on the CPU in f32, a block of queries at a time over packed keys and values:
//! the encoder's windows ([`crate::encoder_cpu`]) and the decoder's prefill chunks ([`causal_chunk`], from the
//! contiguous cache or the paged pool).
//!
//! Through candle, a chunk's attention allocated its score tensor, copied q, k and v into head-major f32
//! layout (bf16 models: casts of all three) and ran candle's GEMM. Here the keys and values a task reads are
//! packed once for [`crate::cpu_gemm`]; then for every block of [`query_block`] queries the scores are computed
//! transposed, `k q^T`, so they come out k-major, the layout the second product reads in place (nothing the
//! size of the scores is ever packed); their exponentials go down the columns with the maxima and sums in
//! registers; the product with `v` follows, and each output row is scaled by `1 / sum` last, as flash
//! attention does (the reference scales the weights before the product; the two differ by roundings, not in
//! value).
//!
//! A causal block reads only the keys its last query can see (a prefix of the packed keys and values); the
//! keys past a query's own position get `-inf` scores, hence exact zeros. A query's numbers therefore do not
//! depend on the block it is in: each score is one dot product over the head size, a column's maximum and sum
//! cover its own keys (the zeros add nothing), and the second product sums the keys in K blocks from key 0
//! whatever the block's length. So a sequence's prefill gives the same bits however the engine chunks it.

use rayon::prelude::*;

use crate::cpu_gemm::{PackedRows, PackedWeight, NR};
use crate::paged_cpu::{Heads, Kv};

/// Queries per block: a whole number of the GEMM's row tiles, so the second product has no part-empty tile,
/// and at most 128, so the scores (`keys x block` f32) stay in L2 between the two products for contexts of
/// a few thousand keys. Where a multiple of both the tile height and the panel width fits, that (96 queries
/// on AVX2: 8 tiles of 12 and 3 whole panels; on an EPYC Zen 3 an encoder window's attention took ~8 % less
/// time than with 126, whose scores, 740 KiB, overflow its 512 KiB of L2); otherwise the most tiles that fit
/// (126 = 9 x 14 with AVX-512, 4 panels of which 2 columns are padding). The block size changes no bit of
/// the result (see the module's comment).
pub(crate) fn query_block() -> usize {
    let mr = crate::cpu_gemm::tile_rows();
    let mut both = mr;
    while !both.is_multiple_of(NR) {
        both += mr;
    }
    if both <= 128 {
        both
    } else {
        128 / mr * mr
    }
}

/// The queries of a block packed as the first product's weight, `rows` of them (`row(r, c)`: query `r`'s
/// element `c`, scaled or not) and zero queries up to whole panels of [`NR`] columns. The padding costs no
/// product (the panels are whole anyway) and makes every column group of the softmax whole: with AVX2 a
/// part-empty group takes masked loads and stores, slow on AMD's Zen 3 (~20 % of the softmax's time with
/// 126 columns).
pub(crate) fn pack_queries(
    rows: usize,
    hd: usize,
    row: impl Fn(usize, usize) -> f32 + Sync,
) -> PackedWeight {
    PackedWeight::from_fn(rows.div_ceil(NR) * NR, hd, |r, c| {
        if r < rows {
            row(r, c)
        } else {
            0.0
        }
    })
}

/// The attention of one block of `rows` queries: `queries` (from [`pack_queries`]: `[>= rows, hd]`, the
/// first product's weight) against the first `seen` of `keys` (`[>= seen, hd]`) and of `values` (`v^T`,
/// `[hd, >= seen]`). The scores are multiplied by `scale` in f32 before the softmax. With
/// `causal_first = Some(p)`, query `r` is at position `p + r` and sees keys `0..=p + r` (`seen = p + rows`).
/// Returns `[rows, hd]`.
pub(crate) fn block(
    keys: &PackedRows,
    values: &PackedWeight,
    seen: usize,
    (queries, rows): (&PackedWeight, usize),
    scale: f32,
    causal_first: Option<usize>,
) -> Vec<f32> {
    // The scores' row stride: the padding queries' columns are computed and never read.
    let cols = queries.out_dim();
    assert!(rows <= cols, "{rows} queries in a block of {cols}");
    let hd = values.out_dim();
    let mut scores = queries.matmul_packed_serial(keys, seen);
    if let Some(first) = causal_first {
        debug_assert_eq!(
            seen,
            first + rows,
            "a causal block sees up to its last query"
        );
        // Key j (row j) is past the position of queries 0..j - first: only the block's own keys.
        for j in first + 1..seen {
            scores[j * cols..j * cols + (j - first)].fill(f32::NEG_INFINITY);
        }
    }
    let inv = crate::cpu_exp::exp_columns(&mut scores, seen, cols, scale);
    let mut o = values.matmul_kmajor_serial(&scores, rows, cols, seen);
    for (row, f) in o.chunks_mut(hd).zip(&inv) {
        for v in row {
            *v *= f;
        }
    }
    o
}

/// Causal attention of a chunk of `len` queries at positions `start..start + len` over keys and values
/// `0..start + len` (the chunk's own are already written). `q`: `[len, nh, hd]` f32 after RoPE; `k` and `v`:
/// storage whose vector of position `j`, kv head `kvh` starts at `slot(j, kvh)`. Query head `h` reads kv head
/// `h / (nh / nkv)`. Writes `out` `[len, nh * hd]`: per head `softmax(q k^T / sqrt(hd)) v`.
pub(crate) fn causal_chunk<T: Kv>(
    q: &[f32],
    (start, len): (usize, usize),
    (k, v): (&[T], &[T]),
    g: Heads,
    slot: impl Fn(usize, usize) -> usize + Sync,
    out: &mut [f32],
) {
    let Heads { nh, nkv, hd } = g;
    let d = nh * hd;
    assert_eq!(q.len(), len * d, "queries of every position");
    assert_eq!(out.len(), len * d, "an output row per query");
    let ctx = start + len;
    let group = nh / nkv;
    // sdpa's default scale: `head_dim ** -0.5` in f64 (Python), used as an f32 factor.
    let scale = (hd as f64).powf(-0.5) as f32;
    // Each kv head's keys (rows of the first product) and values (`v^T`, the second's weight), packed once
    // for the blocks of all its query heads.
    let packed: Vec<(PackedRows, PackedWeight)> = (0..nkv)
        .into_par_iter()
        .map(|kvh| {
            let at = |src: &[T], j: usize, c: usize| src[slot(j, kvh) + c].f();
            (
                PackedRows::from_fn(ctx, hd, |j, c| at(k, j, c)),
                PackedWeight::from_fn(hd, ctx, |c, j| at(v, j, c)),
            )
        })
        .collect();
    let qb = query_block();
    let blocks = len.div_ceil(qb);
    // One task per (head, block), the longest blocks (the last, seeing the most keys) first.
    let per: Vec<Vec<f32>> = (0..nh * blocks)
        .into_par_iter()
        .map(|job| {
            let (b, h) = (blocks - 1 - job / nh, job % nh);
            let (keys, values) = &packed[h / group];
            let q0 = b * qb;
            let rows = qb.min(len - q0);
            let queries = pack_queries(rows, hd, |r, c| q[(q0 + r) * d + h * hd + c]);
            let first = start + q0;
            block(
                keys,
                values,
                first + rows,
                (&queries, rows),
                scale,
                Some(first),
            )
        })
        .collect();
    interleave_heads(out, nh, hd, |r, h| {
        let (b, i) = (r / qb, r % qb);
        &per[(blocks - 1 - b) * nh + h][i * hd..(i + 1) * hd]
    });
}

/// Fills `out` (`[rows, heads * hd]`, in parallel by rows) from the per-head results of the tasks: head `h`
/// of row `r` is `head_row(r, h)` (`hd` values).
pub(crate) fn interleave_heads<'a>(
    out: &mut [f32],
    heads: usize,
    hd: usize,
    head_row: impl Fn(usize, usize) -> &'a [f32] + Sync,
) {
    out.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(r, dst)| {
            for (h, dst) in dst.chunks_exact_mut(hd).enumerate() {
                dst.copy_from_slice(head_row(r, h));
            }
        });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::bf16;

    /// Uniform in [-2, 2): the attention tests' inputs (this module's and the encoder's).
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }

    /// The largest absolute difference of two results of one length.
    pub(crate) fn worst_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "results of one length");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// Plain causal GQA attention in f64; `q` `[len, nh, hd]`, `k`/`v` `[ctx, nkv, hd]`.
    fn reference(q: &[f32], k: &[f32], v: &[f32], start: usize, g: Heads) -> Vec<f32> {
        let Heads { nh, nkv, hd } = g;
        let len = q.len() / (nh * hd);
        let mut o = vec![0f32; q.len()];
        for r in 0..len {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qa = |c: usize| f64::from(q[(r * nh + h) * hd + c]);
                let at = |x: &[f32], j: usize, c: usize| f64::from(x[(j * nkv + kvh) * hd + c]);
                let sc: Vec<f64> = (0..=start + r)
                    .map(|j| (0..hd).map(|c| qa(c) * at(k, j, c)).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    let y: f64 = e.iter().enumerate().map(|(j, p)| p / z * at(v, j, c)).sum();
                    o[(r * nh + h) * hd + c] = y as f32;
                }
            }
        }
        o
    }

    #[test]
    fn padding_queries_changes_no_bit() {
        let mut seed = 21u64;
        let (seen, rows, hd) = (300, 37, 24);
        let mut gen = |n: usize| (0..n).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
        let (k, v, q) = (gen(seen * hd), gen(seen * hd), gen(rows * hd));
        let keys = PackedRows::from_fn(seen, hd, |r, c| k[r * hd + c]);
        let values = PackedWeight::from_fn(hd, seen, |c, j| v[j * hd + c]);
        let row = |r: usize, c: usize| q[r * hd + c];
        let bare = PackedWeight::from_fn(rows, hd, row);
        let padded = pack_queries(rows, hd, row);
        assert_eq!(padded.out_dim(), 64, "whole panels");
        for causal in [None, Some(seen - rows)] {
            let a = block(&keys, &values, seen, (&bare, rows), 0.3, causal);
            let b = block(&keys, &values, seen, (&padded, rows), 0.3, causal);
            assert_eq!(a.len(), rows * hd);
            assert_eq!(a, b, "causal {causal:?}");
        }
    }

    #[test]
    fn matches_plain_causal_attention_and_does_not_depend_on_the_chunking() {
        let mut seed = 9u64;
        // GQA groups of 3, a head size off the panel width, a chunk over several blocks (not a multiple of
        // the block) after cached positions, and the K block of the second product crossed.
        let g = Heads {
            nh: 6,
            nkv: 2,
            hd: 40,
        };
        let qb = query_block();
        let (start, len) = (150, 2 * qb + 31);
        let ctx = start + len;
        let width = g.nkv * g.hd;
        let mut gen = |n: usize| (0..n).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
        let (k, v) = (gen(ctx * width), gen(ctx * width));
        let q = gen(len * g.nh * g.hd);
        let slot = |j: usize, kvh: usize| j * width + kvh * g.hd;
        let d = g.nh * g.hd;
        let run = |q: &[f32], start: usize, k: &[_], v: &[_]| {
            let mut out = vec![f32::NAN; q.len()];
            causal_chunk(q, (start, q.len() / d), (k, v), g, slot, &mut out);
            out
        };
        let got = run(&q, start, &k, &v);
        let worst = worst_diff(&got, &reference(&q, &k, &v, start, g));
        assert!(worst < 1e-5, "worst difference {worst}");
        // The same positions in two chunks (split inside a block): the same bits.
        let cut = qb + 5;
        let a = run(&q[..cut * d], start, &k, &v);
        let b = run(&q[cut * d..], start + cut, &k, &v);
        assert_eq!([a, b].concat(), got, "chunked prefill");
        // bf16 storage reads as its f32 values.
        let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
        let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let kr: Vec<f32> = kb.iter().map(|x| x.to_f32()).collect();
        let vr: Vec<f32> = vb.iter().map(|x| x.to_f32()).collect();
        let mut from_bf16 = vec![0f32; q.len()];
        causal_chunk(&q, (start, len), (&kb, &vb), g, slot, &mut from_bf16);
        assert_eq!(from_bf16, run(&q, start, &kr, &vr), "bf16 storage");
    }
}
