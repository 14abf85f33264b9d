//! The destination's transfer endpoint: a listener that serves each connection on a thread of
//! its own. A connection opens with `Begin` (a migration in, run by the [`DestMachine`] over the
//! engine's command queues, its reservation and the KV sink) or `Resolve` (a source asking how a
//! migration ended; the endpoint fences one it has not committed, and after a restart asks its
//! durable records). Its loop, like the source's, is one small method per action of the machine.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llumlet_dataplane::command::Command;
use llumlet_dataplane::fault::{self, Action, Point};
use llumlet_dataplane::kv::{KvRegion, MappedRegion, MemoryKind};
use llumlet_dataplane::mailbox::{self, Mail};
use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};
use llumlet_dataplane::segment::ControlSegment;
use llumlet_dataplane::transport::{
    check_layouts, receive_frame_keyed, DataSink, Frame, ReservedBlocks,
};
use llumlet_proto::migration::{
    envelope::Msg, resolution::Outcome as Res, Begin, Resolution, Resolve, Retired, UcxRegion,
};

use super::auth::{self, Session, TransferKey};
use super::journal;
use super::link::{CallError, Calls, EngineLink};
use super::machine::{DestAction, DestEngineOp, DestEvent, DestMachine, Outcome};
use super::negotiate::{self, Ask, Transport};
use super::reason::Refusal;
use super::ucx_side::UcxSide;
use super::wire::{self, layout_of, map_all, region_msg, regions_of, wire_layout};
use super::STEP_TIMEOUT;
use crate::metrics::{MigrationCounts, Side};
use crate::migration::rpc::SlotLedger;
use crate::sync::lock;

/// Migrations remembered for `Resolve` before the settled ones are forgotten.
const REMEMBERED: usize = 65_536;

/// What the destination remembers of a migration, for `Resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Open,
    Fenced,
    Committing,
    Committed,
    Aborted,
}

/// How the endpoint admits connections.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The key every connection must prove it holds before anything else is read.
    pub key: TransferKey,
    /// How long a migration in waits for its source before aborting (and freeing its blocks).
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
}

impl EndpointConfig {
    /// The defaults of `LLUMLET_TRANSFER_IDLE_TIMEOUT` and `LLUMLET_TRANSFER_MAX_CONNECTIONS`
    /// with `key`.
    pub fn with_key(key: TransferKey) -> EndpointConfig {
        EndpointConfig {
            key,
            idle_timeout: Duration::from_secs(30),
            max_connections: 64,
        }
    }
}

/// Counts a connection being served; gives its place back when dropped.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The destination's transfer endpoint.
pub struct TransferServer {
    config: EndpointConfig,
    /// Connections being served.
    served: Arc<AtomicUsize>,
    /// When a refusal was last logged (ms since the epoch): at most one line per interval.
    refusal_logged: AtomicU64,
    link: Arc<EngineLink>,
    ledger: OnceLock<Arc<SlotLedger>>,
    /// The segment whose orphaned reservations were cleared (by address).
    swept: Mutex<usize>,
    known: Mutex<HashMap<(String, u64), Known>>,
    changed: Condvar,
    ucx: OnceLock<Arc<UcxSide>>,
    counts: OnceLock<Arc<MigrationCounts>>,
}

impl TransferServer {
    /// Binds `addr` and serves it on a thread; returns the server and the bound address.
    pub fn start(
        link: Arc<EngineLink>,
        addr: SocketAddr,
        config: EndpointConfig,
    ) -> std::io::Result<(Arc<TransferServer>, SocketAddr)> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let server = Arc::new(TransferServer {
            config,
            served: Arc::new(AtomicUsize::new(0)),
            refusal_logged: AtomicU64::new(0),
            link,
            ledger: OnceLock::new(),
            swept: Mutex::new(0),
            known: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            ucx: OnceLock::new(),
            counts: OnceLock::new(),
        });
        let s = Arc::clone(&server);
        std::thread::Builder::new()
            .name("llumlet-transfer".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => {
                            // Bounded: past the limit a connection is closed before anything is
                            // read from it (and no thread is started for it).
                            if s.served.fetch_add(1, Ordering::Relaxed) >= s.config.max_connections
                            {
                                s.served.fetch_sub(1, Ordering::Relaxed);
                                s.refused(&c, "too many transfer connections");
                                continue;
                            }
                            let served = Served(Arc::clone(&s.served));
                            let s = Arc::clone(&s);
                            let _ = std::thread::Builder::new()
                                .name("llumlet-migrate-in".into())
                                .spawn(move || {
                                    let _served = served;
                                    s.serve(c)
                                });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "transfer endpoint: accept failed");
                            // Out of descriptors or similar: do not spin.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
        Ok((server, local))
    }

