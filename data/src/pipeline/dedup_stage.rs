//! Stages 4–5: duplicate pairs per partition of band keys, then clusters.
//!
//! The rule: documents are numbered in input order; two documents are duplicates when they have
//! the same exact key, or share an LSH band and their MinHash estimate of Jaccard similarity
//! reaches the threshold; duplicates form clusters (transitively), and each cluster keeps its
//! first document. A bucket of documents sharing a band compares each member with up to
//! [`WINDOW`] earlier members, so a band that many documents share costs linear time.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Ctx;
use super::clean_stage::{EXACT_TAG, FilterTask};
use super::work::{self, TaskOut, task_file};
use crate::dedup::{DedupStats, estimate};
use crate::error::{DataError, Result};
use crate::extsort::{RecordReader, RecordWriter, fields4, rec4, sorted};

/// Earlier bucket members a document is compared with.
const WINDOW: usize = 16;
const EXACT: u64 = 0;
const NEAR: u64 = 1;

/// Counters of a `pairs` task.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PairsTask {
    pub buckets: u64,
    pub comparisons: u64,
    pub pairs: u64,
    /// Sorted runs spilled to disk (0 when the partition fitted the budget).
    pub spilled_runs: u64,
}

/// Reads signature rows of any kept document (`task << 32 | row`).
struct Signatures<'a> {
    ctx: &'a Ctx<'a>,
    perms: usize,
    files: HashMap<u64, File>,
}

impl Signatures<'_> {
    fn get(&mut self, id: u64) -> Result<Vec<u32>> {
        let task = id >> 32;
        let path = task_file(&self.ctx.work, "filter", task as usize, "sigs");
        if let std::collections::hash_map::Entry::Vacant(e) = self.files.entry(task) {
            e.insert(File::open(&path).map_err(|e| DataError::io(&path, e))?);
        }
        let row_bytes = self.perms * 4;
        let mut buf = vec![0u8; row_bytes];
        let off = (id & 0xFFFF_FFFF) * row_bytes as u64;
        // Inserted just above.
        self.files[&task].read_exact_at(&mut buf, off).map_err(|e| DataError::io(&path, e))?;
        Ok(buf.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

/// Stage 4: the duplicate pairs of one partition.
pub(crate) fn pairs(ctx: &Ctx, part: usize) -> Result<()> {
    let d = &ctx.cfg.dedup;
    let mut out = TaskOut::new(&ctx.work, "pairs", part)?;
    let mut w = RecordWriter::<32>::create(&out.file("pairs"))?;
    let inputs: Vec<PathBuf> = (0..ctx.plan.tasks.len()).map(|t| task_file(&ctx.work, "filter", t, &format!("lsh.{part:03}"))).collect();
    let mut it = sorted::<32>(&inputs, &ctx.work.join("spill").join(format!("lsh-{part}")), ctx.cfg.task_budget())?;
    let mut st = PairsTask { spilled_runs: it.spilled() as u64, ..Default::default() };
    let mut sigs = Signatures { ctx, perms: d.bands * d.rows, files: HashMap::new() };
    let mut bucket: Vec<u64> = Vec::new();
    let mut key = (0u64, 0u64, 0u64);
    let mut flush = |key: (u64, u64, u64), bucket: &mut Vec<u64>, w: &mut RecordWriter<32>, st: &mut PairsTask| -> Result<()> {
        if bucket.len() > 1 {
            st.buckets += 1;
            if key.0 == EXACT_TAG {
                for &m in &bucket[1..] {
                    w.push(&rec4(bucket[0], m, EXACT, 0))?;
                    st.pairs += 1;
                }
            } else {
                let rows: Vec<Vec<u32>> = bucket.iter().map(|&m| sigs.get(m)).collect::<Result<_>>()?;
                for i in 1..bucket.len() {
                    for j in 0..i.min(WINDOW) {
                        st.comparisons += 1;
                        if estimate(&rows[j], &rows[i]) >= d.threshold {
                            w.push(&rec4(bucket[j], bucket[i], NEAR, 0))?;
                            st.pairs += 1;
                            break;
                        }
                    }
                }
            }
        }
        bucket.clear();
        Ok(())
    };
    while let Some(r) = it.next_record()? {
        if (ctx.stopped)() {
            out.abandon();
            return Err(DataError::Stopped);
        }
        let [tag, k1, k2, id] = fields4(&r);
        if (tag, k1, k2) != key {
            flush(key, &mut bucket, &mut w, &mut st)?;
            key = (tag, k1, k2);
        }
        bucket.push(id);
    }
    flush(key, &mut bucket, &mut w, &mut st)?;
    w.finish()?;
    out.commit(&st)?;
    Ok(())
}

/// Union–find whose roots are the smallest member (the first document of its cluster).
#[derive(Default)]
struct Clusters {
    parent: HashMap<u64, u64>,
}

impl Clusters {
    fn find(&mut self, x: u64) -> u64 {
        let mut x = x;
        loop {
            let p = *self.parent.get(&x).unwrap_or(&x);
            if p == x {
                return x;
            }
            let gp = *self.parent.get(&p).unwrap_or(&p);
            self.parent.insert(x, gp);
            x = gp;
        }
    }

    fn union(&mut self, a: u64, b: u64) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent.insert(hi, lo);
            self.parent.entry(lo).or_insert(lo);
        }
    }

    /// Members that are not their cluster's first document, sorted.
    fn removed(&mut self) -> Vec<u64> {
        let keys: Vec<u64> = self.parent.keys().copied().collect();
        let mut out: Vec<u64> = keys.into_iter().filter(|&k| self.find(k) != k).collect();
        out.sort_unstable();
        out
    }
}

