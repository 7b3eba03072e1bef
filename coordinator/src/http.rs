//! The coordinator's HTTP side (axum, on its own port): the dashboard page, the JSON API it
//! reads, and Prometheus `/metrics`.
//!
//! Routes:
//! - `GET /` the dashboard, one static HTML+JS file (`dashboard.html`, embedded); public, it
//!   holds no data. It takes the admin token once (`#token=` or a prompt), keeps it in the tab's
//!   sessionStorage and sends it as a bearer header; it polls `/api/overview` every second.
//! - `GET /healthz` `ok`; public, for probes.
//! - `GET /metrics` Prometheus text ([`crate::metrics`]); admin token.
//! - `GET /api/overview` jobs (phases, progress, throughput, ETA, lineage) and workers; admin.
//! - `GET /api/jobs/{id}` one job with each phase's curves (downsampled) and its checkpoints; admin.
//! - `GET /api/workers` every worker; admin.
//!
//! - `GET /label` the labeling page (`label.html`, embedded; public, holds no data): the flow of
//!   `liandan label`.
//! - `GET /api/label/{job}/next` the job's next comparison (sampled on demand); admin.
//! - `POST /api/label/{comparison}` `{"choice": "a"|"b"|"tie"|"skip", "labeler": "..."}`; admin.
//!   A second label, an unknown comparison or a bad choice is refused (409, 404, 400) and changes
//!   nothing.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::{Auth, Role};
use crate::metrics::RpcMetrics;
use crate::service::CoordinatorService;
use crate::store::{json_f64, now_ms};

/// The dashboard page.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// The labeling page.
pub const LABEL_HTML: &str = include_str!("label.html");

/// Points per curve in `/api/jobs/{id}` (a long phase is downsampled evenly; the last step is kept).
const MAX_POINTS: usize = 400;

/// Steps in the moving window of the tokens/s curve.
const TPS_WINDOW: usize = 10;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub svc: CoordinatorService,
    pub auth: Arc<Auth>,
    pub rpc: Arc<RpcMetrics>,
    /// Whether the store could be written at the last probe (`/healthz`).
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
}

/// The whole HTTP router.
pub fn router(state: HttpState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/overview", get(overview))
        .route("/api/jobs/{id}", get(job))
        .route("/api/workers", get(workers))
        .route("/api/label/{job}/next", get(next_comparison))
        .route("/api/label/{comparison}", axum::routing::post(submit_label));
    let protected = protected.route_layer(axum::middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/", get(|| async { ([(header::CACHE_CONTROL, "no-store")], Html(DASHBOARD_HTML)) }))
        .route("/label", get(|| async { ([(header::CACHE_CONTROL, "no-store")], Html(LABEL_HTML)) }))
        .route("/healthz", get(healthz))
        .merge(protected)
        .with_state(state)
}

async fn require_admin(State(st): State<HttpState>, req: Request, next: Next) -> Response {
    match st.auth.check(Role::Admin, req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::warn!(path = %req.uri().path(), "refused an HTTP request: {}", refusal.reason());
            st.rpc.refused(&format!("HTTP {}", req.uri().path()), refusal.status(req.uri().path()).code());
            let code = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = (code, Json(json!({ "error": refusal.status(req.uri().path()).message() }))).into_response();
            if code == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}

/// A gRPC status as a JSON error with the matching HTTP status.
fn fail(e: tonic::Status) -> Response {
    let code = match e.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(json!({ "error": e.message() }))).into_response()
}

async fn next_comparison(State(st): State<HttpState>, Path(job): Path<u64>) -> Response {
    match st.svc.next_comparison_for(job).await {
        Ok(c) => Json(json!({
            "comparison_id": c.comparison_id, "job_id": c.job_id, "prompt": c.prompt, "answer_a": c.answer_a,
            "answer_b": c.answer_b, "task": c.task, "checkpoint": c.checkpoint, "total": c.total, "labelled": c.labelled,
        }))
        .into_response(),
        Err(e) => fail(e),
    }
}

/// The body of `POST /api/label/{comparison}`.
#[derive(Debug, serde::Deserialize)]
struct LabelBody {
    choice: String,
    #[serde(default)]
    labeler: String,
}

async fn submit_label(State(st): State<HttpState>, Path(id): Path<u64>, Json(body): Json<LabelBody>) -> Response {
    match st.svc.label(id, &body.choice, &body.labeler) {
        Ok(()) => Json(json!({ "ok": true })).into_response(),
        Err(e) => fail(e),
    }
}

/// 200 while the store can be written, 503 otherwise (probed every second).
async fn healthz(State(st): State<HttpState>) -> Response {
    if st.healthy.load(std::sync::atomic::Ordering::Relaxed) { "ok".into_response() } else { (StatusCode::SERVICE_UNAVAILABLE, "the store cannot be written").into_response() }
}

async fn metrics(State(st): State<HttpState>) -> Response {
    match crate::metrics::render(&st.svc, &st.rpc) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => fail(e),
    }
}

