//! The status path: where engine statuses come from ([`StatusSource`]), how the llumlet completes
//! them (reference §4.2), masks them (`LLUMNIX_USED_METRICS`, §4.3) and encodes them for the CMS,
//! and how an engine that went quiet is reported unschedulable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llumlet_proto::cms::InstanceStatus;
use prost::Message;

use crate::config::MigrationLimits;

/// Where the llumlet gets the engine's status from. The gRPC `PushInstanceStatus` source is
/// [`PushedStatus`]; the shared-memory status ring plugs in here too.
pub trait StatusSource: Send + Sync + 'static {
    /// The newest status the engine published since the previous call, if there is one.
    fn take_newest(&self) -> Option<InstanceStatus>;

    /// Whether the source found the engine dead since the previous call (the instance is then
    /// reported unschedulable at once instead of after the engine timeout).
    fn engine_failed(&self) -> bool {
        false
    }
}

/// The most request ids a pushed status may list in `waiting_requests` or
/// `recent_waiting_requests`.
pub const MAX_PUSHED_IDS: usize = 1024;
/// The longest request id a pushed status may list, in bytes.
pub const MAX_PUSHED_ID_BYTES: usize = 256;

/// Whether a status pushed over `PushInstanceStatus` could describe an engine: no negative count,
/// no NaN or infinite number, id lists within [`MAX_PUSHED_IDS`] ids of at most
/// [`MAX_PUSHED_ID_BYTES`]. The error names the first field that is not, for INVALID_ARGUMENT.
/// (`profiling_id` may be -1, upstream's "none"; the available-slot fields are the llumlet's own
/// and are overwritten.)
pub fn check_pushed(s: &InstanceStatus) -> Result<(), String> {
    let counts = [
        ("timestamp_ms", s.timestamp_ms),
        ("step_id", i64::from(s.step_id)),
        ("update_id", i64::from(s.update_id)),
        (
            "hybrid_scheduler_waiting_to_decode_requests_num",
            i64::from(s.hybrid_scheduler_waiting_to_decode_requests_num),
        ),
        (
            "scheduler_waiting_to_decode_requests_num",
            i64::from(s.scheduler_waiting_to_decode_requests_num),
        ),
        ("num_waiting_requests", i64::from(s.num_waiting_requests)),
        (
            "scheduler_running_to_decode_requests_num",
            i64::from(s.scheduler_running_to_decode_requests_num),
        ),
        ("num_running_requests", i64::from(s.num_running_requests)),
        ("num_loading_requests", i64::from(s.num_loading_requests)),
        ("num_total_gpu_tokens", i64::from(s.num_total_gpu_tokens)),
        ("num_used_gpu_tokens", i64::from(s.num_used_gpu_tokens)),
        (
            "num_uncomputed_tokens_hybrid_scheduler_waiting_prefills",
            i64::from(s.num_uncomputed_tokens_hybrid_scheduler_waiting_prefills),
        ),
        (
            "num_unallocated_tokens_hybrid_scheduler_waiting_decodes",
            i64::from(s.num_unallocated_tokens_hybrid_scheduler_waiting_decodes),
        ),
        (
            "hybrid_scheduler_waiting_to_decode_tokens_num",
            i64::from(s.hybrid_scheduler_waiting_to_decode_tokens_num),
        ),
        (
            "num_uncomputed_tokens_scheduler_waiting_prefills",
            i64::from(s.num_uncomputed_tokens_scheduler_waiting_prefills),
        ),
        (
            "scheduler_waiting_to_decode_tokens_num",
            i64::from(s.scheduler_waiting_to_decode_tokens_num),
        ),
        (
            "num_uncomputed_tokens_scheduler_running_prefills",
            i64::from(s.num_uncomputed_tokens_scheduler_running_prefills),
        ),
        (
            "num_unallocated_tokens_scheduler_running_prefills",
            i64::from(s.num_unallocated_tokens_scheduler_running_prefills),
        ),
        (
            "scheduler_running_to_decode_tokens_num",
            i64::from(s.scheduler_running_to_decode_tokens_num),
        ),
        (
            "num_tokens_loading_requests",
            i64::from(s.num_tokens_loading_requests),
        ),
        (
            "num_uncomputed_tokens_all_waiting_prefills",
            i64::from(s.num_uncomputed_tokens_all_waiting_prefills),
        ),
        ("num_migrate_in_reqs", i64::from(s.num_migrate_in_reqs)),
        ("num_migrate_out_reqs", i64::from(s.num_migrate_out_reqs)),
        ("num_migrate_in_tokens", i64::from(s.num_migrate_in_tokens)),
        (
            "num_migrate_out_tokens",
            i64::from(s.num_migrate_out_tokens),
        ),
        (
            "num_scheduled_prefill_tokens",
            i64::from(s.num_scheduled_prefill_tokens),
        ),
    ];
    if let Some((field, v)) = counts.iter().find(|(_, v)| *v < 0) {
        return Err(format!("{field} is {v}: a count cannot be negative"));
    }
    if s.profiling_id < -1 {
        return Err(format!(
            "profiling_id is {}: at least -1 (none)",
            s.profiling_id
        ));
    }
    let numbers = [
        (
            "kv_cache_usage_ratio_migrate_in",
            s.kv_cache_usage_ratio_migrate_in,
        ),
        (
            "kv_cache_usage_ratio_migrate_out",
            s.kv_cache_usage_ratio_migrate_out,
        ),
        (
            "available_kv_cache_usage_ratio_migrate_in",
            s.available_kv_cache_usage_ratio_migrate_in,
        ),
        (
            "available_kv_cache_usage_ratio_migrate_out",
            s.available_kv_cache_usage_ratio_migrate_out,
        ),
        ("step_duration", s.step_duration),
    ];
    if let Some((field, v)) = numbers.iter().find(|(_, v)| !v.is_finite()) {
        return Err(format!("{field} is {v}: must be a finite number"));
    }
    if s.step_duration < 0.0 {
        return Err(format!(
            "step_duration is {}: cannot be negative",
            s.step_duration
        ));
    }
    for (field, ids) in [
        ("waiting_requests", &s.waiting_requests),
        ("recent_waiting_requests", &s.recent_waiting_requests),
    ] {
        if ids.len() > MAX_PUSHED_IDS {
            return Err(format!(
                "{field} lists {} ids: at most {MAX_PUSHED_IDS}",
                ids.len()
            ));
        }
        if let Some(id) = ids.iter().find(|id| id.len() > MAX_PUSHED_ID_BYTES) {
            return Err(format!(
                "{field} holds an id of {} bytes: at most {MAX_PUSHED_ID_BYTES}",
                id.len()
            ));
        }
    }
    Ok(())
}