    /// Gives the endpoint the llumlet's migration slots; until then every migration in is
    /// refused (the llumlet is still starting).
    pub fn set_ledger(&self, ledger: Arc<SlotLedger>) {
        let _ = self.ledger.set(ledger);
    }

    /// Where finished migrations in are counted (the agent's metrics).
    pub fn set_counts(&self, counts: Arc<MigrationCounts>) {
        let _ = self.counts.set(counts);
    }

    /// Lets migrations in use UCX (offered when a source asks for `ucx`, or for `auto` from
    /// another host).
    pub fn set_ucx(&self, ucx: Arc<UcxSide>) {
        let _ = self.ucx.set(ucx);
    }

    /// Frees the reservations a previous llumlet of this engine left behind (requests still
    /// `MigratingIn` when it died: nobody can commit them now), once per attached segment and
    /// before this llumlet reserves anything there. `false`: some could not be freed yet (no
    /// migration in may start until they are).
    pub fn sweep_orphans(&self) -> bool {
        let Some(seg) = self.link.segment() else {
            return false;
        };
        let mut swept = lock(&self.swept);
        let me = Arc::as_ptr(&seg) as usize;
        if *swept == me {
            return true;
        }
        let mut blocks = Vec::new();
        let mut clean = true;
        for slot in 0..MAX_REQUESTS as u32 {
            let Ok(Some(r)) = read_request(seg.requests(), slot, &mut blocks) else {
                continue;
            };
            if r.state() != Some(RequestState::MigratingIn) {
                continue;
            }
            let id = self.link.next_id();
            let answer = Calls::new(Arc::clone(&self.link), id, STEP_TIMEOUT)
                .call(Command::Abort { id, slot });
            tracing::info!(request = ?r.id.as_str(), slot, answer = ?answer,
                "freed a reservation left by a previous llumlet");
            clean &= answer.is_ok();
        }
        if clean {
            *swept = me;
        }
        clean
    }

    fn set(&self, key: &(String, u64), k: Known) {
        let mut m = lock(&self.known);
        if m.len() > REMEMBERED {
            m.retain(|_, v| matches!(v, Known::Open | Known::Committing | Known::Fenced));
        }
        m.insert(key.clone(), k);
        self.changed.notify_all();
    }

    fn get(&self, key: &(String, u64)) -> Option<Known> {
        lock(&self.known).get(key).copied()
    }

