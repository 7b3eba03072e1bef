//! Corrupt, truncated and mismatched checkpoints are refused with a message naming the file and
//! the field; a good one loads into a model that `transformers` tensor names describe.

use std::fs;
use std::path::{Path, PathBuf};

use liandan_tests::{scratch_dir, small_train_config};
use liandan_worker::GptConfig;
use liandan_worker::checkpoint::{self, DataCursor, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE};
use liandan_worker::train::Trainer;

fn saved(name: &str) -> (PathBuf, Trainer) {
    let cfg = GptConfig::new(256, 16, 1, 2, 16);
    let tr = Trainer::new(cfg, small_train_config(2, 16, 4, 1)).unwrap();
    let dir = scratch_dir(name).join("ckpt");
    tr.save(&dir, DataCursor { position: 17 }, "bytes", &[]).unwrap();
    (dir, tr)
}

fn err(dir: &Path, expect: Option<&GptConfig>) -> String {
    checkpoint::load(dir, expect).expect_err("load must fail").to_string()
}

#[test]
fn round_trip_keeps_weights_state_and_names() {
    let (dir, tr) = saved("ok");
    let ck = checkpoint::load(&dir, Some(&tr.model.config)).unwrap();
    assert_eq!(ck.params, tr.model.params);
    assert_eq!(ck.state.data_cursor.position, 17);
    assert_eq!(ck.state.rng_state().unwrap(), tr.rng.state());
    let bytes = fs::read(dir.join(MODEL_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let wte = st.tensor("transformer.wte.weight").unwrap();
    assert_eq!(wte.shape(), [256, 16], "no padding rows in the exported embedding");
    assert_eq!(st.tensor("transformer.h.0.attn.c_attn.weight").unwrap().shape(), [16, 48], "Conv1D (in, out) layout");
    // No temporary directories left behind.
    let siblings: Vec<_> = fs::read_dir(dir.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings.len(), 1, "{siblings:?}");
    // Saving again over the same directory replaces it atomically.
    tr.save(&dir, DataCursor { position: 18 }, "bytes", &[]).unwrap();
    assert_eq!(checkpoint::load(&dir, None).unwrap().state.data_cursor.position, 18);
}

#[test]
fn truncated_file_is_named() {
    let (dir, _) = saved("trunc");
    let p = dir.join(MODEL_FILE);
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let msg = err(&dir, None);
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
}

#[test]
fn flipped_bit_is_caught_by_the_checksum() {
    let (dir, _) = saved("flip");
    let p = dir.join(OPTIMIZER_FILE);
    let mut bytes = fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(&p, &bytes).unwrap();
    let msg = err(&dir, None);
    assert!(msg.contains("optimizer.safetensors") && msg.contains("sha256 mismatch"), "{msg}");
}

#[test]
fn edited_state_is_caught() {
    let (dir, _) = saved("state");
    let p = dir.join(STATE_FILE);
    let s = fs::read_to_string(&p).unwrap().replace("\"step\": 0", "\"step\": 9");
    fs::write(&p, s).unwrap();
    let msg = err(&dir, None);
    assert!(msg.contains("state.json") && msg.contains("sha256 mismatch"), "{msg}");
}

#[test]
fn other_vocabulary_or_shape_is_refused_naming_the_field() {
    let (dir, tr) = saved("vocab");
    let mut other = tr.model.config.clone();
    other.vocab_size = 300;
    other.padded_vocab_size = 384;
    let msg = err(&dir, Some(&other));
    assert!(msg.contains("model_config.vocab_size is 256, expected 300"), "{msg}");
    let mut other = tr.model.config.clone();
    other.n_layer = 3;
    let msg = err(&dir, Some(&other));
    assert!(msg.contains("n_layer is 1, expected 3"), "{msg}");
}

#[test]
fn missing_state_says_not_a_checkpoint() {
    let dir = scratch_dir("missing");
    let msg = err(&dir, None);
    assert!(msg.contains("state.json") && msg.contains("missing"), "{msg}");
}