/// Statuses pushed over gRPC: only the newest is kept (bounded memory, however fast the engine
/// pushes and however slowly the llumlet reads).
#[derive(Default)]
pub struct PushedStatus {
    newest: Mutex<Option<InstanceStatus>>,
    pushes: AtomicU64,
}

impl PushedStatus {
    /// Replaces the kept status with `status`.
    pub fn push(&self, status: InstanceStatus) {
        // A poisoned lock only means a reader panicked mid-take; the slot itself is always valid.
        *crate::sync::lock(&self.newest) = Some(status);
        self.pushes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many statuses were pushed so far.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }
}

impl StatusSource for PushedStatus {
    fn take_newest(&self) -> Option<InstanceStatus> {
        crate::sync::lock(&self.newest).take()
    }
}

/// Field numbers of `cms.InstanceStatus` that the metric mask may zero (reference §4.1 "M").
const MASKABLE: &[u32] = &[8, 9, 10, 11, 12, 13, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25];

/// The metric → status field requirements of upstream `metrics.py` (field numbers).
const REQUIREMENTS: &[(&str, &[u32])] = &[
    ("kv_cache_usage_ratio_projected", &[15, 14, 25, 22, 17]),
    ("decode_batch_size", &[8, 13, 9, 11]),
    ("adaptive_decode_batch_size", &[8, 13, 9, 11]),
    ("num_waiting_requests", &[10]),
    ("all_prefills_tokens_num", &[25, 21]),
    ("cache_aware_all_prefills_tokens_num", &[25, 21]),
    ("kv_cache_hit_len", &[]),
    ("num_requests", &[10, 13, 12]),
    ("all_decodes_tokens_num", &[18, 20, 23, 24]),
];

