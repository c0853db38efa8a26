//! The binary starts and documents its subcommands. (Also makes `cargo test --workspace` build the `afnext`
//! binary, which the end-to-end tests in `tests/` spawn.)

use std::process::Command;

#[test]
fn every_subcommand_has_help() {
    let bin = env!("CARGO_BIN_EXE_afnext");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["generate", "inspect"] {
        assert!(text.contains(sub), "--help does not list {sub}: {text}");
        let o = Command::new(bin).args([sub, "--help"]).output().unwrap();
        assert!(o.status.success(), "{sub} --help failed");
    }
}
