//! The metrics analyzer: every shard (rotated ones too) read in parallel, per-metric
//! statistics, and the Prometheus text exposition.
//!
//! Percentiles are exact, by the nearest-rank method: the p-th percentile of n sorted values is
//! the value at rank `ceil(p / 100 * n)` (1-based). Lines that are not complete, valid records
//! are skipped and counted, never fatal.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only records at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only this metric.
    pub metric: Option<String>,
    /// Break each metric down by this tag.
    pub by: Option<String>,
}

/// Statistics of a set of values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Values.
    pub count: u64,
    /// Their sum (for counters: the total).
    pub sum: f64,
    /// Mean.
    pub avg: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
}

impl Stats {
    /// Statistics of `values` (sorted in place); `None` if empty.
    pub fn of(values: &mut [f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable_by(f64::total_cmp);
        let n = values.len();
        let rank = |p: f64| values[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        let sum: f64 = values.iter().sum();
        Some(Stats {
            count: n as u64,
            sum,
            avg: sum / n as f64,
            min: values[0],
            max: values[n - 1],
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
        })
    }
}

/// One metric's summary, as `shoal metrics summary --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSummary {
    /// Metric name.
    pub metric: String,
    /// Its unit (the most recent record's).
    pub unit: String,
    /// Statistics.
    #[serde(flatten)]
    pub stats: Stats,
    /// The alert threshold that applies to it, if any.
    pub threshold: Option<Threshold>,
    /// Values past the threshold.
    pub violations: u64,
    /// Statistics per value of the `--by` tag (records without the tag under `""`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by: BTreeMap<String, Stats>,
}

/// An alert threshold: values `op` (`>` or `<`) `value` violate it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    /// `>` or `<`.
    pub op: String,
    /// The limit.
    pub value: f64,
}

/// The whole result.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// One entry per metric, sorted by name.
    pub metrics: Vec<MetricSummary>,
    /// Records read (after filters).
    pub records: u64,
    /// Lines skipped as unreadable.
    pub corrupt: u64,
    /// Files read.
    pub files: usize,
}

#[derive(Deserialize)]
struct Rec<'a> {
    #[serde(borrow)]
    timestamp: &'a str,
    #[serde(borrow)]
    metric: std::borrow::Cow<'a, str>,
    value: f64,
    #[serde(default, borrow)]
    unit: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    tags: Option<&'a RawValue>,
}

#[derive(Default)]
struct Acc {
    values: Vec<f64>,
    unit: String,
    last_ts: String,
    by: HashMap<String, Vec<f64>>,
}

/// Every metrics file (active and rotated shards) under `dir`, sorted.
///
/// # Errors
/// The directory cannot be read (a missing one has no files).
pub fn files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".jsonl"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Read and summarize the metrics in `dir`.
///
/// # Errors
/// A file that exists cannot be read.
pub fn summarize(dir: &Path, q: &Query, thresholds: &Thresholds) -> io::Result<Summary> {
    let paths = files(dir)?;
    let parts: Vec<(HashMap<String, Acc>, u64, u64)> = paths
        .par_iter()
        .map(|p| read_file(p, q))
        .collect::<io::Result<_>>()?;
    let mut all: HashMap<String, Acc> = HashMap::new();
    let (mut records, mut corrupt) = (0, 0);
    for (m, r, c) in parts {
        records += r;
        corrupt += c;
        for (name, acc) in m {
            let into = all.entry(name).or_default();
            into.values.extend(acc.values);
            if acc.last_ts >= into.last_ts {
                into.last_ts = acc.last_ts;
                into.unit = acc.unit;
            }
            for (k, v) in acc.by {
                into.by.entry(k).or_default().extend(v);
            }
        }
    }
    let mut metrics: Vec<MetricSummary> = all
        .into_par_iter()
        .filter_map(|(metric, mut acc)| {
            let threshold = thresholds.for_metric(&metric);
            let violations = threshold.map_or(0, |(op, t)| {
                acc.values
                    .iter()
                    .filter(|&&v| if op == ">" { v > t } else { v < t })
                    .count() as u64
            });
            let stats = Stats::of(&mut acc.values)?;
            let by = acc
                .by
                .into_iter()
                .filter_map(|(k, mut v)| Some((k, Stats::of(&mut v)?)))
                .collect();
            Some(MetricSummary {
                metric,
                unit: acc.unit,
                stats,
                threshold: threshold.map(|(op, value)| Threshold {
                    op: op.to_owned(),
                    value,
                }),
                violations,
                by,
            })
        })
        .collect();
    metrics.sort_by(|a, b| a.metric.cmp(&b.metric));
    Ok(Summary {
        metrics,
        records,
        corrupt,
        files: paths.len(),
    })
}

