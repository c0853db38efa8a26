//! Slaney-scale, Slaney-normalised mel filter bank (spec 3.3), built in float64 exactly as
//! `transformers.audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")` / librosa do, then cast to f32.

/// Slaney Hz -> mel.
fn hz_to_mel(f: f64) -> f64 {
    if f < 1000.0 {
        3.0 * f / 200.0
    } else {
        15.0 + (f / 1000.0).ln() * (27.0 / 6.4f64.ln())
    }
}

/// Slaney mel -> Hz.
fn mel_to_hz(m: f64) -> f64 {
    if m < 15.0 {
        200.0 * m / 3.0
    } else {
        1000.0 * ((6.4f64.ln() / 27.0) * (m - 15.0)).exp()
    }
}

/// numpy's `linspace(start, stop, num)` bit for bit: `i * ((stop - start) / (num - 1)) + start`, last = stop.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// The dense bank in float64, `[n_freqs][n_mels]` row-major (`n_freqs = n_fft / 2 + 1`), fmin 0, fmax sr/2.
pub fn mel_filter_bank_f64(n_freqs: usize, n_mels: usize, sampling_rate: u32) -> Vec<f64> {
    let fmax = f64::from(sampling_rate / 2);
    let mel_pts = linspace(hz_to_mel(0.0), hz_to_mel(fmax), n_mels + 2);
    let hz: Vec<f64> = mel_pts.iter().map(|&m| mel_to_hz(m)).collect();
    let fft_f = linspace(0.0, fmax, n_freqs);
    let mut fb = vec![0.0f64; n_freqs * n_mels];
    for (k, &f) in fft_f.iter().enumerate() {
        for j in 0..n_mels {
            let down = (f - hz[j]) / (hz[j + 1] - hz[j]);
            let up = (hz[j + 2] - f) / (hz[j + 2] - hz[j + 1]);
            let tri = 0.0f64.max(down.min(up));
            fb[k * n_mels + j] = tri * (2.0 / (hz[j + 2] - hz[j]));
        }
    }
    fb
}

/// The bank cast to f32 and stored sparsely: each triangular filter covers one contiguous run of bins.
#[derive(Debug, Clone)]
pub struct MelBank {
    /// For filter `m`: `(first bin, offset into weights, number of bins)`.
    spans: Vec<(usize, usize, usize)>,
    weights: Vec<f32>,
    n_freqs: usize,
}

/// Frames processed together: the filter bank and the log run 8 frames wide, so that every step is a
/// vector operation and every store into the `[mel, frame]` output is 8 contiguous floats.
pub const FRAME_BLOCK: usize = 8;

impl MelBank {
    pub fn new(n_fft: usize, n_mels: usize, sampling_rate: u32) -> Self {
        let n_freqs = n_fft / 2 + 1;
        let dense = mel_filter_bank_f64(n_freqs, n_mels, sampling_rate);
        let mut spans = Vec::with_capacity(n_mels);
        let mut weights = Vec::new();
        for m in 0..n_mels {
            let col: Vec<f32> = (0..n_freqs).map(|k| dense[k * n_mels + m] as f32).collect();
            match (
                col.iter().position(|&w| w != 0.0),
                col.iter().rposition(|&w| w != 0.0),
            ) {
                (Some(a), Some(b)) => {
                    spans.push((a, weights.len(), b + 1 - a));
                    weights.extend_from_slice(&col[a..=b]);
                }
                // A filter narrower than one FFT bin is all zero (librosa warns); it contributes nothing.
                _ => spans.push((0, weights.len(), 0)),
            }
        }
        MelBank {
            spans,
            weights,
            n_freqs,
        }
    }

    pub fn n_mels(&self) -> usize {
        self.spans.len()
    }

    pub fn n_freqs(&self) -> usize {
        self.n_freqs
    }

    /// Filter `m` applied to a block of power spectra stored bin-major (`power[k][frame]`).
    #[inline(always)]
    pub fn apply_block(&self, m: usize, power: &[[f32; FRAME_BLOCK]]) -> [f32; FRAME_BLOCK] {
        let (start, off, len) = self.spans[m];
        let mut acc = [0.0f32; FRAME_BLOCK];
        for (w, p) in self.weights[off..off + len]
            .iter()
            .zip(&power[start..start + len])
        {
            for i in 0..FRAME_BLOCK {
                acc[i] += w * p[i];
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints() {
        let v = linspace(0.0, 8000.0, 201);
        assert_eq!(v[1], 40.0);
        assert_eq!(v[200], 8000.0);
    }

    #[test]
    fn slaney_scale_is_continuous_at_1khz() {
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((mel_to_hz(15.0) - 1000.0).abs() < 1e-9);
        assert!((mel_to_hz(hz_to_mel(5000.0)) - 5000.0).abs() < 1e-9);
    }

    #[test]
    fn whisper_bank_shape_and_area() {
        let fb = mel_filter_bank_f64(201, 128, 16000);
        // Slaney normalisation: every filter is non-negative and its peak is 2 / bandwidth.
        assert!(fb.iter().all(|&w| w >= 0.0));
        let bank = MelBank::new(400, 128, 16000);
        assert_eq!(bank.n_mels(), 128);
        assert!(bank.spans.iter().all(|&(_, _, len)| len > 0));
    }
}
