//! Stages 1–3: clean, boilerplate, filter (with the signatures for deduplication).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::work::{self, BlobReader, BlobWriter, TaskOut, task_file};
use super::{Ctx, h64};
use crate::clean::{CleanStats, CleanedDoc, Cleaner};
use crate::dedup::{band_key, exact_key, minhash, seeds};
use crate::error::{DataError, Result};
use crate::extsort::{RecordReader, RecordWriter, fields4, rec4, sorted};
use crate::ingest::{DocKind, IngestStats};
use crate::shard::Split;
use crate::stream::read_chunk;

/// Seeds of the hashes that name groups and lines.
const GROUP_SEED: u64 = 0x6752;
const LINE_SEED: u64 = 0x4C1E;
/// Tag of an exact-duplicate key among the band keys.
pub(crate) const EXACT_TAG: u64 = u64::MAX;

/// Counters of a `clean` task.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct CleanTask {
    pub ingest: IngestStats,
    pub clean: CleanStats,
    pub documents_in: u64,
    pub chars_in: u64,
    /// UTF-8 bytes of the documents read (their text, without markup or JSON).
    #[serde(default)]
    pub bytes_in: u64,
    /// Documents per group (hash of the site or file), for the boilerplate share.
    pub groups: Vec<(u64, u64)>,
}

/// Counters of a `filter` task.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct FilterTask {
    pub clean: CleanStats,
    pub kept: u64,
    pub chars: u64,
    /// UTF-8 bytes of the kept documents that fall in the training split.
    pub train_bytes: u64,
}

fn kind_byte(k: DocKind) -> u8 {
    match k {
        DocKind::Text => 0,
        DocKind::Jsonl => 1,
        DocKind::Html => 2,
        DocKind::Poetry => 3,
    }
}

fn kind_of(b: u8) -> DocKind {
    match b {
        0 => DocKind::Text,
        1 => DocKind::Jsonl,
        2 => DocKind::Html,
        _ => DocKind::Poetry,
    }
}

/// Which partition a key goes to.
pub(crate) fn partition(a: u64, b: u64, partitions: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64_with_seed(&[a.to_le_bytes(), b.to_le_bytes()].concat(), 0x9A27) % partitions as u64) as usize
}

fn cleaner(ctx: &Ctx) -> Result<&'static Cleaner> {
    // One cleaner per process and configuration (OpenCC's dictionaries load once).
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<Vec<(crate::clean::CleanConfig, &'static Cleaner)>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = cache.iter().find(|(c, _)| *c == ctx.cfg.clean) {
        return Ok(c);
    }
    let c: &'static Cleaner = Box::leak(Box::new(Cleaner::new(ctx.cfg.clean.clone())?));
    cache.push((ctx.cfg.clean.clone(), c));
    Ok(c)
}

