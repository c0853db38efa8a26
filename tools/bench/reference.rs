//! The transformers side of the model and load benches (crates/model/benches/model.rs and
//! crates/server/benches/load.rs, each of which includes this file with `#[path]`): finding the reference
//! Python, one reference process driven a line at a time (`model_ref.py`, `load_ref.py` beside this file), and
//! how the per-round ratios are summarised.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// `$AFNEXT_REF_PYTHON`, else `bin/python` of `$AFNEXT_REF_VENV` or of the fixture venv of
/// tools/fixtures/run.sh (`~/.cache/afnext/ref-venv`) when it exists.
pub fn ref_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AFNEXT_REF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("AFNEXT_REF_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/afnext/ref-venv"))
        })?;
    let p = venv.join("bin/python");
    p.exists().then_some(p)
}

/// A reference script of tools/bench run for the whole bench: one command per line in, one JSON object per
/// line out, so that its timings alternate with ours. Killed on drop.
pub struct RefProcess {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl RefProcess {
    /// `python tools/bench/<script> <args>`, or `None` without a reference Python (or when it cannot start).
    pub fn start(script: &str, args: &[String]) -> Option<Self> {
        // Both benches' crates sit two levels below the workspace root.
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tools/bench")
            .join(script);
        let mut child = Command::new(ref_python()?)
            .arg(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| eprintln!("reference not started: {e}"))
            .ok()?;
        let stdin = child.stdin.take()?;
        let out = BufReader::new(child.stdout.take()?);
        Some(RefProcess { child, stdin, out })
    }

    /// The next line the process writes, as JSON, or `None` when it failed (its stderr is inherited).
    pub fn read(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        self.out.read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// The answer to one command.
    pub fn ask(&mut self, cmd: &str) -> Option<serde_json::Value> {
        writeln!(self.stdin, "{cmd}").ok()?;
        self.read()
    }
}

impl Drop for RefProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The median of sorted `x` (the mean of the middle two for an even count).
fn median(x: &[f64]) -> f64 {
    let n = x.len();
    if n % 2 == 1 {
        x[n / 2]
    } else {
        (x[n / 2 - 1] + x[n / 2]) / 2.0
    }
}

/// Median, lowest and highest of per-round ratios `x`, as `1.23x (1.01-1.50)` ("-" for none).
pub fn spread(mut x: Vec<f64>) -> String {
    if x.is_empty() {
        return "-".into();
    }
    x.sort_by(f64::total_cmp);
    format!("{:.2}x ({:.2}-{:.2})", median(&x), x[0], x[x.len() - 1])
}
