//! The audio crate's one error type. Variants carry data; the messages name the problem and the limit.

use std::path::PathBuf;

/// Everything that can go wrong between audio bytes and log-mel features.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("audio input is empty (0 bytes)")]
    EmptyInput,
    #[error("cannot read audio file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unrecognized audio format ({detail}); supported: wav (PCM 8/16/24/32-bit integer, 32/64-bit float), \
         flac, mp3, ogg/vorbis"
    )]
    UnsupportedFormat { detail: String },
    #[error("unsupported audio codec {codec}; supported codecs: PCM, FLAC, MP3, Vorbis")]
    UnsupportedCodec { codec: String },
    #[error("audio stream is corrupt or truncated: {detail}")]
    Corrupt { detail: String },
    #[error("the audio container holds no audio track")]
    NoTrack,
    #[error("the audio stream has no sample rate")]
    NoSampleRate,
    #[error("audio decodes to zero samples")]
    NoSamples,
    #[error("audio sample {index} is {value}; NaN and infinite samples are not valid audio")]
    NonFinite { index: usize, value: f32 },
    #[error(
        "audio is {duration_s:.2} s long; the limit is {limit_s:.0} s ({max_windows} windows of {window_s:.0} s); \
         ask for truncation to keep only the first {limit_s:.0} s"
    )]
    TooLong {
        duration_s: f64,
        limit_s: f64,
        max_windows: usize,
        window_s: f64,
    },
    #[error(
        "audio is {samples} samples ({duration_ms:.2} ms) long; at least {min_samples} samples \
         ({min_ms:.2} ms) are needed for one audio token"
    )]
    TooShort {
        samples: usize,
        duration_ms: f64,
        min_samples: usize,
        min_ms: f64,
    },
    #[error("cannot resample from {from_hz} Hz to {to_hz} Hz: {detail}")]
    Resample {
        from_hz: u32,
        to_hz: u32,
        detail: String,
    },
    #[error("invalid front-end setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("feature buffer has {got} values; a window needs {expected}")]
    BufferSize { expected: usize, got: usize },
}

impl AudioError {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AudioError::EmptyInput | AudioError::NoSamples => "empty_audio",
            AudioError::Io { .. } => "io",
            AudioError::UnsupportedFormat { .. } => "unsupported_format",
            AudioError::UnsupportedCodec { .. } => "unsupported_codec",
            AudioError::Corrupt { .. } | AudioError::NoTrack | AudioError::NoSampleRate => {
                "corrupt_audio"
            }
            AudioError::NonFinite { .. } => "non_finite_audio",
            AudioError::TooLong { .. } => "audio_too_long",
            AudioError::TooShort { .. } => "audio_too_short",
            AudioError::Resample { .. } => "resample",
            AudioError::InvalidConfig { .. } | AudioError::BufferSize { .. } => "invalid_config",
        }
    }

    /// True when the caller's input (not the server) is at fault.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            AudioError::Io { .. }
                | AudioError::InvalidConfig { .. }
                | AudioError::BufferSize { .. }
        )
    }
}

pub type Result<T, E = AudioError> = std::result::Result<T, E>;
