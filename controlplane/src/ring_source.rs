//! The engine's shared-memory status ring as a [`StatusSource`]: the llumlet attaches to the
//! engine's control segment (waiting for it if the engine has not created it yet), reads the
//! newest record each tick, and re-attaches when the engine restarts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llumlet_dataplane::command::{Command, QueueError};

use llumlet_dataplane::segment::{Attach, ControlSegment};
use llumlet_dataplane::status_ring::{read_newest, StatusRecord};
use llumlet_proto::cms::InstanceStatus;

use crate::config::StatusMode;
use crate::migration::link::EngineLink;
use crate::status::StatusSource;

/// What the source last logged, so each state is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    Waiting,
    NotReady,
    Incompatible,
    Attached,
    WriterGone,
}

struct State {
    segment: Option<Arc<ControlSegment>>,
    last_seq: u64,
    seen: Seen,
    failed: bool,
    /// When the last new record arrived (or the source attached).
    last_new: Instant,
    /// The outstanding status request: its sequence and when it was sent.
    pending: Option<(u64, Instant)>,
    next_request: u64,
    /// When the engine's liveness (segment replaced, writer alive, header intact) was last
    /// checked.
    last_liveness: Option<Instant>,
    /// Whether the attached segment's locator was seen gone or changed (logged once).
    locator_lost: bool,
    /// The file found at the path in place of the attached segment's locator, once examined
    /// (attached to, and found not to be a new engine's): not examined again until it changes.
    examined: Option<Option<(u64, u64)>>,
    /// Whether a record the status ring gave was refused (logged once until a good one).
    refused: bool,
}

/// How often a tick without a new status checks that the engine is still there. Each check
/// costs a `statx`, a `kill(pid, 0)` and a read of `/proc/<pid>/stat` (about a sixth of the
/// llumlet's CPU per push at 1000 pushes per second, when it ran on every such tick); at the
/// default 40 ms push interval every tick still checks.
const LIVENESS_EVERY: Duration = Duration::from_millis(20);

/// Statuses from the engine's status ring.
pub struct RingSource {
    path: PathBuf,
    mode: StatusMode,
    timeout: Duration,
    link: Arc<EngineLink>,
    state: Mutex<State>,
}

impl RingSource {
    /// A source reading the segment behind `link` (shared with the migrations) once it appears.
    /// In PULL mode it asks the engine for a status on every call; in PUSH mode only when the
    /// engine has published nothing for half of `timeout`.
    pub fn with_link(link: Arc<EngineLink>, mode: StatusMode, timeout: Duration) -> RingSource {
        RingSource {
            path: link.path().to_path_buf(),
            link,
            mode,
            timeout,
            state: Mutex::new(State {
                segment: None,
                last_seq: 0,
                seen: Seen::Nothing,
                failed: false,
                last_new: Instant::now(),
                pending: None,
                next_request: 1,
                last_liveness: None,
                locator_lost: false,
                examined: None,
                refused: false,
            }),
        }
    }

    /// Takes the engine's replies; sends a status request when one is due.
    fn exchange(&self, st: &mut State, seg: &ControlSegment, now: Instant) {
        self.link.drain(seg);
        if st
            .pending
            .is_some_and(|(p, _)| self.link.status_answered() >= p)
        {
            st.pending = None;
        }
        let due = match self.mode {
            StatusMode::Pull => true,
            StatusMode::Push => now.saturating_duration_since(st.last_new) >= self.timeout / 2,
        };
        // An unanswered request is repeated once per timeout, not on every tick.
        let may_send = st
            .pending
            .is_none_or(|(_, sent)| now.saturating_duration_since(sent) >= self.timeout);
        if due && may_send {
            let seq = st.next_request;
            match self.link.send(seg, &Command::StatusRequest { seq }) {
                Ok(()) => {
                    st.next_request += 1;
                    st.pending = Some((seq, now));
                }
                Err(QueueError::Full) => {
                    tracing::debug!("the engine's command queue is full; status request not sent")
                }
                Err(e) => tracing::warn!(error = %e, "cannot send a status request"),
            }
        }
    }

    fn note(&self, st: &mut State, now: Seen, f: impl FnOnce()) {
        if st.seen != now {
            st.seen = now;
            f();
        }
    }

    /// Takes `seg` (attached, its writer alive) as the engine's segment.
    fn adopt(&self, st: &mut State, seg: ControlSegment) {
        let (generation, pid) = (seg.generation(), seg.writer_pid());
        self.note(st, Seen::Attached, || {
            tracing::info!(path = %self.path.display(), generation = format!("{generation:#x}"), engine_pid = pid, "attached to the engine's status ring")
        });
        map_kv_regions(&seg);
        st.last_seq = 0;
        st.pending = None;
        st.locator_lost = false;
        st.examined = None;
        st.last_new = Instant::now();
        let seg = Arc::new(seg);
        self.link.set_segment(Some(Arc::clone(&seg)));
        st.segment = Some(seg);
    }

