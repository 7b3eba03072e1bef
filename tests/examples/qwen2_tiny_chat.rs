//! Writes `tests/fixtures/qwen2_tiny_chat/`: a tiny random Qwen2 model directory whose
//! vocabulary fits `tests/fixtures/hf_tokenizer_tiny` (see `liandan_tests::qwen2_tiny_chat`).
//!
//!     cargo run --release -p liandan-tests --example qwen2_tiny_chat

fn main() -> std::io::Result<()> {
    let dir = liandan_tests::fixture("qwen2_tiny_chat");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in liandan_tests::qwen2_tiny_chat_files() {
        std::fs::write(dir.join(name), &bytes)?;
        println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
    }
    Ok(())
}
