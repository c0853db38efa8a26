//! The encoder's self-attention on the CPU in f32, one (window, head) per task, a block of queries at a time
//! (the kernel of [`crate::attn_cpu`], which also serves the decoder's prefill chunks).
//!
//! Through candle, one 30 s window's attention allocated a `[20, 1500, 1500]` score tensor (180 MB, faulted
//! in page by page on every layer), copied q, k and v into head-major layout and ran candle's GEMM on
//! them: about a third of the encoder's time besides the projections. Here each task packs its head's keys
//! and values once, then runs [`crate::attn_cpu::block`] for every block of queries. The keys past a window's
//! valid length are left out, which is what the reference's `finfo.min` mask amounts to (its softmax gives
//! them exact zeros).
//!
//! Numerics in f32 throughout: `q` scaled first (as `q * scale`, as the reference does), scores summed in f32,
//! `exp(s - max)` within an ulp of libm (see [`crate::cpu_exp`]), the product of those unnormalised weights
//! with `v`, and each output row scaled by `1 / sum` last, as flash attention does (the reference scales the
//! weights before the product; the two differ by roundings, not in value).

use rayon::prelude::*;

use crate::attn_cpu::{pack_queries, query_block};
use crate::cpu_gemm::{PackedRows, PackedWeight};

/// Shapes of one call: `b` windows of `t` positions, `heads` heads of `hd` values (`d = heads * hd`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub hd: usize,
}

/// `qkv`: `[b, t, 3 d]` row-major, q, k and v side by side as the stacked projection gives them (q not yet
/// scaled). Window `i` attends to its first `valid_keys[i]` keys (at least one). Returns `[b, t, d]`: per
/// head, `softmax(scale q k^T) v`.
pub(crate) fn attention(qkv: &[f32], s: Shape, scale: f32, valid_keys: &[usize]) -> Vec<f32> {
    let Shape { b, t, heads, hd } = s;
    let d = heads * hd;
    assert_eq!(qkv.len(), b * t * 3 * d, "q, k and v of every position");
    assert_eq!(valid_keys.len(), b, "one valid-key count per window");
    let qb = query_block();
    let per_head: Vec<Vec<f32>> = (0..b * heads)
        .into_par_iter()
        .map(|job| {
            let (i, h) = (job / heads, job % heads);
            let n = valid_keys[i].clamp(1, t);
            // Element (row r, column c) of this head's [t, hd] slice of q (part 0), k (1) or v (2).
            let at =
                |part: usize, r: usize, c: usize| qkv[(i * t + r) * 3 * d + part * d + h * hd + c];
            let (q, k, v) = (0, 1, 2);
            // The keys are the first product's packed rows (once per head), a block of queries its weight
            // (see attn_cpu).
            let keys = PackedRows::from_fn(n, hd, |r, c| at(k, r, c));
            // v^T ([hd, n]) is the weight of the second product: out[r][c] = sum_j p[j][r] v[j][c].
            let values = PackedWeight::from_fn(hd, n, |c, j| at(v, j, c));
            let mut out = vec![0f32; t * hd];
            for q0 in (0..t).step_by(qb) {
                let rows = qb.min(t - q0);
                let queries = pack_queries(rows, hd, |r, c| at(q, q0 + r, c) * scale);
                // q is scaled already (the reference's order for the encoder): the softmax's scale is 1.
                let o = crate::attn_cpu::block(&keys, &values, n, (&queries, rows), 1.0, None);
                out[q0 * hd..(q0 + rows) * hd].copy_from_slice(&o);
            }
            out
        })
        .collect();
    let mut o = vec![0f32; b * t * d];
    crate::attn_cpu::interleave_heads(&mut o, heads, hd, |row, h| {
        let (i, r) = (row / t, row % t);
        &per_head[i * heads + h][r * hd..(r + 1) * hd]
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attn_cpu::tests::{lcg, worst_diff};

    /// Plain attention in f64 over the first `n` keys.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: Shape,
        scale: f32,
        valid: &[usize],
    ) -> Vec<f32> {
        let Shape { b, t, heads, hd } = s;
        let d = heads * hd;
        let mut o = vec![0f32; b * t * d];
        for i in 0..b {
            let n = valid[i];
            for h in 0..heads {
                let at = |x: &[f32], r: usize, c: usize| f64::from(x[(i * t + r) * d + h * hd + c]);
                for r in 0..t {
                    let sc: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..hd)
                                .map(|c| at(q, r, c) * f64::from(scale) * at(k, j, c))
                                .sum()
                        })
                        .collect();
                    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        let y: f64 = (0..n).map(|j| e[j] / z * at(v, j, c)).sum();
                        o[(i * t + r) * d + h * hd + c] = y as f32;
                    }
                }
            }
        }
        o
    }

    #[test]
    fn matches_plain_attention_with_partial_windows() {
        let mut seed = 5u64;
        // Sizes off every block boundary: t > the query block and not a multiple of it, head size not a
        // multiple of 32, one full window and one with a few valid keys.
        let s = Shape {
            b: 2,
            t: 150,
            heads: 3,
            hd: 40,
        };
        let len = s.b * s.t * s.heads * s.hd;
        let mut gen = || (0..len).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
        let (q, k, v) = (gen(), gen(), gen());
        let valid = [150, 37];
        let scale = (s.hd as f32).powf(-0.5);
        let d = s.heads * s.hd;
        let qkv: Vec<f32> = (0..s.b * s.t)
            .flat_map(|row| [&q, &k, &v].map(|x| &x[row * d..(row + 1) * d]))
            .flatten()
            .copied()
            .collect();
        let got = attention(&qkv, s, scale, &valid);
        let worst = worst_diff(&got, &reference(&q, &k, &v, s, scale, &valid));
        assert!(worst < 1e-5, "worst difference {worst}");
    }
}
