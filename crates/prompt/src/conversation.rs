//! Conversations in the Hugging Face message format, parsed strictly so that a malformed part is
//! reported with its location instead of being silently dropped.
//!
//! ```json
//! [{"role": "user", "content": [{"type": "audio", "path": "a.flac"}, {"type": "text", "text": "Describe it."}]}]
//! ```
//! `content` is a string, a list of parts, or null (the message is skipped, as the template does).
//! Roles: `system`, `user`, `assistant`. Parts: `{"type":"text","text":...}` and
//! `{"type":"audio","path":...}` (`"audio": "<path>"` is accepted as a synonym of `path`).
//! At most one audio per message (the processor's rule). Several messages may each carry one audio:
//! that is an afnext extension (transformers' processor refuses it); each audio's windows are numbered
//! from 0 as the model's RoTE expects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::error::{PromptError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// Where an audio part's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioSource {
    /// A file on the local machine (CLI use).
    Path(PathBuf),
    /// Encoded file bytes (wav, flac, ...) sent by a client; `format_hint` is an extension such as "flac".
    Bytes {
        data: Arc<Vec<u8>>,
        format_hint: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Audio(AudioSource),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    /// `None` for a JSON null: the message is skipped when rendering.
    pub content: Option<Content>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    /// One user turn: optional audio, then the prompt, with an optional system message first.
    pub fn single_turn(system: Option<&str>, audio: Option<AudioSource>, prompt: &str) -> Self {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message {
                role: Role::System,
                content: Some(Content::Text(s.to_string())),
            });
        }
        let mut parts = Vec::new();
        if let Some(a) = audio {
            parts.push(Part::Audio(a));
        }
        parts.push(Part::Text(prompt.to_string()));
        messages.push(Message {
            role: Role::User,
            content: Some(Content::Parts(parts)),
        });
        Conversation { messages }
    }

    /// Parses a JSON conversation: either a list of messages or `{"messages": [...]}`. Relative audio paths
    /// are resolved against `base_dir` (the directory of the JSON file).
    pub fn from_json(value: &Value, base_dir: Option<&Path>) -> Result<Self> {
        let list = match value {
            Value::Array(a) => a,
            Value::Object(o) => match o.get("messages") {
                Some(Value::Array(a)) => a,
                _ => {
                    return Err(PromptError::conv(
                        "conversation",
                        "expected a list of messages or {\"messages\": [...]}",
                    ))
                }
            },
            _ => {
                return Err(PromptError::conv(
                    "conversation",
                    "expected a list of messages",
                ))
            }
        };
        let messages = list
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m, base_dir))
            .collect::<Result<Vec<_>>>()?;
        let conv = Conversation { messages };
        conv.validate()?;
        Ok(conv)
    }

    /// Checks the rules the processor enforces, plus the ones that keep the prompt well formed.
    pub fn validate(&self) -> Result<()> {
        if self.messages.is_empty() {
            return Err(PromptError::conv("conversation", "has no messages"));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if let Some(Content::Parts(parts)) = &m.content {
                let audios = parts.iter().filter(|p| matches!(p, Part::Audio(_))).count();
                if audios > 1 {
                    return Err(PromptError::conv(
                        format!("message {i}"),
                        format!(
                            "has {audios} audio parts; at most one audio per message is allowed"
                        ),
                    ));
                }
                if audios == 1 && m.role != Role::User {
                    return Err(PromptError::conv(
                        format!("message {i}"),
                        format!(
                            "audio is only accepted in user messages, not in a {} message",
                            m.role.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The audio parts in prompt order.
    pub fn audios(&self) -> Vec<&AudioSource> {
        self.messages
            .iter()
            .filter_map(|m| match &m.content {
                Some(Content::Parts(p)) => Some(p),
                _ => None,
            })
            .flatten()
            .filter_map(|p| match p {
                Part::Audio(a) => Some(a),
                Part::Text(_) => None,
            })
            .collect()
    }

    /// Every text the user controls, with its location (for reserved-token checks).
    pub fn texts(&self) -> impl Iterator<Item = (String, &str)> {
        self.messages.iter().enumerate().flat_map(|(i, m)| {
            let v: Vec<(String, &str)> = match &m.content {
                Some(Content::Text(t)) => vec![(format!("message {i}"), t.as_str())],
                Some(Content::Parts(ps)) => ps
                    .iter()
                    .enumerate()
                    .filter_map(|(j, p)| match p {
                        Part::Text(t) => Some((format!("message {i}, part {j}"), t.as_str())),
                        Part::Audio(_) => None,
                    })
                    .collect(),
                None => vec![],
            };
            v
        })
    }

    /// The value handed to the chat template (HF shape; audio parts keep their path when they have one).
    pub fn template_value(&self) -> Value {
        Value::Array(
            self.messages
                .iter()
                .map(|m| {
                    let content = match &m.content {
                        None => Value::Null,
                        Some(Content::Text(t)) => Value::String(t.clone()),
                        Some(Content::Parts(ps)) => Value::Array(
                            ps.iter()
                                .map(|p| match p {
                                    Part::Text(t) => json!({"type": "text", "text": t}),
                                    Part::Audio(AudioSource::Path(p)) => {
                                        json!({"type": "audio", "path": p.to_string_lossy()})
                                    }
                                    Part::Audio(AudioSource::Bytes { .. }) => {
                                        json!({"type": "audio"})
                                    }
                                })
                                .collect(),
                        ),
                    };
                    json!({"role": m.role.as_str(), "content": content})
                })
                .collect(),
        )
    }
}

fn parse_message(i: usize, m: &Value, base_dir: Option<&Path>) -> Result<Message> {
    let loc = format!("message {i}");
    let obj = m.as_object().ok_or_else(|| {
        PromptError::conv(
            &loc,
            format!("expected an object with role and content, got {}", kind(m)),
        )
    })?;
    let role = match obj.get("role") {
        Some(Value::String(r)) => Role::parse(r).ok_or_else(|| {
            PromptError::conv(
                &loc,
                format!("role {r:?} is not supported; expected system, user or assistant"),
            )
        })?,
        Some(other) => {
            return Err(PromptError::conv(
                &loc,
                format!("role must be a string, got {}", kind(other)),
            ))
        }
        None => return Err(PromptError::conv(&loc, "has no role")),
    };
    let content = match obj.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Content::Text(s.clone())),
        Some(Value::Array(parts)) => Some(Content::Parts(
            parts
                .iter()
                .enumerate()
                .map(|(j, p)| parse_part(&format!("{loc}, part {j}"), p, base_dir))
                .collect::<Result<_>>()?,
        )),
        Some(other) => {
            return Err(PromptError::conv(
                &loc,
                format!(
                    "content must be a string, a list of parts or null, got {}",
                    kind(other)
                ),
            ))
        }
    };
    Ok(Message { role, content })
}

fn parse_part(loc: &str, p: &Value, base_dir: Option<&Path>) -> Result<Part> {
    let obj: &Map<String, Value> = p.as_object().ok_or_else(|| {
        PromptError::conv(
            loc,
            format!("expected an object with a type, got {}", kind(p)),
        )
    })?;
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(other) => {
            return Err(PromptError::conv(
                loc,
                format!("type must be a string, got {}", kind(other)),
            ))
        }
        None if obj.contains_key("audio") => "audio",
        None if obj.contains_key("text") => "text",
        None => return Err(PromptError::conv(loc, "has no type")),
    };
    match ty {
        "text" => match obj.get("text") {
            Some(Value::String(t)) => Ok(Part::Text(t.clone())),
            Some(other) => Err(PromptError::conv(
                loc,
                format!("text must be a string, got {}", kind(other)),
            )),
            None => Err(PromptError::conv(loc, "text part has no \"text\" field")),
        },
        "audio" => {
            let path = match (obj.get("path"), obj.get("audio")) {
                (Some(Value::String(p)), _) | (None, Some(Value::String(p))) => p,
                (Some(other), _) | (None, Some(other)) => {
                    return Err(PromptError::conv(
                        loc,
                        format!("audio path must be a string, got {}", kind(other)),
                    ))
                }
                (None, None) if obj.contains_key("url") => {
                    return Err(PromptError::conv(
                        loc,
                        "audio URLs are not fetched; give a local path or send the bytes",
                    ))
                }
                (None, None) => return Err(PromptError::conv(loc, "audio part has no \"path\"")),
            };
            if path.is_empty() {
                return Err(PromptError::conv(loc, "audio path is empty"));
            }
            let p = PathBuf::from(path);
            let p = match base_dir {
                Some(b) if p.is_relative() => b.join(p),
                _ => p,
            };
            Ok(Part::Audio(AudioSource::Path(p)))
        }
        other => Err(PromptError::conv(
            loc,
            format!("part type {other:?} is not supported; expected \"text\" or \"audio\""),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Conversation> {
        Conversation::from_json(&v, Some(Path::new("/base")))
    }

    #[test]
    fn parses_parts_and_resolves_paths() {
        let c = parse(json!([{"role":"user","content":[{"type":"audio","path":"a.flac"},{"type":"text","text":"hi"}]}]))
            .unwrap();
        assert_eq!(
            c.audios(),
            vec![&AudioSource::Path(PathBuf::from("/base/a.flac"))]
        );
        let c = parse(json!({"messages":[{"role":"user","content":"plain"},{"role":"assistant","content":null}]})).unwrap();
        assert_eq!(c.messages[1].content, None);
    }

    #[test]
    fn malformed_parts_are_located() {
        let cases = [
            (
                json!([{"role":"user","content":[{"type":"image","url":"x"}]}]),
                "message 0, part 0",
                "\"image\"",
            ),
            (
                json!([{"role":"user","content":[{"type":"text"}]}]),
                "part 0",
                "no \"text\"",
            ),
            (
                json!([{"role":"user","content":[{"type":"text","text":5}]}]),
                "part 0",
                "a number",
            ),
            (
                json!([{"role":"user","content":[{"type":"audio"}]}]),
                "part 0",
                "no \"path\"",
            ),
            (
                json!([{"role":"robot","content":"x"}]),
                "message 0",
                "\"robot\"",
            ),
            (json!([{"content":"x"}]), "message 0", "no role"),
            (
                json!([{"role":"user","content":5}]),
                "message 0",
                "content must be",
            ),
            (json!([]), "conversation", "no messages"),
            (json!("hello"), "conversation", "list of messages"),
            (
                json!([{"role":"user","content":[{"type":"audio","path":"a"},{"type":"audio","path":"b"}]}]),
                "message 0",
                "at most one audio",
            ),
            (
                json!([{"role":"assistant","content":[{"type":"audio","path":"a"}]}]),
                "message 0",
                "only accepted in user",
            ),
        ];
        for (v, loc, what) in cases {
            let e = parse(v.clone()).unwrap_err().to_string();
            assert!(e.contains(loc) && e.contains(what), "{v}: {e}");
        }
    }
}
