//! Deduplication: exact (a 128-bit hash of the whitespace-free text) and near-duplicate
//! (MinHash over character 5-gram shingles, with LSH banding to find candidates and the MinHash
//! estimate of Jaccard similarity to confirm them).
//!
//! Documents are processed in order; a document is a duplicate if an earlier kept document is
//! identical or similar enough, so the first occurrence always survives and the result does
//! not depend on the thread count (signatures are computed in parallel, decisions sequentially).

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;
use xxhash_rust::xxh3::{xxh3_64_with_seed, xxh3_128};

use crate::error::{DataError, Result};

/// Near-duplicate settings.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    pub exact: bool,
    pub near: bool,
    /// Jaccard similarity of shingle sets at or above which two documents are near-duplicates.
    pub threshold: f32,
    /// Characters per shingle.
    pub shingle: usize,
    /// LSH bands × rows per band = MinHash permutations. 16 × 8 puts the banding's 50% point
    /// at a Jaccard of about 0.71, so pairs at the 0.8 default are found with probability ≈ 0.97
    /// and the estimate then decides.
    pub bands: usize,
    pub rows: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig { exact: true, near: true, threshold: 0.8, shingle: 5, bands: 16, rows: 8 }
    }
}

impl DedupConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(DataError::Config { field: "dedup_threshold", reason: format!("must be in (0, 1], got {}", self.threshold) });
        }
        if self.shingle == 0 || self.bands == 0 || self.rows == 0 {
            return Err(DataError::Config { field: "dedup", reason: "shingle, bands and rows must be at least 1".into() });
        }
        Ok(())
    }
}

/// Why a document was removed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Duplicate {
    /// Same text as document `of` (after removing whitespace).
    Exact { of: usize },
    /// Estimated Jaccard similarity `similarity` with document `of`.
    Near { of: usize, similarity: f32 },
}

/// Counts of a deduplication pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DedupStats {
    pub input: u64,
    pub exact: u64,
    pub near: u64,
    pub kept: u64,
}

/// Decides, for each text, whether it duplicates an earlier one.
pub fn dedup(texts: &[&str], cfg: &DedupConfig) -> (Vec<Option<Duplicate>>, DedupStats) {
    let seeds = seeds(cfg.bands * cfg.rows);
    let keys: Vec<u128> = texts.par_iter().map(|t| exact_key(t)).collect();
    let sigs: Vec<Vec<u32>> = if cfg.near { texts.par_iter().map(|t| minhash(t, cfg.shingle, &seeds)).collect() } else { vec![] };

    let mut out = vec![None; texts.len()];
    let mut stats = DedupStats { input: texts.len() as u64, ..Default::default() };
    let mut exact_seen: HashMap<u128, usize> = HashMap::new();
    let mut buckets: Vec<HashMap<u64, Vec<usize>>> = vec![HashMap::new(); cfg.bands];
    for i in 0..texts.len() {
        if cfg.exact {
            if let Some(&of) = exact_seen.get(&keys[i]) {
                out[i] = Some(Duplicate::Exact { of });
                stats.exact += 1;
                continue;
            }
            exact_seen.insert(keys[i], i);
        }
        if cfg.near && !sigs[i].is_empty() {
            let band_keys: Vec<u64> = (0..cfg.bands).map(|b| band_key(&sigs[i][b * cfg.rows..(b + 1) * cfg.rows], b)).collect();
            let mut candidates = HashSet::new();
            for (b, k) in band_keys.iter().enumerate() {
                if let Some(v) = buckets[b].get(k) {
                    candidates.extend(v.iter().copied());
                }
            }
            let mut best: Option<(usize, f32)> = None;
            let mut sorted: Vec<usize> = candidates.into_iter().collect();
            sorted.sort_unstable();
            for j in sorted {
                let sim = estimate(&sigs[i], &sigs[j]);
                if sim >= cfg.threshold && best.is_none_or(|(_, s)| sim > s) {
                    best = Some((j, sim));
                }
            }
            if let Some((of, similarity)) = best {
                out[i] = Some(Duplicate::Near { of, similarity });
                stats.near += 1;
                continue;
            }
            for (b, k) in band_keys.into_iter().enumerate() {
                buckets[b].entry(k).or_default().push(i);
            }
        }
        stats.kept += 1;
    }
    (out, stats)
}

/// The MinHash permutations `h ↦ a·h + b` (a odd), from fixed seeds.
pub(crate) fn seeds(perms: usize) -> Vec<(u64, u64)> {
    (0..perms as u64).map(|i| (xxh3_64_with_seed(b"a", i) | 1, xxh3_64_with_seed(b"b", i))).collect()
}