    fn try_attach(&self, st: &mut State) {
        match ControlSegment::attach(&self.path) {
            Ok(Attach::Ready(seg)) if !seg.writer_alive() => {
                // A segment left by a dead engine: wait for its successor to replace it.
                let pid = seg.writer_pid();
                self.note(st, Seen::WriterGone, || {
                    tracing::warn!(engine_pid = pid, path = %self.path.display(), "the engine process is gone; waiting for a new engine")
                });
            }
            Ok(Attach::Ready(seg)) => self.adopt(st, seg),
            Ok(Attach::Stale { pid }) => self.note(st, Seen::WriterGone, || {
                tracing::warn!(engine_pid = pid, path = %self.path.display(), "the engine that created the control segment is gone; waiting for a new engine")
            }),
            Ok(Attach::NotThere) => self.note(st, Seen::Waiting, || {
                tracing::info!(path = %self.path.display(), "waiting for the engine's control segment (PushInstanceStatus works meanwhile)")
            }),
            Ok(Attach::NotReady) => self.note(st, Seen::NotReady, || {
                tracing::info!(path = %self.path.display(), "the engine's control segment is not ready yet")
            }),
            Ok(Attach::Incompatible(why)) => self.note(st, Seen::Incompatible, || {
                tracing::warn!(path = %self.path.display(), %why, "cannot use the engine's control segment")
            }),
            Err(e) => self.note(st, Seen::Incompatible, || tracing::warn!(error = %e, "cannot open the engine's control segment")),
        }
    }
}

impl StatusSource for RingSource {
    fn take_newest(&self) -> Option<InstanceStatus> {
        let mut guard = crate::sync::lock(&self.state);
        let st = &mut *guard;
        if st.segment.is_none() {
            self.try_attach(st);
        }
        // Taken out while in use, put back unless the engine is gone.
        let seg = st.segment.take()?;
        // A header no longer as attached means the memory was overwritten: nothing read from
        // it can be trusted (a few atomic loads, every tick).
        if let Err(why) = seg.intact() {
            tracing::warn!(%why, "the engine's control segment was overwritten; reporting schedulable=false until a new segment is created");
            st.seen = Seen::Incompatible;
            st.failed = true;
            self.link.set_segment(None);
            return None;
        }
        let newest = match read_newest(seg.status()) {
            Ok(Some(r)) if r.publish_seq > st.last_seq => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "status ring read failed");
                None
            }
        };
        let now = Instant::now();
        if let Some(r) = newest {
            st.last_seq = r.publish_seq;
            let status = to_instance_status(&r);
            // A record no engine could have written (the segment overwritten, or an engine bug)
            // is not a sign of life: the instance goes unschedulable at the engine timeout.
            match crate::status::check_pushed(&status) {
                Ok(()) => {
                    st.refused = false;
                    st.last_new = now;
                    st.failed = false;
                    if self.mode == StatusMode::Pull {
                        // Ask for the next one now, so it is there at the next tick.
                        self.exchange(st, &seg, now);
                    }
                    st.segment = Some(seg);
                    return Some(status);
                }
                Err(why) if !st.refused => {
                    st.refused = true;
                    tracing::warn!(%why, "the engine's status ring holds an impossible status; ignoring it");
                }
                Err(_) => {}
            }
        }
        self.exchange(st, &seg, now);
        // Nothing new: is the engine still there?
        if st
            .last_liveness
            .is_some_and(|t| now.duration_since(t) < LIVENESS_EVERY)
        {
            st.segment = Some(seg);
            return None;
        }
        st.last_liveness = Some(now);
        let found = seg.locator_now();
        if seg.replaced() && st.examined != Some(found) {
            // A new locator at the path: a restarted engine's segment takes over; anything else
            // (the locator removed, truncated or overwritten) leaves the engine's own segment in
            // use, since nothing done to the locator can reach the sealed memory. What was found
            // is examined once, until another file takes its place.
            match ControlSegment::attach(&self.path) {
                Ok(Attach::Ready(new))
                    if new.writer_alive() && new.generation() != seg.generation() =>
                {
                    tracing::info!("the engine's control segment was replaced (engine restarted); re-attaching");
                    drop(seg);
                    st.seen = Seen::Nothing;
                    self.adopt(st, new);
                    return None;
                }
                // Not ready yet: looked at again at the next check.
                Ok(Attach::NotReady) => {}
                _ => st.examined = Some(found),
            }
            if !st.locator_lost {
                st.locator_lost = true;
                tracing::warn!(path = %self.path.display(), "the control segment's locator was removed or changed, not by a new engine; the engine's segment stays in use");
            }
        }
        if !seg.writer_alive() {
            let pid = seg.writer_pid();
            tracing::warn!(
                engine_pid = pid,
                "the engine process is gone; reporting schedulable=false"
            );
            st.seen = Seen::WriterGone;
            st.failed = true;
            self.link.set_segment(None);
        } else {
            st.segment = Some(seg);
        }
        None
    }

    fn engine_failed(&self) -> bool {
        let mut st = crate::sync::lock(&self.state);
        std::mem::take(&mut st.failed)
    }
}

