//! Prompt processing for AF-Next checkpoints: the processor settings ([`config`]), conversations in the
//! Hugging Face message format ([`conversation`]), the chat template ([`template`]) and tokenization with
//! `<sound>` expansion ([`processor`]).

pub mod config;
pub mod conversation;
pub mod error;
pub mod prepare;
pub mod processor;
pub mod template;

pub use config::ProcessorConfig;
pub use conversation::{AudioSource, Content, Conversation, Message, Part, Role};
pub use error::{PromptError, Result};
pub use prepare::{prepare, prepare_audio, PreparedAudio, PreparedPrompt};
pub use processor::{EncodedPrompt, PromptProcessor};
pub use template::{ChatTemplate, BUILTIN_AFNEXT_TEMPLATE};
