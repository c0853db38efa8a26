//! The router's settings; the CLI composes them from flags.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// Decoder group leaders (`host:port`) known without discovery.
    pub decoders: Vec<String>,
    /// Encoder workers (`host:port`) known without discovery.
    pub encoders: Vec<String>,
    /// Longest time one encoder may take for one window (encode and deliver) before it is sent to another.
    pub window_timeout: Duration,
    /// Tries per window over different encoders before the request fails with UNAVAILABLE.
    pub window_attempts: usize,
    /// Decoder groups tried per request while no token has been streamed.
    pub decoder_attempts: usize,
    /// How often decoder groups' gRPC health is checked.
    pub health_interval: Duration,
    /// Threads decoding audio and tokenizing prompts at once.
    pub prepare_threads: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            decoders: Vec::new(),
            encoders: Vec::new(),
            window_timeout: Duration::from_secs(120),
            window_attempts: 3,
            decoder_attempts: 2,
            health_interval: Duration::from_secs(1),
            prepare_threads: 4,
        }
    }
}
