//! Workers say what they are: device kinds kept apart in scheduling, a phase that requires a
//! kind, the NCCL rendezvous through the coordinator (publish, fetch, nothing handed out for an
//! ended generation), and a real job on an emulated-CUDA worker following the same job on a
//! CPU worker — all against the real coordinator process.

mod common;

use std::path::Path;
use std::time::Duration;

use common::local::{Local, prepared, wait_for};
use common::{WORKER_TOKEN, scratch};
use liandan_proto::PROTOCOL_VERSION;
use liandan_proto::v1::coordinator_client::CoordinatorClient;
use liandan_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn call<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {WORKER_TOKEN}").parse().unwrap());
    r
}

/// A worker the test plays itself: registered with `device`, heartbeating while asked to.
struct Fake {
    id: u64,
    secret: Vec<u8>,
}

async fn register(c: &mut CoordinatorClient<Channel>, i: u32, device: &str) -> Fake {
    let r = c
        .register(call(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            hostname: format!("fake-{i}"),
            device: device.into(),
            ring_address: format!("127.0.0.1:{}", 9000 + i),
            instance: format!("{:032x}", 0xfeed_0000u64 + i as u64),
            memory_bytes: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    Fake { id: r.worker_id, secret: r.worker_secret }
}

async fn beat(c: &mut CoordinatorClient<Channel>, w: &Fake) {
    c.heartbeat(call(HeartbeatRequest { worker_id: w.id, worker_secret: w.secret.clone(), ..Default::default() })).await.unwrap();
}

async fn poll(c: &mut CoordinatorClient<Channel>, w: &Fake) -> Assignment {
    c.next_assignment(call(AssignmentRequest { worker_id: w.id, worker_secret: w.secret.clone() })).await.unwrap().into_inner()
}

fn spec(dir: &Path, data: &Path, name: &str, cluster: &str, steps: u64) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\n[model]\npreset = \"nano\"\nlayers = 1\nchannels = 32\nheads = 2\n[data]\nprepared = \"{}\"\n[cluster]\n{cluster}\n[checkpoint]\ndir = \"{}\"\nevery = 100\n[[phases]]\nname = \"pretrain\"\nkind = \"pretrain\"\nsteps = {steps}\nglobal_batch = 4\nseq_len = 16\nlr = 1e-2\nwarmup = 1\n",
        data.display(),
        dir.join(format!("ckpt-{name}")).display()
    );
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn device_kinds_are_kept_apart_and_the_nccl_rendezvous_goes_through_the_coordinator() {
    let d = scratch("devices-sched");
    let data = prepared(&d);
    let l = Local::start(&d, 0, &[], false);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = CoordinatorClient::new(Channel::from_shared(l.addr.clone()).unwrap().connect().await.unwrap());
        let cpu = [register(&mut c, 0, "cpu").await, register(&mut c, 1, "cpu").await];
        let gpus = [register(&mut c, 2, "cuda:0").await, register(&mut c, 3, "cuda:1").await];
        // A job that requires CUDA takes only the CUDA workers, with world 2.
        let job = l.submit(&spec(&d, &data, "gpu", "min_workers = 1\nmax_workers = 4\ndevice = \"cuda\"", 1000));
        let mut seats = Vec::new();
        for w in &gpus {
            seats.push(poll(&mut c, w).await);
        }
        for w in &cpu {
            assert!(!poll(&mut c, w).await.assigned, "a CPU worker in a CUDA job");
        }
        assert!(seats.iter().all(|a| a.assigned && a.job_id == job && a.world == 2), "{seats:?}");
        let mut ranks: Vec<u32> = seats.iter().map(|a| a.rank).collect();
        ranks.sort();
        assert_eq!(ranks, [0, 1]);
        // A job with no requirement groups workers of one kind: the two idle CPU workers.
        let any = l.submit(&spec(&d, &data, "any", "min_workers = 2\nmax_workers = 4", 1000));
        for w in &cpu {
            let a = poll(&mut c, w).await;
            assert!(a.assigned && a.job_id == any && a.world == 2, "{a:?}");
        }

        // The rendezvous of the CUDA job's generation.
        let (r0, r1) = if seats[0].rank == 0 { (0, 1) } else { (1, 0) };
        let seat = |w: &Fake, a: &Assignment| Rendezvous {
            worker_id: w.id,
            worker_secret: w.secret.clone(),
            job_id: a.job_id,
            phase_index: a.phase_index,
            generation: a.generation,
            rank: a.rank,
            nccl_id: Vec::new(),
        };
        let e = c.fetch_rendezvous(call(seat(&gpus[r1], &seats[r1]))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "nothing before rank 0 publishes: {e:?}");
        let e = c.publish_rendezvous(call(Rendezvous { nccl_id: vec![1; 128], ..seat(&gpus[r1], &seats[r1]) })).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "only rank 0 publishes: {e:?}");
        let e = c.publish_rendezvous(call(Rendezvous { nccl_id: vec![1; 128], ..seat(&cpu[0], &seats[r0]) })).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "a non-member cannot publish: {e:?}");
        let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
        c.publish_rendezvous(call(Rendezvous { nccl_id: id.clone(), ..seat(&gpus[r0], &seats[r0]) })).await.unwrap();
        let got = c.fetch_rendezvous(call(seat(&gpus[r1], &seats[r1]))).await.unwrap().into_inner();
        assert_eq!(got.nccl_id, id);
        let e = c.fetch_rendezvous(call(seat(&cpu[0], &seats[r1]))).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "a non-member cannot fetch: {e:?}");

        // Rank 1 dies (stops heartbeating): the group re-forms at a new generation, whose
        // rendezvous starts empty, and the ended generation's id is never handed out again.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let next = loop {
            beat(&mut c, &gpus[r0]).await;
            for w in &cpu {
                beat(&mut c, w).await;
            }
            let a = poll(&mut c, &gpus[r0]).await;
            if a.assigned && a.generation > seats[r0].generation {
                break a;
            }
            assert!(std::time::Instant::now() < deadline, "no re-form after rank 1 stopped");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(next.world, 1);
        let e = c.fetch_rendezvous(call(seat(&gpus[r1], &seats[r1]))).await.unwrap_err();
        assert!(matches!(e.code(), Code::FailedPrecondition | Code::PermissionDenied), "the dead rank's old seat: {e:?}");
        let e = c.fetch_rendezvous(call(seat(&gpus[r0], &seats[r0]))).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "an ended generation: {e:?}");
        let e = c.fetch_rendezvous(call(seat(&gpus[r0], &next))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "the new generation's rendezvous is empty: {e:?}");
    });
    let w = l.cli(&["workers"]);
    let out = String::from_utf8_lossy(&w.stdout);
    assert!(out.contains("cuda:0") && out.contains("cuda:1") && out.contains(" cpu "), "workers show their device:\n{out}");
    // A device this machine does not have, and NCCL without a GPU: one clear line each.
    if liandan_worker::backend::Device::cuda_unavailable_reason().is_some() {
        let o = common::command().args(["worker", "--coordinator", &l.addr, "--device", "cuda"]).output().unwrap();
        common::assert_one_line_error(&o, &["--device cuda"]);
    }
    let o = common::command().args(["worker", "--coordinator", &l.addr, "--device", "cpu", "--collective", "nccl"]).output().unwrap();
    common::assert_one_line_error(&o, &["--collective nccl needs a CUDA device"]);
    let o = common::command().args(["worker", "--coordinator", &l.addr, "--device", "tpu"]).output().unwrap();
    common::assert_one_line_error(&o, &["--device tpu: not a device"]);
}

