//! What the audio crate's benches share: a median, and running a reference script of `tools/bench` with the
//! fixture venv's Python (`tools/fixtures/run.sh` makes it; override with `AFNEXT_REF_PYTHON`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ref_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AFNEXT_REF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let venv = std::env::var_os("AFNEXT_REF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".cache/afnext/ref-venv"));
    let p = venv.join("bin/python");
    p.exists().then_some(p)
}

/// Runs `tools/bench/<script> <args>` with the reference Python and parses the JSON object it prints. The
/// error says why there is no reference: no Python found, or the script failed (with its stderr).
pub fn run_reference(script: &str, args: &[&OsStr]) -> Result<serde_json::Value, String> {
    let py =
        ref_python().ok_or("reference not run (no Python with the reference packages found)")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new(py)
        .arg(root.join("tools/bench").join(script))
        .args(args)
        .output()
        .map_err(|e| format!("reference not run: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "reference failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("reference printed no JSON: {e}"))
}
