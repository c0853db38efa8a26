//! gRPC helpers shared by the tests that talk to real servers: building requests, running a stream to its
//! end, polling statistics.

use std::time::{Duration, Instant};

use afnext_server::pb;
use afnext_server::pb::af_next_client::AfNextClient;
use pb::generate_response::Event as E;
use tonic::transport::Channel;

use crate::fixtures_dir;

pub async fn stats(c: &mut AfNextClient<Channel>) -> pb::ServerStats {
    c.get_server_stats(pb::GetServerStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls the server's statistics until `done` holds; fails after 10 s naming `what` and the last statistics.
pub async fn wait_for(
    c: &mut AfNextClient<Channel>,
    what: &str,
    done: impl Fn(&pb::ServerStats) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let st = stats(c).await;
        if done(&st) {
            return;
        }
        assert!(Instant::now() < end, "not {what} after 10 s: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn clip(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join("audio").join(name)).unwrap()
}

pub fn text(t: &str) -> pb::Part {
    pb::Part {
        kind: Some(pb::part::Kind::Text(t.into())),
    }
}

pub fn audio(data: Vec<u8>) -> pb::Part {
    pb::Part {
        kind: Some(pb::part::Kind::Audio(pb::AudioPart {
            source: Some(pb::audio_part::Source::Data(data)),
            format: 0,
        })),
    }
}

pub fn user(parts: Vec<pb::Part>) -> pb::Message {
    pb::Message {
        role: pb::Role::User as i32,
        parts,
    }
}

pub fn req(messages: Vec<pb::Message>, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages,
        max_new_tokens: Some(max_new),
        ..Default::default()
    }
}

#[derive(Debug, Default)]
pub struct Out {
    pub ids: Vec<u32>,
    pub text: String,
    pub progress: usize,
    /// `windows_total` of the last progress event.
    pub windows_total: u32,
    pub started: Option<pb::Started>,
    pub finished: Option<pb::Finished>,
}

pub async fn run(
    c: &mut AfNextClient<Channel>,
    r: pb::GenerateRequest,
) -> Result<Out, tonic::Status> {
    let mut s = c.generate(r).await?.into_inner();
    let mut o = Out::default();
    while let Some(m) = s.message().await? {
        match m.event.unwrap() {
            E::Progress(p) => {
                o.progress += 1;
                o.windows_total = p.windows_total;
            }
            E::Started(st) => o.started = Some(st),
            E::Delta(d) => {
                o.ids.extend(d.token_ids);
                o.text.push_str(&d.text);
            }
            E::Finished(f) => o.finished = Some(f),
        }
    }
    assert!(
        o.finished.is_some(),
        "stream ended without a finished event"
    );
    Ok(o)
}

/// Reads `s` until at least `n` tokens have streamed.
pub async fn tokens_flow(s: &mut tonic::Streaming<pb::GenerateResponse>, n: usize) {
    let mut got = 0;
    while got < n {
        if let Some(E::Delta(d)) = s.message().await.unwrap().unwrap().event {
            got += d.token_ids.len();
        }
    }
}

/// The error status that ends `s`, failing the test unless it comes within `limit` (`after` names the cause).
pub async fn error_within(
    s: &mut tonic::Streaming<pb::GenerateResponse>,
    limit: Duration,
    after: &str,
) -> tonic::Status {
    let t0 = Instant::now();
    let status = loop {
        match tokio::time::timeout(limit, s.message()).await {
            Err(_) => panic!("no error within {limit:?} of {after}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended normally after {after}"),
            Ok(Err(st)) => break st,
        }
    };
    assert!(t0.elapsed() < limit, "{:?} after {after}", t0.elapsed());
    status
}
