//! The append primitive under inboxes, metrics, alerts and samples, and its reader.
//!
//! A record is one line: bytes ending in `\n`, with no other `\n`. Appending follows the rule
//! measured in linux-facts.md, because a single `O_APPEND` `write()` never interleaves with
//! another but still tears when its writer is killed, when the filesystem fills, or when a
//! non-shoal writer splits it:
//!
//! 1. take the file's `flock(2)` ([`Journal::lock`]);
//! 2. make sure the file ends in `\n`, truncating a torn tail back to the last `\n`;
//! 3. one `write()` of the whole record;
//! 4. check the length written, and `ftruncate` back to the old end on a short write or error;
//! 5. unlock (dropping the guard).
//!
//! Readers ([`read_lines`]) only ever return complete lines.
//!
//! A caller that keeps its own trustworthy record of the file's length (the inbox meta table)
//! passes it to [`Locked::append`] and skips step 2's two system calls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An append-only JSONL file.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

/// Why an append failed. In every case the file ends where it did before the attempt.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The filesystem is full (`ENOSPC`); nothing of the record was kept.
    #[error("{path}: no space left on device; the record was not written", path = .path.display())]
    NoSpace {
        /// The journal.
        path: PathBuf,
    },
    /// The record is not one line ending in `\n`.
    #[error("record is not a single newline-terminated line")]
    NotALine,
    /// Any other I/O error.
    #[error("{path}", path = .path.display())]
    Io {
        /// The journal.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the record's first byte.
    pub start: u64,
    /// Offset just past the record's `\n`: the file's new length.
    pub end: u64,
    /// Bytes of a torn tail removed before writing (0 normally).
    pub repaired: u64,
}

impl Journal {
    /// Open (or create, mode 0600) the journal at `path` for appending and reading.
    ///
    /// Refuses to follow a symlink (`O_NOFOLLOW`): in a shared directory a planted link could
    /// redirect appends into another file (linux-facts.md).
    ///
    /// # Errors
    /// The `open(2)` error (`ELOOP` for a symlink).
    pub fn open(path: &Path, create: bool) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Journal {
            file,
            path: path.to_owned(),
        })
    }

    /// The path this journal was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for reading, or for `fallocate`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Take the exclusive `flock(2)`; it is released when the guard drops.
    ///
    /// The lock is the same one shell scripts take with `flock -x`, and it is not inherited across
    /// `exec` (files are opened `O_CLOEXEC`).
    ///
    /// # Errors
    /// The `flock(2)` error.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        self.file.lock()?;
        Ok(Locked { journal: self })
    }

    /// Whether the file is empty.
    ///
    /// # Errors
    /// The `fstat(2)` error.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Current length of the file (one `fstat`).
    ///
    /// # Errors
    /// The `fstat(2)` error.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Lock, append one record, unlock. See [`Locked::append`].
    ///
    /// # Errors
    /// As [`Locked::append`].
    pub fn append(&self, record: &[u8]) -> Result<Appended, AppendError> {
        let mut g = self.lock().map_err(|source| AppendError::Io {
            path: self.path.clone(),
            source,
        })?;
        g.append(record, None)
    }
}

/// A journal whose `flock` this process holds.
#[derive(Debug)]
pub struct Locked<'a> {
    journal: &'a Journal,
}

