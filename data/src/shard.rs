//! Split and shard: a deterministic train/val/test split by document hash, binary token shards,
//! and `manifest.json` with checksums and counts.
//!
//! Shard file (`<split>-<NNNNN>.bin`), little-endian:
//!
//! ```text
//! offset  size  field
//! 0       8     magic  b"LDTOKENS"
//! 8       4     version (1)
//! 12      4     dtype: bytes per token, 2 (u16) or 4 (u32)
//! 16      8     count: tokens that follow
//! 24      8     reserved (0)
//! 32      …     tokens
//! ```
//!
//! Documents follow each other in a shard, each ended by `<|eos|>`. The manifest records each
//! shard's size and SHA-256; readers check the header against the file size and the checksum
//! against the manifest, and name the file when either is wrong.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::error::{DataError, Result};

pub const MAGIC: &[u8; 8] = b"LDTOKENS";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
pub const MANIFEST: &str = "manifest.json";

/// The three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// Shares of the splits; they must sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRatios {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for SplitRatios {
    fn default() -> Self {
        SplitRatios { train: 0.98, val: 0.01, test: 0.01 }
    }
}

impl SplitRatios {
    /// Parses `train,val,test`, e.g. `0.98,0.01,0.01`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| DataError::Config { field: "split", reason: format!("'{s}': {e} (expected train,val,test like 0.98,0.01,0.01)") })?;
        let [train, val, test] = parts[..] else {
            return Err(DataError::Config { field: "split", reason: format!("'{s}': expected three numbers train,val,test") });
        };
        let r = SplitRatios { train, val, test };
        r.validate()?;
        Ok(r)
    }

    pub fn validate(&self) -> Result<()> {
        let sum = self.train + self.val + self.test;
        if [self.train, self.val, self.test].iter().any(|x| !(0.0..=1.0).contains(x)) || (sum - 1.0).abs() > 1e-6 {
            return Err(DataError::Config { field: "split", reason: format!("ratios {} {} {} must be in [0, 1] and sum to 1", self.train, self.val, self.test) });
        }
        Ok(())
    }

    /// The split of a document, from a hash of its text: the same text always lands in the same
    /// split, whatever else is in the corpus and in whatever order.
    pub fn assign(&self, text: &str) -> Split {
        let u = (xxh3_64_with_seed(text.as_bytes(), 0x5EED) >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.train {
            Split::Train
        } else if u < self.train + self.val {
            Split::Val
        } else {
            Split::Test
        }
    }
}

/// Token width on disk.
pub fn dtype_for(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 { 2 } else { 4 }
}

/// One shard in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Counts and shards of one split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenizer: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub dtype: u32,
    pub eos: u32,
    pub splits: BTreeMap<String, SplitInfo>,
}

/// Largest `manifest.json` read (a manifest lists shards: a few KiB each).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let raw = crate::files::read_bounded(&p, MAX_MANIFEST_BYTES)?;
        let m: Manifest = serde_json::from_slice(&raw).map_err(|e| DataError::file(&p, format!("not a valid manifest: {e}")))?;
        if m.format != "liandan-shards" || m.version != VERSION {
            return Err(DataError::file(&p, format!("format {} v{} is not liandan-shards v{VERSION}", m.format, m.version)));
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(self).map_err(|e| DataError::file(&p, e.to_string()))?;
        write_atomic(&p, &json)
    }
}

/// Writes tokens of one split into shards of at most `shard_tokens` tokens, streaming: a shard
/// is written as its tokens arrive (under a temporary name, renamed when full), so memory does not
/// depend on `shard_tokens`.
#[derive(Debug)]
pub struct ShardWriter {
    dir: PathBuf,
    split: Split,
    dtype: u32,
    shard_tokens: usize,
    cur: Option<OpenShard>,
    pub info: SplitInfo,
}

