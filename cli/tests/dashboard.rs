//! The coordinator's HTTP side end to end: a real local cluster runs a small job; the JSON API
//! and /metrics answer only to the admin token; headless Chromium renders the dashboard and its
//! DOM shows the job, its phase and the workers (the screenshot is kept under target/). The
//! workers log JSON, and every line of a phase carries job, phase, rank and generation.
//!
//! Chromium: the test skips, saying why, only when no Chromium is installed and CI is unset; in
//! CI (CI set) a missing Chromium fails it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::local::{Local, http_get, http_request, job_spec, prepared, wait_for};
use common::{ADMIN_TOKEN, WORKER_TOKEN, scratch};

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs headless Chromium on `url` with a fresh profile; `mode` is `--dump-dom` or
/// `--screenshot=PATH`. Returns stdout.
fn chromium(exe: &Path, profile: &Path, url: &str, mode: &str) -> String {
    let o = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1500",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(mode)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(o.status.success(), "chromium {mode}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn dashboard_api_metrics_and_phase_logs() {
    let d = scratch("dashboard");
    let data = prepared(&d);
    let l = Local::start(&d, 2, &["--log-format", "json"], true);
    let job = l.submit(&job_spec(&d, &data, 40, 10, 16));
    wait_for(120, "the job to succeed", || {
        let st = l.status(job);
        assert!(!st.contains(": failed"), "{st}");
        st.contains(": succeeded").then_some(())
    });

    // Access: the page and /healthz are public; the API and /metrics need the admin token.
    assert_eq!(http_get(&l.http, "/healthz", None), (200, "ok".to_string()));
    let (code, page) = http_get(&l.http, "/", None);
    assert!(code == 200 && page.contains("<title>liandan</title>"), "{code}");
    for path in ["/api/overview", "/api/workers", &format!("/api/jobs/{job}"), "/metrics"] {
        assert_eq!(http_get(&l.http, path, None).0, 401, "{path} without a token");
        assert_eq!(http_get(&l.http, path, Some("not-the-token-0123456789")).0, 401, "{path} with a wrong token");
        assert_eq!(http_get(&l.http, path, Some(WORKER_TOKEN)).0, 403, "{path} with the worker token");
    }

    // Labeling: the page is public; the API needs the admin token and refuses what it cannot do
    // (a pretrain-only job has no chat model to sample from; an unknown comparison; a bad choice).
    let (code, page) = http_get(&l.http, "/label", None);
    assert!(code == 200 && page.contains("Label comparisons"), "{code}");
    assert_eq!(http_get(&l.http, &format!("/api/label/{job}/next"), None).0, 401);
    let (code, body) = http_get(&l.http, &format!("/api/label/{job}/next"), Some(ADMIN_TOKEN));
    assert!(code == 409 && body.contains("no chat checkpoint (SFT, PPO, GRPO or DPO)"), "{code} {body}");
    let post = |path: &str, token: &str, json: &str| http_request(&l.http, "POST", path, Some(token), Some(json));
    assert_eq!(post("/api/label/999", ADMIN_TOKEN, r#"{"choice":"a"}"#).0, 404);
    assert_eq!(post("/api/label/999", ADMIN_TOKEN, r#"{"choice":"best"}"#).0, 400);
    assert_eq!(post("/api/label/999", WORKER_TOKEN, r#"{"choice":"a"}"#).0, 403);

    // The JSON API: the job's curve has every step, and its checkpoints are listed.
    let (code, body) = http_get(&l.http, &format!("/api/jobs/{job}"), Some(ADMIN_TOKEN));
    assert_eq!(code, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["state"], "succeeded");
    let phase = &j["phases"][0];
    assert_eq!(phase["series"]["loss"].as_array().unwrap().len(), 40, "{phase}");
    assert_eq!(phase["series"]["step"][39], 40.0);
    let steps: Vec<u64> = phase["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert!(steps.contains(&10) && steps.contains(&40), "{steps:?}");
    let (code, body) = http_get(&l.http, "/api/overview", Some(ADMIN_TOKEN));
    assert_eq!(code, 200);
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(o["workers"].as_array().unwrap().len(), 2, "{o}");

    // /metrics: the job's progress, workers by state, RPC latencies; and every metric the
    // Grafana dashboard queries is exported.
    let (code, metrics) = http_get(&l.http, "/metrics", Some(ADMIN_TOKEN));
    assert_eq!(code, 200);
    for needle in [
        format!("liandan_phase_step{{job_id=\"{job}\",phase=\"pretrain\"}} 40"),
        format!("liandan_phase_progress_ratio{{job_id=\"{job}\",phase=\"pretrain\"}} 1"),
        "liandan_workers{state=\"idle\"} 2".to_string(),
        "liandan_jobs{state=\"succeeded\"} 1".to_string(),
        "liandan_rpc_duration_seconds_count{method=\"ReportStep\",code=\"Ok\"}".to_string(),
        "# TYPE liandan_generation_changes_total counter".to_string(),
        // The refused HTTP requests above: no token and a wrong one, then the worker token.
        "liandan_rpc_refused_total{method=\"HTTP /metrics\",code=\"Unauthenticated\"} 2".to_string(),
        "liandan_rpc_refused_total{method=\"HTTP /metrics\",code=\"PermissionDenied\"} 1".to_string(),
    ] {
        assert!(metrics.contains(&needle), "'{needle}' missing from /metrics:\n{metrics}");
    }
    let grafana = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/liandan.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&grafana).unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("liandan_")) {
                assert!(
                    metrics.contains(&format!("\n{name}{{")) || metrics.contains(&format!("# TYPE {name} ")),
                    "the Grafana dashboard queries {name}, which /metrics does not export"
                );
            }
        }
    }

    // Every log line a worker wrote inside a phase carries the phase's identity.
    let mut phase_lines = 0;
    for i in 0..2 {
        for line in l.log(&format!("worker-{i}.log")).lines().filter(|x| x.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let msg = v["fields"]["message"].as_str().unwrap_or_default();
            if matches!(msg, "assignment" | "checkpoint committed" | "assignment finished") {
                phase_lines += 1;
                let span = &v["span"];
                assert_eq!(span["job"].as_u64(), Some(job), "{line}");
                assert_eq!(span["phase"], "pretrain", "{line}");
                assert!(span["rank"].is_u64() && span["generation"].is_u64(), "{line}");
            }
        }
    }
    assert!(phase_lines >= 4, "expected assignment, checkpoint and finish lines from the workers, found {phase_lines}");

    // The page in a real browser.
    let Some(exe) = find_chromium() else {
        assert!(std::env::var_os("CI").is_none(), "CI is set but no chromium is installed (.ci/run installs Debian's chromium)");
        eprintln!("SKIPPED the browser part: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let url = format!("{}/#token={ADMIN_TOKEN}", l.http);
    let dom = chromium(&exe, &d.join("profile-dom"), &url, "--dump-dom");
    for needle in [
        format!("id=\"job-{job}\""),
        format!("job {job} 'test'"),
        "pretrain".into(),
        "succeeded".into(),
        "40/40".into(),
        "data-worker-id=\"1\"".into(),
        "data-worker-id=\"2\"".into(),
        "<polyline".into(),
        "checkpoint(s)".into(),
    ] {
        assert!(dom.contains(&needle), "'{needle}' missing from the dashboard's DOM:\n{dom}");
    }
    assert!(!dom.contains(ADMIN_TOKEN), "the token stays out of the page");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&exe, &d.join("profile-shot"), &url, &format!("--screenshot={}", shot.display()));
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} is {size} bytes", shot.display());
    println!("dashboard screenshot: {}", shot.display());
    eprintln!("dashboard screenshot: {}", shot.display());

    // A wrong token: the page asks for the token instead of showing data.
    let dom = chromium(&exe, &d.join("profile-wrong"), &format!("{}/#token=not-the-token-0123456789", l.http), "--dump-dom");
    assert!(dom.contains("the token is not valid") && !dom.contains(&format!("id=\"job-{job}\"")), "{dom}");
}
