//! `afnext encoder` and `afnext router`: the cluster's stateless tiers (decoder groups are
//! [`crate::decoder`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use afnext_audio::Frontend;
use afnext_model::AudioTower;
use afnext_prompt::PromptProcessor;
use afnext_router::{Dispatcher, Pool, RouterConfig, Tier};
use afnext_server::cluster_pb::encoder_server::EncoderServer;
use afnext_server::encoder_svc::{EncoderConfig, EncoderService};
use anyhow::{Context, Result};
use clap::Args;
use tokio_stream::wrappers::TcpListenerStream;

use crate::etcd_args::EtcdArgs;
use crate::model_args::ModelArgs;
use crate::serve::ApiArgs;

#[derive(Debug, Args)]
pub struct EncoderArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// gRPC address of the internal encoder API (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,
    /// Windows per encoder forward (from any mix of requests).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Windows waiting beyond the batch being computed; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 512)]
    pub max_queued_windows: usize,
    /// Seconds a decoder may take to accept one window's embeddings.
    #[arg(long, default_value_t = 30)]
    pub push_timeout_s: u64,
    /// HTTP address for /metrics, /live and /ready (off when absent).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint for traces (default: the OTEL_EXPORTER_OTLP_* variables; off when unset).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: crate::tls_args::TlsArgs,
}

pub fn run_encoder(args: EncoderArgs) -> Result<()> {
    let _telemetry = afnext_telemetry::init("encoder", args.otlp_endpoint.as_deref())?;
    let dir = args.model.resolve()?;
    let (model_cfg, w) = args.model.weights(&dir)?;
    let tower = AudioTower::from_weights(model_cfg, &w)
        .with_context(|| format!("loading the audio path of {}", dir.display()))?;
    drop(w);
    let proc = PromptProcessor::load(&dir)?;
    let frontend = Frontend::new(&proc.config().frontend)?;
    let cfg = EncoderConfig {
        batch: args.batch,
        max_queued_windows: args.max_queued_windows,
        push_timeout: Duration::from_secs(args.push_timeout_s),
    };
    runtime()?.block_on(async move {
        let svc = EncoderService::start(tower, frontend, cfg, args.tls.links()?);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_serving::<EncoderServer<EncoderService>>().await;
        let bound = listener.local_addr()?;
        let registration = match args.etcd.config() {
            Some(c) => Some(afnext_discovery::register(
                c,
                afnext_discovery::ENCODERS,
                &args.etcd.advertised(bound)?,
            )),
            None => None,
        };
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(addr) = args.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            println!("metrics on http://{}", l.local_addr()?);
            let probe = afnext_server::encoder_svc::EncoderProbe {
                stats: svc.stats(),
                registered: registration
                    .as_ref()
                    .map(|r| Arc::new(r.probe()) as Arc<dyn Fn() -> bool + Send + Sync>),
                draining: draining.clone(),
            };
            tokio::spawn(afnext_server::prom::serve_http(l, Arc::new(probe)));
        }
        println!("afnext serving on {bound}");
        // SIGTERM: leave the registry, stop accepting, finish the windows in flight, exit.
        let signal = async move {
            crate::serve::shutdown_signal().await;
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(r) = registration {
                r.deregister().await;
            }
            health
                .set_not_serving::<EncoderServer<EncoderService>>()
                .await;
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = args.tls.files().server().context("TLS of the listener")? {
            builder = builder.tls_config(t)?;
        }
        builder
            .add_service(health_svc)
            .add_service(EncoderServer::new(svc).max_decoding_message_size(64 << 20))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
            .await
            .context("encoder server failed")
    })
}

#[derive(Debug, Args)]
pub struct RouterArgs {
    /// The checkpoint (its tokenizer, chat template and audio settings are used; no weights are loaded).
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Decoder group leaders, host:port, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub decoders: Vec<String>,
    /// Encoder workers, host:port, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub encoders: Vec<String>,
    /// Seconds one encoder may take for one window before the window goes to another encoder.
    #[arg(long, default_value_t = 120.0)]
    pub window_timeout_s: f64,
    /// Tries per window over different encoders.
    #[arg(long, default_value_t = 3)]
    pub window_attempts: usize,
    /// Decoder groups tried per request while no token has been streamed.
    #[arg(long, default_value_t = 2)]
    pub decoder_attempts: usize,
    /// Milliseconds between health checks of every worker.
    #[arg(long, default_value_t = 1000)]
    pub health_interval_ms: u64,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn run_router(args: RouterArgs) -> Result<()> {
    let _telemetry = afnext_telemetry::init("router", args.api.otlp_endpoint.as_deref())?;
    let dir = args.model.resolve_without_weights()?;
    let proc = Arc::new(PromptProcessor::load(&dir)?);
    let cfg = RouterConfig {
        decoders: args.decoders.clone(),
        encoders: args.encoders.clone(),
        window_timeout: Duration::from_secs_f64(args.window_timeout_s),
        window_attempts: args.window_attempts,
        decoder_attempts: args.decoder_attempts,
        health_interval: Duration::from_millis(args.health_interval_ms),
        ..RouterConfig::default()
    };
    let server_cfg = args.api.server_config(&args.model, false)?;
    let links = args.api.tls.links()?;
    runtime()?.block_on(async move {
        let pool = Arc::new(Pool::new());
        pool.set(Tier::Decoder, &cfg.decoders);
        pool.set(Tier::Encoder, &cfg.encoders);
        // Members from etcd join the static ones.
        let _watch = args.etcd.config().map(|c| {
            let (pool, st_dec, st_enc) = (pool.clone(), cfg.decoders.clone(), cfg.encoders.clone());
            afnext_discovery::watch(c, move |m| {
                for (tier, name, fixed) in [
                    (Tier::Decoder, afnext_discovery::DECODERS, &st_dec),
                    (Tier::Encoder, afnext_discovery::ENCODERS, &st_enc),
                ] {
                    let mut all = fixed.clone();
                    all.extend(m.get(name).into_iter().flatten().cloned());
                    all.sort();
                    all.dedup();
                    pool.set(tier, &all);
                }
            })
        });
        let every = cfg.health_interval;
        let dispatcher = Arc::new(Dispatcher::new(pool, links, cfg));
        let listener = tokio::net::TcpListener::bind(args.api.listen)
            .await
            .with_context(|| format!("binding {}", args.api.listen))?;
        let metrics = Arc::new(afnext_router::service::RouterMetrics::default());
        if let Some(addr) = args.api.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            println!("metrics on http://{}", l.local_addr()?);
            let probe = afnext_router::service::RouterProbe {
                metrics: metrics.clone(),
                dispatcher: dispatcher.clone(),
            };
            tokio::spawn(afnext_server::prom::serve_http(l, Arc::new(probe)));
        }
        println!("afnext serving on {}", listener.local_addr()?);
        afnext_router::serve(
            proc,
            dispatcher,
            server_cfg,
            metrics,
            every,
            listener,
            crate::serve::shutdown_signal(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("router failed: {e}"))
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