/// Which maskable status fields are written (`LLUMNIX_USED_METRICS`). Fields outside the mask
/// are written as 0, which protobuf leaves off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricMask {
    keep: u64,
}

impl MetricMask {
    /// Every field.
    pub const ALL: MetricMask = MetricMask { keep: u64::MAX };

    /// Parses the variable as upstream does: names split on `,` and `;`; exactly `all`, or any
    /// unknown name, keeps every field; an empty list keeps none of the maskable fields
    /// (`num_total_gpu_tokens` and `num_used_gpu_tokens` are always written).
    pub fn parse(value: &str) -> MetricMask {
        let names: Vec<&str> = value
            .split([',', ';'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if names == ["all"] {
            return MetricMask::ALL;
        }
        let mut keep = 0u64;
        for name in names {
            match REQUIREMENTS.iter().find(|(m, _)| *m == name) {
                Some((_, fields)) => keep |= fields.iter().fold(0, |acc, f| acc | 1u64 << f),
                None => return MetricMask::ALL,
            }
        }
        MetricMask { keep }
    }

    /// Whether no field is masked.
    pub fn is_all(&self) -> bool {
        MASKABLE.iter().all(|f| self.keeps(*f))
    }

    /// Whether field number `field` is written.
    pub fn keeps(&self, field: u32) -> bool {
        !MASKABLE.contains(&field) || self.keep & (1u64 << field) != 0
    }

    /// Zeroes every maskable field outside the mask.
    pub fn apply(&self, s: &mut InstanceStatus) {
        if self.keep == u64::MAX {
            return;
        }
        let k = |f: u32| self.keep & (1u64 << f) != 0;
        macro_rules! zero {
            ($($n:literal => $field:ident),* $(,)?) => { $( if !k($n) { s.$field = 0; } )* };
        }
        zero!(
            8 => hybrid_scheduler_waiting_to_decode_requests_num,
            9 => scheduler_waiting_to_decode_requests_num,
            10 => num_waiting_requests,
            11 => scheduler_running_to_decode_requests_num,
            12 => num_running_requests,
            13 => num_loading_requests,
            16 => num_uncomputed_tokens_hybrid_scheduler_waiting_prefills,
            17 => num_unallocated_tokens_hybrid_scheduler_waiting_decodes,
            18 => hybrid_scheduler_waiting_to_decode_tokens_num,
            19 => num_uncomputed_tokens_scheduler_waiting_prefills,
            20 => scheduler_waiting_to_decode_tokens_num,
            21 => num_uncomputed_tokens_scheduler_running_prefills,
            22 => num_unallocated_tokens_scheduler_running_prefills,
            23 => scheduler_running_to_decode_tokens_num,
            24 => num_tokens_loading_requests,
            25 => num_uncomputed_tokens_all_waiting_prefills,
        );
    }
}

/// A migration load: what is migrating in and out. The engine reports one in its status; the
/// llumlet accounts another for the migrations it started and has not finished.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationLoad {
    /// Requests migrating out.
    pub out_reqs: i32,
    /// Tokens migrating out.
    pub out_tokens: i32,
    /// KV-cache ratio migrating out.
    pub out_ratio: f64,
    /// Requests migrating in.
    pub in_reqs: i32,
    /// Tokens migrating in.
    pub in_tokens: i32,
    /// KV-cache ratio migrating in.
    pub in_ratio: f64,
}

impl MigrationLoad {
    /// The load an engine reports in `s`.
    pub fn of(s: &InstanceStatus) -> Self {
        MigrationLoad {
            out_reqs: s.num_migrate_out_reqs,
            out_tokens: s.num_migrate_out_tokens,
            out_ratio: s.kv_cache_usage_ratio_migrate_out,
            in_reqs: s.num_migrate_in_reqs,
            in_tokens: s.num_migrate_in_tokens,
            in_ratio: s.kv_cache_usage_ratio_migrate_in,
        }
    }