fn read_file(path: &Path, q: &Query) -> io::Result<(HashMap<String, Acc>, u64, u64)> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        // Rotated and pruned between listing and reading.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    // Only complete lines: the tail of a record being written has no newline yet.
    let end = memchr::memrchr(b'\n', &data).map_or(0, |i| i + 1);
    let since = q.since_ms.map(crate::sys::iso8601_utc);
    // Per metric while reading: values, and the newest record's timestamp and unit, borrowed
    // from the file's bytes (no allocation per record).
    struct Local<'a> {
        values: Vec<f64>,
        last_ts: &'a str,
        unit: std::borrow::Cow<'a, str>,
        by: HashMap<String, Vec<f64>>,
    }
    let mut out: HashMap<std::borrow::Cow<'_, str>, Local<'_>> = HashMap::new();
    let (mut records, mut corrupt) = (0u64, 0u64);
    for line in data[..end].split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        // Records shoal wrote parse on a fast path; anything else (metrics.sh's records, escaped
        // strings, a tag breakdown) through serde_json.
        let fast = if q.by.is_none() {
            fast_record(line)
        } else {
            None
        };
        let r = match fast {
            Some(r) => r,
            None => match serde_json::from_slice::<Rec<'_>>(line) {
                Ok(r) => Fast {
                    timestamp: r.timestamp,
                    metric: r.metric,
                    value: r.value,
                    unit: r.unit.unwrap_or_default(),
                    tags: r.tags,
                },
                Err(_) => {
                    corrupt += 1;
                    continue;
                }
            },
        };
        // ISO-8601 UTC with a fixed width compares as text.
        if since.as_deref().is_some_and(|s| r.timestamp < s) {
            continue;
        }
        if q.metric.as_deref().is_some_and(|m| m != r.metric) {
            continue;
        }
        if !r.value.is_finite() {
            corrupt += 1;
            continue;
        }
        records += 1;
        let acc = match out.get_mut(r.metric.as_ref()) {
            Some(a) => a,
            None => out.entry(r.metric.clone()).or_insert_with(|| Local {
                values: Vec::new(),
                last_ts: "",
                unit: Default::default(),
                by: HashMap::new(),
            }),
        };
        acc.values.push(r.value);
        if r.timestamp >= acc.last_ts {
            acc.last_ts = r.timestamp;
            acc.unit = r.unit;
        }
        if let Some(tag) = &q.by {
            let v = r
                .tags
                .and_then(|t| {
                    serde_json::from_str::<HashMap<String, serde_json::Value>>(t.get()).ok()
                })
                .and_then(|m| m.get(tag).cloned())
                .map(|v| match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
                .unwrap_or_default();
            acc.by.entry(v).or_default().push(r.value);
        }
    }
    let out = out
        .into_iter()
        .map(|(k, l)| {
            (
                k.into_owned(),
                Acc {
                    values: l.values,
                    unit: l.unit.into_owned(),
                    last_ts: l.last_ts.to_owned(),
                    by: l.by,
                },
            )
        })
        .collect();
    Ok((out, records, corrupt))
}

/// The fields the analyzer needs from one record.
struct Fast<'a> {
    timestamp: &'a str,
    metric: std::borrow::Cow<'a, str>,
    value: f64,
    unit: std::borrow::Cow<'a, str>,
    tags: Option<&'a RawValue>,
}

