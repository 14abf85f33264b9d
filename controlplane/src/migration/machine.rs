//! The pure state machines of one request's migration: the source's and the destination's.
//! They do no I/O and read no clock: a driver feeds them events (engine replies, peer messages,
//! copy results, timeouts) and carries out the actions they return, so a test can drive them
//! step by step and inject a fault at every step. docs/migration.md draws both.

use llumlet_dataplane::runs::{coalesce, delta_positions, BlockRun};

use super::reason::{EngineStep, PeerStep, Reason, Refusal};
use llumlet_proto::migration::{
    envelope::Msg, resolution::Outcome as Res, Abort, Begin, Commit, Committed, Envelope, Reserve,
    Reserved, StageAck, StageDone,
};

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The request runs at the destination and was freed at the source.
    Migrated,
    /// The request stayed (or was resumed) at the source; the destination holds nothing.
    Aborted(Reason),
    /// The commit was sent and its outcome could not be learned: the request stays suspended
    /// at the source (never resumed, never freed) until someone resolves it.
    InDoubt(Reason),
}

impl Outcome {
    /// Why it did not migrate (`None`: it did).
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Outcome::Migrated => None,
            Outcome::Aborted(r) | Outcome::InDoubt(r) => Some(r),
        }
    }
}

/// `Migrated`, `Aborted` or `InDoubt` (the reason is [`Outcome::reason`]).
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Migrated => "Migrated",
            Outcome::Aborted(_) => "Aborted",
            Outcome::InDoubt(_) => "InDoubt",
        })
    }
}

/// Tuning of the source.
#[derive(Debug, Clone, Copy)]
pub struct SourceTuning {
    /// Suspend once a stage copied at most this many blocks.
    pub final_delta_blocks: u32,
    /// Suspend after this many stages whatever the delta.
    pub max_stages: u32,
    /// Blocks reserved beyond the current need, so a decoding request does not need a new
    /// reservation at every stage.
    pub headroom_blocks: u32,
    /// Resolution attempts after a lost commit acknowledgement.
    pub resolve_attempts: u32,
}

impl Default for SourceTuning {
    fn default() -> Self {
        SourceTuning {
            final_delta_blocks: 2,
            max_stages: 8,
            headroom_blocks: 4,
            resolve_attempts: 20,
        }
    }
}

/// A command to the source engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEngineOp {
    /// `MigrateOutBegin`.
    Begin,
    /// `MigrateOutSuspend`.
    Suspend,
    /// `MigrateOutCommit`: free the request.
    Commit,
    /// `MigrateOutAbort`: resume the request.
    Abort,
}

/// What the source's driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceAction {
    /// Send a command to the engine and feed back its reply ([`SourceEvent::Engine`]).
    Engine(SourceEngineOp),
    /// Send a message to the destination.
    Peer(Msg),
    /// Read the request's slot in the engine's table ([`SourceEvent::Table`]).
    ReadTable,
    /// Read the suspended request's state from its mailbox ([`SourceEvent::State`]).
    ReadState,
    /// Copy these runs with the transport ([`SourceEvent::Copied`]).
    Copy(Vec<BlockRun>),
    /// (Re)connect to the destination and ask what became of the migration.
    Resolve,
    /// Finished.
    Done(Outcome),
}

/// What happened, as the source's driver saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// Begin.
    Start,
    /// The engine answered the last command (`ok: false` also for a timeout).
    Engine {
        /// Done or refused.
        ok: bool,
    },
    /// The request's block table and token count now; `None`: the request left the table.
    Table(Option<(Vec<u32>, u64)>),
    /// The suspended request's state; `None`: unreadable.
    State(Option<Vec<u8>>),
    /// The transport's result.
    Copied(Result<u64, String>),
    /// A message from the destination.
    Peer(Msg),
    /// The connection failed, closed, or the destination did not answer in time.
    PeerLost(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Idle,
    Beginning,
    Snapshot,
    Reserving,
    Copying,
    Acking,
    Suspending,
    ReadingState,
    Committing,
    Resolving,
    Finishing,
    Done,
}