    /// Logs a refused connection, at most once a second (a flood must not flood the log).
    fn refused(&self, c: &TcpStream, why: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.refusal_logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .refusal_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(peer = ?c.peer_addr().ok(), "transfer connection refused: {why}");
        }
    }

    fn serve(&self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        // Nothing is read from a peer before it proves it holds the key, and a peer that does
        // not finish the handshake in a step's time is dropped.
        let _ = stream.set_write_timeout(Some(STEP_TIMEOUT));
        let mut session = match auth::server(
            &mut auth::Deadline::new(&mut stream, STEP_TIMEOUT),
            &self.config.key,
        ) {
            Ok(s) => s,
            Err(e) => {
                self.refused(&stream, &e.to_string());
                return;
            }
        };
        // A migration in whose source goes silent this long is aborted (its blocks freed).
        let _ = stream.set_read_timeout(Some(self.config.idle_timeout));
        let mut buf = Vec::new();
        let first = match wire::recv_control(&mut stream, &mut session, &mut buf) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "transfer connection closed before a message");
                return;
            }
        };
        match first {
            Msg::Resolve(r) => self.answer_resolve(&mut stream, &mut session, r),
            Msg::Begin(b) => self.migrate_in(stream, session, b, buf),
            Msg::Retire(r) => {
                self.retire_record(&r);
                let _ = wire::send(
                    &mut stream,
                    &mut session,
                    Msg::Retired(Retired {
                        migration_id: r.migration_id,
                    }),
                );
            }
            other => tracing::warn!(
                message = message_kind(&other),
                "transfer connection opened with an unexpected message"
            ),
        }
    }

    fn answer_resolve(&self, stream: &mut TcpStream, session: &mut Session, r: Resolve) {
        // The resolver does not know the source's instance id: look the migration up by id.
        let deadline = Instant::now() + STEP_TIMEOUT * 2;
        let mut m = lock(&self.known);
        let remembered = loop {
            let entry = m.iter_mut().find(|((_, id), _)| *id == r.migration_id);
            match entry {
                Some((_, k @ (Known::Open | Known::Fenced))) => {
                    // Fence: this migration can never commit now.
                    *k = Known::Fenced;
                    break Some(Res::Aborted);
                }
                Some((_, Known::Committed)) => break Some(Res::Committed),
                Some((_, Known::Aborted)) => break Some(Res::Aborted),
                Some((_, Known::Committing)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break Some(Res::Unknown);
                    }
                    m = self
                        .changed
                        .wait_timeout(m, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => break None,
            }
        };
        drop(m);
        // Not in memory (this llumlet restarted): the durable record decides.
        let outcome =
            remembered.unwrap_or_else(|| self.resolve_from_record(r.migration_id, &r.request_id));
        tracing::info!(migration = r.migration_id, request = %r.request_id, outcome = ?outcome,
            from_record = remembered.is_none(), "resolved a migration for its source");
        let _ = wire::send(
            stream,
            session,
            Msg::Resolution(Resolution {
                outcome: outcome as i32,
            }),
        );
    }

    /// A migration this llumlet has no memory of: no record, it never reached the engine's
    /// commit (aborted); "committed": committed; "committing" (the previous llumlet died
    /// waiting for the engine): the engine decides now. Engines answer a repeated commit with
    /// its first answer and refuse a commit of a reservation that is gone.
    /// A source that settled a migration through `Resolve` (its live connection was lost after
    /// the commit) and removed its journal retires our record of the commit on a connection of
    /// its own: no `Resolve` can come for it any more. Only a committed record goes.
    fn retire_record(&self, r: &llumlet_proto::migration::Retire) {
        if let Some((path, e)) = journal::find_in(self.link.path(), r.migration_id, &r.request_id) {
            if e.committed {
                if let Err(err) = std::fs::remove_file(&path) {
                    tracing::warn!(error = %err, "cannot remove a retired migration-in record");
                }
            }
        }
    }

    fn resolve_from_record(&self, migration: u64, request_id: &str) -> Res {
        let Some((path, e)) = journal::find_in(self.link.path(), migration, request_id) else {
            return Res::Aborted;
        };
        if e.committed {
            return Res::Committed;
        }
        let mut calls = Calls::new(Arc::clone(&self.link), e.local, STEP_TIMEOUT);
        match calls.call(Command::MigrateInCommit { migration: e.local }) {
            Ok((true, _)) => {
                let _ = journal::InEntry {
                    committed: true,
                    ..e
                }
                .write(&path);
                Res::Committed
            }
            Ok((false, _)) => {
                let _ = std::fs::remove_file(&path);
                Res::Aborted
            }
            Err(_) => Res::Unknown,
        }
    }

    /// Whether this engine can take the migration `b` describes: its KV cache (host regions
    /// mapped here, or GPU regions for a source on this host) and layout, and the request id.
    pub(super) fn verdict(
        &self,
        b: &Begin,
        seg: Option<&Arc<ControlSegment>>,
    ) -> Result<(Vec<MappedRegion>, Vec<KvRegion>), Refusal> {
        let seg = seg.ok_or(Refusal::NoEngine)?;
        let (regions, maps) = if Transport::from_wire(&b.transport) == Transport::Cuda {
            // The source opens this engine's GPU regions itself: same host only.
            if !wire::same_machine(&b.host) {
                return Err(Refusal::GpuAcrossHosts);
            }
            let gpu = regions_of(seg, MemoryKind::CudaIpc).map_err(Refusal::Cache)?;
            if gpu.is_empty() {
                return Err(Refusal::NoGpuRegions);
            }
            (gpu, Vec::new())
        } else {
            let host = regions_of(seg, MemoryKind::HostShm).map_err(Refusal::Cache)?;
            let maps = map_all(&host).map_err(Refusal::Cache)?;
            (host, maps)
        };
        check_layouts(&wire_layout(&b.regions), &layout_of(&regions))
            .map_err(|e| Refusal::Layout(e.to_string()))?;
        if b.request_id.is_empty() || b.request_id.len() > mailbox::MAX_ID_BYTES {
            return Err(Refusal::BadRequestId(b.request_id.clone()));
        }
        Ok((maps, regions))
    }

    fn migrate_in(&self, stream: TcpStream, session: Session, b: Begin, buf: Vec<u8>) {
        let swept = self.sweep_orphans();
        let seg = self.link.segment();
        let (mut verdict, maps, regions) = match self.verdict(&b, seg.as_ref()) {
            Ok(_) if !swept => (Some(Refusal::OrphansRemain), Vec::new(), Vec::new()),
            Ok((maps, regions)) => (None, maps, regions),
            Err(e) => (Some(e), Vec::new(), Vec::new()),
        };
        // The in-slot is taken before anything is reserved and held until this function ends.
        let _slot = match (&verdict, self.ledger.get()) {
            (Some(_), _) => None,
            (None, None) => {
                verdict = Some(Refusal::Starting);
                None
            }
            (None, Some(ledger)) => {
                let tokens =
                    i64::from(b.blocks).saturating_mul(wire::tokens_per_block(&regions) as i64);
                match ledger.reserve_in(tokens) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        verdict = Some(Refusal::NoSlot(e.to_string()));
                        None
                    }
                }
            }
        };
        let ask = Ask {
            transport: Transport::from_wire(&b.transport),
            ucx_welcome: b.ucx,
        };
        let same = wire::same_shm(&b.host);
        // UCX: this worker's address and the regions registered, offered in `Reserved`.
        let ucx_offer = match self.ucx.get() {
            Some(side) if negotiate::wants_ucx(ask, same) && verdict.is_none() => {
                match side.offer(&regions) {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot offer UCX for a migration in; using tcp");
                        None
                    }
                }
            }
            _ => None,
        };
        let transport = negotiate::negotiate(ask, same, ucx_offer.is_some());
        let local_id = self.link.next_id();
        tracing::info!(request = %b.request_id, source = %b.src_instance_id, migration = b.migration_id, transport = transport.name(), "migration in");
        let retiring = Inbound {
            server: self,
            calls: Calls::new(Arc::clone(&self.link), local_id, STEP_TIMEOUT),
            mailbox: seg
                .as_ref()
                .map(|_| mailbox::path(self.link.path(), local_id)),
            in_record: journal::in_path(self.link.path(), b.migration_id, &b.request_id),
            key: (b.src_instance_id.clone(), b.migration_id),
            machine: DestMachine::new(),
            sink: DataSink::new(maps, ReservedBlocks::default()),
            slot: None,
            table: Vec::new(),
            local_id,
            stream,
            session,
            buf,
            begin: b,
            transport,
            regions,
            ucx_offer,
        }
        .drive(verdict);
        drop(_slot);
        if let Some(r) = retiring {
            r.wait();
        }
    }
}

