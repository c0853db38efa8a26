//! TLS for every gRPC link (rustls), and API keys for the public API.
//!
//! Off by default (loopback use). A process serves TLS when given a certificate and key; it requires
//! client certificates (mTLS) when also given a client CA. It dials other tiers over TLS when given the CA
//! that signed their certificates, presenting its own certificate when given one (mTLS between tiers).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|source| TlsError::Read {
        path: p.to_path_buf(),
        source,
    })
}

/// Paths of the PEM files of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain and key, for its listener.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Require client certificates signed by this CA on the listener (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Verify the servers this process dials against this CA (TLS on outgoing links).
    pub ca: Option<PathBuf>,
    /// The certificate and key presented when dialing (mTLS); default: `cert` and `key`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The name expected in dialed servers' certificates (default: the host of the address).
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// The listener's TLS, if a certificate is configured.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(TlsError::Config(
                        "a client CA needs a server certificate and key (--tls-cert, --tls-key)"
                            .into(),
                    ));
                }
                return Ok(None);
            }
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(TlsError::Config(
                    "--tls-cert and --tls-key go together".into(),
                ))
            }
        };
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &self.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(Some(cfg))
    }

    /// TLS for outgoing links, if a CA is configured, presenting the client certificate (or the listener's)
    /// for mTLS.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        let cert = self.client_cert.as_ref().or(self.cert.as_ref());
        let key = self.client_key.as_ref().or(self.key.as_ref());
        if let (Some(cert), Some(key)) = (cert, key) {
            cfg = cfg.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(n) = &self.server_name {
            cfg = cfg.domain_name(n.clone());
        }
        Ok(Some(cfg))
    }
}

/// Accepted API keys (`authorization: Bearer <key>`); empty: no key needed.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys(Arc<HashSet<String>>);

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        ApiKeys(Arc::new(
            keys.into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Interceptor for ApiKeys {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.0.is_empty() {
            return Ok(req);
        }
        let key = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match key {
            Some(k) if self.0.contains(k) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the API key is not valid")),
            None => Err(Status::unauthenticated(
                "an API key is required: send the header `authorization: Bearer <key>`",
            )),
        }
    }
}
