//! The byte-level vocabulary: one token per UTF-8 byte (`V = 256`), so any text trains and
//! decodes losslessly. The data pipeline's BPE tokenizer replaces it for real jobs; checkpoints
//! record which one they were trained with.

/// Name recorded in checkpoints trained on bytes.
pub const BYTES: &str = "bytes";

/// One token per byte.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const VOCAB_SIZE: usize = 256;

    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Decodes tokens to text; byte sequences that are not valid UTF-8 (a sample cut inside a
    /// multi-byte character) become U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_cjk_and_emoji() {
        let s = "学而时习之，不亦说乎？🙂 𠀀 abc";
        let t = ByteTokenizer;
        assert_eq!(t.decode(&t.encode(s)), s);
    }
}
