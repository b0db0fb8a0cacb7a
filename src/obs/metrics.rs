//! The metrics emitter: records buffered per process and appended in batches to one of 16
//! JSONL shards.
//!
//! # Record format, version 1
//!
//! One JSON object per line, compatible with the bash `metrics.sh` record (its five fields
//! first), plus who emitted it:
//!
//! ```json
//! {"timestamp":"2026-12-01T22:49:38.123Z","metric":"coordination.time","value":12.5,
//!  "unit":"ms","tags":{"topology":"hybrid"},"agent":"coord","pid":4242,"v":1}
//! ```
//!
//! | field | type | meaning |
//! |-------|------|---------|
//! | `timestamp` | string | ISO-8601 UTC with milliseconds |
//! | `metric` | string | name, e.g. `bus.sent` (1-200 bytes, no control characters) |
//! | `value` | number | a finite number |
//! | `unit` | string | free text (`ms`, `count`, `percent`, ...), may be empty |
//! | `tags` | object | free-form labels (`metrics.sh` tags-json); `{}` when none |
//! | `agent` | string or null | the emitting agent (`SHOAL_AGENT_ID`), if known |
//! | `pid` | integer | the emitting process |
//! | `v` | 1 | record version |
//!
//! # Files
//!
//! `metrics/shard-00.jsonl` .. `shard-15.jsonl` in the root. A process always writes the same
//! shard (chosen from its agent id, else its pid), so hundreds of processes rarely contend.
//! Records are buffered and appended with the torn-tail-safe append ([`crate::journal`]) in
//! one `write()` per batch: when the buffer reaches 64 KiB, when its oldest record is older than
//! the flush interval (a background thread sees to it), and when the emitter is dropped.
//!
//! A shard that passes the rotation size is renamed, under its lock, to
//! `shard-NN.<ms>-<pid>-<n>.jsonl`; writers notice (the path no longer names the file they hold)
//! and reopen. A writer that appended to the old file a moment before the rename appended to
//! the renamed file, which readers read too: nothing is lost. Rotated files older than the
//! retention (48 h by default) are removed.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::envelope::{itoa, write_json_str};
use crate::journal::{AppendError, Journal};
use crate::layout::Layout;

/// Record version written by this build.
pub const VERSION: u32 = 1;
/// Shards by default.
pub const DEFAULT_SHARDS: u32 = 16;

/// Emitter settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Number of shard files.
    pub shards: u32,
    /// Flush when this many bytes are buffered.
    pub flush_bytes: usize,
    /// Flush records at most this old.
    pub flush_interval: Duration,
    /// Rotate a shard past this size.
    pub rotate_bytes: u64,
    /// Remove rotated files older than this.
    pub retention: Duration,
    /// Run a background thread that flushes records older than the interval (off for an owner
    /// that flushes by itself).
    pub flusher: bool,
}

impl Default for MetricsOptions {
    /// 16 shards (`SHOAL_METRICS_SHARDS`, 1-256, overrides), flushes at 64 KiB or 500 ms,
    /// rotation at 8 MiB, retention 48 h.
    fn default() -> MetricsOptions {
        let shards = std::env::var("SHOAL_METRICS_SHARDS")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|n| (1..=256).contains(n))
            .unwrap_or(DEFAULT_SHARDS);
        MetricsOptions {
            shards,
            flush_bytes: 64 << 10,
            flush_interval: Duration::from_millis(500),
            rotate_bytes: 8 << 20,
            retention: Duration::from_secs(48 * 3600),
            flusher: true,
        }
    }
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricError {
    /// Bad metric name.
    #[error("invalid metric name {0:?} (1-200 bytes, no control characters)")]
    Name(String),
    /// Not a finite number.
    #[error("metric value {0} is not a finite number")]
    Value(String),
}

/// Buffered records waiting for a flush.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    records: u64,
    oldest: Option<Instant>,
    journal: Option<Journal>,
    /// Records given up after failed flushes (the buffer is bounded).
    dropped: u64,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    shard: usize,
    agent: Option<String>,
    pid: u32,
    opts: MetricsOptions,
    pending: Mutex<Pending>,
}

