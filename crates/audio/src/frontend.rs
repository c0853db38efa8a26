//! The AF-Next front end (spec section 3): 30 s windows, Whisper log-mel per window, frame mask and the
//! number of audio tokens each window yields.
//!
//! Every window is a pure function of its own samples ([`Frontend::window_features`]), so windows of one
//! recording can be computed on different threads or machines. Quirks reproduced on purpose:
//! periodic Hann, reflect padding, the last STFT frame dropped, the `max - 8` clamp taken per window
//! (zero padding included).

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

use crate::error::{AudioError, Result};
use crate::mel::MelBank;

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
        if self.n_fft < 4 || self.n_fft % 2 != 0 {
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
        if self.window_samples() % self.hop_length != 0 {
            return bad("hop_length", "must divide the window length in samples");
        }
        // Full windows must pool to whole tokens (conv stride 2, avg-pool 2), otherwise the processor's
        // whole-audio token count and the model's per-window count disagree (spec 3.5).
        if self.frames_per_window() % 4 != 0 {
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
    fft: Arc<dyn RealToComplex<f32>>,
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

/// `log10(1e-10)` in f32: the value of a frame with no energy before the clamp.
const LOG_FLOOR_INPUT: f32 = 1e-10;

impl Frontend {
    pub fn new(cfg: &FrontendConfig) -> Result<Self> {
        cfg.validate()?;
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(cfg.n_fft);
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
        let frames = self.cfg.frames_per_window();
        let (n_fft, hop, pad) = (self.cfg.n_fft, self.cfg.hop_length, self.cfg.n_fft / 2);
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
        let n = chunk.len();
        // Reflect-padded signal (numpy "reflect": the edge sample is not repeated) of the zero-padded chunk.
        let mut padded = vec![0.0f32; win + 2 * pad];
        padded[pad..pad + n].copy_from_slice(chunk);
        let x = |i: usize| if i < n { chunk[i] } else { 0.0 };
        for j in 1..=pad {
            padded[pad - j] = x(j);
            padded[pad + win - 1 + j] = x(win - 1 - j);
        }
        // Frames starting at or after this index read only zeros (when the right reflection is silent too).
        let zero_from = if n + pad < win { pad + n } else { usize::MAX };

        let log_floor = LOG_FLOOR_INPUT.log10();
        let mut frame = self.fft.make_input_vec();
        let mut spec = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f32; self.mel.n_freqs()];
        let mut max = f32::NEG_INFINITY;
        for f in 0..frames {
            let s = f * hop;
            if s >= zero_from {
                for m in 0..self.cfg.n_mels {
                    out[m * frames + f] = log_floor;
                }
                max = max.max(log_floor);
                continue;
            }
            for ((d, &v), &w) in frame.iter_mut().zip(&padded[s..s + n_fft]).zip(&self.hann) {
                *d = v * w;
            }
            self.fft
                .process_with_scratch(&mut frame, &mut spec, &mut scratch)
                .expect("buffer sizes come from the plan; this is a bug");
            for (p, c) in power.iter_mut().zip(&spec) {
                *p = c.re * c.re + c.im * c.im;
            }
            for m in 0..self.cfg.n_mels {
                let v = self.mel.apply(m, &power).max(LOG_FLOOR_INPUT).log10();
                max = max.max(v);
                out[m * frames + f] = v;
            }
        }
        let floor = max - 8.0;
        for v in out.iter_mut() {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        Ok(n.div_ceil(hop))
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