/// A committed migration in whose durable record the source may now retire.
struct Retiring {
    stream: TcpStream,
    session: Session,
    buf: Vec<u8>,
    record: PathBuf,
    migration: u64,
    request_id: String,
}

impl Retiring {
    /// Waits a step for the source's `Retire`: once its engine has committed, no `Resolve` can
    /// come for this migration and the record goes. Without it (the source died, or is an older
    /// llumlet) the record stays until the source resolves and expires by age.
    fn wait(mut self) {
        let _ = self.stream.set_read_timeout(Some(STEP_TIMEOUT));
        match wire::recv_control(&mut self.stream, &mut self.session, &mut self.buf) {
            Ok(Msg::Retire(r))
                if r.migration_id == self.migration && r.request_id == self.request_id =>
            {
                if let Err(e) = std::fs::remove_file(&self.record) {
                    tracing::warn!(error = %e, "cannot remove a retired migration-in record");
                }
                let _ = wire::send(
                    &mut self.stream,
                    &mut self.session,
                    Msg::Retired(Retired {
                        migration_id: r.migration_id,
                    }),
                );
            }
            Ok(other) => tracing::debug!(
                message = message_kind(&other),
                "expected Retire after a migration in"
            ),
            Err(e) => {
                tracing::debug!(error = %e, "no Retire after a migration in; the record stays")
            }
        }
    }
}

