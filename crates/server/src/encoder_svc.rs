//! `afnext.cluster.v1.Encoder` on an encoder worker: windows from any number of requests are batched into
//! one encoder forward (front end, encoder, RoTE, projector), and each window's embeddings are pushed
//! straight to the decoder group leader that owns its request.
//!
//! One thread owns the model and takes up to `batch` queued windows at a time; a window whose caller has
//! gone (the router cancelled or retried elsewhere) is dropped before it is computed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afnext_audio::Frontend;
use afnext_model::AudioTower;
use candle_core::{Device, Tensor};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cluster_pb::decoder_client::DecoderClient;
use crate::cluster_pb::encoder_server::Encoder;
use crate::cluster_pb::{self as cpb};
use afnext_telemetry::Instrument;

use crate::links::Links;
use crate::prom::{metric, Histogram, Probe, BATCH_BUCKETS, LATENCY_BUCKETS};
use crate::status::ApiError;

/// Encoder worker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Windows per encoder forward.
    pub batch: usize,
    /// Windows waiting beyond the one being computed; more get RESOURCE_EXHAUSTED.
    pub max_queued_windows: usize,
    /// Longest wait for a decoder to take a window's embeddings.
    pub push_timeout: Duration,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            batch: 8,
            max_queued_windows: 512,
            push_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of an encoder worker (for statistics and metrics).
#[derive(Debug)]
pub struct EncoderStats {
    pub windows_encoded: AtomicU64,
    pub batches: AtomicU64,
    /// Windows queued and not yet taken by the model thread.
    pub queued: AtomicUsize,
    pub windows_dropped: AtomicU64,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
}

