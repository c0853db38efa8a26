//! The AF-Next model in candle, written once for every device: checkpoint loading ([`weights`],
//! [`config`]), the AF-Whisper encoder ([`encoder`]), rotary time embedding ([`rote`]), the projector and the
//! prompt merge ([`model`]), the Qwen2 decoder ([`decoder`]), and generation ([`sampling`], [`generate`]).
//! Every projection is a [`linear::ParallelLinear`].

pub mod alloc;
mod attn_cpu;
pub mod config;
pub mod cpu_amx;
pub mod cpu_dpbf16;
mod cpu_exp;
mod cpu_features;
pub mod cpu_gemm;
pub mod decoder;
pub mod device;
pub mod elementwise;
pub mod encoder;
mod encoder_cpu;
pub mod error;
pub mod generate;
pub mod hub;
pub mod inv_freq;
pub mod linear;
pub mod model;
mod page_buf;
pub mod paged;
mod paged_cpu;
mod pool;
pub mod rms_norm;
mod rope_cpu;
pub mod rote;
pub mod sampling;
pub mod softmax;
pub mod tp;
pub mod weights;

pub use config::AfNextConfig;
pub use error::{ModelError, Result};
pub use generate::{
    generate, FinishReason, Generation, GenerationParams, IncrementalDecoder, StopMatcher,
    TextStream,
};
pub use model::{AfNext, AudioStages, AudioTower};
pub use sampling::{Sampler, SamplingParams};
