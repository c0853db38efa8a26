//! One request through the cluster: hand the prepared prompt to a decoder group, fan the windows it needs
//! out to the encoder workers (each window to one encoder, all at once), relay the group's events.
//!
//! Faults: a window whose encoder fails or takes longer than `window_timeout` is sent to another encoder
//! (up to `window_attempts` tries); a decoder group that is unreachable or fails before any token was
//! streamed is replaced by another group (up to `decoder_attempts`); after a token, its error reaches the
//! client. A client that goes away drops the decoder stream (the group cancels the request and frees its
//! blocks) and aborts the window calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afnext_server::cluster_pb::decoder_client::DecoderClient;
use afnext_server::cluster_pb::encoder_client::EncoderClient;
use afnext_server::cluster_pb::{self as cpb, submit_response::Event as SE};
use afnext_server::links::Links;
use afnext_server::metrics::Tracker;
use afnext_server::pb;
use afnext_telemetry::Instrument;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::config::RouterConfig;
use crate::pool::{Pool, Tier};
use crate::prepare::Prepared;

type Tx = mpsc::Sender<Result<pb::GenerateResponse, Status>>;

/// The client's stream, recording what it is sent.
struct Relay<'a> {
    tx: Tx,
    tracker: Mutex<&'a mut Tracker>,
}

impl Relay<'_> {
    async fn send(&self, m: Result<pb::GenerateResponse, Status>) -> Result<(), ()> {
        {
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            match &m {
                Ok(g) => t.event(g),
                Err(s) => t.error(s),
            }
        }
        self.tx.send(m).await.map_err(drop)
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

enum Outcome {
    Done,
    /// The group failed before streaming a token: try another.
    Retry(Status),
}

/// Statuses that say "this worker cannot serve now", not "this request is bad".
fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Aborted)
}

/// Counters of the router's retries.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub windows_sent: AtomicU64,
    pub window_retries: AtomicU64,
    pub decoder_retries: AtomicU64,
}

