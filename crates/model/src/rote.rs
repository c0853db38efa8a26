//! Rotary Time Embedding (spec 6): both axes (window and time) rotated by an absolute-time angle.
//!
//! The phases reach ~44 000 rad at the 60th window, where one f32 ulp is ~0.004 rad, so the tables follow
//! transformers' float32 operation order exactly (plain IEEE f32 arithmetic; `powf`, `sin`, `cos` from
//! libm), and the rotation itself runs in float64 before rounding back, as the reference does.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::config::RoteConfig;
use crate::error::Result;

/// `inv[j] = fl32(1 / fl32(theta ^ fl32(fl32(2j) / dim)))` for `j < ceil(dim / 2)` (`arange(0, dim, 2)`).
pub fn inv_freq(theta: f32, dim: usize) -> Vec<f32> {
    (0..dim.div_ceil(2))
        .map(|j| 1.0f32 / theta.powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// Cos/sin tables and timestamps for the windows `window_idx` (their index within their own audio).
#[derive(Debug, Clone, PartialEq)]
pub struct RoteTables {
    /// (n, rows) seconds.
    pub timestamps: Vec<f32>,
    /// (n, rows, width), width = 4 * ceil(dim / 2).
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub rows: usize,
    pub width: usize,
}

/// Builds the tables for the given window indices; `rows` is the encoder output rows per window (750).
pub fn tables(
    cfg: &RoteConfig,
    audio_hidden: usize,
    rows: usize,
    window_idx: &[usize],
) -> RoteTables {
    let dim = cfg.dim(audio_hidden);
    let theta = cfg.theta as f32;
    let inv = inv_freq(theta, dim);
    let nf = inv.len();
    let width = 4 * nf;
    // max_position_embeddings is forced to rope_theta (spec quirk 8).
    let maxpos = theta;
    let step = (cfg.audio_frame_step * 4.0) as f32;
    // Divisor of the window position: audio_frame_step * 4 * rows seconds per window (30.0), in f64 as Python.
    let window_s = (cfg.audio_frame_step * 4.0 * rows as f64) as f32;
    let two_pi = std::f32::consts::TAU; // fl32(2 pi) = 6.2831855
    let pi = std::f32::consts::PI; // fl32(pi) = 3.1415927
                                   // Time axis: pang[t, 2j] = pang[t, 2j+1] = fl32(fl32(fl32(t / maxpos) * fl32(2 pi)) * inv[j]).
    let time_freqs: Vec<f32> = (0..rows)
        .flat_map(|t| {
            let p = (t as f32 / maxpos) * two_pi;
            inv.iter().flat_map(move |&f| {
                let a = p * f;
                [a, a]
            })
        })
        .collect();
    let n = window_idx.len();
    let mut timestamps = vec![0f32; n * rows];
    let mut cos = vec![0f32; n * rows * width];
    let mut sin = vec![0f32; n * rows * width];
    // Windows are independent: fill them in parallel (sin/cos of 384 000 angles per full-size window take
    // ~5 ms on one core, as long as the GPU needs for the whole window). Each pair of equal angles is
    // evaluated once. Same arithmetic, same bits as a serial loop.
    timestamps
        .par_chunks_mut(rows)
        .zip(cos.par_chunks_mut(rows * width))
        .zip(sin.par_chunks_mut(rows * width))
        .zip(window_idx.par_iter())
        .for_each(|(((ts_out, cos_out), sin_out), &k)| {
            let mut fr = vec![0f32; width];
            // ts[k, t] = fl32(fl32(fl32(rows * k) * step) + fl32(fl32(t) * step)).
            let base = ((rows * k) as f32) * step;
            // Window axis: wpos = fl32(round_half_even(fl32(ts[k, 0] / 30)) / maxpos), one value per window.
            let wpos = ((base + 0.0) / window_s).round_ties_even() / maxpos;
            for j in 0..nf {
                let a = wpos * inv[j];
                fr[2 * j] = a;
                fr[2 * j + 1] = a;
            }
            for t in 0..rows {
                let ts = base + (t as f32) * step;
                ts_out[t] = ts;
                fr[2 * nf..].copy_from_slice(&time_freqs[t * 2 * nf..(t + 1) * 2 * nf]);
                let angle = (-ts * 2.0) * pi;
                let (c, s) = (
                    &mut cos_out[t * width..(t + 1) * width],
                    &mut sin_out[t * width..(t + 1) * width],
                );
                for p in (0..width).step_by(2) {
                    let arg = fr[p] * angle;
                    let (sv, cv) = (arg.sin(), arg.cos());
                    c[p] = cv;
                    c[p + 1] = cv;
                    s[p] = sv;
                    s[p + 1] = sv;
                }
            }
        });
    RoteTables {
        timestamps,
        cos,
        sin,
        rows,
        width,
    }
}

/// Rotates the first `width` dims of `x` (n, rows, d) in interleaved pairs, in float64, and rounds back to
/// `x`'s dtype; the remaining dims pass through unchanged.
pub fn apply(x: &Tensor, t: &RoteTables) -> Result<Tensor> {
    let (n, rows, d) = x.dims3()?;
    let dev: &Device = x.device();
    let w = t.width;
    let half = w / 2;
    let to_f64 = |v: &[f32]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v, (n, rows, half, 2), dev)?.to_dtype(DType::F64)?)
    };
    let (c, s) = (to_f64(&t.cos)?, to_f64(&t.sin)?);
    let xr = x
        .narrow(2, 0, w)?
        .to_dtype(DType::F64)?
        .reshape((n, rows, half, 2))?;
    let (xe, xo) = (xr.narrow(3, 0, 1)?, xr.narrow(3, 1, 1)?);
    let (ce, co) = (c.narrow(3, 0, 1)?, c.narrow(3, 1, 1)?);
    let (se, so) = (s.narrow(3, 0, 1)?, s.narrow(3, 1, 1)?);
    // y[2i] = x[2i] c[2i] - x[2i+1] s[2i];  y[2i+1] = x[2i+1] c[2i+1] + x[2i] s[2i+1]
    let ye = ((&xe * &ce)? - (&xo * &se)?)?;
    let yo = ((&xo * &co)? + (&xe * &so)?)?;
    let y = Tensor::cat(&[ye, yo], 3)?
        .reshape((n, rows, w))?
        .to_dtype(x.dtype())?;
    if w == d {
        return Ok(y);
    }
    Ok(Tensor::cat(&[y, x.narrow(2, w, d - w)?], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_of_spec_examples() {
        let cfg = RoteConfig {
            theta: 1200.0,
            partial_rotary_factor: 0.2,
            audio_frame_step: 0.01,
        };
        let t = tables(&cfg, 1280, 750, &[0, 1]);
        assert_eq!(t.width, 512);
        assert_eq!(t.timestamps[750], 30.0);
        assert_eq!(t.timestamps[749], 29.96);
    }

    #[test]
    fn odd_rotary_dim_uses_ceil_half_frequencies() {
        // int(48 * 0.2) = 9 -> arange(0, 9, 2) = 5 frequencies, width 20.
        let cfg = RoteConfig {
            theta: 1200.0,
            partial_rotary_factor: 0.2,
            audio_frame_step: 0.01,
        };
        assert_eq!(inv_freq(1200.0, 9).len(), 5);
        assert_eq!(tables(&cfg, 48, 750, &[0]).width, 20);
    }
}
