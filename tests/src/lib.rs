//! Helpers shared by the workspace integration tests.

use std::path::PathBuf;

use liandan_worker::optim::{AdamWConfig, LrSchedule};
use liandan_worker::train::TrainConfig;

/// Path of a committed test fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A fresh scratch directory under the system temp directory, unique to this process and name.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("liandan-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir under CARGO_TARGET_TMPDIR is writable");
    dir
}

/// Asserts `|a - b| <= atol + rtol·|b|` element-wise, naming the first offending index.
pub fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f32;
    for (i, (&x, &y)) in got.iter().zip(want).enumerate() {
        let err = (x - y).abs();
        assert!(err <= atol + rtol * y.abs(), "{what}[{i}]: got {x}, want {y} (|diff| {err}, atol {atol}, rtol {rtol})");
        worst = worst.max(err);
    }
    eprintln!("{what}: max |diff| {worst:.3e} over {} values", got.len());
}

/// Largest absolute value.
pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// A small training config for tests.
pub fn small_train_config(b: usize, t: usize, steps: u64, seed: u64) -> TrainConfig {
    TrainConfig {
        batch_size: b,
        seq_len: t,
        grad_accum: 1,
        schedule: LrSchedule { max_lr: 3e-3, min_lr: 3e-4, warmup_steps: 2, total_steps: steps },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        seed,
    }
}

/// A deterministic pseudo-text of `n` byte tokens with some structure to learn.
pub fn synthetic_tokens(n: usize) -> Vec<u32> {
    let text = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？";
    text.bytes().cycle().take(n).map(u32::from).collect()
}