/// A process's metrics emitter. Cheap to clone; records are flushed when the last clone drops.
#[derive(Debug, Clone)]
pub struct Emitter {
    inner: Arc<Inner>,
}

/// Most bytes kept buffered while flushes fail (a full filesystem): past it, the oldest are
/// given up and counted.
const MAX_PENDING: usize = 8 << 20;

impl Emitter {
    /// An emitter writing to the metrics of `layout`'s root, as `agent` if known.
    pub fn new(layout: &Layout, agent: Option<&str>, opts: MetricsOptions) -> Emitter {
        let pid = std::process::id();
        let shards = opts.shards.max(1) as usize;
        let shard = match agent {
            Some(a) => {
                let mut h = DefaultHasher::new();
                a.hash(&mut h);
                h.finish() as usize % shards
            }
            None => pid as usize % shards,
        };
        let inner = Arc::new(Inner {
            dir: layout.metrics_dir(),
            shard,
            agent: agent.map(str::to_owned),
            pid,
            opts,
            pending: Mutex::new(Pending::default()),
        });
        if opts.flusher {
            start_flusher(Arc::downgrade(&inner), opts.flush_interval);
        }
        Emitter { inner }
    }

    /// The shard file this process appends to.
    pub fn shard_path(&self) -> PathBuf {
        shard_path(&self.inner.dir, self.inner.shard)
    }

    /// Buffer one record (flushed by size, by age, or on drop).
    ///
    /// # Errors
    /// [`MetricError`] for a bad name or value; nothing is buffered.
    pub fn emit(
        &self,
        metric: &str,
        value: f64,
        unit: &str,
        tags: &[(&str, &str)],
    ) -> Result<(), MetricError> {
        self.push(metric, value, unit, Tags::Pairs(tags))
    }

    /// As [`Emitter::emit`], with tags given as a JSON object's text (checked by the caller).
    ///
    /// # Errors
    /// As [`Emitter::emit`].
    pub fn emit_raw(
        &self,
        metric: &str,
        value: f64,
        unit: &str,
        tags_json: &str,
    ) -> Result<(), MetricError> {
        self.push(metric, value, unit, Tags::Json(tags_json))
    }

    /// Write the record straight into the buffer: no `fmt`, no temporary strings (the bus
    /// writes a latency record for most messages a lightly loaded agent receives).
    fn push(
        &self,
        metric: &str,
        value: f64,
        unit: &str,
        tags: Tags<'_>,
    ) -> Result<(), MetricError> {
        if metric.is_empty() || metric.len() > 200 || metric.chars().any(char::is_control) {
            return Err(MetricError::Name(metric.to_owned()));
        }
        if !value.is_finite() {
            return Err(MetricError::Value(value.to_string()));
        }
        let inner = &self.inner;
        let mut p = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let out = &mut p.buf;
        out.extend_from_slice(b"{\"timestamp\":\"");
        crate::sys::push_iso8601_utc(out, crate::store::now_ms());
        out.extend_from_slice(b"\",\"metric\":");
        write_json_str(out, metric);
        out.extend_from_slice(b",\"value\":");
        push_value(out, value);
        out.extend_from_slice(b",\"unit\":");
        write_json_str(out, unit);
        out.extend_from_slice(b",\"tags\":");
        match tags {
            Tags::Json(t) => out.extend_from_slice(t.as_bytes()),
            Tags::Pairs(pairs) => {
                out.push(b'{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json_str(out, k);
                    out.push(b':');
                    write_json_str(out, v);
                }
                out.push(b'}');
            }
        }
        out.extend_from_slice(b",\"agent\":");
        match &inner.agent {
            Some(a) => write_json_str(out, a),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"pid\":");
        out.extend_from_slice(itoa(u64::from(inner.pid)).as_bytes());
        out.extend_from_slice(b",\"v\":");
        out.extend_from_slice(itoa(u64::from(VERSION)).as_bytes());
        out.extend_from_slice(b"}\n");
        p.records += 1;
        p.oldest.get_or_insert_with(Instant::now);
        if p.buf.len() >= inner.opts.flush_bytes {
            let _ = inner.flush(&mut p);
        }
        Ok(())
    }

