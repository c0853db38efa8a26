//! The prompt crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field {field} {problem}")]
    ConfigField {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("cannot load tokenizer {path}: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("token {token:?} ({role}) is not in the tokenizer's vocabulary")]
    MissingToken { token: String, role: &'static str },
    #[error("the conversation is invalid: {location}: {problem}")]
    Conversation { location: String, problem: String },
    #[error("chat template {source_name} does not compile: {detail}")]
    TemplateSyntax { source_name: String, detail: String },
    #[error("chat template failed to render: {detail}")]
    TemplateRender { detail: String },
    #[error(
        "the rendered prompt has {markers} audio markers ({marker:?}) but the conversation has {audios} audio \
         parts; the chat template must place one marker per message that carries audio"
    )]
    MarkerCount {
        marker: String,
        markers: usize,
        audios: usize,
    },
    #[error("tokenization failed: {detail}")]
    Encode { detail: String },
    #[error("{location}: {source}")]
    Audio {
        location: String,
        #[source]
        source: afnext_audio::AudioError,
    },
    #[error("invalid front-end settings: {0}")]
    Frontend(#[source] afnext_audio::AudioError),
}

impl PromptError {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PromptError::Conversation { .. } => "invalid_conversation",
            PromptError::TemplateRender { .. } | PromptError::MarkerCount { .. } => {
                "template_render"
            }
            PromptError::Encode { .. } => "tokenize",
            PromptError::Audio { source, .. } => source.kind(),
            _ => "checkpoint",
        }
    }

    /// True when the caller's conversation (not the checkpoint) is at fault.
    pub fn is_client_error(&self) -> bool {
        match self {
            PromptError::Audio { source, .. } => source.is_client_error(),
            other => matches!(
                other,
                PromptError::Conversation { .. }
                    | PromptError::TemplateRender { .. }
                    | PromptError::MarkerCount { .. }
            ),
        }
    }

    pub(crate) fn conv(location: impl Into<String>, problem: impl Into<String>) -> Self {
        PromptError::Conversation {
            location: location.into(),
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = PromptError> = std::result::Result<T, E>;
