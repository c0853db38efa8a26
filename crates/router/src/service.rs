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

use crate::dispatch::Dispatcher;
use crate::pool::Tier;

pub struct RouterService {
    proc: Arc<PromptProcessor>,
    dispatcher: Arc<Dispatcher>,
    cfg: ServerConfig,
    uploads: Arc<Mutex<UploadStore>>,
}

impl RouterService {
    pub fn new(proc: Arc<PromptProcessor>, dispatcher: Arc<Dispatcher>, cfg: ServerConfig) -> Self {
        RouterService {
            uploads: Arc::new(Mutex::new(UploadStore::new(
                cfg.upload_store_bytes,
                cfg.upload_ttl,
            ))),
            proc,
            dispatcher,
            cfg,
        }
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
        let deadline = convert::deadline(request.metadata())?;
        let inner = request.into_inner();
        let session = inner.session_id.clone();
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
        let prepared =
            tokio::task::spawn_blocking(move || crate::prepare::prepare(&proc, req, sampling))
                .await
                .map_err(|e| Status::internal(format!("request preparation failed: {e}")))?
                .map_err(engine_status)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.dispatcher.clone().run(prepared, session, deadline, tx));
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
