//! The documented clients against a real server: the Python example (grpcio, stubs generated from the proto)
//! and grpcurl through server reflection (no proto files).
//!
//! They need a Python with grpcio and grpcio-tools (`AFNEXT_PYTHON`) and grpcurl (`AFNEXT_GRPCURL`); `.ci/run`
//! installs both and sets the variables. Elsewhere the tests say they are skipped, except under `CI=true`,
//! where a missing tool is a failure.

use std::path::PathBuf;
use std::process::Command;

use afnext_e2e::{fixtures_dir, Server};
use afnext_server::pb;

fn tool(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set; .ci/run installs it")
        }
        None => {
            eprintln!("skipped: set {var} to run this test (see .ci/run)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_streams_the_same_answer_as_a_rust_client() {
    let Some(python) = tool("AFNEXT_PYTHON") else {
        return;
    };
    let srv = Server::start(&[]);
    let clip = fixtures_dir().join("audio/speech_7s.flac");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/afnext_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([
            "--server",
            &srv.addr,
            "--prompt",
            "Transcribe the audio.",
            "--max-new-tokens",
            "12",
            "--json",
        ])
        .arg("--audio")
        .arg(&clip)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The same request from Rust.
    let mut c = srv.client().await;
    let req = pb::GenerateRequest {
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            parts: vec![
                pb::Part {
                    kind: Some(pb::part::Kind::Audio(pb::AudioPart {
                        source: Some(pb::audio_part::Source::Data(std::fs::read(&clip).unwrap())),
                        format: 0,
                    })),
                },
                pb::Part {
                    kind: Some(pb::part::Kind::Text("Transcribe the audio.".into())),
                },
            ],
        }],
        max_new_tokens: Some(12),
        ..Default::default()
    };
    let mut s = c.generate(req).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Delta(d)) = m.event {
            ids.extend(d.token_ids);
        }
    }
    let py_ids: Vec<u32> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(py_ids, ids);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert!(v["finish_reason"]
        .as_str()
        .unwrap()
        .starts_with("FINISH_REASON_"));
}

#[test]
fn grpcurl_works_through_reflection() {
    let Some(grpcurl) = tool("AFNEXT_GRPCURL") else {
        return;
    };
    let srv = Server::start(&[]);
    let run = |args: &[&str]| {
        let out = Command::new(&grpcurl).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list = run(&["-plaintext", &srv.addr, "list"]);
    assert!(list.contains("afnext.v1.AfNext"), "{list}");
    let info = run(&["-plaintext", &srv.addr, "afnext.v1.AfNext/GetModelInfo"]);
    assert!(info.contains("maxAudioSeconds"), "{info}");
    let body = r#"{"messages":[{"role":"ROLE_USER","parts":[{"text":"Hello"}]}],"max_new_tokens":3,"ignore_eos":true}"#;
    let gen = run(&[
        "-plaintext",
        "-d",
        body,
        &srv.addr,
        "afnext.v1.AfNext/Generate",
    ]);
    assert!(gen.contains("FINISH_REASON_LENGTH"), "{gen}");
    assert_eq!(gen.matches("\"delta\"").count(), 3, "{gen}");
}