impl Locked<'_> {
    /// Append `record` (one line, ending in `\n`).
    ///
    /// `trusted_len` is the file's length as the caller knows it for certain (every writer keeps
    /// it up to date under this lock). With it, the tail check is skipped; without it, the length
    /// is read from the file and a torn tail is repaired first.
    ///
    /// # Errors
    /// [`AppendError::NoSpace`] on a full filesystem; [`AppendError::NotALine`] for a record with
    /// an inner newline or none at the end; [`AppendError::Io`] otherwise. On error the file is
    /// truncated back to where it ended before the call.
    pub fn append(
        &mut self,
        record: &[u8],
        trusted_len: Option<u64>,
    ) -> Result<Appended, AppendError> {
        if record.last() != Some(&b'\n')
            || memchr::memchr(b'\n', &record[..record.len() - 1]).is_some()
        {
            return Err(AppendError::NotALine);
        }
        self.write_lines(record, trusted_len)
    }

    /// Append several records at once (complete lines, each ending in `\n`), in one `write()`:
    /// all of them or, on error, none (the file is truncated back). For writers that buffer
    /// records and flush them in batches (metrics).
    ///
    /// # Errors
    /// As [`Locked::append`]; [`AppendError::NotALine`] if `records` is empty, does not end in
    /// `\n`, or holds an empty line.
    pub fn append_lines(
        &mut self,
        records: &[u8],
        trusted_len: Option<u64>,
    ) -> Result<Appended, AppendError> {
        if records.last() != Some(&b'\n')
            || records[0] == b'\n'
            || memchr::memmem::find(records, b"\n\n").is_some()
        {
            return Err(AppendError::NotALine);
        }
        self.write_lines(records, trusted_len)
    }

    fn write_lines(
        &mut self,
        record: &[u8],
        trusted_len: Option<u64>,
    ) -> Result<Appended, AppendError> {
        let io_err = |source| AppendError::Io {
            path: self.journal.path.clone(),
            source,
        };
        let (start, repaired) = match trusted_len {
            Some(len) => (len, 0),
            None => {
                let len = self.journal.len().map_err(io_err)?;
                let fixed = repair_tail(&self.journal.file, len).map_err(io_err)?;
                (fixed, len - fixed)
            }
        };
        match write_once(&self.journal.file, record) {
            Ok(n) if n == record.len() => Ok(Appended {
                start,
                end: start + n as u64,
                repaired,
            }),
            Ok(_) => {
                // A short write: ENOSPC after part of the record fit. Take it back.
                self.truncate_to(start).map_err(io_err)?;
                Err(AppendError::NoSpace {
                    path: self.journal.path.clone(),
                })
            }
            Err(e) => {
                self.truncate_to(start).map_err(io_err)?;
                if crate::sys::is_no_space(&e) {
                    Err(AppendError::NoSpace {
                        path: self.journal.path.clone(),
                    })
                } else {
                    Err(io_err(e))
                }
            }
        }
    }

    /// Cut the file back to `len` (used after a failed write).
    fn truncate_to(&self, len: u64) -> io::Result<()> {
        if self.journal.len()? > len {
            self.journal.file.set_len(len)?;
        }
        Ok(())
    }

    /// The locked journal.
    pub fn journal(&self) -> &Journal {
        self.journal
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.journal.file.unlock();
    }
}

