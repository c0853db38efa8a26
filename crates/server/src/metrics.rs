//! The metrics of the processes that serve requests (`afnext serve`, decoder group leaders; the router
//! uses [`RequestMetrics`] too): per-request latency histograms, outcomes and errors, and the engine's
//! gauges and counters. Names and meanings: `docs/METRICS.md`.

use std::sync::Arc;
use std::time::Instant;

use afnext_engine::Engine;
use tonic::Status;

use crate::pb;
use crate::pb::generate_response::Event as E;
use crate::prom::{metric, Histogram, LabeledCounter, Probe, LATENCY_BUCKETS};

/// Request-level metrics, recorded from the stream each request sends its client.
#[derive(Debug)]
pub struct RequestMetrics {
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub duration: Histogram,
    pub queue: Histogram,
    /// Finished requests by gRPC code (`OK`, `INVALID_ARGUMENT`, ...).
    pub requests: LabeledCounter,
    /// Failed requests by kind (the gRPC code in snake case).
    pub errors: LabeledCounter,
    pub tokens: std::sync::atomic::AtomicU64,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token: Histogram::new(LATENCY_BUCKETS),
            duration: Histogram::new(LATENCY_BUCKETS),
            queue: Histogram::new(LATENCY_BUCKETS),
            requests: LabeledCounter::default(),
            errors: LabeledCounter::default(),
            tokens: Default::default(),
        }
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, ch)| {
            let sep = (i > 0 && ch.is_uppercase()).then_some('_');
            sep.into_iter().chain(ch.to_uppercase())
        })
        .collect()
}

impl RequestMetrics {
    /// Starts tracking one request (call when it arrives).
    pub fn track(self: &Arc<Self>) -> Tracker {
        Tracker {
            m: self.clone(),
            start: Instant::now(),
            last_token: None,
            done: false,
        }
    }

    /// A request refused before its stream started.
    pub fn rejected(&self, s: &Status) {
        self.requests.inc(&code_name(s.code()));
        self.errors.inc(&code_name(s.code()).to_lowercase());
    }

