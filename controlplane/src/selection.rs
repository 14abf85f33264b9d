//! Choosing the requests a `Migrate` call moves (reference §5.2-5.3), from a snapshot of the
//! engine's request table. Pure: the live-migration driver feeds it snapshots.
//!
//! Differences from upstream, on purpose: a request whose cost exceeds the *remaining* budget is
//! skipped (upstream compares with the whole budget and can overshoot it almost twice), and
//! requests still in prefill or already migrating are never chosen, pre-stop included.

use crate::migration::rpc::{MigrationParams, MigrationType};

/// A request as the selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its slot in the request table.
    pub slot: u32,
    /// Arrival order (smaller: earlier).
    pub arrival: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens so far (0: still in prefill).
    pub output_tokens: u32,
    /// Waiting (not scheduled) rather than running.
    pub waiting: bool,
    /// Already part of a migration.
    pub migrating: bool,
}

impl Candidate {
    fn tokens(&self) -> u64 {
        u64::from(self.prompt_tokens) + u64::from(self.output_tokens)
    }

    fn eligible(&self) -> bool {
        // Running requests must have finished prefill; waiting ones have no KV worth moving
        // beyond their prompt, and are eligible as upstream's FCW policies take them.
        !self.migrating && (self.waiting || self.output_tokens >= 1)
    }
}

/// The request order policy (`migration_req_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Shortest running request first.
    Sr,
    /// Longest running request first.
    Lr,
    /// First-come running request first (also any unknown or empty policy, as upstream).
    Fcr,
    /// Last-come running request first.
    Lcr,
    /// First-come waiting request first (waiting requests only).
    Fcw,
    /// First-come waiting first, then shortest running with what is left.
    Fcwsr,
}

impl Policy {
    /// Parses the wire string; unknown strings mean FCR, as upstream.
    pub fn parse(s: &str) -> Policy {
        match s {
            "SR" => Policy::Sr,
            "LR" => Policy::Lr,
            "LCR" => Policy::Lcr,
            "FCW" => Policy::Fcw,
            "FCWSR" => Policy::Fcwsr,
            _ => Policy::Fcr,
        }
    }
}

/// The budget of `p` in its own unit (requests or tokens); `total_gpu_tokens` sizes RATIO.
pub fn budget(p: &MigrationParams, total_gpu_tokens: u64) -> u64 {
    match p.migration_type {
        MigrationType::NumReq => u64::try_from(p.num_reqs).unwrap_or(0),
        MigrationType::Token => u64::try_from(p.num_tokens).unwrap_or(0),
        MigrationType::Ratio => (total_gpu_tokens as f64 * p.kv_cache_usage_ratio).max(0.0) as u64,
    }
}

fn cost(p: &MigrationParams, c: &Candidate) -> u64 {
    match p.migration_type {
        MigrationType::NumReq => 1,
        MigrationType::Token | MigrationType::Ratio => c.tokens(),
    }
}

/// Takes from `order` every eligible candidate whose cost fits the remaining budget.
fn take<'a>(
    p: &MigrationParams,
    order: impl Iterator<Item = &'a Candidate>,
    remaining: &mut u64,
    out: &mut Vec<u32>,
) {
    for c in order {
        if *remaining == 0 {
            break;
        }
        if !c.eligible() {
            continue;
        }
        let k = cost(p, c);
        if k > *remaining {
            continue;
        }
        *remaining -= k;
        out.push(c.slot);
    }
}