/// A record exactly as [`crate::obs::metrics::Emitter`] writes it, with no escapes in the
/// metric name and unit: `{"timestamp":"<24>","metric":"..","value":N,"unit":"..",...}`.
/// `None` for anything else (it then goes through serde_json).
fn fast_record(line: &[u8]) -> Option<Fast<'_>> {
    const TS: &[u8] = b"{\"timestamp\":\"";
    const METRIC: &[u8] = b"\",\"metric\":\"";
    const VALUE: &[u8] = b"\",\"value\":";
    const UNIT: &[u8] = b",\"unit\":\"";
    if line.last() != Some(&b'}') || !line.starts_with(TS) {
        return None;
    }
    let rest = &line[TS.len()..];
    let ts = rest.get(..24)?;
    let rest = rest.get(24..)?.strip_prefix(METRIC)?;
    let q = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[q] != b'"' {
        return None;
    }
    let metric = &rest[..q];
    let rest = rest[q..].strip_prefix(VALUE)?;
    let c = memchr::memchr(b',', rest)?;
    let value: f64 = std::str::from_utf8(&rest[..c]).ok()?.parse().ok()?;
    let rest = rest[c..].strip_prefix(UNIT)?;
    let q = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[q] != b'"' {
        return None;
    }
    let unit = &rest[..q];
    Some(Fast {
        timestamp: std::str::from_utf8(ts).ok()?,
        metric: std::borrow::Cow::Borrowed(std::str::from_utf8(metric).ok()?),
        value,
        unit: std::borrow::Cow::Borrowed(std::str::from_utf8(unit).ok()?),
        tags: None,
    })
}

/// Alert thresholds, as the bash alerting.sh had them (its environment variables honoured).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    rules: Vec<(String, &'static str, f64)>,
}

impl Thresholds {
    /// The defaults, overridden by `ALERT_COORDINATION_TIME_MS`, `ALERT_DELIVERY_RATE_PCT`,
    /// `ALERT_ERROR_RATE_PCT`, `ALERT_QUEUE_DEPTH` when set to numbers.
    pub fn from_env() -> Thresholds {
        let get = |k: &str, d: f64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .unwrap_or(d)
        };
        Thresholds {
            rules: vec![
                (
                    "coordination.time".into(),
                    ">",
                    get("ALERT_COORDINATION_TIME_MS", 10_000.0),
                ),
                (
                    "coordination.delivery_rate".into(),
                    "<",
                    get("ALERT_DELIVERY_RATE_PCT", 90.0),
                ),
                (
                    "coordination.error_rate".into(),
                    ">",
                    get("ALERT_ERROR_RATE_PCT", 5.0),
                ),
                (
                    "coordination.queue_depth".into(),
                    ">",
                    get("ALERT_QUEUE_DEPTH", 1000.0),
                ),
            ],
        }
    }

    fn for_metric(&self, metric: &str) -> Option<(&'static str, f64)> {
        self.rules
            .iter()
            .find(|r| r.0 == metric)
            .map(|r| (r.1, r.2))
    }
}

