//! The serving engine.

pub mod block;
pub mod scheduler;