/// Stage 1: reads the task's chunks, rewrites and line rules; writes the documents and the
/// boilerplate keys `(group, line)` of each document's distinct lines, by partition.
pub(crate) fn clean(ctx: &Ctx, task: usize) -> Result<()> {
    let cleaner = cleaner(ctx)?;
    let cfg = ctx.cfg;
    let parts = ctx.plan.partitions;
    let mut out = TaskOut::new(&ctx.work, "clean", task)?;
    let docs_path = out.file("docs");
    let mut docs = BlobWriter::create(&docs_path)?;
    let boiler_on = !cfg.clean.disabled.contains("boilerplate");
    let mut keys: Vec<RecordWriter<32>> = Vec::new();
    if boiler_on {
        for p in 0..parts {
            keys.push(RecordWriter::create(&out.file(&format!("bp.{p:03}")))?);
        }
    }
    let mut st = CleanTask::default();
    let mut groups: HashMap<u64, u64> = HashMap::new();
    let result = (|| -> Result<()> {
        for chunk in &ctx.plan.tasks[task] {
            let ingest = read_chunk(chunk, &cfg.ingest, &cfg.limits, &mut |raw| {
                if (ctx.stopped)() {
                    return Err(DataError::Stopped);
                }
                st.documents_in += 1;
                st.chars_in += raw.text.chars().count() as u64;
                st.bytes_in += raw.text.len() as u64;
                let kind = raw.kind;
                let g = h64(&raw.group, GROUP_SEED);
                let d = cleaner.clean_lines(raw, &mut st.clean);
                if kind != DocKind::Poetry && boiler_on {
                    *groups.entry(g).or_default() += 1;
                    let mut seen = HashSet::new();
                    for line in d.text.lines() {
                        if line.chars().count() >= cfg.clean.boilerplate_min_chars && seen.insert(line) {
                            let l = h64(line, LINE_SEED);
                            keys[partition(g, l, parts)].push(&rec4(g, l, 0, 0))?;
                        }
                    }
                }
                docs.push(&[&[kind_byte(kind)], &g.to_le_bytes(), d.text.as_bytes()])
            })?;
            st.ingest.merge(ingest);
        }
        Ok(())
    })();
    if let Err(e) = result {
        out.abandon();
        return Err(e);
    }
    docs.finish()?;
    for k in keys {
        k.finish()?;
    }
    let mut g: Vec<(u64, u64)> = groups.into_iter().collect();
    g.sort_unstable();
    st.groups = g;
    out.commit(&st)?;
    Ok(())
}

/// Stage 2: for one partition, the `(group, line)` keys that occur in enough documents of their
/// group to be boilerplate (the same thresholds as [`Cleaner::remove_boilerplate`]).
pub(crate) fn boilerplate(ctx: &Ctx, part: usize) -> Result<()> {
    let c = &ctx.cfg.clean;
    let tasks = ctx.plan.tasks.len();
    let mut out = TaskOut::new(&ctx.work, "boilerplate", part)?;
    let mut w = RecordWriter::<32>::create(&out.file("lines"))?;
    if !c.disabled.contains("boilerplate") {
        let mut totals: HashMap<u64, u64> = HashMap::new();
        for t in 0..tasks {
            let st: CleanTask = work::load_stats(&ctx.work, "clean", t)?;
            for (g, n) in st.groups {
                *totals.entry(g).or_default() += n;
            }
        }
        let inputs: Vec<PathBuf> = (0..tasks).map(|t| task_file(&ctx.work, "clean", t, &format!("bp.{part:03}"))).collect();
        let mut it = sorted::<32>(&inputs, &ctx.work.join("spill").join(format!("bp-{part}")), ctx.cfg.task_budget())?;
        let mut run: Option<(u64, u64, u64)> = None;
        let flush = |run: Option<(u64, u64, u64)>, w: &mut RecordWriter<32>| -> Result<()> {
            if let Some((g, l, n)) = run {
                let total = totals.get(&g).copied().unwrap_or(0);
                let min = c.boilerplate_min_docs as u64;
                if total >= min && n >= min && n as f32 >= c.boilerplate_min_share * total as f32 {
                    w.push(&rec4(g, l, 0, 0))?;
                }
            }
            Ok(())
        };
        while let Some(r) = it.next_record()? {
            let [g, l, ..] = fields4(&r);
            match &mut run {
                Some((rg, rl, n)) if *rg == g && *rl == l => *n += 1,
                _ => {
                    flush(run.take(), &mut w)?;
                    run = Some((g, l, 1));
                }
            }
        }
        flush(run, &mut w)?;
    }
    w.finish()?;
    out.commit(&())?;
    Ok(())
}

/// The boilerplate keys of every partition, sorted for lookup.
fn boilerplate_set(ctx: &Ctx) -> Result<Vec<(u64, u64)>> {
    let mut set = Vec::new();
    for p in 0..ctx.plan.partitions {
        let mut r = RecordReader::<32>::open(&task_file(&ctx.work, "boilerplate", p, "lines"))?;
        while let Some(rec) = r.next_record()? {
            let [g, l, ..] = fields4(&rec);
            set.push((g, l));
        }
    }
    set.sort_unstable();
    Ok(set)
}

