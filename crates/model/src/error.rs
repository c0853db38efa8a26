//! The model crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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
    #[error("config.json: {field} {problem}")]
    Config { field: String, problem: String },
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("tensor {name} is missing from the checkpoint (looked for {looked_for})")]
    MissingTensor { name: String, looked_for: String },
    #[error("tensor {name} has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("model {model}: {detail}")]
    Hub { model: String, detail: String },
    #[error("invalid model input: {0}")]
    Input(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tensor-parallel group failed (a rank died or stalled); the group cannot be used any more.
    #[error("tensor-parallel group: {0}")]
    Collective(#[from] afnext_collectives::CollectiveError),
}

impl ModelError {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::Input(_) => "invalid_input",
            ModelError::Candle(_) => "compute",
            ModelError::Tokenizer(_) => "tokenizer",
            ModelError::Collective(_) => "group",
            _ => "checkpoint",
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
