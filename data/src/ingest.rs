//! Reading raw documents: files, directories (recursively, in sorted order) and globs; plain
//! text, JSONL, HTML and the chinese-poetry JSON collections; `.gz` for any of them.
//!
//! | format | recognised by | a document is |
//! |---|---|---|
//! | text | `.txt`, `.md`, anything else | a block of lines between blank lines |
//! | JSONL | `.jsonl`, `.ndjson` | one line's `text_field` (default `text`) |
//! | HTML | `.html`, `.htm` | the page's article text ([`crate::html`]) |
//! | chinese-poetry | `.json` holding an array of objects | one poem/chapter: title, author, body lines |
//!
//! Invalid UTF-8 is replaced by U+FFFD and counted per file. A malformed JSONL line (bad JSON,
//! missing or non-string field) is reported as `file:line` and skipped, or fails the run when
//! `strict` is set.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{DataError, Result};
use crate::html::html_to_text;

/// How to read inputs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestOptions {
    /// JSONL field holding the text.
    pub text_field: String,
    /// Fail on the first malformed line instead of skipping it.
    pub strict: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions { text_field: "text".into(), strict: false }
    }
}

/// The format a document was read from: some cleaning rules apply to web pages only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    Text,
    Jsonl,
    Html,
    Poetry,
}

/// One raw document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RawDoc {
    pub kind: DocKind,
    /// Where it came from: `path` or `path:line` or `path#index`.
    pub source: String,
    /// The "site" the document belongs to, for cross-document boilerplate: the directory of an
    /// HTML page, otherwise the file.
    pub group: String,
    pub text: String,
}

/// Counters of one ingest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IngestStats {
    pub files: u64,
    pub documents: u64,
    pub bytes: u64,
    /// Invalid UTF-8 sequences replaced by U+FFFD.
    pub invalid_utf8: u64,
    /// JSONL lines skipped (bad JSON, missing field), and chinese-poetry entries without text.
    pub malformed_lines: u64,
    /// Lines longer than the limit: cut (text) or dropped (JSONL, also counted as malformed).
    pub cut_lines: u64,
    /// Documents longer than the limit, cut.
    pub cut_documents: u64,
    /// Files skipped whole or in part: unreadable, failing while read (truncated gzip), too
    /// large to parse, not regular files (FIFOs, devices) found in a directory or glob.
    pub skipped_files: u64,
    /// The first few malformed-line and skipped-file messages (`file:line: reason`), for the report.
    pub warnings: Vec<String>,
}

impl IngestStats {
    pub fn merge(&mut self, o: IngestStats) {
        self.files += o.files;
        self.documents += o.documents;
        self.bytes += o.bytes;
        self.invalid_utf8 += o.invalid_utf8;
        self.malformed_lines += o.malformed_lines;
        self.cut_lines += o.cut_lines;
        self.cut_documents += o.cut_documents;
        self.skipped_files += o.skipped_files;
        for w in o.warnings {
            if self.warnings.len() < MAX_WARNINGS {
                self.warnings.push(w);
            }
        }
    }

    pub(crate) fn warn(&mut self, w: String) {
        self.malformed_lines += 1;
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        }
    }

    pub(crate) fn skip_file(&mut self, w: String) {
        self.skipped_files += 1;
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        }
    }
}

const MAX_WARNINGS: usize = 20;

/// Expands inputs (files, directories, glob patterns) into a sorted, de-duplicated file list.
///
/// # Errors
/// An input that does not exist and matches nothing; a bad glob; no files at all.
pub fn expand_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        return Err(DataError::Input { what: "inputs".into(), reason: "none given".into() });
    }
    let mut files = Vec::new();
    for input in inputs {
        let p = Path::new(input);
        if p.is_dir() {
            let before = files.len();
            walk(p, &mut files)?;
            if files.len() == before {
                return Err(DataError::Input { what: input.clone(), reason: "directory has no readable files".into() });
            }
        } else if p.is_file() {
            files.push(p.to_path_buf());
        } else if let Some(kind) = special_file(p) {
            return Err(DataError::Input { what: input.clone(), reason: format!("is a {kind}, not a regular file") });
        } else if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input).map_err(|e| DataError::Input { what: input.clone(), reason: format!("bad glob: {e}") })?;
            let before = files.len();
            for entry in paths {
                let path = entry.map_err(|e| DataError::io(e.path().to_path_buf(), std::io::Error::other(e.to_string())))?;
                if path.is_file() {
                    files.push(path);
                } else if path.is_dir() {
                    walk(&path, &mut files)?;
                }
            }
            if files.len() == before {
                return Err(DataError::Input { what: input.clone(), reason: "glob matches no files".into() });
            }
        } else {
            return Err(DataError::Input { what: input.clone(), reason: "no such file or directory".into() });
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() && !is_metadata_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// What a path that exists but is neither a file nor a directory is (FIFO, device, socket).
fn special_file(p: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(p).ok()?.file_type();
    Some(if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "device file"
    } else if t.is_socket() {
        "socket"
    } else {
        return None;
    })
}