/// The exact-duplicate key: a hash of the text without whitespace.
pub(crate) fn exact_key(text: &str) -> u128 {
    let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    xxh3_128(s.as_bytes())
}

/// MinHash signature over character shingles (whitespace removed). Texts shorter than one
/// shingle use themselves as the only shingle.
pub(crate) fn minhash(text: &str, k: usize, seeds: &[(u64, u64)]) -> Vec<u32> {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if chars.is_empty() {
        return vec![];
    }
    let mut buf = String::new();
    let mut hashes: Vec<u64> = if chars.len() <= k {
        buf.extend(&chars);
        vec![xxh3_64_with_seed(buf.as_bytes(), 0)]
    } else {
        chars
            .windows(k)
            .map(|w| {
                buf.clear();
                buf.extend(w);
                xxh3_64_with_seed(buf.as_bytes(), 0)
            })
            .collect()
    };
    hashes.sort_unstable();
    hashes.dedup();
    seeds.iter().map(|&(a, b)| hashes.iter().map(|&h| (h.wrapping_mul(a).wrapping_add(b) >> 32) as u32).min().unwrap_or(u32::MAX)).collect()
}

pub(crate) fn band_key(rows: &[u32], band: usize) -> u64 {
    let bytes: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
    xxh3_64_with_seed(&bytes, band as u64)
}

/// Share of equal signature positions: an unbiased estimate of the Jaccard similarity.
pub(crate) fn estimate(a: &[u32], b: &[u32]) -> f32 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f32 / a.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jaccard(a: &str, b: &str, k: usize) -> f32 {
        let sh = |s: &str| -> HashSet<String> {
            let c: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
            c.windows(k).map(|w| w.iter().collect()).collect()
        };
        let (x, y) = (sh(a), sh(b));
        x.intersection(&y).count() as f32 / x.union(&y).count() as f32
    }

    #[test]
    fn exact_and_near_duplicates_are_found_and_counted() {
        let base = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。这是一首描写春天早晨的诗，作者孟浩然以清新的语言写出了春日的生机与对落花的怜惜之情，千百年来传诵不衰。";
        let spaced = base.replace('。', "。 ");
        let near = base.replace("千百年来传诵不衰", "千百年来一直传诵"); // a small edit
        let other = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。王之涣登鹳雀楼，眼界开阔，气势雄浑，后两句更成为勉励人们不断进取的名言。";
        assert!(jaccard(base, &near, 5) >= 0.8, "test premise: {}", jaccard(base, &near, 5));
        let texts = [base, spaced.as_str(), near.as_str(), other];
        let (dups, stats) = dedup(&texts, &DedupConfig::default());
        assert_eq!(dups[0], None);
        assert_eq!(dups[1], Some(Duplicate::Exact { of: 0 }));
        assert!(matches!(dups[2], Some(Duplicate::Near { of: 0, .. })), "{:?}", dups[2]);
        assert_eq!(dups[3], None);
        assert_eq!((stats.exact, stats.near, stats.kept), (1, 1, 2));
    }

    #[test]
    fn dissimilar_texts_survive_and_threshold_is_honoured() {
        let a = "床前明月光，疑是地上霜。举头望明月，低头思故乡。";
        let b = "床前明月光，疑是地上霜。举头望山月，低头思故园。";
        let j = jaccard(a, b, 5);
        assert!(j < 0.8, "premise {j}");
        let (d, _) = dedup(&[a, b], &DedupConfig::default());
        assert_eq!(d, [None, None], "Jaccard {j} is below 0.8");
        let (d, _) = dedup(&[a, b], &DedupConfig { threshold: 0.3, bands: 64, rows: 2, ..Default::default() });
        assert!(matches!(d[1], Some(Duplicate::Near { .. })), "with threshold 0.3 (J = {j})");
    }

    #[test]
    fn minhash_estimates_jaccard() {
        // 128 permutations: the standard error of the estimate is about sqrt(J(1−J)/128) ≈ 0.04.
        let a: String = (0..400).map(|i| char::from_u32(0x4E00 + (i * 7919 % 2000)).unwrap()).collect();
        let b: String = a.chars().take(300).chain((0..100).map(|i| char::from_u32(0x6000 + i).unwrap())).collect();
        let j = jaccard(&a, &b, 5);
        let seeds: Vec<(u64, u64)> = (0..128u64).map(|i| (xxh3_64_with_seed(b"a", i) | 1, xxh3_64_with_seed(b"b", i))).collect();
        let est = estimate(&minhash(&a, 5, &seeds), &minhash(&b, 5, &seeds));
        assert!((est - j).abs() < 0.15, "estimate {est} vs Jaccard {j}");
    }
}
