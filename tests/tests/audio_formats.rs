//! Every container/codec we promise decodes, mixes to mono and lands at 16 kHz with the right length.

use afnext_audio::{decode_file, load_mono};
use afnext_e2e::fixtures_dir;

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
}

/// (file, sample rate, channels, frames, expected RMS at 16 kHz after the mono mix-down)
const FILES: &[(&str, u32, usize, usize, f32)] = &[
    // 0.5 amplitude sine: RMS 0.354 (8-bit quantisation adds a little noise).
    ("tone_8k_pcm8.wav", 8_000, 1, 4_000, 0.354),
    ("tone_24bit.wav", 16_000, 1, 8_000, 0.354),
    // L 440 Hz at 0.5, R 660 Hz at 0.25: the mean of two incoherent tones, RMS sqrt(0.25^2 + 0.125^2) / sqrt 2.
    ("tone_f32.wav", 16_000, 2, 8_000, 0.198),
    ("tone_22k.ogg", 22_050, 1, 11_025, 0.354),
];

#[test]
fn small_files_decode_to_16k_mono() {
    for &(name, rate, channels, frames, want_rms) in FILES {
        let d = decode_file(&fixtures_dir().join("audio").join(name)).unwrap();
        assert_eq!((d.sample_rate, d.channels), (rate, channels), "{name}");
        // Vorbis may deliver a few frames of codec delay differently; PCM is exact.
        let tol = if name.ends_with(".ogg") { 64 } else { 0 };
        assert!(
            d.samples.len().abs_diff(frames) <= tol,
            "{name}: {} frames",
            d.samples.len()
        );
        let y = load_mono(d, 16_000, usize::MAX).unwrap();
        let want_len = (frames as u64 * 16_000).div_ceil(u64::from(rate)) as usize;
        assert!(
            y.len().abs_diff(want_len) <= tol,
            "{name}: {} samples at 16 kHz",
            y.len()
        );
        let r = rms(&y[y.len() / 8..y.len() * 7 / 8]);
        assert!(
            (r - want_rms).abs() < 0.01,
            "{name}: rms {r}, want {want_rms}"
        );
    }
}

#[test]
fn sixteen_khz_mono_passes_through_bit_exact() {
    let d = decode_file(&fixtures_dir().join("audio/tone_24bit.wav")).unwrap();
    let raw = d.samples.clone();
    assert_eq!(load_mono(d, 16_000, usize::MAX).unwrap(), raw);
}

#[test]
fn bytes_and_path_decode_identically() {
    let p = fixtures_dir().join("audio/speech_7s.flac");
    let a = decode_file(&p).unwrap();
    let b = afnext_audio::decode_bytes(&std::fs::read(&p).unwrap(), None).unwrap();
    assert_eq!(a, b);
}
