//! The shared work directory: who owns it, each task's output files and its completion record.
//!
//! ```text
//! .<out>.work/
//!   owner.json                 who writes here, and the plan's fingerprint
//!   <stage>/<task>.<name>      a task's output files
//!   <stage>/<task>.done        its completion record: every output file's size and SHA-256, and the task's counters
//!   final/                     the output being assembled (renamed to <out> at the end)
//! ```
//!
//! A task writes its files under temporary names, fsyncs and renames them, then writes its record
//! the same way: a record exists only for a task whose every file is complete, and a task whose
//! record does not verify (a file missing, torn or changed) is simply run again.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::shard::write_atomic;

pub const OWNER: &str = "owner.json";

/// `owner.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Who writes here: `liandan data prepare (pid N on HOST)` or `job J phase P`.
    pub owner: String,
    /// The plan's fingerprint: the same inputs and settings.
    pub fingerprint: String,
}

/// Takes `work` for `me`: creates it, or joins it when it already belongs to `me` with the same
/// plan. A directory that another owner holds is refused with its owner named, unless
/// `stale(other)` says that owner is gone (a CLI run whose process ended); then it is cleared.
///
/// # Errors
/// Another owner, or the same owner with another plan; I/O errors.
pub fn claim(work: &Path, me: &Owner, stale: &dyn Fn(&Owner) -> bool) -> Result<()> {
    for _ in 0..3 {
        std::fs::create_dir_all(work).map_err(|e| DataError::io(work, e))?;
        let path = work.join(OWNER);
        match read_owner(&path)? {
            None => {
                // Create-if-absent: a hard link fails when another rank got there first.
                let tmp = work.join(format!("{OWNER}.{}.tmp", std::process::id()));
                let json = serde_json::to_vec_pretty(me).map_err(|e| DataError::file(&tmp, e.to_string()))?;
                write_atomic(&tmp, &json)?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(DataError::io(&path, e)),
                }
            }
            Some(o) if o == *me => return Ok(()),
            Some(o) if stale(&o) => {
                std::fs::remove_dir_all(work).map_err(|e| DataError::io(work, e))?;
            }
            Some(o) if o.owner == me.owner => {
                return Err(DataError::file(work, format!("holds a run of {} with other inputs or settings; remove the directory to start over", o.owner)));
            }
            Some(o) => return Err(DataError::file(work, format!("is being written by {} (see {OWNER}); wait for it, or remove the directory if that run is gone", o.owner))),
        }
    }
    Err(DataError::file(work, "could not be claimed: its owner changed three times"))
}

fn read_owner(path: &Path) -> Result<Option<Owner>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| DataError::file(path, format!("not an owner file: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataError::io(path, e)),
    }
}

/// One output file in a completion record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// Path relative to the work directory.
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `<stage>/<task>.done`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub stage: String,
    pub task: usize,
    pub files: Vec<FileSum>,
    /// The task's counters (the stage's own type, as JSON).
    pub stats: serde_json::Value,
}

/// Where stage `stage` keeps task `task`'s files.
pub fn task_file(work: &Path, stage: &str, task: usize, name: &str) -> PathBuf {
    work.join(stage).join(format!("{task:05}.{name}"))
}

fn record_path(work: &Path, stage: &str, task: usize) -> PathBuf {
    task_file(work, stage, task, "done")
}

/// SHA-256 and size of a file, streamed.
pub fn file_sum(path: &Path) -> Result<(u64, String)> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 16, f);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

/// The record of a task if it exists and every file it lists is there with its checksum.
pub fn verified_record(work: &Path, stage: &str, task: usize) -> Option<Record> {
    let raw = std::fs::read(record_path(work, stage, task)).ok()?;
    let rec: Record = serde_json::from_slice(&raw).ok()?;
    if rec.stage != stage || rec.task != task {
        return None;
    }
    for f in &rec.files {
        match file_sum(&work.join(&f.name)) {
            Ok((bytes, sum)) if bytes == f.bytes && sum == f.sha256 => {}
            _ => return None,
        }
    }
    Some(rec)
}

/// The record of a completed task (already verified by the rank that skipped or ran it).
///
/// # Errors
/// A missing or unreadable record, named.
pub fn load_record(work: &Path, stage: &str, task: usize) -> Result<Record> {
    let p = record_path(work, stage, task);
    let raw = std::fs::read(&p).map_err(|e| DataError::io(&p, e))?;
    serde_json::from_slice(&raw).map_err(|e| DataError::file(&p, format!("not a completion record: {e}")))
}

/// The counters of a completed task, as the stage's type.
pub fn load_stats<T: for<'de> Deserialize<'de>>(work: &Path, stage: &str, task: usize) -> Result<T> {
    let rec = load_record(work, stage, task)?;
    serde_json::from_value(rec.stats).map_err(|e| DataError::file(record_path(work, stage, task), format!("bad counters: {e}")))
}

/// How many tasks of `stage` have a record (not verified: for progress and waiting).
pub fn records_present(work: &Path, stage: &str, total: usize) -> usize {
    (0..total).filter(|&t| record_path(work, stage, t).is_file()).count()
}