    pub fn render(&self, out: &mut String) {
        self.requests.render(
            out,
            "afnext_requests_total",
            "code",
            "Requests ended, by gRPC status code.",
        );
        self.errors.render(
            out,
            "afnext_errors_total",
            "kind",
            "Requests that failed, by kind.",
        );
        self.time_to_first_token.render(
            out,
            "afnext_time_to_first_token_seconds",
            "From arrival to the first token.",
        );
        self.inter_token.render(
            out,
            "afnext_inter_token_latency_seconds",
            "Between consecutive streamed tokens of a request.",
        );
        self.duration.render(
            out,
            "afnext_request_duration_seconds",
            "From arrival to the last event, every outcome.",
        );
        self.queue.render(
            out,
            "afnext_queue_time_seconds",
            "From ready (audio encoded) to admission by the scheduler.",
        );
        metric(
            out,
            "afnext_streamed_tokens_total",
            "counter",
            "Tokens streamed to clients.",
            self.tokens.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
}

/// Follows one request's stream.
#[derive(Debug)]
pub struct Tracker {
    m: Arc<RequestMetrics>,
    start: Instant,
    last_token: Option<Instant>,
    done: bool,
}

impl Tracker {
    /// A message sent to the client.
    pub fn event(&mut self, r: &pb::GenerateResponse) {
        let now = Instant::now();
        match &r.event {
            Some(E::Delta(d)) if !d.token_ids.is_empty() => {
                match self.last_token {
                    None => self
                        .m
                        .time_to_first_token
                        .observe(now.duration_since(self.start).as_secs_f64()),
                    Some(t) => self
                        .m
                        .inter_token
                        .observe(now.duration_since(t).as_secs_f64()),
                }
                self.last_token = Some(now);
                self.m.tokens.fetch_add(
                    d.token_ids.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Some(E::Finished(f)) => {
                if let Some(t) = &f.timings {
                    self.m.queue.observe(t.queue_ms / 1e3);
                }
                self.m.requests.inc("OK");
                self.end();
            }
            _ => {}
        }
    }

    /// The stream ended with an error status.
    pub fn error(&mut self, s: &Status) {
        if !self.done {
            self.m.rejected(s);
            self.end();
        }
    }

    fn end(&mut self) {
        self.done = true;
        self.m.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Tracker {
    /// A stream dropped without an end (the client went away) counts as CANCELLED.
    fn drop(&mut self) {
        if !self.done {
            self.error(&Status::cancelled("client went away"));
        }
    }
}

/// The engine's counters and gauges.
pub fn engine_metrics(engine: &Engine, out: &mut String) {
    let s = engine.stats();
    let mut m = |name: &str, kind: &str, help: &str, v: f64| metric(out, name, kind, help, v);
    m(
        "afnext_requests_running",
        "gauge",
        "Requests being decoded.",
        s.running as f64,
    );
    m(
        "afnext_requests_waiting",
        "gauge",
        "Requests waiting for admission.",
        s.waiting as f64,
    );
    m(
        "afnext_requests_in_flight",
        "gauge",
        "Requests accepted and not finished.",
        s.in_flight as f64,
    );
    m(
        "afnext_kv_blocks_total",
        "gauge",
        "KV cache blocks.",
        s.kv.total as f64,
    );
    m(
        "afnext_kv_blocks_used",
        "gauge",
        "KV cache blocks held by requests.",
        s.kv.used as f64,
    );
    m(
        "afnext_kv_blocks_cached",
        "gauge",
        "Free KV blocks holding reusable prefix content.",
        s.kv.cached as f64,
    );
    m(
        "afnext_kv_blocks_free",
        "gauge",
        "Empty KV blocks.",
        s.kv.free as f64,
    );
    m(
        "afnext_prefix_cache_queries_total",
        "counter",
        "Prompt blocks looked up in the prefix cache.",
        s.kv.prefix_queries as f64,
    );
    m(
        "afnext_prefix_cache_hits_total",
        "counter",
        "Prompt blocks found in the prefix cache.",
        s.kv.prefix_hits as f64,
    );
    m(
        "afnext_prefix_cache_partial_hits_total",
        "counter",
        "Cached blocks whose first positions a prompt shared (copied, not recomputed).",
        s.kv.partial_hits as f64,
    );
    m(
        "afnext_prefix_cache_partial_positions_total",
        "counter",
        "Prompt positions copied from partly shared cached blocks.",
        s.kv.partial_positions as f64,
    );
    m(
        "afnext_embedding_cache_hits_total",
        "counter",
        "Audio parts served from the embedding cache.",
        s.embeddings.hits as f64,
    );
    m(
        "afnext_embedding_cache_misses_total",
        "counter",
        "Audio parts looked up and not found (then encoded, or refused as bad audio).",
        s.embeddings.misses as f64,
    );
    m(
        "afnext_embedding_cache_bytes",
        "gauge",
        "Bytes of cached audio embeddings.",
        s.embeddings.bytes as f64,
    );
    m(
        "afnext_windows_encoded_total",
        "counter",
        "30 s audio windows run through the encoder.",
        s.windows_encoded as f64,
    );
    m(
        "afnext_tokens_generated_total",
        "counter",
        "Tokens generated.",
        s.tokens_generated as f64,
    );
    m(
        "afnext_requests_finished_total",
        "counter",
        "Requests that finished normally.",
        s.requests_finished as f64,
    );
    m(
        "afnext_preemptions_total",
        "counter",
        "Sequences preempted for KV memory.",
        s.preemptions as f64,
    );
    m(
        "afnext_audio_seconds_received_total",
        "counter",
        "Seconds of audio in accepted requests.",
        s.audio_seconds,
    );
    let ratio = |hits: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    };
    m(
        "afnext_prefix_cache_hit_ratio",
        "gauge",
        "Prefix-cache hits over lookups (blocks), since start.",
        ratio(s.kv.prefix_hits, s.kv.prefix_queries),
    );
    m(
        "afnext_embedding_cache_hit_ratio",
        "gauge",
        "Embedding-cache hits over lookups (audio parts), since start.",
        ratio(s.embeddings.hits, s.embeddings.hits + s.embeddings.misses),
    );
}

/// `/metrics`, `/live`, `/ready` of a process with an engine (serve, decoder leader).
pub struct EngineProbe {
    pub engine: Arc<Engine>,
    pub requests: Arc<RequestMetrics>,
    /// Extra readiness (registered in etcd); ready without it.
    pub registered: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl Probe for EngineProbe {
    fn metrics(&self) -> String {
        let mut out = String::new();
        engine_metrics(&self.engine, &mut out);
        self.requests.render(&mut out);
        out
    }
    fn live(&self) -> Result<(), String> {
        // A group that lost a rank must be restarted: it is not live.
        match self.engine.group_lost() {
            None => Ok(()),
            Some(r) => Err(format!("decoder group lost: {r}")),
        }
    }
    fn ready(&self) -> Result<(), String> {
        if !self.engine.is_accepting() {
            return Err("not accepting requests (shutting down or group lost)".into());
        }
        match &self.registered {
            Some(r) if !r() => Err("not registered in etcd yet".into()),
            _ => Ok(()),
        }
    }
}
