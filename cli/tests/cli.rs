//! The `liandan` binary end to end: a short training run, generation, resume, and bad input
//! (each refused with one line naming the file or field and a non-zero exit, never a panic).

mod common;

use common::{assert_one_line_error, liandan, s, scratch};

#[test]
fn empty_training_file_is_refused() {
    let d = scratch("empty");
    let f = d.join("empty.txt");
    std::fs::write(&f, "").unwrap();
    let out = liandan(&["train", "--text", s(&f), "--out", s(&d.join("run"))]);
    assert_one_line_error(&out, &["empty.txt", "empty"]);
}

#[test]
fn indivisible_heads_are_refused_naming_the_numbers() {
    let d = scratch("heads");
    let f = d.join("t.txt");
    std::fs::write(&f, "子曰：学而时习之。".repeat(50)).unwrap();
    let out = liandan(&["train", "--text", s(&f), "--out", s(&d.join("run")), "--channels", "100", "--heads", "3"]);
    assert_one_line_error(&out, &["n_embd (100) must be divisible by n_head (3)"]);
}

#[test]
fn train_generate_resume_and_refuse_a_corrupt_checkpoint() {
    let d = scratch("train");
    let f = d.join("t.txt");
    std::fs::write(&f, "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？\n".repeat(40)).unwrap();
    let run = d.join("run");
    let common = ["--text", s(&f), "--out", s(&run), "--batch", "2", "--seq", "32", "--layers", "1", "--channels", "32", "--heads", "2"];
    let out = liandan(&[&["train", "--steps", "6", "--checkpoint-every", "3"], &common[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run.join("step-00000003/model.safetensors").exists());
    assert_eq!(std::fs::read_to_string(run.join("latest")).unwrap().trim(), "step-00000006");

    let out = liandan(&["generate", "--checkpoint", s(&run), "--prompt", "子曰", "--max-new-tokens", "12", "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("子曰"));

    // Resuming the step-3 checkpoint finishes the same 6-step run (same total_steps).
    let out = liandan(&["train", "--text", s(&f), "--out", s(&d.join("resumed")), "--resume", s(&run.join("step-00000003"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = std::fs::read(run.join("step-00000006/model.safetensors")).unwrap();
    let b = std::fs::read(d.join("resumed/step-00000006/model.safetensors")).unwrap();
    assert!(a == b, "resumed run's final weights differ from the uninterrupted run's");

    // A flipped bit in the weights: refused, naming the file.
    let p = run.join("step-00000006/model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let out = liandan(&["generate", "--checkpoint", s(&run), "--prompt", "子"]);
    assert_one_line_error(&out, &["step-00000006/model.safetensors", "sha256 mismatch"]);

    // Not a checkpoint at all.
    let out = liandan(&["generate", "--checkpoint", s(&d), "--prompt", "子"]);
    assert_one_line_error(&out, &["not a checkpoint"]);
}
