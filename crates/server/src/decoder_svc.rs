//! `afnext.cluster.v1.Decoder` on a decoder group leader: prepared requests from routers, window
//! embeddings from encoder workers, both into the engine ([`Engine::submit_prepared`],
//! [`Engine::push_window`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afnext_engine::{AudioKey, Engine, PreparedRequest, RemoteAudio};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::cluster_pb::decoder_server::Decoder;
use crate::cluster_pb::{self as cpb, submit_response::Event as SE};
use afnext_telemetry::Instrument;

use crate::convert;
use crate::metrics::RequestMetrics;
use crate::status::{engine_status, ApiError};

/// Largest PushWindow message: one 30 s window of the full model in f32 is 750 x 3584 x 4 bytes (10.75 MB).
pub const MAX_WINDOW_MESSAGE: usize = 64 << 20;

pub struct DecoderService {
    engine: Arc<Engine>,
    metrics: Arc<RequestMetrics>,
}

impl DecoderService {
    pub fn new(engine: Arc<Engine>, metrics: Arc<RequestMetrics>) -> Self {
        DecoderService { engine, metrics }
    }
}

fn bad(location: &str, problem: String) -> Status {
    ApiError::BadRequest {
        location: location.into(),
        problem,
    }
    .into()
}

/// The engine request of a Submit.
fn prepared(
    r: cpb::SubmitRequest,
    deadline: Option<Instant>,
    span: tracing::Span,
) -> Result<PreparedRequest, Status> {
    let mut audios = Vec::with_capacity(r.audios.len());
    for (i, a) in r.audios.into_iter().enumerate() {
        let key: [u8; 32] = a.key.as_slice().try_into().map_err(|_| {
            bad(
                &format!("audio {i}"),
                format!("key has {} bytes, 32 expected", a.key.len()),
            )
        })?;
        audios.push(RemoteAudio {
            key: AudioKey(key),
            window_tokens: a.window_tokens.iter().map(|&t| t as usize).collect(),
            seconds: a.seconds,
        });
    }
    Ok(PreparedRequest {
        prompt_ids: r.prompt_ids,
        audios,
        max_new_tokens: r.max_new_tokens.map(|n| n as usize),
        sampling: convert::sampling(r.sampling.unwrap_or_default()),
        stop: r.stop,
        ignore_eos: r.ignore_eos,
        deadline,
        prepare_time: Duration::from_micros(r.prepare_us),
        span,
    })
}

type SubmitStream = Pin<Box<dyn Stream<Item = Result<cpb::SubmitResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Decoder for DecoderService {
    type SubmitStream = SubmitStream;

    async fn submit(
        &self,
        request: Request<cpb::SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let mut tracker = self.metrics.track();
        let span =
            afnext_telemetry::server_span("afnext.cluster.v1.Decoder/Submit", request.metadata());
        let acc = convert::deadline(request.metadata())
            .map_err(Status::from)
            .and_then(|d| prepared(request.into_inner(), d, span.clone()))
            .and_then(|req| self.engine.submit_prepared(req).map_err(engine_status));
        let acc = match acc {
            Ok(a) => a,
            Err(s) => {
                tracker.error(&s);
                return Err(s);
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let first = cpb::SubmitResponse {
            event: Some(SE::Accepted(cpb::Accepted {
                request_id: acc.handle.id,
                needed: acc.needed,
            })),
        };
        tx.send(Ok(first))
            .await
            .map_err(|_| Status::internal("stream closed at once"))?;
        tokio::spawn(
            crate::service::pump_as(acc.handle, tx, tracker, |m| cpb::SubmitResponse {
                event: Some(SE::Generate(m)),
            })
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_window(
        &self,
        request: Request<cpb::PushWindowRequest>,
    ) -> Result<Response<cpb::PushWindowResponse>, Status> {
        let span = afnext_telemetry::server_span(
            "afnext.cluster.v1.Decoder/PushWindow",
            request.metadata(),
        );
        let _entered = span.enter();
        let p = request.into_inner();
        let rows = crate::wire::rows_of(&p)?;
        self.engine
            .push_window(p.request_id, p.audio as usize, p.window as usize, rows)
            .map_err(engine_status)?;
        Ok(Response::new(cpb::PushWindowResponse {}))
    }
}