/// The latest value of every series (metric and tags) in Prometheus text exposition format
/// (version 0.0.4): one gauge family per metric, `shoal_` + its name with every character
/// outside `[a-zA-Z0-9_]` replaced by `_`; tags become labels, plus `agent`. Also
/// `shoal_metric_records_total{metric="..."}`, the records read per metric.
///
/// # Errors
/// A file that exists cannot be read.
pub fn prometheus(dir: &Path) -> io::Result<String> {
    let paths = files(dir)?;
    type Series = BTreeMap<String, BTreeMap<Vec<(String, String)>, (String, f64)>>;
    let parts: Vec<(Series, BTreeMap<String, u64>)> = paths
        .par_iter()
        .map(|p| -> io::Result<_> {
            let data = std::fs::read(p).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(Vec::new())
                } else {
                    Err(e)
                }
            })?;
            let end = memchr::memrchr(b'\n', &data).map_or(0, |i| i + 1);
            let mut series: Series = BTreeMap::new();
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for line in data[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                let (Some(metric), Some(value), Some(ts)) = (
                    v["metric"].as_str(),
                    v["value"].as_f64(),
                    v["timestamp"].as_str(),
                ) else {
                    continue;
                };
                let mut labels: Vec<(String, String)> = v["tags"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| {
                                (
                                    label_name(k),
                                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(a) = v["agent"].as_str() {
                    labels.retain(|(k, _)| k != "agent");
                    labels.push(("agent".into(), a.to_owned()));
                }
                labels.sort();
                labels.dedup_by(|a, b| a.0 == b.0);
                *counts.entry(metric.to_owned()).or_default() += 1;
                let slot = series
                    .entry(metric.to_owned())
                    .or_default()
                    .entry(labels)
                    .or_insert_with(|| (String::new(), value));
                if ts >= slot.0.as_str() {
                    *slot = (ts.to_owned(), value);
                }
            }
            Ok((series, counts))
        })
        .collect::<io::Result<_>>()?;
    let mut series: Series = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (s, c) in parts {
        for (m, by) in s {
            let into = series.entry(m).or_default();
            for (labels, (ts, v)) in by {
                let slot = into.entry(labels).or_insert_with(|| (String::new(), v));
                if ts >= slot.0 {
                    *slot = (ts, v);
                }
            }
        }
        for (m, n) in c {
            *counts.entry(m).or_default() += n;
        }
    }
    let mut out = String::new();
    // Families whose sanitized names collide are merged into the first one's name.
    let mut seen = std::collections::BTreeSet::new();
    for (metric, by) in &series {
        let name = format!("shoal_{}", sanitize(metric));
        if seen.insert(name.clone()) {
            out.push_str(&format!(
                "# HELP {name} latest value of shoal metric {metric}\n"
            ));
            out.push_str(&format!("# TYPE {name} gauge\n"));
        }
        for (labels, (_, v)) in by {
            out.push_str(&name);
            out.push_str(&render_labels(labels));
            out.push_str(&format!(" {}\n", crate::obs::metrics::fmt_value(*v)));
        }
    }
    out.push_str("# HELP shoal_metric_records_total metric records read, per metric\n");
    out.push_str("# TYPE shoal_metric_records_total counter\n");
    for (metric, n) in &counts {
        out.push_str(&format!(
            "shoal_metric_records_total{} {n}\n",
            render_labels(&[("metric".to_owned(), metric.clone())])
        ));
    }
    Ok(out)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn label_name(s: &str) -> String {
    let mut n = sanitize(s);
    if n.is_empty() || n.starts_with(|c: char| c.is_ascii_digit()) || n.starts_with("__") {
        n.insert_str(0, "tag_");
    }
    n
}

fn render_labels(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let body: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let esc = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{esc}\"")
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_are_exact() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = Stats::of(&mut v).unwrap();
        assert_eq!((s.min, s.max, s.avg), (1.0, 100.0, 50.5));
        assert_eq!((s.p50, s.p95, s.p99), (50.0, 95.0, 99.0));
        let mut v = vec![15.0, 20.0, 35.0, 40.0, 50.0];
        let s = Stats::of(&mut v).unwrap();
        assert_eq!((s.p50, s.p95, s.p99), (35.0, 50.0, 50.0));
        let mut one = vec![7.0];
        let s = Stats::of(&mut one).unwrap();
        assert_eq!((s.p50, s.p99, s.count), (7.0, 7.0, 1));
        assert!(Stats::of(&mut []).is_none());
    }

    #[test]
    fn names_and_labels_are_made_valid() {
        assert_eq!(sanitize("coordination.time"), "coordination_time");
        assert_eq!(label_name("9lives"), "tag_9lives");
        assert_eq!(
            render_labels(&[("a".into(), "x\"y\\z\n".into())]),
            r#"{a="x\"y\\z\n"}"#
        );
    }
}
