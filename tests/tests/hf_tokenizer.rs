//! Phases with a model's own tokenizer and chat template (the ChatML fixture in
//! `tests/fixtures/hf_tokenizer_tiny`, written by `scripts/build_hf_tokenizer_fixture.py`): the
//! submit-time check accepts it and refuses, in one line, a vocabulary larger than the
//! embedding, a template that does not render, one with no assistant turn, one with no
//! generation prompt.

use std::path::{Path, PathBuf};

use liandan_data::shard::{Manifest, sha256_hex};
use liandan_worker::GptConfig;
use liandan_worker::phase::check_inputs;
use liandan_worker::plan::{PhaseKind, PhasePlan, PpoSettings};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf_tokenizer_tiny")
}

/// Prepared data (tokenizer files + manifest, no shards) from the fixture, with `template` in
/// place of its chat template when given, and an SFT plan for a model of `rows` embedding rows.
fn plan(name: &str, template: Option<&str>, rows: usize) -> PhasePlan {
    let dir = std::env::temp_dir().join(format!("liandan-hftok-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture().join(f), data.join(f)).unwrap();
    }
    if let Some(t) = template {
        let p = data.join("tokenizer_config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c["chat_template"] = t.into();
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    }
    let bytes = std::fs::read(data.join("tokenizer.json")).unwrap();
    let manifest = Manifest {
        format: "liandan-shards".into(),
        version: liandan_data::shard::VERSION,
        tokenizer: "tokenizer.json".into(),
        tokenizer_sha256: sha256_hex(&bytes),
        vocab_size: 503,
        dtype: 2,
        eos: 502,
        splits: Default::default(),
    };
    manifest.save(&data).unwrap();
    let sft = dir.join("sft.jsonl");
    let lines: String = (0..12).map(|i| serde_json::json!({"prompt": format!("学而时习之 {i}"), "response": "不亦说乎？", "task": "t"}).to_string() + "\n").collect();
    std::fs::write(&sft, lines).unwrap();
    PhasePlan {
        kind: PhaseKind::Sft,
        model: GptConfig::new(rows, 128, 1, 2, 16),
        data_dir: data,
        steps: 1,
        global_batch: 2,
        seq_len: 96,
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup: 0,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 1,
        checkpoint_every: 1,
        examples: Some(sft),
        from_phase: None,
        reward_phase: None,
        init_checkpoint: None,
        reward_checkpoint: None,
        ppo: None,
        grpo: None,
        dpo: None,
        comparisons: Default::default(),
        tasks: Vec::new(),
        max_skipped_steps: 0,
        device: None,
        labelled_examples: None,
        prepare: None,
        shard_optimizer: false,
    }
}

#[test]
fn a_models_template_passes_the_submit_check_for_sft_and_ppo() {
    // 503 tokens in an embedding of 512 rows (rounded up, as Qwen2 does).
    let p = plan("good", None, 512);
    check_inputs(&p).unwrap();
    let ppo = PhasePlan { kind: PhaseKind::Ppo, ppo: Some(PpoSettings { tasks: vec![], ..Default::default() }), ..p };
    check_inputs(&ppo).unwrap();
}

fn refused(p: &PhasePlan) -> String {
    let e = check_inputs(p).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    eprintln!("refused: {e}");
    e
}

#[test]
fn bad_tokenizers_and_templates_are_refused_at_submit() {
    let e = refused(&plan("rows", None, 400));
    assert!(e.contains("503") && e.contains("400"), "{e}");

    let e = refused(&plan("syntax", Some("{% for m in messages %}{{ m.content }"), 512));
    assert!(e.contains("tokenizer_config.json") && e.contains("chat_template") && e.contains("line 1"), "{e}");

    let e = refused(&plan("raise", Some("{{ raise_exception('Only user and assistant roles are supported!') }}"), 512));
    assert!(e.contains("tokenizer_config.json") && e.contains("Only user and assistant roles are supported"), "{e}");

    // Writes the user's turns only: the answer is nowhere in the text.
    let users_only = "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let e = refused(&plan("noassistant", Some(users_only), 512));
    assert!(e.contains("tokenizer_config.json") && e.contains("chat_template"), "{e}");

    // ChatML without its generation prompt.
    let no_prompt = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    let e = refused(&plan("noprompt", Some(no_prompt), 512));
    assert!(e.contains("tokenizer_config.json") && e.contains("renders no generation prompt"), "{e}");
}

#[derive(Default)]
struct Steps(Vec<f64>);

impl liandan_worker::phase::PhaseEvents for Steps {
    fn step(&mut self, m: liandan_worker::phase::StepMetrics) {
        self.0.push(m.loss);
    }
    fn checkpoint(&mut self, _step: u64, _path: &Path) -> Result<bool, String> {
        Ok(false)
    }
}

/// SFT with the model's tokenizer: the checkpoint carries its template and stop tokens
/// (checksummed), and loads back for `chat`/`eval` with them. With `LIANDAN_EXPORT_DIR` set,
/// the checkpoint and liandan's ids for the fixture's conversations are left there for
/// `scripts/check_hf_tokenizer.py`.
#[test]
fn sft_with_a_models_tokenizer_exports_its_template() {
    use liandan_data::chat::{Message, Role, prompt_ids, tokenize_chat};
    let p = PhasePlan { steps: 2, checkpoint_every: 2, ..plan("sft", None, 512) };
    let ckpt = p.data_dir.parent().unwrap().join("ckpt");
    let mut ev = Steps::default();
    let io = liandan_worker::phase::PhaseIo {
        checkpoint_dir: &ckpt,
        engine: &liandan_worker::engine::cpu::CpuEngine,
        coll: &mut liandan_worker::collective::Local,
        abort: &std::sync::atomic::AtomicBool::new(false),
        events: &mut ev,
    };
    let out = liandan_worker::phase::sft::run_sft(&p, liandan_worker::phase::Start::Fresh, io).unwrap();
    let liandan_worker::phase::PhaseOutcome::Finished { final_checkpoint: Some(dir) } = out else { panic!("{out:?}") };
    assert_eq!(ev.0.len(), 2);
    assert!(ev.0.iter().all(|l| l.is_finite()));
    let state = liandan_worker::checkpoint::verify(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"] {
        assert!(state.files.contains_key(f), "{f} not checksummed");
    }
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture().join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["chat_template"], want["chat_template"]);
    assert_eq!(config["eos_token"], "<|im_end|>");
    let (model, tk) = liandan_worker::eval::load_chat_model(&dir).unwrap();
    assert!(tk.is_model_tokenizer());
    assert_eq!(tk.stop_tokens(), vec![502, 500]);
    // A greedy answer through the template's generation prompt (the model is barely trained:
    // only that it runs and stops within the limit).
    liandan_worker::eval::answer(model.as_ref(), &tk, "学而时习之", 8).unwrap();

    if let Some(out) = std::env::var_os("LIANDAN_EXPORT_DIR") {
        let out = Path::new(&out);
        std::fs::create_dir_all(out).unwrap();
        for f in state.files.keys().map(String::as_str).chain(["state.json"]) {
            std::fs::copy(dir.join(f), out.join(f)).unwrap();
        }
        let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap();
        let cases: Vec<serde_json::Value> = expected["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let msgs: Vec<Message> = c["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| Message {
                        role: match m["role"].as_str().unwrap() {
                            "system" => Role::System,
                            "user" => Role::User,
                            _ => Role::Assistant,
                        },
                        content: m["content"].as_str().unwrap().into(),
                    })
                    .collect();
                let ids = tokenize_chat(&tk, &msgs).unwrap().ids;
                let prompt = prompt_ids(&tk, &msgs[..msgs.len() - 1]).unwrap();
                serde_json::json!({ "messages": c["messages"], "ids": ids, "prompt_ids": prompt })
            })
            .collect();
        let doc = serde_json::json!({ "stop_tokens": tk.stop_tokens(), "cases": cases });
        std::fs::write(out.join("liandan_ids.json"), serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    }
}