#[derive(Debug)]
struct OpenShard {
    name: String,
    tmp: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
    tokens: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: Split, dtype: u32, shard_tokens: usize) -> Self {
        ShardWriter { dir: dir.to_path_buf(), split, dtype, shard_tokens: shard_tokens.max(1), cur: None, info: SplitInfo::default() }
    }

    /// Appends one document's tokens (already ended by `<|eos|>`).
    pub fn push_document(&mut self, tokens: &[u32]) -> Result<()> {
        self.info.documents += 1;
        let mut rest = tokens;
        while !rest.is_empty() {
            if self.cur.is_none() {
                self.open()?;
            }
            // Opened just above.
            let cur = self.cur.as_mut().expect("an open shard");
            let room = self.shard_tokens - cur.tokens as usize;
            let (now, later) = rest.split_at(rest.len().min(room));
            let bytes = encode_tokens(now, self.dtype)?;
            cur.w.write_all(&bytes).map_err(|e| DataError::io(&cur.tmp, e))?;
            cur.tokens += now.len() as u64;
            rest = later;
            if cur.tokens as usize == self.shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    /// Writes what is left and returns the split's info.
    pub fn finish(mut self) -> Result<SplitInfo> {
        self.close()?;
        Ok(self.info)
    }

    fn open(&mut self) -> Result<()> {
        let name = format!("{}-{:05}.bin", self.split.name(), self.info.shards.len());
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let f = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&header(self.dtype, 0)).map_err(|e| DataError::io(&tmp, e))?;
        self.cur = Some(OpenShard { name, tmp, w, tokens: 0 });
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let Some(cur) = self.cur.take() else { return Ok(()) };
        use std::io::{Seek, SeekFrom};
        let mut f = cur.w.into_inner().map_err(|e| DataError::io(&cur.tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0)).and_then(|_| f.write_all(&header(self.dtype, cur.tokens))).and_then(|_| f.sync_all()).map_err(|e| DataError::io(&cur.tmp, e))?;
        drop(f);
        let path = self.dir.join(&cur.name);
        std::fs::rename(&cur.tmp, &path).map_err(|e| DataError::io(&path, e))?;
        let (bytes, sha256) = file_sha256(&path)?;
        self.info.tokens += cur.tokens;
        self.info.shards.push(ShardInfo { file: cur.name, tokens: cur.tokens, bytes, sha256 });
        Ok(())
    }
}

/// The 32-byte header of a shard of `count` tokens.
fn header(dtype: u32, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&dtype.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out
}

fn encode_tokens(tokens: &[u32], dtype: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(tokens.len() * dtype as usize);
    match dtype {
        2 => {
            for &t in tokens {
                let t16 = u16::try_from(t).map_err(|_| DataError::Config { field: "dtype", reason: format!("token {t} does not fit u16") })?;
                out.extend_from_slice(&t16.to_le_bytes());
            }
        }
        4 => tokens.iter().for_each(|t| out.extend_from_slice(&t.to_le_bytes())),
        d => return Err(DataError::Config { field: "dtype", reason: format!("must be 2 or 4 bytes, got {d}") }),
    }
    Ok(out)
}

/// Size and SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(|e| DataError::io(path, e))?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if k == 0 {
            return Ok((n, h.finalize().iter().map(|b| format!("{b:02x}")).collect()));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// The bytes of a shard holding `tokens`.
pub fn encode_shard(tokens: &[u32], dtype: u32) -> Result<Vec<u8>> {
    let mut out = header(dtype, tokens.len() as u64);
    out.extend(encode_tokens(tokens, dtype)?);
    Ok(out)
}

/// Reads a shard, checking its header against its size and, when given, its checksum.
///
/// # Errors
/// [`DataError::File`] naming the file: wrong magic or version, bad dtype, a count that does not
/// match the size (truncated), or a checksum mismatch.
pub fn read_shard(path: &Path, expect: Option<&ShardInfo>) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(DataError::file(path, "not a liandan token shard (bad magic)"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(DataError::file(path, format!("shard version {version}, expected {VERSION}")));
    }
    let dtype = u32_at(12);
    if dtype != 2 && dtype != 4 {
        return Err(DataError::file(path, format!("dtype {dtype} is not 2 (u16) or 4 (u32)")));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&bytes[16..24]);
    let count = u64::from_le_bytes(c) as usize;
    let want = HEADER_BYTES + count * dtype as usize;
    if bytes.len() != want {
        return Err(DataError::file(path, format!("header says {count} tokens ({want} bytes) but the file has {} bytes (truncated or corrupt)", bytes.len())));
    }
    if let Some(info) = expect {
        let sum = sha256_hex(&bytes);
        if sum != info.sha256 {
            return Err(DataError::file(path, format!("sha256 mismatch: manifest {}, file {sum}", info.sha256)));
        }
    }
    let body = &bytes[HEADER_BYTES..];
    Ok(match dtype {
        2 => body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect(),
        _ => body.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    })
}