/// The slots to migrate for `p`, in the order chosen.
pub fn select(p: &MigrationParams, candidates: &[Candidate], total_gpu_tokens: u64) -> Vec<u32> {
    let mut running: Vec<&Candidate> = candidates.iter().filter(|c| !c.waiting).collect();
    running.sort_by_key(|c| c.arrival);
    let mut waiting: Vec<&Candidate> = candidates.iter().filter(|c| c.waiting).collect();
    waiting.sort_by_key(|c| c.arrival);
    let mut out = Vec::new();
    if p.is_prestop() {
        // Everything that can move: waiting first (they cost least), then running.
        let mut unlimited = u64::MAX;
        take(
            p,
            waiting.into_iter().chain(running),
            &mut unlimited,
            &mut out,
        );
        return out;
    }
    let mut remaining = budget(p, total_gpu_tokens);
    let by_len = |v: &mut Vec<&Candidate>| v.sort_by_key(|c| (c.tokens(), c.arrival));
    match Policy::parse(&p.req_policy) {
        Policy::Fcw => take(p, waiting.into_iter(), &mut remaining, &mut out),
        Policy::Fcwsr => {
            take(p, waiting.into_iter(), &mut remaining, &mut out);
            by_len(&mut running);
            take(p, running.into_iter(), &mut remaining, &mut out);
        }
        Policy::Sr => {
            by_len(&mut running);
            take(p, running.into_iter(), &mut remaining, &mut out);
        }
        Policy::Lr => {
            running.sort_by_key(|c| (std::cmp::Reverse(c.tokens()), c.arrival));
            take(p, running.into_iter(), &mut remaining, &mut out);
        }
        Policy::Lcr => take(p, running.into_iter().rev(), &mut remaining, &mut out),
        Policy::Fcr => take(p, running.into_iter(), &mut remaining, &mut out),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: MigrationType, policy: &str, n: i64, ratio: f64) -> MigrationParams {
        MigrationParams {
            migration_type: t,
            req_policy: policy.into(),
            trigger_policy: String::new(),
            num_reqs: if t == MigrationType::NumReq { n } else { 1 },
            num_tokens: if t == MigrationType::Token { n } else { 0 },
            kv_cache_usage_ratio: ratio,
            dst_engine_id: String::new(),
        }
    }

    /// Running: slot 1 (arrived 1, 100 tokens), 2 (2, 300), 3 (3, 200), 4 (4, in prefill),
    /// 5 (5, migrating); waiting: 6 (6, 50), 7 (7, 80).
    fn table() -> Vec<Candidate> {
        let run = |slot, arrival, prompt, output| Candidate {
            slot,
            arrival,
            prompt_tokens: prompt,
            output_tokens: output,
            waiting: false,
            migrating: false,
        };
        let mut v = vec![
            run(1, 1, 90, 10),
            run(2, 2, 290, 10),
            run(3, 3, 190, 10),
            run(4, 4, 500, 0),
        ];
        v.push(Candidate {
            migrating: true,
            ..run(5, 5, 10, 5)
        });
        v.push(Candidate {
            waiting: true,
            ..run(6, 6, 50, 0)
        });
        v.push(Candidate {
            waiting: true,
            ..run(7, 7, 80, 0)
        });
        v
    }

    #[test]
    fn orders_follow_the_policy() {
        let t = table();
        let n = |policy, k| select(&params(MigrationType::NumReq, policy, k, 0.0), &t, 0);
        assert_eq!(n("SR", 2), [1, 3]);
        assert_eq!(n("LR", 2), [2, 3]);
        assert_eq!(n("FCR", 2), [1, 2]);
        assert_eq!(
            n("LCR", 2),
            [3, 2],
            "prefill (4) and migrating (5) are skipped"
        );
        assert_eq!(n("", 1), [1], "unknown policy is FCR");
        assert_eq!(n("FCW", 5), [6, 7], "waiting only");
        assert_eq!(n("FCWSR", 3), [6, 7, 1]);
        assert_eq!(n("SR", 0), Vec::<u32>::new());
        assert_eq!(
            n("SR", -5),
            Vec::<u32>::new(),
            "negative budgets select nothing"
        );
    }

    #[test]
    fn token_budgets_never_overshoot() {
        let t = table();
        // 250 tokens: SR takes 1 (100), then 3 (200) does not fit the remaining 150 → skipped.
        assert_eq!(
            select(&params(MigrationType::Token, "SR", 250, 0.0), &t, 0),
            [1]
        );
        assert_eq!(
            select(&params(MigrationType::Token, "SR", 300, 0.0), &t, 0),
            [1, 3]
        );
        // LR: 2 (300) does not fit 250, 3 (200) does, then 1 (100) no longer fits the 50 left.
        assert_eq!(
            select(&params(MigrationType::Token, "LR", 250, 0.0), &t, 0),
            [3]
        );
        // RATIO: 10% of 4000 tokens = 400.
        assert_eq!(
            select(&params(MigrationType::Ratio, "SR", 0, 0.1), &t, 4000),
            [1, 3]
        );
        assert_eq!(
            budget(&params(MigrationType::Ratio, "SR", 0, 0.1), 4000),
            400
        );
    }

    #[test]
    fn prestop_takes_everything_that_can_move() {
        let t = table();
        assert_eq!(
            select(&params(MigrationType::NumReq, "LR", -1, 0.0), &t, 0),
            [6, 7, 1, 2, 3]
        );
    }
}
