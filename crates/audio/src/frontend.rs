//! The AF-Next front end (spec section 3): 30 s windows, Whisper log-mel per window, frame mask and the
//! number of audio tokens each window yields.
//!
//! Every window is a pure function of its own samples ([`Frontend::window_features`]), so windows of one
//! recording can be computed on different threads or machines. Quirks reproduced on purpose:
//! periodic Hann, reflect padding, the last STFT frame dropped, the `max - 8` clamp taken per window
//! (zero padding included).

use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};

use crate::error::{AudioError, Result};
use crate::mel::{MelBank, FRAME_BLOCK};

/// Front-end settings, read from the checkpoint's `processor_config.json` (see `afnext-prompt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendConfig {
    /// Model sample rate in Hz (16 000).
    pub sampling_rate: u32,
    /// STFT size in samples (400).
    pub n_fft: usize,
    /// STFT hop in samples (160).
    pub hop_length: usize,
    /// Mel bins (128).
    pub n_mels: usize,
    /// Window (chunk) length in seconds (30).
    pub chunk_length_s: u32,
    /// Longest audio accepted, in seconds (1800 for AF-Next: 60 windows).
    pub max_audio_len_s: u32,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            sampling_rate: 16_000,
            n_fft: 400,
            hop_length: 160,
            n_mels: 128,
            chunk_length_s: 30,
            max_audio_len_s: 1800,
        }
    }
}

impl FrontendConfig {
    /// Samples per window (480 000).
    pub fn window_samples(&self) -> usize {
        self.chunk_length_s as usize * self.sampling_rate as usize
    }
    /// Mel frames per window (3000).
    pub fn frames_per_window(&self) -> usize {
        self.window_samples() / self.hop_length
    }
    /// Most windows per audio (`max_audio_len // chunk_length`; 60).
    pub fn max_windows(&self) -> usize {
        (self.max_audio_len_s / self.chunk_length_s) as usize
    }
    /// The fewest samples that yield one audio token (3 valid frames: 321 at hop 160).
    pub fn min_samples(&self) -> usize {
        2 * self.hop_length + 1
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(AudioError::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        if self.sampling_rate == 0 {
            return bad("sampling_rate", "must be positive");
        }
        if self.n_fft < 4 || !self.n_fft.is_multiple_of(2) {
            return bad("n_fft", "must be an even number >= 4");
        }
        if self.hop_length == 0 {
            return bad("hop_length", "must be positive");
        }
        if self.n_mels == 0 {
            return bad("feature_size", "must be positive");
        }
        if self.chunk_length_s == 0 {
            return bad("chunk_length", "must be positive");
        }
        if !self.window_samples().is_multiple_of(self.hop_length) {
            return bad("hop_length", "must divide the window length in samples");
        }
        // Full windows must pool to whole tokens (conv stride 2, avg-pool 2), otherwise the processor's
        // whole-audio token count and the model's per-window count disagree (spec 3.5).
        if !self.frames_per_window().is_multiple_of(4) {
            return bad("chunk_length", "frames per window must be a multiple of 4");
        }
        if self.n_fft / 2 >= self.window_samples() {
            return bad("n_fft", "must be shorter than twice the window");
        }
        if self.max_windows() == 0 {
            return bad("max_audio_len", "must be at least one window long");
        }
        Ok(())
    }
}

/// Encoder positions after the stride-2 conv for `valid_frames` mel frames: `(F - 1) // 2 + 1`.
pub fn conv_len(valid_frames: usize) -> usize {
    if valid_frames == 0 {
        0
    } else {
        (valid_frames - 1) / 2 + 1
    }
}

/// Audio tokens (rows after avg-pool) for `valid_frames` mel frames: `(conv_len - 2) // 2 + 1`, floored at 0.
pub fn tokens_for_frames(valid_frames: usize) -> usize {
    let c = conv_len(valid_frames);
    if c < 2 {
        0
    } else {
        (c - 2) / 2 + 1
    }
}

/// What to do with audio longer than `max_audio_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse it with [`AudioError::TooLong`] (the default: nothing is dropped silently).
    #[default]
    Reject,
    /// Keep the first `max_audio_len` seconds, as the reference processor does (with a warning).
    Truncate,
}

