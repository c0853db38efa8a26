//! `--metrics-listen`: a small HTTP endpoint with `/metrics` (Prometheus text format), `/live` and `/ready`.
//! Deliberately minimal (one GET per connection, no keep-alive): probes and scrapers need nothing more.

use std::sync::Arc;

use afnext_engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Prometheus text of the engine's counters and gauges.
pub fn render(engine: &Engine) -> String {
    let s = engine.stats();
    let mut out = String::new();
    let mut m = |name: &str, kind: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    m(
        "afnext_requests_running",
        "gauge",
        "Requests being decoded.",
        s.running as f64,
    );
    m(
        "afnext_requests_waiting",
        "gauge",
        "Requests waiting for admission.",
        s.waiting as f64,
    );
    m(
        "afnext_requests_in_flight",
        "gauge",
        "Requests accepted and not finished.",
        s.in_flight as f64,
    );
    m(
        "afnext_kv_blocks_total",
        "gauge",
        "KV cache blocks.",
        s.kv.total as f64,
    );
    m(
        "afnext_kv_blocks_used",
        "gauge",
        "KV cache blocks held by requests.",
        s.kv.used as f64,
    );
    m(
        "afnext_kv_blocks_cached",
        "gauge",
        "Free KV blocks holding reusable prefix content.",
        s.kv.cached as f64,
    );
    m(
        "afnext_kv_blocks_free",
        "gauge",
        "Empty KV blocks.",
        s.kv.free as f64,
    );
    m(
        "afnext_prefix_cache_queries_total",
        "counter",
        "Prompt blocks looked up in the prefix cache.",
        s.kv.prefix_queries as f64,
    );
    m(
        "afnext_prefix_cache_hits_total",
        "counter",
        "Prompt blocks found in the prefix cache.",
        s.kv.prefix_hits as f64,
    );
    m(
        "afnext_embedding_cache_hits_total",
        "counter",
        "Audio parts served from the embedding cache.",
        s.embeddings.hits as f64,
    );
    m(
        "afnext_embedding_cache_misses_total",
        "counter",
        "Audio parts that needed the encoder.",
        s.embeddings.misses as f64,
    );
    m(
        "afnext_embedding_cache_bytes",
        "gauge",
        "Bytes of cached audio embeddings.",
        s.embeddings.bytes as f64,
    );
    m(
        "afnext_windows_encoded_total",
        "counter",
        "30 s audio windows run through the encoder.",
        s.windows_encoded as f64,
    );
    m(
        "afnext_tokens_generated_total",
        "counter",
        "Tokens generated.",
        s.tokens_generated as f64,
    );
    m(
        "afnext_requests_finished_total",
        "counter",
        "Requests that finished normally.",
        s.requests_finished as f64,
    );
    m(
        "afnext_preemptions_total",
        "counter",
        "Sequences preempted for KV memory.",
        s.preemptions as f64,
    );
    out
}

/// Serves until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, engine: Arc<Engine>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (code, body) = match path {
                "/metrics" => ("200 OK", render(&engine)),
                // A group that lost a rank must be restarted: it is not live.
                "/live" => match engine.group_lost() {
                    None => ("200 OK", "ok\n".to_string()),
                    Some(r) => (
                        "503 Service Unavailable",
                        format!("decoder group lost: {r}\n"),
                    ),
                },
                "/ready" if engine.is_accepting() => ("200 OK", "ready\n".to_string()),
                "/ready" => ("503 Service Unavailable", "shutting down\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
