//! The engine's error type. The server maps it to gRPC status codes in one place.

use afnext_model::ModelError;
use afnext_prompt::PromptError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request itself is malformed (parameters, conversation shape).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Conversation, template or audio problems found while preparing the prompt.
    #[error("{0}")]
    Prompt(#[from] PromptError),
    /// A size limit was exceeded; the message names the value and the limit.
    #[error("{what} is {got}, the limit is {limit}")]
    TooLong {
        what: &'static str,
        got: usize,
        limit: usize,
    },
    #[error(
        "the server is at capacity: {limit} requests are already queued or running; retry later"
    )]
    QueueFull { limit: usize },
    #[error("the request's deadline passed before it finished")]
    DeadlineExceeded,
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    /// A rank of the tensor-parallel decoder group died or stalled; this group serves nothing more.
    #[error("the decoder group is unavailable: {0}")]
    GroupLost(String),
    #[error("model computation failed: {0}")]
    Model(#[from] ModelError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::Prompt(p) => p.kind(),
            EngineError::TooLong { .. } => "too_long",
            EngineError::QueueFull { .. } => "queue_full",
            EngineError::DeadlineExceeded => "deadline_exceeded",
            EngineError::Cancelled => "cancelled",
            EngineError::ShuttingDown => "shutting_down",
            EngineError::GroupLost(_) => "group_lost",
            EngineError::Model(m) => m.kind(),
            EngineError::Internal(_) => "internal",
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