/// One 30 s window of one audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Index of the window within its audio (RoTE's `k`), from 0.
    pub index: usize,
    /// First sample of the window in the 16 kHz waveform.
    pub start: usize,
    /// Real samples in the window (only the last window can be shorter than a full window).
    pub len: usize,
    /// Mel frames that carry signal: `ceil(len / hop)`.
    pub valid_frames: usize,
    /// Audio tokens this window yields (0 for a last window of at most 2 hops, spec quirk 7).
    pub tokens: usize,
}

/// How one audio is cut into windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowPlan {
    pub windows: Vec<WindowSpec>,
    /// Samples of the input before any truncation.
    pub input_samples: usize,
    /// Samples covered by the windows (`< input_samples` only when truncated).
    pub used_samples: usize,
}

impl WindowPlan {
    /// Total audio tokens, the number of `<sound>` placeholders of this audio in the prompt.
    pub fn total_tokens(&self) -> usize {
        self.windows.iter().map(|w| w.tokens).sum()
    }
    pub fn truncated(&self) -> bool {
        self.used_samples < self.input_samples
    }
}

/// Cuts `n_samples` of 16 kHz audio into windows (spec 3.1, 3.4, 3.5).
///
/// Defined edge behaviour (transformers crashes or misbehaves on some of these; we do not):
/// * no samples: [`AudioError::NoSamples`];
/// * fewer than [`FrontendConfig::min_samples`] in total (no audio token at all): [`AudioError::TooShort`];
/// * a last window of 1..=2 hops (e.g. 30.01 s): the window is kept (its features are computed, as the
///   processor does) but yields 0 tokens; windows keep their per-audio index;
/// * longer than the limit: [`AudioError::TooLong`] unless `overflow` is [`Overflow::Truncate`].
pub fn plan_windows(
    n_samples: usize,
    cfg: &FrontendConfig,
    overflow: Overflow,
) -> Result<WindowPlan> {
    cfg.validate()?;
    if n_samples == 0 {
        return Err(AudioError::NoSamples);
    }
    let win = cfg.window_samples();
    let limit = cfg.max_windows() * win;
    if n_samples > limit && overflow == Overflow::Reject {
        let sr = f64::from(cfg.sampling_rate);
        return Err(AudioError::TooLong {
            duration_s: n_samples as f64 / sr,
            limit_s: f64::from(cfg.max_audio_len_s),
            max_windows: cfg.max_windows(),
            window_s: f64::from(cfg.chunk_length_s),
        });
    }
    let used = n_samples.min(limit);
    let windows: Vec<WindowSpec> = (0..used.div_ceil(win))
        .map(|index| {
            let start = index * win;
            let len = (used - start).min(win);
            let valid_frames = len.div_ceil(cfg.hop_length);
            WindowSpec {
                index,
                start,
                len,
                valid_frames,
                tokens: tokens_for_frames(valid_frames),
            }
        })
        .collect();
    let plan = WindowPlan {
        windows,
        input_samples: n_samples,
        used_samples: used,
    };
    if plan.total_tokens() == 0 {
        let sr = f64::from(cfg.sampling_rate);
        return Err(AudioError::TooShort {
            samples: n_samples,
            duration_ms: n_samples as f64 * 1000.0 / sr,
            min_samples: cfg.min_samples(),
            min_ms: cfg.min_samples() as f64 * 1000.0 / sr,
        });
    }
    Ok(plan)
}

/// Rejects NaN and infinite samples (they would poison the per-window maximum).
pub fn check_finite(samples: &[f32]) -> Result<()> {
    match samples.iter().position(|s| !s.is_finite()) {
        Some(index) => Err(AudioError::NonFinite {
            index,
            value: samples[index],
        }),
        None => Ok(()),
    }
}

