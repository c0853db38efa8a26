//! The server's settings (the engine's are separate: [`afnext_engine::EngineConfig`]).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request message, inline audio included (bytes).
    pub max_message_bytes: usize,
    /// Largest single upload (bytes).
    pub max_upload_bytes: usize,
    /// All stored uploads together (bytes); the oldest are dropped first.
    pub upload_store_bytes: usize,
    pub upload_ttl: Duration,
    /// On SIGTERM/SIGINT: how long in-flight streams may run before they are cancelled.
    pub grace_period: Duration,
    /// What `GetModelInfo` reports as the model and revision.
    pub model_name: String,
    pub revision: String,
    pub device: String,
    pub dtype: String,
    /// Also serve the cluster's internal `afnext.cluster.v1.Decoder` API (a decoder group leader).
    pub internal_api: bool,
    /// TLS on the listener (none: plaintext).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Keys the public API requires (empty: none).
    pub api_keys: crate::tls::ApiKeys,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_message_bytes: 64 << 20,
            max_upload_bytes: 512 << 20,
            upload_store_bytes: 2 << 30,
            upload_ttl: Duration::from_secs(3600),
            grace_period: Duration::from_secs(30),
            model_name: String::new(),
            revision: String::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            internal_api: false,
            tls: None,
            api_keys: crate::tls::ApiKeys::default(),
        }
    }
}
