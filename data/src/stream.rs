//! Streaming ingest: documents of a file (or of a byte range of a large line-oriented file) one
//! at a time, never holding more than one document, with every over-long line or document cut or
//! dropped and counted.
//!
//! | format | limit | what happens past it |
//! |---|---|---|
//! | text, JSONL | `max_line_bytes` per line | text: the line is cut (at a character boundary); JSONL: the line is dropped (a cut JSON object does not parse) |
//! | text | `max_doc_bytes` per block | the rest of the block is dropped |
//! | HTML | `4 × max_doc_bytes` of markup | the rest of the page is dropped |
//! | chinese-poetry JSON | `max_json_bytes` per file | the file is skipped (it is parsed whole) |
//!
//! Files that cannot be opened, or fail while being read (a truncated gzip), are skipped and
//! counted with their name; the documents read before a read error are kept.
//!
//! Large uncompressed `.txt` and `.jsonl` files are split into [`Chunk`]s at document boundaries
//! (a blank line, a newline) found near every `task_bytes`, so several workers can read one
//! file; a document belongs to the chunk in which it starts.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::html::html_to_text;
use crate::ingest::{DocKind, Format, IngestOptions, IngestStats, RawDoc, format_of};

/// Caps on what one document may hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_line_bytes: usize,
    pub max_doc_bytes: usize,
    pub max_json_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_line_bytes: 1 << 20, max_doc_bytes: 4 << 20, max_json_bytes: 64 << 20 }
    }
}

/// A byte range `[start, end)` of one input file (`end = None`: to the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub path: PathBuf,
    pub start: u64,
    pub end: Option<u64>,
    /// Bytes on disk (for planning and progress).
    pub bytes: u64,
}

/// Splits files into tasks of about `task_bytes`: small files are packed together in order,
/// large uncompressed text and JSONL files are cut at document boundaries. The result depends
/// only on the files and `task_bytes`.
pub fn plan_chunks(files: &[PathBuf], task_bytes: u64) -> Result<Vec<Vec<Chunk>>> {
    let mut tasks = Vec::new();
    let mut cur: Vec<Chunk> = Vec::new();
    let mut cur_bytes = 0u64;
    for path in files {
        let size = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
        let gz = path.extension().is_some_and(|e| e == "gz");
        let splittable = !gz && matches!(format_of(path), Format::Text | Format::Jsonl);
        if splittable && size > task_bytes {
            if !cur.is_empty() {
                tasks.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            let boundary: &[&[u8]] = if format_of(path) == Format::Jsonl { &[b"\n"] } else { &[b"\n\n", b"\n\r\n"] };
            let mut start = 0u64;
            while start < size {
                let end = if size - start <= task_bytes { size } else { next_boundary(path, start + task_bytes, boundary)?.unwrap_or(size) };
                tasks.push(vec![Chunk { path: path.clone(), start, end: Some(end), bytes: end - start }]);
                start = end;
            }
            continue;
        }
        cur.push(Chunk { path: path.clone(), start: 0, end: None, bytes: size });
        cur_bytes += size;
        if cur_bytes >= task_bytes {
            tasks.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
    }
    if !cur.is_empty() {
        tasks.push(cur);
    }
    Ok(tasks)
}

/// The offset just after the first of `patterns` at or after `from`.
fn next_boundary(path: &Path, from: u64, patterns: &[&[u8]]) -> Result<Option<u64>> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    f.seek(SeekFrom::Start(from)).map_err(|e| DataError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 16, f);
    let mut window: Vec<u8> = Vec::new();
    let mut pos = from;
    loop {
        let buf = r.fill_buf().map_err(|e| DataError::io(path, e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        let keep = window.len();
        window.extend_from_slice(buf);
        let n = buf.len();
        r.consume(n);
        let best = patterns.iter().filter_map(|p| window.windows(p.len()).position(|w| w == *p).map(|i| i + p.len())).min();
        if let Some(i) = best {
            return Ok(Some(pos - keep as u64 + i as u64));
        }
        pos += n as u64;
        // Keep the last two bytes: a pattern may straddle two reads.
        let cut = window.len().saturating_sub(2);
        window.drain(..cut);
    }
}

/// A line reader that never holds more than `max` bytes of one line.
struct Lines<R> {
    r: R,
    max: usize,
    pos: u64,
}

/// One line: its bytes (without `\n` and a trailing `\r`) and whether it was cut.
struct Line {
    bytes: Vec<u8>,
    cut: bool,
}

impl<R: BufRead> Lines<R> {
    fn next_line(&mut self, into: &mut Line) -> std::io::Result<bool> {
        into.bytes.clear();
        into.cut = false;
        let mut any = false;
        loop {
            let buf = self.r.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let body = if done { &buf[..take - 1] } else { &buf[..take] };
            let room = self.max.saturating_sub(into.bytes.len());
            if body.len() > room {
                into.cut = true;
            }
            into.bytes.extend_from_slice(&body[..body.len().min(room)]);
            self.r.consume(take);
            self.pos += take as u64;
            if done {
                break;
            }
        }
        if into.bytes.last() == Some(&b'\r') {
            into.bytes.pop();
        }
        if into.cut {
            // Do not end inside a UTF-8 sequence.
            while into.bytes.last().is_some_and(|b| b & 0xC0 == 0x80) {
                into.bytes.pop();
            }
            if into.bytes.last().is_some_and(|b| *b >= 0xC0) {
                into.bytes.pop();
            }
        }
        Ok(any)
    }
}

/// Text of `bytes`, invalid UTF-8 replaced and counted.
fn utf8(bytes: &[u8], stats: &mut IngestStats) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let s = String::from_utf8_lossy(bytes).into_owned();
            stats.invalid_utf8 += s.matches('\u{FFFD}').count() as u64;
            s
        }
    }
}

