//! Protobuf requests to engine requests. Every malformed field is refused with its location.

use std::sync::Arc;
use std::time::Instant;

use afnext_engine::GenerateRequest;
use afnext_model::SamplingParams;
use afnext_prompt::{AudioSource, Content, Conversation, Message, Part, Role};

use crate::pb;
use crate::status::ApiError;

fn bad(location: impl Into<String>, problem: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        location: location.into(),
        problem: problem.into(),
    }
}

pub fn format_hint(f: i32) -> Option<String> {
    match pb::AudioFormat::try_from(f).unwrap_or(pb::AudioFormat::Unspecified) {
        pb::AudioFormat::Unspecified => None,
        pb::AudioFormat::Wav => Some("wav".into()),
        pb::AudioFormat::Flac => Some("flac".into()),
        pb::AudioFormat::Mp3 => Some("mp3".into()),
        pb::AudioFormat::Ogg => Some("ogg".into()),
    }
}

/// Builds the engine request; `upload` resolves an upload id to its bytes and format.
pub fn generate_request(
    req: pb::GenerateRequest,
    deadline: Option<Instant>,
    mut upload: impl FnMut(&str) -> Option<(Arc<Vec<u8>>, Option<String>)>,
) -> Result<GenerateRequest, ApiError> {
    if req.messages.is_empty() {
        return Err(bad("messages", "at least one message is needed"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match pb::Role::try_from(m.role) {
            Ok(pb::Role::System) => Role::System,
            Ok(pb::Role::User) => Role::User,
            Ok(pb::Role::Assistant) => Role::Assistant,
            _ => {
                return Err(bad(
                    format!("message {i}"),
                    format!("role {} is not one of SYSTEM, USER, ASSISTANT", m.role),
                ))
            }
        };
        let mut parts = Vec::with_capacity(m.parts.len());
        for (j, p) in m.parts.into_iter().enumerate() {
            let loc = format!("message {i}, part {j}");
            match p.kind {
                Some(pb::part::Kind::Text(t)) => parts.push(Part::Text(t)),
                Some(pb::part::Kind::Audio(a)) => {
                    let hint = format_hint(a.format);
                    let src = match a.source {
                        Some(pb::audio_part::Source::Data(d)) => AudioSource::Bytes {
                            data: Arc::new(d),
                            format_hint: hint,
                        },
                        Some(pb::audio_part::Source::UploadId(id)) => {
                            let (data, stored_hint) =
                                upload(&id).ok_or(ApiError::UnknownUpload(id))?;
                            AudioSource::Bytes {
                                data,
                                format_hint: hint.or(stored_hint),
                            }
                        }
                        None => return Err(bad(loc, "audio part has neither data nor upload_id")),
                    };
                    parts.push(Part::Audio(src));
                }
                None => return Err(bad(loc, "part has neither text nor audio")),
            }
        }
        messages.push(Message {
            role,
            content: Some(Content::Parts(parts)),
        });
    }
    let sampling = sampling(req.sampling.unwrap_or_default());
    Ok(GenerateRequest {
        conversation: Conversation { messages },
        max_new_tokens: req.max_new_tokens.map(|n| n as usize),
        sampling,
        stop: req.stop,
        truncate_audio: req.truncate_audio,
        ignore_eos: req.ignore_eos,
        deadline,
    })
}

/// Sampling parameters (checked by the engine, which names the bad one).
pub fn sampling(s: pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p.unwrap_or(1.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        seed: s.seed,
        min_new_tokens: s.min_new_tokens as usize,
    }
}

/// The deadline a call's `grpc-timeout` header sets, if any.
pub fn deadline(md: &tonic::metadata::MetadataMap) -> Result<Option<Instant>, ApiError> {
    match md.get("grpc-timeout") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            let d = grpc_timeout(s).ok_or_else(|| ApiError::BadTimeout(s.into()))?;
            Ok(Some(Instant::now() + d))
        }
    }
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...): digits then H, M, S, m, u or n.
pub fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            grpc_timeout("100m"),
            Some(std::time::Duration::from_millis(100))
        );
        assert_eq!(grpc_timeout("2S"), Some(std::time::Duration::from_secs(2)));
        assert_eq!(grpc_timeout("5x"), None);
        assert_eq!(grpc_timeout(""), None);
        assert_eq!(grpc_timeout("m"), None);
    }

    #[test]
    fn malformed_requests_name_the_location() {
        let none = |_: &str| None;
        let e = generate_request(pb::GenerateRequest::default(), None, none).unwrap_err();
        assert!(e.to_string().contains("messages"), "{e}");
        let req = pb::GenerateRequest {
            messages: vec![pb::Message {
                role: pb::Role::User as i32,
                parts: vec![pb::Part { kind: None }],
            }],
            ..Default::default()
        };
        let e = generate_request(req, None, none).unwrap_err();
        assert!(e.to_string().contains("message 0, part 0"), "{e}");
    }
}
