//! `afnext serve`: the embedded server. Front end, encoder, decoder and the gRPC API in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use afnext_engine::{Engine, EngineConfig, SchedulerConfig};
use afnext_model::config::GenerationDefaults;
use afnext_model::AfNext;
use afnext_prompt::PromptProcessor;
use afnext_server::ServerConfig;
use anyhow::{Context, Result};
use clap::Args;

use crate::model_args::ModelArgs;

const MIB: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Memory for the paged KV cache, MiB.
    #[arg(long, default_value_t = 2048)]
    pub kv_cache_mib: usize,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Positions computed per step over all requests (the continuous-batching budget).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Requests decoded at once.
    #[arg(long, default_value_t = 32)]
    pub max_running: usize,
    /// Requests waiting beyond the running ones; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Largest prefill chunk of one request per step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Memory for cached audio embeddings, MiB.
    #[arg(long, default_value_t = 512)]
    pub embedding_cache_mib: usize,
    /// Windows per encoder forward.
    #[arg(long, default_value_t = 4)]
    pub encoder_batch: usize,
    /// In a cluster, wait for all of a request's audio windows before prefilling any (to measure what
    /// streaming prefill saves).
    #[arg(long)]
    pub no_streaming_prefill: bool,
    /// Largest max_new_tokens a request may ask for (default: generation_config.json's max_new_tokens).
    #[arg(long)]
    pub max_new_tokens_limit: Option<usize>,
    /// Largest prompt in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
}

/// The public API's address, limits, TLS and keys (`afnext serve`, decoder leaders and the router).
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// OTLP/gRPC endpoint for traces (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_ENDPOINT; off when none is set). OTEL_SERVICE_NAME names the process.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub tls: crate::tls_args::TlsArgs,
    #[command(flatten)]
    pub keys: crate::tls_args::KeyArgs,
    /// gRPC address (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// HTTP address for /metrics, /live and /ready (off when absent).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds in-flight streams may run after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub grace_period_s: u64,
    /// Largest request message (inline audio included), MiB.
    #[arg(long, default_value_t = 64)]
    pub max_message_mib: usize,
    /// Largest single audio upload, MiB.
    #[arg(long, default_value_t = 512)]
    pub max_upload_mib: usize,
    /// Memory for pending uploads, MiB.
    #[arg(long, default_value_t = 2048)]
    pub upload_store_mib: usize,
    /// Seconds an upload stays usable.
    #[arg(long, default_value_t = 3600)]
    pub upload_ttl_s: u64,
}

impl ApiArgs {
    pub fn server_config(&self, model: &ModelArgs, internal_api: bool) -> Result<ServerConfig> {
        Ok(ServerConfig {
            max_message_bytes: self.max_message_mib * MIB,
            max_upload_bytes: self.max_upload_mib * MIB,
            upload_store_bytes: self.upload_store_mib * MIB,
            upload_ttl: Duration::from_secs(self.upload_ttl_s),
            grace_period: Duration::from_secs(self.grace_period_s),
            model_name: model.model.clone(),
            revision: model.revision.clone().unwrap_or_default(),
            device: model.device.clone(),
            dtype: format!("{:?}", model.dtype).to_lowercase(),
            internal_api,
            tls: self.tls.files().server().context("TLS of the listener")?,
            api_keys: self.keys.keys()?,
        })
    }
}

impl ServeArgs {
    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: self.max_batch_tokens,
                max_running: self.max_running,
                max_waiting: self.max_waiting,
                prefill_chunk: self.prefill_chunk,
            },
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_mib * MIB,
            embedding_cache_bytes: self.embedding_cache_mib * MIB,
            encoder_batch: self.encoder_batch,
            max_new_tokens_limit: self.max_new_tokens_limit,
            max_prompt_tokens: self.max_prompt_tokens,
            frontend_threads: 1,
            streaming_prefill: !self.no_streaming_prefill,
        }
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let _telemetry = afnext_telemetry::init("serve", args.api.otlp_endpoint.as_deref())?;
    let dir = args.model.resolve()?;
    let (cfg, w) = args.model.weights(&dir)?;
    let model = AfNext::from_weights(cfg, &w)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    run_with(args, &dir, model, None)
}

/// How a decoder group leader joins its cluster.
#[derive(Debug, Clone)]
pub struct LeaderRole {
    pub etcd: crate::etcd_args::EtcdArgs,
}

/// Serves `model` (loaded from `dir`): the engine, the gRPC API and the metrics endpoint, until a signal.
/// `leader`: a decoder group leader, which also serves the cluster's decoder API and registers in etcd
/// (deregistering on SIGTERM, or when its group loses a rank).
pub fn run_with(
    args: ServeArgs,
    dir: &std::path::Path,
    model: AfNext,
    leader: Option<LeaderRole>,
) -> Result<()> {
    let internal_api = leader.is_some();
    let dir = dir.to_path_buf();
    let gen = GenerationDefaults::load(&dir, &model.cfg.text)?;
    let proc = PromptProcessor::load(&dir)?;
    let engine = Arc::new(Engine::start(
        Arc::new(model),
        Arc::new(proc),
        gen,
        args.engine_config(),
    )?);
    let cfg = args.api.server_config(&args.model, internal_api)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.api.listen)
            .await
            .with_context(|| format!("binding {}", args.api.listen))?;
        let bound = listener.local_addr()?;
        let registration = match leader
            .as_ref()
            .and_then(|l| l.etcd.config().map(|c| (l, c)))
        {
            Some((l, c)) => {
                let addr = l.etcd.advertised(bound)?;
                Some(afnext_discovery::register(
                    c,
                    afnext_discovery::DECODERS,
                    &addr,
                ))
            }
            None => None,
        };
        let requests = Arc::new(afnext_server::metrics::RequestMetrics::default());
        if let Some(addr) = args.api.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            println!("metrics on http://{}", l.local_addr()?);
            let registered = registration
                .as_ref()
                .map(|r| Arc::new(r.probe()) as Arc<dyn Fn() -> bool + Send + Sync>);
            let probe = afnext_server::metrics::EngineProbe {
                engine: engine.clone(),
                requests: requests.clone(),
                registered,
            };
            tokio::spawn(afnext_server::prom::serve_http(l, Arc::new(probe)));
        }
        let registration = Arc::new(tokio::sync::Mutex::new(registration));
        // A group that lost a rank leaves the registry at once.
        {
            let (engine, reg) = (engine.clone(), registration.clone());
            tokio::spawn(async move {
                while engine.group_lost().is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if let Some(r) = reg.lock().await.take() {
                    r.deregister().await;
                }
            });
        }
        let shutdown = {
            let reg = registration.clone();
            async move {
                shutdown_signal().await;
                if let Some(r) = reg.lock().await.take() {
                    r.deregister().await;
                }
            }
        };
        // Tests and scripts read this line to find a port-0 server.
        println!("afnext serving on {bound}");
        let out = afnext_server::serve(engine, cfg, requests, listener, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!("server failed: {e}"))?;
        eprintln!(
            "afnext: shut down ({} in-flight request(s) cancelled after the grace period)",
            out.cancelled_at_shutdown
        );
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("afnext: shutdown requested; draining");
}
