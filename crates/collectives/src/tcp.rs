//! The CPU implementation of [`Collective`]: TCP connections in a star around rank 0.
//!
//! Rank 0 listens; ranks `1..world` connect and introduce themselves. Every operation is a frame
//! (`op: u8, length: u64 LE, payload`). For an all-reduce each rank sends its buffer to rank 0, which adds them
//! in rank order (`((x0 + x1) + x2) + ...`, in f32) and sends the result back, so every rank holds identical
//! bits. A star is two hops for any group size; the groups this serves on CPUs are small (TP <= 8) and the
//! transfers are activations, not weights.
//!
//! Failure model: a closed connection is [`CollectiveError::PeerGone`] at once; a peer that holds up an
//! operation longer than `op_timeout` is [`CollectiveError::Timeout`]. After either, the group is broken
//! and every later operation fails immediately with the same reason (a half-read stream cannot be trusted).
//! Only a rank waiting for the *start* of a broadcast from rank 0 waits without a limit: that is a follower
//! idling until rank 0 has work.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Collective, CollectiveError, Result};

const MAGIC: u32 = u32::from_le_bytes(*b"AFTP");
const VERSION: u32 = 1;

const OP_REDUCE: u8 = 1;
const OP_GATHER: u8 = 2;
const OP_BCAST: u8 = 3;
const OP_RESULT: u8 = 4;

/// Timeouts of a TCP group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConfig {
    /// How long rank 0 waits for all ranks to join, and a follower keeps retrying to reach rank 0.
    pub join_timeout: Duration,
    /// The longest any rank may hold up one operation.
    pub op_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            join_timeout: Duration::from_secs(300),
            op_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
enum Links {
    /// Rank 0: the stream of rank `i + 1` at index `i`.
    Leader(Vec<TcpStream>),
    Follower(TcpStream),
}

#[derive(Debug)]
struct State {
    links: Links,
    broken: Option<String>,
}

/// One rank of a TCP group.
#[derive(Debug)]
pub struct TcpGroup {
    rank: usize,
    world: usize,
    cfg: TcpConfig,
    state: Mutex<State>,
}