pub struct Dispatcher {
    pub pool: Arc<Pool>,
    pub stats: DispatchStats,
    links: Links,
    cfg: RouterConfig,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Dispatcher {
    pub fn new(pool: Arc<Pool>, links: Links, cfg: RouterConfig) -> Self {
        Dispatcher {
            pool,
            stats: DispatchStats::default(),
            links,
            cfg,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub async fn channel(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(c) = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            return Ok(c.clone());
        }
        let c = self
            .links
            .channel(addr)
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Drops a cached connection (after a transport failure, so the next call reconnects).
    pub fn forget(&self, addr: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }

    /// Serves one prepared request, streaming its events (or its error) into `tx`.
    pub async fn run(
        self: Arc<Self>,
        p: Prepared,
        session: String,
        deadline: Option<Instant>,
        tx: Tx,
        mut tracker: Tracker,
    ) {
        let tx = &Relay {
            tx,
            tracker: Mutex::new(&mut tracker),
        };
        let mut tried = Vec::new();
        let mut last = None;
        for _ in 0..self.cfg.decoder_attempts.max(1) {
            let Some(lease) = self.pool.pick(Tier::Decoder, Some(&session), &tried) else {
                break;
            };
            tried.push(lease.addr.clone());
            match self.attempt(&lease.addr, &p, deadline, tx).await {
                Outcome::Done => return,
                Outcome::Retry(st) => {
                    self.stats.decoder_retries.fetch_add(1, Ordering::Relaxed);
                    self.pool.failed(Tier::Decoder, &lease.addr);
                    self.forget(&lease.addr);
                    last = Some(st);
                }
            }
        }
        let st = match last {
            Some(st) => Status::unavailable(format!(
                "no decoder group could take the request (tried {}): {}",
                tried.join(", "),
                st.message()
            )),
            None => Status::unavailable("no decoder group is registered"),
        };
        let _ = tx.send(Err(st)).await;
    }

    async fn attempt(
        self: &Arc<Self>,
        dec: &str,
        p: &Prepared,
        deadline: Option<Instant>,
        tx: &Relay<'_>,
    ) -> Outcome {
        let ch = match self.channel(dec).await {
            Ok(c) => c,
            Err(st) => return Outcome::Retry(st),
        };
        let mut client = DecoderClient::new(ch);
        let mut req = Request::new(p.submit.clone());
        if let Some(d) = deadline {
            req.set_timeout(d.saturating_duration_since(Instant::now()));
        }
        let span = tracing::Span::current();
        afnext_telemetry::inject(&span, req.metadata_mut());
        let mut stream = match client.submit(req).await {
            Ok(r) => r.into_inner(),
            Err(st) if retryable(&st) => return Outcome::Retry(st),
            Err(st) => {
                let _ = tx.send(Err(st)).await;
                return Outcome::Done;
            }
        };
        let accepted = match stream.message().await {
            Ok(Some(cpb::SubmitResponse {
                event: Some(SE::Accepted(a)),
            })) => a,
            Ok(_) => {
                let _ = tx
                    .send(Err(Status::internal(format!(
                        "decoder {dec} did not accept the request first"
                    ))))
                    .await;
                return Outcome::Done;
            }
            Err(st) if retryable(&st) => return Outcome::Retry(st),
            Err(st) => {
                let _ = tx.send(Err(st)).await;
                return Outcome::Done;
            }
        };
        let mut encodes = JoinSet::new();
        for (ai, (audio, &needed)) in p.audios.iter().zip(&accepted.needed).enumerate() {
            if !needed {
                continue;
            }
            for w in &audio.windows {
                self.stats.windows_sent.fetch_add(1, Ordering::Relaxed);
                let samples = audio.samples[w.start..w.start + w.len].to_vec();
                let window = tracing::info_span!(
                    parent: &span,
                    "window",
                    otel.name = "router.window",
                    audio = ai,
                    window = w.index
                );
                encodes.spawn(
                    self.clone()
                        .encode_window(
                            dec.to_string(),
                            accepted.request_id,
                            ai as u32,
                            w.index as u32,
                            samples,
                            deadline,
                        )
                        .instrument(window),
                );
            }
        }
        let mut streamed = false;
        loop {
            tokio::select! {
                _ = tx.closed() => return Outcome::Done,
                Some(r) = encodes.join_next(), if !encodes.is_empty() => {
                    let err = match r {
                        Ok(Ok(())) => continue,
                        Ok(Err(st)) => st,
                        Err(e) => Status::internal(format!("window task failed: {e}")),
                    };
                    let _ = tx.send(Err(err)).await;
                    return Outcome::Done;
                }
                m = stream.message() => match m {
                    Ok(Some(cpb::SubmitResponse { event: Some(SE::Generate(g)) })) => {
                        streamed |= matches!(g.event, Some(pb::generate_response::Event::Delta(_)));
                        if tx.send(Ok(g)).await.is_err() {
                            return Outcome::Done;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Outcome::Done,
                    Err(st) if !streamed && retryable(&st) => return Outcome::Retry(st),
                    Err(st) => {
                        let _ = tx.send(Err(st)).await;
                        return Outcome::Done;
                    }
                },
            }
        }
    }

    /// Encodes one window on some encoder and has it delivered to `dec`, retrying on other encoders.
    async fn encode_window(
        self: Arc<Self>,
        dec: String,
        request_id: u64,
        audio: u32,
        index: u32,
        samples: Vec<f32>,
        deadline: Option<Instant>,
    ) -> Result<(), Status> {
        let attempts = self.cfg.window_attempts.max(1);
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        for _ in 0..attempts {
            let lease = match self.pool.pick(Tier::Encoder, None, &tried) {
                Some(l) => l,
                // Every encoder tried once: start over rather than give up early.
                None if !tried.is_empty() => {
                    tried.clear();
                    match self.pool.pick(Tier::Encoder, None, &tried) {
                        Some(l) => l,
                        None => break,
                    }
                }
                None => break,
            };
            tried.push(lease.addr.clone());
            let mut timeout = self.cfg.window_timeout;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Status::deadline_exceeded(
                        "the request's deadline passed while its audio was encoded",
                    ));
                }
                timeout = timeout.min(left);
            }
            let ch = match self.channel(&lease.addr).await {
                Ok(c) => c,
                Err(st) => {
                    self.pool.failed(Tier::Encoder, &lease.addr);
                    last = Some(st.message().to_string());
                    continue;
                }
            };
            let mut client = EncoderClient::new(ch).max_encoding_message_size(64 << 20);
            let mut req = Request::new(cpb::EncodeRequest {
                decoder: dec.clone(),
                request_id,
                audio,
                windows: vec![cpb::Window {
                    index,
                    samples: samples.clone(),
                }],
            });
            req.set_timeout(timeout);
            afnext_telemetry::inject(&tracing::Span::current(), req.metadata_mut());
            let call =
                tokio::time::timeout(timeout + Duration::from_millis(200), client.encode(req));
            match call.await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(st)) if st.code() == Code::InvalidArgument => return Err(st),
                Ok(Err(st)) => {
                    self.stats.window_retries.fetch_add(1, Ordering::Relaxed);
                    self.pool.failed(Tier::Encoder, &lease.addr);
                    if retryable(&st) {
                        self.forget(&lease.addr);
                    }
                    last = Some(format!("{}: {}", lease.addr, st.message()));
                }
                Err(_) => {
                    self.stats.window_retries.fetch_add(1, Ordering::Relaxed);
                    self.pool.failed(Tier::Encoder, &lease.addr);
                    last = Some(format!("{}: no answer within {timeout:?}", lease.addr));
                }
            }
        }
        Err(Status::unavailable(match last {
            Some(l) => format!(
                "window {index} of audio {audio} could not be encoded ({attempts} tries); last: {l}"
            ),
            None => "no encoder worker is registered".to_string(),
        }))
    }
}
