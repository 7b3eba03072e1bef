//! Fixed-size records on disk and an external sort over them, so that the stages that group
//! keys across the whole corpus (boilerplate lines, LSH bands, duplicate pairs) run in a memory
//! budget however large the corpus is.
//!
//! A record is `N` bytes compared as bytes: writers encode integers big-endian, so byte order is
//! numeric order. [`sorted`] reads any number of record files; when they fit in the budget it
//! sorts them in memory, otherwise it writes sorted runs under a spill directory and merges them
//! (the runs are removed when the iterator is dropped).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Buffer of each record file reader and writer.
const IO_BUF: usize = 64 << 10;

/// Appends fixed-size records to a file.
#[derive(Debug)]
pub struct RecordWriter<const N: usize> {
    path: PathBuf,
    w: BufWriter<File>,
    pub count: u64,
}

impl<const N: usize> RecordWriter<N> {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| DataError::io(path, e))?;
        Ok(RecordWriter { path: path.to_path_buf(), w: BufWriter::with_capacity(IO_BUF, f), count: 0 })
    }

    pub fn push(&mut self, rec: &[u8; N]) -> Result<()> {
        self.count += 1;
        self.w.write_all(rec).map_err(|e| DataError::io(&self.path, e))
    }

    /// Flushes and fsyncs; returns the number of records.
    pub fn finish(self) -> Result<u64> {
        let f = self.w.into_inner().map_err(|e| DataError::io(&self.path, e.into_error()))?;
        f.sync_all().map_err(|e| DataError::io(&self.path, e))?;
        Ok(self.count)
    }
}

/// Reads fixed-size records from a file, in order.
#[derive(Debug)]
pub struct RecordReader<const N: usize> {
    path: PathBuf,
    r: BufReader<File>,
}

impl<const N: usize> RecordReader<N> {
    pub fn open(path: &Path) -> Result<Self> {
        Self::with_buffer(path, IO_BUF)
    }

    fn with_buffer(path: &Path, buf: usize) -> Result<Self> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(RecordReader { path: path.to_path_buf(), r: BufReader::with_capacity(buf, f) })
    }

    /// The next record; `Ok(None)` at the end; a file whose size is not a multiple of `N` is
    /// reported as truncated.
    pub fn next_record(&mut self) -> Result<Option<[u8; N]>> {
        let mut rec = [0u8; N];
        let mut got = 0;
        while got < N {
            match self.r.read(&mut rec[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(DataError::file(&self.path, format!("truncated: a record of {N} bytes ends after {got}"))),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DataError::io(&self.path, e)),
            }
        }
        Ok(Some(rec))
    }
}

/// All records of `inputs`, sorted. At most `budget` bytes of records are held in memory; beyond
/// that, sorted runs are written to `spill_dir` (created if needed) and merged.
pub fn sorted<const N: usize>(inputs: &[PathBuf], spill_dir: &Path, budget: usize) -> Result<Sorted<N>> {
    let chunk = (budget / N).max(1024);
    let mut buf: Vec<[u8; N]> = Vec::new();
    let mut runs: Vec<PathBuf> = Vec::new();
    let spill = |buf: &mut Vec<[u8; N]>, runs: &mut Vec<PathBuf>| -> Result<()> {
        std::fs::create_dir_all(spill_dir).map_err(|e| DataError::io(spill_dir, e))?;
        buf.sort_unstable();
        let p = spill_dir.join(format!("run-{:05}-{}", runs.len(), std::process::id()));
        let mut w = RecordWriter::<N>::create(&p)?;
        for r in buf.iter() {
            w.push(r)?;
        }
        w.finish()?;
        buf.clear();
        runs.push(p);
        Ok(())
    };
    for p in inputs {
        let mut r = RecordReader::<N>::open(p)?;
        while let Some(rec) = r.next_record()? {
            if buf.len() == chunk {
                spill(&mut buf, &mut runs)?;
            }
            buf.push(rec);
        }
    }
    if runs.is_empty() {
        buf.sort_unstable();
        return Ok(Sorted { inner: SortedInner::Memory(buf.into_iter()), runs });
    }
    if !buf.is_empty() {
        spill(&mut buf, &mut runs)?;
    }
    drop(buf);
    let per_run = (budget / runs.len().max(1)).clamp(4 << 10, IO_BUF);
    let mut readers = Vec::with_capacity(runs.len());
    let mut heap = BinaryHeap::new();
    for (i, p) in runs.iter().enumerate() {
        let mut r = RecordReader::<N>::with_buffer(p, per_run)?;
        if let Some(rec) = r.next_record()? {
            heap.push(Reverse((rec, i)));
        }
        readers.push(r);
    }
    Ok(Sorted { inner: SortedInner::Merge { readers, heap }, runs })
}

