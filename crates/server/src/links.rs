//! Outgoing gRPC links between tiers (router -> decoders and encoders, encoders -> decoders): one place
//! that turns an address into a channel, so transport settings apply to every link alike.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How this process dials other tiers.
#[derive(Debug, Clone, Default)]
pub struct Links {
    /// Time to establish a connection.
    pub connect_timeout: Option<Duration>,
    /// TLS (and the client certificate, for mTLS) on every link; plaintext when `None`.
    pub tls: Option<ClientTlsConfig>,
}

impl Links {
    /// A connected channel to `addr` (`host:port`).
    pub async fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(t) = self.connect_timeout {
            ep = ep.connect_timeout(t);
        }
        if let Some(tls) = &self.tls {
            ep = ep.tls_config(tls.clone())?;
        }
        ep.connect().await
    }
}