/// A message's kind, for logs (never its content, which a peer chose).
fn message_kind(m: &Msg) -> &'static str {
    match m {
        Msg::Begin(_) => "Begin",
        Msg::Reserved(_) => "Reserved",
        Msg::Reserve(_) => "Reserve",
        Msg::StageDone(_) => "StageDone",
        Msg::StageAck(_) => "StageAck",
        Msg::Commit(_) => "Commit",
        Msg::Committed(_) => "Committed",
        Msg::Abort(_) => "Abort",
        Msg::Resolve(_) => "Resolve",
        Msg::Resolution(_) => "Resolution",
        Msg::Retire(_) => "Retire",
        Msg::Retired(_) => "Retired",
    }
}

/// One migration in progress at the destination.
struct Inbound<'a> {
    server: &'a TransferServer,
    stream: TcpStream,
    session: Session,
    buf: Vec<u8>,
    /// The source's `Begin`.
    begin: Begin,
    key: (String, u64),
    machine: DestMachine,
    calls: Calls,
    local_id: u64,
    mailbox: Option<PathBuf>,
    in_record: PathBuf,
    sink: DataSink,
    slot: Option<u32>,
    table: Vec<u32>,
    transport: Transport,
    regions: Vec<KvRegion>,
    ucx_offer: Option<(Vec<u8>, Vec<UcxRegion>)>,
}