/// Every token of a split, shard by shard, each verified against the manifest.
pub fn read_split(dir: &Path, manifest: &Manifest, split: Split) -> Result<Vec<u32>> {
    let info = manifest.splits.get(split.name()).ok_or_else(|| DataError::file(dir.join(MANIFEST), format!("no '{}' split", split.name())))?;
    let mut out = Vec::with_capacity(info.tokens as usize);
    for s in &info.shards {
        out.extend(read_shard(&dir.join(&s.file), Some(s))?);
    }
    Ok(out)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| DataError::io(&tmp, e))?;
    f.sync_all().map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-shard-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn split_is_deterministic_and_follows_the_ratios() {
        let r = SplitRatios { train: 0.8, val: 0.1, test: 0.1 };
        let docs: Vec<String> = (0..20_000).map(|i| format!("文档{i}")).collect();
        let a: Vec<Split> = docs.iter().map(|d| r.assign(d)).collect();
        let b: Vec<Split> = docs.iter().rev().map(|d| r.assign(d)).collect::<Vec<_>>().into_iter().rev().collect();
        assert_eq!(a, b, "order does not matter");
        let train = a.iter().filter(|s| **s == Split::Train).count() as f64 / docs.len() as f64;
        // Binomial standard deviation sqrt(0.8·0.2/20000) ≈ 0.003: 0.015 is five of them.
        assert!((train - 0.8).abs() < 0.015, "train share {train}");
        assert!(SplitRatios::parse("0.9,0.05").is_err());
        assert!(SplitRatios::parse("0.9,0.2,0.1").unwrap_err().to_string().contains("sum to 1"));
    }

    #[test]
    fn shards_round_trip_and_corruption_is_named() {
        let d = dir("rt");
        let mut w = ShardWriter::new(&d, Split::Train, 2, 10);
        w.push_document(&[1, 2, 3, 4, 5, 6, 7, 1]).unwrap();
        w.push_document(&[9, 9, 9, 65535, 1]).unwrap();
        let info = w.finish().unwrap();
        assert_eq!(info.shards.len(), 2);
        assert_eq!((info.documents, info.tokens), (2, 13));
        let m = Manifest {
            format: "liandan-shards".into(),
            version: VERSION,
            tokenizer: "tokenizer.json".into(),
            tokenizer_sha256: String::new(),
            vocab_size: 65536,
            dtype: 2,
            eos: 1,
            splits: [("train".to_string(), info.clone())].into(),
        };
        m.save(&d).unwrap();
        let m = Manifest::load(&d).unwrap();
        assert_eq!(read_split(&d, &m, Split::Train).unwrap(), [1, 2, 3, 4, 5, 6, 7, 1, 9, 9, 9, 65535, 1]);

        // Flip one token byte: the checksum names the file.
        let p = d.join(&info.shards[0].file);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER_BYTES] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = read_split(&d, &m, Split::Train).unwrap_err().to_string();
        assert!(e.contains("train-00000.bin") && e.contains("sha256 mismatch"), "{e}");
        // Truncation and bad magic are caught by the header alone.
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let e = read_shard(&p, None).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        bytes[0] = b'X';
        std::fs::write(&p, &bytes).unwrap();
        assert!(read_shard(&p, None).unwrap_err().to_string().contains("bad magic"));
        // u16 overflow is refused when writing.
        assert!(encode_shard(&[70000], 2).is_err());
    }
}
