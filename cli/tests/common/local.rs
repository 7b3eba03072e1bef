//! A local cluster for the access-control and dashboard tests: a coordinator and workers as
//! child processes on 127.0.0.1 with ephemeral ports and the test tokens, a tiny prepared
//! corpus, and a plain HTTP/1.1 client.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{command, liandan, s};

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `liandan ARGS` with the test tokens, stdout and stderr to `log`.
pub fn spawn(args: &[&str], log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    let child = command().args(args).stdout(f.try_clone().unwrap()).stderr(f).stdin(Stdio::null()).spawn().expect("spawn liandan");
    Proc { child }
}

/// Polls `f` every 50 ms until it returns Some, or panics after `secs` with `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A prepared tiny corpus in `dir/data`.
pub fn prepared(dir: &Path) -> PathBuf {
    let raw = dir.join("raw.jsonl");
    let mut body = String::new();
    for i in 0..300 {
        let line = format!("第{i}篇：床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流{i}。");
        body.push_str(&serde_json::json!({ "text": line }).to_string());
        body.push('\n');
    }
    std::fs::write(&raw, body).unwrap();
    let out = dir.join("data");
    let o = liandan(&["data", "prepare", s(&raw), "--out", s(&out), "--vocab-size", "320", "--split", "0.9,0.05,0.05", "--no-near-dedup"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A small corpus in `dir/data`, tokenized with an existing tokenizer (`--tokenizer`: a model
/// directory's tokenizer.json and chat template).
pub fn prepared_hf(dir: &Path, tokenizer: &Path) -> PathBuf {
    let raw = dir.join("raw.jsonl");
    let body: String = (0..200).map(|i| serde_json::json!({"text": format!("第{i}篇：床前明月光，疑是地上霜。举头望明月，低头思故乡。")}).to_string() + "\n").collect();
    std::fs::write(&raw, body).unwrap();
    let out = dir.join("data");
    let o = liandan(&["data", "prepare", s(&raw), "--out", s(&out), "--tokenizer", s(tokenizer), "--split", "0.9,0.05,0.05", "--no-near-dedup"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A one-phase pretraining job on a 1-layer model.
pub fn job_spec(dir: &Path, data: &Path, steps: u64, every: u64, seq_len: usize) -> PathBuf {
    let p = dir.join("job.toml");
    let spec = format!(
        "name = \"test\"\n[model]\npreset = \"nano\"\nlayers = 1\nchannels = 32\nheads = 2\n[data]\nprepared = \"{}\"\n[cluster]\nmin_workers = 1\nmax_workers = 3\n[checkpoint]\ndir = \"{}\"\nevery = {every}\n[[phases]]\nname = \"pretrain\"\nkind = \"pretrain\"\nsteps = {steps}\nglobal_batch = 6\nseq_len = {seq_len}\nlr = 1e-2\nwarmup = 2\n",
        data.display(),
        dir.join("ckpt").display()
    );
    std::fs::write(&p, spec).unwrap();
    p
}

/// A coordinator (gRPC and HTTP on ephemeral ports) and workers.
pub struct Local {
    pub dir: PathBuf,
    pub addr: String,
    pub http: String,
    pub coordinator: Proc,
    pub workers: Vec<Proc>,
}

impl Local {
    /// Starts the coordinator (with its HTTP port when `http`), and `workers` workers
    /// (`worker_args` added to each).
    pub fn start(dir: &Path, workers: usize, worker_args: &[&str], http: bool) -> Local {
        let (addr_file, http_file) = (dir.join("addr"), dir.join("http.addr"));
        let mut args = vec!["coordinator", "--listen", "127.0.0.1:0", "--store", s(&dir.join("store.db")).to_string().leak(), "--addr-file", s(&addr_file).to_string().leak()];
        if http {
            args.extend(["--http", "127.0.0.1:0", "--http-addr-file", s(&http_file).to_string().leak()]);
        }
        let coordinator = spawn(&args, &dir.join("coordinator.log"));
        let read = |f: &Path| std::fs::read_to_string(f).ok().filter(|a| a.ends_with('\n')).map(|a| a.trim().to_string());
        let addr = wait_for(20, "the coordinator's address file", || read(&addr_file));
        let http = if http { wait_for(20, "the coordinator's HTTP address file", || read(&http_file)) } else { String::new() };
        let mut l = Local { dir: dir.to_path_buf(), addr, http, coordinator, workers: vec![] };
        for i in 0..workers {
            let args = [&["worker", "--coordinator", &l.addr, "--threads", "1"][..], worker_args].concat();
            l.workers.push(spawn(&args, &dir.join(format!("worker-{i}.log"))));
        }
        wait_for(30, &format!("{workers} idle workers"), || {
            let o = l.cli(&["workers"]);
            (String::from_utf8_lossy(&o.stdout).lines().filter(|x| x.contains(" idle ")).count() >= workers).then_some(())
        });
        l
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        liandan(&[args, &["--coordinator", &self.addr]].concat())
    }

    pub fn submit(&self, spec: &Path) -> u64 {
        let o = self.cli(&["submit", s(spec)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn status(&self, job: u64) -> String {
        String::from_utf8_lossy(&self.cli(&["status", &job.to_string()]).stdout).into_owned()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

/// GET `path` from `http://addr` with an optional bearer token: (status, body).
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token, None)
}

/// One HTTP/1.1 request (a JSON body for POST); returns the status and the body.
pub fn http_request(addr: &str, method: &str, path: &str, token: Option<&str>, json: Option<&str>) -> (u16, String) {
    let host = addr.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = json.map(|b| format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())).unwrap_or_else(|| "\r\n".into());
    write!(conn, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n{body}").unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