/// The source's side of one request's migration.
pub struct SourceMachine {
    tuning: SourceTuning,
    migration_id: u64,
    request_id: String,
    block_tokens: u32,
    begin_template: Begin,
    state: SourceState,
    stage: u32,
    peer_open: bool,
    suspended: bool,
    commit_sent: bool,
    resolve_tries: u32,
    finish_tries: u32,
    copied: Vec<u32>,
    copied_tokens: u64,
    snapshot: (Vec<u32>, u64),
    dst_blocks: Vec<u32>,
    last_delta: usize,
    request_state: Vec<u8>,
    outcome: Option<Outcome>,
}

impl SourceMachine {
    /// A migration of `request_id`; `begin` is the handshake's `Begin` (blocks are filled in
    /// here); `block_tokens` tokens fill a block.
    pub fn new(tuning: SourceTuning, begin: Begin, block_tokens: u32) -> SourceMachine {
        SourceMachine {
            tuning,
            migration_id: begin.migration_id,
            request_id: begin.request_id.clone(),
            block_tokens,
            begin_template: begin,
            state: SourceState::Idle,
            stage: 0,
            peer_open: false,
            suspended: false,
            commit_sent: false,
            resolve_tries: 0,
            finish_tries: 0,
            copied: Vec::new(),
            copied_tokens: 0,
            snapshot: (Vec::new(), 0),
            dst_blocks: Vec::new(),
            last_delta: usize::MAX,
            request_state: Vec::new(),
            outcome: None,
        }
    }

    /// The migration's id.
    pub fn migration_id(&self) -> u64 {
        self.migration_id
    }

    /// The request.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Stages copied so far.
    pub fn stages(&self) -> u32 {
        self.stage
    }

    /// Whether the request is suspended at the source.
    pub fn suspended(&self) -> bool {
        self.suspended
    }

    /// Whether the commit was sent (from then on only the destination's answer decides).
    pub fn commit_sent(&self) -> bool {
        self.commit_sent
    }

    /// Whether it finished.
    pub fn is_done(&self) -> bool {
        self.state == SourceState::Done
    }

    fn fail(&mut self, why: Reason) -> Vec<SourceAction> {
        if self.commit_sent {
            // Past the commit only the destination knows: ask it.
            self.state = SourceState::Resolving;
            return vec![SourceAction::Resolve];
        }
        let mut a = Vec::new();
        if self.peer_open {
            a.push(SourceAction::Peer(Msg::Abort(Abort {
                reason: why.to_string(),
            })));
        }
        a.push(SourceAction::Engine(SourceEngineOp::Abort));
        self.outcome = Some(Outcome::Aborted(why));
        self.state = SourceState::Finishing;
        a
    }

    fn copy_stage(&mut self) -> Vec<SourceAction> {
        let (blocks, _) = &self.snapshot;
        let positions =
            delta_positions(&self.copied, self.copied_tokens, blocks, self.block_tokens);
        self.last_delta = positions.len();
        let mut runs = Vec::new();
        coalesce(blocks, &self.dst_blocks, positions, &mut runs);
        self.state = SourceState::Copying;
        vec![SourceAction::Copy(runs)]
    }

    fn want_blocks(&self, need: usize) -> u32 {
        let extra = if self.suspended {
            0
        } else {
            self.tuning.headroom_blocks as usize
        };
        (need + extra).min(u32::MAX as usize) as u32
    }