/// Log-mel features of every window of one audio.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFeatures {
    /// `[W, n_mels, frames]` row-major.
    pub features: Vec<f32>,
    /// `[W, frames]`, 1 for frames that carry signal.
    pub mask: Vec<i32>,
    pub plan: WindowPlan,
    pub n_mels: usize,
    pub frames: usize,
}

/// The log-mel extractor: FFT plan, window and filter bank, built once and shared (`Send + Sync`).
#[derive(Clone)]
pub struct Frontend {
    cfg: FrontendConfig,
    /// Complex FFT of size `n_fft`: two real frames are transformed at once (one as the real part, one
    /// as the imaginary part) and separated by symmetry, cheaper than two real FFTs with their twiddles.
    fft: Arc<dyn Fft<f32>>,
    hann: Vec<f32>,
    mel: MelBank,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The floor of the mel energies before the log (`torch.clamp(min=1e-10)`).
const LOG_FLOOR_INPUT: f32 = 1e-10;
/// `log10(1e-10)` in f32, exactly as torch gives it.
const LOG_FLOOR: f32 = -10.0;

/// `log10(max(x, 1e-10))` for `x >= 0`, to ~1.5e-6 absolute (the features' tolerance is 2e-4).
///
/// libm's `log10f` is the single most expensive step of the front end (384 000 calls per window); this
/// version splits off the exponent and evaluates `ln` of the mantissa in [sqrt(1/2), sqrt(2)) with the
/// atanh series `2 (t + t^3/3 + ... + t^9/9)`, `t = (m - 1) / (m + 1)`, `|t| <= 0.172` (truncation
/// error < 1e-9), branch-free so the compiler vectorises it. Energies at the floor return exactly -10,
/// as torch does, so silent frames keep their exact value.
#[inline(always)]
fn log10_clamped(x: f32) -> f32 {
    let floored = x <= LOG_FLOOR_INPUT;
    let x = if floored { 1.0 } else { x };
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = (e + i32::from(big)) as f32;
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let ln_m =
        2.0 * t * (1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0)))));
    let r = (e * std::f32::consts::LN_2 + ln_m) * std::f32::consts::LOG10_E;
    if floored {
        LOG_FLOOR
    } else {
        r
    }
}

