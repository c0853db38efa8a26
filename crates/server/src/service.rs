//! The `afnext.v1.AfNext` service and the server around it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afnext_engine::{Engine, Event, RequestHandle, Summary};
use afnext_model::FinishReason;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::ServerConfig;
use crate::convert;
use afnext_telemetry::Instrument;

use crate::metrics::{RequestMetrics, Tracker};
use crate::pb;
use crate::pb::af_next_server::{AfNext, AfNextServer};
use crate::status::engine_status;
use crate::uploads::UploadStore;

pub struct Service {
    engine: Arc<Engine>,
    cfg: ServerConfig,
    uploads: Arc<Mutex<UploadStore>>,
    metrics: Arc<RequestMetrics>,
}

impl Service {
    pub fn new(engine: Arc<Engine>, cfg: ServerConfig, metrics: Arc<RequestMetrics>) -> Self {
        Service {
            metrics,
            uploads: Arc::new(Mutex::new(UploadStore::new(
                cfg.upload_store_bytes,
                cfg.upload_ttl,
            ))),
            engine,
            cfg,
        }
    }

    /// Checks, prepares and submits a request.
    async fn start(
        &self,
        request: Request<pb::GenerateRequest>,
        span: tracing::Span,
    ) -> Result<RequestHandle, Status> {
        let deadline = convert::deadline(request.metadata())?;
        let now = Instant::now();
        let req = convert::generate_request(request.into_inner(), deadline, |id| {
            self.uploads().get(id, now).map(|u| (u.data, u.format_hint))
        })?;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.submit_traced(req, span))
            .await
            .map_err(|e| Status::internal(format!("request preparation failed: {e}")))?
            .map_err(engine_status)
    }

    fn uploads(&self) -> std::sync::MutexGuard<'_, UploadStore> {
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AfNext for Service {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let tracker = self.metrics.track();
        let span = afnext_telemetry::server_span("afnext.v1.AfNext/Generate", request.metadata());
        let r = self
            .start(request, span.clone())
            .instrument(span.clone())
            .await;
        match r {
            Ok(handle) => {
                let (tx, rx) = mpsc::channel(64);
                tokio::spawn(pump_as(handle, tx, tracker, |m| m).instrument(span));
                Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
            }
            Err(s) => {
                let mut tracker = tracker;
                tracker.error(&s);
                Err(s)
            }
        }
    }

    async fn upload_audio(
        &self,
        request: Request<Streaming<pb::UploadAudioRequest>>,
    ) -> Result<Response<pb::UploadAudioResponse>, Status> {
        crate::uploads::receive(request.into_inner(), &self.uploads, &self.cfg).await
    }

    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let e = &self.engine;
        let m = e.model();
        Ok(Response::new(pb::ModelInfo {
            model: self.cfg.model_name.clone(),
            revision: self.cfg.revision.clone(),
            dtype: self.cfg.dtype.clone(),
            device: self.cfg.device.clone(),
            limits: Some(pb::Limits {
                max_audio_seconds: e.max_audio_seconds(),
                max_prompt_tokens: e.max_prompt_tokens() as u32,
                max_new_tokens: e.max_new_tokens_limit() as u32,
                kv_cache_tokens: e.kv_capacity_tokens() as u64,
                max_message_bytes: self.cfg.max_message_bytes as u64,
                max_upload_bytes: self.cfg.max_upload_bytes as u64,
                upload_ttl_seconds: self.cfg.upload_ttl.as_secs(),
                max_in_flight_requests: e.max_in_flight() as u32,
            }),
            vocab_size: m.cfg.text.vocab_size as u32,
            decoder_layers: m.cfg.text.num_hidden_layers as u32,
            decoder_hidden_size: m.cfg.text.hidden_size as u32,
            encoder_layers: m.cfg.audio.num_hidden_layers as u32,
        }))
    }

    async fn get_server_stats(
        &self,
        _: Request<pb::GetServerStatsRequest>,
    ) -> Result<Response<pb::ServerStats>, Status> {
        let s = self.engine.stats();
        let (n, bytes) = {
            let u = self.uploads();
            (u.len(), u.bytes())
        };
        Ok(Response::new(pb::ServerStats {
            running_requests: s.running as u32,
            waiting_requests: s.waiting as u32,
            in_flight_requests: s.in_flight as u32,
            kv_blocks_total: s.kv.total as u32,
            kv_blocks_used: s.kv.used as u32,
            kv_blocks_cached: s.kv.cached as u32,
            kv_blocks_free: s.kv.free as u32,
            kv_block_size_tokens: s.block_size as u32,
            prefix_cache_queries_blocks: s.kv.prefix_queries,
            prefix_cache_hits_blocks: s.kv.prefix_hits,
            prefix_cache_partial_hits_blocks: s.kv.partial_hits,
            prefix_cache_partial_positions: s.kv.partial_positions,
            embedding_cache_hits: s.embeddings.hits,
            embedding_cache_misses: s.embeddings.misses,
            embedding_cache_bytes: s.embeddings.bytes as u64,
            windows_encoded: s.windows_encoded,
            tokens_generated: s.tokens_generated,
            requests_finished: s.requests_finished,
            preemptions: s.preemptions,
            uploads_stored: n as u32,
            uploads_bytes: bytes as u64,
        }))
    }
}