    /// Feeds one event; returns what to do next.
    pub fn on(&mut self, ev: SourceEvent) -> Vec<SourceAction> {
        use SourceState as S;
        match (self.state, ev) {
            (S::Done, _) => vec![],
            (S::Idle, SourceEvent::Start) => {
                self.state = S::Beginning;
                vec![SourceAction::Engine(SourceEngineOp::Begin)]
            }
            (S::Beginning, SourceEvent::Engine { ok: true }) => {
                self.state = S::Snapshot;
                vec![SourceAction::ReadTable]
            }
            (S::Beginning, SourceEvent::Engine { ok: false }) => {
                self.fail(Reason::EngineRefused(EngineStep::Begin))
            }
            (S::Snapshot, SourceEvent::Table(None)) => self.fail(Reason::RequestGone),
            (S::Snapshot, SourceEvent::Table(Some(snap))) => {
                let need = snap.0.len();
                self.snapshot = snap;
                if !self.peer_open {
                    self.peer_open = true;
                    self.state = S::Reserving;
                    let mut b = self.begin_template.clone();
                    b.blocks = self.want_blocks(need);
                    return vec![SourceAction::Peer(Msg::Begin(b))];
                }
                if need > self.dst_blocks.len() {
                    self.state = S::Reserving;
                    return vec![SourceAction::Peer(Msg::Reserve(Reserve {
                        blocks: self.want_blocks(need),
                    }))];
                }
                self.copy_stage()
            }
            (S::Reserving, SourceEvent::Peer(Msg::Reserved(r))) => {
                if !r.ok {
                    return self.fail(Reason::PeerRefused(PeerStep::Reservation, r.error));
                }
                if r.blocks.len() < self.snapshot.0.len() {
                    return self.fail(Reason::ShortReservation);
                }
                self.dst_blocks = r.blocks;
                self.copy_stage()
            }
            (S::Copying, SourceEvent::Copied(Ok(bytes))) => {
                self.copied = self.snapshot.0.clone();
                self.copied_tokens = self.snapshot.1;
                self.state = S::Acking;
                vec![SourceAction::Peer(Msg::StageDone(StageDone {
                    stage: self.stage,
                    bytes,
                }))]
            }
            (S::Copying, SourceEvent::Copied(Err(e))) => self.fail(Reason::Copy(e)),
            (S::Acking, SourceEvent::Peer(Msg::StageAck(StageAck { stage, ok, error }))) => {
                if !ok || stage != self.stage {
                    return self.fail(Reason::PeerRefused(PeerStep::Stage(self.stage), error));
                }
                self.stage += 1;
                if self.suspended {
                    self.commit_sent = true;
                    self.state = S::Committing;
                    return vec![SourceAction::Peer(Msg::Commit(Commit {
                        state: std::mem::take(&mut self.request_state),
                        blocks: self.copied.len() as u32,
                    }))];
                }
                if self.stage > 1 && self.last_delta <= self.tuning.final_delta_blocks as usize
                    || self.stage >= self.tuning.max_stages
                {
                    self.state = S::Suspending;
                    return vec![SourceAction::Engine(SourceEngineOp::Suspend)];
                }
                self.state = S::Snapshot;
                vec![SourceAction::ReadTable]
            }
            (S::Suspending, SourceEvent::Engine { ok: true }) => {
                self.state = S::ReadingState;
                vec![SourceAction::ReadState]
            }
            (S::Suspending, SourceEvent::Engine { ok: false }) => {
                self.fail(Reason::EngineRefused(EngineStep::Suspend))
            }
            (S::ReadingState, SourceEvent::State(Some(st))) => {
                self.request_state = st;
                self.suspended = true;
                self.state = S::Snapshot;
                vec![SourceAction::ReadTable]
            }
            (S::ReadingState, SourceEvent::State(None)) => self.fail(Reason::StateUnreadable),
            (S::Committing, SourceEvent::Peer(Msg::Committed(Committed { ok, error }))) => self
                .finish(if ok {
                    Outcome::Migrated
                } else {
                    Outcome::Aborted(Reason::PeerRefused(PeerStep::Commit, error))
                }),
            (S::Resolving, SourceEvent::Peer(Msg::Resolution(r))) => match r.outcome() {
                Res::Committed => self.finish(Outcome::Migrated),
                Res::Aborted => self.finish(Outcome::Aborted(Reason::CommitLostAborted)),
                Res::Unknown => self.retry_resolve("the destination does not know yet".into()),
            },
            (S::Resolving, SourceEvent::PeerLost(e)) => self.retry_resolve(e),
            (S::Finishing, SourceEvent::Engine { ok: false }) if self.finish_tries < 3 => {
                // Freeing or resuming must happen: ask again (the engine answers in order).
                self.finish_tries += 1;
                let op = if self.outcome == Some(Outcome::Migrated) {
                    SourceEngineOp::Commit
                } else {
                    SourceEngineOp::Abort
                };
                vec![SourceAction::Engine(op)]
            }
            (S::Finishing, SourceEvent::Engine { .. }) => {
                self.state = S::Done;
                vec![SourceAction::Done(
                    self.outcome.clone().unwrap_or(Outcome::Migrated),
                )]
            }
            (S::Finishing, _) => vec![],
            (_, SourceEvent::PeerLost(e)) => self.fail(Reason::LostDestination(e)),
            (state, ev) => self.fail(Reason::Protocol(format!("{ev:?} in state {state:?}"))),
        }
    }

