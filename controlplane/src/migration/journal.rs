//! The source's migration journal: one small file per migration out, beside the engine's
//! mailboxes (`<segment>-mig-<id>.out`), so that a llumlet that dies mid-migration (or gives up
//! on an in-doubt commit) leaves enough behind to settle the request later:
//!
//! - `open`: written before the engine is told to begin. The `Commit` has not been sent, so
//!   the destination cannot have committed: recovery aborts at the source engine (the request
//!   resumes there).
//! - `committing`: written before `Commit` is sent. The destination may have committed:
//!   recovery asks it (`Resolve`, which fences a migration it has not committed) and commits
//!   or aborts at the source engine by the answer, retrying while there is no answer. It never
//!   guesses.
//! - `in-doubt`: the live migration could not resolve; recovery takes over as for `committing`.
//!
//! The llumlet runs [`recover`] in the background: it settles every journal whose owner is dead
//! or which is in doubt.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use llumlet_dataplane::command::Command;
use llumlet_dataplane::mailbox;

use llumlet_proto::migration::resolution::Outcome as Res;

use super::auth::TransferKey;
use super::link::{Calls, EngineLink};
use super::STEP_TIMEOUT;

/// How long a destination keeps the record of a commit for a source to `Resolve` (a source
/// resolves within minutes).
const IN_RECORD_EXPIRY: Duration = Duration::from_secs(3600);
/// How often the destination looks for expired records.
const EXPIRY_SCAN_EVERY: Duration = Duration::from_secs(60);

/// Where a migration out stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Commit not sent yet.
    Open,
    /// Commit (maybe) sent.
    Committing,
    /// The live migration gave up resolving.
    InDoubt,
    /// Committed and settled here; the destination's record of it still to retire (a `Retire`
    /// that could not reach the destination is tried again).
    Retiring,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Open => "open",
            Phase::Committing => "committing",
            Phase::InDoubt => "in-doubt",
            Phase::Retiring => "retiring",
        }
    }
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The phase.
    pub phase: Phase,
    /// The migration id (also the engine command id).
    pub migration: u64,
    /// The request's table slot at the source.
    pub slot: u32,
    /// The request id.
    pub request_id: String,
    /// The destination's transfer endpoint.
    pub dst: SocketAddr,
    /// The llumlet process that wrote it.
    pub owner: u32,
}

/// The journal file of migration `id` of the engine whose segment is at `segment`.
pub fn path(segment: &Path, id: u64) -> PathBuf {
    let mut p = mailbox::path(segment, id).into_os_string();
    p.push(".out");
    PathBuf::from(p)
}

impl Entry {
    /// Writes the entry ([`mailbox::write_atomic`]).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n",
            self.phase.name(),
            self.migration,
            self.slot,
            self.dst,
            self.owner,
            self.request_id
        );
        mailbox::write_atomic(path, text.as_bytes(), 0o600)
    }

    /// Reads an entry; a malformed file is an error naming what is wrong.
    pub fn read(path: &Path) -> Result<Entry, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut l = text.splitn(6, '\n');
        let mut next = |what: &str| l.next().ok_or(format!("missing {what}"));
        let phase = match next("phase")? {
            "open" => Phase::Open,
            "committing" => Phase::Committing,
            "in-doubt" => Phase::InDoubt,
            "retiring" => Phase::Retiring,
            other => return Err(format!("unknown phase {other:?}")),
        };
        let migration = next("migration")?.parse().map_err(|_| "bad migration id")?;
        let slot = next("slot")?.parse().map_err(|_| "bad slot")?;
        let dst = next("destination")?
            .parse()
            .map_err(|_| "bad destination")?;
        let owner = next("owner")?.parse().map_err(|_| "bad owner")?;
        let rest = next("request id")?;
        let request_id = rest.strip_suffix('\n').unwrap_or(rest).to_string();
        Ok(Entry {
            phase,
            migration,
            slot,
            request_id,
            dst,
            owner,
        })
    }
}