/// Stage 5: the pairs into clusters; writes the sorted ids of the removed documents.
pub(crate) fn clusters(ctx: &Ctx) -> Result<()> {
    let mut out = TaskOut::new(&ctx.work, "clusters", 0)?;
    let inputs: Vec<PathBuf> = (0..ctx.plan.partitions).map(|p| task_file(&ctx.work, "pairs", p, "pairs")).collect();
    let mut uf = Clusters::default();
    // Exact pairs first, so the counts say how many documents were exact copies.
    let mut exact_removed = 0;
    for pass in [EXACT, NEAR] {
        for p in &inputs {
            let mut r = RecordReader::<32>::open(p)?;
            while let Some(rec) = r.next_record()? {
                let [a, b, kind, _] = fields4(&rec);
                if kind == pass {
                    uf.union(a, b);
                }
            }
        }
        if pass == EXACT {
            exact_removed = uf.removed().len() as u64;
        }
    }
    let removed = uf.removed();
    let mut input = 0;
    for t in 0..ctx.plan.tasks.len() {
        input += work::load_stats::<FilterTask>(&ctx.work, "filter", t)?.kept;
    }
    let mut w = RecordWriter::<8>::create(&out.file("removed"))?;
    for id in &removed {
        w.push(&id.to_be_bytes())?;
    }
    w.finish()?;
    let total = removed.len() as u64;
    let st = DedupStats { input, exact: exact_removed, near: total - exact_removed, kept: input - total };
    out.commit(&st)?;
    Ok(())
}

/// The removed document ids of one task's kept documents (rows), sorted.
pub(crate) fn removed_rows(ctx: &Ctx, task: usize) -> Result<Vec<u32>> {
    let mut r = RecordReader::<8>::open(&task_file(&ctx.work, "clusters", 0, "removed"))?;
    let mut rows = Vec::new();
    while let Some(rec) = r.next_record()? {
        let id = u64::from_be_bytes(rec);
        if (id >> 32) as usize == task {
            rows.push(id as u32);
        }
    }
    Ok(rows)
}