impl TcpGroup {
    /// Rank 0 of a group of `world`: waits on `listener` until every other rank has joined.
    pub fn lead(listener: TcpListener, world: usize, cfg: TcpConfig) -> Result<Self> {
        if world == 0 {
            return Err(CollectiveError::Setup(
                "a group needs at least one rank".into(),
            ));
        }
        let deadline = Instant::now() + cfg.join_timeout;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::Setup(format!("listener: {e}")))?;
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)
                        .and_then(|_| s.set_nodelay(true))
                        .and_then(|_| s.set_read_timeout(Some(cfg.op_timeout)))
                        .map_err(|e| CollectiveError::Setup(format!("{peer}: {e}")))?;
                    match read_hello(&mut s, world) {
                        Ok(r) if slots[r - 1].is_none() => {
                            s.write_all(&[1]).map_err(|e| {
                                CollectiveError::Setup(format!("rank {r} at {peer}: {e}"))
                            })?;
                            slots[r - 1] = Some(s);
                        }
                        Ok(r) => {
                            let _ = s.write_all(&[0]);
                            return Err(CollectiveError::Setup(format!(
                                "rank {r} joined twice (second time from {peer})"
                            )));
                        }
                        // A stray connection (a port scan, a health check): ignore it.
                        Err(_) => {
                            let _ = s.write_all(&[0]);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(CollectiveError::Setup(format!(
                            "ranks {} did not join within {:?}",
                            missing.join(", "),
                            cfg.join_timeout
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(CollectiveError::Setup(format!("accept: {e}"))),
            }
        }
        Ok(TcpGroup {
            rank: 0,
            world,
            cfg,
            state: Mutex::new(State {
                links: Links::Leader(slots.into_iter().map(|s| s.expect("all joined")).collect()),
                broken: None,
            }),
        })
    }

    /// Rank `rank` (>= 1) of a group of `world`: connects to rank 0 at `leader`, retrying until it listens.
    pub fn join(rank: usize, world: usize, leader: &str, cfg: TcpConfig) -> Result<Self> {
        if rank == 0 || rank >= world {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} cannot join a group of {world} as a follower (ranks 1..{world})"
            )));
        }
        let deadline = Instant::now() + cfg.join_timeout;
        let mut last_err;
        loop {
            match connect(leader) {
                Ok(mut s) => {
                    s.set_nodelay(true)
                        .and_then(|_| s.set_read_timeout(Some(cfg.op_timeout)))
                        .map_err(|e| CollectiveError::Setup(e.to_string()))?;
                    let mut hello = Vec::with_capacity(16);
                    for x in [MAGIC, VERSION, rank as u32, world as u32] {
                        hello.extend_from_slice(&x.to_le_bytes());
                    }
                    let mut ok = [0u8];
                    match s.write_all(&hello).and_then(|_| s.read_exact(&mut ok)) {
                        Ok(()) if ok[0] == 1 => {
                            return Ok(TcpGroup {
                                rank,
                                world,
                                cfg,
                                state: Mutex::new(State {
                                    links: Links::Follower(s),
                                    broken: None,
                                }),
                            })
                        }
                        Ok(()) => {
                            return Err(CollectiveError::Setup(format!(
                            "rank 0 at {leader} refused rank {rank} of {world} (wrong group size, \
                                 or the rank is taken)"
                        )))
                        }
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => last_err = e,
            }
            if Instant::now() >= deadline {
                return Err(CollectiveError::Setup(format!(
                    "cannot reach rank 0 at {leader} within {:?}: {last_err}",
                    cfg.join_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` on the links unless the group is broken; a fatal error breaks it.
    fn with_links<T>(&self, f: impl FnOnce(&mut Links) -> Result<T>) -> Result<T> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &st.broken {
            return Err(CollectiveError::PeerGone {
                rank: usize::MAX,
                reason: format!("the group is broken: {reason}"),
            });
        }
        let r = f(&mut st.links);
        if let Err(e) = &r {
            if e.is_fatal() {
                st.broken = Some(e.to_string());
                // Close every link so the other ranks notice at once instead of at their timeout.
                match &st.links {
                    Links::Leader(v) => v
                        .iter()
                        .for_each(|s| drop(s.shutdown(std::net::Shutdown::Both))),
                    Links::Follower(s) => drop(s.shutdown(std::net::Shutdown::Both)),
                }
            }
        }
        r
    }
}

fn connect(addr: &str) -> std::result::Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    let mut last = format!("{addr} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn read_hello(s: &mut TcpStream, world: usize) -> std::result::Result<usize, String> {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).map_err(|e| e.to_string())?;
    let w = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    if w(0) != MAGIC || w(1) != VERSION {
        return Err("not an afnext group member".into());
    }
    let (rank, their_world) = (w(2) as usize, w(3) as usize);
    if their_world != world || rank == 0 || rank >= world {
        return Err(format!(
            "rank {rank} of {their_world}, expected 1..{world} of {world}"
        ));
    }
    Ok(rank)
}

fn io_err(rank: usize, op: &'static str, after: Duration, e: std::io::Error) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout { rank, op, after },
        _ => CollectiveError::PeerGone {
            rank,
            reason: format!("{op}: {e}"),
        },
    }
}

fn write_frame(
    s: &mut TcpStream,
    peer: usize,
    cfg: &TcpConfig,
    op: u8,
    payload: &[u8],
) -> Result<()> {
    let mut head = [0u8; 9];
    head[0] = op;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.set_write_timeout(Some(cfg.op_timeout))
        .and_then(|_| s.write_all(&head))
        .and_then(|_| s.write_all(payload))
        .map_err(|e| io_err(peer, "send", cfg.op_timeout, e))
}

/// Reads one frame of operation `op`. `idle`: wait without a limit for the frame to start.
fn read_frame(
    s: &mut TcpStream,
    peer: usize,
    cfg: &TcpConfig,
    op: u8,
    idle: bool,
) -> Result<Vec<u8>> {
    let err = |e| io_err(peer, "receive", cfg.op_timeout, e);
    let mut head = [0u8; 9];
    if idle {
        s.set_read_timeout(None).map_err(err)?;
        s.read_exact(&mut head[..1]).map_err(err)?;
        s.set_read_timeout(Some(cfg.op_timeout)).map_err(err)?;
        s.read_exact(&mut head[1..]).map_err(err)?;
    } else {
        s.set_read_timeout(Some(cfg.op_timeout)).map_err(err)?;
        s.read_exact(&mut head).map_err(err)?;
    }
    if head[0] != op {
        return Err(CollectiveError::Protocol(format!(
            "rank {peer} sent operation {} where {op} was expected (ranks out of step)",
            head[0]
        )));
    }
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).map_err(err)?;
    Ok(payload)
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let cfg = self.cfg;
        self.with_links(|links| match links {
            Links::Leader(peers) => {
                for (i, s) in peers.iter_mut().enumerate() {
                    let b = read_frame(s, i + 1, &cfg, OP_REDUCE, false)?;
                    if b.len() != buf.len() * 4 {
                        return Err(CollectiveError::Protocol(format!(
                            "rank {} reduces {} values, rank 0 {}",
                            i + 1,
                            b.len() / 4,
                            buf.len()
                        )));
                    }
                    for (a, c) in buf.iter_mut().zip(b.chunks_exact(4)) {
                        *a += f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    }
                }
                let out = to_bytes(buf);
                for (i, s) in peers.iter_mut().enumerate() {
                    write_frame(s, i + 1, &cfg, OP_RESULT, &out)?;
                }
                Ok(())
            }
            Links::Follower(s) => {
                write_frame(s, 0, &cfg, OP_REDUCE, &to_bytes(buf))?;
                let b = read_frame(s, 0, &cfg, OP_RESULT, false)?;
                if b.len() != buf.len() * 4 {
                    return Err(CollectiveError::Protocol("reduced size differs".into()));
                }
                buf.copy_from_slice(&from_bytes(&b));
                Ok(())
            }
        })
    }

    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>> {
        let cfg = self.cfg;
        self.with_links(|links| match links {
            Links::Leader(peers) => {
                let mut parts = vec![buf.to_vec()];
                for (i, s) in peers.iter_mut().enumerate() {
                    parts.push(from_bytes(&read_frame(s, i + 1, &cfg, OP_GATHER, false)?));
                }
                // Result: the count of each part, then the parts.
                let mut out = Vec::new();
                for p in &parts {
                    out.extend_from_slice(&(p.len() as u64).to_le_bytes());
                }
                for p in &parts {
                    out.extend_from_slice(&to_bytes(p));
                }
                for (i, s) in peers.iter_mut().enumerate() {
                    write_frame(s, i + 1, &cfg, OP_RESULT, &out)?;
                }
                Ok(parts)
            }
            Links::Follower(s) => {
                write_frame(s, 0, &cfg, OP_GATHER, &to_bytes(buf))?;
                let b = read_frame(s, 0, &cfg, OP_RESULT, false)?;
                let world = self.world;
                let bad = || CollectiveError::Protocol("malformed gather result".into());
                let counts: Vec<usize> = (0..world)
                    .map(|i| {
                        b.get(i * 8..i * 8 + 8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
                            .ok_or_else(bad)
                    })
                    .collect::<Result<_>>()?;
                let mut off = world * 8;
                let mut parts = Vec::with_capacity(world);
                for n in counts {
                    let p = b.get(off..off + n * 4).ok_or_else(bad)?;
                    parts.push(from_bytes(p));
                    off += n * 4;
                }
                Ok(parts)
            }
        })
    }

    fn broadcast(&self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if root >= self.world {
            return Err(CollectiveError::Protocol(format!(
                "broadcast from rank {root} in a group of {}",
                self.world
            )));
        }
        let cfg = self.cfg;
        let rank = self.rank;
        self.with_links(|links| match links {
            Links::Leader(peers) => {
                // A follower's broadcast is relayed through rank 0.
                let data = if root == 0 {
                    bytes
                } else {
                    read_frame(&mut peers[root - 1], root, &cfg, OP_BCAST, false)?
                };
                for (i, s) in peers.iter_mut().enumerate() {
                    if i + 1 != root {
                        write_frame(s, i + 1, &cfg, OP_BCAST, &data)?;
                    }
                }
                Ok(data)
            }
            Links::Follower(s) => {
                if root == rank {
                    write_frame(s, 0, &cfg, OP_BCAST, &bytes)?;
                    Ok(bytes)
                } else {
                    // Waiting for rank 0's next instruction is idling, not a stalled operation.
                    read_frame(s, 0, &cfg, OP_BCAST, root == 0)
                }
            }
        })
    }
}
