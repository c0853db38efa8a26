//! `afnext ask` against a real server: the audio is uploaded with progress, the answer equals the same
//! request over gRPC, `--json` has the documented fields, and server errors become a failing exit with the
//! status.

use std::process::Command;

use afnext_e2e::grpc::{audio, clip, req, run, text, user};
use afnext_e2e::{afnext_bin, fixtures_dir, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_uploads_streams_and_reports_like_the_api() {
    let srv = Server::start(&[]);
    let want = run(
        &mut srv.client().await,
        req(
            vec![user(vec![
                audio(clip("mix_75s.flac")),
                text("What is happening here?"),
            ])],
            10,
        ),
    )
    .await
    .unwrap();
    let clip_path = fixtures_dir().join("audio/mix_75s.flac");
    let ask = |extra: &[&str]| {
        Command::new(afnext_bin())
            .args(["ask", "--server", &srv.addr, "--audio"])
            .arg(&clip_path)
            .args([
                "--prompt",
                "What is happening here?",
                "--max-new-tokens",
                "10",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = ask(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
    assert_eq!(ids, want.ids);
    assert_eq!(v["text"], want.text);
    assert!(v["finish_reason"].is_string());
    assert!(v["usage"]["audio_seconds"].as_f64().unwrap() > 70.0);
    assert!(v["timings"]["time_to_first_token_ms"].as_f64().is_some());

    // Plain mode: the text on stdout, progress on stderr (lines, as stderr is not a terminal here).
    let out = ask(&["--session-id", "s"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        want.text.trim_end()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uploading:"), "{err}");

    // A request the server refuses: non-zero exit naming the status.
    let out = ask(&["--temperature=-1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("temperature"),
        "{err}"
    );
}