impl Inbound<'_> {
    /// Runs the machine from the source's `Begin` (with `verdict`, why it is refused) to its
    /// outcome.
    fn drive(mut self, verdict: Option<Refusal>) -> Option<Retiring> {
        self.server.set(&self.key, Known::Open);
        let mut begin = self.begin.clone();
        begin.transport = self.transport.name().into();
        let mut queue = VecDeque::from(self.machine.on(DestEvent::Begin(Box::new(begin), verdict)));
        loop {
            let Some(action) = queue.pop_front() else {
                if self.machine.is_done() {
                    break;
                }
                for event in self.await_source() {
                    queue.extend(self.machine.on(event));
                }
                continue;
            };
            let event = match action {
                DestAction::Engine(op) => Some(self.engine(op)),
                DestAction::ReadReservation => Some(self.read_reservation()),
                DestAction::Peer(msg) => self.peer(msg),
                DestAction::Done(outcome) => return self.done(outcome),
            };
            if let Some(event) = event {
                queue.extend(self.machine.on(event));
            }
        }
        None
    }

    /// Waits for the source: data frames land in the reservation (no event), a control message
    /// is an event (a `Commit` after a `Resolve` fenced the migration comes after `Fenced`).
    fn await_source(&mut self) -> Vec<DestEvent> {
        let event = match receive_frame_keyed(
            &mut self.stream,
            &mut self.buf,
            &self.sink,
            self.session.data_opener(),
        ) {
            Ok(Frame::Data(Ok(_))) => return Vec::new(),
            Ok(Frame::Data(Err(e))) => DestEvent::SinkError(e.to_string()),
            Ok(Frame::Control) => match wire::open_control(&mut self.session, &mut self.buf) {
                Ok(Msg::Commit(c)) if self.server.get(&self.key) == Some(Known::Fenced) => {
                    return vec![DestEvent::Fenced, DestEvent::Peer(Msg::Commit(c))];
                }
                Ok(m) => DestEvent::Peer(m),
                // A message the session did not tag (a relay's own, or a replay) ends it.
                Err(e) => DestEvent::PeerLost(e),
            },
            Err(e) => DestEvent::PeerLost(e.to_string()),
        };
        vec![event]
    }

    /// A command to the destination engine: reserve blocks, commit the request in, or abort.
    fn engine(&mut self, op: DestEngineOp) -> DestEvent {
        let Some(mb) = self.mailbox.clone() else {
            return DestEvent::Engine { ok: false };
        };
        let commit = matches!(op, DestEngineOp::Commit(_));
        let cmd = match op {
            DestEngineOp::Reserve(n) => {
                let mail = Mail {
                    request_id: self.begin.request_id.clone(),
                    state: Vec::new(),
                };
                if self.slot.is_none() && mail.write(&mb).is_err() {
                    return DestEvent::Engine { ok: false };
                }
                Command::ReserveBlocks {
                    migration: self.local_id,
                    blocks: n,
                }
            }
            DestEngineOp::Commit(state) => {
                if self.server.get(&self.key) == Some(Known::Fenced) {
                    return DestEvent::Engine { ok: false };
                }
                self.server.set(&self.key, Known::Committing);
                let mail = Mail {
                    request_id: self.begin.request_id.clone(),
                    state,
                };
                let record = journal::InEntry {
                    committed: false,
                    migration: self.begin.migration_id,
                    local: self.local_id,
                    request_id: self.begin.request_id.clone(),
                };
                if mail.write(&mb).is_err() || record.write(&self.in_record).is_err() {
                    return DestEvent::Engine { ok: false };
                }
                Command::MigrateInCommit {
                    migration: self.local_id,
                }
            }
            DestEngineOp::Abort => Command::MigrateInAbort {
                migration: self.local_id,
            },
        };
        let reserve = matches!(cmd, Command::ReserveBlocks { .. });
        if commit && fault::at(Point::DstBeforeCommit) == Some(Action::Cut) {
            self.cut();
        }
        let mut r = self.calls.call(cmd);
        if commit {
            // The engine decides the commit: wait for its answer while it lives.
            while r == Err(CallError::Timeout) {
                self.calls.unstale_last();
                r = self.calls.finish();
            }
            self.record_commit(matches!(r, Ok((true, _))));
        }
        match r {
            Ok((ok, value)) => {
                if ok && reserve {
                    let first = self.slot.is_none();
                    self.slot = Some(value as u32);
                    if first && fault::at(Point::DstAfterReserve) == Some(Action::Cut) {
                        self.cut();
                    }
                }
                if ok && commit && fault::at(Point::DstAfterCommit) == Some(Action::Cut) {
                    self.cut();
                }
                DestEvent::Engine { ok }
            }
            Err(CallError::Timeout) => DestEvent::EngineTimeout,
            Err(_) => DestEvent::Engine { ok: false },
        }
    }

    /// The durable record of the engine's commit answer (for a `Resolve` after a restart).
    fn record_commit(&self, committed: bool) {
        let kept = if committed {
            journal::InEntry {
                committed: true,
                migration: self.begin.migration_id,
                local: self.local_id,
                request_id: self.begin.request_id.clone(),
            }
            .write(&self.in_record)
        } else {
            std::fs::remove_file(&self.in_record)
        };
        if let Err(e) = kept {
            tracing::warn!(error = %e, "cannot update the migration-in record");
        }
    }

    /// The reserved blocks, from the engine's request table.
    fn read_reservation(&mut self) -> DestEvent {
        let seg = self.server.link.segment();
        let r = self.slot.and_then(|s| {
            read_request(seg.as_ref()?.requests(), s, &mut self.table)
                .ok()
                .flatten()
        });
        DestEvent::Reservation(r.map(|_| self.table.clone()))
    }

    /// A message to the source; `Reserved` carries what the negotiated transport needs.
    fn peer(&mut self, mut msg: Msg) -> Option<DestEvent> {
        if let Msg::Reserved(r) = &mut msg {
            if r.ok {
                self.sink.set_reserved(ReservedBlocks::new(&r.blocks));
                if matches!(self.transport, Transport::Shm | Transport::Cuda) {
                    r.regions = self.regions.iter().map(region_msg).collect();
                }
                if let Some((worker, offered)) = &self.ucx_offer {
                    r.ucx_worker = worker.clone();
                    r.ucx_regions = offered.clone();
                }
            }
        }
        match wire::send(&mut self.stream, &mut self.session, msg) {
            Ok(()) => {
                let _ = self.stream.flush();
                None
            }
            Err(e) => Some(DestEvent::PeerLost(e.to_string())),
        }
    }

    /// The outcome; a migration in that committed waits (after its slot is given back) for
    /// the source to retire its record.
    fn done(self, outcome: Outcome) -> Option<Retiring> {
        if let Some(mb) = self.mailbox.as_ref() {
            mailbox::remove(mb);
        }
        let k = if outcome == Outcome::Migrated {
            Known::Committed
        } else {
            Known::Aborted
        };
        self.server.set(&self.key, k);
        tracing::info!(request = %self.begin.request_id, outcome = %outcome,
            reason = outcome.reason().map(|r| r.to_string()), "migration in finished");
        if let Some(c) = self.server.counts.get() {
            c.record(Side::In, &outcome);
        }
        (outcome == Outcome::Migrated).then(|| Retiring {
            stream: self.stream,
            session: self.session,
            buf: self.buf,
            record: self.in_record,
            migration: self.begin.migration_id,
            request_id: self.begin.request_id,
        })
    }

    /// Shuts the transfer connection down (fault injection).
    fn cut(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
