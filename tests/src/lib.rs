//! Helpers for the end-to-end and golden tests: fixture paths, safetensors loading and float comparison.
//!
//! Fixtures come from `tools/fixtures/run.sh` (transformers 5.23 on tiny random checkpoints); see
//! `tests/fixtures/README.md` for the layout and the index-tensor conventions (`__frames`, `rows750`, ...).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod cluster;
pub mod grpc;
use safetensors::{Dtype, SafeTensors};

/// The device the model tests run on, from `AFNEXT_TEST_DEVICE`: `cpu` (the default) or `cuda:N`.
/// `scripts/gpu-check.sh` runs the golden tests with `cuda:0` on a lent GPU. One device per test process:
/// candle refuses to mix tensors of two `CudaDevice`s, and each `new_cuda` makes a new one.
pub fn test_device() -> candle_core::Device {
    static DEV: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    DEV.get_or_init(|| match std::env::var("AFNEXT_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => candle_core::Device::Cpu,
        Ok(s) => {
            afnext_model::device::open(s).unwrap_or_else(|e| panic!("AFNEXT_TEST_DEVICE={s}: {e}"))
        }
    })
    .clone()
}

/// `tests/fixtures` of this package, or `$AFNEXT_FIXTURES` (test executables carried to another machine,
/// as scripts/gpu-check.sh does, find the fixtures of the checkout they run in).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("AFNEXT_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// The `afnext` binary of this build: `$AFNEXT_BIN`, or `afnext` next to the test executable's `deps/`
/// directory. `cargo test --workspace` builds it (the cli package has integration tests, so cargo builds its
/// binary before running any test).
pub fn afnext_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AFNEXT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("afnext{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: run the tests with `cargo test --workspace` (or `cargo build -p afnext-cli` first)",
        bin.display()
    );
    bin
}

/// A fresh, empty directory for one test (`tag` keeps concurrent tests apart; the process id keeps
/// concurrent test binaries apart). Left behind for inspection until the next run of the same test, which
/// removes the directories of its tag left by processes that are gone (so runs do not pile them up).
pub fn tempdir(tag: &str) -> PathBuf {
    let prefix = format!("afnext-e2e-{tag}-");
    // Liveness is read from /proc: without it (not Linux) nothing is swept.
    let proc_fs = Path::new("/proc/self").exists();
    if let Some(entries) = proc_fs
        .then(|| std::fs::read_dir(std::env::temp_dir()).ok())
        .flatten()
    {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(&prefix));
            // Only `<prefix><pid>` of a process that no longer exists (another tag's name never parses).
            if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let d = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a temporary directory");
    d
}

/// Largest absolute difference between two candle tensors of one shape, taken in f32 on the CPU (so that
/// tensors of any dtype and device compare).
pub fn max_tensor_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let host = |t: &candle_core::Tensor| {
        t.to_device(&candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .expect("tensor to host f32")
    };
    (host(a) - host(b))
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("max difference of two tensors of one shape")
}

/// A tiny random checkpoint of the fixtures (`tiny-a` to `tiny-f`).
pub fn ckpt(name: &str) -> PathBuf {
    fixtures_dir().join("ckpt").join(name)
}

/// One tensor read from a fixture, as plain host data.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    pub fn f32(&self) -> Result<Vec<f32>> {
        self.expect(Dtype::F32)?;
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
    pub fn f64(&self) -> Result<Vec<f64>> {
        self.expect(Dtype::F64)?;
        Ok(self
            .bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
    pub fn i64(&self) -> Result<Vec<i64>> {
        self.expect(Dtype::I64)?;
        Ok(self
            .bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
    pub fn i32(&self) -> Result<Vec<i32>> {
        self.expect(Dtype::I32)?;
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
    /// Token ids stored as i64 (the fixtures' `gen_greedy_ids`, row indices).
    pub fn ids(&self) -> Result<Vec<u32>> {
        self.i64()?
            .into_iter()
            .map(|i| u32::try_from(i).map_err(|_| anyhow!("id {i} is not a u32")))
            .collect()
    }
    fn expect(&self, d: Dtype) -> Result<()> {
        if self.dtype != d {
            bail!("tensor is {:?}, expected {:?}", self.dtype, d);
        }
        Ok(())
    }
}

/// All tensors of a safetensors file.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let t = Tensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            };
            (name, t)
        })
        .collect())
}

/// The shared processor outputs of one reference case (`ref/<case>.safetensors`).
pub fn reference(case: &str) -> Result<HashMap<String, Tensor>> {
    load_tensors(
        &fixtures_dir()
            .join("ref")
            .join(format!("{case}.safetensors")),
    )
}

