//! Why a migration did not move its request: one typed reason per way it can end short. Its
//! `Display` is the text that goes in `Abort.reason`, the logs and the `Migrate` error; its
//! [`Reason::label`] is a bounded name for the metrics.

/// Which step of an engine's part in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineStep {
    /// The source engine marks the request for migration.
    Begin,
    /// The source engine suspends the request.
    Suspend,
    /// The destination engine reserves blocks.
    Reserve,
    /// The destination engine commits the request in.
    Commit,
}

/// Which answer of the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStep {
    /// `Reserved`.
    Reservation,
    /// `StageAck` of this stage.
    Stage(u32),
    /// `Committed`.
    Commit,
}

/// Why a destination refused a migration when it began.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The destination llumlet has no engine attached.
    NoEngine,
    /// The llumlet has not finished starting (no migration slots yet).
    Starting,
    /// The engine still holds reservations of a previous llumlet, not freed yet.
    OrphansRemain,
    /// A GPU KV cache from another host (CUDA IPC needs both engines on one host).
    GpuAcrossHosts,
    /// The source's KV cache is on the GPU and this engine's is not.
    NoGpuRegions,
    /// This engine's KV cache cannot be read or mapped here.
    Cache(String),
    /// The two KV caches' block layouts differ.
    Layout(String),
    /// The request id is empty or too long.
    BadRequestId(String),
    /// No migrate-in slot or not enough free KV tokens.
    NoSlot(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoEngine => f.write_str("the destination has no engine attached"),
            Refusal::Starting => f.write_str("the destination llumlet is still starting"),
            Refusal::OrphansRemain => {
                f.write_str("the destination engine still holds reservations of a previous llumlet")
            }
            Refusal::GpuAcrossHosts => f.write_str(
                "a GPU KV cache moves over CUDA IPC, which needs both engines on one host",
            ),
            Refusal::NoGpuRegions => f.write_str("the destination engine has no GPU KV regions"),
            Refusal::Cache(e) | Refusal::Layout(e) => f.write_str(e),
            Refusal::BadRequestId(id) => write!(f, "bad request id {id:?}"),
            Refusal::NoSlot(e) => write!(f, "{e} (destination)"),
        }
    }
}

/// Why a migration ended without moving its request (or, in doubt, without knowing).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The llumlet has no engine attached.
    NoEngine,
    /// The source cannot read its own engine's KV cache.
    SourceCache(String),
    /// An engine answered "not ok" (or not at all) at a step.
    EngineRefused(EngineStep),
    /// The request left the source engine (finished or aborted) before it could move.
    RequestGone,
    /// The source engine's serialized state of the suspended request is missing or unreadable.
    StateUnreadable,
    /// The destination's reservation could not be read back from its engine.
    ReservationUnreadable,
    /// The destination refused the migration when it began.
    DestinationRefused(Refusal),
    /// The destination answered "not ok" at a step (its message).
    PeerRefused(PeerStep, String),
    /// The destination reserved fewer blocks than asked.
    ShortReservation,
    /// The transport failed to copy a stage (or could not be set up).
    Copy(String),
    /// A data frame the destination could not apply.
    Sink(String),
    /// The source aborted (its reason).
    SourceAborted(String),
    /// The transfer connection to the destination was lost.
    LostDestination(String),
    /// The transfer connection to the source was lost.
    LostSource(String),
    /// A resolver fenced the migration before it committed.
    Fenced,
    /// The commit's acknowledgement was lost and the destination reports it aborted.
    CommitLostAborted,
    /// In doubt: the commit was sent and no answer could be had after this many attempts.
    Unresolved {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A message or event the protocol does not allow here.
    Protocol(String),
    /// The destination's address does not resolve.
    BadDestination(String),
    /// A migration's thread or task failed (a bug: it panicked).
    Internal(String),
}

impl Reason {
    /// Every label, for the metrics.
    pub const LABELS: [&'static str; 20] = [
        "no_engine",
        "source_cache",
        "engine_refused",
        "request_gone",
        "state_unreadable",
        "reservation_unreadable",
        "destination_refused",
        "peer_refused",
        "short_reservation",
        "copy",
        "sink",
        "source_aborted",
        "lost_destination",
        "lost_source",
        "fenced",
        "commit_lost_aborted",
        "unresolved",
        "protocol",
        "bad_destination",
        "internal",
    ];

