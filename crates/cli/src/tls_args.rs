//! TLS and API-key flags, shared by every gRPC role (all off by default, for loopback use).

use std::path::PathBuf;

use afnext_server::tls::{ApiKeys, TlsFiles};
use anyhow::{Context, Result};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM certificate chain of this process's gRPC listener; TLS is on with --tls-key.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA on the listener (mTLS between tiers).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// Dial the other tiers over TLS, verifying them against this PEM CA.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Certificate presented when dialing other tiers (mTLS; default: --tls-cert).
    #[arg(long)]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of --tls-client-cert (default: --tls-key).
    #[arg(long)]
    pub tls_client_key: Option<PathBuf>,
    /// Name expected in the other tiers' certificates (default: the host of each address).
    #[arg(long)]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
            ca: self.tls_ca.clone(),
            client_cert: self.tls_client_cert.clone(),
            client_key: self.tls_client_key.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }

    /// How this process dials other tiers.
    pub fn links(&self) -> Result<afnext_server::links::Links> {
        Ok(afnext_server::links::Links {
            connect_timeout: Some(std::time::Duration::from_secs(5)),
            tls: self.files().client().context("TLS for outgoing links")?,
        })
    }
}

/// The public API's keys: `--api-keys-file` (one per line) and `AFNEXT_API_KEYS` (comma-separated).
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// File of accepted API keys, one per line; clients send `authorization: Bearer <key>`.
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Accepted API keys, comma-separated (prefer the file: environments leak).
    #[arg(
        long,
        env = "AFNEXT_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,
}

impl KeyArgs {
    pub fn keys(&self) -> Result<ApiKeys> {
        let mut all = self.api_keys.clone();
        if let Some(f) = &self.api_keys_file {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            all.extend(
                text.lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .map(str::to_string),
            );
        }
        Ok(ApiKeys::new(all))
    }
}
