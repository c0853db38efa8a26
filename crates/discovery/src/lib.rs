//! Cluster membership in etcd.
//!
//! Layout: `{prefix}/{tier}/{addr}` -> `addr`, where `tier` is `encoders` or `decoders` and every key is
//! attached to its worker's lease. A worker [`register`]s once and a background task keeps the lease alive;
//! if etcd goes away (a restart, a network cut) the task reconnects and registers again, so membership comes
//! back by itself. [`Registration::deregister`] revokes the lease (SIGTERM, or a decoder group that lost a
//! rank): the key disappears at once instead of at lease expiry. A worker that dies without deregistering
//! disappears when its lease expires (`lease_ttl`).
//!
//! A router [`watch`]es the prefix: the whole membership is read, then changes stream in; on any etcd error
//! it keeps its last view (requests keep flowing) and starts over when etcd is back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the cluster's membership lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster (several clusters can share one etcd).
    pub prefix: String,
    /// A worker that stops renewing disappears after this long.
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    fn tier_prefix(&self, tier: &str) -> String {
        format!("{}/{tier}/", self.prefix.trim_end_matches('/'))
    }
}

pub const ENCODERS: &str = "encoders";
pub const DECODERS: &str = "decoders";

/// A worker's entry, kept alive in the background.
#[derive(Debug)]
pub struct Registration {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    registered: Arc<AtomicBool>,
}

impl Registration {
    /// True while the key is in etcd (as far as this worker knows).
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    /// A readiness check that stays valid after the registration is moved (readiness probes).
    pub fn probe(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let flag = self.registered.clone();
        move || flag.load(Ordering::SeqCst)
    }

    /// Removes the entry now (revokes the lease) and stops renewing it.
    pub async fn deregister(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Registers `addr` under `tier` and keeps it registered until [`Registration::deregister`].
pub fn register(cfg: EtcdConfig, tier: &str, addr: &str) -> Registration {
    let (stop, mut stopped) = watch::channel(false);
    let registered = Arc::new(AtomicBool::new(false));
    let key = format!("{}{addr}", cfg.tier_prefix(tier));
    let (addr, flag) = (addr.to_string(), registered.clone());
    let task = tokio::spawn(async move {
        let ttl = cfg.lease_ttl.as_secs().max(2) as i64;
        loop {
            // One registration: connect, lease, put, renew until an error or a stop.
            let r: Result<(), etcd_client::Error> = async {
                let mut c = Client::connect(&cfg.endpoints, None).await?;
                let lease = c.lease_grant(ttl, None).await?.id();
                c.put(
                    key.as_str(),
                    addr.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
                flag.store(true, Ordering::SeqCst);
                let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
                let every = Duration::from_secs((ttl as u64 / 3).max(1));
                loop {
                    tokio::select! {
                        _ = stopped.changed() => {
                            flag.store(false, Ordering::SeqCst);
                            let _ = c.lease_revoke(lease).await;
                            return Ok(());
                        }
                        _ = tokio::time::sleep(every) => {
                            keeper.keep_alive().await?;
                            match answers.message().await? {
                                // TTL 0: the lease expired meanwhile (etcd was away too long).
                                Some(a) if a.ttl() > 0 => {}
                                _ => return Err(etcd_client::Error::LeaseKeepAliveError(
                                    "lease expired".into(),
                                )),
                            }
                        }
                    }
                }
            }
            .await;
            flag.store(false, Ordering::SeqCst);
            if r.is_ok() || *stopped.borrow() {
                return;
            }
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
    Registration {
        stop,
        task,
        registered,
    }
}

/// The membership: tier -> addresses.
pub type Members = BTreeMap<String, BTreeSet<String>>;

/// Watches the cluster's membership; `update` gets the whole membership after the first read and after
/// every change. Runs until the returned task is aborted.
pub fn watch(cfg: EtcdConfig, update: impl Fn(&Members) + Send + Sync + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        let root = format!("{}/", cfg.prefix.trim_end_matches('/'));
        loop {
            let r: Result<(), etcd_client::Error> = async {
                let mut c = Client::connect(&cfg.endpoints, None).await?;
                let got = c
                    .get(root.as_str(), Some(GetOptions::new().with_prefix()))
                    .await?;
                let rev = got.header().map_or(0, |h| h.revision());
                let mut members = Members::new();
                for kv in got.kvs() {
                    if let Some((tier, addr)) = split(&root, kv.key_str()?) {
                        members.entry(tier).or_default().insert(addr);
                    }
                }
                update(&members);
                let mut stream = c
                    .watch(
                        root.as_str(),
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(rev + 1),
                        ),
                    )
                    .await?;
                while let Some(resp) = stream.message().await? {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some((tier, addr)) = split(&root, kv.key_str()?) else {
                            continue;
                        };
                        let set = members.entry(tier).or_default();
                        match ev.event_type() {
                            EventType::Put => set.insert(addr),
                            EventType::Delete => set.remove(&addr),
                        };
                    }
                    update(&members);
                }
                Ok(())
            }
            .await;
            // etcd is away: keep the last view and try again.
            let _ = r;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn split(root: &str, key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix(root)?;
    let (tier, addr) = rest.split_once('/')?;
    (!addr.is_empty()).then(|| (tier.to_string(), addr.to_string()))
}
