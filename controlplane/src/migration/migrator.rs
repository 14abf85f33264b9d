//! The live-migration [`Migrator`]: what the gRPC `Migrate` handler calls. It settles what a
//! previous llumlet left open, selects requests from the engine's request table by the
//! scheduler's policy, finds the destination's transfer endpoint, and runs each chosen request's
//! migration ([`run_source`]) on a blocking thread.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};

use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};
use llumlet_dataplane::segment::ControlSegment;

use super::auth::TransferKey;
use super::journal;
use super::link::EngineLink;
use super::machine::{Outcome, SourceTuning};
use super::reason::Reason;
use super::source::{run_source, OutRequest, SourceOptions};
use super::ucx_side::UcxSide;
use crate::config::TransportChoice;
use crate::metrics::{MigrationCounts, Side};
use crate::migration::rpc::{MigrateError, MigrationParams, Migrator};
use crate::sync::lock;

/// Resolves `host:port` (the scheduler's `dst_engine_ip`, `dst_engine_port`).
pub fn resolve_addr(ip: &str, port: i32) -> Result<SocketAddr, String> {
    let port = u16::try_from(port).map_err(|_| format!("bad port {port}"))?;
    // No host name is longer (RFC 1035); a longer one is not even looked up.
    if ip.len() > 253 {
        return Err(format!(
            "{}: longer than a host name can be",
            crate::pyrepr::clip(ip, 64)
        ));
    }
    (ip, port)
        .to_socket_addrs()
        .map_err(|e| format!("{ip}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{ip}:{port}: no address"))
}

/// The live-migration [`Migrator`]: selects from the engine's request table and
/// migrates each chosen request over the transfer connection.
pub struct LiveMigrator {
    link: Arc<EngineLink>,
    instance_id: String,
    source: SourceOptions,
    active: Mutex<HashSet<u32>>,
    naming_dir: Option<std::path::PathBuf>,
    counts: OnceLock<Arc<MigrationCounts>>,
    /// How many of one `Migrate` call's requests move at once.
    parallel: usize,
}

impl LiveMigrator {
    /// A migrator for the engine behind `link`. With a kv-transfer-config naming directory,
    /// destinations are looked up there first (the scheduler's `dst_engine_ip:dst_engine_port`
    /// is the fallback). Transfer connections are authenticated with `key`.
    pub fn new(
        link: Arc<EngineLink>,
        instance_id: String,
        choice: TransportChoice,
        naming_dir: Option<std::path::PathBuf>,
        ucx: Option<Arc<UcxSide>>,
        key: TransferKey,
        parallel: usize,
    ) -> Arc<LiveMigrator> {
        Arc::new(LiveMigrator {
            link,
            instance_id,
            source: SourceOptions {
                choice,
                ucx,
                tuning: SourceTuning::default(),
                key,
            },
            active: Mutex::new(HashSet::new()),
            naming_dir,
            counts: OnceLock::new(),
            parallel: parallel.max(1),
        })
    }

    /// Where finished migrations out are counted (the agent's metrics).
    pub fn set_counts(&self, counts: Arc<MigrationCounts>) {
        let _ = self.counts.set(counts);
    }

    fn candidates(
        &self,
        seg: &ControlSegment,
    ) -> (Vec<crate::selection::Candidate>, HashMap<u32, String>) {
        let active = lock(&self.active).clone();
        let mut out = Vec::new();
        let mut ids = HashMap::new();
        let mut blocks = Vec::new();
        for slot in 0..MAX_REQUESTS as u32 {
            let Ok(Some(r)) = read_request(seg.requests(), slot, &mut blocks) else {
                continue;
            };
            let waiting = match r.state() {
                Some(RequestState::Running) => false,
                Some(RequestState::Waiting) => true,
                _ => continue,
            };
            let Some(id) = r.id.as_str() else { continue };
            ids.insert(slot, id.to_string());
            out.push(crate::selection::Candidate {
                slot,
                arrival: r.arrival,
                prompt_tokens: r.prompt_tokens,
                output_tokens: r.output_tokens,
                waiting,
                migrating: active.contains(&slot),
            });
        }
        (out, ids)
    }
}