    /// The larger of both, field by field.
    pub fn max(&self, o: &MigrationLoad) -> MigrationLoad {
        MigrationLoad {
            out_reqs: self.out_reqs.max(o.out_reqs),
            out_tokens: self.out_tokens.max(o.out_tokens),
            out_ratio: self.out_ratio.max(o.out_ratio),
            in_reqs: self.in_reqs.max(o.in_reqs),
            in_tokens: self.in_tokens.max(o.in_tokens),
            in_ratio: self.in_ratio.max(o.in_ratio),
        }
    }
}

/// Completes a status as reference §4.2 says, with the llumlet's own accounting folded in: the
/// migration load is the larger of the engine's and the llumlet's, so a migration is visible the
/// moment it starts.
pub fn complete(
    s: &mut InstanceStatus,
    limits: &MigrationLimits,
    engine: &MigrationLoad,
    local: &MigrationLoad,
    timestamp_ms: i64,
) {
    s.timestamp_ms = timestamp_ms;
    if !limits.enabled {
        return;
    }
    let load = engine.max(local);
    s.num_migrate_out_reqs = load.out_reqs;
    s.num_migrate_in_reqs = load.in_reqs;
    s.num_available_migrate_in_slots = limits.max_req_in.saturating_sub(s.num_migrate_in_reqs);
    s.num_available_migrate_out_slots = limits.max_req_out.saturating_sub(s.num_migrate_out_reqs);
    if limits.detailed {
        s.num_migrate_out_tokens = load.out_tokens;
        s.num_migrate_in_tokens = load.in_tokens;
        s.kv_cache_usage_ratio_migrate_out = load.out_ratio;
        s.kv_cache_usage_ratio_migrate_in = load.in_ratio;
        s.num_available_migrate_in_tokens =
            limits.max_token_in.saturating_sub(s.num_migrate_in_tokens);
        s.num_available_migrate_out_tokens = limits
            .max_token_out
            .saturating_sub(s.num_migrate_out_tokens);
        s.available_kv_cache_usage_ratio_migrate_in =
            limits.max_ratio_in - s.kv_cache_usage_ratio_migrate_in;
        s.available_kv_cache_usage_ratio_migrate_out =
            limits.max_ratio_out - s.kv_cache_usage_ratio_migrate_out;
    }
}

/// Turns what the engine publishes into the bytes written to the CMS on every status tick.
///
/// Pure: time comes in as arguments, so tests drive it tick by tick.
pub struct StatusReporter {
    instance_id: String,
    limits: MigrationLimits,
    mask: MetricMask,
    engine_timeout: Duration,
    /// The newest engine status, masked, with instance id set (`None` until the first one).
    last: Option<InstanceStatus>,
    /// The migration load the engine reported in `last`, before completion.
    engine_load: MigrationLoad,
    last_received: Option<Instant>,
    last_timestamp_ms: i64,
    buf: Vec<u8>,
}

/// What one tick produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to write: the engine never published a status.
    NoStatus,
    /// A fresh status from the engine, written as schedulable.
    Fresh,
    /// The last status again, with a fresh timestamp, still within the engine timeout.
    Repeated,
    /// The engine has been silent for longer than the timeout: written as unschedulable.
    EngineSilent,
}

impl StatusReporter {
    /// A reporter for `instance_id`.
    pub fn new(
        instance_id: String,
        limits: MigrationLimits,
        mask: MetricMask,
        engine_timeout: Duration,
    ) -> Self {
        StatusReporter {
            instance_id,
            limits,
            mask,
            engine_timeout,
            last: None,
            engine_load: MigrationLoad::default(),
            last_received: None,
            last_timestamp_ms: i64::MIN,
            buf: Vec::with_capacity(512),
        }
    }

    /// Takes in a status from the engine.
    pub fn accept(&mut self, mut status: InstanceStatus, now: Instant) {
        self.mask.apply(&mut status);
        status.instance_id.clone_from(&self.instance_id);
        self.engine_load = MigrationLoad::of(&status);
        self.last = Some(status);
        self.last_received = Some(now);
    }

