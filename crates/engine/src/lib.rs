//! The serving engine of one model in one process: continuous batching over a paged KV cache with prefix
//! caching, an encoder embedding cache, chunked prefill, per-request sampling, stop conditions, deadlines
//! and cancellation.
//!
//! * [`scheduler`] and [`block`] are pure logic (no I/O, the clock is an argument) and unit-tested alone.
//! * [`engine`] is the API: [`Engine::submit`] prepares a request and returns a [`RequestHandle`] that
//!   streams [`Event`]s; dropping the handle cancels the request.
//! * The encoder thread and the step loop are private ([`encoder`], [`worker`]).
//!
//! A prompt position's prefix-cache identity (a "token key") is its token id for text, and a hash of the
//! audio's content and the row index for `<sound>` positions: every `<sound>` has the same id but a
//! different embedding, so two prompts share a cached block only if their audio is the same too.

pub mod block;
pub mod cache;
mod encoder;
pub mod engine;
pub mod error;
pub mod group;
mod remote;
pub mod scheduler;
mod worker;

pub use cache::{AudioKey, CacheStats};
pub use engine::{
    Engine, EngineConfig, EngineStats, Event, GenerateRequest, RequestHandle, Summary, Timings,
    Usage,
};
pub use error::{EngineError, Result};
pub use remote::{Accepted, PreparedRequest, RemoteAudio};
pub use scheduler::SchedulerConfig;