fn phase_json(p: &liandan_proto::v1::PhaseStatus) -> Value {
    json!({
        "index": p.index, "name": p.name, "state": p.state, "step": p.step, "total_steps": p.total_steps,
        "generation": p.generation, "world": p.world, "loss": json_f64(p.loss), "tokens_per_s": p.tokens_per_s,
        "eta_ms": p.eta_ms, "last_checkpoint": p.last_checkpoint, "last_checkpoint_step": p.last_checkpoint_step,
        "input_checkpoint": p.input_checkpoint, "error": p.error,
        "values": p.values.iter().map(|(k, v)| (k.clone(), json_f64(*v))).collect::<serde_json::Map<_, _>>(), "evaluation": p.evaluation,
    })
}

fn job_json(j: &liandan_proto::v1::JobStatus) -> Value {
    json!({
        "job_id": j.job_id, "name": j.name, "state": j.state, "error": j.error, "created_ms": j.created_ms,
        "workers": j.workers, "phases": j.phases.iter().map(phase_json).collect::<Vec<_>>(),
    })
}

fn workers_json(svc: &CoordinatorService) -> Result<Vec<Value>, tonic::Status> {
    let now = now_ms();
    // The dashboard shows the first page of workers (by id).
    let ws = svc.with_store(|s| s.workers_page(None, crate::limits::WORKERS_PAGE.1))?;
    Ok(ws
        .into_iter()
        .map(|w| {
            json!({
                "worker_id": w.id, "hostname": w.hostname, "device": w.device, "ring_address": w.ring_address,
                "state": w.state, "heartbeat_age_ms": now.saturating_sub(svc.last_heartbeat_ms(&w)), "memory_bytes": w.memory_bytes,
                "job_id": w.job_id, "phase_index": w.phase_idx, "rank": w.rank, "generation": w.generation,
            })
        })
        .collect())
}

async fn overview(State(st): State<HttpState>) -> Response {
    let run = || -> Result<Value, tonic::Status> {
        // The newest jobs (older ones through the paged gRPC ListJobs).
        let ids: Vec<u64> = st.svc.with_store(|s| Ok(s.jobs_page(None, crate::limits::JOBS_PAGE.0)?.into_iter().map(|j| j.id).collect()))?;
        let jobs = ids.into_iter().map(|id| st.svc.job_status(id).map(|j| job_json(&j))).collect::<Result<Vec<_>, _>>()?;
        Ok(json!({ "now_ms": now_ms(), "jobs": jobs, "workers": workers_json(&st.svc)? }))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => fail(e),
    }
}

/// Every `k`-th point of `n` so that at most [`MAX_POINTS`] remain, always with the last.
fn sample_indices(n: usize) -> Vec<usize> {
    if n <= MAX_POINTS {
        return (0..n).collect();
    }
    let k = n.div_ceil(MAX_POINTS);
    let mut v: Vec<usize> = (0..n).step_by(k).collect();
    if v.last() != Some(&(n - 1)) {
        v.push(n - 1);
    }
    v
}

/// Steps of sampled answers a job's page shows per RL phase.
const SAMPLE_STEPS: usize = 3;