/// The model-stage outputs of one reference case on one checkpoint (`ref/<ckpt>/<case>.safetensors`).
pub fn model_reference(ck: &str, case: &str) -> Result<HashMap<String, Tensor>> {
    load_tensors(
        &fixtures_dir()
            .join("ref")
            .join(ck)
            .join(format!("{case}.safetensors")),
    )
}

/// The case's metadata (`ref/<case>.json`).
pub fn reference_meta(case: &str) -> Result<serde_json::Value> {
    let p = fixtures_dir().join("ref").join(format!("{case}.json"));
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

pub fn get<'a>(m: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    m.get(name)
        .ok_or_else(|| anyhow!("fixture has no tensor {name}"))
}

/// Largest absolute difference and where it is; fails on NaN or length mismatch.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> Result<(f32, usize)> {
    if got.len() != want.len() {
        bail!("length mismatch: got {}, want {}", got.len(), want.len());
    }
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (a - b).abs();
        if d.is_nan() {
            bail!("NaN at {i}: got {a}, want {b}");
        }
        if d > worst.0 {
            worst = (d, i);
        }
    }
    Ok(worst)
}

/// Fails with the worst element when `max |got - want| > atol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32) -> f32 {
    let (d, i) = max_abs_diff(got, want).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        d <= atol,
        "{what}: max abs diff {d} > {atol} at {i} (got {}, want {})",
        got[i],
        want[i]
    );
    d
}

/// Logits after `prompt + generated` through the single-sequence path (the one the golden tests hold to
/// transformers), to judge a divergence between batched and lone runs.
pub fn lone_logits(
    model: &afnext_model::AfNext,
    proc: &afnext_prompt::PromptProcessor,
    conv: &afnext_prompt::Conversation,
    generated: &[u32],
) -> Vec<f32> {
    use candle_core::{Device, Tensor as T};
    let p = afnext_prompt::prepare(proc, conv, afnext_audio::Overflow::Reject).unwrap();
    let fe = afnext_audio::Frontend::new(&proc.config().frontend).unwrap();
    let mut rows = Vec::new();
    for a in &p.audios {
        let f = afnext_prompt::prepare::features(&fe, a, 1).unwrap();
        let n = f.plan.windows.len();
        let x = T::from_vec(f.features.clone(), (n, f.n_mels, f.frames), &Device::Cpu).unwrap();
        let valid: Vec<usize> = f.plan.windows.iter().map(|w| w.valid_frames).collect();
        let idx: Vec<usize> = (0..n).collect();
        rows.push(
            model
                .encode_windows(&x, &valid, &idx)
                .unwrap()
                .embeddings()
                .unwrap(),
        );
    }
    let audio = (!rows.is_empty()).then(|| T::cat(&rows, 0).unwrap());
    let prompt = model
        .embed_prompt(&p.prompt.input_ids, audio.as_ref())
        .unwrap();
    let all = if generated.is_empty() {
        prompt
    } else {
        let gen = model.decoder.embed(generated).unwrap();
        T::cat(&[&prompt, &gen], 1).unwrap()
    };
    let mut cache = model.new_cache();
    let h = model.prefill(&all, &mut cache, 4096, false).unwrap();
    model
        .decoder
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Difference between the two largest values.
pub fn top2_gap(l: &[f32]) -> f32 {
    let mut v = l.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

/// `afnext serve` on the tiny-a checkpoint as a child process on a free loopback port; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// The `/metrics` endpoint's address, when the process serves one.
    pub metrics: Option<String>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec!["serve".into(), "--model".into()];
        args.push(ckpt("tiny-a").display().to_string());
        args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(&args)
    }

    /// `afnext ARGS` (a command that serves gRPC and prints `afnext serving on ADDR`).
    pub fn spawn(args: &[String]) -> Server {
        let mut child = Command::new(afnext_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start afnext");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let mut metrics = None;
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("afnext {args:?} exited before listening"))
                .unwrap();
            if let Some(a) = line.strip_prefix("metrics on http://") {
                metrics = Some(a.to_string());
            }
            if let Some(a) = line.strip_prefix("afnext serving on ") {
                break a.to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            metrics,
        }
    }

    pub async fn client(
        &self,
    ) -> afnext_server::pb::af_next_client::AfNextClient<tonic::transport::Channel> {
        afnext_server::pb::af_next_client::AfNextClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    pub fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, within)
    }
}

/// Sends `sig` (`-TERM`, `-KILL`, ...) to a child process.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// The exit status of `child`, failing the test if it is still running after `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < end, "process {} did not exit", child.id());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `path` from an HTTP endpoint (`/metrics`, `/live`, `/ready`): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Prometheus text as `name{labels}` -> value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A free loopback port (bound and released; fine for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
