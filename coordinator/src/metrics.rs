//! Prometheus text exposition (`GET /metrics`, format 0.0.4), written by hand: the job and phase
//! gauges are read from the store at scrape time (the store is the truth, nothing to keep in
//! step), the RPC latencies and refusals are counted by the gRPC edge layer ([`crate::auth`]).
//!
//! Labels: `job_id` (not `job`, which Prometheus reserves for the scrape job), `phase` (the
//! phase's name), `method` (the gRPC method), `code` (the gRPC status code name, e.g.
//! `PermissionDenied`), `state`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::service::CoordinatorService;

/// Upper bounds of the RPC latency buckets, seconds.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Phase metrics are exported for this many of the newest jobs (older ones are history).
const JOBS_EXPORTED: usize = 50;

const WORKER_STATES: &[&str] = &["idle", "busy", "draining", "drained", "dead"];
const JOB_STATES: &[&str] = &["queued", "running", "succeeded", "failed", "cancelled"];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Per-method RPC latencies and refused calls.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    refused: Mutex<BTreeMap<(String, String), u64>>,
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

impl RpcMetrics {
    /// A finished (or, for streams, started) call's latency to its response headers.
    pub fn observe(&self, method: &str, code: tonic::Code, took: Duration) {
        let s = took.as_secs_f64();
        let mut m = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = m.entry((method.to_string(), code_name(code))).or_insert_with(|| Histogram { counts: vec![0; BUCKETS.len()], ..Default::default() });
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    /// A call refused for its credentials.
    pub fn refused(&self, method: &str, code: tonic::Code) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()).entry((method.to_string(), code_name(code))).or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        let lat = self.latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
        header(out, "liandan_rpc_duration_seconds", "histogram", "gRPC calls by method and status code: time to the response headers");
        for ((method, code), h) in &lat {
            let l = format!("method=\"{}\",code=\"{code}\"", esc(method));
            for (b, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(out, "liandan_rpc_duration_seconds_bucket{{{l},le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "liandan_rpc_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "liandan_rpc_duration_seconds_sum{{{l}}} {}", h.sum);
            let _ = writeln!(out, "liandan_rpc_duration_seconds_count{{{l}}} {}", h.count);
        }
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone();
        header(
            out,
            "liandan_rpc_refused_total",
            "counter",
            "gRPC calls and HTTP requests (method \"HTTP /path\") refused for a missing or wrong token (Unauthenticated) or a worker token on an admin call (PermissionDenied)",
        );
        for ((method, code), n) in &refused {
            let _ = writeln!(out, "liandan_rpc_refused_total{{method=\"{}\",code=\"{code}\"}} {n}", esc(method));
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(svc: &CoordinatorService, rpc: &RpcMetrics) -> Result<String, tonic::Status> {
    let mut out = String::new();
    let (job_counts, worker_counts, jobs) = svc.with_store(|s| Ok((s.job_counts()?, s.worker_counts()?, s.jobs_page(None, JOBS_EXPORTED)?)))?;
    let count = |counts: &[(String, u64)], st: &str| counts.iter().find(|(s, _)| s == st).map_or(0, |c| c.1);

    header(&mut out, "liandan_jobs", "gauge", "Jobs by state");
    for st in JOB_STATES {
        let _ = writeln!(out, "liandan_jobs{{state=\"{st}\"}} {}", count(&job_counts, st));
    }
    header(&mut out, "liandan_workers", "gauge", "Workers by state");
    for st in WORKER_STATES {
        let _ = writeln!(out, "liandan_workers{{state=\"{st}\"}} {}", count(&worker_counts, st));
    }

    let mut statuses = Vec::new();
    for j in &jobs {
        let st = svc.job_status(j.id)?;
        // Mean step time over the same recent steps that give tokens/s.
        let mut step_s = Vec::new();
        for p in &st.phases {
            let recent = svc.with_store(|s| s.recent_metrics(j.id, p.index, 20))?;
            let ms: u64 = recent.iter().map(|m| m.step_ms).sum();
            step_s.push(if recent.is_empty() { 0.0 } else { ms as f64 / 1000.0 / recent.len() as f64 });
        }
        statuses.push((st, step_s));
    }
    header(&mut out, "liandan_phase_info", "gauge", "1 for each phase, with its state");
    for (j, _) in &statuses {
        for p in &j.phases {
            let _ = writeln!(out, "liandan_phase_info{{job_id=\"{}\",job_name=\"{}\",phase=\"{}\",state=\"{}\"}} 1", j.job_id, esc(&j.name), esc(&p.name), p.state);
        }
    }
    header(&mut out, "liandan_phase_step_seconds", "gauge", "Mean wall time of the recent steps");
    for (j, step_s) in &statuses {
        for (p, s) in j.phases.iter().zip(step_s) {
            let _ = writeln!(out, "liandan_phase_step_seconds{{job_id=\"{}\",phase=\"{}\"}} {s}", j.job_id, esc(&p.name));
        }
    }
    type Get = fn(&liandan_proto::v1::PhaseStatus) -> f64;
    let gauges: &[(&str, &str, &str, Get)] = &[
        ("liandan_phase_step", "gauge", "Optimizer steps completed", |p| p.step as f64),
        ("liandan_phase_total_steps", "gauge", "Optimizer steps of the phase", |p| p.total_steps as f64),
        ("liandan_phase_progress_ratio", "gauge", "step / total_steps", |p| if p.total_steps == 0 { 0.0 } else { p.step as f64 / p.total_steps as f64 }),
        ("liandan_phase_loss", "gauge", "Last reported mean loss, nats per token", |p| p.loss),
        ("liandan_phase_tokens_per_second", "gauge", "Tokens of the global batch per second over recent steps", |p| p.tokens_per_s),
        ("liandan_phase_eta_seconds", "gauge", "Estimated time to the end of the phase", |p| p.eta_ms as f64 / 1000.0),
        ("liandan_phase_world", "gauge", "Workers in the phase's group", |p| p.world as f64),
        ("liandan_phase_generation", "gauge", "The group's generation (bumped on every membership change)", |p| p.generation as f64),
        ("liandan_phase_last_checkpoint_step", "gauge", "Step of the last committed checkpoint", |p| p.last_checkpoint_step as f64),
        ("liandan_generation_changes_total", "counter", "Re-formations of the phase's group after its first (a worker lost, joined or drained)", |p| {
            p.generation.saturating_sub(1) as f64
        }),
    ];
    for (name, kind, help, get) in gauges {
        header(&mut out, name, kind, help);
        for (j, _) in &statuses {
            for p in &j.phases {
                let _ = writeln!(out, "{name}{{job_id=\"{}\",phase=\"{}\"}} {}", j.job_id, esc(&p.name), get(p));
            }
        }
    }
    rpc.render(&mut out);
    Ok(out)
}
