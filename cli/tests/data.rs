//! `liandan data …` end to end, and the bad inputs of the data pipeline: each refused with one
//! line that names the file (and line or field), and nothing half-written left behind.

mod common;

use std::path::Path;

use common::{assert_one_line_error as one_line_error, liandan, s, scratch};

/// Only the expected entries are in `dir` (no temporary leftovers).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A small corpus: poems as JSONL, a text file, and a noisy page.
fn corpus(dir: &Path) {
    let poems = [
        ("静夜思", "李白", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
        ("登鹳雀楼", "王之涣", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"),
        ("春晓", "孟浩然", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"),
        ("相思", "王维", "红豆生南国，春来发几枝。愿君多采撷，此物最相思。"),
        ("江雪", "柳宗元", "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。"),
    ];
    let mut jsonl = String::new();
    for i in 0..40 {
        let (t, a, b) = poems[i % poems.len()];
        jsonl.push_str(&serde_json::json!({"text": format!("{t}（其{i}）\n{a}\n{b}")}).to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("poems.jsonl"), jsonl).unwrap();
    std::fs::write(dir.join("lunyu.txt"), "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？\n\n子曰：温故而知新，可以为师矣。学而不思则罔，思而不学则殆。\n").unwrap();
    std::fs::write(
        dir.join("page.html"),
        "<html><body><nav>首页 | 关于我们 | 联系我们</nav><p>唐诗是中国古典诗歌的高峰，留下了大量脍炙人口的名篇，至今仍被广泛传诵和学习。</p><p>加我微信:abc12345 领取资料</p><footer>版权所有</footer></body></html>",
    )
    .unwrap();
}

#[test]
fn prepare_train_generate_with_the_bpe_tokenizer() {
    let d = scratch("ok");
    let raw = d.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    corpus(&raw);
    let out = d.join("prepared");
    let o = liandan(&["data", "prepare", s(&raw), "--out", s(&out), "--vocab-size", "400", "--split", "0.8,0.1,0.1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    // 40 poem lines are 5 poems with different titles: titles differ only in a few characters,
    // so most are near-duplicates of the first of each poem.
    assert!(table.contains("near duplicates"), "{table}");
    let files = entries(&out);
    for f in ["manifest.json", "report.json", "tokenizer.json", "train-00000.bin"] {
        assert!(files.contains(&f.to_string()), "{files:?}");
    }
    assert!(files.iter().all(|f| !f.contains("tmp")), "{files:?}");
    assert_eq!(entries(&d), ["prepared", "raw"], "no temporary directories beside the output");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["documents_in"], 43);
    assert!(report["clean"]["rules"]["contact"]["lines"].as_u64().unwrap() >= 1);

    let run = d.join("run");
    let o = liandan(&["train", "--data", s(&out), "--out", s(&run), "--batch", "2", "--seq", "16", "--steps", "3", "--layers", "1", "--channels", "32", "--heads", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("step-00000003/tokenizer.json").exists(), "the tokenizer travels with the checkpoint");
    let o = liandan(&["generate", "--checkpoint", s(&run), "--prompt", "静夜思", "--max-new-tokens", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("静夜思"));

    // `data clean` writes one JSON object per kept document, with the rules that fired.
    let cleaned = d.join("clean.jsonl");
    let o = liandan(&["data", "clean", s(&raw.join("page.html")), "--out", s(&cleaned)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&cleaned).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(line["text"], "唐诗是中国古典诗歌的高峰，留下了大量脍炙人口的名篇，至今仍被广泛传诵和学习。");
    assert!(line["rules"].as_array().unwrap().iter().any(|r| r == "contact"), "{line}");
}

#[test]
fn empty_inputs_and_missing_fields_are_refused() {
    let d = scratch("bad");
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = d.join("out");
    one_line_error(&liandan(&["data", "prepare", s(&empty), "--out", s(&out)]), &["empty.jsonl", "no documents"]);
    let nothing = d.join("nothing");
    std::fs::create_dir_all(&nothing).unwrap();
    one_line_error(&liandan(&["data", "prepare", s(&nothing), "--out", s(&out)]), &["nothing", "no readable files"]);
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"第一行是好的，有足够的文字内容。\"}\n{\"body\": \"没有 text 字段\"}\n").unwrap();
    one_line_error(&liandan(&["data", "prepare", s(&bad), "--out", s(&out), "--strict"]), &["bad.jsonl:2", "field 'text' is missing"]);
    assert!(!out.exists(), "nothing half-written");
    assert_eq!(entries(&d), ["bad.jsonl", "empty.jsonl", "nothing"]);
    one_line_error(&liandan(&["data", "prepare", s(&bad), "--out", s(&out), "--split", "0.5,0.5,0.5"]), &["split", "sum to 1"]);
    one_line_error(&liandan(&["data", "clean", s(&bad), "--out", s(&d.join("c.jsonl")), "--disable", "spam"]), &["unknown rule 'spam'"]);
}

#[test]
fn corrupt_shards_and_foreign_tokenizers_are_named() {
    let d = scratch("corrupt");
    let raw = d.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    corpus(&raw);
    let a = d.join("a");
    assert!(liandan(&["data", "prepare", s(&raw), "--out", s(&a), "--vocab-size", "400", "--split", "0.8,0.1,0.1"]).status.success());
    let b = d.join("b");
    assert!(liandan(&["data", "prepare", s(&raw), "--out", s(&b), "--vocab-size", "420", "--split", "0.8,0.1,0.1"]).status.success());
    let model = ["--batch", "2", "--seq", "16", "--layers", "1", "--channels", "32", "--heads", "2"];
    let run = d.join("run");
    let o = liandan(&[&["train", "--data", s(&a), "--out", s(&run), "--steps", "2"], &model[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Resuming on data made with another tokenizer.
    let o = liandan(&["train", "--data", s(&b), "--out", s(&d.join("run2")), "--resume", s(&run)]);
    one_line_error(&o, &["tokenizer"]);

    let shard = a.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    let o = liandan(&[&["train", "--data", s(&a), "--out", s(&d.join("run3")), "--steps", "1"], &model[..]].concat());
    one_line_error(&o, &["train-00000.bin", "sha256 mismatch"]);
    bytes[0] = b'X';
    std::fs::write(&shard, &bytes).unwrap();
    let o = liandan(&[&["train", "--data", s(&a), "--out", s(&d.join("run3")), "--steps", "1"], &model[..]].concat());
    one_line_error(&o, &["train-00000.bin", "bad magic"]);
}

#[test]
fn fifos_truncated_gzip_and_a_directory_another_run_owns() {
    let d = scratch("stream-bad");
    let raw = d.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    corpus(&raw);
    // A FIFO named as an input is refused by name (reading it would block forever).
    let fifo = d.join("pipe.jsonl");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = d.join("out");
    one_line_error(&liandan(&["data", "prepare", s(&fifo), "--out", s(&out)]), &["pipe.jsonl", "is a FIFO, not a regular file"]);
    std::fs::remove_file(&fifo).unwrap();
    // A truncated gzip in the middle of the inputs: skipped from the cut on, named and counted.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for i in 0..3000 {
        std::io::Write::write_all(&mut gz, format!("{{\"text\": \"压缩文件里的第{i}篇文章，内容足够长，可以通过过滤。\"}}\n").as_bytes()).unwrap();
    }
    let bytes = gz.finish().unwrap();
    std::fs::write(raw.join("m.jsonl.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let o = liandan(&["data", "prepare", s(&raw), "--out", s(&out), "--vocab-size", "400", "--split", "0.8,0.1,0.1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("m.jsonl.gz") && err.contains("the rest of the file skipped"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("files skipped: 1"), "{}", String::from_utf8_lossy(&o.stdout));
    // A work directory that a data phase of a job holds is refused, and left as it is.
    let work = d.join(".out2.work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("owner.json"), r#"{"owner": "the data phase of /jobs/7/phase-0", "fingerprint": "x"}"#).unwrap();
    let o = liandan(&["data", "prepare", s(&raw), "--out", s(&d.join("out2")), "--vocab-size", "400"]);
    one_line_error(&o, &[".out2.work", "is being written by the data phase of /jobs/7/phase-0"]);
    assert!(work.join("owner.json").exists(), "another run's directory is not touched");
    assert!(!d.join("out2").exists());
}