impl Frontend {
    pub fn new(cfg: &FrontendConfig) -> Result<Self> {
        cfg.validate()?;
        let fft = FftPlanner::<f32>::new().plan_fft_forward(cfg.n_fft);
        // Periodic Hann (torch.hann_window default): 0.5 - 0.5 cos(2 pi k / N), computed in f64.
        let n = cfg.n_fft as f64;
        let hann = (0..cfg.n_fft)
            .map(|k| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * k as f64 / n).cos()) as f32)
            .collect();
        Ok(Frontend {
            cfg: cfg.clone(),
            fft,
            hann,
            mel: MelBank::new(cfg.n_fft, cfg.n_mels, cfg.sampling_rate),
        })
    }

    pub fn config(&self) -> &FrontendConfig {
        &self.cfg
    }

    /// Values per window in the feature tensor (`n_mels * frames`).
    pub fn window_len(&self) -> usize {
        self.cfg.n_mels * self.cfg.frames_per_window()
    }

    /// Log-mel of one window (`chunk.len() <= window_samples`, zero-padded on the right) into
    /// `out` (`[n_mels, frames]`). Returns the number of valid frames.
    pub fn window_features(&self, chunk: &[f32], out: &mut [f32]) -> Result<usize> {
        let win = self.cfg.window_samples();
        if out.len() != self.window_len() {
            return Err(AudioError::BufferSize {
                expected: self.window_len(),
                got: out.len(),
            });
        }
        if chunk.len() > win {
            return Err(AudioError::BufferSize {
                expected: win,
                got: chunk.len(),
            });
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all the
            // `target_feature` function requires.
            return Ok(unsafe { self.window_features_avx2(chunk, out) });
        }
        Ok(self.window_features_impl(chunk, out))
    }

    /// The same code compiled for AVX2 + FMA: the 8-frame blocks become single 256-bit operations.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn window_features_avx2(&self, chunk: &[f32], out: &mut [f32]) -> usize {
        self.window_features_impl(chunk, out)
    }

    /// Log-mel of one window; `chunk` and `out` sizes were checked by [`Frontend::window_features`].
    #[inline(always)]
    fn window_features_impl(&self, chunk: &[f32], out: &mut [f32]) -> usize {
        let win = self.cfg.window_samples();
        let frames = self.cfg.frames_per_window();
        let (n_fft, hop, pad) = (self.cfg.n_fft, self.cfg.hop_length, self.cfg.n_fft / 2);
        let n = chunk.len();
        // Sample `i` of the reflect-padded (numpy "reflect": the edge is not repeated), zero-padded chunk.
        let x = |i: usize| if i < n { chunk[i] } else { 0.0 };
        let padded_at = |j: usize| {
            if j < pad {
                x(pad - j)
            } else if j < pad + win {
                x(j - pad)
            } else {
                x(2 * win + pad - 2 - j)
            }
        };
        // Frames starting at or after this index read only zeros (when the right reflection is silent too).
        let zero_from = if n + pad < win { pad + n } else { usize::MAX };
        let n_freqs = self.mel.n_freqs();
        let mut buf = vec![Complex32::new(0.0, 0.0); n_fft];
        let mut scratch = vec![Complex32::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        let (mut fa, mut fb) = (vec![0.0f32; n_fft], vec![0.0f32; n_fft]);
        // The windowed samples of the frame starting at padded index `s` (a slice of the chunk, or built
        // sample by sample at the reflected edges).
        let windowed = |s: usize, dst: &mut [f32]| {
            if s >= pad && s - pad + n_fft <= n {
                for ((d, &v), &w) in dst
                    .iter_mut()
                    .zip(&chunk[s - pad..s - pad + n_fft])
                    .zip(&self.hann)
                {
                    *d = v * w;
                }
            } else {
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = padded_at(s + k) * self.hann[k];
                }
            }
        };
        // Power spectra of one block of frames, bin-major: power[k][i] for frame f0 + i.
        let mut power = vec![[0.0f32; FRAME_BLOCK]; n_freqs];
        let mut maxv = [f32::NEG_INFINITY; FRAME_BLOCK];
        for f0 in (0..frames).step_by(FRAME_BLOCK) {
            let block = FRAME_BLOCK.min(frames - f0);
            for i in (0..FRAME_BLOCK).step_by(2) {
                let live = |j: usize| j < block && (f0 + j) * hop < zero_from;
                let (a, b) = (live(i), live(i + 1));
                if !a && !b {
                    // Past the signal (or past the last frame): no energy, no FFT needed.
                    power.iter_mut().for_each(|p| {
                        p[i] = 0.0;
                        p[i + 1] = 0.0;
                    });
                    continue;
                }
                if a {
                    windowed((f0 + i) * hop, &mut fa);
                } else {
                    fa.fill(0.0);
                }
                if b {
                    windowed((f0 + i + 1) * hop, &mut fb);
                } else {
                    fb.fill(0.0);
                }
                for ((c, &re), &im) in buf.iter_mut().zip(&fa).zip(&fb) {
                    *c = Complex32::new(re, im);
                }
                self.fft.process_with_scratch(&mut buf, &mut scratch);
                // Z = A + iB with A, B the spectra of two real frames: A[k] = (Z[k] + conj Z[N-k]) / 2,
                // B[k] = (Z[k] - conj Z[N-k]) / 2i, so |A|^2 and |B|^2 come from Z[k] and Z[N-k] alone.
                let (head, tail) = buf.split_at(1);
                // Z[N - k] for k = 1.. is the tail read backwards; k = 0 pairs with itself.
                let mirrored = std::iter::once(head[0]).chain(tail.iter().rev().copied());
                for ((p, &z), zm) in power.iter_mut().zip(buf.iter()).zip(mirrored) {
                    let zc = zm.conj();
                    let (ar, ai) = (0.5 * (z.re + zc.re), 0.5 * (z.im + zc.im));
                    let (br, bi) = (0.5 * (z.im - zc.im), -0.5 * (z.re - zc.re));
                    p[i] = ar * ar + ai * ai;
                    p[i + 1] = br * br + bi * bi;
                }
            }
            for m in 0..self.cfg.n_mels {
                let mel = self.mel.apply_block(m, &power);
                // Fixed-width, branch-free loops so the compiler vectorises the log and the running max.
                let mut l = [0.0f32; FRAME_BLOCK];
                for i in 0..FRAME_BLOCK {
                    l[i] = log10_clamped(mel[i]);
                }
                for i in 0..FRAME_BLOCK {
                    maxv[i] = if l[i] > maxv[i] { l[i] } else { maxv[i] };
                }
                let row = &mut out[m * frames + f0..m * frames + f0 + block];
                if block == FRAME_BLOCK {
                    // Fixed length: a plain vector store instead of a memcpy call.
                    row.copy_from_slice(&l);
                } else {
                    row.copy_from_slice(&l[..block]);
                }
            }
        }
        // Frames past the end of a partial block have no energy (-10), which never raises the maximum.
        let max = maxv.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max - 8.0;
        for v in out.iter_mut() {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        n.div_ceil(hop)
    }

    /// Features for all windows of `samples` (16 kHz mono), computed on up to `threads` threads.
    pub fn features(
        &self,
        samples: &[f32],
        plan: &WindowPlan,
        threads: usize,
    ) -> Result<AudioFeatures> {
        check_finite(&samples[..plan.used_samples])?;
        let frames = self.cfg.frames_per_window();
        let wl = self.window_len();
        let mut features = vec![0.0f32; plan.windows.len() * wl];
        let mut mask = vec![0i32; plan.windows.len() * frames];
        for (w, m) in plan.windows.iter().zip(mask.chunks_mut(frames)) {
            m[..w.valid_frames].fill(1);
        }
        let threads = threads.clamp(1, plan.windows.len().max(1));
        let per = plan.windows.len().div_ceil(threads);
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = features
                .chunks_mut(per * wl)
                .zip(plan.windows.chunks(per))
                .map(|(out, wins)| {
                    scope.spawn(move || -> Result<()> {
                        for (o, w) in out.chunks_mut(wl).zip(wins) {
                            self.window_features(&samples[w.start..w.start + w.len], o)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .expect("front-end worker panicked; this is a bug")?;
            }
            Ok(())
        })?;
        Ok(AudioFeatures {
            features,
            mask,
            plan: plan.clone(),
            n_mels: self.cfg.n_mels,
            frames,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_match_spec_examples() {
        let cfg = FrontendConfig::default();
        let plan = |n| plan_windows(n, &cfg, Overflow::Reject).unwrap();
        assert_eq!(plan(112_000).total_tokens(), 175);
        let p = plan(640_197);
        assert_eq!(
            p.windows.iter().map(|w| w.valid_frames).collect::<Vec<_>>(),
            vec![3000, 1002]
        );
        assert_eq!(
            p.windows.iter().map(|w| w.tokens).collect::<Vec<_>>(),
            vec![750, 250]
        );
        assert_eq!(plan(1_200_000).total_tokens(), 1875);
        assert_eq!(plan(60 * 480_000).total_tokens(), 45_000);
        // 112 001 samples -> 701 valid frames (spec quirk 4).
        assert_eq!(plan(112_001).windows[0].valid_frames, 701);
    }

    #[test]
    fn tiny_last_window_yields_no_tokens_but_keeps_indices() {
        let cfg = FrontendConfig::default();
        for extra in [1, 160, 320] {
            let p = plan_windows(480_000 + extra, &cfg, Overflow::Reject).unwrap();
            assert_eq!(p.windows.len(), 2);
            assert_eq!(p.windows[1].index, 1);
            assert_eq!(p.windows[1].tokens, 0, "extra {extra}");
            assert_eq!(p.total_tokens(), 750);
        }
        let p = plan_windows(480_321, &cfg, Overflow::Reject).unwrap();
        assert_eq!(p.windows[1].tokens, 1);
    }

    #[test]
    fn whole_file_formula_agrees_with_per_window_sum() {
        let cfg = FrontendConfig::default();
        for n in [
            321usize, 4_000, 480_000, 480_321, 959_999, 1_000_003, 28_800_000,
        ] {
            let p = plan_windows(n, &cfg, Overflow::Reject).unwrap();
            let total_frames: usize = p.windows.iter().map(|w| w.valid_frames).sum();
            assert_eq!(tokens_for_frames(total_frames), p.total_tokens(), "n={n}");
        }
    }

    #[test]
    fn limits_and_empty() {
        let cfg = FrontendConfig::default();
        assert!(matches!(
            plan_windows(0, &cfg, Overflow::Reject),
            Err(AudioError::NoSamples)
        ));
        let e = plan_windows(320, &cfg, Overflow::Reject).unwrap_err();
        assert!(
            matches!(
                e,
                AudioError::TooShort {
                    samples: 320,
                    min_samples: 321,
                    ..
                }
            ),
            "{e}"
        );
        let over = 60 * 480_000 + 1;
        let e = plan_windows(over, &cfg, Overflow::Reject).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("1800.00 s") && msg.contains("1800 s"), "{msg}");
        let p = plan_windows(over, &cfg, Overflow::Truncate).unwrap();
        assert_eq!(p.windows.len(), 60);
        assert!(p.truncated());
        assert_eq!(
            plan_windows(60 * 480_000, &cfg, Overflow::Reject)
                .unwrap()
                .windows
                .len(),
            60
        );
    }

    #[test]
    fn fast_log10_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 1.0e-10f32;
        while x < 1.0e12 {
            for k in 0..64 {
                let v = x * (1.0 + k as f32 / 64.0);
                let err = (f64::from(log10_clamped(v)) - f64::from(v).log10()).abs();
                worst = worst.max(err);
            }
            x *= 3.7;
        }
        assert!(worst < 2e-6, "worst {worst}");
        assert_eq!(log10_clamped(0.0), -10.0);
        assert_eq!(log10_clamped(1e-10), -10.0);
    }

    #[test]
    fn silent_window_is_constant() {
        let fe = Frontend::new(&FrontendConfig::default()).unwrap();
        let mut out = vec![0.0; fe.window_len()];
        fe.window_features(&vec![0.0; 1000], &mut out).unwrap();
        // All-zero window: log10(1e-10) = -10 everywhere, clamp is a no-op, (-10 + 4) / 4 = -1.5.
        assert!(out.iter().all(|&v| v == -1.5));
    }

    #[test]
    fn skipping_silent_frames_changes_nothing() {
        // Frames past the signal are filled without an FFT; compare against a chunk whose zeros are explicit
        // but reach the end of the window (so nothing is skipped there).
        let fe = Frontend::new(&FrontendConfig::default()).unwrap();
        let sig: Vec<f32> = (0..50_000)
            .map(|i| ((i as f32) * 0.013).sin() * 0.3)
            .collect();
        let mut a = vec![0.0; fe.window_len()];
        let mut b = vec![0.0; fe.window_len()];
        fe.window_features(&sig, &mut a).unwrap();
        let mut full = sig.clone();
        full.resize(480_000, 0.0);
        fe.window_features(&full, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn non_finite_is_rejected() {
        let e = check_finite(&[0.0, 0.5, f32::NAN]).unwrap_err();
        assert!(matches!(e, AudioError::NonFinite { index: 2, .. }));
        assert!(check_finite(&[0.0, f32::INFINITY]).is_err());
    }
}
