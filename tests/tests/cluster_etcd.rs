//! Discovery through a real etcd: workers register and the router finds them; SIGTERM deregisters; a
//! worker that dies leaves when its lease expires; a restarted worker takes traffic; an etcd restart in the
//! middle of a request loses nothing.

use std::time::{Duration, Instant};

use afnext_e2e::cluster::{decoder_group, encoder, router, Etcd};
use afnext_e2e::grpc::{audio, clip, req, run, text, user};
use afnext_e2e::wait_exit;
use afnext_server::pb;
use afnext_server::pb::af_next_client::AfNextClient;
use tonic::transport::Channel;

/// The addresses registered under `tier`, read with etcdctl.
fn registered(endpoint: &str, tier: &str) -> Vec<String> {
    let out = std::process::Command::new("etcdctl")
        .args(["--endpoints", endpoint, "get", "--prefix", "--keys-only"])
        .arg(format!("/afnext/{tier}/"))
        .output()
        .expect("etcdctl (apt etcd-client)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.strip_prefix(&format!("/afnext/{tier}/"))
                .map(str::to_string)
        })
        .collect()
}

fn three() -> pb::GenerateRequest {
    req(
        vec![user(vec![
            audio(clip("mix_75s.flac")),
            text("What is happening here?"),
        ])],
        8,
    )
}

/// Retries `three()` until it succeeds (the router may not have seen the workers yet).
async fn until_served(c: &mut AfNextClient<Channel>, within: Duration) -> Vec<u32> {
    let end = Instant::now() + within;
    loop {
        match run(c, three()).await {
            Ok(o) => return o.ids,
            Err(e) => assert!(Instant::now() < end, "not served within {within:?}: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_found_through_etcd_come_and_go_and_an_etcd_restart_loses_nothing() {
    let Some(mut etcd) = Etcd::start("discovery") else {
        return;
    };
    let ep = etcd.endpoint.clone();
    let reg = ["--etcd-endpoints", &ep, "--lease-ttl-s", "10"];
    let rt = router(&[], &[], &["--etcd-endpoints", &ep]);
    let mut c = rt.client().await;
    // Nothing registered yet: a clear UNAVAILABLE.
    let e = run(&mut c, three()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let (dec, mut followers) = decoder_group(2, 0, &reg);
    let mut e1 = encoder(&reg);
    let want = until_served(&mut c, Duration::from_secs(15)).await;
    assert_eq!(registered(&ep, "decoders"), vec![dec.addr.clone()]);

    // SIGTERM deregisters at once (long before the 10 s lease would expire); the second encoder, with a
    // short lease, takes over.
    let mut e2 = encoder(&["--etcd-endpoints", &ep, "--lease-ttl-s", "2"]);
    let end = Instant::now() + Duration::from_secs(5);
    while registered(&ep, "encoders").len() < 2 {
        assert!(Instant::now() < end, "{:?}", registered(&ep, "encoders"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e1.signal("-TERM");
    assert!(wait_exit(&mut e1.child, Duration::from_secs(10)).success());
    assert_eq!(registered(&ep, "encoders"), vec![e2.addr.clone()]);
    assert_eq!(run(&mut c, three()).await.unwrap().ids, want);

    // etcd restarts while a request runs: it completes, and so do the ones after.
    let h = {
        let mut c = c.clone();
        tokio::spawn(async move { run(&mut c, three()).await })
    };
    etcd.restart(Duration::from_millis(500));
    assert_eq!(h.await.unwrap().unwrap().ids, want);
    assert_eq!(run(&mut c, three()).await.unwrap().ids, want);

    // A worker started after the restart registers and takes traffic; a killed one leaves when its lease
    // expires.
    let e3 = encoder(&reg);
    e2.signal("-KILL");
    let _ = wait_exit(&mut e2.child, Duration::from_secs(5));
    let end = Instant::now() + Duration::from_secs(10);
    while registered(&ep, "encoders") != vec![e3.addr.clone()] {
        assert!(Instant::now() < end, "{:?}", registered(&ep, "encoders"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run(&mut c, three()).await.unwrap().ids, want);
    // The decoder group registered again after the etcd restart (same lease or a new one).
    assert_eq!(registered(&ep, "decoders"), vec![dec.addr.clone()]);
    // A group that loses a rank leaves the registry (its idle ping notices within a second or two).
    afnext_e2e::signal(&followers[0], "-KILL");
    let _ = wait_exit(&mut followers[0], Duration::from_secs(5));
    let end = Instant::now() + Duration::from_secs(5);
    while !registered(&ep, "decoders").is_empty() {
        assert!(Instant::now() < end, "the broken group is still registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
