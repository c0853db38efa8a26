//! `afnext serve` as a real process, used over real gRPC on loopback: concurrency, cancellation, follow-up
//! caching, bad input, queue limits, deadlines, uploads, health, reflection and SIGTERM draining.

use std::time::Duration;

use afnext_e2e::grpc::{audio, clip, req, run, stats, text, user, wait_for};
use afnext_e2e::{ckpt, lone_logits, top2_gap, Server};
use afnext_server::pb;
use afnext_server::pb::af_next_client::AfNextClient;
use pb::generate_response::Event as E;
use tonic::transport::Channel;
use tonic::Code;

fn sixteen() -> Vec<pb::GenerateRequest> {
    let clips = [
        "speech_7s.flac",
        "speech_40s.flac",
        "edge_30_01s.flac",
        "stereo_44k_7s.mp3",
    ];
    (0..16)
        .map(|i| {
            let mut r = if i % 5 == 4 {
                req(
                    vec![user(vec![text("Say something short.")])],
                    10 + i % 4 * 3,
                )
            } else {
                req(
                    vec![user(vec![
                        audio(clip(clips[i as usize % 4])),
                        text("Transcribe the audio."),
                    ])],
                    10 + i % 4 * 3,
                )
            };
            if i % 3 == 0 {
                r.sampling = Some(pb::SamplingParams {
                    repetition_penalty: Some(1.2),
                    ..Default::default()
                });
            }
            r
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_equal_the_same_requests_alone() {
    let srv = Server::start(&[]);
    let mut c = srv.client().await;
    let reqs = sixteen();
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(run(&mut c, r.clone()).await.unwrap());
    }
    let tasks: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { run(&mut c, r).await })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.unwrap().unwrap());
    }
    let model = afnext_model::AfNext::load(
        &ckpt("tiny-a"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let proc = afnext_prompt::PromptProcessor::load(&ckpt("tiny-a")).unwrap();
    let mut near_ties = 0;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        if a.ids == t.ids {
            continue;
        }
        let k = a.ids.iter().zip(&t.ids).take_while(|(x, y)| x == y).count();
        let conv = to_conversation(&reqs[i]);
        let gap = top2_gap(&lone_logits(&model, &proc, &conv, &a.ids[..k]));
        assert!(
            gap <= 1e-4,
            "request {i} differs at token {k}, top-2 gap {gap}"
        );
        near_ties += 1;
    }
    eprintln!("16 concurrent gRPC streams: {near_ties} diverged at a near-tie");
    let st = stats(&mut c).await;
    assert_eq!(st.kv_blocks_used, 0, "{st:?}");
}

