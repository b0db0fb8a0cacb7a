//! `shoal metrics emit | summary | prom`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use shoal::obs::metrics::{Emitter, MetricsOptions};
use shoal::obs::summary::{self, Query, Thresholds};

use super::{Ctx, Exit, parse_duration};

#[derive(Debug, Subcommand)]
pub(crate) enum MetricsCmd {
    /// Record one value, as metrics.sh `emit` (the record carries SHOAL_AGENT_ID and the pid).
    Emit(EmitArgs),
    /// Per metric: count, avg, min, max, p50, p95, p99, threshold violations.
    Summary(SummaryArgs),
    /// The latest value of every series in Prometheus text format (for node_exporter's
    /// textfile collector).
    Prom(PromArgs),
}

#[derive(Debug, Args)]
pub(crate) struct EmitArgs {
    /// Metric name, e.g. coordination.time.
    metric: String,
    /// A number.
    #[arg(allow_negative_numbers = true)]
    value: String,
    /// Unit (ms, percent, count, ...).
    #[arg(default_value = "")]
    unit: String,
    /// Tags: a JSON object, e.g. '{"team":"a"}'.
    #[arg(default_value = "{}")]
    tags: String,
}

#[derive(Debug, Args)]
pub(crate) struct SummaryArgs {
    /// Only records from the last DUR (e.g. 15m, 1h).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    since: Option<Duration>,
    /// Only this metric.
    #[arg(long, value_name = "NAME")]
    metric: Option<String>,
    /// Break each metric down by this tag.
    #[arg(long, value_name = "TAG")]
    by: Option<String>,
    /// One JSON array, one object per metric.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PromArgs {
    /// Write here (atomically: a temporary file renamed into place) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

pub(crate) fn run(ctx: &Ctx, cmd: MetricsCmd) -> anyhow::Result<Exit> {
    match cmd {
        MetricsCmd::Emit(a) => emit(ctx, a),
        MetricsCmd::Summary(a) => summary_cmd(ctx, a),
        MetricsCmd::Prom(a) => prom(ctx, a),
    }
}

fn emit(ctx: &Ctx, a: EmitArgs) -> anyhow::Result<Exit> {
    let value: f64 = a
        .value
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .with_context(|| format!("metric value {:?} is not a number", a.value))?;
    let tags: serde_json::Value = serde_json::from_str(&a.tags)
        .ok()
        .filter(serde_json::Value::is_object)
        .with_context(|| format!("tags {:?} are not a JSON object", a.tags))?;
    let root = ctx.root(true)?;
    let agent = std::env::var("SHOAL_AGENT_ID")
        .ok()
        .filter(|s| !s.is_empty());
    let m = Emitter::new(root.layout(), agent.as_deref(), MetricsOptions::default());
    m.emit_raw(&a.metric, value, &a.unit, &tags.to_string())?;
    m.flush()
        .with_context(|| format!("cannot write to {}", m.shard_path().display()))?;
    Ok(Exit::Ok)
}

fn summary_cmd(ctx: &Ctx, a: SummaryArgs) -> anyhow::Result<Exit> {
    let root = ctx.root(false)?;
    let q = Query {
        since_ms: a
            .since
            .map(|d| shoal::store::now_ms().saturating_sub(d.as_millis() as u64)),
        metric: a.metric,
        by: a.by,
    };
    let dir = root.layout().metrics_dir();
    let s = summary::summarize(&dir, &q, &Thresholds::from_env())
        .with_context(|| format!("cannot read {}", dir.display()))?;
    if s.corrupt > 0 {
        ctx.warn(&format!(
            "{} unreadable lines skipped in {}",
            s.corrupt,
            dir.display()
        ));
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&s.metrics)?)?;
        return Ok(Exit::Ok);
    }
    if s.metrics.is_empty() {
        writeln!(out, "no metric records in {}", dir.display())?;
        return Ok(Exit::Ok);
    }
    let w = s
        .metrics
        .iter()
        .map(|m| m.metric.len())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(
        out,
        "{:w$}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}  VIOLATIONS",
        "METRIC", "COUNT", "SUM", "AVG", "MIN", "MAX", "P50", "P95", "P99", "UNIT"
    )?;
    for m in &s.metrics {
        let st = &m.stats;
        let viol = match &m.threshold {
            Some(t) => format!("{} ({} {})", m.violations, t.op, num(t.value)),
            None => "-".to_owned(),
        };
        writeln!(
            out,
            "{:w$}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}  {viol}",
            m.metric,
            st.count,
            num(st.sum),
            num(st.avg),
            num(st.min),
            num(st.max),
            num(st.p50),
            num(st.p95),
            num(st.p99),
            m.unit
        )?;
        for (k, b) in &m.by {
            writeln!(
                out,
                "{:w$}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
                format!("  {}", if k.is_empty() { "(none)" } else { k }),
                b.count,
                num(b.sum),
                num(b.avg),
                num(b.min),
                num(b.max),
                num(b.p50),
                num(b.p95),
                num(b.p99),
            )?;
        }
    }
    writeln!(
        out,
        "{} records in {} files{}",
        s.records,
        s.files,
        if s.corrupt > 0 {
            format!(", {} unreadable lines skipped", s.corrupt)
        } else {
            String::new()
        }
    )?;
    Ok(Exit::Ok)
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

fn prom(ctx: &Ctx, a: PromArgs) -> anyhow::Result<Exit> {
    let root = ctx.root(false)?;
    let dir = root.layout().metrics_dir();
    let text =
        summary::prometheus(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    match a.out {
        None => super::out(&text)?,
        Some(path) => {
            let Some(name) = path.file_name() else {
                bail!("--out {} is not a file name", path.display());
            };
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".tmp-{}", std::process::id()));
            let tmp = path.with_file_name(tmp_name);
            std::fs::write(&tmp, text.as_bytes())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| {
                let _ = std::fs::remove_file(&tmp);
                format!("cannot rename {} to {}", tmp.display(), path.display())
            })?;
        }
    }
    Ok(Exit::Ok)
}
