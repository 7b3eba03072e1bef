//! Starting from a downloaded model, end to end on real processes: a coordinator and two CPU
//! workers run `examples/qwen2-tiny.toml`, SFT → reward model → PPO from
//! `tests/fixtures/qwen2_tiny_chat` (a tiny random `Qwen2ForCausalLM` directory, `init = DIR`)
//! on data tokenized with the model's tokenizer (`tests/fixtures/hf_tokenizer_tiny`), and the PPO phase's final checkpoint, copied without
//! liandan's `state.json`, is read back through the Hugging Face import path with the same
//! weights bit for bit.

mod common;

use std::path::{Path, PathBuf};

use common::local::{Local, wait_for};
use common::{fixture, scratch};
use liandan_coordinator::store::Store;
use liandan_worker::checkpoint;
use liandan_worker::model::config::Family;

/// `examples/qwen2-tiny.toml` with its paths made absolute: the fixtures' under the repository,
/// `runs/qwen2-tiny/` under `d`.
fn job(d: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let spec = std::fs::read_to_string(root.join("examples/qwen2-tiny.toml")).unwrap();
    let spec = spec.replace("\"tests/fixtures/", &format!("\"{}/", root.join("tests/fixtures").display())).replace("\"runs/qwen2-tiny/", &format!("\"{}/", d.display()));
    let p = d.join("qwen.toml");
    std::fs::write(&p, spec).unwrap();
    p
}

fn wait_succeeded(c: &Local, job: u64) -> String {
    wait_for(300, &format!("job {job} to succeed"), || {
        let st = c.status(job);
        assert!(!st.contains(": failed"), "job failed: {st}\n{}\n{}", c.log("worker-0.log"), c.log("worker-1.log"));
        st.lines().next().is_some_and(|l| l.contains(": succeeded")).then_some(st)
    })
}

