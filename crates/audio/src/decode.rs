//! Container/codec decoding with symphonia (wav, flac, mp3, ogg/vorbis), mixed down to mono f32.
//!
//! Integer PCM is scaled by `1 / 2^(bits-1)` (symphonia's conversion), which is exactly what libsndfile
//! (and so transformers' `load_audio`) does for 16-bit files: a 16 kHz mono 16-bit file decodes to the
//! bit-identical float32 waveform the reference processor sees.

use std::io::Cursor;
use std::path::Path;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::error::{AudioError, Result};

/// Decoded audio, already averaged to one channel, at its original sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Mono samples in [-1, 1] (float files may exceed it; they are kept as they are).
    pub samples: Vec<f32>,
    /// The stream's sample rate in Hz.
    pub sample_rate: u32,
    /// How many channels the stream had before the mono mix-down.
    pub channels: usize,
}

impl DecodedAudio {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate)
    }
}

/// Decodes a file; the extension is used as a hint, the content decides.
pub fn decode_file(path: &Path) -> Result<DecodedAudio> {
    let bytes = std::fs::read(path).map_err(|source| AudioError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ext = path.extension().and_then(|e| e.to_str());
    decode_bytes(&bytes, ext)
}

/// Decodes an in-memory file. `format_hint` is an extension or MIME-like name ("wav", "flac", "mp3",
/// "ogg"); it only speeds up probing, a wrong hint is not an error.
pub fn decode_bytes(bytes: &[u8], format_hint: Option<&str>) -> Result<DecodedAudio> {
    if bytes.is_empty() {
        return Err(AudioError::EmptyInput);
    }
    let mut hint = Hint::new();
    if let Some(h) = format_hint {
        let h = h
            .trim()
            .trim_start_matches('.')
            .rsplit('/')
            .next()
            .unwrap_or(h)
            .to_ascii_lowercase();
        hint.with_extension(&h);
    }
    // The buffer is owned by the stream; copying a clip once is negligible next to decoding it.
    let source = Box::new(Cursor::new(bytes.to_vec()));
    let mss = MediaSourceStream::new(source, MediaSourceStreamOptions::default());
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &format_options(), &MetadataOptions::default())
        .map_err(|e| match e {
            SymError::Unsupported(what) => AudioError::UnsupportedFormat {
                detail: what.to_string(),
            },
            SymError::IoError(io) => AudioError::Corrupt {
                detail: format!("stream ended while reading the header ({io})"),
            },
            other => AudioError::Corrupt {
                detail: other.to_string(),
            },
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or(AudioError::NoTrack)?;
    let track_id = track.id;
    let codec_params = track.codec_params.clone();
    let mut decoder = symphonia::default::get_codecs()
        .make(&codec_params, &DecoderOptions::default())
        .map_err(|e| match e {
            SymError::Unsupported(_) => AudioError::UnsupportedCodec {
                codec: codec_name(codec_params.codec),
            },
            other => AudioError::Corrupt {
                detail: other.to_string(),
            },
        })?;

    let mut sample_rate = codec_params.sample_rate;
    let mut channels = codec_params.channels.map(|c| c.count());
    let mut mono: Vec<f32> = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => {
                return Err(AudioError::Corrupt {
                    detail: e.to_string(),
                })
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            Err(SymError::DecodeError(what)) => {
                return Err(AudioError::Corrupt {
                    detail: format!("packet at {} does not decode: {what}", packet.ts()),
                })
            }
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                return Err(AudioError::Corrupt {
                    detail: e.to_string(),
                })
            }
        };
        let spec = *decoded.spec();
        sample_rate.get_or_insert(spec.rate);
        let n_ch = spec.channels.count().max(1);
        channels.get_or_insert(n_ch);
        let frames = decoded.frames();
        if frames == 0 {
            continue;
        }
        // A fresh buffer per packet: packets are ~1k frames, and the channel layout may change mid-stream.
        let mut sb = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        sb.copy_interleaved_ref(decoded);
        mix_to_mono(&sb.samples()[..frames * n_ch], n_ch, &mut mono);
    }
    let sample_rate = sample_rate.ok_or(AudioError::NoSampleRate)?;
    if sample_rate == 0 {
        return Err(AudioError::NoSampleRate);
    }
    trim_to_stream_length(&mut mono, codec_params.n_frames, codec_params.delay);
    if mono.is_empty() {
        return Err(AudioError::NoSamples);
    }
    Ok(DecodedAudio {
        samples: mono,
        sample_rate,
        channels: channels.unwrap_or(1),
    })
}

/// Gapless playback trims the mp3 encoder delay and padding (LAME/Xing header), as libsndfile does, so an
/// mp3 decodes to its original length.
fn format_options() -> FormatOptions {
    FormatOptions {
        enable_gapless: true,
        ..FormatOptions::default()
    }
}

/// Some readers (ogg/vorbis) report the encoder delay and the true length but leave the trimming to the
/// player: drop the leading delay and anything past the stated length, as libsndfile does. Streams that
/// were already trimmed (gapless mp3) or report no length are left alone.
fn trim_to_stream_length(mono: &mut Vec<f32>, n_frames: Option<u64>, delay: Option<u32>) {
    let Some(n) = n_frames.and_then(|n| usize::try_from(n).ok()) else {
        return;
    };
    if mono.len() > n {
        let skip = (delay.unwrap_or(0) as usize).min(mono.len() - n);
        mono.drain(..skip);
        mono.truncate(n);
    }
}

/// Averages interleaved channels (the mean over channels, as librosa's `to_mono`); one channel is copied as is.
fn mix_to_mono(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let inv = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * inv),
    );
}

fn codec_name(codec: symphonia::core::codecs::CodecType) -> String {
    symphonia::default::get_codecs()
        .get_codec(codec)
        .map(|d| d.short_name.to_string())
        .unwrap_or_else(|| format!("{codec}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wav::{encode_wav, WavFormat};

    fn wav(samples: &[f32], rate: u32, channels: u16, float: bool) -> Vec<u8> {
        let f = if float {
            WavFormat::Float32
        } else {
            WavFormat::Pcm16
        };
        encode_wav(samples, rate, channels, f)
    }

    #[test]
    fn pcm16_decodes_exactly() {
        let s: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 2001) as f32 - 1000.0) / 32768.0)
            .collect();
        let d = decode_bytes(&wav(&s, 16000, 1, false), Some("wav")).unwrap();
        assert_eq!(d.sample_rate, 16000);
        assert_eq!(d.channels, 1);
        assert_eq!(d.samples, s);
    }

    #[test]
    fn stereo_float_is_averaged() {
        let inter: Vec<f32> = (0..200)
            .map(|i| if i % 2 == 0 { 0.5 } else { -0.25 })
            .collect();
        let d = decode_bytes(&wav(&inter, 8000, 2, true), None).unwrap();
        assert_eq!(d.channels, 2);
        assert_eq!(d.samples.len(), 100);
        assert!(d.samples.iter().all(|&x| x == 0.125));
    }

    #[test]
    fn garbage_and_empty_are_typed_errors() {
        assert!(matches!(
            decode_bytes(&[], None),
            Err(AudioError::EmptyInput)
        ));
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let e = decode_bytes(&junk, None).unwrap_err();
        assert!(matches!(e, AudioError::UnsupportedFormat { .. }), "{e}");
        let good = wav(&[0.1; 100], 16000, 1, false);
        let e = decode_bytes(&good[..30], Some("wav")).unwrap_err();
        assert!(
            matches!(
                e,
                AudioError::Corrupt { .. } | AudioError::UnsupportedFormat { .. }
            ),
            "{e}"
        );
    }
}
