//! The cluster router (`afnext router`): the public `afnext.v1` API, served by encoder workers and decoder
//! groups found in a static list or in etcd.
//!
//! * [`prepare`]: audio decoding, windows and tokenization, before any worker is involved;
//! * [`pool`]: the members of each tier, their load, affinity and failures;
//! * [`dispatch`]: one request through a decoder group and the encoders, with retries;
//! * [`service`]: the RPCs; [`serve`] runs them with health, reflection and a health poller.

pub mod config;
pub mod dispatch;
pub mod pool;
pub mod prepare;
pub mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_prompt::PromptProcessor;
use afnext_server::pb::af_next_server::AfNextServer;
use afnext_server::{pb, ServerConfig};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use config::RouterConfig;
pub use dispatch::Dispatcher;
pub use pool::{Pool, Tier};

/// Serves the public API on `listener` until `shutdown`, then stops accepting and lets streams finish.
pub async fn serve(
    proc: Arc<PromptProcessor>,
    dispatcher: Arc<Dispatcher>,
    cfg: ServerConfig,
    metrics: Arc<service::RouterMetrics>,
    health_interval: Duration,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<AfNextServer<service::RouterService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let max = cfg.max_message_bytes;
    let (tls, keys) = (cfg.tls.clone(), cfg.api_keys.clone());
    let api = AfNextServer::new(service::RouterService::new(
        proc,
        dispatcher.clone(),
        cfg,
        metrics,
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    // API keys guard the public API; health and reflection stay open for probes and tools.
    let api = tonic::service::interceptor::InterceptedService::new(api, keys);
    let poller = tokio::spawn(poll_health(dispatcher, health_interval));
    let signal = async move {
        shutdown.await;
        health
            .set_not_serving::<AfNextServer<service::RouterService>>()
            .await;
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        builder = builder.tls_config(t)?;
    }
    let r = builder
        .add_service(health_svc)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await;
    poller.abort();
    Ok(r?)
}

/// Checks every member's gRPC health each `every`: NOT_SERVING or unreachable members are avoided until
/// they answer SERVING again (a restarted worker takes traffic again by itself).
async fn poll_health(d: Arc<Dispatcher>, every: Duration) {
    loop {
        for tier in [Tier::Decoder, Tier::Encoder] {
            for addr in d.pool.members(tier) {
                let ok = match tokio::time::timeout(every.max(Duration::from_millis(500)), async {
                    let ch = d.channel(&addr).await.ok()?;
                    let r = HealthClient::new(ch)
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .ok()?;
                    Some(r.into_inner().status == ServingStatus::Serving as i32)
                })
                .await
                {
                    Ok(Some(s)) => s,
                    _ => false,
                };
                if ok {
                    d.pool.set_down(tier, &addr, None);
                } else {
                    d.forget(&addr);
                    d.pool
                        .set_down(tier, &addr, Some(Instant::now() + pool::COOLDOWN));
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
