//! The one mapping from errors to gRPC status codes (see the table at the top of `afnext.proto`).

use afnext_engine::EngineError;
use tonic::{Code, Status};

/// Errors of the API layer itself (before the engine sees a request).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{location}: {problem}")]
    BadRequest { location: String, problem: String },
    #[error("upload {0:?} is unknown or expired; upload the audio again")]
    UnknownUpload(String),
    #[error("{what} is {got} bytes, the limit is {limit} bytes")]
    TooLarge {
        what: &'static str,
        got: usize,
        limit: usize,
    },
    #[error("the upload store is full ({limit} bytes of uploads are pending); retry later")]
    UploadStoreFull { limit: usize },
    #[error("invalid grpc-timeout header {0:?}")]
    BadTimeout(String),
    /// No worker of a cluster tier can take the request now (the message says which and why).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::BadRequest { .. } | ApiError::UnknownUpload(_) | ApiError::BadTimeout(_) => {
                Code::InvalidArgument
            }
            ApiError::TooLarge { .. } => Code::OutOfRange,
            ApiError::UploadStoreFull { .. } => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Engine(e) => engine_code(e),
        };
        Status::new(code, e.to_string())
    }
}

/// The status of an engine error (through [`ApiError`], so there is one table).
pub fn engine_status(e: EngineError) -> Status {
    ApiError::Engine(e).into()
}

fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::InvalidRequest(_) => Code::InvalidArgument,
        EngineError::Prompt(p) if p.is_client_error() => Code::InvalidArgument,
        EngineError::Prompt(_) => Code::Internal,
        EngineError::TooLong { .. } => Code::OutOfRange,
        EngineError::QueueFull { .. } => Code::ResourceExhausted,
        EngineError::DeadlineExceeded => Code::DeadlineExceeded,
        EngineError::Cancelled => Code::Cancelled,
        EngineError::ShuttingDown | EngineError::GroupLost(_) => Code::Unavailable,
        EngineError::Model(afnext_model::ModelError::Input(_)) => Code::InvalidArgument,
        EngineError::Model(_) | EngineError::Internal(_) => Code::Internal,
    }
}
