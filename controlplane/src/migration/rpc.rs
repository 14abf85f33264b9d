//! What the gRPC `Migrate` call hands the migration side: its parameters (reference §3.2), the
//! slot pre-check with at-once accounting (§5.1), and the [`Migrator`] seam through which the
//! migration driver ([`super::migrator::LiveMigrator`]) moves requests.

use std::sync::{Arc, Mutex};

use llumlet_proto::llumlet::migrate_request::MigrationValue;
use llumlet_proto::llumlet::MigrateRequest;

use crate::config::MigrationLimits;
use crate::status::MigrationLoad;

/// The budget kind of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationType {
    /// A number of requests.
    NumReq,
    /// A number of tokens.
    Token,
    /// A share of the KV cache.
    Ratio,
}

impl MigrationType {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationType::NumReq => "NUM_REQ",
            MigrationType::Token => "TOKEN",
            MigrationType::Ratio => "RATIO",
        }
    }
}

/// Validated parameters of one `Migrate` call, as upstream's `MigrationParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationParams {
    /// Budget kind.
    pub migration_type: MigrationType,
    /// Request order policy (`SR`, `LR`, `FCR`, ...), passed on unvalidated as upstream.
    pub req_policy: String,
    /// Why the scheduler asked (passed on, never validated).
    pub trigger_policy: String,
    /// Requests (1 for TOKEN and RATIO, as upstream); -1 with NUM_REQ: everything (pre-stop).
    pub num_reqs: i64,
    /// Token budget (TOKEN).
    pub num_tokens: i64,
    /// KV-cache ratio budget (RATIO).
    pub kv_cache_usage_ratio: f64,
    /// The destination instance (`dst_engine_id`), looked up in the naming directory if any.
    pub dst_engine_id: String,
}

impl MigrationParams {
    /// Validates a request; the error is the exact details string of INVALID_ARGUMENT.
    pub fn from_request(r: &MigrateRequest) -> Result<MigrationParams, String> {
        let invalid = |what: String| format!("Migration failed due to invalid argument: {what}");
        let migration_type = match r.migration_type.as_str() {
            "NUM_REQ" => MigrationType::NumReq,
            "TOKEN" => MigrationType::Token,
            "RATIO" => MigrationType::Ratio,
            other => {
                return Err(invalid(format!(
                    "{} is not a valid MigrationType.",
                    crate::pyrepr::str_repr(&crate::pyrepr::clip(other, 64))
                )))
            }
        };
        let mut p = MigrationParams {
            migration_type,
            req_policy: r.migration_req_policy.clone(),
            trigger_policy: r.trigger_policy.clone(),
            num_reqs: 1,
            num_tokens: 0,
            kv_cache_usage_ratio: 0.0,
            dst_engine_id: r.dst_engine_id.clone(),
        };
        let empty = |field: &str| {
            invalid(format!(
                "Empty {field}. If migration_type is {}, {field} is necessary.",
                migration_type.as_str()
            ))
        };
        match (migration_type, r.migration_value) {
            (MigrationType::NumReq, Some(MigrationValue::NumReqs(n))) => p.num_reqs = n,
            (MigrationType::NumReq, _) => return Err(empty("num_reqs")),
            (MigrationType::Token, Some(MigrationValue::NumTokens(n))) => p.num_tokens = n,
            (MigrationType::Token, _) => return Err(empty("num_tokens")),
            (MigrationType::Ratio, Some(MigrationValue::KvCacheUsageRatio(x))) => {
                p.kv_cache_usage_ratio = f64::from(x)
            }
            (MigrationType::Ratio, _) => return Err(empty("kv_cache_usage_ratio")),
        }
        Ok(p)
    }

    /// Whether this is the pre-stop form: NUM_REQ with -1, migrate everything.
    pub fn is_prestop(&self) -> bool {
        self.migration_type == MigrationType::NumReq && self.num_reqs == -1
    }
}

/// The pre-check failed: upstream's `NotEnoughSlotsError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("No enough migrate out slots for requests")]
pub struct NotEnoughSlots;

#[derive(Debug, Default)]
struct LedgerState {
    engine: Option<MigrationLoad>,
    local: MigrationLoad,
}

/// Migration slots: the capacity the newest status leaves, minus migrations this llumlet has
/// started and not finished. A slot is taken in the same critical section that checks it, so two
/// concurrent `Migrate` calls cannot both pass on one free slot.
#[derive(Debug)]
pub struct SlotLedger {
    limits: MigrationLimits,
    state: Mutex<LedgerState>,
}