/// The destination's record of a migration in whose commit reached (or may have reached) its
/// engine: `<segment>-mig-<local id>.in`. It outlives the llumlet, so that a source asking
/// after a restart (`Resolve`) gets the truth even when the request has since finished here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InEntry {
    /// `true`: the engine committed; `false`: the commit was sent, answer unknown.
    pub committed: bool,
    /// The source's migration id.
    pub migration: u64,
    /// The id the destination used with its engine.
    pub local: u64,
    /// The request (empty in a record of a llumlet before 2026-12-02).
    pub request_id: String,
}

/// The destination's record of the source's migration `migration` of request `request_id` into
/// the engine at `segment`: named by what a `Resolve` carries, so a lookup opens one file.
pub fn in_path(segment: &Path, migration: u64, request_id: &str) -> PathBuf {
    let id = request_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut p = segment.as_os_str().to_os_string();
    p.push(format!("-mig-in-{migration}-{id:016x}.in"));
    PathBuf::from(p)
}

impl InEntry {
    /// Writes the record ([`mailbox::write_atomic`]).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let phase = if self.committed {
            "committed"
        } else {
            "committing"
        };
        let text = format!(
            "{phase}\n{}\n{}\n{}",
            self.migration, self.local, self.request_id
        );
        mailbox::write_atomic(path, text.as_bytes(), 0o600)
    }

    /// Reads a record.
    pub fn read(path: &Path) -> Result<InEntry, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut l = text.splitn(4, '\n');
        let committed = match l.next() {
            Some("committed") => true,
            Some("committing") => false,
            other => return Err(format!("unknown phase {other:?}")),
        };
        let mut num = |what: &str| -> Result<u64, String> {
            l.next()
                .and_then(|x| x.parse().ok())
                .ok_or(format!("bad {what}"))
        };
        let migration = num("migration id")?;
        let local = num("local id")?;
        Ok(InEntry {
            committed,
            migration,
            local,
            request_id: l.next().unwrap_or("").to_string(),
        })
    }
}

/// The destination's record of source migration `migration` of `request_id`, if it has one.
pub fn find_in(segment: &Path, migration: u64, request_id: &str) -> Option<(PathBuf, InEntry)> {
    let p = in_path(segment, migration, request_id);
    if let Ok(e) = InEntry::read(&p) {
        return (e.migration == migration && e.request_id == request_id).then_some((p, e));
    }
    // A record written under the earlier naming (`-mig-<local id>.in`, before 2026-12-02) is
    // still the truth for a source resolving across an upgrade: looked for only on a miss.
    files(segment, ".in")
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("-mig-in-"))
        })
        .filter_map(|p| InEntry::read(&p).ok().map(|e| (p, e)))
        .find(|(_, e)| e.migration == migration)
}

/// Removes destination records older than `age` (a source resolves within minutes).
pub fn expire_in(segment: &Path, age: Duration) {
    for p in files(segment, ".in") {
        let old = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|e| e > age);
        if old {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Every journal file of the engine whose segment is at `segment`.
pub fn list(segment: &Path) -> Vec<PathBuf> {
    files(segment, ".out")
}

fn files(segment: &Path, suffix: &str) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (segment.parent(), segment.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}-mig-", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(suffix))
        })
        .collect()
}

/// Settles one journal entry: whether it committed, once it is settled (the file can go).
fn settle(link: &Arc<EngineLink>, key: &TransferKey, e: &Entry) -> Option<bool> {
    let verdict = match e.phase {
        Phase::Open => false,
        Phase::Retiring => return Some(true),
        Phase::Committing | Phase::InDoubt => {
            let answer = super::wire::resolve(e.dst, key, e.migration, &e.request_id)
                .ok()
                .and_then(|r| Res::try_from(r.outcome).ok());
            match answer {
                Some(Res::Committed) => true,
                Some(Res::Aborted) => false,
                other => {
                    tracing::warn!(migration = e.migration, request = %e.request_id, answer = ?other,
                        "cannot resolve a journaled migration yet; will retry");
                    return None;
                }
            }
        }
    };
    let cmd = if verdict {
        Command::MigrateOutCommit {
            migration: e.migration,
            slot: e.slot,
        }
    } else {
        Command::MigrateOutAbort {
            migration: e.migration,
            slot: e.slot,
        }
    };
    let mut calls = Calls::new(Arc::clone(link), e.migration, STEP_TIMEOUT);
    match calls.call(cmd) {
        // "Not ok": the engine no longer has that migration (it restarted, or the live path
        // settled it first). Either way nothing is left to do.
        Ok(_) => {
            tracing::info!(migration = e.migration, request = %e.request_id,
                committed = verdict, "settled a journaled migration");
            mailbox::remove(&mailbox::path(link.path(), e.migration));
            Some(verdict)
        }
        Err(err) => {
            tracing::warn!(migration = e.migration, error = %err, "cannot settle a journaled migration yet; will retry");
            None
        }
    }
}

