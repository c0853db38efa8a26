//! Audio for AF-Next: decode any common file to mono f32 ([`decode`]), resample to 16 kHz ([`resample`]),
//! and compute the model's log-mel windows ([`frontend`]) exactly as transformers' processor does.
//!
//! Pure functions over slices, no async runtime: the encoder workers call these from their own threads.

pub mod decode;
pub mod error;
pub mod frontend;
pub mod mel;
pub mod resample;
pub mod wav;

pub use decode::{decode_bytes, decode_file, DecodedAudio};
pub use error::{AudioError, Result};
pub use frontend::{
    check_finite, conv_len, plan_windows, tokens_for_frames, AudioFeatures, Frontend,
    FrontendConfig, Overflow, WindowPlan, WindowSpec,
};
pub use resample::{check_rates, resample, resample_prefix, resampled_len};
pub use wav::{encode_wav, WavFormat};

/// Decoded audio as mono samples at `target_hz`, checked for NaN/inf, at most the first `keep` of them (the
/// rest is not resampled). A file already at the model rate with one channel passes through bit-exact.
pub fn load_mono(audio: DecodedAudio, target_hz: u32, keep: usize) -> Result<Vec<f32>> {
    check_finite(&audio.samples)?;
    resample_prefix(&audio.samples, audio.sample_rate, target_hz, keep)
}
