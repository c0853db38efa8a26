//! Band-limited resampling to the model rate, built to match the reference's soxr "HQ".
//!
//! transformers' `load_audio` resamples with `soxr.resample(x, from, to, quality="HQ")` (python-soxr, libsoxr
//! 0.1.3) and pads or trims the result to `ceil(n * to / from)` samples. We do not link libsoxr; instead this
//! is a linear-phase windowed-sinc filter whose magnitude response was fitted to soxr HQ's, measured with
//! tones through `soxr.resample` (gain in dB at a fraction of the lower rate's Nyquist frequency):
//!
//! | fraction of Nyquist | 0.90 | 0.92 | 0.93 | 0.95 | 0.97 | 0.99 | 0.995 | 1.0 |
//! |---|---|---|---|---|---|---|---|---|
//! | soxr HQ (8, 22.05, 44.1, 48 kHz -> 16 kHz) | 0.00 | -0.01 | -0.07/-0.08 | -2.84/-2.89 | -17.5/-17.9 | -59/-61 | -80/-83 | < -139 |
//! | this filter | 0.00 | -0.00 | -0.07 | -2.81 | -17.5 | -59.5 | -80.6 | -128 |
//!
//! A Kaiser window for [`STOPBAND_DB`] of attenuation and a cutoff at [`CUTOFF`] of the lower Nyquist
//! frequency, with the stopband starting at the Nyquist frequency itself, gives that response. Before this
//! filter we used rubato's FFT resampler, which passes everything up to ~0.99 of Nyquist and has a fractional
//! group delay: on 8 kHz telephone audio the log-mel bins near 4 kHz then differed from the reference by up
//! to 1.2 (a factor of ~10^4.6 in power), and greedy answers diverged from transformers' (docs/DESIGN.md).
//!
//! Like soxr the filter is centred on each output instant (no delay), treats samples outside the input as
//! zero, and produces `round(n * to / from)` samples (halves up); the reference then zero-pads to the ceiling.
//! It is not bit-exact (soxr computes in stages and with its own FFTs), so resampled input stays outside
//! the exact-parity boundary of spec section 2; tests bound the difference against soxr's output.

use crate::error::{AudioError, Result};

/// Cutoff (the -6 dB point of the windowed sinc) as a fraction of the lower rate's Nyquist frequency.
pub const CUTOFF: f64 = 0.957;
/// Stopband attenuation the Kaiser window is designed for, in dB.
pub const STOPBAND_DB: f64 = 131.0;
/// The lowest sample rate resampled (below telephone audio's 8 kHz, with margin).
pub const MIN_RATE_HZ: u32 = 1_000;
/// The highest sample rate resampled (DXD and 768 kHz studio formats are the highest in use).
pub const MAX_RATE_HZ: u32 = 768_000;
/// Rational ratios with more output phases than this share a table of this many phases and interpolate
/// linearly between neighbours (error ~1e-7 of full scale); every common rate (8, 11.025, 22.05, 24, 32,
/// 44.1, 48, 88.2, 96 kHz to 16 kHz) has at most 640 phases and uses exact taps.
const MAX_PHASES: usize = 2048;

/// Refuses sample rates outside [`MIN_RATE_HZ`]..=[`MAX_RATE_HZ`] (equal rates are always fine: nothing to
/// do). The filter's length grows with the rate (a 4 GHz header would ask for ~50 million taps per output),
/// and rates outside this range are corrupt headers, not audio.
pub fn check_rates(from_hz: u32, to_hz: u32) -> Result<()> {
    if from_hz == to_hz {
        return Ok(());
    }
    for rate in [from_hz, to_hz] {
        if !(MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate) {
            return Err(AudioError::Resample {
                from_hz,
                to_hz,
                detail: format!(
                    "sample rates must be between {MIN_RATE_HZ} and {MAX_RATE_HZ} Hz, got {rate} Hz"
                ),
            });
        }
    }
    Ok(())
}

/// The number of samples [`resample`] returns for `n` input samples: `ceil(n * to / from)`, as the
/// reference pads or trims to (equal rates: `n`).
pub fn resampled_len(n: usize, from_hz: u32, to_hz: u32) -> usize {
    if from_hz == to_hz || from_hz == 0 {
        return n;
    }
    (n as u128 * u128::from(to_hz)).div_ceil(u128::from(from_hz)) as usize
}