/// One pass: settles every journal that is in doubt or whose owner is gone (with `open_only`,
/// only those whose commit was never sent: no network, just the engine).
pub fn recover_once(link: &Arc<EngineLink>, key: &TransferKey, open_only: bool) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = crate::sync::lock(&ONE_AT_A_TIME);
    if link.segment().is_none() {
        return;
    }
    // Records are retired by their sources (on the migration's connection, or on one of their
    // own after settling through `Resolve`); the few left (a source that died for good) expire
    // by age, looked for once a minute.
    static EXPIRED_AT: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut at = crate::sync::lock(&EXPIRED_AT);
        if at.is_none_or(|t| t.elapsed() >= EXPIRY_SCAN_EVERY) {
            *at = Some(std::time::Instant::now());
            expire_in(link.path(), IN_RECORD_EXPIRY);
        }
    }
    let me = std::process::id();
    for p in list(link.path()) {
        let e = match Entry::read(&p) {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(path = %p.display(), error = %err, "unreadable migration journal");
                continue;
            }
        };
        let owner_alive = e.owner == me || llumlet_dataplane::sys::pid_alive(e.owner);
        let settled_here = matches!(e.phase, Phase::InDoubt | Phase::Retiring);
        if (!settled_here && owner_alive) || (open_only && e.phase != Phase::Open) {
            continue;
        }
        if let Some(committed) = settle(link, key, &e) {
            if committed && e.phase != Phase::Open {
                // Nothing will ask the destination about it again: its record of the commit
                // can go now. A destination that cannot be reached (restarting, say) is asked
                // again at the next pass, until its record would have expired by age anyway.
                retire_or_keep(&p, &e, key);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// Retires the destination's record of committed migration `e` and removes its journal `p`; if
/// the destination cannot be reached, keeps the journal as [`Phase::Retiring`] for the next
/// recovery pass, unless the record has expired by now.
pub fn retire_or_keep(p: &Path, e: &Entry, key: &TransferKey) {
    match super::wire::retire(e.dst, key, e.migration, &e.request_id) {
        Ok(()) => {
            let _ = std::fs::remove_file(p);
        }
        Err(err) => {
            let age = std::fs::metadata(p)
                .and_then(|m| m.created().or_else(|_| m.modified()))
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age >= IN_RECORD_EXPIRY {
                let _ = std::fs::remove_file(p);
                return;
            }
            tracing::debug!(migration = e.migration, error = %err, "cannot retire the destination's record yet; will retry");
            if e.phase != Phase::Retiring {
                let mut again = e.clone();
                again.phase = Phase::Retiring;
                if let Err(err) = again.write(p) {
                    tracing::warn!(path = %p.display(), error = %err, "cannot write the migration journal");
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

/// Every `every`, for the life of the process: runs `sweep` (the transfer endpoint frees the
/// reservations a previous llumlet left at this engine,
/// [`super::endpoint::TransferServer::sweep_orphans`]) and settles journals ([`recover_once`]).
pub fn spawn_recovery(
    link: Arc<EngineLink>,
    key: TransferKey,
    sweep: impl Fn() -> bool + Send + 'static,
    every: Duration,
) {
    let _ = std::thread::Builder::new()
        .name("llumlet-recovery".into())
        .spawn(move || loop {
            let _ = sweep();
            recover_once(&link, &key, false);
            std::thread::sleep(every);
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use llumlet_proto::migration::envelope::Msg;

    #[test]
    fn entries_round_trip_and_bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("llumlet-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seg = dir.join("llumlet-ctl-x");
        let p = path(&seg, 42);
        let e = Entry {
            phase: Phase::Committing,
            migration: 42,
            slot: 7,
            request_id: "req 1\nwith a newline".into(),
            dst: "127.0.0.1:9000".parse().unwrap(),
            owner: 1234,
        };
        e.write(&p).unwrap();
        assert_eq!(Entry::read(&p).unwrap(), e);
        assert_eq!(list(&seg), vec![p.clone()]);
        for phase in [Phase::Open, Phase::InDoubt, Phase::Retiring] {
            let other = Entry { phase, ..e.clone() };
            other.write(&p).unwrap();
            assert_eq!(Entry::read(&p).unwrap(), other);
        }
        std::fs::write(&p, "sideways\n1\n2\n").unwrap();
        assert!(Entry::read(&p).unwrap_err().contains("unknown phase"));
        std::fs::write(&p, "open\n1\n").unwrap();
        assert!(Entry::read(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `Retire` that cannot reach the destination keeps the journal, as `retiring`; once the
    /// destination answers, the journal goes.
    #[test]
    fn a_retire_that_cannot_reach_the_destination_is_kept_for_the_next_pass() {
        use crate::migration::wire;
        let dir = std::env::temp_dir().join(format!("llumlet-retire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = path(&dir.join("llumlet-ctl-x"), 5);
        // A port nothing listens on (bound, then closed).
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = dead.local_addr().unwrap();
        drop(dead);
        let e = Entry {
            phase: Phase::Committing,
            migration: 5,
            slot: 1,
            request_id: "r".into(),
            dst,
            owner: 1,
        };
        e.write(&p).unwrap();
        let key = TransferKey::from_bytes(b"0123456789abcdef0123456789abcdef");
        retire_or_keep(&p, &e, &key);
        let kept = Entry::read(&p).unwrap();
        assert_eq!(kept.phase, Phase::Retiring);
        // The destination is back: it answers `Retired`, and the journal goes.
        let listener = std::net::TcpListener::bind(dst).unwrap();
        let server_key = key.clone();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut session = crate::migration::auth::server(&mut s, &server_key).unwrap();
            let mut buf = Vec::new();
            let Ok(Msg::Retire(r)) = wire::recv_control(&mut s, &mut session, &mut buf) else {
                panic!("expected Retire")
            };
            let retired = Msg::Retired(llumlet_proto::migration::Retired {
                migration_id: r.migration_id,
            });
            wire::send(&mut s, &mut session, retired).unwrap();
        });
        retire_or_keep(&p, &kept, &key);
        t.join().unwrap();
        assert!(
            !p.exists(),
            "the journal stayed after the destination retired its record"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A destination's record is found by what a `Resolve` carries, in one file, and only for
    /// that migration of that request.
    #[test]
    fn a_record_is_found_by_its_migration_and_request_without_a_scan() {
        let dir = std::env::temp_dir().join(format!("llumlet-in-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seg = dir.join("llumlet-ctl-y");
        let e = InEntry {
            committed: true,
            migration: 42,
            local: 7,
            request_id: "req/../1".into(),
        };
        e.write(&in_path(&seg, 42, "req/../1")).unwrap();
        assert_eq!(find_in(&seg, 42, "req/../1").map(|(_, e)| e), Some(e));
        // A record of the earlier naming is still found (on a miss only).
        let mut legacy = seg.clone().into_os_string();
        legacy.push("-mig-99.in");
        std::fs::write(&legacy, "committed\n77\n99\n").unwrap();
        assert!(find_in(&seg, 77, "any").is_some_and(|(_, e)| e.committed && e.local == 99));
        assert!(find_in(&seg, 42, "req-2").is_none());
        assert!(find_in(&seg, 43, "req/../1").is_none());
        assert!(
            in_path(&seg, 42, "req/../1").starts_with(&dir),
            "ids cannot leave the directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