/// One `write(2)` (retried only on `EINTR`, never split).
fn write_once(file: &File, record: &[u8]) -> io::Result<usize> {
    use std::io::Write;
    loop {
        match (&*file).write(record) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// If the file of length `len` does not end in `\n`, truncate it back to just after its last
/// `\n` (or to 0). Returns the length afterwards. Caller holds the lock.
///
/// # Errors
/// The `pread(2)`/`ftruncate(2)` error.
pub fn repair_tail(file: &File, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    let keep = last_newline_end(file, len)?;
    file.set_len(keep)?;
    Ok(keep)
}

/// Offset just past the last `\n` before `len` (0 if none).
fn last_newline_end(file: &File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = memchr::memrchr(b'\n', chunk) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// One complete line read from a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// Offset of the line's first byte in the file.
    pub offset: u64,
    /// The line without its `\n`.
    pub bytes: &'a [u8],
}

impl Line<'_> {
    /// Length on disk, newline included.
    pub fn len_on_disk(&self) -> u64 {
        self.bytes.len() as u64 + 1
    }
}

/// Read complete lines of `file` from offset `from`, reading at most about `max_bytes` (always at
/// least one whole line if one is there). Calls `f` for each line in order; `f` returns `false`
/// to stop *without taking* that line. Returns the offset just past the last line taken.
///
/// `known_end` is where the file's complete lines are known to end (the inbox meta table knows);
/// without it the file's size is read. A trailing partial line (a writer mid-`write`, or a torn
/// tail not yet repaired) is never returned. `buf` is reused between calls.
///
/// # Errors
/// The `pread(2)`/`fstat(2)` error.
pub fn read_lines(
    file: &File,
    from: u64,
    max_bytes: usize,
    known_end: Option<u64>,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(Line<'_>) -> bool,
) -> io::Result<u64> {
    let end = match known_end {
        Some(e) => e,
        None => file.metadata()?.len(),
    };
    let mut pos = from;
    buf.clear();
    while pos < end {
        // Read what is there (bounded by max_bytes), then more only if no line ended in it.
        let have = buf.len() as u64;
        let remaining = end - (pos + have);
        if remaining == 0 {
            return Ok(pos); // only a partial line is left before `end`
        }
        let chunk = if have == 0 {
            (max_bytes as u64).max(4096)
        } else {
            have.max(64 * 1024)
        };
        let want = remaining.min(chunk);
        let base = buf.len();
        buf.resize(base + want as usize, 0);
        let n = read_at_most(file, &mut buf[base..], pos + base as u64)?;
        buf.truncate(base + n);
        let Some(last_nl) = memchr::memrchr(b'\n', buf) else {
            if n == 0 {
                return Ok(pos); // the file is shorter than `end` said: stop at what is complete
            }
            continue; // a line longer than what was read: read more of it
        };
        let mut start = 0usize;
        while start <= last_nl {
            let nl =
                start + memchr::memchr(b'\n', &buf[start..=last_nl]).unwrap_or(last_nl - start);
            let line = Line {
                offset: pos + start as u64,
                bytes: &buf[start..nl],
            };
            if !f(line) {
                return Ok(pos + start as u64);
            }
            start = nl + 1;
        }
        pos += start as u64;
        if pos - from >= max_bytes as u64 || n == 0 {
            return Ok(pos);
        }
        buf.drain(..start);
    }
    Ok(pos)
}

/// `pread` until `buf` is full or EOF; returns bytes read.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Read exactly `len` bytes at `offset` (one stored record, newline included).
///
/// # Errors
/// The `pread(2)` error, or `UnexpectedEof` if the file is shorter.
pub fn read_record(file: &File, offset: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, offset)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn shm_dir(tag: &str) -> PathBuf {
        let d = PathBuf::from(format!(
            "/dev/shm/shoal-unit-{tag}-{}-{:x}",
            std::process::id(),
            crate::sys::random_u64()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn collect(file: &File, from: u64, max: usize) -> (Vec<(u64, Vec<u8>)>, u64) {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let end = read_lines(file, from, max, None, &mut buf, |l| {
            out.push((l.offset, l.bytes.to_vec()));
            true
        })
        .unwrap();
        (out, end)
    }

    #[test]
    fn torn_tail_is_repaired_before_the_next_append() {
        let d = shm_dir("torn");
        let j = Journal::open(&d.join("j.jsonl"), true).unwrap();
        j.append(b"{\"a\":1}\n").unwrap();
        // Simulate a writer killed mid-write.
        use std::io::Write;
        j.file().write_all(b"{\"b\":").unwrap();
        let (lines, end) = collect(j.file(), 0, 1 << 20);
        assert_eq!(lines.len(), 1, "partial line is never returned");
        assert_eq!(end, 8);
        let a = j.append(b"{\"c\":3}\n").unwrap();
        assert_eq!(
            a,
            Appended {
                start: 8,
                end: 16,
                repaired: 5
            }
        );
        let (lines, _) = collect(j.file(), 0, 1 << 20);
        assert_eq!(
            lines,
            vec![(0, b"{\"a\":1}".to_vec()), (8, b"{\"c\":3}".to_vec())]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn records_must_be_single_lines() {
        let d = shm_dir("lines");
        let j = Journal::open(&d.join("j"), true).unwrap();
        assert!(matches!(
            j.append(b"no newline"),
            Err(AppendError::NotALine)
        ));
        assert!(matches!(
            j.append(b"two\nlines\n"),
            Err(AppendError::NotALine)
        ));
        assert_eq!(j.len().unwrap(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn open_refuses_symlinks() {
        let d = shm_dir("symlink");
        std::fs::write(d.join("victim"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("victim"), d.join("link")).unwrap();
        assert!(Journal::open(&d.join("link"), true).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever mix of records and torn tails is written, a reader sees exactly the complete
        /// records, in order, at their offsets, whatever chunk size it reads with.
        #[test]
        fn framing_survives_torn_tails(
            ops in prop::collection::vec((prop::collection::vec(b'a'..=b'z', 0..300), any::<bool>()), 1..40),
            chunk in 1usize..2000,
        ) {
            let d = shm_dir("prop");
            let j = Journal::open(&d.join("j"), true).unwrap();
            let mut expect = Vec::new();
            for (body, torn) in &ops {
                if *torn {
                    use std::io::Write;
                    j.file().write_all(body).unwrap();
                } else {
                    let mut rec = body.clone();
                    rec.push(b'\n');
                    let a = j.append(&rec).unwrap();
                    expect.push((a.start, body.clone()));
                }
            }
            // Read in pieces of `chunk` bytes, resuming from each returned end.
            let mut got = Vec::new();
            let mut pos = 0;
            let mut buf = Vec::new();
            loop {
                let end = read_lines(j.file(), pos, chunk, None, &mut buf, |l| { got.push((l.offset, l.bytes.to_vec())); true }).unwrap();
                if end == pos { break; }
                pos = end;
            }
            prop_assert_eq!(got, expect);
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
}