/// Forwards engine events to the client until the last one, or until the client goes away (then dropping
/// the handle cancels the request), recording them in `tracker`. Each message is wrapped by `wrap` (the
/// cluster's decoder service streams them inside its own response type).
pub(crate) async fn pump_as<T>(
    mut h: RequestHandle,
    tx: mpsc::Sender<Result<T, Status>>,
    mut tracker: Tracker,
    wrap: impl Fn(pb::GenerateResponse) -> T,
) {
    use pb::generate_response::Event as E;
    loop {
        let ev = tokio::select! {
            _ = tx.closed() => return,
            ev = h.recv() => ev,
        };
        let (msg, last) = match ev {
            None => (
                Err(Status::internal(
                    "the engine dropped the request without a result",
                )),
                true,
            ),
            Some(Event::EncodeProgress {
                windows_done,
                windows_total,
            }) => (
                Ok(E::Progress(pb::EncodeProgress {
                    windows_done: windows_done as u32,
                    windows_total: windows_total as u32,
                })),
                false,
            ),
            Some(Event::Started {
                prompt_tokens,
                audio_tokens,
                cached_tokens,
            }) => (
                Ok(E::Started(pb::Started {
                    prompt_tokens: prompt_tokens as u32,
                    audio_tokens: audio_tokens as u32,
                    cached_tokens: cached_tokens as u32,
                })),
                false,
            ),
            Some(Event::Delta { text, token_ids }) => {
                (Ok(E::Delta(pb::Delta { text, token_ids })), false)
            }
            Some(Event::Finished(s)) => (Ok(E::Finished(finished(&s))), true),
            Some(Event::Failed(e)) => (Err(engine_status(e)), true),
        };
        let msg = msg.map(|e| pb::GenerateResponse { event: Some(e) });
        match &msg {
            Ok(m) => tracker.event(m),
            Err(s) => tracker.error(s),
        }
        let msg = msg.map(&wrap);
        if tx.send(msg).await.is_err() || last {
            return;
        }
    }
}

fn finished(s: &Summary) -> pb::Finished {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let u = &s.usage;
    let t = &s.timings;
    pb::Finished {
        reason: match s.finish_reason {
            FinishReason::Eos => pb::FinishReason::Stop,
            FinishReason::StopString => pb::FinishReason::StopString,
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::Cancelled => pb::FinishReason::Unspecified,
        } as i32,
        usage: Some(pb::Usage {
            prompt_tokens: u.prompt_tokens as u32,
            audio_tokens: u.audio_tokens as u32,
            cached_tokens: u.cached_tokens as u32,
            completion_tokens: u.completion_tokens as u32,
            audio_seconds: u.audio_seconds,
            audio_cache_hits: u.audio_cache_hits as u32,
        }),
        timings: Some(pb::Timings {
            prepare_ms: ms(t.prepare),
            encode_ms: ms(t.encode),
            queue_ms: ms(t.queue),
            prefill_ms: ms(t.prefill),
            time_to_first_token_ms: ms(t.time_to_first_token),
            total_ms: ms(t.total),
        }),
        preemptions: s.preemptions,
    }
}

/// How a server run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOutcome {
    /// Requests still in flight when the grace period ended (they got UNAVAILABLE).
    pub cancelled_at_shutdown: usize,
}

/// Serves the API, health and reflection on `listener` until `shutdown` resolves; then stops accepting
/// connections, lets in-flight streams finish for the grace period, cancels the rest and returns.
pub async fn serve(
    engine: Arc<Engine>,
    cfg: ServerConfig,
    metrics: Arc<RequestMetrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeOutcome, Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<AfNextServer<Service>>().await;
    // A decoder group that lost a rank serves nothing more: say so, so routers stop sending here.
    {
        let (engine, health) = (engine.clone(), health.clone());
        tokio::spawn(async move {
            while engine.group_lost().is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            health.set_not_serving::<AfNextServer<Service>>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        });
    }
    // Both reflection versions: grpcurl and older tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let max = cfg.max_message_bytes;
    let grace = cfg.grace_period;
    let cfg_internal = cfg.internal_api;
    let tls = cfg.tls.clone();
    let keys = cfg.api_keys.clone();
    let api = AfNextServer::new(Service::new(engine.clone(), cfg, metrics.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let api = tonic::service::interceptor::InterceptedService::new(api, keys);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
    let signal = {
        let engine = engine.clone();
        async move {
            shutdown.await;
            health.set_not_serving::<AfNextServer<Service>>().await;
            // Drain in the background; the server stops accepting as soon as this future returns.
            let task = tokio::task::spawn_blocking(move || engine.shutdown(grace));
            tokio::spawn(async move {
                let n = task.await.unwrap_or(0);
                let _ = drained_tx.send(n);
            });
        }
    };
    let internal = cfg_internal.then(|| {
        crate::cluster_pb::decoder_server::DecoderServer::new(
            crate::decoder_svc::DecoderService::new(engine.clone(), metrics.clone()),
        )
        .max_decoding_message_size(crate::decoder_svc::MAX_WINDOW_MESSAGE)
        .max_encoding_message_size(max)
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        builder = builder.tls_config(t)?;
    }
    builder
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .add_optional_service(internal)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await?;
    let cancelled = drained_rx.await.unwrap_or(0);
    Ok(ServeOutcome {
        cancelled_at_shutdown: cancelled,
    })
}