    fn finish(&mut self, o: Outcome) -> Vec<SourceAction> {
        let op = if o == Outcome::Migrated {
            SourceEngineOp::Commit
        } else {
            SourceEngineOp::Abort
        };
        self.outcome = Some(o);
        self.state = SourceState::Finishing;
        vec![SourceAction::Engine(op)]
    }

    fn retry_resolve(&mut self, why: String) -> Vec<SourceAction> {
        self.resolve_tries += 1;
        if self.resolve_tries >= self.tuning.resolve_attempts {
            self.state = SourceState::Done;
            let o = Outcome::InDoubt(Reason::Unresolved {
                attempts: self.resolve_tries,
                last: why,
            });
            self.outcome = Some(o.clone());
            return vec![SourceAction::Done(o)];
        }
        vec![SourceAction::Resolve]
    }
}

/// A command to the destination engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestEngineOp {
    /// `ReserveBlocks` (the request id is in the mailbox): grow the reservation to this many.
    Reserve(u32),
    /// `MigrateInCommit` with this state in the mailbox.
    Commit(Vec<u8>),
    /// `MigrateInAbort`.
    Abort,
}

/// What the destination's driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum DestAction {
    /// Send a command to the engine and feed back its reply.
    Engine(DestEngineOp),
    /// Read the reservation's blocks from the engine's table ([`DestEvent::Reservation`]).
    ReadReservation,
    /// Send to the source.
    Peer(Msg),
    /// Finished (the outcome is recorded for `Resolve`).
    Done(Outcome),
}

/// What happened, as the destination's driver saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum DestEvent {
    /// The source's `Begin`, with the driver's verdict on it (`Some`: refused, why).
    Begin(Box<Begin>, Option<Refusal>),
    /// A message from the source.
    Peer(Msg),
    /// The engine answered (`ok: false` also when the engine is gone).
    Engine {
        /// Done or refused.
        ok: bool,
    },
    /// The engine did not answer in time (it may still: commands run in order).
    EngineTimeout,
    /// The reserved blocks; `None`: unreadable.
    Reservation(Option<Vec<u32>>),
    /// A data frame was refused (out of the reservation, malformed).
    SinkError(String),
    /// The connection failed or closed.
    PeerLost(String),
    /// A resolver fenced this migration: it must never commit.
    Fenced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DestState {
    Idle,
    Reserving,
    ReadingReservation,
    Open,
    Committing,
    Aborting,
    Done,
}

/// The destination's side of one request's migration.
pub struct DestMachine {
    state: DestState,
    sink_error: Option<String>,
    fenced: bool,
    reply_transport: String,
    outcome: Option<Outcome>,
    answered_commit: bool,
}

impl Default for DestMachine {
    fn default() -> Self {
        DestMachine::new()
    }
}

impl DestMachine {
    /// A machine waiting for `Begin`.
    pub fn new() -> DestMachine {
        DestMachine {
            state: DestState::Idle,
            sink_error: None,
            fenced: false,
            reply_transport: String::new(),
            outcome: None,
            answered_commit: false,
        }
    }

    /// Whether it finished.
    pub fn is_done(&self) -> bool {
        self.state == DestState::Done
    }

    /// Whether the commit reached the engine and the answer is awaited.
    pub fn committing(&self) -> bool {
        self.state == DestState::Committing
    }