#[test]
fn a_job_on_an_emulated_cuda_worker_follows_the_same_job_on_a_cpu_worker() {
    let d = scratch("devices-emu");
    let data = prepared(&d);
    let l = Local::start(&d, 0, &[], false);
    let mut workers = Vec::new();
    for (i, dev) in ["cpu", "cuda-emu"].iter().enumerate() {
        let args = ["worker", "--coordinator", &l.addr, "--threads", "1", "--device", dev, "--precision", "f32"];
        workers.push(common::local::spawn(&args, &d.join(format!("worker-{i}.log"))));
    }
    wait_for(60, "both workers", || {
        let o = String::from_utf8_lossy(&l.cli(&["workers"]).stdout).into_owned();
        (o.contains(" cpu ") && o.contains("cuda-emu")).then_some(())
    });
    let losses = |kind: &str| -> Vec<f64> {
        let job = l.submit(&spec(&d, &data, kind, &format!("min_workers = 1\nmax_workers = 1\ndevice = \"{kind}\""), 8));
        let end = wait_for(300, "the job to end", || {
            let st = l.status(job);
            (!st.contains("running") && !st.contains("queued")).then_some(st)
        });
        assert!(end.contains("succeeded"), "{kind}: {end}");
        let st = liandan_coordinator::store::Store::open_read_only(&d.join("store.db")).unwrap();
        st.metrics(job, 0).unwrap().iter().map(|m| m.loss).collect()
    };
    let (cpu, emu) = (losses("cpu"), losses("cuda-emu"));
    assert_eq!(cpu.len(), 8);
    for (s, (a, b)) in cpu.iter().zip(&emu).enumerate() {
        // f32 on both devices; only summation orders differ (see tests/tests/devices.rs).
        assert!((a - b).abs() <= 1e-3 * a.abs(), "step {}: cpu {a}, cuda-emu {b}", s + 1);
    }
    let log = l.log("worker-1.log");
    assert!(log.contains("device=cuda-emu") && log.contains("collective=\"ring\""), "the worker registered its device and the ring: {log}");
}