    /// Completes the newest status for the wall-clock time `wall_ms` and encodes it; the bytes
    /// are in [`StatusReporter::encoded`] unless the result is [`Tick::NoStatus`].
    pub fn tick(&mut self, fresh: bool, now: Instant, wall_ms: i64, local: &MigrationLoad) -> Tick {
        let Some(s) = self.last.as_mut() else {
            return Tick::NoStatus;
        };
        let silent = self
            .last_received
            .is_some_and(|t| now.saturating_duration_since(t) >= self.engine_timeout);
        // Strictly increasing, even if the wall clock steps back.
        let ts = wall_ms.max(self.last_timestamp_ms.saturating_add(1));
        self.last_timestamp_ms = ts;
        complete(s, &self.limits, &self.engine_load, local, ts);
        s.schedulable = !silent;
        self.buf.clear();
        s.encode(&mut self.buf)
            .expect("a Vec grows to fit any message, encode cannot fail");
        if silent {
            Tick::EngineSilent
        } else if fresh {
            Tick::Fresh
        } else {
            Tick::Repeated
        }
    }

    /// The bytes of the last tick.
    pub fn encoded(&self) -> &[u8] {
        &self.buf
    }

    /// The last completed status, if any.
    pub fn last(&self) -> Option<&InstanceStatus> {
        self.last.as_ref()
    }

