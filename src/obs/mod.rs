//! Observability: metrics written cheaply by every process, and read back.
//!
//! * [`metrics`]: the emitter (16 JSONL shards, buffered batches, rotation and retention) and
//!   the record format (version 1).
//! * [`counters`]: what the bus records about itself (sent, received, acked, latency, depth).
//! * [`summary`]: the analyzer (per-metric statistics, exact percentiles) and the Prometheus
//!   text exposition.
//!
//! This layer sits on [`crate::journal`] and [`crate::layout`]; the bus and the spawner use it.

pub mod counters;
pub mod metrics;
pub mod summary;