/// Stage 3: boilerplate lines out, document filters; for each kept document its text, its
/// MinHash signature (a fixed-size row, so the pairs stage can read any document's), and its
/// exact key and band keys by partition. Kept documents are numbered `task << 32 | row`.
pub(crate) fn filter(ctx: &Ctx, task: usize) -> Result<()> {
    let cleaner = cleaner(ctx)?;
    let cfg = ctx.cfg;
    let parts = ctx.plan.partitions;
    let boiler = boilerplate_set(ctx)?;
    let mut out = TaskOut::new(&ctx.work, "filter", task)?;
    let mut kept = BlobWriter::create(&out.file("kept"))?;
    let near = cfg.dedup.near;
    let perms = cfg.dedup.bands * cfg.dedup.rows;
    let seeds = seeds(perms);
    let mut sigs = if near { Some(RecordWriter::<4>::create(&out.file("sigs"))?) } else { None };
    let mut keys: Vec<RecordWriter<32>> = Vec::new();
    for p in 0..parts {
        keys.push(RecordWriter::create(&out.file(&format!("lsh.{p:03}")))?);
    }
    let mut st = FilterTask::default();
    let mut reader = BlobReader::open(&task_file(&ctx.work, "clean", task, "docs"))?;
    let mut buf = Vec::new();
    let mut row = 0u64;
    while reader.next_into(&mut buf)? {
        if (ctx.stopped)() {
            out.abandon();
            return Err(DataError::Stopped);
        }
        if buf.len() < 9 {
            return Err(DataError::file(task_file(&ctx.work, "clean", task, "docs"), "a document record shorter than its header"));
        }
        let kind = kind_of(buf[0]);
        // 8 bytes by the length check above.
        let g = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
        let text = String::from_utf8_lossy(&buf[9..]).into_owned();
        let mut d = CleanedDoc { source: String::new(), kind, group: String::new(), text, rules: Vec::new(), dropped_by: None, removed: Vec::new() };
        cleaner.apply_boilerplate(&mut d, |l| boiler.binary_search(&(g, h64(l, LINE_SEED))).is_ok(), &mut st.clean);
        cleaner.filter(&mut d, &mut st.clean);
        if d.dropped_by.is_some() || d.text.is_empty() {
            continue;
        }
        let id = (task as u64) << 32 | row;
        row += 1;
        st.kept += 1;
        st.chars += d.text.chars().count() as u64;
        if cfg.split.assign(&d.text) == Split::Train {
            st.train_bytes += d.text.len() as u64;
        }
        if cfg.dedup.exact {
            let k = exact_key(&d.text);
            let (hi, lo) = ((k >> 64) as u64, k as u64);
            keys[partition(hi, lo, parts)].push(&rec4(EXACT_TAG, hi, lo, id))?;
        }
        if let Some(sw) = &mut sigs {
            let sig = minhash(&d.text, cfg.dedup.shingle, &seeds);
            for i in 0..perms {
                sw.push(&sig.get(i).copied().unwrap_or(u32::MAX).to_le_bytes())?;
            }
            if !sig.is_empty() {
                for b in 0..cfg.dedup.bands {
                    let k = band_key(&sig[b * cfg.dedup.rows..(b + 1) * cfg.dedup.rows], b);
                    keys[partition(b as u64, k, parts)].push(&rec4(b as u64, k, 0, id))?;
                }
            }
        }
        kept.push(&[d.text.as_bytes()])?;
    }
    kept.finish()?;
    if let Some(s) = sigs {
        s.finish()?;
    }
    for k in keys {
        k.finish()?;
    }
    out.commit(&st)?;
    Ok(())
}
