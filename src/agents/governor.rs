//! The process governor: how fast agents are started and restarted.
//!
//! The knobs are those of the AF_* process governor our users know, and its environment
//! variables are honoured as defaults (a command-line flag wins):
//!
//! | knob | variable | default | meaning |
//! |------|----------|---------|---------|
//! | max WIP | `AF_MAX_WIP` | 64 | agents starting at once (spawned, not yet ready) |
//! | CPU headroom | `AF_CPU_HEADROOM_TARGET` | 0 (off) | % of CPU to keep idle: below it, starts pause |
//! | batch | `AF_BATCH_SIZE` | 32 | agents started between two governor checks |
//! | backoff min | `AF_BACKOFF_MIN_MS` | 100 | first delay after a crash or failed spawn |
//! | backoff max | `AF_BACKOFF_MAX_MS` | 30000 | longest delay |
//! | multiplier | `AF_BACKOFF_MULTIPLIER` | 2.0 | growth of the delay per consecutive failure |
//!
//! CPU headroom is read from `/proc/stat` (idle + iowait over all CPUs) between two batches,
//! over at least 25 ms; while it is below the target, starts pause and a `throttle` incident
//! is recorded once per episode.

use std::time::Duration;

/// Exponential backoff: `min * multiplier^(n-1)`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay.
    pub min: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Growth per consecutive failure (at least 1).
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(30_000),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let ms = self.min.as_secs_f64() * 1000.0 * self.multiplier.powi(exp);
        let capped = ms.min(self.max.as_secs_f64() * 1000.0).max(0.0);
        Duration::from_micros((capped * 1000.0) as u64)
    }
}

/// Governor settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Governor {
    /// Most agents starting (spawned, not yet ready) at once.
    pub max_wip: usize,
    /// Percent of CPU to keep idle while starting agents; 0 turns the check off.
    pub cpu_headroom: f64,
    /// Agents started between two governor checks.
    pub batch: usize,
    /// Delays after crashes and failed spawns.
    pub backoff: Backoff,
}

impl Default for Governor {
    fn default() -> Governor {
        Governor {
            max_wip: 64,
            cpu_headroom: 0.0,
            batch: 32,
            backoff: Backoff::default(),
        }
    }
}

impl Governor {
    /// Defaults, overridden by the AF_* variables that are set.
    ///
    /// # Errors
    /// A message naming the variable whose value is not a valid number for it.
    pub fn from_env() -> Result<Governor, String> {
        Governor::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`Governor::from_env`], reading variables through `get`.
    ///
    /// # Errors
    /// As [`Governor::from_env`].
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Governor, String> {
        let mut g = Governor::default();
        let num = |k: &str| -> Result<Option<f64>, String> {
            match get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(Some)
                    .ok_or_else(|| format!("{k}={v:?} is not a non-negative number")),
            }
        };
        if let Some(v) = num("AF_MAX_WIP")? {
            g.max_wip = v as usize;
        }
        if let Some(v) = num("AF_CPU_HEADROOM_TARGET")? {
            g.cpu_headroom = v;
        }
        if let Some(v) = num("AF_BATCH_SIZE")? {
            g.batch = v as usize;
        }
        if let Some(v) = num("AF_BACKOFF_MIN_MS")? {
            g.backoff.min = Duration::from_secs_f64(v / 1000.0);
        }
        if let Some(v) = num("AF_BACKOFF_MAX_MS")? {
            g.backoff.max = Duration::from_secs_f64(v / 1000.0);
        }
        if let Some(v) = num("AF_BACKOFF_MULTIPLIER")? {
            g.backoff.multiplier = v;
        }
        g.check()?;
        Ok(g)
    }

    /// Reject settings that cannot work.
    ///
    /// # Errors
    /// A message saying which setting is out of range.
    pub fn check(&self) -> Result<(), String> {
        if self.max_wip == 0 {
            return Err("max WIP must be at least 1".into());
        }
        if self.batch == 0 {
            return Err("batch size must be at least 1".into());
        }
        if !(0.0..100.0).contains(&self.cpu_headroom) {
            return Err(format!(
                "CPU headroom target {} is not a percentage below 100",
                self.cpu_headroom
            ));
        }
        if self.backoff.multiplier < 1.0 {
            return Err(format!(
                "backoff multiplier {} is below 1 (delays would shrink)",
                self.backoff.multiplier
            ));
        }
        if self.backoff.max < self.backoff.min {
            return Err(format!(
                "backoff max {:?} is below backoff min {:?}",
                self.backoff.max, self.backoff.min
            ));
        }
        Ok(())
    }
}

/// Idle share of all CPUs between two reads of `/proc/stat`.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl CpuSampler {
    /// Percent of CPU time idle since the previous call (`None` on the first call, or if
    /// `/proc/stat` cannot be read, or no time passed).
    pub fn headroom(&mut self) -> Option<f64> {
        let now = read_proc_stat()?;
        let prev = self.last.replace(now)?;
        let total = now.1.checked_sub(prev.1)?;
        let idle = now.0.checked_sub(prev.0)?;
        (total > 0).then(|| 100.0 * idle as f64 / total as f64)
    }
}

/// (idle + iowait, total) jiffies of the `cpu` line.
fn read_proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(text.lines().next()?)
}

fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: included in user/nice]
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff::default();
        let ms: Vec<u128> = (1..=10).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(
            ms,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]
        );
        assert_eq!(b.delay(1000), Duration::from_secs(30));
    }

    #[test]
    fn env_overrides_and_rejects() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
        };
        let g = Governor::from_lookup(env(&[
            ("AF_MAX_WIP", "8"),
            ("AF_BACKOFF_MIN_MS", "50"),
            ("AF_BACKOFF_MULTIPLIER", "3"),
            ("AF_CPU_HEADROOM_TARGET", "20"),
        ]))
        .unwrap();
        assert_eq!(g.max_wip, 8);
        assert_eq!(g.cpu_headroom, 20.0);
        assert_eq!(g.backoff.delay(3), Duration::from_millis(450));
        let e = Governor::from_lookup(env(&[("AF_MAX_WIP", "lots")])).unwrap_err();
        assert!(e.contains("AF_MAX_WIP"), "{e}");
        assert!(Governor::from_lookup(env(&[("AF_BACKOFF_MULTIPLIER", "0.5")])).is_err());
        assert!(Governor::from_lookup(env(&[("AF_MAX_WIP", "0")])).is_err());
    }

    #[test]
    fn proc_stat_line() {
        let (idle, total) = parse_cpu_line("cpu  100 0 50 800 50 0 0 0 0 0").unwrap();
        assert_eq!((idle, total), (850, 1000));
        assert!(parse_cpu_line("cpu0 1 2 3").is_none());
        let mut s = CpuSampler::default();
        assert!(s.headroom().is_none());
    }
}