/// Files that sit beside data but are not data (licences, expectations for tests).
fn is_metadata_file(p: &Path) -> bool {
    let name = p.file_name().map(|n| n.to_string_lossy().to_uppercase()).unwrap_or_default();
    name.starts_with("LICENSE") || name.starts_with("DATA_LICENSES") || name.starts_with("README") || name == "EXPECTED.MD"
}

/// The format of a file, from its name (after stripping `.gz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
    Html,
    PoetryJson,
}

pub fn format_of(path: &Path) -> Format {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Format::Jsonl
    } else if name.ends_with(".html") || name.ends_with(".htm") {
        Format::Html
    } else if name.ends_with(".json") {
        Format::PoetryJson
    } else {
        Format::Text
    }
}

/// Reads one file into documents.
///
/// # Errors
/// I/O errors; malformed content when `opts.strict` (or a `.json` file that is not a
/// chinese-poetry collection), naming the file and line.
pub fn read_file(path: &Path, opts: &IngestOptions) -> Result<(Vec<RawDoc>, IngestStats)> {
    let mut bytes = Vec::new();
    let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::MultiGzDecoder::new(f).read_to_end(&mut bytes).map_err(|e| DataError::io(path, e))?;
    } else {
        std::io::BufReader::new(f).read_to_end(&mut bytes).map_err(|e| DataError::io(path, e))?;
    }
    let mut stats = IngestStats { files: 1, bytes: bytes.len() as u64, ..Default::default() };
    let text = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
            stats.invalid_utf8 += lossy.matches('\u{FFFD}').count() as u64;
            lossy
        }
    };
    let source = path.display().to_string();
    let docs = match format_of(path) {
        Format::Text => {
            split_blocks(&text).into_iter().enumerate().map(|(i, t)| RawDoc { kind: DocKind::Text, source: format!("{source}#{i}"), group: source.clone(), text: t }).collect()
        }
        Format::Html => {
            let group = path.parent().map_or(String::new(), |p| p.display().to_string());
            let t = html_to_text(&text);
            if t.is_empty() { vec![] } else { vec![RawDoc { kind: DocKind::Html, source: source.clone(), group, text: t }] }
        }
        Format::Jsonl => read_jsonl(path, &text, opts, &mut stats)?,
        Format::PoetryJson => read_poetry(path, &text, &mut stats)?,
    };
    stats.documents = docs.len() as u64;
    Ok((docs, stats))
}

/// Splits plain text at blank lines into documents.
fn split_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            if !cur.is_empty() {
                cur.push('\n');
            }
            cur.push_str(line);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn read_jsonl(path: &Path, text: &str, opts: &IngestOptions, stats: &mut IngestStats) -> Result<Vec<RawDoc>> {
    let source = path.display().to_string();
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                let err = DataError::line(path, n, format!("not valid JSON: {e}"));
                if opts.strict {
                    return Err(err);
                }
                stats.warn(err.to_string());
                continue;
            }
        };
        match value.get(&opts.text_field).and_then(|v| v.as_str()) {
            Some(t) => docs.push(RawDoc { kind: DocKind::Jsonl, source: format!("{source}:{n}"), group: source.clone(), text: t.to_string() }),
            None => {
                let reason = match value.get(&opts.text_field) {
                    None => format!("field '{}' is missing", opts.text_field),
                    Some(_) => format!("field '{}' is not a string", opts.text_field),
                };
                let err = DataError::line(path, n, reason);
                if opts.strict {
                    return Err(err);
                }
                stats.warn(err.to_string());
            }
        }
    }
    Ok(docs)
}

/// A chinese-poetry collection. Poems are objects with a body in `paragraphs`, `content` or `para`
/// (strings or lists of strings) and optional `title`/`rhythmic`/`chapter`/`section` and
/// `author`. They may sit in a top-level array (唐诗, 宋词), be the top-level object (蒙学
/// primers), or be nested in other objects' arrays (`content: [{chapter, paragraphs}]`).
pub(crate) fn read_poetry(path: &Path, text: &str, stats: &mut IngestStats) -> Result<Vec<RawDoc>> {
    let source = path.display().to_string();
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| DataError::file(path, format!("not valid JSON: {e} (JSON inputs must be chinese-poetry collections; use .jsonl for one document per line)")))?;
    let mut bodies = Vec::new();
    collect_poems(&value, &mut bodies);
    if bodies.is_empty() {
        stats.warn(format!("{source}: no poems (no objects with 'paragraphs' or 'content' text)"));
    }
    Ok(bodies.into_iter().enumerate().map(|(i, lines)| RawDoc { kind: DocKind::Poetry, source: format!("{source}#{i}"), group: source.clone(), text: lines.join("\n") }).collect())
}