    fn abort(&mut self, why: Reason, tell_peer: Option<Msg>) -> Vec<DestAction> {
        let mut a: Vec<DestAction> = tell_peer.into_iter().map(DestAction::Peer).collect();
        a.push(DestAction::Engine(DestEngineOp::Abort));
        self.outcome = Some(Outcome::Aborted(why));
        self.state = DestState::Aborting;
        a
    }

    /// Feeds one event; returns what to do next.
    pub fn on(&mut self, ev: DestEvent) -> Vec<DestAction> {
        use DestState as S;
        match (self.state, ev) {
            (S::Done, _) => vec![],
            (_, DestEvent::Fenced) if self.state != S::Committing => {
                self.fenced = true;
                if matches!(self.state, S::Open | S::Idle) {
                    return self.abort(Reason::Fenced, None);
                }
                vec![]
            }
            (S::Committing, DestEvent::Fenced) => vec![],
            (S::Idle, DestEvent::Begin(b, refusal)) => {
                if let Some(why) = refusal {
                    let why = Reason::DestinationRefused(why);
                    self.state = S::Done;
                    self.outcome = Some(Outcome::Aborted(why.clone()));
                    return vec![
                        DestAction::Peer(Msg::Reserved(Reserved {
                            ok: false,
                            error: why.to_string(),
                            ..Default::default()
                        })),
                        DestAction::Done(Outcome::Aborted(why)),
                    ];
                }
                self.reply_transport = b.transport.clone();
                self.state = S::Reserving;
                vec![DestAction::Engine(DestEngineOp::Reserve(b.blocks))]
            }
            (S::Reserving, DestEvent::Engine { ok: true }) => {
                self.state = S::ReadingReservation;
                vec![DestAction::ReadReservation]
            }
            (S::Reserving, DestEvent::Engine { ok: false } | DestEvent::EngineTimeout) => {
                let why = Reason::EngineRefused(EngineStep::Reserve);
                let msg = Msg::Reserved(Reserved {
                    ok: false,
                    error: why.to_string(),
                    ..Default::default()
                });
                self.abort(why, Some(msg))
            }
            (S::ReadingReservation, DestEvent::Reservation(Some(blocks))) => {
                self.state = S::Open;
                vec![DestAction::Peer(Msg::Reserved(Reserved {
                    ok: true,
                    blocks,
                    transport: self.reply_transport.clone(),
                    ..Default::default()
                }))]
            }
            (S::ReadingReservation, DestEvent::Reservation(None)) => {
                let why = Reason::ReservationUnreadable;
                let msg = Msg::Reserved(Reserved {
                    ok: false,
                    error: why.to_string(),
                    ..Default::default()
                });
                self.abort(why, Some(msg))
            }
            (S::Open, DestEvent::Peer(Msg::Reserve(Reserve { blocks }))) => {
                self.state = S::Reserving;
                vec![DestAction::Engine(DestEngineOp::Reserve(blocks))]
            }
            (S::Open, DestEvent::SinkError(e)) => {
                self.sink_error.get_or_insert(e);
                vec![]
            }
            (S::Open, DestEvent::Peer(Msg::StageDone(StageDone { stage, .. }))) => {
                match self.sink_error.clone() {
                    None => vec![DestAction::Peer(Msg::StageAck(StageAck {
                        stage,
                        ok: true,
                        error: String::new(),
                    }))],
                    Some(e) => {
                        let msg = Msg::StageAck(StageAck {
                            stage,
                            ok: false,
                            error: e.clone(),
                        });
                        self.abort(Reason::Sink(e), Some(msg))
                    }
                }
            }
            (S::Open, DestEvent::Peer(Msg::Commit(c))) => {
                if self.fenced {
                    let msg = Msg::Committed(Committed {
                        ok: false,
                        error: "fenced".into(),
                    });
                    return self.abort(Reason::Fenced, Some(msg));
                }
                self.state = S::Committing;
                vec![DestAction::Engine(DestEngineOp::Commit(c.state))]
            }
            (S::Committing, DestEvent::Engine { ok: true }) => {
                self.state = S::Done;
                self.answered_commit = true;
                self.outcome = Some(Outcome::Migrated);
                vec![
                    DestAction::Peer(Msg::Committed(Committed {
                        ok: true,
                        error: String::new(),
                    })),
                    DestAction::Done(Outcome::Migrated),
                ]
            }
            (S::Committing, DestEvent::Engine { ok: false }) => {
                let why = Reason::EngineRefused(EngineStep::Commit);
                let msg = Msg::Committed(Committed {
                    ok: false,
                    error: why.to_string(),
                });
                self.abort(why, Some(msg))
            }
            // The engine decides; wait for it (its queue runs in order).
            (S::Committing, DestEvent::EngineTimeout | DestEvent::PeerLost(_)) => vec![],
            (S::Aborting, DestEvent::Engine { .. } | DestEvent::EngineTimeout) => {
                self.state = S::Done;
                let o = self
                    .outcome
                    .clone()
                    .unwrap_or(Outcome::Aborted(Reason::Protocol("no outcome".into())));
                vec![DestAction::Done(o)]
            }
            (S::Aborting, _) => vec![],
            (S::Open, DestEvent::Peer(Msg::Abort(a))) => {
                self.abort(Reason::SourceAborted(a.reason), None)
            }
            (_, DestEvent::PeerLost(e)) => self.abort(Reason::LostSource(e), None),
            (state, ev) => {
                let why = Reason::Protocol(format!("{ev:?} in state {state:?}"));
                self.abort(why, None)
            }
        }
    }
}

