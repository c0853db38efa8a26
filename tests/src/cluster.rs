//! Starting the cluster's processes on loopback for tests: decoder groups, encoder workers, routers.

use std::process::{Child, Command, Stdio};

use crate::{afnext_bin, ckpt, free_port, Server};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A decoder group of `tp` ranks on tiny-a whose leader serves on `127.0.0.1:port` (0: any free port):
/// rank 0 (serving) and the follower processes.
pub fn decoder_group(tp: usize, port: u16, extra: &[&str]) -> (Server, Vec<Child>) {
    let group = format!("127.0.0.1:{}", free_port());
    let model = ckpt("tiny-a").display().to_string();
    let tp_s = tp.to_string();
    let followers = (1..tp)
        .map(|r| {
            Command::new(afnext_bin())
                .args(["decoder", "--model", &model, "--tp", &tp_s])
                .args(["--rank", &r.to_string(), "--group-addr", &group])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let listen = format!("127.0.0.1:{port}");
    let mut args = strings(&[
        "decoder",
        "--model",
        &model,
        "--tp",
        &tp_s,
        "--rank",
        "0",
        "--group-addr",
        &group,
        "--listen",
        &listen,
        "--collective-timeout-s",
        "10",
    ]);
    args.extend(strings(extra));
    (Server::spawn(&args), followers)
}

/// An encoder worker on tiny-a.
pub fn encoder(extra: &[&str]) -> Server {
    let mut args = strings(&["encoder", "--model"]);
    args.push(ckpt("tiny-a").display().to_string());
    args.extend(strings(&["--listen", "127.0.0.1:0"]));
    args.extend(strings(extra));
    Server::spawn(&args)
}

/// A router over the given workers.
pub fn router(decoders: &[&str], encoders: &[&str], extra: &[&str]) -> Server {
    let mut args = strings(&["router", "--model"]);
    args.push(ckpt("tiny-a").display().to_string());
    args.extend(strings(&["--listen", "127.0.0.1:0"]));
    if !decoders.is_empty() {
        args.push("--decoders".into());
        args.push(decoders.join(","));
    }
    if !encoders.is_empty() {
        args.push("--encoders".into());
        args.push(encoders.join(","));
    }
    args.extend(strings(extra));
    Server::spawn(&args)
}

/// A real etcd (apt `etcd-server`) on free loopback ports with its own data directory; killed on drop.
/// `None` (the test is skipped) when there is no `etcd` binary, except under `CI=true`, where that fails.
pub struct Etcd {
    child: Option<Child>,
    pub endpoint: String,
    peer: String,
    dir: std::path::PathBuf,
}

impl Etcd {
    pub fn start(tag: &str) -> Option<Etcd> {
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("etcd is not installed (apt etcd-server); .ci/run installs it");
            }
            eprintln!("skipped: no etcd binary (apt etcd-server)");
            return None;
        }
        let mut e = Etcd {
            child: None,
            endpoint: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            dir: crate::tempdir(&format!("etcd-{tag}")),
        };
        e.spawn();
        Some(e)
    }

    fn spawn(&mut self) {
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &format!("t={}", self.peer)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        // Ready when the client port answers.
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(std::time::Instant::now() < end, "etcd did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stops etcd (SIGTERM) and starts it again on the same ports and data.
    pub fn restart(&mut self, down_for: std::time::Duration) {
        if let Some(mut c) = self.child.take() {
            crate::signal(&c, "-TERM");
            crate::wait_exit(&mut c, std::time::Duration::from_secs(10));
        }
        std::thread::sleep(down_for);
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
