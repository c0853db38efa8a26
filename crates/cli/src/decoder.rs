//! `afnext decoder --tp N --rank R`: one rank of a tensor-parallel decoder group.
//!
//! Rank 0 binds `--group-addr`, waits for ranks 1..N to join (TCP collectives on CPUs; NCCL, bootstrapped over the same TCP link, when
//! built with `--features cuda` and run with `--device cuda:N`), loads the audio path
//! and its decoder share, and serves the gRPC API like `afnext serve` plus the cluster's internal decoder
//! API (prepared requests from routers, window embeddings from encoder workers); its engine tells the other
//! ranks each step what to run. Ranks 1..N connect to `--group-addr`, load only their share and follow until rank 0
//! stops (exit 0) or the group fails (exit 1). If any rank dies, rank 0 fails its in-flight requests with
//! UNAVAILABLE, reports NOT_SERVING on gRPC health and 503 on /live, and serves nothing more: restart the
//! group.

use std::sync::Arc;
use std::time::Duration;

use afnext_collectives::tcp::{TcpConfig, TcpGroup};
use afnext_collectives::{Collective, Single};
use afnext_model::config::AfNextConfig;
use afnext_model::decoder::Qwen2;
use afnext_model::AfNext;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;

use crate::serve::ServeArgs;

#[derive(Debug, Args)]
pub struct DecoderArgs {
    /// Ranks in this tensor-parallel group (must split the model's heads; see docs/DESIGN.md).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// This process's rank, 0..tp; rank 0 serves the API.
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// HOST:PORT where rank 0 listens for the other ranks (required when --tp > 1).
    #[arg(long)]
    pub group_addr: Option<String>,
    /// Seconds a rank may hold up one collective operation before the group is declared lost.
    #[arg(long, default_value_t = 30)]
    pub collective_timeout_s: u64,
    /// Seconds to wait for the whole group to form.
    #[arg(long, default_value_t = 600)]
    pub join_timeout_s: u64,
    #[command(flatten)]
    pub etcd: crate::etcd_args::EtcdArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn run(args: DecoderArgs) -> Result<()> {
    if args.rank >= args.tp {
        bail!(
            "--rank {} is outside the group of --tp {}",
            args.rank,
            args.tp
        );
    }
    let role = if args.rank == 0 {
        "decoder".to_string()
    } else {
        format!("decoder-rank-{}", args.rank)
    };
    let _telemetry = afnext_telemetry::init(&role, args.serve.api.otlp_endpoint.as_deref())?;
    let dir = args.serve.model.resolve()?;
    let cfg = TcpConfig {
        join_timeout: Duration::from_secs(args.join_timeout_s),
        op_timeout: Duration::from_secs(args.collective_timeout_s),
    };
    // Refuse an impossible split before anyone waits for a group.
    let model_cfg = AfNextConfig::load(&dir)?;
    afnext_model::tp::TextShard::new(&model_cfg.text, args.rank, args.tp)?;
    let device = args.serve.model.device()?;
    let group = form_group(&args, cfg, &device)?;
    if args.rank == 0 {
        let (cfg, w) = args.serve.model.weights_on(&dir, &device)?;
        let model = AfNext::from_weights_in(cfg, &w, group)
            .with_context(|| format!("loading the model from {}", dir.display()))?;
        let role = crate::serve::LeaderRole { etcd: args.etcd };
        return crate::serve::run_with(args.serve, &dir, model, Some(role));
    }
    let (_, w) = args.serve.model.weights_on(&dir, &device)?;
    let decoder = Qwen2::load_shard(&w, &model_cfg.text, group)
        .with_context(|| format!("loading rank {}'s share of {}", args.rank, dir.display()))?;
    drop(w);
    eprintln!(
        "afnext decoder: rank {} of {} following",
        args.rank, args.tp
    );
    // SIGTERM/SIGINT on a follower: keep serving the group while rank 0 drains (it stops the group when
    // done), and leave after the grace period if it never does.
    let grace = Duration::from_secs(args.serve.api.grace_period_s);
    let rank = args.rank;
    std::thread::Builder::new()
        .name("afnext-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(crate::serve::shutdown_signal());
            std::thread::sleep(grace);
            eprintln!("afnext decoder: rank {rank} leaving after the grace period");
            std::process::exit(0);
        })
        .context("starting the signal thread")?;
    afnext_engine::group::run_follower(&decoder)
        .with_context(|| format!("rank {} of the decoder group", args.rank))?;
    eprintln!("afnext decoder: rank {} stopped", args.rank);
    Ok(())
}

/// The collective group of this rank: none for one rank; TCP between ranks on the CPU; NCCL over the same
/// TCP bootstrap (which keeps carrying rank 0's step plans) when this build has CUDA and the model is on a GPU.
fn form_group(args: &DecoderArgs, cfg: TcpConfig, device: &Device) -> Result<Arc<dyn Collective>> {
    if args.tp == 1 {
        return Ok(Arc::new(Single));
    }
    let Some(addr) = args.group_addr.as_deref() else {
        bail!("--group-addr is required when --tp is more than 1");
    };
    let tcp = if args.rank == 0 {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "afnext decoder: rank 0 waiting for {} rank(s) on {}",
            args.tp - 1,
            l.local_addr()?
        );
        TcpGroup::lead(l, args.tp, cfg)?
    } else {
        TcpGroup::join(args.rank, args.tp, addr, cfg)?
    };
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let g = afnext_collectives::nccl::NcclGroup::with_stream(Arc::new(tcp), d.cuda_stream())
            .context("forming the NCCL group")?;
        eprintln!("afnext decoder: rank {} joined the NCCL group", args.rank);
        return Ok(Arc::new(g));
    }
    let _ = device;
    Ok(Arc::new(tcp))
}
