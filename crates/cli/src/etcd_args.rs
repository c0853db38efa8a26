//! Flags for etcd discovery, shared by every cluster role.

use std::net::SocketAddr;
use std::time::Duration;

use afnext_discovery::EtcdConfig;
use anyhow::{bail, Result};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated URLs (http://host:2379); discovery is off without them.
    #[arg(long, value_delimiter = ',', env = "AFNEXT_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, default_value = "/afnext")]
    pub cluster_prefix: String,
    /// Seconds after which a worker that stopped renewing its registration disappears.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl_s: u64,
    /// host:port the other tiers use to reach this process (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
}

impl EtcdArgs {
    pub fn config(&self) -> Option<EtcdConfig> {
        (!self.etcd_endpoints.is_empty()).then(|| EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.cluster_prefix.clone(),
            lease_ttl: Duration::from_secs(self.lease_ttl_s.max(2)),
        })
    }

    /// The address to register for a process bound to `bound`.
    pub fn advertised(&self, bound: SocketAddr) -> Result<String> {
        if let Some(a) = &self.advertise {
            return Ok(a.clone());
        }
        if bound.ip().is_unspecified() {
            bail!(
                "listening on {bound} (all interfaces): pass --advertise HOST:PORT so that other tiers \
                 know where to reach this process"
            );
        }
        Ok(bound.to_string())
    }
}
