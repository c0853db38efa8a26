//! Bad input gets a typed error with a clear message: never a panic, a hang or a half-answer.

use std::path::PathBuf;
use std::sync::Arc;

use afnext_audio::{
    decode_bytes, encode_wav, AudioError, Frontend, FrontendConfig, Overflow, WavFormat,
};
use afnext_e2e::{ckpt, fixtures_dir};
use afnext_prompt::{prepare, AudioSource, Conversation, PromptError, PromptProcessor};

fn processor() -> PromptProcessor {
    PromptProcessor::load(&ckpt("tiny-a")).unwrap()
}

/// Runs a one-audio conversation through the whole preparation and returns the audio error.
fn audio_error(data: Vec<u8>, hint: Option<&str>) -> (AudioError, String) {
    let conv = Conversation::single_turn(
        None,
        Some(AudioSource::Bytes {
            data: Arc::new(data),
            format_hint: hint.map(str::to_string),
        }),
        "Transcribe.",
    );
    let e = match prepare(&processor(), &conv, Overflow::Reject) {
        Err(e) => e,
        Ok(_) => panic!("bad audio was accepted"),
    };
    let msg = e.to_string();
    match e {
        PromptError::Audio { source, .. } => (source, msg),
        other => panic!("expected an audio error, got {other}"),
    }
}

/// A 16-bit or float32 mono wav in memory.
fn wav(samples: &[f32], rate: u32, float: bool) -> Vec<u8> {
    encode_wav(
        samples,
        rate,
        1,
        if float {
            WavFormat::Float32
        } else {
            WavFormat::Pcm16
        },
    )
}

#[test]
fn empty_file() {
    let (e, msg) = audio_error(Vec::new(), Some("wav"));
    assert!(matches!(e, AudioError::EmptyInput), "{e:?}");
    assert!(msg.contains("audio 0") && msg.contains("empty"), "{msg}");
}

#[test]
fn random_bytes() {
    let junk: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let (e, msg) = audio_error(junk, None);
    assert!(matches!(e, AudioError::UnsupportedFormat { .. }), "{e:?}");
    assert!(
        msg.contains("unrecognized audio format") && msg.contains("flac"),
        "{msg}"
    );
}

#[test]
fn truncated_wav_header() {
    let full = wav(&[0.25; 1000], 16_000, false);
    for cut in [4, 12, 20, 30, 40] {
        let (e, msg) = audio_error(full[..cut].to_vec(), Some("wav"));
        assert!(
            matches!(
                e,
                AudioError::Corrupt { .. } | AudioError::UnsupportedFormat { .. }
            ),
            "cut at {cut}: {e:?}"
        );
        assert!(!msg.is_empty());
    }
    // Header intact but no sample data at all.
    let (e, _) = audio_error(full[..44].to_vec(), Some("wav"));
    assert!(
        matches!(e, AudioError::NoSamples | AudioError::Corrupt { .. }),
        "{e:?}"
    );
}

#[test]
fn unsupported_codec_opus() {
    let data = std::fs::read(fixtures_dir().join("audio/tone_opus.ogg")).unwrap();
    let e = decode_bytes(&data, Some("ogg")).unwrap_err();
    assert!(
        matches!(
            e,
            AudioError::UnsupportedCodec { .. } | AudioError::UnsupportedFormat { .. }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("unsupported") || msg.contains("unrecognized"),
        "{msg}"
    );
    assert!(
        msg.contains("Vorbis") || msg.contains("vorbis"),
        "the message lists what is supported: {msg}"
    );
}

#[test]
fn nan_and_inf_samples() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut s = vec![0.1f32; 16_000];
        s[1234] = bad;
        let (e, msg) = audio_error(wav(&s, 16_000, true), Some("wav"));
        assert!(
            matches!(e, AudioError::NonFinite { index: 1234, .. }),
            "{e:?}"
        );
        assert!(msg.contains("1234"), "{msg}");
    }
}

