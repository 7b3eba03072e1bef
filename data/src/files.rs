//! Opening files that someone else named: only regular files, opened without blocking (a FIFO
//! named as data would otherwise hang the reader until someone writes to it), sizes bounded
//! before anything is read, lines read one at a time with a bounded length.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{DataError, Result};

/// The longest line a JSONL file may have (an example of 16 MiB is far past any context).
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Opens `path` for reading if it is a regular file of at most `max_bytes`.
///
/// # Errors
/// [`DataError::File`] for a FIFO, a device, a socket, a directory or a file over the bound;
/// [`DataError::Io`] when it cannot be opened.
pub fn open_regular(path: &Path, max_bytes: u64) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    let kind = meta.file_type();
    let what = if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(DataError::file(path, format!("is {what}, not a regular file")));
    }
    // O_NONBLOCK: were the path swapped for a FIFO since the check, opening it still returns.
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| DataError::io(path, e))?;
    let meta = f.metadata().map_err(|e| DataError::io(path, e))?;
    if !meta.is_file() {
        return Err(DataError::file(path, "is not a regular file"));
    }
    if meta.len() > max_bytes {
        return Err(DataError::file(path, format!("is {} bytes; at most {max_bytes} are read", meta.len())));
    }
    Ok(f)
}

/// The whole of a regular file of at most `max_bytes`.
pub fn read_bounded(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let f = open_regular(path, max_bytes)?;
    let mut out = Vec::new();
    f.take(max_bytes + 1).read_to_end(&mut out).map_err(|e| DataError::io(path, e))?;
    if out.len() as u64 > max_bytes {
        return Err(DataError::file(path, format!("grew past {max_bytes} bytes while being read")));
    }
    Ok(out)
}

/// Calls `f(line_number, line)` for each line (1-based, without the newline) of a regular file
/// of at most `max_bytes`, holding one line at a time.
///
/// # Errors
/// A line over [`MAX_LINE_BYTES`] or not UTF-8, named by file and line; `f`'s errors.
pub fn for_each_line(path: &Path, max_bytes: u64, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let file = open_regular(path, max_bytes)?;
    let mut r = BufReader::with_capacity(1 << 16, file.take(max_bytes));
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        n += 1;
        let got = (&mut r).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| DataError::io(path, e))?;
        if got == 0 {
            return Ok(());
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(DataError::line(path, n, format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let line = std::str::from_utf8(&buf).map_err(|e| DataError::line(path, n, format!("not UTF-8: {e}")))?;
        f(n, line)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn fifos_devices_and_large_files_are_refused_before_reading() {
        let d = dir();
        let fifo = d.join("fifo.jsonl");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("fifo.jsonl: is a FIFO, not a regular file"), "{e}");
        let e = open_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("/dev/zero: is a device"), "{e}");
        let big = d.join("big.txt");
        std::fs::write(&big, vec![b'x'; 100]).unwrap();
        let e = read_bounded(&big, 99).unwrap_err().to_string();
        assert!(e.contains("is 100 bytes; at most 99"), "{e}");
        assert_eq!(read_bounded(&big, 100).unwrap().len(), 100);
    }

    #[test]
    fn lines_one_at_a_time_with_numbers() {
        let p = dir().join("lines.jsonl");
        std::fs::write(&p, "a\r\n\nb\nc").unwrap();
        let mut seen = Vec::new();
        for_each_line(&p, 1 << 20, |n, l| {
            seen.push((n, l.to_string()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(1, "a".to_string()), (2, String::new()), (3, "b".into()), (4, "c".into())]);
        std::fs::write(&p, b"ok\n\xff\n").unwrap();
        let e = for_each_line(&p, 1 << 20, |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("lines.jsonl:2: not UTF-8"), "{e}");
    }
}
