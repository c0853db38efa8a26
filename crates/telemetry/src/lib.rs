//! Tracing for every afnext process: `tracing` spans bridged to OpenTelemetry and exported over OTLP/gRPC,
//! and the W3C trace context (`traceparent`) carried in gRPC metadata on every hop, so that one request is
//! one trace across router, encoder workers, the decoder leader and its follower ranks.
//!
//! Configuration is the standard one: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or the `--otlp-endpoint` flag) turns export on; `OTEL_SERVICE_NAME` names the process (default: its
//! role). Without an endpoint nothing is installed and spans cost almost nothing.
//!
//! Two process-wide registrations are unavoidable: `tracing`'s default subscriber and the OpenTelemetry
//! tracer behind it. The propagator is used explicitly (no global propagator).

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

pub use tracing::{info_span, Instrument, Span};

#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TelemetryError(String);

/// Keeps the exporter running; flushes the spans still buffered when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The tonic exporter needs a Tokio runtime of its own (the batch processor runs on its own thread).
    _rt: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs OTLP export when an endpoint is configured (`flag`, else the standard environment).
/// `role` names the service unless `OTEL_SERVICE_NAME` does.
pub fn init(role: &str, flag: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let endpoint = flag
        .map(str::to_string)
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(endpoint) = endpoint else {
        return Ok(Telemetry {
            provider: None,
            _rt: None,
        });
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("afnext-otlp")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let exporter = rt
        .block_on(async {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
        })
        .map_err(|e| TelemetryError(format!("OTLP exporter for {endpoint}: {e}")))?;
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(format!("afnext-{role}"));
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("afnext");
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| TelemetryError(e.to_string()))?;
    Ok(Telemetry {
        provider: Some(provider),
        _rt: Some(rt),
    })
}

struct MetaInjector<'a>(&'a mut MetadataMap);

impl Injector for MetaInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetaExtractor<'a>(&'a MetadataMap);

impl Extractor for MetaExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context into outgoing gRPC metadata.
pub fn inject(span: &Span, md: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetaInjector(md));
}

/// A server span named `name` whose parent is the caller's trace context (a new trace without one).
pub fn server_span(name: &'static str, md: &MetadataMap) -> Span {
    let span = info_span!("rpc", otel.name = name);
    let cx = TraceContextPropagator::new().extract(&MetaExtractor(md));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
    span
}

/// The `traceparent` of `span` (empty when tracing is off), for hops that are not gRPC calls.
pub fn traceparent(span: &Span) -> String {
    let mut m = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut m);
    m.remove("traceparent").unwrap_or_default()
}

/// A span named `name` continuing the trace of `traceparent` (see [`traceparent`]).
pub fn span_from(name: &'static str, traceparent: &str) -> Span {
    let span = info_span!("step", otel.name = name);
    if !traceparent.is_empty() {
        let mut m = HashMap::new();
        m.insert("traceparent".to_string(), traceparent.to_string());
        let cx: Context = TraceContextPropagator::new().extract(&m);
        let _ = span.set_parent(cx);
    }
    span
}

/// Links `span` to the trace of `other` (a batch step to the requests it computes).
pub fn link(span: &Span, other: &Span) {
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}