    /// Marks the engine as failed now (an engine call exhausted its retries): the next ticks
    /// report unschedulable until a fresh status arrives.
    pub fn mark_engine_failed(&mut self) {
        self.last_received = Some(Instant::now() - self.engine_timeout);
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(detailed: bool) -> MigrationLimits {
        MigrationLimits {
            enabled: true,
            detailed,
            max_req_in: 2,
            max_req_out: 3,
            max_token_in: 1000,
            max_token_out: 2000,
            max_ratio_in: 0.3,
            max_ratio_out: 0.4,
        }
    }

    fn engine_status() -> InstanceStatus {
        InstanceStatus {
            instance_id: "whatever".into(),
            update_id: 7,
            num_total_gpu_tokens: 4096,
            num_used_gpu_tokens: 100,
            num_running_requests: 3,
            num_waiting_requests: 2,
            num_migrate_out_reqs: 1,
            num_migrate_out_tokens: 500,
            kv_cache_usage_ratio_migrate_out: 0.1,
            scheduler_running_to_decode_tokens_num: 77,
            ..Default::default()
        }
    }

    #[test]
    fn mask_parse_follows_upstream() {
        assert!(MetricMask::parse("all").is_all());
        assert!(
            MetricMask::parse("num_requests,all").is_all(),
            "all mixed with others is unknown → all"
        );
        assert!(MetricMask::parse("predicted_ttft").is_all());
        let m = MetricMask::parse("num_requests; kv_cache_usage_ratio_projected");
        assert!(
            m.keeps(10) && m.keeps(12) && m.keeps(13) && m.keeps(25) && m.keeps(22) && m.keeps(17)
        );
        assert!(!m.keeps(23) && !m.keeps(8));
        assert!(
            m.keeps(14) && m.keeps(15) && m.keeps(26),
            "always-written fields"
        );
        let none = MetricMask::parse("");
        assert!(MASKABLE.iter().all(|f| !none.keeps(*f)));
    }

    #[test]
    fn masked_fields_are_zero_and_absent_on_the_wire() {
        let mut r = StatusReporter::new(
            "i".into(),
            limits(false),
            MetricMask::parse("num_requests"),
            Duration::from_secs(30),
        );
        let t0 = Instant::now();
        r.accept(engine_status(), t0);
        assert_eq!(
            r.tick(true, t0, 1000, &MigrationLoad::default()),
            Tick::Fresh
        );
        let s = InstanceStatus::decode(r.encoded()).unwrap();
        assert_eq!(s.scheduler_running_to_decode_tokens_num, 0);
        assert_eq!((s.num_running_requests, s.num_waiting_requests), (3, 2));
        let mut unmasked = s.clone();
        unmasked.scheduler_running_to_decode_tokens_num = 77;
        assert!(unmasked.encoded_len() > s.encoded_len());
    }

    #[test]
    fn completion_sets_identity_time_and_capacity() {
        let mut r = StatusReporter::new(
            "me".into(),
            limits(true),
            MetricMask::ALL,
            Duration::from_secs(30),
        );
        let t0 = Instant::now();
        r.accept(engine_status(), t0);
        let local = MigrationLoad {
            out_reqs: 2,
            out_tokens: 100,
            ..Default::default()
        };
        r.tick(true, t0, 5000, &local);
        let s = InstanceStatus::decode(r.encoded()).unwrap();
        assert_eq!(s.instance_id, "me");
        assert_eq!(s.timestamp_ms, 5000);
        assert!(s.schedulable);
        assert_eq!(s.update_id, 7, "update_id passes through");
        assert_eq!(s.num_migrate_out_reqs, 2, "max(engine 1, local 2)");
        assert_eq!(s.num_available_migrate_out_slots, 1);
        assert_eq!(s.num_available_migrate_in_slots, 2);
        assert_eq!(
            s.num_available_migrate_out_tokens, 1500,
            "2000 - max(500, 100)"
        );
        assert!((s.available_kv_cache_usage_ratio_migrate_out - 0.3).abs() < 1e-9);
        assert!((s.available_kv_cache_usage_ratio_migrate_in - 0.3).abs() < 1e-9);
        // The llumlet's migration ends: the next (repeated) tick shows the engine's count again.
        r.tick(false, t0, 5001, &MigrationLoad::default());
        let s = InstanceStatus::decode(r.encoded()).unwrap();
        assert_eq!(
            (s.num_migrate_out_reqs, s.num_available_migrate_out_slots),
            (1, 2)
        );
    }

    #[test]
    fn timestamps_strictly_increase_when_the_clock_steps_back() {
        let mut r = StatusReporter::new(
            "me".into(),
            limits(false),
            MetricMask::ALL,
            Duration::from_secs(30),
        );
        let t0 = Instant::now();
        r.accept(engine_status(), t0);
        let mut seen = Vec::new();
        for wall in [1000, 1000, 900, 1001, 5000, 10] {
            r.tick(false, t0, wall, &MigrationLoad::default());
            seen.push(InstanceStatus::decode(r.encoded()).unwrap().timestamp_ms);
        }
        assert_eq!(seen, vec![1000, 1001, 1002, 1003, 5000, 5001]);
    }

    #[test]
    fn silent_engine_is_unschedulable_until_a_fresh_status() {
        let timeout = Duration::from_secs(2);
        let mut r = StatusReporter::new("me".into(), limits(false), MetricMask::ALL, timeout);
        let t0 = Instant::now();
        let none = MigrationLoad::default();
        assert_eq!(r.tick(false, t0, 1, &none), Tick::NoStatus);
        r.accept(engine_status(), t0);
        assert_eq!(r.tick(true, t0, 2, &none), Tick::Fresh);
        assert_eq!(
            r.tick(false, t0 + Duration::from_secs(1), 3, &none),
            Tick::Repeated
        );
        assert_eq!(r.tick(false, t0 + timeout, 4, &none), Tick::EngineSilent);
        let s = InstanceStatus::decode(r.encoded()).unwrap();
        assert!(!s.schedulable);
        assert_eq!(s.update_id, 7, "unschedulable report keeps update_id");
        assert_eq!(s.timestamp_ms, 4);
        r.accept(engine_status(), t0 + timeout);
        assert_eq!(r.tick(true, t0 + timeout, 5, &none), Tick::Fresh);
        assert!(InstanceStatus::decode(r.encoded()).unwrap().schedulable);
    }

    #[test]
    fn pushed_status_keeps_only_the_newest() {
        let p = PushedStatus::default();
        for i in 0..1000 {
            p.push(InstanceStatus {
                update_id: i,
                ..Default::default()
            });
        }
        assert_eq!(p.take_newest().map(|s| s.update_id), Some(999));
        assert_eq!(p.take_newest(), None);
        assert_eq!(p.pushes(), 1000);
    }

    #[test]
    fn migration_disabled_leaves_capacity_at_zero() {
        let mut l = limits(true);
        l.enabled = false;
        let mut s = engine_status();
        complete(
            &mut s,
            &l,
            &MigrationLoad::of(&engine_status()),
            &MigrationLoad {
                out_reqs: 5,
                ..Default::default()
            },
            1,
        );
        assert_eq!(s.num_available_migrate_out_slots, 0);
        assert_eq!(s.num_migrate_out_reqs, 1);
    }
}
