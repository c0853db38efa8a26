//! A minimal WAV writer: clients and tests turn samples into the bytes a request carries.

/// Sample encoding of the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WavFormat {
    /// 16-bit integer PCM: `round(s * 32768)`, clamped to the i16 range (so `k / 32768` round-trips exactly).
    Pcm16,
    /// 32-bit IEEE float, stored as is.
    Float32,
}

/// A RIFF/WAVE file of interleaved `samples` with `channels` channels at `rate` Hz.
pub fn encode_wav(samples: &[f32], rate: u32, channels: u16, format: WavFormat) -> Vec<u8> {
    let (tag, bytes_per_sample): (u16, u16) = match format {
        WavFormat::Pcm16 => (1, 2),
        WavFormat::Float32 => (3, 4),
    };
    let data_len = samples.len() as u32 * u32::from(bytes_per_sample);
    let mut v = Vec::with_capacity(44 + data_len as usize);
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * u32::from(channels) * u32::from(bytes_per_sample)).to_le_bytes());
    v.extend_from_slice(&(channels * bytes_per_sample).to_le_bytes());
    v.extend_from_slice(&(8 * bytes_per_sample).to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data_len.to_le_bytes());
    for &s in samples {
        match format {
            WavFormat::Pcm16 => v.extend_from_slice(
                &((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes(),
            ),
            WavFormat::Float32 => v.extend_from_slice(&s.to_le_bytes()),
        }
    }
    v
}