/// Resamples mono `samples` from `from_hz` to `to_hz`. Equal rates return the input unchanged (bit-exact).
pub fn resample(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>> {
    resample_prefix(samples, from_hz, to_hz, usize::MAX)
}

/// The first `keep` samples of [`resample`]'s output (all of them if there are fewer), computing only those:
/// audio that will be truncated to its first minutes is not resampled past them. Each output depends only
/// on the input within the filter's reach, so these are exactly the values of the whole output.
pub fn resample_prefix(samples: &[f32], from_hz: u32, to_hz: u32, keep: usize) -> Result<Vec<f32>> {
    if from_hz == to_hz {
        return Ok(samples[..samples.len().min(keep)].to_vec());
    }
    check_rates(from_hz, to_hz)?;
    let n = samples.len() as u128;
    let (from, to) = (u128::from(from_hz), u128::from(to_hz));
    // The reference's length: ceil(n * to / from). soxr itself returns round(n * to / from), halves up;
    // the reference zero-pads the rest.
    let target = resampled_len(samples.len(), from_hz, to_hz).min(keep);
    let produced = (((2 * n * to + from) / (2 * from)) as usize).min(target);

    let filter = Filter::new(from_hz, to_hz);
    let (up, down) = (u128::from(filter.up), u128::from(filter.down));
    // The input with `half_taps` zeros on each side, so every output is one contiguous dot product; only
    // the input the produced outputs reach is copied.
    let k = filter.half_taps;
    let reach = if produced == 0 {
        0
    } else {
        (((produced as u128 - 1) * down / up) as usize + k + 1).min(samples.len())
    };
    let mut padded = vec![0.0f32; reach + k + filter.width + 1];
    padded[k..k + reach].copy_from_slice(&samples[..reach]);

    let mut out = vec![0.0f32; target];
    // Outputs are independent dot products: long audio is split over threads in contiguous runs (the
    // same values whatever the split). A minute of 44.1 kHz audio is ~0.5 G multiply-adds.
    let threads = if produced < PARALLEL_ABOVE {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
    };
    let run = produced.div_ceil(threads).max(1);
    let (filter, padded, isa) = (&filter, &padded[..], Dot::detect());
    let fill = move |first: usize, dst: &mut [f32]| {
        let mut scratch = vec![0.0f32; filter.width];
        // Output i sits at input time i * down / up = j0 + phase / up; stepped from the run's first output
        // without a division per output.
        let pos = first as u128 * down;
        let (mut j0, mut phase) = ((pos / up) as usize, (pos % up) as usize);
        let (jump, turn, up) = ((down / up) as usize, (down % up) as usize, up as usize);
        for y in dst.iter_mut() {
            let row = filter.taps(phase, &mut scratch);
            // Taps cover input samples j0 - k + 1 ..= j0 + k (and zero taps after), i.e. padded[j0 + 1..].
            *y = dot_with(isa, row, &padded[j0 + 1..j0 + 1 + filter.width]);
            j0 += jump;
            phase += turn;
            if phase >= up {
                phase -= up;
                j0 += 1;
            }
        }
    };
    if threads == 1 {
        fill(0, &mut out[..produced]);
    } else {
        std::thread::scope(|s| {
            for (c, dst) in out[..produced].chunks_mut(run).enumerate() {
                s.spawn(move || fill(c * run, dst));
            }
        });
    }
    // Outputs past soxr's `produced` stay zero: the reference's padding.
    Ok(out)
}

/// Outputs (at 16 kHz: ~1 minute) above which resampling is split over threads.
const PARALLEL_ABOVE: usize = 1 << 20;
/// At most this many threads for one resampling.
const MAX_THREADS: usize = 8;

/// The polyphase filter of one rate pair.
struct Filter {
    /// Output samples per `down` input samples, after dividing both rates by their gcd.
    up: u64,
    down: u64,
    /// Taps on each side of an output instant, in input samples.
    half_taps: usize,
    /// Taps per row: `2 * half_taps` rounded up to a multiple of [`LANES`] with zeros, so that the dot
    /// product has no scalar tail.
    width: usize,
    /// `phases` rows of `width` taps; row `p` is for an output at input time `j0 + p / phases`.
    table: Vec<f32>,
    phases: usize,
}

impl Filter {
    fn new(from_hz: u32, to_hz: u32) -> Self {
        let g = gcd(u64::from(from_hz), u64::from(to_hz));
        let (up, down) = (u64::from(to_hz) / g, u64::from(from_hz) / g);
        let low = f64::from(from_hz.min(to_hz));
        let from = f64::from(from_hz);
        // Cycles per input sample at the cutoff. The transition band runs from the passband's end,
        // 2 * CUTOFF - 1 of Nyquist, to Nyquist: 2 * (1 - CUTOFF) of Nyquist, i.e. 1 - CUTOFF of the lower
        // rate. Kaiser's estimate of the length for that band and attenuation, in lower-rate samples:
        let cutoff = CUTOFF * low / 2.0 / from;
        let transition = 1.0 - CUTOFF;
        let length_low = (STOPBAND_DB - 7.95) / (14.36 * transition);
        let half = length_low / 2.0 * from / low;
        let half_taps = half.ceil() as usize;
        let beta = 0.1102 * (STOPBAND_DB - 8.7);
        let phases = if up as usize <= MAX_PHASES {
            up as usize
        } else {
            MAX_PHASES
        };
        // One extra row (phase = 1.0) so interpolation between the last row and the next sample's first works.
        let rows = phases + usize::from(phases != up as usize);
        let norm = bessel_i0(beta);
        let width = (2 * half_taps).next_multiple_of(LANES);
        let mut table = vec![0.0f32; rows * width];
        for (p, row) in table.chunks_exact_mut(width).enumerate() {
            let frac = p as f64 / phases as f64;
            for (t, tap) in row.iter_mut().enumerate() {
                // Tap t multiplies input sample j0 - half_taps + 1 + t.
                let x = frac + (half_taps - 1) as f64 - t as f64;
                *tap = kaiser_sinc(x, cutoff, half, beta, norm) as f32;
            }
        }
        Filter {
            up,
            down,
            half_taps,
            width,
            table,
            phases,
        }
    }

    /// The taps for output phase `phase` (of `up`): a table row, or for ratios with more phases than the
    /// table, the linear interpolation of its two neighbouring rows written into `scratch`.
    fn taps<'a>(&'a self, phase: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        let w = self.width;
        if self.phases as u64 == self.up {
            return &self.table[phase * w..][..w];
        }
        let at = phase as f64 * self.phases as f64 / self.up as f64;
        let lo = at.floor() as usize;
        let f = (at - lo as f64) as f32;
        let (a, b) = (&self.table[lo * w..][..w], &self.table[(lo + 1) * w..][..w]);
        for ((s, &x), &y) in scratch.iter_mut().zip(a).zip(b) {
            *s = x + (y - x) * f;
        }
        scratch
    }
}