/// The engine-side conversation of a request built by `sixteen` (for the near-tie check).
fn to_conversation(r: &pb::GenerateRequest) -> afnext_prompt::Conversation {
    afnext_server::convert::generate_request(r.clone(), None, |_| None)
        .unwrap()
        .conversation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_stream_returns_its_kv_blocks() {
    let srv = Server::start(&[]);
    let mut c = srv.client().await;
    let mut r = req(
        vec![user(vec![
            audio(clip("speech_40s.flac")),
            text("Describe."),
        ])],
        2000,
    );
    r.ignore_eos = true;
    let mut s = c.generate(r).await.unwrap().into_inner();
    let mut deltas = 0;
    while deltas < 3 {
        if let E::Delta(_) = s.message().await.unwrap().unwrap().event.unwrap() {
            deltas += 1;
        }
    }
    let st = stats(&mut c).await;
    assert!(st.kv_blocks_used > 0 && st.running_requests == 1, "{st:?}");
    drop(s);
    wait_for(&mut c, "blocks returned", |st| {
        st.kv_blocks_used == 0 && st.running_requests == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_turn_is_served_from_the_caches() {
    let srv = Server::start(&[]);
    let mut c = srv.client().await;
    let data = clip("speech_40s.flac");
    let first = vec![user(vec![
        audio(data.clone()),
        text("Transcribe the audio."),
    ])];
    let a = run(&mut c, req(first.clone(), 8)).await.unwrap();
    assert!(a.progress > 0);
    let encoded = stats(&mut c).await.windows_encoded;
    let mut follow = first;
    follow.push(pb::Message {
        role: pb::Role::Assistant as i32,
        parts: vec![text(&a.text)],
    });
    follow.push(user(vec![text("Who is speaking?")]));
    let b = run(&mut c, req(follow, 8)).await.unwrap();
    let fu = b.finished.unwrap().usage.unwrap();
    assert_eq!(b.progress, 0, "no encoding progress on the follow-up");
    assert_eq!(fu.audio_cache_hits, 1);
    let prompt = a.finished.unwrap().usage.unwrap().prompt_tokens;
    assert!(
        fu.cached_tokens >= (prompt - 1) / 16 * 16,
        "cached {} of {prompt}",
        fu.cached_tokens
    );
    assert_eq!(b.started.unwrap().cached_tokens, fu.cached_tokens);
    let st = stats(&mut c).await;
    assert_eq!(st.windows_encoded, encoded, "the encoder ran again");
}

fn wav(samples: &[f32], rate: u32) -> Vec<u8> {
    afnext_audio::encode_wav(samples, rate, 1, afnext_audio::WavFormat::Float32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_the_server_keeps_serving() {
    let srv = Server::start(&["--max-new-tokens-limit", "100"]);
    let mut c = srv.client().await;
    let one = |p: pb::Part| req(vec![user(vec![p, text("Transcribe.")])], 4);
    let mut header = wav(&vec![0.1; 16000], 16000);
    header.truncate(30);
    let mut nan = vec![0.1f32; 16000];
    nan[500] = f32::NAN;
    // 8 kHz 8-bit would be smallest, but the float writer is what we have: 1800 s + 1 sample at 2 kHz.
    let too_long = wav(&vec![0.01; 1800 * 2000 + 1], 2000);
    let junk: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        (
            "empty audio",
            one(audio(vec![])),
            Code::InvalidArgument,
            "empty",
        ),
        (
            "random bytes",
            one(audio(junk)),
            Code::InvalidArgument,
            "audio 0",
        ),
        (
            "truncated wav",
            one(audio(header)),
            Code::InvalidArgument,
            "audio 0",
        ),
        (
            "opus",
            one(audio(clip("tone_opus.ogg"))),
            Code::InvalidArgument,
            "codec",
        ),
        (
            "NaN samples",
            one(audio(wav(&nan, 16000))),
            Code::InvalidArgument,
            "NaN",
        ),
        (
            "too long",
            one(audio(too_long)),
            Code::InvalidArgument,
            "limit is 1800 s",
        ),
        (
            "too short",
            one(audio(wav(&[0.1; 100], 16000))),
            Code::InvalidArgument,
            "at least",
        ),
        (
            "reserved marker",
            req(vec![user(vec![text("hi <sound> there")])], 4),
            Code::InvalidArgument,
            "reserved",
        ),
        (
            "no messages",
            req(vec![], 4),
            Code::InvalidArgument,
            "messages",
        ),
        (
            "missing role",
            req(
                vec![pb::Message {
                    role: 0,
                    parts: vec![text("hi")],
                }],
                4,
            ),
            Code::InvalidArgument,
            "role",
        ),
        (
            "empty part",
            req(vec![user(vec![pb::Part { kind: None }])], 4),
            Code::InvalidArgument,
            "part 0",
        ),
        (
            "unknown upload",
            one(pb::Part {
                kind: Some(pb::part::Kind::Audio(pb::AudioPart {
                    source: Some(pb::audio_part::Source::UploadId("nope".into())),
                    format: 0,
                })),
            }),
            Code::InvalidArgument,
            "upload",
        ),
        (
            "negative temperature",
            pb::GenerateRequest {
                sampling: Some(pb::SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                }),
                ..req(vec![user(vec![text("hi")])], 4)
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "min_new_tokens over max_new_tokens",
            pb::GenerateRequest {
                sampling: Some(pb::SamplingParams {
                    min_new_tokens: 5,
                    ..Default::default()
                }),
                ..req(vec![user(vec![text("hi")])], 4)
            },
            Code::InvalidArgument,
            "min_new_tokens (5) must be at most max_new_tokens (4)",
        ),
        (
            "max_new_tokens over the limit",
            req(vec![user(vec![text("hi")])], 101),
            Code::OutOfRange,
            "limit is 100",
        ),
        (
            "max_new_tokens 0",
            req(vec![user(vec![text("hi")])], 0),
            Code::InvalidArgument,
            "at least 1",
        ),
    ];
    for (what, r, code, needle) in cases {
        let e = match run(&mut c, r).await {
            Err(e) => e,
            Ok(_) => panic!("{what}: accepted"),
        };
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{what}: message {:?} lacks {needle:?}",
            e.message()
        );
    }
    // Still serving.
    let ok = run(&mut c, one(audio(clip("speech_7s.flac"))))
        .await
        .unwrap();
    assert!(ok.finished.is_some());
    // An oversized message is refused by the transport limit.
    let srv2 = Server::start(&["--max-message-mib", "1"]);
    let mut c2 = srv2.client().await;
    let e = run(&mut c2, one(audio(vec![0u8; 2 << 20])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gives_resource_exhausted_and_deadlines_are_enforced() {
    let srv = Server::start(&[
        "--max-running",
        "1",
        "--max-waiting",
        "0",
        "--max-batch-tokens",
        "64",
    ]);
    let mut c = srv.client().await;
    let mut long = req(vec![user(vec![text("Count forever.")])], 2000);
    long.ignore_eos = true;
    let mut s = c.generate(long.clone()).await.unwrap().into_inner();
    s.message().await.unwrap();
    let e = run(&mut c, req(vec![user(vec![text("hi")])], 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("1 requests"), "{}", e.message());
    drop(s);
    // Wait for the slot to free, then a call with a 300 ms deadline on a 2000-token request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut r = tonic::Request::new(long);
    r.set_timeout(Duration::from_millis(300));
    let res = async {
        let mut s = c.generate(r).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let e = res.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    wait_for(&mut c, "idle", |st| {
        st.kv_blocks_used == 0 && st.in_flight_requests == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_model_info_health_and_reflection() {
    let srv = Server::start(&[]);
    let mut c = srv.client().await;
    let data = clip("mix_75s.flac");
    let chunks: Vec<pb::UploadAudioRequest> = data
        .chunks(64 << 10)
        .enumerate()
        .map(|(i, ch)| pb::UploadAudioRequest {
            chunk: ch.to_vec(),
            format: if i == 0 {
                pb::AudioFormat::Flac as i32
            } else {
                0
            },
        })
        .collect();
    let up = c
        .upload_audio(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.size_bytes as usize, data.len());
    let part = pb::Part {
        kind: Some(pb::part::Kind::Audio(pb::AudioPart {
            source: Some(pb::audio_part::Source::UploadId(up.upload_id.clone())),
            format: 0,
        })),
    };
    let o = run(&mut c, req(vec![user(vec![part, text("Describe.")])], 4))
        .await
        .unwrap();
    // 75 s: three windows, progress per batch of windows.
    assert!(o.progress >= 1);
    let u = o.finished.unwrap().usage.unwrap();
    assert!((u.audio_seconds - 75.0).abs() < 0.1, "{}", u.audio_seconds);
    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let l = info.limits.unwrap();
    assert_eq!(l.max_audio_seconds, 1800.0);
    assert_eq!(info.dtype, "f32");
    assert_eq!(info.vocab_size, 390);
    // Health.
    let ch = Channel::from_shared(format!("http://{}", srv.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let resp = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "afnext.v1.AfNext".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Reflection lists the service.
    use tonic_reflection::pb::v1 as r;
    let mut rc = r::server_reflection_client::ServerReflectionClient::new(ch);
    let q = r::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut s = rc
        .server_reflection_info(tokio_stream::iter(vec![q]))
        .await
        .unwrap()
        .into_inner();
    let m = s.message().await.unwrap().unwrap();
    let Some(r::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        m.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"afnext.v1.AfNext".to_string()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_exits_zero() {
    let mut srv = Server::start(&["--grace-period-s", "60"]);
    let mut c = srv.client().await;
    let mut r = req(vec![user(vec![text("Tell me a story.")])], 40);
    r.ignore_eos = true;
    let mut s = c.generate(r).await.unwrap().into_inner();
    s.message().await.unwrap();
    srv.signal("-TERM");
    let mut deltas = 0;
    let mut finished = None;
    while let Some(m) = s.message().await.unwrap() {
        match m.event.unwrap() {
            E::Delta(_) => deltas += 1,
            E::Finished(f) => finished = Some(f),
            _ => {}
        }
    }
    let f = finished.expect("the in-flight stream finished");
    assert_eq!(f.usage.unwrap().completion_tokens, 40);
    assert!(deltas > 0);
    let st = srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    // Nothing listens any more.
    assert!(AfNextClient::connect(format!("http://{}", srv.addr))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_what_outlives_the_grace_period() {
    let mut srv = Server::start(&["--grace-period-s", "1", "--max-new-tokens-limit", "100000"]);
    let mut c = srv.client().await;
    let mut r = req(vec![user(vec![text("Go on.")])], 100_000);
    r.ignore_eos = true;
    let mut s = c.generate(r).await.unwrap().into_inner();
    s.message().await.unwrap();
    srv.signal("-TERM");
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a 100 000-token stream cannot finish within a 1 s grace period"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let st = srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
}
