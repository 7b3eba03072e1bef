//! Helpers shared by the CLI's end-to-end tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod local;

/// The tokens every test cluster uses (the coordinator reads both from the environment, a
/// worker sends the worker token, the CLI the admin token).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const WORKER_TOKEN: &str = "test-worker-token-0123456789";

/// The `liandan` command with the test tokens in its environment.
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_liandan"));
    c.env("LIANDAN_ADMIN_TOKEN", ADMIN_TOKEN).env("LIANDAN_WORKER_TOKEN", WORKER_TOKEN);
    c
}

/// Runs the `liandan` binary with two worker threads.
pub fn liandan(args: &[&str]) -> Output {
    command().args(args).args(["--threads", "2"]).output().expect("run liandan")
}

/// A fresh directory under the system temp dir, unique to this process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("liandan-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a clean failure: exit status 1, exactly one stderr line starting with "error:"
/// that contains every needle, and no panic.
pub fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<_> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "'{n}' missing from: {err}");
    }
}

/// A committed fixture of the workspace's integration tests (`tests/fixtures/NAME`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}