/// The Kaiser-windowed sinc at `x` input samples from the output instant: `2c sinc(2c x) w(x / half)`.
fn kaiser_sinc(x: f64, cutoff: f64, half: f64, beta: f64, norm: f64) -> f64 {
    let r = x / half;
    if r.abs() >= 1.0 {
        return 0.0;
    }
    let arg = 2.0 * cutoff * x;
    let sinc = if arg == 0.0 {
        1.0
    } else {
        (std::f64::consts::PI * arg).sin() / (std::f64::consts::PI * arg)
    };
    2.0 * cutoff * sinc * bessel_i0(beta * (1.0 - r * r).sqrt()) / norm
}

/// The modified Bessel function of the first kind, order 0, by its power series (converges for the
/// window's arguments, at most ~15, in ~40 terms).
fn bessel_i0(x: f64) -> f64 {
    let q = x * x / 4.0;
    let (mut sum, mut term, mut k) = (1.0f64, 1.0f64, 1.0f64);
    while term > 1e-17 * sum {
        term *= q / (k * k);
        sum += term;
        k += 1.0;
    }
    sum
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Independent partial sums of [`dot`]: four 16-lane vectors, so that the additions of consecutive taps do
/// not wait on each other.
const LANES: usize = 64;

/// A dot product in [`LANES`] independent f32 partial sums (the compiler vectorises them), reduced by
/// halving, then any tail. Every build sums in the same order (no fused multiply-add), so [`dot_wide`] and
/// [`dot_avx2`] give the same bits.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0] + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// [`dot`] on AVX-512, where the CPU has it: the 64 partial sums are four registers and the halving is four
/// vector additions and three shuffles, in `dot`'s order (the portable build targets SSE2 and spills the
/// halving to the stack, which took half of its time). Same bits as `dot` (a test compares them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_wide(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut v = [_mm512_setzero_ps(); LANES / 16];
    for i in (0..full).step_by(LANES) {
        for (q, acc) in v.iter_mut().enumerate() {
            let x = _mm512_loadu_ps(pa.add(i + 16 * q));
            let y = _mm512_loadu_ps(pb.add(i + 16 * q));
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, y));
        }
    }
    // Partial sum l is lane l % 16 of v[l / 16]; `dot` adds l + 32, then l + 16, 8, 4, 2 and 1 into l.
    let h16 = _mm512_add_ps(_mm512_add_ps(v[0], v[2]), _mm512_add_ps(v[1], v[3]));
    let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(h16)));
    let h8 = _mm256_add_ps(_mm512_castps512_ps256(h16), hi8);
    let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
    let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    let h1 = _mm_add_ss(h2, _mm_shuffle_ps::<1>(h2, h2));
    _mm_cvtss_f32(h1)
        + a[full..n]
            .iter()
            .zip(&b[full..n])
            .map(|(x, y)| x * y)
            .sum::<f32>()
}

