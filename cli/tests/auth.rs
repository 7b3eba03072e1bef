//! Access control end to end: a real coordinator process with the test tokens, a real worker
//! running a real job, and gRPC calls with no token, a wrong token, and the worker token on
//! admin calls. Each is refused with the right code, logged, and changes nothing in the store.

mod common;

use common::local::{Local, Proc, job_spec, prepared, wait_for};
use common::{ADMIN_TOKEN, WORKER_TOKEN, s, scratch};
use liandan_coordinator::store::Store;
use liandan_proto::v1::coordinator_client::CoordinatorClient;
use liandan_proto::v1::*;
use tonic::{Code, Request};

const WRONG: &str = "not-the-token-0123456789";

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// What the store says about the job and the workers (the refused calls must not change it).
fn snapshot(dir: &std::path::Path, job: u64) -> (usize, String, Vec<String>) {
    let st = Store::open_read_only(&dir.join("store.db")).unwrap();
    let jobs = st.jobs_page(None, 1000).unwrap();
    let state = st.job(job).unwrap().unwrap().state;
    (jobs.len(), state, st.workers().unwrap().into_iter().map(|w| format!("{} {}", w.id, w.state)).collect())
}

#[test]
fn calls_without_the_right_token_are_refused_logged_and_change_nothing() {
    let d = scratch("auth");
    let data = prepared(&d);
    let l = Local::start(&d, 1, &[], false);
    // A long job, so that a cancel or a drain would visibly change its state.
    let job = l.submit(&job_spec(&d, &data, 100_000, 1000, 16));
    wait_for(60, "the job to run", || l.status(job).contains("running").then_some(()));
    let before = snapshot(&d, job);
    assert_eq!(before.1, "running");
    assert!(before.2.iter().any(|w| w.ends_with(" busy")), "{before:?}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(l.addr.clone()).unwrap().connect().await.unwrap();
        let mut c = CoordinatorClient::new(ch.clone());
        let spec = std::fs::read_to_string(d.join("job.toml")).unwrap();
        let submit = || SubmitJobRequest { spec_toml: spec.clone(), source: "job.toml".into() };
        let wrong = WRONG;
        for (token, code) in [(None, Code::Unauthenticated), (Some(wrong), Code::Unauthenticated), (Some(WORKER_TOKEN), Code::PermissionDenied)] {
            let what = format!("token {token:?}");
            let e = c.submit_job(with_token(submit(), token)).await.unwrap_err();
            assert_eq!(e.code(), code, "SubmitJob with {what}: {e:?}");
            let e = c.cancel_job(with_token(JobRef { job_id: job }, token)).await.unwrap_err();
            assert_eq!(e.code(), code, "CancelJob with {what}: {e:?}");
            let e = c.drain_worker(with_token(WorkerRef { worker_id: 1 }, token)).await.unwrap_err();
            assert_eq!(e.code(), code, "DrainWorker with {what}: {e:?}");
            let e = c.list_jobs(with_token(ListJobsRequest::default(), token)).await.unwrap_err();
            assert_eq!(e.code(), code, "ListJobs with {what}: {e:?}");
        }
        // Worker calls: refused without a token or with a wrong one, allowed with the worker
        // token and with the admin token (admin is a superset).
        let hb = || HeartbeatRequest { worker_id: 999, ..Default::default() };
        assert_eq!(c.heartbeat(with_token(hb(), None)).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(c.heartbeat(with_token(hb(), Some(wrong))).await.unwrap_err().code(), Code::Unauthenticated);
        c.heartbeat(with_token(hb(), Some(WORKER_TOKEN))).await.expect("a worker token may heartbeat");
        c.heartbeat(with_token(hb(), Some(ADMIN_TOKEN))).await.expect("the admin token may make worker calls");
        // A message over the limit is refused before it is decoded, and before that, without a
        // token, before its body is read at all.
        let huge = SubmitJobRequest { spec_toml: "#".repeat(17 << 20), source: "huge.toml".into() };
        let e = c.clone().max_encoding_message_size(64 << 20).submit_job(with_token(huge.clone(), None)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = c.clone().max_encoding_message_size(64 << 20).submit_job(with_token(huge, Some(ADMIN_TOKEN))).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        // Health needs no token.
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health is public");
    });

    // Nothing changed: the same jobs, the job still running, the worker still busy (not draining).
    let after = snapshot(&d, job);
    assert_eq!(after, before, "refused calls changed the store");
    // Each refusal is logged with the method and the reason (never the token).
    let log = l.log("coordinator.log");
    for needle in ["refused a call", "SubmitJob", "CancelJob", "DrainWorker", "no bearer token", "unknown token", "a worker token on an admin call", "PermissionDenied"] {
        assert!(log.contains(needle), "'{needle}' missing from the coordinator log:\n{log}");
    }
    assert!(!log.contains(WORKER_TOKEN) && !log.contains(WRONG), "a token was logged");

    // The CLI without a token: one clear line. With the admin token the same calls work.
    let o = common::command().env_remove("LIANDAN_ADMIN_TOKEN").args(["cancel", &job.to_string(), "--coordinator", &l.addr]).output().unwrap();
    common::assert_one_line_error(&o, &["CancelJob needs a bearer token", "LIANDAN_ADMIN_TOKEN"]);
    let o = common::command().env("LIANDAN_ADMIN_TOKEN", WORKER_TOKEN).args(["workers", "drain", "1", "--coordinator", &l.addr]).output().unwrap();
    common::assert_one_line_error(&o, &["DrainWorker needs the admin token"]);
    assert_eq!(snapshot(&d, job), before);
    let o = l.cli(&["cancel", &job.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(snapshot(&d, job).1, "cancelled");
}

#[test]
fn a_coordinator_without_tokens_refuses_to_start_and_a_worker_with_a_wrong_token_stops() {
    let d = scratch("auth-start");
    let store = d.join("store.db");
    let bare = || {
        let mut c = common::command();
        c.env_remove("LIANDAN_ADMIN_TOKEN").env_remove("LIANDAN_WORKER_TOKEN");
        c
    };
    let o = bare().args(["coordinator", "--listen", "127.0.0.1:0", "--store", s(&store)]).output().unwrap();
    common::assert_one_line_error(&o, &["needs an admin token", "--insecure-no-auth"]);
    let o = bare().args(["coordinator", "--listen", "0.0.0.0:0", "--store", s(&store), "--insecure-no-auth"]).output().unwrap();
    common::assert_one_line_error(&o, &["--insecure-no-auth is only allowed on a loopback address"]);
    let short = d.join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let o = bare().args(["coordinator", "--listen", "127.0.0.1:0", "--store", s(&store), "--admin-token-file", s(&short), "--worker-token-file", s(&short)]).output().unwrap();
    common::assert_one_line_error(&o, &["short", "at least 16"]);
    let o = common::command().env("LIANDAN_WORKER_TOKEN", ADMIN_TOKEN).args(["coordinator", "--listen", "127.0.0.1:0", "--store", s(&store)]).output().unwrap();
    common::assert_one_line_error(&o, &["the admin and worker tokens must differ"]);

    // A worker with a wrong token is refused at registration and stops at once with one line.
    let l = Local::start(&d, 0, &[], false);
    let log = d.join("bad-worker.log");
    let child = common::command().env("LIANDAN_WORKER_TOKEN", WRONG).args(["worker", "--coordinator", &l.addr]).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut w = Proc { child };
    let status = wait_for(30, "the worker with a wrong token to exit", || w.child.try_wait().unwrap());
    assert_eq!(status.code(), Some(1));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("error: coordinator") && err.contains("the token is not valid"), "{err}");
}