    /// The reason's index in [`Reason::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            Reason::NoEngine => 0,
            Reason::SourceCache(_) => 1,
            Reason::EngineRefused(_) => 2,
            Reason::RequestGone => 3,
            Reason::StateUnreadable => 4,
            Reason::ReservationUnreadable => 5,
            Reason::DestinationRefused(_) => 6,
            Reason::PeerRefused(..) => 7,
            Reason::ShortReservation => 8,
            Reason::Copy(_) => 9,
            Reason::Sink(_) => 10,
            Reason::SourceAborted(_) => 11,
            Reason::LostDestination(_) => 12,
            Reason::LostSource(_) => 13,
            Reason::Fenced => 14,
            Reason::CommitLostAborted => 15,
            Reason::Unresolved { .. } => 16,
            Reason::Protocol(_) => 17,
            Reason::BadDestination(_) => 18,
            Reason::Internal(_) => 19,
        }
    }

    /// A bounded name for the metrics' `reason` label.
    pub fn label(&self) -> &'static str {
        Reason::LABELS[self.index()]
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NoEngine => f.write_str("no engine attached to this llumlet"),
            Reason::SourceCache(e) => write!(f, "cannot map this engine's KV cache: {e}"),
            Reason::EngineRefused(EngineStep::Begin) => {
                f.write_str("the source engine did not start the migration")
            }
            Reason::EngineRefused(EngineStep::Suspend) => {
                f.write_str("the source engine did not suspend the request")
            }
            Reason::EngineRefused(EngineStep::Reserve) => {
                f.write_str("the destination engine could not reserve the blocks")
            }
            Reason::EngineRefused(EngineStep::Commit) => {
                f.write_str("the destination engine refused the commit")
            }
            Reason::RequestGone => {
                f.write_str("the request left the source engine (finished or aborted)")
            }
            Reason::StateUnreadable => f.write_str("the suspended request's state is unreadable"),
            Reason::ReservationUnreadable => f.write_str("the reservation is unreadable"),
            Reason::DestinationRefused(r) => r.fmt(f),
            Reason::PeerRefused(PeerStep::Reservation, e) => {
                write!(f, "the destination refused the reservation: {e}")
            }
            Reason::PeerRefused(PeerStep::Stage(n), e) => {
                write!(f, "the destination did not apply stage {n}: {e}")
            }
            Reason::PeerRefused(PeerStep::Commit, e) => {
                write!(f, "the destination refused the commit: {e}")
            }
            Reason::ShortReservation => {
                f.write_str("the destination reserved fewer blocks than asked")
            }
            Reason::Copy(e) => write!(f, "copy failed: {e}"),
            Reason::Sink(e) => f.write_str(e),
            Reason::SourceAborted(e) => write!(f, "the source aborted: {e}"),
            Reason::LostDestination(e) => write!(f, "lost the destination: {e}"),
            Reason::LostSource(e) => write!(f, "lost the source: {e}"),
            Reason::Fenced => f.write_str("fenced by a resolver"),
            Reason::CommitLostAborted => f.write_str(
                "the commit's acknowledgement was lost; the destination reports it aborted",
            ),
            Reason::Unresolved { attempts, last } => write!(
                f,
                "commit sent, outcome unknown after {attempts} attempts: {last}"
            ),
            Reason::Protocol(e) => write!(f, "protocol error: {e}"),
            Reason::BadDestination(e) => write!(f, "destination {e}"),
            Reason::Internal(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Reason {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_each_reason_names_its_own() {
        let samples = [
            Reason::NoEngine,
            Reason::SourceCache(String::new()),
            Reason::EngineRefused(EngineStep::Begin),
            Reason::RequestGone,
            Reason::StateUnreadable,
            Reason::ReservationUnreadable,
            Reason::DestinationRefused(Refusal::Starting),
            Reason::PeerRefused(PeerStep::Commit, String::new()),
            Reason::ShortReservation,
            Reason::Copy(String::new()),
            Reason::Sink(String::new()),
            Reason::SourceAborted(String::new()),
            Reason::LostDestination(String::new()),
            Reason::LostSource(String::new()),
            Reason::Fenced,
            Reason::CommitLostAborted,
            Reason::Unresolved {
                attempts: 1,
                last: String::new(),
            },
            Reason::Protocol(String::new()),
            Reason::BadDestination(String::new()),
            Reason::Internal(String::new()),
        ];
        assert_eq!(samples.len(), Reason::LABELS.len());
        for (i, r) in samples.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        let mut labels = Reason::LABELS.to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::LABELS.len());
    }

    #[test]
    fn the_text_is_what_the_peer_and_the_logs_read() {
        assert_eq!(
            Reason::PeerRefused(PeerStep::Stage(2), "bad frame".into()).to_string(),
            "the destination did not apply stage 2: bad frame"
        );
        assert_eq!(
            Reason::Unresolved {
                attempts: 3,
                last: "timeout".into()
            }
            .to_string(),
            "commit sent, outcome unknown after 3 attempts: timeout"
        );
    }
}