#[tonic::async_trait]
impl Migrator for LiveMigrator {
    async fn migrate_out(
        &self,
        dst_ip: &str,
        dst_port: i32,
        params: &MigrationParams,
    ) -> Result<usize, MigrateError> {
        let seg = self
            .link
            .segment()
            .ok_or_else(|| MigrateError::Failed(Reason::NoEngine))?;
        let total = llumlet_dataplane::status_ring::read_newest(seg.status())
            .ok()
            .flatten()
            .map_or(0, |r| r.counters.num_total_gpu_tokens.max(0) as u64);
        // Requests a previous llumlet left marked for a migration it never committed are
        // released first, so they can be chosen again.
        let link = Arc::clone(&self.link);
        let key = self.source.key.clone();
        let _ = tokio::task::spawn_blocking(move || journal::recover_once(&link, &key, true)).await;
        let (cands, ids) = self.candidates(&seg);
        let chosen = crate::selection::select(params, &cands, total);
        let chosen: Vec<u32> = {
            // Take the chosen slots at once so a concurrent Migrate cannot pick them too.
            let mut active = lock(&self.active);
            chosen.into_iter().filter(|s| active.insert(*s)).collect()
        };
        if chosen.is_empty() {
            return Ok(0);
        }
        let release = |slots: &[u32]| {
            let mut active = lock(&self.active);
            for s in slots {
                active.remove(s);
            }
        };
        let named = self
            .naming_dir
            .as_deref()
            .and_then(|d| crate::kv_transfer::naming::lookup(d, &params.dst_engine_id));
        let (dst_ip, dst_port) = match &named {
            Some((ip, port)) => {
                tracing::debug!(dst = %params.dst_engine_id, ip, port, "destination found in the naming directory");
                (ip.as_str(), i32::from(*port))
            }
            None => (dst_ip, dst_port),
        };
        let dst = match resolve_addr(dst_ip, dst_port) {
            Ok(a) => a,
            Err(e) => {
                release(&chosen);
                return Err(MigrateError::Failed(Reason::BadDestination(e)));
            }
        };
        // The chosen requests move `parallel` at a time (the out-slot limit): each migration
        // is a blocking conversation with the engine and the destination, and a drain of many
        // requests one after another would take as many round trips of engine steps.
        let mut moved = 0;
        let mut last_err = None;
        let mut pending = chosen.iter().copied();
        let mut running = tokio::task::JoinSet::new();
        let mut slots = HashMap::new();
        loop {
            while running.len() < self.parallel {
                let Some(slot) = pending.next() else { break };
                let req = OutRequest {
                    slot,
                    id: ids.get(&slot).cloned().unwrap_or_default(),
                };
                let link = Arc::clone(&self.link);
                let (me, opts) = (self.instance_id.clone(), self.source.clone());
                let task = running.spawn_blocking(move || {
                    let report = run_source(&link, &me, dst, &req, &opts);
                    (req, report)
                });
                slots.insert(task.id(), slot);
            }
            let Some(r) = running.join_next_with_id().await else {
                break;
            };
            let task = match &r {
                Ok((id, _)) => *id,
                Err(e) => e.id(),
            };
            if let Some(slot) = slots.remove(&task) {
                release(&[slot]);
            }
            match r {
                Ok((_, (req, rep))) => {
                    tracing::info!(request = %req.id, outcome = %rep.outcome, stages = rep.stages,
                        downtime_us = rep.downtime.map(|d| d.as_micros() as u64), transport = rep.transport_name(), bytes = rep.bytes, %dst,
                        reason = rep.outcome.reason().map(|r| r.to_string()), "migration out finished");
                    if let Some(c) = self.counts.get() {
                        c.record(Side::Out, &rep.outcome);
                    }
                    match rep.outcome {
                        Outcome::Migrated => moved += 1,
                        Outcome::Aborted(e) | Outcome::InDoubt(e) => last_err = Some(e),
                    }
                }
                Err(e) => {
                    last_err = Some(Reason::Internal(format!("migration thread failed: {e}")))
                }
            }
        }
        match (moved, last_err) {
            (0, Some(e)) => Err(MigrateError::Failed(e)),
            _ => Ok(moved),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination address longer than any host name is refused without a lookup, and the
    /// error echoes only its start (the scheduler's client gets a message, not a metadata-size
    /// error).
    #[test]
    fn a_huge_destination_address_is_refused_with_a_bounded_message() {
        let ip = "a".repeat(4 << 20);
        let e = resolve_addr(&ip, 9000).unwrap_err();
        assert!(
            e.len() < 200 && e.contains("longer than a host name"),
            "{e}"
        );
        assert!(resolve_addr("127.0.0.1", 9000).is_ok());
        assert!(resolve_addr("127.0.0.1", 70000)
            .unwrap_err()
            .contains("bad port"));
    }
}