/// The envelope of a message.
pub fn envelope(m: Msg) -> Envelope {
    Envelope { msg: Some(m) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum SrcReq {
        Running,
        Migrating,
        Suspended,
        Freed,
        Finished,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum DstReq {
        None,
        Reserved,
        Running,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        /// The engine refuses (nothing changes) / the peer message is lost and the connection
        /// cut / the copy or read fails.
        Fail,
        /// The engine does it but its reply comes too late (a timeout).
        Late,
    }

    enum To {
        Src(SourceEvent),
        Dst(DestEvent),
    }

    struct World {
        src: SrcReq,
        dst: DstReq,
        tokens: u64,
        connected: bool,
        actions: usize,
        fault: Option<(usize, Fault)>,
        src_done: Option<Outcome>,
        dst_done: Option<Outcome>,
    }

    impl World {
        /// Whether action number `self.actions` is the faulty one (and which fault).
        fn fault(&mut self) -> Option<Fault> {
            self.actions += 1;
            self.fault
                .filter(|(at, _)| *at == self.actions)
                .map(|(_, f)| f)
        }

        fn src_action(&mut self, a: SourceAction, q: &mut VecDeque<To>) {
            let f = self.fault();
            match a {
                SourceAction::Engine(op) => {
                    let before = self.src;
                    let after = match (op, self.src) {
                        (SourceEngineOp::Begin, SrcReq::Running) => SrcReq::Migrating,
                        (SourceEngineOp::Suspend, SrcReq::Migrating) => SrcReq::Suspended,
                        (SourceEngineOp::Commit, SrcReq::Suspended) => SrcReq::Freed,
                        (SourceEngineOp::Abort, SrcReq::Migrating | SrcReq::Suspended) => {
                            SrcReq::Running
                        }
                        (_, s) => s,
                    };
                    let ok = after != before || op == SourceEngineOp::Abort;
                    match f {
                        Some(Fault::Fail) => {
                            q.push_back(To::Src(SourceEvent::Engine { ok: false }))
                        }
                        Some(Fault::Late) => {
                            self.src = after;
                            q.push_back(To::Src(SourceEvent::Engine { ok: false }))
                        }
                        None => {
                            self.src = after;
                            q.push_back(To::Src(SourceEvent::Engine { ok }))
                        }
                    }
                }
                SourceAction::Peer(m) => {
                    if f.is_some() || !self.connected {
                        self.cut(q);
                    } else {
                        q.push_back(To::Dst(match m {
                            Msg::Begin(b) => DestEvent::Begin(Box::new(b), None),
                            m => DestEvent::Peer(m),
                        }));
                    }
                }
                SourceAction::ReadTable => {
                    if f.is_some() {
                        // The request finished at the source meanwhile.
                        if self.src == SrcReq::Migrating {
                            self.src = SrcReq::Finished;
                        }
                    }
                    let present = matches!(self.src, SrcReq::Migrating | SrcReq::Suspended);
                    if self.src == SrcReq::Migrating {
                        self.tokens += 37;
                    }
                    let n = self.tokens.div_ceil(16) as u32;
                    q.push_back(To::Src(SourceEvent::Table(
                        present.then(|| ((100..100 + n).collect(), self.tokens)),
                    )));
                }
                SourceAction::ReadState => q.push_back(To::Src(SourceEvent::State(
                    (f.is_none() && self.src == SrcReq::Suspended).then(|| vec![1, 2, 3]),
                ))),
                SourceAction::Copy(_) => q.push_back(To::Src(SourceEvent::Copied(match f {
                    Some(_) => Err("injected".into()),
                    None => Ok(1),
                }))),
                SourceAction::Resolve => {
                    // A new connection: the destination fences and answers from its state.
                    q.push_back(To::Dst(DestEvent::Fenced));
                    let outcome = if f.is_some() {
                        None
                    } else if self.dst == DstReq::Running {
                        Some(Res::Committed)
                    } else {
                        Some(Res::Aborted)
                    };
                    q.push_back(To::Src(match outcome {
                        Some(o) => SourceEvent::Peer(Msg::Resolution(
                            llumlet_proto::migration::Resolution { outcome: o as i32 },
                        )),
                        None => SourceEvent::PeerLost("resolver unreachable".into()),
                    }));
                }
                SourceAction::Done(o) => self.src_done = Some(o),
            }
        }

        fn cut(&mut self, q: &mut VecDeque<To>) {
            if self.connected {
                self.connected = false;
                q.push_back(To::Src(SourceEvent::PeerLost("cut".into())));
                q.push_back(To::Dst(DestEvent::PeerLost("cut".into())));
            }
        }

        fn dst_action(&mut self, a: DestAction, q: &mut VecDeque<To>) {
            let f = self.fault();
            match a {
                DestAction::Engine(op) => {
                    let after = match (&op, self.dst) {
                        (DestEngineOp::Reserve(_), _) => DstReq::Reserved,
                        (DestEngineOp::Commit(_), DstReq::Reserved) => DstReq::Running,
                        (DestEngineOp::Abort, DstReq::Reserved) => DstReq::None,
                        (_, s) => s,
                    };
                    let ok = match op {
                        DestEngineOp::Commit(_) => after == DstReq::Running,
                        DestEngineOp::Abort => self.dst != DstReq::Running,
                        DestEngineOp::Reserve(_) => true,
                    };
                    match f {
                        Some(Fault::Fail) => q.push_back(To::Dst(DestEvent::Engine { ok: false })),
                        Some(Fault::Late) => {
                            self.dst = after;
                            q.push_back(To::Dst(DestEvent::EngineTimeout));
                            // Commands run in order: the reply comes, late.
                            q.push_back(To::Dst(DestEvent::Engine { ok }));
                        }
                        None => {
                            self.dst = after;
                            q.push_back(To::Dst(DestEvent::Engine { ok }))
                        }
                    }
                }
                DestAction::ReadReservation => q.push_back(To::Dst(DestEvent::Reservation(
                    f.is_none().then(|| (500..700).collect()),
                ))),
                DestAction::Peer(m) => {
                    if f.is_some() || !self.connected {
                        self.cut(q);
                    } else {
                        q.push_back(To::Src(SourceEvent::Peer(m)));
                    }
                }
                DestAction::Done(o) => self.dst_done = Some(o),
            }
        }
    }

    /// Runs one migration with `fault` at the given action; returns the world at the end.
    fn run(fault: Option<(usize, Fault)>) -> World {
        let begin = Begin {
            migration_id: 7,
            request_id: "r".into(),
            transport: "shm".into(),
            ..Default::default()
        };
        let mut src = SourceMachine::new(SourceTuning::default(), begin, 16);
        let mut dst = DestMachine::new();
        let mut w = World {
            src: SrcReq::Running,
            dst: DstReq::None,
            tokens: 100,
            connected: true,
            actions: 0,
            fault,
            src_done: None,
            dst_done: None,
        };
        let mut q = VecDeque::from([To::Src(SourceEvent::Start)]);
        let mut steps = 0;
        while let Some(ev) = q.pop_front() {
            steps += 1;
            assert!(steps < 10_000, "no progress");
            match ev {
                To::Src(e) => {
                    for a in src.on(e) {
                        w.src_action(a, &mut q);
                    }
                }
                To::Dst(e) => {
                    for a in dst.on(e) {
                        w.dst_action(a, &mut q);
                    }
                }
            }
        }
        w
    }

    fn check(w: &World, what: &str) {
        let here = matches!(w.src, SrcReq::Running | SrcReq::Finished);
        let there = w.dst == DstReq::Running;
        assert!(
            here != there,
            "{what}: the request must exist exactly once ({:?}, {:?})",
            w.src,
            w.dst
        );
        assert_ne!(w.dst, DstReq::Reserved, "{what}: leaked reservation");
        assert!(
            !matches!(w.src, SrcReq::Migrating | SrcReq::Suspended),
            "{what}: left {:?}",
            w.src
        );
        let o = w
            .src_done
            .clone()
            .unwrap_or_else(|| panic!("{what}: source never finished"));
        assert_eq!(o == Outcome::Migrated, there, "{what}: source says {o:?}");
        if there {
            assert_eq!(w.src, SrcReq::Freed, "{what}");
        }
    }

    #[test]
    fn a_clean_run_migrates_in_several_stages() {
        let w = run(None);
        check(&w, "clean");
        assert_eq!(w.src_done, Some(Outcome::Migrated));
        assert_eq!(w.dst_done, Some(Outcome::Migrated));
    }

    #[test]
    fn a_fault_at_every_step_keeps_the_request_exactly_once() {
        let steps = run(None).actions;
        assert!(steps > 15, "a real run has many steps ({steps})");
        let mut outcomes = [0usize; 2];
        for at in 1..=steps + 1 {
            for f in [Fault::Fail, Fault::Late] {
                let w = run(Some((at, f)));
                check(&w, &format!("fault {f:?} at action {at}"));
                outcomes[usize::from(w.dst == DstReq::Running)] += 1;
            }
        }
        assert!(
            outcomes[0] > 0 && outcomes[1] > 0,
            "faults both abort and (late ones) still migrate: {outcomes:?}"
        );
    }

    #[test]
    fn every_fault_ends_with_a_reason_that_names_it_never_a_protocol_error() {
        let steps = run(None).actions;
        let mut seen = std::collections::BTreeSet::new();
        for at in 1..=steps + 1 {
            for f in [Fault::Fail, Fault::Late] {
                let w = run(Some((at, f)));
                for o in [&w.src_done, &w.dst_done].into_iter().flatten() {
                    if let Some(r) = o.reason() {
                        assert!(
                            !matches!(r, Reason::Protocol(_)),
                            "fault {f:?} at action {at}: {r:?}"
                        );
                        seen.insert(r.label());
                    }
                }
            }
        }
        // The faults reach the engine steps, the copy and the connection on both sides.
        for want in ["engine_refused", "copy", "lost_destination", "lost_source"] {
            assert!(seen.contains(want), "{want} not among {seen:?}");
        }
    }

    #[test]
    fn a_lost_commit_acknowledgement_is_resolved_not_guessed() {
        // Drop the destination's `Committed`: the source must learn the outcome by resolving.
        let steps = run(None).actions;
        let mut resolved = 0;
        for at in 1..=steps {
            let w = run(Some((at, Fault::Fail)));
            if w.dst == DstReq::Running {
                resolved += 1;
                assert_eq!(w.src_done, Some(Outcome::Migrated));
            }
        }
        assert!(
            resolved > 0,
            "some cut after the commit reached the destination engine"
        );
    }
}
