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
