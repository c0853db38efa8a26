//! `afnext decoder --tp 2` as real processes over loopback TCP: the same tokens as `afnext serve`, a clean
//! stop of the whole group on SIGTERM, and UNAVAILABLE within 5 s (then NOT_SERVING) when a rank is killed.

use std::process::Command;
use std::time::{Duration, Instant};

use afnext_e2e::cluster::decoder_group;
use afnext_e2e::grpc::{audio, clip, req, run, text, user};
use afnext_e2e::grpc::{error_within, tokens_flow};
use afnext_e2e::{afnext_bin, ckpt, signal, wait_exit, Server};
use afnext_server::pb;
use tonic::Code;

/// Rank 0 (serving the API) and the follower ranks of a TP group on tiny-a.
fn group(tp: usize) -> (Server, Vec<std::process::Child>) {
    decoder_group(tp, 0, &[])
}

fn requests() -> Vec<pb::GenerateRequest> {
    vec![
        req(
            vec![user(vec![
                audio(clip("speech_7s.flac")),
                text("Transcribe the audio."),
            ])],
            16,
        ),
        // Three windows.
        req(
            vec![user(vec![
                audio(clip("mix_75s.flac")),
                text("What is happening here?"),
            ])],
            12,
        ),
        req(vec![user(vec![text("Say something short.")])], 10),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tp2_group_of_processes_answers_like_serve_and_stops_cleanly() {
    let serve = Server::start(&[]);
    let mut c = serve.client().await;
    let mut want = Vec::new();
    for r in requests() {
        want.push(run(&mut c, r).await.unwrap().ids);
    }
    drop(serve);

    let (mut lead, mut followers) = group(2);
    let mut c = lead.client().await;
    // Concurrently, so the group runs batched steps with audio rows.
    let hs: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { run(&mut c, r).await.unwrap().ids })
        })
        .collect();
    for (i, (h, want)) in hs.into_iter().zip(&want).enumerate() {
        assert_eq!(&h.await.unwrap(), want, "request {i}");
    }
    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.model.is_empty());
    // SIGTERM to every rank (as Kubernetes does) while a request runs: it completes, then all exit 0.
    let mut s = c.generate(requests().remove(1)).await.unwrap().into_inner();
    let mut ids = Vec::new();
    let mut signalled = false;
    while let Some(m) = s.message().await.unwrap() {
        if !signalled {
            for f in &followers {
                signal(f, "-TERM");
            }
            lead.signal("-TERM");
            signalled = true;
        }
        if let Some(pb::generate_response::Event::Delta(d)) = m.event {
            ids.extend(d.token_ids);
        }
    }
    assert_eq!(ids, want[1]);
    assert!(lead.wait_exit(Duration::from_secs(20)).success());
    for f in &mut followers {
        let st = wait_exit(f, Duration::from_secs(10));
        assert!(
            st.success(),
            "a follower exits 0 when rank 0 stops the group: {st}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_rank_fails_in_flight_requests_within_5s_and_the_group_stops_serving() {
    let (lead, mut followers) = group(2);
    let mut c = lead.client().await;
    let mut long = req(vec![user(vec![text("Count forever.")])], 2000);
    long.ignore_eos = true;
    let mut s = c.generate(long).await.unwrap().into_inner();
    // Wait until tokens flow, then kill rank 1.
    tokens_flow(&mut s, 3).await;
    signal(&followers[0], "-KILL");
    let status = error_within(&mut s, Duration::from_secs(5), "killing a rank").await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("decoder group"),
        "{}",
        status.message()
    );
    // New requests are refused at once, and health says NOT_SERVING (routers stop sending here).
    let e = run(&mut c, req(vec![user(vec![text("Hello")])], 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", lead.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let st = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if st == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(Instant::now() < end, "health still {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = wait_exit(&mut followers[0], Duration::from_secs(5));
}

#[test]
fn an_impossible_split_is_refused_before_waiting_for_a_group() {
    let out = Command::new(afnext_bin())
        .args(["decoder", "--model"])
        .arg(ckpt("tiny-b"))
        .args(["--tp", "4", "--rank", "0", "--group-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("num_attention_heads 6"), "{err}");
}