#[test]
fn a_tiny_qwen2_runs_sft_reward_ppo_on_two_workers_and_its_export_imports_again() {
    let d = scratch("qwen2");
    let corpus = fixture("qwen2_tiny_chat_data/corpus.jsonl");
    let tokenizer = fixture("hf_tokenizer_tiny");
    let o = common::liandan(&[
        "data",
        "prepare",
        common::s(&corpus),
        "--out",
        common::s(&d.join("data")),
        "--tokenizer",
        common::s(&tokenizer),
        "--split",
        "0.9,0.05,0.05",
        "--no-near-dedup",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let init = fixture("qwen2_tiny_chat");
    let spec = job(&d);
    let c = Local::start(&d, 2, &["--device", "cpu"], false);
    let id = c.submit(&spec);
    let st = wait_succeeded(&c, id);
    assert!(st.contains("phase 2 ppo") && st.contains("world 2"), "{st}");

    let store = Store::open_read_only(&d.join("store.db")).unwrap();
    let sft = store.phase(id, 0).unwrap().unwrap();
    assert_eq!(Path::new(&sft.input_checkpoint), init.as_path(), "the sft phase starts from the model directory");
    let losses: Vec<f64> = store.metrics(id, 0).unwrap().iter().map(|m| m.loss).collect();
    eprintln!("sft losses: {losses:?}");
    assert_eq!(losses.len(), 12);
    // A random model on 503 tokens starts near ln 512 = 6.24 and learns the one answer quickly.
    assert!(losses[0] > 5.0 && losses[11] < losses[0] - 1.0, "sft losses {losses:?}");
    let reward: Vec<f64> = store.metrics(id, 1).unwrap().iter().map(|m| m.loss).collect();
    // The scalar head starts at zero: the first Bradley–Terry loss is exactly ln 2.
    assert!((reward[0] - std::f64::consts::LN_2).abs() < 1e-9, "{reward:?}");
    eprintln!("reward losses: {reward:?}");
    let ppo = store.metrics(id, 2).unwrap();
    eprintln!("ppo: {:?}", ppo.iter().map(|m| (m.loss, m.values["reward"], m.values["kl"])).collect::<Vec<_>>());
    assert_eq!(ppo.len(), 3);
    assert_eq!(ppo[0].values["kl"], 0.0, "the first rollout comes from the reference itself");
    assert!(ppo.iter().all(|m| m.loss.is_finite() && m.values["reward"].is_finite()), "{ppo:?}");

    // The final checkpoint is a Hugging Face Qwen2 directory.
    let last = PathBuf::from(store.phase(id, 2).unwrap().unwrap().last_checkpoint);
    let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(last.join("config.json")).unwrap()).unwrap();
    assert_eq!((hf["model_type"].as_str(), hf["architectures"][0].as_str()), (Some("qwen2"), Some("Qwen2ForCausalLM")), "{hf}");
    assert_eq!(hf["vocab_size"], 512);
    let trained = checkpoint::load(&last, None).unwrap();
    assert_eq!(trained.state.step, 3);
    // Without state.json it is what a user would download: the import path reads it.
    let export = d.join("export");
    std::fs::create_dir_all(&export).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(last.join(f), export.join(f)).unwrap_or_else(|e| panic!("{f} in {}: {e}", last.display()));
    }
    assert!(liandan_worker::hf::is_hf_dir(&export));
    let imported = checkpoint::load(&export, None).unwrap();
    assert_eq!(imported.state.model_config, trained.state.model_config);
    assert_eq!(imported.state.model_config.family, Family::Llama);
    assert!(imported.params == trained.params, "the import of the export differs from the checkpoint");
    let start = checkpoint::load(&init, None).unwrap();
    assert_eq!(start.state.model_config, imported.state.model_config, "training kept the architecture");
    assert!(start.params != imported.params, "SFT and PPO changed the weights");
    // The trained model answers the same from its checkpoint as from the exported directory.
    let greedy = |dir: &Path| {
        let out = common::liandan(&["generate", "--checkpoint", common::s(dir), "--prompt", "Next line 3: 床前明月光", "--greedy", "--max-new-tokens", "8"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(greedy(&last), greedy(&export));
}

/// A Hugging Face Qwen2 directory as a user downloads it: the fixture's weights and config with
/// the fixture tokenizer's files beside them.
fn qwen2_with_tokenizer(d: &Path) -> PathBuf {
    let dir = d.join("Qwen2-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen2_tiny_chat").join(f), dir.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("hf_tokenizer_tiny").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// `generate`, `eval` and `chat` read a llama-family model directory. The greedy text of
/// `generate` (the KV-cache generator) is checked against the argmax of full forward passes
/// over the whole sequence, one per new token, decoded with the directory's tokenizer.
#[test]
fn generate_eval_and_chat_answer_from_a_hugging_face_qwen2_directory() {
    use liandan_worker::engine::Engine;
    let d = scratch("qwen2-generate");
    let dir = qwen2_with_tokenizer(&d);
    let (prompt, max_new) = ("床前明月光", 12);
    let out = common::liandan(&["generate", "--checkpoint", common::s(&dir), "--prompt", prompt, "--greedy", "--max-new-tokens", &max_new.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();

    let (loaded, tk) = liandan_worker::eval::load_for_inference(&dir).unwrap();
    let tk = tk.expect("the directory has a tokenizer");
    assert_eq!(loaded.config().family, Family::Llama);
    let cfg = loaded.config().clone();
    let mut ids = tk.encode(prompt).unwrap();
    let n0 = ids.len();
    let mut full = liandan_worker::engine::cpu::CpuEngine.model(&cfg, 1, n0 + max_new).unwrap();
    full.set_params(&loaded.params().unwrap()).unwrap();
    let stops = tk.stop_tokens();
    for _ in 0..max_new {
        full.forward(&ids, 1, ids.len()).unwrap();
        let logits = full.logits().unwrap();
        let row = &logits[(ids.len() - 1) * cfg.padded_vocab_size..][..cfg.vocab_size];
        let next = (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best }) as u32;
        if stops.contains(&next) {
            break;
        }
        ids.push(next);
    }
    let want = format!("{prompt}{}\n", tk.decode_text(&ids[n0..]).unwrap());
    assert_eq!(printed, want, "KV-cache greedy generation differs from full forward passes");

    let out = common::liandan(&["eval", "--checkpoint", common::s(&dir), "--per-task", "1", "--max-new-tokens", "8"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("poem") && l.contains("/1")), "{text}");

    use std::io::Write;
    let mut chat = common::command()
        .args(["chat", "--checkpoint", common::s(&dir), "--temperature", "0", "--max-new-tokens", "6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all("你好\n\n".as_bytes()).unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("模型>"), "{}", String::from_utf8_lossy(&out.stdout));
}