async fn job(State(st): State<HttpState>, Path(id): Path<u64>) -> Response {
    let run = || -> Result<Value, tonic::Status> {
        let j = st.svc.job_status(id)?;
        let checkpoints = st.svc.with_store(|s| s.checkpoints(id))?;
        let mut phases = Vec::new();
        for p in &j.phases {
            let m = st.svc.with_store(|s| s.metrics(id, p.index))?;
            let idx = sample_indices(m.len());
            // Throughput over a window of steps: one step's wall time is too coarse (ms) to plot.
            let (mut tok, mut ms, mut tps) = (0u64, 0u64, Vec::with_capacity(m.len()));
            for (i, r) in m.iter().enumerate() {
                (tok, ms) = (tok + r.tokens, ms + r.step_ms);
                if i >= TPS_WINDOW {
                    (tok, ms) = (tok - m[i - TPS_WINDOW].tokens, ms - m[i - TPS_WINDOW].step_ms);
                }
                tps.push(if ms > 0 { tok as f64 * 1000.0 / ms as f64 } else { f64::NAN });
            }
            let col = |f: &dyn Fn(&crate::store::MetricRow) -> f64| idx.iter().map(|&i| f(&m[i])).collect::<Vec<f64>>();
            let mut v = phase_json(p);
            v["series"] = json!({
                "step": col(&|r| r.step as f64),
                "loss": col(&|r| r.loss).into_iter().map(json_f64).collect::<Vec<_>>(),
                "lr": col(&|r| r.lr).into_iter().map(json_f64).collect::<Vec<_>>(),
                "grad_norm": col(&|r| r.grad_norm).into_iter().map(json_f64).collect::<Vec<_>>(),
                "tokens_per_s": idx.iter().map(|&i| tps[i]).map(|x| if x.is_finite() { json!(x) } else { Value::Null }).collect::<Vec<_>>(),
                "world": col(&|r| r.world as f64),
            });
            // Phase-specific series (ppo: reward, kl, clip_frac, entropy, value_loss, verifier_pass, ...).
            let keys: std::collections::BTreeSet<&String> = m.iter().flat_map(|r| r.values.keys()).collect();
            for k in keys {
                v["series"][k.as_str()] = idx.iter().map(|&i| m[i].values.get(k).map_or(Value::Null, |x| json_f64(*x))).collect::<Vec<_>>().into();
            }
            // RL phases: warnings from the metrics, and the latest steps' sampled answers.
            let plan = st.svc.with_store(|s| s.phase(id, p.index))?.and_then(|row| serde_json::from_str::<crate::spec::PhasePlan>(&row.plan_json).ok());
            let kl_target = plan.and_then(|pl| pl.ppo.and_then(|x| x.kl_target)).map(f64::from);
            v["warnings"] = json!(crate::rl_watch::warnings(&m, kl_target));
            v["samples"] = st
                .svc
                .with_store(|s| s.recent_samples(id, p.index, SAMPLE_STEPS))?
                .iter()
                .map(|x| {
                    json!({
                        "step": x.step, "prompt": x.prompt, "answer": x.answer, "reward": json_f64(x.reward), "rm_score": json_f64(x.rm_score),
                        "verifier_score": x.verifier.map(|v| json_f64(v.0)), "verifier_pass": x.verifier.map(|v| v.1), "kl": json_f64(x.kl),
                    })
                })
                .collect();
            v["checkpoints"] = checkpoints
                .iter()
                .filter(|c| c.phase_idx == p.index)
                .map(|c| json!({ "step": c.step, "path": c.path, "generation": c.generation, "committed_ms": c.committed_ms }))
                .collect();
            phases.push(v);
        }
        let mut v = job_json(&j);
        v["phases"] = Value::Array(phases);
        Ok(v)
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => fail(e),
    }
}

async fn workers(State(st): State<HttpState>) -> Response {
    match workers_json(&st.svc) {
        Ok(w) => Json(json!({ "workers": w })).into_response(),
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_the_ends_and_the_bound() {
        assert_eq!(sample_indices(3), [0, 1, 2]);
        let v = sample_indices(1001);
        assert!(v.len() <= MAX_POINTS + 1, "{}", v.len());
        assert_eq!((v[0], *v.last().unwrap()), (0, 1000));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
    }
}
