//! The chat template: found where transformers looks for it, rendered with minijinja configured like
//! transformers' Jinja environment (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`).

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use crate::config::read_json_opt;
use crate::error::{PromptError, Result};

/// The AF-Next template of spec 4.1, used when a checkpoint ships none.
pub const BUILTIN_AFNEXT_TEMPLATE: &str = include_str!("../templates/afnext_chat_template.jinja");

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file name, or "built-in").
    pub source_name: String,
}

/// The special-token strings a template may refer to (`bos_token`, `eos_token`, ...).
pub type SpecialTokens = Vec<(String, String)>;

impl ChatTemplate {
    /// Looks in `chat_template.jinja`, `chat_template.json`, `processor_config.json` and
    /// `tokenizer_config.json` (in that order, as transformers 5 does) and falls back to the built-in one.
    pub fn load(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|source| PromptError::Io {
                path: jinja,
                source,
            })?;
            return Self::from_source("chat_template.jinja", text);
        }
        for file in [
            "chat_template.json",
            "processor_config.json",
            "tokenizer_config.json",
        ] {
            if let Some(v) = read_json_opt(&dir.join(file))? {
                if let Some(t) = template_field(v.get("chat_template")) {
                    return Self::from_source(file, t);
                }
            }
        }
        Self::builtin()
    }

    pub fn builtin() -> Result<Self> {
        Self::from_source(
            "built-in AF-Next template",
            BUILTIN_AFNEXT_TEMPLATE.to_string(),
        )
    }

    pub fn from_source(name: &str, text: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", text)
            .map_err(|e| PromptError::TemplateSyntax {
                source_name: name.to_string(),
                detail: format!("{e:#}"),
            })?;
        Ok(ChatTemplate {
            env,
            source_name: name.to_string(),
        })
    }

    /// Renders `messages` (HF message list) with `add_generation_prompt` and the special tokens.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .expect("template added in the constructor; this is a bug");
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        for (k, v) in special {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        tmpl.render(Value::Object(ctx))
            .map_err(|e| PromptError::TemplateRender {
                detail: format!("{e:#}"),
            })
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn template_field(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SYSTEM: &str = "You are Audio Flamingo-Next, a multimodal assistant for language and audio. On each turn \
        you receive an optional audio clip which may contain speech, music, or ambient sounds and optional text, you \
        will receive at least one or both; use your world knowledge and reasoning to help the user with any task. \
        Interpret the entirety of the content of any input audio\u{2014}regardless of whether the user calls it \
        audio, speech, music, or sound.";

    #[test]
    fn builtin_renders_spec_example() {
        let t = ChatTemplate::builtin().unwrap();
        let msgs = json!([{"role":"user","content":[{"type":"text","text":"Describe the audio in detail."},{"type":"audio","path":"x"}]}]);
        let out = t.render(&msgs, true, &vec![]).unwrap();
        let want = format!(
            "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<sound>Describe the audio in detail.<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(out, want);
    }

    #[test]
    fn builtin_multiturn_custom_system_and_null_content() {
        let t = ChatTemplate::builtin().unwrap();
        let msgs = json!([
            {"role":"system","content":"S"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
            {"role":"assistant","content":null},
            {"role":"assistant","content":"c"}
        ]);
        let out = t.render(&msgs, false, &vec![]).unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n");
    }

    #[test]
    fn raise_exception_becomes_render_error() {
        let t = ChatTemplate::from_source("t", "{{ raise_exception('no tools here') }}".into())
            .unwrap();
        let e = t.render(&json!([]), true, &vec![]).unwrap_err().to_string();
        assert!(e.contains("no tools here"), "{e}");
        assert!(matches!(
            ChatTemplate::from_source("bad", "{% if %}".into()),
            Err(PromptError::TemplateSyntax { .. })
        ));
    }
}