    /// Append everything buffered now.
    ///
    /// # Errors
    /// The append error; the records stay buffered for the next try.
    pub fn flush(&self) -> io::Result<()> {
        let mut p = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.flush(&mut p)
    }

    /// Records given up because flushes kept failing.
    pub fn dropped(&self) -> u64 {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dropped
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut p = std::mem::take(self.pending.get_mut().unwrap_or_else(|e| e.into_inner()));
        if let Err(e) = self.flush(&mut p) {
            eprintln!(
                "shoal: warning: {} metric records not written to {}: {e}",
                p.records,
                self.dir.display()
            );
        }
    }
}

impl Inner {
    fn flush(&self, p: &mut Pending) -> io::Result<()> {
        if p.buf.is_empty() {
            return Ok(());
        }
        let r = self.append(p);
        match &r {
            Ok(()) => {
                p.buf.clear();
                p.records = 0;
                p.oldest = None;
            }
            Err(_) if p.buf.len() > MAX_PENDING => {
                // Keep the newest half; count what is given up.
                let cut = p.buf.len() / 2;
                let at = memchr::memchr(b'\n', &p.buf[cut..]).map_or(p.buf.len(), |i| cut + i + 1);
                let gone = memchr::memchr_iter(b'\n', &p.buf[..at]).count() as u64;
                p.buf.drain(..at);
                p.dropped += gone;
                p.records -= gone.min(p.records);
            }
            Err(_) => {}
        }
        r
    }

    /// Append the buffer to this process's shard, reopening it if it was rotated away, and
    /// rotate it if it grew past the limit.
    fn append(&self, p: &mut Pending) -> io::Result<()> {
        let path = shard_path(&self.dir, self.shard);
        for _ in 0..8 {
            if p.journal.is_none() {
                p.journal = Some(open_shard(&self.dir, &path)?);
            }
            let Some(j) = p.journal.as_ref() else {
                continue;
            };
            let mut g = j.lock()?;
            // Rotated (renamed) since we opened it: our file is not the shard any more.
            let same = match std::fs::symlink_metadata(&path) {
                Ok(m) => {
                    let mine = j.file().metadata()?;
                    m.ino() == mine.ino() && m.dev() == mine.dev()
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if !same {
                drop(g);
                p.journal = None;
                continue;
            }
            let a = g.append_lines(&p.buf, None).map_err(|e| match e {
                AppendError::Io { source, .. } => source,
                other => io::Error::other(other.to_string()),
            })?;
            if a.end >= self.opts.rotate_bytes {
                // Never over an earlier rotated file (two rotations in one millisecond).
                let ms = crate::store::now_ms();
                let mut n = 0u32;
                loop {
                    let rotated = self.dir.join(format!(
                        "shard-{:02}.{ms}-{}-{n}.jsonl",
                        self.shard, self.pid
                    ));
                    match crate::sys::rename_noreplace(&path, &rotated) {
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                        other => break other?,
                    }
                }
                drop(g);
                p.journal = None;
                prune(&self.dir, self.opts.retention);
            }
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{}: rotated away repeatedly while appending",
            path.display()
        )))
    }
}

fn shard_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard:02}.jsonl"))
}

fn open_shard(dir: &Path, path: &Path) -> io::Result<Journal> {
    match Journal::open(path, true) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            crate::store::mkdir_private(dir).or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            Journal::open(path, true)
        }
        other => other,
    }
}