impl SlotLedger {
    /// A ledger with no status seen yet (so no slot is free, as upstream).
    pub fn new(limits: MigrationLimits) -> Arc<SlotLedger> {
        Arc::new(SlotLedger {
            limits,
            state: Mutex::new(LedgerState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        // The state is a few numbers updated in single statements: valid even after a panic.
        crate::sync::lock(&self.state)
    }

    /// Records the engine's load from its newest status.
    pub fn observe(&self, engine: MigrationLoad) {
        self.lock().engine = Some(engine);
    }

    /// The llumlet's own in-flight load, for status completion.
    pub fn local(&self) -> MigrationLoad {
        self.lock().local
    }

    /// Checks the out-slots for `p` as upstream's `migrate()` does and, if they suffice, takes
    /// them until the returned reservation is dropped.
    pub fn reserve_out(
        self: &Arc<Self>,
        p: &MigrationParams,
    ) -> Result<Reservation, NotEnoughSlots> {
        let mut st = self.lock();
        let l = &self.limits;
        // Before the first status, and with migration disabled, upstream's capacity is 0.
        let (slots, tokens, ratio) = match (l.enabled, st.engine) {
            (true, Some(e)) => (
                i64::from(l.max_req_out) - i64::from(e.out_reqs.max(st.local.out_reqs)),
                i64::from(l.max_token_out) - i64::from(e.out_tokens.max(st.local.out_tokens)),
                l.max_ratio_out - e.out_ratio.max(st.local.out_ratio),
            ),
            _ => (0, 0, 0.0),
        };
        if p.num_reqs > slots {
            return Err(NotEnoughSlots);
        }
        if l.detailed && (p.num_tokens > tokens || p.kv_cache_usage_ratio > ratio) {
            return Err(NotEnoughSlots);
        }
        let r = Reservation {
            ledger: Arc::clone(self),
            inbound: false,
            reqs: p.num_reqs.clamp(0, i64::from(i32::MAX)) as i32,
            tokens: p.num_tokens.clamp(0, i64::from(i32::MAX)) as i32,
            ratio: p.kv_cache_usage_ratio.max(0.0),
        };
        st.local.out_reqs += r.reqs;
        st.local.out_tokens = st.local.out_tokens.saturating_add(r.tokens);
        st.local.out_ratio += r.ratio;
        Ok(r)
    }

    /// Takes one in-slot for a request of `tokens` tokens migrating in, if the newest status
    /// leaves one (and, with `LLUMNIX_DETAILED_MIG_STATUS`, enough in-tokens); held until the
    /// returned reservation is dropped.
    pub fn reserve_in(self: &Arc<Self>, tokens: i64) -> Result<Reservation, NotEnoughSlots> {
        let mut st = self.lock();
        let l = &self.limits;
        let (slots, free_tokens) = match (l.enabled, st.engine) {
            (true, Some(e)) => (
                i64::from(l.max_req_in) - i64::from(e.in_reqs.max(st.local.in_reqs)),
                i64::from(l.max_token_in) - i64::from(e.in_tokens.max(st.local.in_tokens)),
            ),
            _ => (0, 0),
        };
        if slots < 1 || (l.detailed && tokens > free_tokens) {
            return Err(NotEnoughSlots);
        }
        let r = Reservation {
            ledger: Arc::clone(self),
            inbound: true,
            reqs: 1,
            tokens: tokens.clamp(0, i64::from(i32::MAX)) as i32,
            ratio: 0.0,
        };
        st.local.in_reqs += 1;
        st.local.in_tokens = st.local.in_tokens.saturating_add(r.tokens);
        Ok(r)
    }
}

/// Slots taken by one migration (out, or in); given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<SlotLedger>,
    inbound: bool,
    reqs: i32,
    tokens: i32,
    ratio: f64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.ledger.lock();
        if self.inbound {
            st.local.in_reqs -= self.reqs;
            st.local.in_tokens = st.local.in_tokens.saturating_sub(self.tokens);
            return;
        }
        st.local.out_reqs -= self.reqs;
        st.local.out_tokens = st.local.out_tokens.saturating_sub(self.tokens);
        st.local.out_ratio = (st.local.out_ratio - self.ratio).max(0.0);
    }
}

/// Why a migration could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    /// This build or configuration cannot migrate.
    #[error("{0}")]
    Unsupported(String),
    /// The migration failed.
    #[error("{0}")]
    Failed(crate::migration::reason::Reason),
}

/// Moves requests to another instance. The live-migration data plane implements this.
#[tonic::async_trait]
pub trait Migrator: Send + Sync + 'static {
    /// Migrates requests chosen by `params` to the instance whose transfer endpoint is
    /// `dst_ip:dst_port`; returns how many requests moved (0: nothing was selected).
    async fn migrate_out(
        &self,
        dst_ip: &str,
        dst_port: i32,
        params: &MigrationParams,
    ) -> Result<usize, MigrateError>;
}

/// The migrator of a build without the live-migration data plane: it moves nothing and says so.
pub struct NoMigrator;