/// [`dot`] compiled for AVX2 (CPUs without AVX-512, such as AMD's Zen 1-3): the same loops, vectorised 8
/// wide instead of SSE2's 4; the same bits, since nothing is fused.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b)
}

/// Which build of [`dot`] runs here: all give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dot {
    Avx512,
    Avx2,
    Portable,
}

impl Dot {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Dot::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Dot::Avx2;
            }
        }
        Dot::Portable
    }
}

/// `dot` in the build `isa` (one [`Dot::detect`] gave).
fn dot_with(isa: Dot, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        // SAFETY: the feature was detected (`Dot::detect`).
        #[cfg(target_arch = "x86_64")]
        Dot::Avx512 => unsafe { dot_wide(a, b) },
        #[cfg(target_arch = "x86_64")]
        Dot::Avx2 => unsafe { dot_avx2(a, b) },
        _ => dot(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f64, rate: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin() as f32 * 0.5
            })
            .collect()
    }

    #[test]
    fn same_rate_is_identity() {
        let x = sine(440.0, 16000, 1000);
        assert_eq!(resample(&x, 16000, 16000).unwrap(), x);
    }

    /// Amplitude and phase of a `freq` tone in `y` (least squares over the middle of the signal).
    fn tone_fit(y: &[f32], freq: f64, rate: f64) -> (f64, f64) {
        let (mut a, mut b) = (0.0f64, 0.0f64);
        let range = y.len() / 16..y.len() - y.len() / 16;
        let n = range.len() as f64 / 2.0;
        for i in range {
            let t = 2.0 * std::f64::consts::PI * freq * i as f64 / rate;
            a += f64::from(y[i]) * t.sin();
            b += f64::from(y[i]) * t.cos();
        }
        ((a * a + b * b).sqrt() / n, b.atan2(a))
    }

    fn gain_db(from: u32, fraction_of_nyquist: f64) -> f64 {
        let f = fraction_of_nyquist * f64::from(from.min(16000)) / 2.0;
        let y = resample(&sine(f, from, from as usize * 2), from, 16000).unwrap();
        20.0 * (tone_fit(&y, f, 16000.0).0 / 0.5).log10()
    }

    #[test]
    fn sine_survives_44k_to_16k_aligned() {
        let x = sine(1000.0, 44100, 44100);
        let y = resample(&x, 44100, 16000).unwrap();
        assert_eq!(y.len(), 16000);
        let (amp, phase) = tone_fit(&y, 1000.0, 16000.0);
        // Linear phase centred on each output instant: no delay.
        assert!((amp - 0.5).abs() < 5e-6, "amplitude {amp}");
        assert!(phase.abs() < 1e-5, "phase {phase}");
    }

    /// The transition band has soxr HQ's shape (the module doc's table, within 0.3 dB), up- and downsampling,
    /// with exact and interpolated phase tables (44 101 Hz has 16 000 phases).
    #[test]
    fn transition_band_follows_soxr_hq() {
        for from in [8000, 44100, 48000, 44101] {
            for (fraction, soxr_db) in [
                (0.5, 0.0),
                (0.9, 0.0),
                (0.95, -2.86),
                (0.97, -17.6),
                (0.99, -60.0),
            ] {
                let g = gain_db(from, fraction);
                assert!(
                    (g - soxr_db).abs() < 0.3 + 0.02 * soxr_db.abs(),
                    "{from} Hz at {fraction}: {g} dB"
                );
            }
        }
    }

    #[test]
    fn content_above_nyquist_is_removed() {
        for (from, f) in [(48000, 10000.0), (44100, 8050.0), (22050, 9000.0)] {
            let y = resample(&sine(f, from, from as usize), from, 16000).unwrap();
            let rms = (y[1000..15000].iter().map(|v| v * v).sum::<f32>() / 14000.0).sqrt();
            assert!(
                rms < 1e-6,
                "{from} Hz, {f} Hz tone: aliased energy rms {rms}"
            );
        }
    }

    #[test]
    fn output_length_is_ceil_with_soxr_round_then_zero() {
        // ceil(1001 * 16000 / 44100) = 364; soxr makes round(363.2) = 363 and the reference pads one zero.
        let y = resample(&vec![0.5; 1001], 44100, 16000).unwrap();
        assert_eq!(y.len(), 364);
        assert_eq!(y[363], 0.0);
        assert!(y[362] != 0.0);
        assert_eq!(resample(&[0.1], 8000, 16000).unwrap().len(), 2);
        // 500.5 rounds up: no padding.
        let y = resample(&vec![0.5; 1001], 32000, 16000).unwrap();
        assert_eq!(y.len(), 501);
        assert!(y[500] != 0.0);
    }

    #[test]
    fn a_prefix_has_the_bits_of_the_whole() {
        let x = sine(1234.5, 44100, 30000);
        for from in [44100, 8000, 44101] {
            let whole = resample(&x, from, 16000).unwrap();
            for keep in [0, 1, 777, whole.len() - 1, whole.len(), whole.len() + 5] {
                let part = resample_prefix(&x, from, 16000, keep).unwrap();
                assert_eq!(
                    part[..],
                    whole[..keep.min(whole.len())],
                    "{from} Hz, keep {keep}"
                );
            }
        }
        assert_eq!(resampled_len(1001, 44100, 16000), 364);
        // Long enough to be split over threads (where there are several): the same bits as one thread.
        let long = sine(321.0, 8000, PARALLEL_ABOVE / 2 + 4321);
        let whole = resample(&long, 8000, 16000).unwrap();
        assert!(whole.len() > PARALLEL_ABOVE);
        let serial = resample_prefix(&long, 8000, 16000, PARALLEL_ABOVE - 1).unwrap();
        assert_eq!(serial[..], whole[..PARALLEL_ABOVE - 1]);
        let tail = resample(&long[long.len() - 20000..], 8000, 16000).unwrap();
        // The last outputs depend only on the last input samples (away from the cut).
        assert_eq!(tail[tail.len() - 1000..], whole[whole.len() - 1000..]);
        assert_eq!(resample_prefix(&x, 16000, 16000, 10).unwrap(), x[..10]);
    }

    #[test]
    fn vector_and_portable_dot_products_agree_bit_for_bit() {
        // The builds this CPU runs: AVX-512 (and AVX2) or AVX2 alone.
        let mut builds = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                builds.push(Dot::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                builds.push(Dot::Avx2);
            }
        }
        let a: Vec<f32> = (0..563)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let b: Vec<f32> = (0..563)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
            .collect();
        for isa in builds {
            for n in [0, 1, 15, 16, 17, 63, 64, 65, 128, 130, 560, 563] {
                assert_eq!(
                    dot_with(isa, &a[..n], &b[..n]).to_bits(),
                    dot(&a[..n], &b[..n]).to_bits(),
                    "{isa:?} {n}"
                );
            }
        }
    }

    #[test]
    fn rates_out_of_range_are_errors_naming_the_range() {
        for rate in [0, 999, 768_001, 4_000_000_000] {
            let e = resample(&[0.0; 4], rate, 16000).unwrap_err();
            assert!(e.to_string().contains("between 1000 and 768000 Hz"), "{e}");
            assert!(e.is_client_error());
        }
        assert_eq!(resample(&[0.5; 300], 768_000, 16000).unwrap().len(), 7);
        assert_eq!(resample(&[0.5; 3], 1000, 16000).unwrap().len(), 48);
    }
}
