//! The router's view of the cluster: which encoder workers and decoder groups exist (from a static list or
//! etcd), how loaded each is, and which recently failed.
//!
//! Choice: decoder groups by `session_id` affinity (rendezvous hashing over the healthy groups, so a
//! follow-up turn lands where its prefix is cached and only sessions of a vanished group move) or, without
//! a session, the fewest requests in flight; encoder workers by the fewest windows in flight. A member that
//! fails a call is skipped for [`COOLDOWN`] (unless nothing else is left).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a member that failed is avoided.
pub const COOLDOWN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Encoder,
    Decoder,
}

#[derive(Debug)]
struct Member {
    in_flight: Arc<AtomicUsize>,
    down_until: Option<Instant>,
}

/// Members of both tiers, keyed by address.
#[derive(Debug, Default)]
pub struct Pool {
    members: RwLock<BTreeMap<(Tier, String), Member>>,
}

/// A member taken for one call; counts it in flight until dropped.
#[derive(Debug)]
pub struct Lease {
    pub addr: String,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    pub fn new() -> Self {
        Pool::default()
    }

    /// Replaces the members of `tier` (a discovery update); the counters of members that stay are kept.
    pub fn set(&self, tier: Tier, addrs: &[String]) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        m.retain(|(t, a), _| *t != tier || addrs.contains(a));
        for a in addrs {
            m.entry((tier, a.clone())).or_insert_with(|| Member {
                in_flight: Arc::new(AtomicUsize::new(0)),
                down_until: None,
            });
        }
    }

    pub fn add(&self, tier: Tier, addr: &str) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        m.entry((tier, addr.to_string())).or_insert_with(|| Member {
            in_flight: Arc::new(AtomicUsize::new(0)),
            down_until: None,
        });
    }

    pub fn remove(&self, tier: Tier, addr: &str) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        m.remove(&(tier, addr.to_string()));
    }

    /// Addresses of `tier`, sorted.
    pub fn members(&self, tier: Tier) -> Vec<String> {
        let m = self.members.read().unwrap_or_else(|p| p.into_inner());
        m.keys()
            .filter(|(t, _)| *t == tier)
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Marks `addr` as failed (skipped for [`COOLDOWN`]) or, with `None`, healthy again.
    pub fn set_down(&self, tier: Tier, addr: &str, until: Option<Instant>) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        if let Some(mem) = m.get_mut(&(tier, addr.to_string())) {
            mem.down_until = until;
        }
    }

    pub fn failed(&self, tier: Tier, addr: &str) {
        self.set_down(tier, addr, Some(Instant::now() + COOLDOWN));
    }

    /// Healthy members of `tier` not in `exclude`.
    pub fn healthy(&self, tier: Tier, exclude: &[String]) -> Vec<String> {
        let now = Instant::now();
        let m = self.members.read().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|((t, a), mem)| {
                *t == tier && !exclude.contains(a) && mem.down_until.is_none_or(|d| d <= now)
            })
            .map(|((_, a), _)| a.clone())
            .collect()
    }

    /// Picks a member of `tier` not in `exclude`: by rendezvous hash of `affinity` if given, else the
    /// least loaded. Failed members are used only when nothing healthy is left.
    pub fn pick(&self, tier: Tier, affinity: Option<&str>, exclude: &[String]) -> Option<Lease> {
        let mut cands = self.healthy(tier, exclude);
        if cands.is_empty() {
            cands = self
                .members(tier)
                .into_iter()
                .filter(|a| !exclude.contains(a))
                .collect();
        }
        let m = self.members.read().unwrap_or_else(|p| p.into_inner());
        let load = |a: &String| m[&(tier, a.clone())].in_flight.load(Ordering::SeqCst);
        let chosen = match affinity {
            Some(key) if !key.is_empty() => cands.into_iter().max_by_key(|a| {
                let mut h = blake3::Hasher::new();
                h.update(key.as_bytes());
                h.update(b"\0");
                h.update(a.as_bytes());
                *h.finalize().as_bytes()
            }),
            _ => cands.into_iter().min_by_key(|a| (load(a), a.clone())),
        }?;
        let counter = m[&(tier, chosen.clone())].in_flight.clone();
        counter.fetch_add(1, Ordering::SeqCst);
        Some(Lease {
            addr: chosen,
            in_flight: counter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_is_stable_and_load_spreads() {
        let p = Pool::new();
        let addrs: Vec<String> = (0..4).map(|i| format!("d{i}:1")).collect();
        p.set(Tier::Decoder, &addrs);
        let a = p
            .pick(Tier::Decoder, Some("session-7"), &[])
            .unwrap()
            .addr
            .clone();
        for _ in 0..5 {
            assert_eq!(
                p.pick(Tier::Decoder, Some("session-7"), &[])
                    .unwrap()
                    .addr
                    .clone(),
                a
            );
        }
        // Another member going away does not move the session.
        let other: Vec<String> = addrs.iter().filter(|x| **x != a).take(1).cloned().collect();
        p.remove(Tier::Decoder, &other[0]);
        assert_eq!(
            p.pick(Tier::Decoder, Some("session-7"), &[])
                .unwrap()
                .addr
                .clone(),
            a
        );
        // Without a session: leases held spread the next picks.
        let held: Vec<Lease> = (0..3)
            .map(|_| p.pick(Tier::Decoder, None, &[]).unwrap())
            .collect();
        let mut got: Vec<&str> = held.iter().map(|l| l.addr.as_str()).collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 3);
        // A failed member is avoided while others are healthy.
        p.failed(Tier::Decoder, &a);
        assert_ne!(
            p.pick(Tier::Decoder, Some("session-7"), &[])
                .unwrap()
                .addr
                .clone(),
            a
        );
    }
}