#[tonic::async_trait]
impl Migrator for NoMigrator {
    async fn migrate_out(
        &self,
        _: &str,
        _: i32,
        _: &MigrationParams,
    ) -> Result<usize, MigrateError> {
        Err(MigrateError::Unsupported(
            "live migration is not available in this llumlet build yet (no migration data plane)"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(t: &str, v: Option<MigrationValue>) -> MigrateRequest {
        MigrateRequest {
            src_engine_id: "a".into(),
            dst_engine_id: "b".into(),
            migration_type: t.into(),
            migration_req_policy: "SR".into(),
            migration_value: v,
            ..Default::default()
        }
    }

    fn limits() -> MigrationLimits {
        MigrationLimits {
            enabled: true,
            detailed: false,
            max_req_in: 1,
            max_req_out: 2,
            max_token_in: 100,
            max_token_out: 100,
            max_ratio_in: 0.3,
            max_ratio_out: 0.3,
        }
    }

    #[test]
    fn params_follow_upstream() {
        let p = MigrationParams::from_request(&req("TOKEN", Some(MigrationValue::NumTokens(1024))))
            .unwrap();
        assert_eq!((p.num_reqs, p.num_tokens), (1, 1024));
        let p = MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumReqs(0))))
            .unwrap();
        assert_eq!(p.num_reqs, 0);
        let p = MigrationParams::from_request(&req(
            "RATIO",
            Some(MigrationValue::KvCacheUsageRatio(0.25)),
        ))
        .unwrap();
        assert_eq!(p.kv_cache_usage_ratio, 0.25);
        assert_eq!(
            MigrationParams::from_request(&req("num_req", None)).unwrap_err(),
            "Migration failed due to invalid argument: 'num_req' is not a valid MigrationType."
        );
        assert_eq!(
            MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumTokens(3)))).unwrap_err(),
            "Migration failed due to invalid argument: Empty num_reqs. If migration_type is NUM_REQ, num_reqs is necessary."
        );
    }

    #[test]
    fn in_slots_are_taken_at_once_and_given_back() {
        let ledger = SlotLedger::new(MigrationLimits {
            detailed: true,
            ..limits()
        });
        assert!(ledger.reserve_in(10).is_err(), "no status seen yet");
        ledger.observe(MigrationLoad::default());
        assert!(
            ledger.reserve_in(101).is_err(),
            "more tokens than LLUMNIX_MAX_TOKEN_MIG_IN"
        );
        let held = ledger.reserve_in(10).unwrap();
        assert_eq!((ledger.local().in_reqs, ledger.local().in_tokens), (1, 10));
        assert!(ledger.reserve_in(1).is_err(), "the only in-slot is taken");
        drop(held);
        assert_eq!((ledger.local().in_reqs, ledger.local().in_tokens), (0, 0));
        ledger.observe(MigrationLoad {
            in_reqs: 1,
            ..Default::default()
        });
        assert!(
            ledger.reserve_in(1).is_err(),
            "the engine reports its slot in use"
        );
    }

    #[test]
    fn slots_are_taken_at_once_and_given_back() {
        let ledger = SlotLedger::new(limits());
        let one = MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .unwrap();
        assert_eq!(
            ledger.reserve_out(&one).unwrap_err(),
            NotEnoughSlots,
            "no status yet"
        );
        ledger.observe(MigrationLoad::default());
        let a = ledger.reserve_out(&one).unwrap();
        let b = ledger.reserve_out(&one).unwrap();
        assert!(ledger.reserve_out(&one).is_err(), "both slots taken");
        assert_eq!(ledger.local().out_reqs, 2);
        drop(a);
        let _c = ledger.reserve_out(&one).unwrap();
        drop(b);
        let prestop =
            MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumReqs(-1))))
                .unwrap();
        assert!(prestop.is_prestop());
        let _p = ledger.reserve_out(&prestop).unwrap();
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let ledger = SlotLedger::new(limits());
        ledger.observe(MigrationLoad::default());
        let one = MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .unwrap();
        let held = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    if let Ok(r) = ledger.reserve_out(&one) {
                        held.lock().unwrap().push(r);
                    }
                });
            }
        });
        assert_eq!(held.lock().unwrap().len(), 2);
    }

    #[test]
    fn detailed_limits_and_disabled_migration() {
        let mut l = limits();
        l.detailed = true;
        let ledger = SlotLedger::new(l.clone());
        ledger.observe(MigrationLoad {
            out_tokens: 60,
            ..Default::default()
        });
        let tok = MigrationParams::from_request(&req("TOKEN", Some(MigrationValue::NumTokens(50))))
            .unwrap();
        assert!(ledger.reserve_out(&tok).is_err(), "50 > 100 - 60");
        let ratio = MigrationParams::from_request(&req(
            "RATIO",
            Some(MigrationValue::KvCacheUsageRatio(0.2)),
        ))
        .unwrap();
        let r = ledger.reserve_out(&ratio).unwrap();
        assert!(ledger.reserve_out(&ratio).is_err(), "0.2 + 0.2 > 0.3");
        drop(r);
        l.enabled = false;
        let off = SlotLedger::new(l);
        off.observe(MigrationLoad::default());
        let one = MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .unwrap();
        assert!(off.reserve_out(&one).is_err());
        let prestop =
            MigrationParams::from_request(&req("NUM_REQ", Some(MigrationValue::NumReqs(-1))))
                .unwrap();
        assert!(off.reserve_out(&prestop).is_ok());
    }
}
