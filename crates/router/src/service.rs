//! The public `afnext.v1.AfNext` API on the router: the same RPCs as `afnext serve`, served by the cluster.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use afnext_prompt::PromptProcessor;
use afnext_server::pb::af_next_client::AfNextClient;
use afnext_server::pb::af_next_server::AfNext;
use afnext_server::status::{engine_status, ApiError};
use afnext_server::uploads::UploadStore;
use afnext_server::{convert, pb, ServerConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use afnext_telemetry::Instrument;

use crate::dispatch::Dispatcher;
use crate::pool::Tier;

/// The router's own metrics (the members and retries come from the dispatcher).
#[derive(Debug, Default)]
pub struct RouterMetrics {
    pub requests: Arc<afnext_server::metrics::RequestMetrics>,
    pub audio_seconds: afnext_server::prom::FloatCounter,
}

/// `/metrics`, `/live`, `/ready` of a router.
pub struct RouterProbe {
    pub metrics: Arc<RouterMetrics>,
    pub dispatcher: Arc<Dispatcher>,
}

impl afnext_server::prom::Probe for RouterProbe {
    fn metrics(&self) -> String {
        use afnext_server::prom::metric;
        use std::sync::atomic::Ordering;
        let mut out = String::new();
        self.metrics.requests.render(&mut out);
        metric(
            &mut out,
            "afnext_audio_seconds_received_total",
            "counter",
            "Seconds of audio in requests the router prepared.",
            self.metrics.audio_seconds.get(),
        );
        let st = &self.dispatcher.stats;
        for (name, help, v) in [
            (
                "afnext_router_windows_sent_total",
                "Windows sent to encoder workers (first tries).",
                &st.windows_sent,
            ),
            (
                "afnext_router_window_retries_total",
                "Window sends that failed or timed out and were retried.",
                &st.window_retries,
            ),
            (
                "afnext_router_decoder_retries_total",
                "Requests moved to another decoder group before their first token.",
                &st.decoder_retries,
            ),
        ] {
            metric(
                &mut out,
                name,
                "counter",
                help,
                v.load(Ordering::Relaxed) as f64,
            );
        }
        let pool = &self.dispatcher.pool;
        out.push_str("# HELP afnext_router_members Workers known to the router.\n");
        out.push_str("# TYPE afnext_router_members gauge\n");
        for (tier, name) in [(Tier::Decoder, "decoder"), (Tier::Encoder, "encoder")] {
            let all = pool.members(tier).len();
            let healthy = pool.healthy(tier, &[]).len();
            out.push_str(&format!(
                "afnext_router_members{{tier=\"{name}\",state=\"healthy\"}} {healthy}\n\
                 afnext_router_members{{tier=\"{name}\",state=\"down\"}} {}\n",
                all - healthy
            ));
        }
        out
    }
    fn live(&self) -> Result<(), String> {
        Ok(())
    }
    fn ready(&self) -> Result<(), String> {
        if self.dispatcher.pool.healthy(Tier::Decoder, &[]).is_empty() {
            return Err("no healthy decoder group".into());
        }
        Ok(())
    }
}

pub struct RouterService {
    proc: Arc<PromptProcessor>,
    dispatcher: Arc<Dispatcher>,
    cfg: ServerConfig,
    uploads: Arc<Mutex<UploadStore>>,
    metrics: Arc<RouterMetrics>,
}

impl RouterService {
    pub fn new(
        proc: Arc<PromptProcessor>,
        dispatcher: Arc<Dispatcher>,
        cfg: ServerConfig,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        RouterService {
            metrics,
            uploads: Arc::new(Mutex::new(UploadStore::new(
                cfg.upload_store_bytes,
                cfg.upload_ttl,
            ))),
            proc,
            dispatcher,
            cfg,
        }
    }

    /// Converts and prepares a request (audio decoding and tokenization on the blocking pool).
    async fn prepare(
        &self,
        inner: pb::GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<crate::prepare::Prepared, Status> {
        let sampling = inner.sampling.unwrap_or_default();
        let now = Instant::now();
        let req = convert::generate_request(inner, deadline, |id| {
            self.uploads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id, now)
                .map(|u| (u.data, u.format_hint))
        })?;
        let proc = self.proc.clone();
        tokio::task::spawn_blocking(move || crate::prepare::prepare(&proc, req, sampling))
            .await
            .map_err(|e| Status::internal(format!("request preparation failed: {e}")))?
            .map_err(engine_status)
    }

    /// A public-API client of a healthy decoder group (model information and statistics come from them).
    async fn decoder_api(
        &self,
        addr: &str,
    ) -> Result<AfNextClient<tonic::transport::Channel>, Status> {
        Ok(AfNextClient::new(self.dispatcher.channel(addr).await?))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AfNext for RouterService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let mut tracker = self.metrics.requests.track();
        let span = afnext_telemetry::server_span("afnext.v1.AfNext/Generate", request.metadata());
        let session = request.get_ref().session_id.clone();
        let deadline = match convert::deadline(request.metadata()) {
            Ok(d) => d,
            Err(e) => {
                let s = Status::from(e);
                tracker.error(&s);
                return Err(s);
            }
        };
        let prepared = match self
            .prepare(request.into_inner(), deadline)
            .instrument(span.clone())
            .await
        {
            Ok(p) => p,
            Err(s) => {
                tracker.error(&s);
                return Err(s);
            }
        };
        let seconds: f64 = prepared.submit.audios.iter().map(|a| a.seconds).sum();
        self.metrics.audio_seconds.add(seconds);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(
            self.dispatcher
                .clone()
                .run(prepared, session, deadline, tx, tracker)
                .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_audio(
        &self,
        request: Request<Streaming<pb::UploadAudioRequest>>,
    ) -> Result<Response<pb::UploadAudioResponse>, Status> {
        afnext_server::uploads::receive(request.into_inner(), &self.uploads, &self.cfg).await
    }

    /// A decoder group's answer, with the router's own message and upload limits.
    async fn get_model_info(
        &self,
        r: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let pool = &self.dispatcher.pool;
        let addr = pool
            .healthy(Tier::Decoder, &[])
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Unavailable("no decoder group is available".into()))?;
        let mut info = self
            .decoder_api(&addr)
            .await?
            .get_model_info(r.into_inner())
            .await?
            .into_inner();
        if let Some(l) = info.limits.as_mut() {
            l.max_message_bytes = self.cfg.max_message_bytes as u64;
            l.max_upload_bytes = self.cfg.max_upload_bytes as u64;
            l.upload_ttl_seconds = self.cfg.upload_ttl.as_secs();
        }
        Ok(Response::new(info))
    }

    /// The sum over every healthy decoder group, plus the router's uploads.
    async fn get_server_stats(
        &self,
        _: Request<pb::GetServerStatsRequest>,
    ) -> Result<Response<pb::ServerStats>, Status> {
        let mut t = pb::ServerStats::default();
        for addr in self.dispatcher.pool.healthy(Tier::Decoder, &[]) {
            let Ok(mut c) = self.decoder_api(&addr).await else {
                continue;
            };
            let Ok(s) = c.get_server_stats(pb::GetServerStatsRequest {}).await else {
                continue;
            };
            let s = s.into_inner();
            t.running_requests += s.running_requests;
            t.waiting_requests += s.waiting_requests;
            t.in_flight_requests += s.in_flight_requests;
            t.kv_blocks_total += s.kv_blocks_total;
            t.kv_blocks_used += s.kv_blocks_used;
            t.kv_blocks_cached += s.kv_blocks_cached;
            t.kv_blocks_free += s.kv_blocks_free;
            t.kv_block_size_tokens = s.kv_block_size_tokens;
            t.prefix_cache_queries_blocks += s.prefix_cache_queries_blocks;
            t.prefix_cache_hits_blocks += s.prefix_cache_hits_blocks;
            t.prefix_cache_partial_hits_blocks += s.prefix_cache_partial_hits_blocks;
            t.prefix_cache_partial_positions += s.prefix_cache_partial_positions;
            t.embedding_cache_hits += s.embedding_cache_hits;
            t.embedding_cache_misses += s.embedding_cache_misses;
            t.embedding_cache_bytes += s.embedding_cache_bytes;
            t.windows_encoded += s.windows_encoded;
            t.tokens_generated += s.tokens_generated;
            t.requests_finished += s.requests_finished;
            t.preemptions += s.preemptions;
        }
        let u = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        t.uploads_stored = u.len() as u32;
        t.uploads_bytes = u.bytes() as u64;
        Ok(Response::new(t))
    }
}
