//! Prometheus metrics: names in one place, labels only from bounded sets, and a minimal
//! `/metrics` HTTP endpoint (text exposition format 0.0.4).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::migration::machine::Outcome;
use crate::migration::reason::Reason;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The gRPC methods (label `method`).
pub const METHODS: [&str; 5] = [
    "Migrate",
    "Abort",
    "MigrateIn",
    "AbortMigrateIn",
    "PushInstanceStatus",
];

/// gRPC status code names by number (label `code`).
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Which side of a migration (label `side`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This llumlet's engine was the source.
    Out,
    /// This llumlet's engine was the destination.
    In,
}

/// Outcome labels: `migrated`, then `aborted` and `in_doubt` by reason.
const OUTCOMES: [&str; 3] = ["migrated", "aborted", "in_doubt"];
const REASONS: usize = Reason::LABELS.len();
/// Counters per side: one for `migrated`, then one per reason for `aborted`, then for `in_doubt`.
const SLOTS: usize = 1 + 2 * REASONS;

/// Finished migrations by side, outcome and reason: every label from a bounded set.
#[derive(Debug)]
pub struct MigrationCounts {
    counts: [[Counter; SLOTS]; 2],
}

impl Default for MigrationCounts {
    fn default() -> Self {
        MigrationCounts {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| Counter::default())),
        }
    }
}

impl MigrationCounts {
    fn slot(outcome: &Outcome) -> usize {
        match outcome {
            Outcome::Migrated => 0,
            Outcome::Aborted(r) => 1 + r.index(),
            Outcome::InDoubt(r) => 1 + REASONS + r.index(),
        }
    }

    /// Counts one finished migration.
    pub fn record(&self, side: Side, outcome: &Outcome) {
        self.counts[side as usize][Self::slot(outcome)].inc();
    }

    /// How many migrations on `side` ended like `outcome` (its reason's kind, not its text).
    pub fn count(&self, side: Side, outcome: &Outcome) -> u64 {
        self.counts[side as usize][Self::slot(outcome)].get()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {0} Finished migrations, by side, outcome and reason.\n# TYPE {0} counter",
            names::MIGRATIONS
        );
        for (side, row) in ["out", "in"].iter().zip(&self.counts) {
            for (slot, c) in row.iter().enumerate() {
                let v = c.get();
                if v == 0 {
                    continue;
                }
                let (outcome, reason) = match slot {
                    0 => (OUTCOMES[0], "none"),
                    s if s <= REASONS => (OUTCOMES[1], Reason::LABELS[s - 1]),
                    s => (OUTCOMES[2], Reason::LABELS[s - 1 - REASONS]),
                };
                let _ = writeln!(
                    out,
                    "{}{{side=\"{side}\",outcome=\"{outcome}\",reason=\"{reason}\"}} {v}",
                    names::MIGRATIONS
                );
            }
        }
    }
}

/// Every metric of the llumlet.
#[derive(Debug)]
pub struct Metrics {
    start: Instant,
    /// Status writes to the CMS that succeeded.
    pub status_pushes: Counter,
    /// Metadata writes to the CMS that succeeded.
    pub metadata_pushes: Counter,
    /// CMS operations that failed.
    pub cms_errors: Counter,
    /// Statuses received from the engine.
    pub engine_statuses: Counter,
    rpcs: [[Counter; 17]; 5],
    /// Finished migrations by side, outcome and reason.
    pub migrations: Arc<MigrationCounts>,
    /// Nanoseconds after `start` at which the newest engine status arrived (0: never).
    last_engine_status_ns: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            start: Instant::now(),
            status_pushes: Counter::default(),
            metadata_pushes: Counter::default(),
            cms_errors: Counter::default(),
            engine_statuses: Counter::default(),
            rpcs: Default::default(),
            migrations: Arc::default(),
            last_engine_status_ns: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one finished RPC of `method` (an index into [`METHODS`]) with `code`.
    pub fn rpc(&self, method: usize, code: tonic::Code) {
        let c = (code as usize).min(CODES.len() - 1);
        if let Some(row) = self.rpcs.get(method) {
            row[c].inc();
        }
    }

    /// How many RPCs of `method` ended with `code`.
    pub fn rpc_count(&self, method: usize, code: tonic::Code) -> u64 {
        self.rpcs
            .get(method)
            .map_or(0, |row| row[(code as usize).min(CODES.len() - 1)].get())
    }

    /// Notes that an engine status arrived at `at`.
    pub fn engine_status_at(&self, at: Instant) {
        self.engine_statuses.inc();
        let ns = at.saturating_duration_since(self.start).as_nanos().max(1) as u64;
        self.last_engine_status_ns.store(ns, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            names::STATUS_PUSHES,
            "Status writes to the CMS that succeeded.",
            self.status_pushes.get(),
        );
        counter(
            names::METADATA_PUSHES,
            "Metadata writes to the CMS that succeeded.",
            self.metadata_pushes.get(),
        );
        counter(
            names::CMS_ERRORS,
            "CMS operations that failed.",
            self.cms_errors.get(),
        );
        counter(
            names::ENGINE_STATUSES,
            "Statuses received from the engine.",
            self.engine_statuses.get(),
        );
        let _ = writeln!(
            out,
            "# HELP {0} gRPC calls handled, by method and status code.\n# TYPE {0} counter",
            names::RPCS
        );
        for (m, row) in METHODS.iter().zip(&self.rpcs) {
            for (code, c) in CODES.iter().zip(row) {
                let v = c.get();
                if v > 0 {
                    let _ = writeln!(out, "{}{{method=\"{m}\",code=\"{code}\"}} {v}", names::RPCS);
                }
            }
        }
        self.migrations.render(&mut out);
        let last = self.last_engine_status_ns.load(Ordering::Relaxed);
        let age = if last == 0 {
            f64::NAN
        } else {
            (self.start.elapsed().as_nanos() as f64 - last as f64).max(0.0) / 1e9
        };
        let _ = writeln!(
            out,
            "# HELP {0} Seconds since the newest engine status arrived (NaN: none yet).\n# TYPE {0} gauge\n{0} {age}",
            names::ENGINE_STATUS_AGE
        );
        out
    }
}

/// Metric names.
pub mod names {
    /// Counter of successful status writes.
    pub const STATUS_PUSHES: &str = "llumlet_status_pushes_total";
    /// Counter of successful metadata writes.
    pub const METADATA_PUSHES: &str = "llumlet_metadata_pushes_total";
    /// Counter of failed CMS operations.
    pub const CMS_ERRORS: &str = "llumlet_cms_errors_total";
    /// Counter of engine statuses received.
    pub const ENGINE_STATUSES: &str = "llumlet_engine_statuses_total";
    /// Counter of RPCs by method and code.
    pub const RPCS: &str = "llumlet_grpc_requests_total";
    /// Counter of finished migrations by side, outcome and reason.
    pub const MIGRATIONS: &str = "llumlet_migrations_total";
    /// Gauge: age of the newest engine status.
    pub const ENGINE_STATUS_AGE: &str = "llumlet_engine_status_age_seconds";
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            // Out of descriptors or similar: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            // Read until the end of the request head, bounded by the buffer.
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path_ok = head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?");
            let (status, body) = if path_ok {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