/// Appends the lines (heading, author, body) of every poem found in `v`.
fn collect_poems(v: &serde_json::Value, out: &mut Vec<Vec<String>>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_poems(x, out)),
        serde_json::Value::Object(m) => {
            let body = ["paragraphs", "content", "para"].iter().find_map(|k| m.get(*k));
            match body {
                Some(b) if is_text(b) => {
                    let body = strings(b);
                    if body.iter().all(|l| l.trim().is_empty()) {
                        return;
                    }
                    let mut lines = Vec::new();
                    if let Some(t) = ["title", "rhythmic", "chapter", "section"].iter().find_map(|k| m.get(*k).and_then(|v| v.as_str())) {
                        lines.push(t.to_string());
                    }
                    if let Some(a) = m.get("author").and_then(|v| v.as_str()) {
                        lines.push(a.to_string());
                    }
                    lines.extend(body);
                    out.push(lines);
                }
                Some(b) => collect_poems(b, out),
                None => m.values().filter(|x| x.is_array() || x.is_object()).for_each(|x| collect_poems(x, out)),
            }
        }
        _ => {}
    }
}

/// A string, or (nested) arrays of strings only.
fn is_text(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(_) => true,
        serde_json::Value::Array(a) => !a.is_empty() && a.iter().all(is_text),
        _ => false,
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().flat_map(strings).collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-ingest-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn jsonl_reports_file_and_line_and_skips_or_fails() {
        let p = tmp("a.jsonl", b"{\"text\": \"one\"}\n{bad json\n{\"body\": \"x\"}\n{\"text\": \"two\"}\n");
        let (docs, stats) = read_file(&p, &IngestOptions::default()).unwrap();
        assert_eq!(docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(), ["one", "two"]);
        assert_eq!(stats.malformed_lines, 2);
        assert!(stats.warnings[0].contains("a.jsonl:2: not valid JSON"), "{:?}", stats.warnings);
        assert!(stats.warnings[1].contains("a.jsonl:3: field 'text' is missing"), "{:?}", stats.warnings);
        let err = read_file(&p, &IngestOptions { strict: true, ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("a.jsonl:2:"), "{err}");
        let (docs, _) = read_file(&p, &IngestOptions { text_field: "body".into(), strict: false }).unwrap();
        assert_eq!(docs[0].text, "x");
    }

    #[test]
    fn invalid_utf8_is_replaced_and_counted_and_gzip_is_read() {
        let p = tmp("b.txt", b"ok \xff\xfe line\n\nsecond doc");
        let (docs, stats) = read_file(&p, &IngestOptions::default()).unwrap();
        assert_eq!(stats.invalid_utf8, 2);
        assert_eq!(docs.len(), 2);
        assert!(docs[0].text.contains('\u{FFFD}'));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, "{\"text\": \"压缩\"}\n".as_bytes()).unwrap();
        let p = tmp("c.jsonl.gz", &gz.finish().unwrap());
        let (docs, _) = read_file(&p, &IngestOptions::default()).unwrap();
        assert_eq!(docs[0].text, "压缩");
    }

    #[test]
    fn poetry_collections_become_documents() {
        let p = tmp("poet.tang.0.json", r#"[{"author":"李白","paragraphs":["床前明月光，疑是地上霜。","举头望明月，低头思故乡。"],"title":"静夜思"},{"title":"空"}]"#.as_bytes());
        let (docs, _) = read_file(&p, &IngestOptions::default()).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].text, "静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。");
        // A primer as one object with nested chapters; 诗经's content list.
        let p = tmp("primer.json", r#"{"title":"蒙学","content":[{"chapter":"一","paragraphs":["天地玄黄"]},{"chapter":"二","paragraphs":["宇宙洪荒"]}]}"#.as_bytes());
        let (docs, _) = read_file(&p, &IngestOptions::default()).unwrap();
        assert_eq!(docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(), ["一\n天地玄黄", "二\n宇宙洪荒"]);
        let p = tmp("shijing.json", r#"[{"title":"关雎","chapter":"国风","content":["关关雎鸠，在河之洲。"]}]"#.as_bytes());
        assert_eq!(read_file(&p, &IngestOptions::default()).unwrap().0[0].text, "关雎\n关关雎鸠，在河之洲。");
        // A file with no poems is a warning, not an error.
        let p = tmp("rank.json", r#"[{"author":"x","baidu":1}]"#.as_bytes());
        let (docs, stats) = read_file(&p, &IngestOptions::default()).unwrap();
        assert!(docs.is_empty());
        assert_eq!(stats.malformed_lines, 1);
    }

    #[test]
    fn missing_inputs_and_empty_globs_are_named() {
        let e = expand_inputs(&["/nonexistent/x.txt".into()]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.txt") && e.contains("no such file"), "{e}");
        let e = expand_inputs(&["/nonexistent/*.jsonl".into()]).unwrap_err().to_string();
        assert!(e.contains("glob matches no files"), "{e}");
        let d = std::env::temp_dir().join(format!("liandan-empty-dir-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let e = expand_inputs(&[d.display().to_string()]).unwrap_err().to_string();
        assert!(e.contains("no readable files"), "{e}");
    }
}
