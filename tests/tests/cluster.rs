//! The cluster as real processes on loopback: router + 2 encoder workers + a TP=2 decoder group give exactly
//! the tokens of `afnext serve`; encoder workers that stall or die mid-request have their windows re-sent;
//! a decoder group that loses a rank fails its request with UNAVAILABLE within 5 s, the router stops
//! routing there, and a restarted group takes traffic again.

use std::time::{Duration, Instant};

use afnext_e2e::cluster::{decoder_group, encoder, router};
use afnext_e2e::grpc::{audio, clip, error_within, req, run, stats, text, tokens_flow, user};
use afnext_e2e::{free_port, signal, wait_exit, Server};
use afnext_server::pb;
use tonic::Code;

fn assistant(t: &str) -> pb::Message {
    pb::Message {
        role: pb::Role::Assistant as i32,
        parts: vec![text(t)],
    }
}

fn requests() -> Vec<pb::GenerateRequest> {
    vec![
        // One window.
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
        // Multi-turn, two audios.
        req(
            vec![
                user(vec![audio(clip("speech_40s.flac")), text("Describe it.")]),
                assistant("Someone speaks."),
                user(vec![
                    audio(clip("stereo_44k_7s.mp3")),
                    text("And this one?"),
                ]),
            ],
            10,
        ),
        req(vec![user(vec![text("Say something short.")])], 10),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn router_encoders_and_a_tp2_group_answer_exactly_like_serve() {
    let serve = Server::start(&[]);
    let mut c = serve.client().await;
    let mut want = Vec::new();
    for r in requests() {
        want.push(run(&mut c, r).await.unwrap());
    }
    drop(serve);

    let (dec, _followers) = decoder_group(2, 0, &[]);
    let (e1, e2) = (encoder(&[]), encoder(&[]));
    let rt = router(&[&dec.addr], &[&e1.addr, &e2.addr], &[]);
    let mut c = rt.client().await;
    // Concurrently: windows of several requests batch on the encoders, steps batch on the group.
    let hs: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { run(&mut c, r).await.unwrap() })
        })
        .collect();
    for (i, (h, want)) in hs.into_iter().zip(&want).enumerate() {
        let got = h.await.unwrap();
        assert_eq!(got.ids, want.ids, "request {i}");
        assert_eq!(got.text, want.text, "request {i}");
        assert_eq!(got.windows_total, want.windows_total, "request {i}");
        let windows = got.windows_total as usize;
        assert_eq!(
            got.progress, windows,
            "request {i}: one progress event per window"
        );
    }
    // A follow-up with the same audio and session: no window is encoded again, the prefix is cached.
    let mut first = requests().remove(1);
    first.session_id = "s1".into();
    let before = stats(&mut c).await.windows_encoded;
    let again = run(&mut c, first).await.unwrap();
    assert_eq!(again.ids, want[1].ids);
    let u = again.finished.unwrap().usage.unwrap();
    assert_eq!(u.audio_cache_hits, 1);
    assert!(u.cached_tokens > 0, "{u:?}");
    assert_eq!(stats(&mut c).await.windows_encoded, before);
    // Cancellation reaches the group: a dropped stream frees its blocks there.
    let mut long = req(vec![user(vec![text("Count forever.")])], 2000);
    long.ignore_eos = true;
    let mut s = c.generate(long).await.unwrap().into_inner();
    while !matches!(
        s.message().await.unwrap().unwrap().event,
        Some(pb::generate_response::Event::Delta(_))
    ) {}
    drop(s);
    let mut d = dec.client().await;
    afnext_e2e::grpc::wait_for(&mut d, "the cancelled request freed", |st| {
        st.in_flight_requests == 0 && st.kv_blocks_used == 0
    })
    .await;
    // Deadlines travel too.
    let mut r = tonic::Request::new({
        let mut l = req(vec![user(vec![text("Count forever.")])], 2000);
        l.ignore_eos = true;
        l
    });
    r.set_timeout(Duration::from_millis(300));
    let e = match c.generate(r).await {
        Err(e) => e,
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("a 2000-token request finished within 300 ms"),
                    Err(e) => break e,
                }
            }
        }
    };
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // Bad input is refused by the router with the same status as serve.
    let bad = run(
        &mut c,
        req(vec![user(vec![audio(b"not audio".to_vec())])], 4),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_of_a_stalled_or_killed_encoder_are_sent_to_another() {
    let serve = Server::start(&[]);
    let three = || {
        req(
            vec![user(vec![
                audio(clip("mix_75s.flac")),
                text("What is happening here?"),
            ])],
            12,
        )
    };
    let want = run(&mut serve.client().await, three()).await.unwrap().ids;
    drop(serve);
    let (dec, _f) = decoder_group(1, 0, &[]);
    let e1 = encoder(&[]);
    let mut e2 = encoder(&[]);
    // The health poller must not notice the stall first: this tests the per-window timeout.
    let rt = router(
        &[&dec.addr],
        &[&e1.addr, &e2.addr],
        &["--window-timeout-s", "2", "--health-interval-ms", "600000"],
    );
    let mut c = rt.client().await;
    // Stalled: windows sent to e2 time out and go to e1.
    e2.signal("-STOP");
    let t0 = Instant::now();
    let got = run(&mut c, three()).await.unwrap();
    assert_eq!(got.ids, want);
    eprintln!("with a stalled encoder: {:?}", t0.elapsed());
    // Killed while windows are in flight on it.
    let h = {
        let mut c = c.clone();
        tokio::spawn(async move { run(&mut c, three()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    e2.signal("-KILL");
    let _ = wait_exit(&mut e2.child, Duration::from_secs(5));
    assert_eq!(h.await.unwrap().unwrap().ids, want);
    // Dead from the start: connection refused, straight to the other.
    assert_eq!(run(&mut c, three()).await.unwrap().ids, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_that_loses_a_rank_fails_fast_is_avoided_and_takes_traffic_after_a_restart() {
    let (pa, pb_) = (free_port(), free_port());
    let (a, mut a_followers) = decoder_group(2, pa, &[]);
    let (b, _bf) = decoder_group(1, pb_, &[]);
    let e1 = encoder(&[]);
    let rt = router(
        &[&a.addr, &b.addr],
        &[&e1.addr],
        &["--health-interval-ms", "300"],
    );
    let mut c = rt.client().await;
    // Find a session that the router sends to group A: run short requests until A has served one.
    let mut a_client = a.client().await;
    let mut session = String::new();
    for i in 0..64 {
        let mut r = req(vec![user(vec![text("Hi")])], 2);
        r.session_id = format!("s{i}");
        let before = stats(&mut a_client).await.requests_finished;
        run(&mut c, r).await.unwrap();
        if stats(&mut a_client).await.requests_finished > before {
            session = format!("s{i}");
            break;
        }
    }
    assert!(!session.is_empty(), "no session was routed to group A");
    let mut long = req(vec![user(vec![text("Count forever.")])], 2000);
    long.ignore_eos = true;
    long.session_id = session.clone();
    let mut s = c.generate(long).await.unwrap().into_inner();
    tokens_flow(&mut s, 3).await;
    signal(&a_followers[0], "-KILL");
    let status = error_within(&mut s, Duration::from_secs(5), "killing a rank").await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The same session (and every other) is now served by group B.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut b_client = b.client().await;
    let before = stats(&mut b_client).await.requests_finished;
    for i in 0..4 {
        let mut r = req(vec![user(vec![text("Hello")])], 3);
        r.session_id = if i == 0 {
            session.clone()
        } else {
            format!("x{i}")
        };
        run(&mut c, r).await.unwrap();
    }
    assert_eq!(stats(&mut b_client).await.requests_finished, before + 4);
    // Restart group A on the same address: the router's health checks bring it back.
    drop(a);
    let _ = wait_exit(&mut a_followers[0], Duration::from_secs(5));
    let (a2, _a2f) = decoder_group(2, pa, &[]);
    let mut a2_client = a2.client().await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut r = req(vec![user(vec![text("Hi again")])], 2);
        r.session_id = session.clone();
        run(&mut c, r).await.unwrap();
        if stats(&mut a2_client).await.requests_finished > 0 {
            break;
        }
        assert!(Instant::now() < end, "the restarted group took no traffic");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