impl Default for EncoderStats {
    fn default() -> Self {
        EncoderStats {
            windows_encoded: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            windows_dropped: AtomicU64::new(0),
            batch_size: Histogram::new(BATCH_BUCKETS),
            batch_seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl EncoderStats {
    pub fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        metric(
            out,
            "afnext_encoder_windows_total",
            "counter",
            "Windows encoded by this worker.",
            get(&self.windows_encoded),
        );
        metric(
            out,
            "afnext_encoder_batches_total",
            "counter",
            "Encoder forwards.",
            get(&self.batches),
        );
        metric(
            out,
            "afnext_encoder_windows_dropped_total",
            "counter",
            "Queued windows dropped because their caller went away.",
            get(&self.windows_dropped),
        );
        metric(
            out,
            "afnext_encoder_queue_depth",
            "gauge",
            "Windows waiting for the model.",
            self.queued.load(Ordering::SeqCst) as f64,
        );
        self.batch_size.render(
            out,
            "afnext_encoder_batch_size",
            "Windows per encoder forward.",
        );
        self.batch_seconds.render(
            out,
            "afnext_encoder_batch_seconds",
            "Time of one encoder forward (front end, encoder, RoTE, projector).",
        );
    }
}

/// `/metrics`, `/live`, `/ready` of an encoder worker.
pub struct EncoderProbe {
    pub stats: Arc<EncoderStats>,
    /// Registered in etcd (ready without it when discovery is off).
    pub registered: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Probe for EncoderProbe {
    fn metrics(&self) -> String {
        let mut out = String::new();
        self.stats.render(&mut out);
        out
    }
    fn live(&self) -> Result<(), String> {
        Ok(())
    }
    fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining".into());
        }
        match &self.registered {
            Some(r) if !r() => Err("not registered in etcd yet".into()),
            _ => Ok(()),
        }
    }
}

struct WindowJob {
    index: usize,
    samples: Vec<f32>,
    done: oneshot::Sender<Result<Tensor, String>>,
}

pub struct EncoderService {
    jobs: Mutex<std_mpsc::Sender<WindowJob>>,
    cfg: EncoderConfig,
    window_samples: usize,
    stats: Arc<EncoderStats>,
    links: Links,
    clients: Mutex<HashMap<String, DecoderClient<Channel>>>,
}

impl EncoderService {
    /// Starts the model thread.
    pub fn start(tower: AudioTower, frontend: Frontend, cfg: EncoderConfig, links: Links) -> Self {
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(EncoderStats::default());
        let window_samples = frontend.config().window_samples();
        let (st, batch) = (stats.clone(), cfg.batch.max(1));
        std::thread::Builder::new()
            .name("afnext-encoder".into())
            .spawn(move || model_loop(tower, frontend, batch, rx, st))
            .expect("spawn the encoder thread");
        EncoderService {
            jobs: Mutex::new(tx),
            cfg,
            window_samples,
            stats,
            links,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn stats(&self) -> Arc<EncoderStats> {
        self.stats.clone()
    }

    async fn client(&self, addr: &str) -> Result<DecoderClient<Channel>, Status> {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            return Ok(c.clone());
        }
        let ch = self
            .links
            .channel(addr)
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach decoder {addr}: {e}")))?;
        let c = DecoderClient::new(ch)
            .max_encoding_message_size(crate::decoder_svc::MAX_WINDOW_MESSAGE);
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

fn model_loop(
    tower: AudioTower,
    frontend: Frontend,
    batch: usize,
    rx: std_mpsc::Receiver<WindowJob>,
    stats: Arc<EncoderStats>,
) {
    let wl = frontend.window_len();
    let cfg = frontend.config().clone();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        stats.queued.fetch_sub(jobs.len(), Ordering::SeqCst);
        let before = jobs.len();
        jobs.retain(|j| !j.done.is_closed());
        stats
            .windows_dropped
            .fetch_add((before - jobs.len()) as u64, Ordering::Relaxed);
        if jobs.is_empty() {
            continue;
        }
        let mut feats = vec![0f32; jobs.len() * wl];
        let mut valid = Vec::with_capacity(jobs.len());
        let mut failed = vec![None; jobs.len()];
        for (i, (j, out)) in jobs.iter().zip(feats.chunks_mut(wl)).enumerate() {
            match frontend.window_features(&j.samples, out) {
                Ok(v) => valid.push(v),
                Err(e) => {
                    failed[i] = Some(e.to_string());
                    valid.push(cfg.frames_per_window());
                }
            }
        }
        let idx: Vec<usize> = jobs.iter().map(|j| j.index).collect();
        let t0 = std::time::Instant::now();
        let result = Tensor::from_vec(
            feats,
            (jobs.len(), cfg.n_mels, cfg.frames_per_window()),
            &Device::Cpu,
        )
        .map_err(|e| e.to_string())
        .and_then(|x| {
            tower
                .encode_windows(&x, &valid, &idx)
                .map_err(|e| e.to_string())
        });
        stats
            .windows_encoded
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.batch_size.observe(jobs.len() as f64);
        stats.batch_seconds.observe(t0.elapsed().as_secs_f64());
        for (i, (j, f)) in jobs.into_iter().zip(failed).enumerate() {
            let r = match (&result, f) {
                (_, Some(e)) => Err(e),
                (Err(e), _) => Err(e.clone()),
                (Ok(st), None) => st
                    .projected
                    .get(i)
                    .and_then(|p| p.narrow(0, 0, st.tokens[i]))
                    .map_err(|e| e.to_string()),
            };
            let _ = j.done.send(r);
        }
    }
}

fn bad(location: String, problem: String) -> Status {
    ApiError::BadRequest { location, problem }.into()
}

#[tonic::async_trait]
impl Encoder for EncoderService {
    async fn encode(
        &self,
        request: Request<cpb::EncodeRequest>,
    ) -> Result<Response<cpb::EncodeResponse>, Status> {
        let span =
            afnext_telemetry::server_span("afnext.cluster.v1.Encoder/Encode", request.metadata());
        let r = request.into_inner();
        self.encode_in(r, &span).instrument(span.clone()).await
    }
}

impl EncoderService {
    async fn encode_in(
        &self,
        r: cpb::EncodeRequest,
        span: &tracing::Span,
    ) -> Result<Response<cpb::EncodeResponse>, Status> {
        if r.decoder.is_empty() {
            return Err(bad("decoder".into(), "is empty".into()));
        }
        if r.windows.is_empty() {
            return Err(bad("windows".into(), "no window to encode".into()));
        }
        for w in &r.windows {
            let loc = format!("window {}", w.index);
            if w.samples.is_empty() || w.samples.len() > self.window_samples {
                return Err(bad(
                    loc,
                    format!(
                        "has {} samples; 1 to {} expected",
                        w.samples.len(),
                        self.window_samples
                    ),
                ));
            }
            if let Err(e) = afnext_audio::check_finite(&w.samples) {
                return Err(bad(loc, e.to_string()));
            }
        }
        let queued = self.stats.queued.load(Ordering::SeqCst);
        if queued + r.windows.len() > self.cfg.max_queued_windows {
            return Err(Status::resource_exhausted(format!(
                "the encoder has {queued} windows queued, the limit is {}",
                self.cfg.max_queued_windows
            )));
        }
        let mut waits = Vec::with_capacity(r.windows.len());
        for w in r.windows {
            let (tx, rx) = oneshot::channel();
            self.stats.queued.fetch_add(1, Ordering::SeqCst);
            let job = WindowJob {
                index: w.index as usize,
                samples: w.samples,
                done: tx,
            };
            if self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(job)
                .is_err()
            {
                return Err(Status::unavailable("the encoder thread stopped"));
            }
            waits.push((w.index, rx));
        }
        let mut client = self.client(&r.decoder).await?;
        let n = waits.len() as u32;
        for (index, rx) in waits {
            let rows = rx
                .await
                .map_err(|_| Status::internal("the encoder thread dropped a window"))?
                .map_err(|e| Status::internal(format!("encoding window {index} failed: {e}")))?;
            let push = crate::wire::push_request(r.request_id, r.audio, index, &rows)
                .map_err(|e| Status::internal(e.to_string()))?;
            let mut req = Request::new(push);
            req.set_timeout(self.cfg.push_timeout);
            afnext_telemetry::inject(span, req.metadata_mut());
            client.push_window(req).await.map_err(|s| {
                Status::new(
                    if s.code() == tonic::Code::InvalidArgument {
                        tonic::Code::Internal
                    } else {
                        tonic::Code::Unavailable
                    },
                    format!(
                        "decoder {} refused window {index}: {}",
                        r.decoder,
                        s.message()
                    ),
                )
            })?;
        }
        Ok(Response::new(cpb::EncodeResponse {
            windows_delivered: n,
        }))
    }
}
