//! Fault injection for the process-level fault tests: `LLUMLET_TEST_FAULTS` names protocol
//! points and what happens there, e.g. `src-after-suspend=kill` or `dst-before-commit=hang@2`
//! (the second time the point is reached). Unset, every check is one atomic load of a parsed,
//! empty list. Not for production use; `docs/migration.md` lists the points.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable.
pub const VAR: &str = "LLUMLET_TEST_FAULTS";

/// The points a fault can be placed at; [`Point::name`] is how `LLUMLET_TEST_FAULTS` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Source llumlet: the engine marked the request for migration.
    SrcAfterBegin,
    /// Source llumlet: the first stage was copied.
    SrcAfterStage0,
    /// Source llumlet: the engine suspended the request.
    SrcAfterSuspend,
    /// Source llumlet: the journal says `committing`, `Commit` not sent yet.
    SrcBeforeCommit,
    /// Source llumlet: `Commit` sent.
    SrcAfterCommit,
    /// Source llumlet: the destination committed, the source engine not told yet.
    SrcAfterCommitted,
    /// Destination llumlet: the engine reserved the blocks.
    DstAfterReserve,
    /// Destination llumlet: about to ask the engine to commit.
    DstBeforeCommit,
    /// Destination llumlet: the engine committed.
    DstAfterCommit,
    /// Simulated engine: a migrate-out begin arrives.
    EngineBegin,
    /// Simulated engine: a suspend arrives.
    EngineSuspend,
    /// Simulated engine: a reservation arrives.
    EngineReserve,
    /// Simulated engine: a migrate-in commit arrives.
    EngineCommitIn,
}

impl Point {
    /// Every point, in protocol order.
    pub const ALL: [Point; 13] = [
        Point::SrcAfterBegin,
        Point::SrcAfterStage0,
        Point::SrcAfterSuspend,
        Point::SrcBeforeCommit,
        Point::SrcAfterCommit,
        Point::SrcAfterCommitted,
        Point::DstAfterReserve,
        Point::DstBeforeCommit,
        Point::DstAfterCommit,
        Point::EngineBegin,
        Point::EngineSuspend,
        Point::EngineReserve,
        Point::EngineCommitIn,
    ];

    /// The point's name in `LLUMLET_TEST_FAULTS` (and docs/migration.md).
    pub fn name(self) -> &'static str {
        match self {
            Point::SrcAfterBegin => "src-after-begin",
            Point::SrcAfterStage0 => "src-after-stage0",
            Point::SrcAfterSuspend => "src-after-suspend",
            Point::SrcBeforeCommit => "src-before-commit",
            Point::SrcAfterCommit => "src-after-commit",
            Point::SrcAfterCommitted => "src-after-committed",
            Point::DstAfterReserve => "dst-after-reserve",
            Point::DstBeforeCommit => "dst-before-commit",
            Point::DstAfterCommit => "dst-after-commit",
            Point::EngineBegin => "engine-begin",
            Point::EngineSuspend => "engine-suspend",
            Point::EngineReserve => "engine-reserve",
            Point::EngineCommitIn => "engine-commit-in",
        }
    }
}

/// What happens at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The process dies at once (abort: no clean-up, no destructors run).
    Kill,
    /// The thread stalls for [`HANG`] (longer than any protocol step may wait).
    Hang,
    /// The thread stalls for [`PAUSE`] (less than a protocol step may wait): time for a test to
    /// cut the network at this point, after which the step goes on into the cut.
    Pause,
    /// The transfer connection is shut down.
    Cut,
    /// The engine answers "not ok".
    Refuse,
}

/// How long [`Action::Hang`] stalls.
pub const HANG: Duration = Duration::from_secs(12);
/// How long [`Action::Pause`] stalls.
pub const PAUSE: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Fault {
    point: Point,
    action: Action,
    nth: u32,
    seen: AtomicU32,
}

static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();

/// Parses a fault list (`point=action[@n],...`).
fn parse(s: &str) -> Result<Vec<Fault>, String> {
    let mut v = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (point, rest) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected point=action[@n]"))?;
        let point = Point::ALL
            .into_iter()
            .find(|p| p.name() == point)
            .ok_or_else(|| {
                let names: Vec<&str> = Point::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "{point:?} is not a fault point (one of {})",
                    names.join(", ")
                )
            })?;
        let (action, nth) = match rest.split_once('@') {
            Some((a, n)) => (
                a,
                n.parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("{item:?}: @n must be a whole number from 1"))?,
            ),
            None => (rest, 1),
        };
        let action = match action {
            "kill" => Action::Kill,
            "hang" => Action::Hang,
            "pause" => Action::Pause,
            "cut" => Action::Cut,
            "refuse" => Action::Refuse,
            other => {
                return Err(format!(
                    "{other:?} is not a fault action (kill, hang, pause, cut, refuse)"
                ))
            }
        };
        v.push(Fault {
            point,
            action,
            nth,
            seen: AtomicU32::new(0),
        });
    }
    Ok(v)
}

/// Reads `LLUMLET_TEST_FAULTS` once; a malformed list is an error naming the rule.
pub fn init() -> Result<(), String> {
    let list = match std::env::var(VAR) {
        Ok(s) => parse(&s).map_err(|e| format!("{VAR}: {e}"))?,
        Err(_) => Vec::new(),
    };
    if !list.is_empty() {
        eprintln!(
            "llumlet: fault injection armed: {}",
            std::env::var(VAR).unwrap_or_default()
        );
    }
    let _ = FAULTS.set(list);
    Ok(())
}

/// The fault armed at `point` for this pass, if any. `Kill`, `Hang` and `Pause` are carried out here;
/// the caller carries out `Cut` and `Refuse`.
pub fn at(point: Point) -> Option<Action> {
    let f = FAULTS
        .get()?
        .iter()
        .find(|f| f.point == point && f.seen.fetch_add(1, Ordering::Relaxed) + 1 == f.nth)?;
    eprintln!("llumlet: injected fault {:?} at {}", f.action, point.name());
    match f.action {
        Action::Kill => std::process::abort(),
        Action::Hang => {
            std::thread::sleep(HANG);
            None
        }
        Action::Pause => {
            std::thread::sleep(PAUSE);
            None
        }
        a => Some(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_bad_ones_name_the_rule() {
        let v = parse("src-after-suspend=kill, dst-before-commit=hang@2").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[1].action, v[1].nth), (Action::Hang, 2));
        assert_eq!(v[1].point, Point::DstBeforeCommit);
        for p in Point::ALL {
            let named = parse(&format!("{}=cut", p.name())).unwrap();
            assert_eq!(named[0].point, p, "every point parses back from its name");
        }
        assert!(parse("nowhere=kill")
            .unwrap_err()
            .contains("not a fault point"));
        assert!(parse("src-after-begin=explode")
            .unwrap_err()
            .contains("not a fault action"));
        assert!(parse("src-after-begin=cut@0").unwrap_err().contains("@n"));
        assert!(parse("src-after-begin")
            .unwrap_err()
            .contains("point=action"));
        assert!(parse("").unwrap().is_empty());
    }
}