#[test]
fn audio_over_the_limit_is_refused_unless_truncation_is_asked() {
    // 1800 s + 1 sample of silence at 16 kHz: one sample over AF-Next's limit.
    let n = 1800 * 16_000 + 1;
    let data = wav(&vec![0.0; n], 16_000, false);
    let (e, msg) = audio_error(data.clone(), Some("wav"));
    assert!(
        matches!(
            e,
            AudioError::TooLong {
                max_windows: 60,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        msg.contains("1800.00 s") && msg.contains("limit is 1800 s"),
        "{msg}"
    );
    let conv = Conversation::single_turn(
        None,
        Some(AudioSource::Bytes {
            data: Arc::new(data),
            format_hint: None,
        }),
        "x",
    );
    let p = prepare(&processor(), &conv, Overflow::Truncate).unwrap();
    assert_eq!(p.audios[0].plan.windows.len(), 60);
    assert_eq!(p.audios[0].plan.total_tokens(), 45_000);
    assert_eq!(p.prompt.audio_spans[0].len(), 45_000);
}

/// A header's absurd sample rate is refused with the range, not resampled with a filter of millions of taps.
#[test]
fn absurd_sample_rates_are_refused() {
    for rate in [500u32, 4_000_000] {
        let (e, msg) = audio_error(wav(&[0.3; 4000], rate, false), Some("wav"));
        assert!(matches!(e, AudioError::Resample { .. }), "{rate} Hz: {e:?}");
        assert!(
            msg.contains("audio 0") && msg.contains("between 1000 and 768000 Hz"),
            "{msg}"
        );
        assert!(e.is_client_error());
    }
}

#[test]
fn audio_too_short_for_one_token() {
    let (e, msg) = audio_error(wav(&[0.3; 320], 16_000, false), Some("wav"));
    assert!(
        matches!(
            e,
            AudioError::TooShort {
                samples: 320,
                min_samples: 321,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg.contains("321"), "{msg}");
    // 321 samples is the shortest clip that gives one token.
    let conv = Conversation::single_turn(
        None,
        Some(AudioSource::Bytes {
            data: Arc::new(wav(&[0.3; 321], 16_000, false)),
            format_hint: None,
        }),
        "x",
    );
    assert_eq!(
        prepare(&processor(), &conv, Overflow::Reject)
            .unwrap()
            .audios[0]
            .plan
            .total_tokens(),
        1
    );
}

#[test]
fn missing_file_names_the_path() {
    let conv = Conversation::single_turn(
        None,
        Some(AudioSource::Path(PathBuf::from("/nonexistent/a.wav"))),
        "x",
    );
    let e = prepare(&processor(), &conv, Overflow::Reject)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/a.wav"), "{e}");
}

#[test]
fn malformed_conversation_parts() {
    let bad = serde_json::json!([
        {"role": "user", "content": [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": ["not", "a", "string"]}]}
    ]);
    let e = Conversation::from_json(&bad, None).unwrap_err();
    assert!(matches!(e, PromptError::Conversation { .. }));
    assert!(
        e.to_string()
            .contains("message 0, part 1: text must be a string, got a list"),
        "{e}"
    );
    assert!(e.is_client_error());
}

#[test]
fn reserved_marker_in_user_text() {
    let conv = Conversation::single_turn(None, None, "please expand <sound> here");
    let e = processor().encode(&conv, &[]).unwrap_err();
    assert!(e.to_string().contains("reserved audio marker"), "{e}");
}

#[test]
fn front_end_rejects_wrong_buffers_instead_of_panicking() {
    let fe = Frontend::new(&FrontendConfig::default()).unwrap();
    let mut small = vec![0.0; 10];
    assert!(matches!(
        fe.window_features(&[0.0; 100], &mut small),
        Err(AudioError::BufferSize { .. })
    ));
    let mut out = vec![0.0; fe.window_len()];
    assert!(matches!(
        fe.window_features(&vec![0.0; 480_001], &mut out),
        Err(AudioError::BufferSize { .. })
    ));
}
