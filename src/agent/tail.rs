//! The last lines of a log file, read backwards from its end in chunks, so a large file costs
//! no more than the lines asked for (bounded in bytes too: one line of megabytes does not make a
//! reply too large for NATS).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const CHUNK: u64 = 16 << 10;

/// The last `lines` lines of `path` (without newlines), reading at most `max_bytes` from its
/// end; `truncated` is true when the byte bound cut earlier lines off. A missing file has no
/// lines.
pub fn tail(path: &Path, lines: usize, max_bytes: u64) -> std::io::Result<(Vec<String>, bool)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], false)),
        Err(e) => return Err(e),
    };
    if lines == 0 {
        return Ok((vec![], false));
    }
    let len = f.seek(SeekFrom::End(0))?;
    let mut start = len;
    let mut buf: Vec<u8> = vec![];
    // Enough newlines for `lines` complete lines: the one ending the last line does not count.
    loop {
        let newlines = memchr::memchr_iter(b'\n', &buf).count();
        let last_is_newline = buf.last() == Some(&b'\n');
        let complete = newlines.saturating_sub(usize::from(last_is_newline));
        if complete >= lines || start == 0 || len - start >= max_bytes {
            break;
        }
        let step = CHUNK.min(start).min(max_bytes - (len - start));
        start -= step;
        f.seek(SeekFrom::Start(start))?;
        let mut chunk = vec![0; step as usize];
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut all: Vec<&str> = text.split('\n').collect();
    if all.last() == Some(&"") {
        all.pop();
    }
    // The first piece is partial unless we read from the start of the file.
    let mut truncated = false;
    if start > 0 && !all.is_empty() {
        all.remove(0);
        truncated = all.len() < lines;
    }
    let skip = all.len().saturating_sub(lines);
    Ok((
        all[skip..].iter().map(|l| l.to_string()).collect(),
        truncated,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn last_lines_of_small_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        assert_eq!(tail(&p, 5, 1 << 20).unwrap(), (vec![], false));
        let mut f = std::fs::File::create(&p).unwrap();
        for i in 0..10_000 {
            writeln!(f, "line {i}").unwrap();
        }
        write!(f, "partial").unwrap();
        let (l, t) = tail(&p, 3, 1 << 20).unwrap();
        assert_eq!(l, vec!["line 9998", "line 9999", "partial"]);
        assert!(!t);
        let (l, _) = tail(&p, 20_000, 1 << 20).unwrap();
        assert_eq!(l.len(), 10_001);
        assert_eq!(l[0], "line 0");
        // Bounded in bytes: only whole lines come back, and the cut is reported.
        let (l, t) = tail(&p, 20_000, 100).unwrap();
        assert!(t);
        assert!(l.len() < 15 && l.last().unwrap() == "partial", "{l:?}");
        assert!(l.iter().all(|x| x.starts_with("line ") || x == "partial"));
        assert_eq!(tail(&p, 0, 100).unwrap(), (vec![], false));
    }
}