/// Reads one chunk, calling `emit` for each document in order.
///
/// # Errors
/// Malformed content under `opts.strict`, or a `.json` file that is not a chinese-poetry
/// collection (named with file and line); an error returned by `emit`. Unreadable files are
/// counted in the stats, not errors.
pub fn read_chunk(chunk: &Chunk, opts: &IngestOptions, limits: &Limits, emit: &mut dyn FnMut(RawDoc) -> Result<()>) -> Result<IngestStats> {
    let path = &chunk.path;
    let mut stats = IngestStats { files: u64::from(chunk.start == 0), ..Default::default() };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            stats.skip_file(format!("{}: {e} (skipped)", path.display()));
            return Ok(stats);
        }
    };
    let gz = path.extension().is_some_and(|e| e == "gz");
    let mut raw: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        let mut f = file;
        if chunk.start > 0 {
            f.seek(SeekFrom::Start(chunk.start)).map_err(|e| DataError::io(path, e))?;
        }
        Box::new(f)
    };
    if let Some(end) = chunk.end {
        raw = Box::new(raw.take(end - chunk.start));
    }
    let source = path.display().to_string();
    let result = match format_of(path) {
        Format::Text => read_text(path, raw, limits, &mut stats, emit),
        Format::Jsonl => read_jsonl(chunk, raw, opts, limits, &mut stats, emit),
        Format::Html => {
            let cap = 4 * limits.max_doc_bytes as u64;
            let mut bytes = Vec::new();
            let r = raw.take(cap + 1).read_to_end(&mut bytes).map(|_| ());
            if bytes.len() as u64 > cap {
                bytes.truncate(cap as usize);
                stats.cut_documents += 1;
            }
            stats.bytes += bytes.len() as u64;
            let text = html_to_text(&utf8(&bytes, &mut stats));
            let group = path.parent().map_or(String::new(), |p| p.display().to_string());
            if !text.is_empty() {
                stats.documents += 1;
                emit(RawDoc { kind: DocKind::Html, source: source.clone(), group, text })?;
            }
            r.map_err(|e| DataError::io(path, e))
        }
        Format::PoetryJson => {
            let mut bytes = Vec::new();
            let r = raw.take(limits.max_json_bytes + 1).read_to_end(&mut bytes);
            if let Err(e) = r {
                stats.skip_file(format!("{}: {e} (skipped)", path.display()));
                return Ok(stats);
            }
            if bytes.len() as u64 > limits.max_json_bytes {
                stats.skip_file(format!("{}: larger than max_json_bytes = {} (skipped: JSON collections are parsed whole)", path.display(), limits.max_json_bytes));
                return Ok(stats);
            }
            stats.bytes += bytes.len() as u64;
            let text = utf8(&bytes, &mut stats);
            drop(bytes);
            let docs = crate::ingest::read_poetry(path, &text, &mut stats)?;
            for d in docs {
                stats.documents += 1;
                emit(d)?;
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => Ok(stats),
        // A read error (a truncated gzip, a vanished file) ends the file: what came before stays.
        Err(DataError::Io { path: p, source }) if p == *path => {
            stats.skip_file(format!("{}: {source} (the rest of the file skipped)", p.display()));
            Ok(stats)
        }
        Err(e) => Err(e),
    }
}

fn read_text(path: &Path, raw: Box<dyn Read>, limits: &Limits, stats: &mut IngestStats, emit: &mut dyn FnMut(RawDoc) -> Result<()>) -> Result<()> {
    let mut lines = Lines { r: BufReader::with_capacity(1 << 16, raw), max: limits.max_line_bytes, pos: 0 };
    let mut line = Line { bytes: Vec::new(), cut: false };
    let mut cur = String::new();
    let mut doc_cut = false;
    let group = path.display().to_string();
    let mut index = 0usize;
    let mut flush = |cur: &mut String, doc_cut: &mut bool, stats: &mut IngestStats| -> Result<()> {
        if !cur.is_empty() {
            stats.documents += 1;
            if *doc_cut {
                stats.cut_documents += 1;
            }
            let text = std::mem::take(cur);
            emit(RawDoc { kind: DocKind::Text, source: format!("{group}#{index}"), group: group.clone(), text })?;
            index += 1;
        }
        *doc_cut = false;
        Ok(())
    };
    while lines.next_line(&mut line).map_err(|e| DataError::io(path, e))? {
        stats.bytes += line.bytes.len() as u64 + 1;
        if line.cut {
            stats.cut_lines += 1;
        }
        let s = utf8(&line.bytes, stats);
        if s.trim().is_empty() {
            flush(&mut cur, &mut doc_cut, stats)?;
            continue;
        }
        if cur.len() + s.len() + 1 > limits.max_doc_bytes {
            doc_cut = true;
            continue;
        }
        if !cur.is_empty() {
            cur.push('\n');
        }
        cur.push_str(&s);
    }
    flush(&mut cur, &mut doc_cut, stats)
}

fn read_jsonl(chunk: &Chunk, raw: Box<dyn Read>, opts: &IngestOptions, limits: &Limits, stats: &mut IngestStats, emit: &mut dyn FnMut(RawDoc) -> Result<()>) -> Result<()> {
    let path = &chunk.path;
    let source = path.display().to_string();
    let mut lines = Lines { r: BufReader::with_capacity(1 << 16, raw), max: limits.max_line_bytes, pos: chunk.start };
    let mut line = Line { bytes: Vec::new(), cut: false };
    // Line numbers of a chunk that starts inside the file are counted only when one is needed.
    let mut base: Option<usize> = (chunk.start == 0).then_some(0);
    let mut n_in_chunk = 0usize;
    while lines.next_line(&mut line).map_err(|e| DataError::io(path, e))? {
        n_in_chunk += 1;
        stats.bytes += line.bytes.len() as u64 + 1;
        let mut number = || -> Result<usize> {
            if base.is_none() {
                base = Some(count_lines(path, chunk.start)?);
            }
            Ok(base.unwrap_or(0) + n_in_chunk)
        };
        if line.cut {
            stats.cut_lines += 1;
            let err = DataError::line(path, number()?, format!("line longer than max_line_bytes = {} (dropped)", limits.max_line_bytes));
            if opts.strict {
                return Err(err);
            }
            stats.warn(err.to_string());
            continue;
        }
        if line.bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = utf8(&line.bytes, stats);
        let value: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let err = DataError::line(path, number()?, format!("not valid JSON: {e}"));
                if opts.strict {
                    return Err(err);
                }
                stats.warn(err.to_string());
                continue;
            }
        };
        match value.get(&opts.text_field).and_then(|v| v.as_str()) {
            Some(t) => {
                stats.documents += 1;
                let n = number()?;
                emit(RawDoc { kind: DocKind::Jsonl, source: format!("{source}:{n}"), group: source.clone(), text: t.to_string() })?;
            }
            None => {
                let reason = match value.get(&opts.text_field) {
                    None => format!("field '{}' is missing", opts.text_field),
                    Some(_) => format!("field '{}' is not a string", opts.text_field),
                };
                let err = DataError::line(path, number()?, reason);
                if opts.strict {
                    return Err(err);
                }
                stats.warn(err.to_string());
            }
        }
    }
    Ok(())
}