/// Remove rotated shard files older than `retention`; returns how many.
pub fn prune(dir: &Path, retention: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        // Active shards are `shard-NN.jsonl`; rotated ones have a second dot.
        if !(name.starts_with("shard-")
            && name.ends_with(".jsonl")
            && name.matches('.').count() == 2)
        {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > retention);
        if old && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// A background thread per emitter that flushes records older than the interval; it ends
/// when the emitter is dropped.
fn start_flusher(inner: Weak<Inner>, every: Duration) {
    let _ = std::thread::Builder::new()
        .name("shoal-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let mut p = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
                if p.oldest.is_some_and(|t| t.elapsed() >= every) {
                    let _ = inner.flush(&mut p);
                }
            }
        });
}

/// A record's tags: label pairs, or a JSON object's text.
enum Tags<'a> {
    Pairs(&'a [(&'a str, &'a str)]),
    Json(&'a str),
}

/// A number as JSON (and as Prometheus text): integers without a fraction.
pub(crate) fn fmt_value(v: f64) -> String {
    let mut out = Vec::with_capacity(24);
    push_value(&mut out, v);
    String::from_utf8(out).unwrap_or_default() // digits, sign, point, exponent: ASCII
}

/// [`fmt_value`] appended to `out`.
fn push_value(out: &mut Vec<u8>, v: f64) {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        if v < 0.0 {
            out.push(b'-');
        }
        out.extend_from_slice(itoa(v.abs() as u64).as_bytes());
    } else {
        struct Bytes<'a>(&'a mut Vec<u8>);
        impl std::fmt::Write for Bytes<'_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                self.0.extend_from_slice(s.as_bytes());
                Ok(())
            }
        }
        let _ = write!(Bytes(out), "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_buffered_flushed_and_well_formed() {
        let d = crate::journal::tests::shm_dir("metrics");
        let layout = Layout::new(&d, crate::LayoutKind::Jsonl);
        let m = Emitter::new(&layout, Some("a1"), MetricsOptions::default());
        m.emit("bus.sent", 3.0, "count", &[("to", "b\"2")]).unwrap();
        m.emit("lat", 0.25, "ms", &[]).unwrap();
        assert!(!m.shard_path().exists(), "buffered, not yet written");
        assert_eq!(
            m.emit("", 1.0, "", &[]),
            Err(MetricError::Name(String::new()))
        );
        assert!(m.emit("x", f64::NAN, "", &[]).is_err());
        let path = m.shard_path();
        drop(m);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["metric"], "bus.sent");
        assert_eq!(lines[0]["value"], 3);
        assert_eq!(lines[0]["tags"]["to"], "b\"2");
        assert_eq!(lines[0]["agent"], "a1");
        assert_eq!(lines[1]["value"], 0.25);
        assert_eq!(lines[1]["v"], 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn prune_removes_old_rotated_files_only() {
        let d = crate::journal::tests::shm_dir("metrics-prune");
        let touch = |name: &str, age_h: u64| {
            let f = std::fs::File::create(d.join(name)).unwrap();
            let t = std::time::SystemTime::now() - Duration::from_secs(age_h * 3600);
            f.set_modified(t).unwrap();
        };
        touch("shard-00.jsonl", 100); // active: never pruned, however old
        touch("shard-00.1-2-0.jsonl", 49);
        touch("shard-01.1-2-0.jsonl", 47);
        touch("notes.txt", 100);
        assert_eq!(prune(&d, Duration::from_secs(48 * 3600)), 1);
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["notes.txt", "shard-00.jsonl", "shard-01.1-2-0.jsonl"]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rotation_keeps_every_record() {
        let d = crate::journal::tests::shm_dir("metrics-rot");
        let layout = Layout::new(&d, crate::LayoutKind::Jsonl);
        let opts = MetricsOptions {
            shards: 1,
            flush_bytes: 1000,
            rotate_bytes: 5000,
            ..MetricsOptions::default()
        };
        let m = Emitter::new(&layout, None, opts);
        for i in 0..1000 {
            m.emit("n", f64::from(i), "", &[]).unwrap();
        }
        drop(m);
        let mut seen = Vec::new();
        let mut files = 0;
        for e in std::fs::read_dir(layout.metrics_dir()).unwrap() {
            files += 1;
            for l in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                seen.push(v["value"].as_i64().unwrap());
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(files > 5, "rotated into {files} files");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
