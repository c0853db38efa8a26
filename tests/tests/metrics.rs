//! `/metrics`, `/live` and `/ready` of every role, scraped after known traffic: the counters and histograms
//! move by exactly what the traffic implies.

use std::collections::HashMap;

use afnext_e2e::cluster::{decoder_group, encoder, router};
use afnext_e2e::grpc::{audio, clip, req, run, text, user};
use afnext_e2e::{http_get, parse_metrics, Server};
use tonic::Code;

fn scrape(s: &Server) -> HashMap<String, f64> {
    let (code, body) = http_get(s.metrics.as_ref().expect("a metrics endpoint"), "/metrics");
    assert_eq!(code, 200);
    parse_metrics(&body)
}

fn delta(a: &HashMap<String, f64>, b: &HashMap<String, f64>, k: &str) -> f64 {
    b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_metrics_count_the_traffic() {
    let srv = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let m = srv.metrics.clone().unwrap();
    assert_eq!(http_get(&m, "/live").0, 200);
    assert_eq!(http_get(&m, "/ready").0, 200);
    let mut c = srv.client().await;
    let before = scrape(&srv);
    let r = || {
        req(
            vec![user(vec![
                audio(clip("speech_7s.flac")),
                text("Transcribe."),
            ])],
            6,
        )
    };
    let first = run(&mut c, r()).await.unwrap();
    let again = run(&mut c, r()).await.unwrap();
    let bad = run(&mut c, req(vec![user(vec![audio(b"junk".to_vec())])], 4))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let after = scrape(&srv);
    let d = |k: &str| delta(&before, &after, k);
    let usage = |o: &afnext_e2e::grpc::Out| o.finished.unwrap().usage.unwrap();
    let (u1, u2) = (usage(&first), usage(&again));
    assert!(
        (d("afnext_audio_seconds_received_total") - (u1.audio_seconds + u2.audio_seconds)).abs()
            < 1e-3
    );
    assert_eq!(
        d("afnext_windows_encoded_total"),
        first.windows_total as f64
    );
    assert_eq!(d("afnext_embedding_cache_hits_total"), 1.0);
    // The first request and the bad one.
    assert_eq!(d("afnext_embedding_cache_misses_total"), 2.0);
    let tokens = (u1.completion_tokens + u2.completion_tokens) as f64;
    assert_eq!(d("afnext_tokens_generated_total"), tokens);
    assert_eq!(d("afnext_streamed_tokens_total"), tokens);
    assert_eq!(d("afnext_requests_total{code=\"OK\"}"), 2.0);
    assert_eq!(d("afnext_requests_total{code=\"INVALID_ARGUMENT\"}"), 1.0);
    assert_eq!(d("afnext_errors_total{kind=\"invalid_argument\"}"), 1.0);
    assert_eq!(d("afnext_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(d("afnext_inter_token_latency_seconds_count"), tokens - 2.0);
    assert_eq!(d("afnext_request_duration_seconds_count"), 3.0);
    assert_eq!(d("afnext_queue_time_seconds_count"), 2.0);
    assert!(
        d("afnext_prefix_cache_hits_total") > 0.0,
        "the follow-up hit the prefix cache"
    );
    assert!(after["afnext_prefix_cache_hit_ratio"] > 0.0);
    assert_eq!(after["afnext_kv_blocks_used"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_roles_export_their_metrics() {
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let (dec, _f) = decoder_group(2, 0, &metrics);
    let enc = encoder(&metrics);
    let rt = router(&[&dec.addr], &[&enc.addr], &metrics);
    assert_eq!(http_get(rt.metrics.as_ref().unwrap(), "/ready").0, 200);
    assert_eq!(http_get(enc.metrics.as_ref().unwrap(), "/ready").0, 200);
    assert_eq!(http_get(dec.metrics.as_ref().unwrap(), "/ready").0, 200);
    let (e0, r0, d0) = (scrape(&enc), scrape(&rt), scrape(&dec));
    let mut c = rt.client().await;
    let o = run(
        &mut c,
        req(
            vec![user(vec![
                audio(clip("mix_75s.flac")),
                text("What is happening?"),
            ])],
            5,
        ),
    )
    .await
    .unwrap();
    let (e1, r1, d1) = (scrape(&enc), scrape(&rt), scrape(&dec));
    let windows = o.windows_total as f64;
    let u = o.finished.unwrap().usage.unwrap();
    assert_eq!(delta(&e0, &e1, "afnext_encoder_windows_total"), windows);
    assert!(delta(&e0, &e1, "afnext_encoder_batch_size_count") >= 1.0);
    assert_eq!(e1["afnext_encoder_queue_depth"], 0.0);
    assert_eq!(delta(&d0, &d1, "afnext_windows_encoded_total"), windows);
    assert!(
        (delta(&r0, &r1, "afnext_audio_seconds_received_total") - u.audio_seconds).abs() < 1e-3
    );
    assert_eq!(delta(&r0, &r1, "afnext_requests_total{code=\"OK\"}"), 1.0);
    assert_eq!(delta(&r0, &r1, "afnext_router_windows_sent_total"), windows);
    assert_eq!(
        r1["afnext_router_members{tier=\"decoder\",state=\"healthy\"}"],
        1.0
    );
    assert_eq!(
        delta(&d0, &d1, "afnext_tokens_generated_total"),
        u.completion_tokens as f64
    );
}