/// The records of [`sorted`], in order; removes its spill runs when dropped.
#[derive(Debug)]
pub struct Sorted<const N: usize> {
    inner: SortedInner<N>,
    runs: Vec<PathBuf>,
}

#[derive(Debug)]
enum SortedInner<const N: usize> {
    Memory(std::vec::IntoIter<[u8; N]>),
    Merge { readers: Vec<RecordReader<N>>, heap: BinaryHeap<Reverse<([u8; N], usize)>> },
}

impl<const N: usize> Sorted<N> {
    /// Whether the records did not fit the budget and were merged from runs on disk.
    pub fn spilled(&self) -> usize {
        self.runs.len()
    }

    pub fn next_record(&mut self) -> Result<Option<[u8; N]>> {
        match &mut self.inner {
            SortedInner::Memory(it) => Ok(it.next()),
            SortedInner::Merge { readers, heap } => {
                let Some(Reverse((rec, i))) = heap.pop() else { return Ok(None) };
                if let Some(next) = readers[i].next_record()? {
                    heap.push(Reverse((next, i)));
                }
                Ok(Some(rec))
            }
        }
    }
}

impl<const N: usize> Drop for Sorted<N> {
    fn drop(&mut self) {
        for r in &self.runs {
            let _ = std::fs::remove_file(r);
        }
    }
}

/// Big-endian fields into a record.
pub fn rec4(a: u64, b: u64, c: u64, d: u64) -> [u8; 32] {
    let mut r = [0u8; 32];
    r[..8].copy_from_slice(&a.to_be_bytes());
    r[8..16].copy_from_slice(&b.to_be_bytes());
    r[16..24].copy_from_slice(&c.to_be_bytes());
    r[24..].copy_from_slice(&d.to_be_bytes());
    r
}

/// The fields of [`rec4`].
pub fn fields4(r: &[u8; 32]) -> [u64; 4] {
    // Each slice is exactly 8 bytes.
    let f = |i: usize| u64::from_be_bytes(r[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    [f(0), f(1), f(2), f(3)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_in_memory_and_through_spilled_runs_alike() {
        let d = std::env::temp_dir().join(format!("liandan-extsort-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let mut want = Vec::new();
        let mut files = Vec::new();
        for f in 0..3u64 {
            let p = d.join(format!("in-{f}"));
            let mut w = RecordWriter::<32>::create(&p).unwrap();
            for i in 0..5000u64 {
                let k = (i * 7919 + f * 104_729) % 20_011;
                let r = rec4(k, f, i, 0);
                w.push(&r).unwrap();
                want.push(r);
            }
            w.finish().unwrap();
            files.push(p);
        }
        want.sort();
        for budget in [64 << 20, 1024 * 32] {
            let mut s = sorted::<32>(&files, &d.join("spill"), budget).unwrap();
            let spilled = s.spilled();
            let mut got = Vec::new();
            while let Some(r) = s.next_record().unwrap() {
                got.push(r);
            }
            assert_eq!(got, want, "budget {budget}");
            assert_eq!(spilled > 0, budget < 64 << 20, "small budgets spill");
            drop(s);
            let left = std::fs::read_dir(d.join("spill")).map(|r| r.count()).unwrap_or(0);
            assert_eq!(left, 0, "runs removed");
        }
        // A torn file is named.
        std::fs::write(d.join("torn"), [0u8; 40]).unwrap();
        let e = sorted::<32>(&[d.join("torn")], &d, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("torn") && e.contains("truncated"), "{e}");
        assert_eq!(fields4(&rec4(1, 2, 3, u64::MAX)), [1, 2, 3, u64::MAX]);
    }
}
