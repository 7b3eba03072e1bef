//! `tests/fixtures/qwen2_tiny_chat/`, the tiny random Qwen2 the cluster test
//! (`cli/tests/pretrained.rs`) starts from: the committed files are exactly what
//! `liandan_tests::qwen2_tiny_chat_files` makes, the import path reads back the same weights
//! bit for bit, and the fixture tokenizer's vocabulary fits the model.

use liandan_tests::{fixture, qwen2_tiny_chat, qwen2_tiny_chat_files};
use liandan_worker::checkpoint;
use liandan_worker::model::config::Family;

#[test]
fn the_committed_directory_is_what_the_builder_makes() {
    let dir = fixture("qwen2_tiny_chat");
    for (name, want) in qwen2_tiny_chat_files() {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
        assert!(got == want, "{name} differs from liandan_tests::qwen2_tiny_chat_files(): rerun `cargo run --release -p liandan-tests --example qwen2_tiny_chat`");
    }
}

#[test]
fn the_import_reads_the_builders_weights_and_the_tokenizer_fits() {
    let (cfg, params) = qwen2_tiny_chat();
    let ck = checkpoint::load(&fixture("qwen2_tiny_chat"), None).unwrap();
    assert_eq!(ck.state.model_config, cfg);
    assert_eq!(cfg.family, Family::Llama);
    assert!(cfg.attention_bias && cfg.tie_word_embeddings && cfg.kv_heads() == 2);
    // f32 on disk, so the round trip is exact.
    assert!(ck.params == params, "imported weights differ from the builder's");
    let tok = liandan_data::tokenizer::ChatTokenizer::load(&fixture("hf_tokenizer_tiny"), None).unwrap();
    assert!(tok.vocab_size() <= cfg.vocab_size, "tokenizer {} > model {}", tok.vocab_size(), cfg.vocab_size);
    // The old fixture is too small for that tokenizer (why this one exists).
    assert!(checkpoint::read_model_config(&fixture("qwen2_tiny")).unwrap().vocab_size < tok.vocab_size());
}
