//! The data phase end to end: a real coordinator and real workers (child processes on
//! 127.0.0.1) prepare a corpus over their shared filesystem. The output is compared byte for byte
//! with `liandan data prepare` of the same corpus: manifest (with every shard's SHA-256),
//! tokenizer and shards, for 1, 2 and 3 workers, and when a worker is killed mid-phase.

mod common;

use std::path::{Path, PathBuf};

use common::local::{Local, wait_for};
use common::{liandan, s, scratch};

/// A corpus of many small tasks: JSONL (with near and exact duplicates), text, HTML pages of
/// one site (boilerplate across pages), a chinese-poetry collection.
fn corpus(dir: &Path, scale: usize) -> PathBuf {
    let raw = dir.join("raw");
    std::fs::create_dir_all(raw.join("site")).unwrap();
    let poems = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"];
    for f in 0..4 * scale {
        let mut jsonl = String::new();
        for i in 0..60 {
            let n = f * 60 + i;
            let text = match n % 5 {
                0 => format!("{}（其{}）", poems[n % 3], n % 7),
                1 => poems[n % 3].to_string(),
                _ => format!("第{n}篇随笔：今天读到一首诗，{}，心里很受触动，于是记下第{}个感想，编号{}。", poems[n % 3], n * 7 % 13, n),
            };
            jsonl.push_str(&serde_json::json!({ "text": text }).to_string());
            jsonl.push('\n');
        }
        std::fs::write(raw.join(format!("part-{f:03}.jsonl")), jsonl).unwrap();
    }
    let mut txt = String::new();
    for i in 0..150 * scale {
        txt.push_str(&format!("子曰：学而时习之，不亦说乎？第{i}则。\n有朋自远方来，不亦乐乎？{}\n\n", i * 31 % 97));
    }
    std::fs::write(raw.join("lunyu.txt"), txt).unwrap();
    for p in 0..6 {
        let page = format!(
            "<html><body><nav>首页 | 关于我们 | 联系我们</nav><p>本站文章均来自网友投稿整理发布，欢迎阅读。</p><p>第{p}篇：唐诗是中国古典诗歌的高峰，留下了大量脍炙人口的名篇，至今仍被广泛传诵和学习，第{p}次谈到它。</p><p>加我微信:abc12345 领取资料</p><footer>版权所有</footer></body></html>"
        );
        std::fs::write(raw.join("site").join(format!("p{p}.html")), page).unwrap();
    }
    let collection: Vec<serde_json::Value> =
        (0..40).map(|i| serde_json::json!({"title": format!("无题{i}"), "author": "佚名", "paragraphs": [format!("{}其{i}", poems[i % 3])]})).collect();
    std::fs::write(raw.join("poet.tang.0.json"), serde_json::to_string(&collection).unwrap()).unwrap();
    raw
}

const SETTINGS: &[&str] = &["--vocab-size", "400", "--split", "0.8,0.1,0.1", "--task-bytes", "4096", "--shard-tokens", "3000"];