/// The output of one task: files are created under temporary names unique to this process and
/// moved into place by [`TaskOut::commit`], which then writes the record.
#[derive(Debug)]
pub struct TaskOut {
    work: PathBuf,
    stage: &'static str,
    task: usize,
    files: Vec<(PathBuf, PathBuf)>,
}

impl TaskOut {
    pub fn new(work: &Path, stage: &'static str, task: usize) -> Result<Self> {
        let dir = work.join(stage);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        Ok(TaskOut { work: work.to_path_buf(), stage, task, files: Vec::new() })
    }

    /// A new output file `<stage>/<task>.<name>`; returns the temporary path to write.
    pub fn file(&mut self, name: &str) -> PathBuf {
        self.file_at(task_file(&self.work, self.stage, self.task, name))
    }

    /// A new output file at `path` (inside the work directory); returns the temporary path.
    pub fn file_at(&mut self, path: PathBuf) -> PathBuf {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}-{:x}.tmp", std::process::id(), unique()));
        self.files.push((tmp.clone(), path));
        tmp
    }

    /// Lists a file that is already complete at `path` (inside the work directory).
    pub fn adopt(&mut self, path: PathBuf) {
        self.files.push((path.clone(), path));
    }

    /// Moves every file into place (each already fsynced by its writer), then writes the record.
    pub fn commit<S: Serialize>(self, stats: &S) -> Result<Record> {
        let mut sums = Vec::new();
        for (tmp, path) in &self.files {
            let (bytes, sha256) = file_sum(tmp)?;
            std::fs::rename(tmp, path).map_err(|e| DataError::io(path, e))?;
            let name = path.strip_prefix(&self.work).unwrap_or(path).display().to_string();
            sums.push(FileSum { name, bytes, sha256 });
        }
        let rec =
            Record { stage: self.stage.to_string(), task: self.task, files: sums, stats: serde_json::to_value(stats).map_err(|e| DataError::file(&self.work, e.to_string()))? };
        let p = record_path(&self.work, self.stage, self.task);
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| DataError::file(&p, e.to_string()))?;
        write_atomic(&p, &json)?;
        Ok(rec)
    }

    /// Removes the temporary files (a task that failed or was stopped).
    pub fn abandon(self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A per-process counter for temporary names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64) << 20)
}

/// Length-prefixed byte records (documents between stages): `u32` little-endian length, bytes.
#[derive(Debug)]
pub struct BlobWriter {
    path: PathBuf,
    w: BufWriter<File>,
}

impl BlobWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| DataError::io(path, e))?;
        Ok(BlobWriter { path: path.to_path_buf(), w: BufWriter::with_capacity(1 << 16, f) })
    }

    pub fn push(&mut self, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| DataError::file(&self.path, format!("a record of {len} bytes is over 4 GiB")))?;
        self.w.write_all(&len.to_le_bytes()).map_err(|e| DataError::io(&self.path, e))?;
        for p in parts {
            self.w.write_all(p).map_err(|e| DataError::io(&self.path, e))?;
        }
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        let f = self.w.into_inner().map_err(|e| DataError::io(&self.path, e.into_error()))?;
        f.sync_all().map_err(|e| DataError::io(&self.path, e))
    }
}

/// Reads [`BlobWriter`] records.
#[derive(Debug)]
pub struct BlobReader {
    path: PathBuf,
    r: BufReader<File>,
}

impl BlobReader {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(BlobReader { path: path.to_path_buf(), r: BufReader::with_capacity(1 << 16, f) })
    }

    /// Reads the next record into `buf`; `false` at the end.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Result<bool> {
        let mut len = [0u8; 4];
        match self.r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(DataError::io(&self.path, e)),
        }
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        self.r.read_exact(buf).map_err(|e| DataError::file(&self.path, format!("truncated record: {e}")))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_verify_only_complete_unchanged_output_and_owners_are_exclusive() {
        let work = std::env::temp_dir().join(format!("liandan-work-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let me = Owner { owner: "job 1 phase 0".into(), fingerprint: "f".into() };
        claim(&work, &me, &|_| false).unwrap();
        claim(&work, &me, &|_| false).unwrap();
        let other = Owner { owner: "job 2 phase 0".into(), fingerprint: "f".into() };
        let e = claim(&work, &other, &|_| false).unwrap_err().to_string();
        assert!(e.contains("is being written by job 1 phase 0"), "{e}");
        let e = claim(&work, &Owner { fingerprint: "g".into(), ..me.clone() }, &|_| false).unwrap_err().to_string();
        assert!(e.contains("other inputs or settings"), "{e}");
        claim(&work, &other, &|_| true).unwrap();

        let mut out = TaskOut::new(&work, "clean", 3).unwrap();
        let tmp = out.file("docs");
        assert!(verified_record(&work, "clean", 3).is_none());
        std::fs::write(&tmp, b"abc").unwrap();
        out.commit(&7u32).unwrap();
        let rec = verified_record(&work, "clean", 3).unwrap();
        assert_eq!(rec.files[0].name, "clean/00003.docs");
        assert_eq!(load_stats::<u32>(&work, "clean", 3).unwrap(), 7);
        std::fs::write(work.join("clean/00003.docs"), b"abd").unwrap();
        assert!(verified_record(&work, "clean", 3).is_none(), "a changed file fails its record");
        assert_eq!(records_present(&work, "clean", 5), 1);
    }
}
