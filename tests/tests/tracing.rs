//! One request through router, 2 encoder workers and a TP=2 decoder group, every process exporting to an
//! in-process OTLP gRPC sink: one trace, spans from every tier, each with the right parent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afnext_e2e::cluster::{decoder_group, encoder, router};
use afnext_e2e::grpc::{audio, clip, req, text, user};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

#[derive(Debug, Clone)]
struct Rec {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

#[derive(Default, Clone)]
struct Sink(Arc<Mutex<Vec<Rec>>>);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in r.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Rec {
                        service: service.clone(),
                        name: s.name,
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_every_tier() {
    let sink = Sink::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = TraceServiceServer::new(sink.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    // Every process started below inherits these (this test is alone in its binary).
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let (dec, _f) = decoder_group(2, 0, &[]);
    let (e1, e2) = (encoder(&[]), encoder(&[]));
    let rt = router(&[&dec.addr], &[&e1.addr, &e2.addr], &[]);

    // The client's own trace context.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut r = tonic::Request::new(req(
        vec![user(vec![
            audio(clip("mix_75s.flac")),
            text("What is happening here?"),
        ])],
        4,
    ));
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{client_span}-01").parse().unwrap(),
    );
    let mut c = rt.client().await;
    let mut s = c.generate(r).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}

    let want = [
        "afnext-router",
        "afnext-encoder",
        "afnext-decoder",
        "afnext-decoder-rank-1",
    ];
    let end = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Rec> = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.trace == trace)
            .cloned()
            .collect();
        let services: Vec<&str> = spans.iter().map(|r| r.service.as_str()).collect();
        let count = |n: &str| spans.iter().filter(|r| r.name == n).count();
        let complete = count("afnext.cluster.v1.Decoder/PushWindow") >= 3
            && count("afnext.cluster.v1.Decoder/Submit") == 1
            && count("afnext.v1.AfNext/Generate") == 1
            && count("decoder.follower_step") >= 1
            && count("decoder.follower_step") == count("decoder.step");
        if want.iter().all(|w| services.contains(w)) && complete {
            break spans;
        }
        assert!(
            Instant::now() < end,
            "spans of the trace so far: {:#?}",
            spans
                .iter()
                .map(|r| (&r.service, &r.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by_id: HashMap<&str, &Rec> = spans.iter().map(|r| (r.id.as_str(), r)).collect();
    let parent = |r: &Rec| by_id.get(r.parent.as_str()).copied();
    let one = |service: &str, name: &str| -> Vec<&Rec> {
        spans
            .iter()
            .filter(|r| r.service == service && r.name == name)
            .collect()
    };
    let generate = one("afnext-router", "afnext.v1.AfNext/Generate");
    assert_eq!(generate.len(), 1);
    assert_eq!(
        generate[0].parent, client_span,
        "the router continues the client's trace"
    );
    let submit = one("afnext-decoder", "afnext.cluster.v1.Decoder/Submit");
    assert_eq!(submit.len(), 1);
    assert_eq!(parent(submit[0]).unwrap().id, generate[0].id);
    let windows = one("afnext-router", "router.window");
    assert_eq!(windows.len(), 3, "one span per window");
    for w in &windows {
        assert_eq!(w.parent, generate[0].id);
    }
    let encodes = one("afnext-encoder", "afnext.cluster.v1.Encoder/Encode");
    assert_eq!(encodes.len(), 3);
    for e in &encodes {
        assert_eq!(parent(e).unwrap().name, "router.window");
    }
    for p in one("afnext-decoder", "afnext.cluster.v1.Decoder/PushWindow") {
        assert_eq!(parent(p).unwrap().name, "afnext.cluster.v1.Encoder/Encode");
    }
    let steps = one("afnext-decoder", "decoder.step");
    assert!(!steps.is_empty());
    for st in &steps {
        assert_eq!(
            st.parent, submit[0].id,
            "a batch step is a child of its request"
        );
    }
    let follower = one("afnext-decoder-rank-1", "decoder.follower_step");
    assert_eq!(follower.len(), steps.len(), "every step also ran on rank 1");
    for f in &follower {
        assert_eq!(parent(f).unwrap().name, "decoder.step");
    }
}