/// Newlines in the first `upto` bytes of `path`.
fn count_lines(path: &Path, upto: u64) -> Result<usize> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 16, f.take(upto));
    let mut n = 0;
    loop {
        let buf = r.fill_buf().map_err(|e| DataError::io(path, e))?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|&&b| b == b'\n').count();
        let len = buf.len();
        r.consume(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::read_file;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-stream-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn docs_of(chunks: &[Vec<Chunk>], limits: &Limits) -> (Vec<String>, IngestStats) {
        let mut out = Vec::new();
        let mut stats = IngestStats::default();
        for t in chunks {
            for c in t {
                let s = read_chunk(c, &IngestOptions::default(), limits, &mut |d| {
                    out.push(d.text);
                    Ok(())
                })
                .unwrap();
                stats.merge(s);
            }
        }
        (out, stats)
    }

    #[test]
    fn chunks_of_a_large_file_read_the_same_documents_as_the_whole_file() {
        let d = dir("chunks");
        let mut text = String::new();
        let mut jsonl = String::new();
        for i in 0..500 {
            text.push_str(&format!("第{i}段的第一行\n第{i}段的第二行，长一些。\r\n\n"));
            if i % 7 == 0 {
                text.push_str("\n\n");
            }
            jsonl.push_str(&serde_json::json!({"text": format!("文档{i}")}).to_string());
            jsonl.push('\n');
        }
        std::fs::write(d.join("a.txt"), &text).unwrap();
        std::fs::write(d.join("b.jsonl"), &jsonl).unwrap();
        let files = vec![d.join("a.txt"), d.join("b.jsonl")];
        let whole: Vec<String> = files.iter().flat_map(|f| read_file(f, &IngestOptions::default()).unwrap().0).map(|d| d.text).collect();
        for task_bytes in [97, 1000, 1 << 20] {
            let plan = plan_chunks(&files, task_bytes).unwrap();
            if task_bytes < 1000 {
                assert!(plan.len() > 20, "{}", plan.len());
            }
            let (got, stats) = docs_of(&plan, &Limits::default());
            assert_eq!(got, whole, "task_bytes {task_bytes}");
            assert_eq!(stats.files, 2);
        }
    }

    #[test]
    fn over_long_lines_and_documents_are_cut_or_dropped_and_counted() {
        let d = dir("long");
        let long = "长".repeat(1000);
        std::fs::write(d.join("a.txt"), format!("短行\n{long}\n\n{long}\n{long}\n{long}\n")).unwrap();
        std::fs::write(d.join("b.jsonl"), format!("{{\"text\": \"{long}\"}}\n{{\"text\": \"ok\"}}\n")).unwrap();
        let limits = Limits { max_line_bytes: 100, max_doc_bytes: 250, max_json_bytes: 10 };
        let plan = plan_chunks(&[d.join("a.txt"), d.join("b.jsonl")], 1 << 20).unwrap();
        let (got, stats) = docs_of(&plan, &limits);
        // Cut at a character boundary: 33 characters of 3 bytes fit in 100 bytes.
        assert_eq!(got[0], format!("短行\n{}", "长".repeat(33)));
        assert_eq!(got[1], format!("{}\n{}", "长".repeat(33), "长".repeat(33)), "the third line would pass 250 bytes");
        assert_eq!(got[2], "ok");
        assert_eq!((stats.cut_lines, stats.cut_documents, stats.malformed_lines), (5, 1, 1));
        assert!(stats.warnings[0].contains("b.jsonl:1: line longer than max_line_bytes"), "{:?}", stats.warnings);
    }

    #[test]
    fn unreadable_and_truncated_files_are_skipped_and_named() {
        let d = dir("bad");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..2000 {
            std::io::Write::write_all(&mut gz, format!("{{\"text\": \"第{i}行\"}}\n").as_bytes()).unwrap();
        }
        let bytes = gz.finish().unwrap();
        std::fs::write(d.join("t.jsonl.gz"), &bytes[..bytes.len() / 2]).unwrap();
        let chunk = Chunk { path: d.join("t.jsonl.gz"), start: 0, end: None, bytes: 0 };
        let mut n = 0;
        let stats = read_chunk(&chunk, &IngestOptions::default(), &Limits::default(), &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert!(n > 0 && n < 2000, "{n} documents before the cut");
        assert_eq!(stats.skipped_files, 1);
        assert!(stats.warnings[0].contains("t.jsonl.gz"), "{:?}", stats.warnings);
        let gone = Chunk { path: d.join("gone.txt"), start: 0, end: None, bytes: 0 };
        let stats = read_chunk(&gone, &IngestOptions::default(), &Limits::default(), &mut |_| Ok(())).unwrap();
        assert_eq!(stats.skipped_files, 1);
        assert!(stats.warnings[0].contains("gone.txt"), "{:?}", stats.warnings);
    }
}