/// The reference: `liandan data prepare` in one process.
fn reference(dir: &Path, raw: &Path) -> PathBuf {
    let out = dir.join("reference");
    let o = liandan(&[&["data", "prepare", s(raw), "--out", s(&out)], SETTINGS].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn data_job(dir: &Path, raw: &Path, out: &Path, min_workers: usize) -> PathBuf {
    let p = dir.join("data.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"data\"\n[model]\npreset = \"nano\"\n[data]\nprepared = \"{}\"\n[cluster]\nmin_workers = {min_workers}\nmax_workers = 3\n[checkpoint]\ndir = \"{}\"\n[[phases]]\nname = \"data\"\nkind = \"data\"\n[phases.prepare]\ninputs = [\"{}\"]\nvocab_size = 400\nsplit = {{ train = 0.8, val = 0.1, test = 0.1 }}\ntask_bytes = 4096\nshard_tokens = 3000\n",
            out.display(),
            dir.join("ckpt").display(),
            raw.display()
        ),
    )
    .unwrap();
    p
}

/// Every file of a prepared directory but the report (which records wall times), with bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "report.json")
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn report(dir: &Path) -> serde_json::Value {
    let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    r.as_object_mut().unwrap().remove("seconds");
    r.as_object_mut().unwrap().remove("inputs");
    // The plan's fingerprint covers the settings, and a job's differ from the CLI's (`out`).
    r.as_object_mut().unwrap().remove("fingerprint");
    r
}

fn wait_done(l: &Local, job: u64, secs: u64) -> String {
    wait_for(secs, &format!("job {job} to succeed"), || {
        let st = l.status(job);
        assert!(!st.contains(": failed"), "job failed: {st}\n{}", l.log("worker-0.log"));
        st.lines().next().is_some_and(|x| x.contains(": succeeded")).then_some(st)
    })
}

#[test]
fn one_two_and_three_workers_write_the_same_bytes_as_one_process() {
    let d = scratch("dphase");
    let raw = corpus(&d, 1);
    let want = reference(&d, &raw);
    let want_files = files(&want);
    assert!(want_files.iter().filter(|(n, _)| n.starts_with("train-")).count() >= 2, "several shards: {:?}", want_files.iter().map(|f| &f.0).collect::<Vec<_>>());
    for world in 1..=3usize {
        let w = d.join(format!("w{world}"));
        std::fs::create_dir_all(&w).unwrap();
        let l = Local::start(&w, world, &[], false);
        let out = w.join("prepared");
        let job = l.submit(&data_job(&w, &raw, &out, world));
        let st = wait_done(&l, job, 120);
        assert!(st.contains(&format!("world {world}")), "{world} workers ran it: {st}");
        assert_eq!(files(&out), want_files, "{world} worker(s) vs one process");
        assert_eq!(report(&out), report(&want), "the funnel counts nothing twice");
        assert!(!w.join(".prepared.work").exists(), "work directory removed");
    }
}

#[test]
fn a_worker_killed_mid_phase_costs_its_task_and_the_output_is_the_same() {
    let d = scratch("dkill");
    let raw = corpus(&d, 12);
    let want = reference(&d, &raw);
    let l = Local::start(&d, 2, &[], false);
    let mut l = l;
    let out = d.join("prepared");
    let job = l.submit(&data_job(&d, &raw, &out, 1));
    // Kill a worker once some tasks are done (the phase's step counts completed tasks).
    let step_of = |st: &str| -> Option<(u64, u64)> {
        let t = st.split(" step ").nth(1)?.split_whitespace().next()?;
        let (a, b) = t.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let (at, total) = wait_for(120, "a few completed tasks", || step_of(&l.status(job)).filter(|&(s, _)| s >= 5));
    assert!(at < total, "the kill lands mid-phase ({at} of {total} tasks)");
    let mut victim = l.workers.remove(1);
    victim.child.kill().unwrap();
    let st = wait_done(&l, job, 300);
    let generation: u64 = st.split(" gen ").nth(1).and_then(|t| t.split_whitespace().next()).and_then(|g| g.parse().ok()).unwrap();
    assert!(generation >= 2, "the group re-formed: {st}");
    assert_eq!(files(&out), files(&want), "the same bytes after a failure");
    assert_eq!(report(&out), report(&want), "no document counted twice");
    assert_eq!(step_of(&st), Some((total, total)), "progress reached every task: {st}");
    assert!(st.contains("stage 8/8 shards: 1/1 tasks"), "{st}");
    assert!(!d.join(".prepared.work").exists(), "work directory removed");
}

#[test]
fn a_data_phase_then_pretraining_in_one_job() {
    let d = scratch("dpre");
    let raw = corpus(&d, 1);
    let l = Local::start(&d, 2, &[], false);
    let out = d.join("prepared");
    let spec = data_job(&d, &raw, &out, 1);
    let mut text = std::fs::read_to_string(&spec).unwrap();
    text.push_str("[[phases]]\nname = \"pretrain\"\nkind = \"pretrain\"\nsteps = 4\nglobal_batch = 4\nseq_len = 16\nlr = 1e-2\n");
    text = text.replace("preset = \"nano\"", "preset = \"nano\"\nlayers = 1\nchannels = 32\nheads = 2");
    std::fs::write(&spec, text).unwrap();
    let job = l.submit(&spec);
    let st = wait_done(&l, job, 180);
    assert!(st.contains("pretrain"), "{st}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["vocab_size"], 400, "padded to the size the model was built for");
    // A data phase anywhere but first, and a phase that names it as its model, are refused.
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("name = \"pretrain\"\nkind = \"pretrain\"\nsteps = 4", "name = \"pretrain\"\nkind = \"pretrain\"\nfrom = \"data\"\nsteps = 4"),
    )
    .unwrap();
    let o = l.cli(&["submit", s(&bad)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is a data phase"), "{}", String::from_utf8_lossy(&o.stderr));
}