/// Maps the engine's host KV regions, checking each against its segment, and says what it
/// found. (The migration data plane keeps these mappings; here they prove the registry usable.)
fn map_kv_regions(seg: &ControlSegment) {
    use llumlet_dataplane::kv::{KvError, MappedRegion};
    let mut bytes = 0u64;
    let mut host = 0;
    for (i, region) in seg.kv().regions().into_iter().enumerate() {
        match region.and_then(|r| MappedRegion::map(&r)) {
            Ok(m) => {
                host += 1;
                bytes += m.region().len().unwrap_or(0);
            }
            Err(KvError::NotHost(layer)) => tracing::info!(
                layer,
                "GPU KV region registered (opened by the CUDA transport)"
            ),
            Err(e) => tracing::warn!(region = i, error = %e, "cannot use the engine's KV region"),
        }
    }
    if host > 0 {
        tracing::info!(
            regions = host,
            mib = bytes >> 20,
            "mapped the engine's host KV cache"
        );
    }
}

/// The CMS status for a ring record (the llumlet completes it afterwards).
pub fn to_instance_status(r: &StatusRecord) -> InstanceStatus {
    InstanceStatus {
        instance_id: String::new(),
        schedulable: true,
        timestamp_ms: 0,
        step_id: r.counters.step_id,
        update_id: r.counters.update_id,
        recent_waiting_requests: r.recent_waiting_ids().map(str::to_string).collect(),
        waiting_requests: r.waiting_ids().map(str::to_string).collect(),
        hybrid_scheduler_waiting_to_decode_requests_num: r
            .counters
            .hybrid_scheduler_waiting_to_decode_requests_num,
        scheduler_waiting_to_decode_requests_num: r
            .counters
            .scheduler_waiting_to_decode_requests_num,
        num_waiting_requests: r.counters.num_waiting_requests,
        scheduler_running_to_decode_requests_num: r
            .counters
            .scheduler_running_to_decode_requests_num,
        num_running_requests: r.counters.num_running_requests,
        num_loading_requests: r.counters.num_loading_requests,
        num_total_gpu_tokens: r.counters.num_total_gpu_tokens,
        num_used_gpu_tokens: r.counters.num_used_gpu_tokens,
        num_uncomputed_tokens_hybrid_scheduler_waiting_prefills: r
            .counters
            .num_uncomputed_tokens_hybrid_scheduler_waiting_prefills,
        num_unallocated_tokens_hybrid_scheduler_waiting_decodes: r
            .counters
            .num_unallocated_tokens_hybrid_scheduler_waiting_decodes,
        hybrid_scheduler_waiting_to_decode_tokens_num: r
            .counters
            .hybrid_scheduler_waiting_to_decode_tokens_num,
        num_uncomputed_tokens_scheduler_waiting_prefills: r
            .counters
            .num_uncomputed_tokens_scheduler_waiting_prefills,
        scheduler_waiting_to_decode_tokens_num: r.counters.scheduler_waiting_to_decode_tokens_num,
        num_uncomputed_tokens_scheduler_running_prefills: r
            .counters
            .num_uncomputed_tokens_scheduler_running_prefills,
        num_unallocated_tokens_scheduler_running_prefills: r
            .counters
            .num_unallocated_tokens_scheduler_running_prefills,
        scheduler_running_to_decode_tokens_num: r.counters.scheduler_running_to_decode_tokens_num,
        num_tokens_loading_requests: r.counters.num_tokens_loading_requests,
        num_uncomputed_tokens_all_waiting_prefills: r
            .counters
            .num_uncomputed_tokens_all_waiting_prefills,
        num_migrate_in_reqs: r.counters.num_migrate_in_reqs,
        num_migrate_out_reqs: r.counters.num_migrate_out_reqs,
        num_migrate_in_tokens: r.counters.num_migrate_in_tokens,
        num_migrate_out_tokens: r.counters.num_migrate_out_tokens,
        kv_cache_usage_ratio_migrate_in: r.counters.kv_cache_usage_ratio_migrate_in,
        kv_cache_usage_ratio_migrate_out: r.counters.kv_cache_usage_ratio_migrate_out,
        profiling_id: r.counters.profiling_id,
        step_duration: r.counters.step_duration,
        num_scheduled_prefill_tokens: r.counters.num_scheduled_prefill_tokens,
        ..Default::default()
    }
}
