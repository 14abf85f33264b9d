//! The source side of one migration: runs the [`SourceMachine`] over the transfer connection,
//! the engine's command queues, its request table and mailbox, and the source's journal. The
//! loop is a list of named steps: each action of the machine is one small method that does the
//! I/O and returns the event it produced.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llumlet_dataplane::command::Command;
use llumlet_dataplane::fault::{self, Action, Point};
use llumlet_dataplane::kv::{KvRegion, LayoutKind, MappedRegion, MemoryKind};
use llumlet_dataplane::mailbox::{self, Mail};
use llumlet_dataplane::request_table::read_request;
use llumlet_dataplane::runs::BlockRun;
use llumlet_dataplane::segment::ControlSegment;
use llumlet_dataplane::transport::{
    check_layouts, layout, ReservedBlocks, ShmTransport, TcpTransport, Transport as KvTransport,
};
use llumlet_proto::migration::{envelope::Msg, Begin, Reserved, Retire};

use super::auth::{Session, TransferKey};
use super::journal::{self, Entry, Phase};
use super::link::{Calls, EngineLink};
use super::machine::{
    Outcome, SourceAction, SourceEngineOp, SourceEvent, SourceMachine, SourceTuning,
};
use super::negotiate::{self, Transport};
use super::reason::Reason;
use super::ucx_side::UcxSide;
use super::wire::{self, host_identity, layout_of, map_all, region_msg, regions_of};
use super::{RESOLVE_PAUSE, STEP_TIMEOUT};
use crate::config::TransportChoice;

/// A request the source may move: where it is in the table.
#[derive(Debug, Clone)]
pub struct OutRequest {
    /// Table slot.
    pub slot: u32,
    /// Its id.
    pub id: String,
}

/// What one source migration did.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// The outcome.
    pub outcome: Outcome,
    /// Stages copied.
    pub stages: u32,
    /// From suspend to the commit's answer.
    pub downtime: Option<Duration>,
    /// The transport used (`None`: no block moved).
    pub transport: Option<Transport>,
    /// KV bytes copied (all stages, all regions).
    pub bytes: u64,
}

impl SourceReport {
    fn refused(why: Reason) -> SourceReport {
        SourceReport {
            outcome: Outcome::Aborted(why),
            stages: 0,
            downtime: None,
            transport: None,
            bytes: 0,
        }
    }

    /// The transport's name for logs (`none` when no block moved).
    pub fn transport_name(&self) -> &'static str {
        self.transport.map_or("none", Transport::name)
    }
}

/// The source's KV cache: host regions mapped here, or (none registered) GPU regions that the
/// `cuda` transport opens later; `true` for GPU.
pub(super) fn source_regions(
    seg: &ControlSegment,
) -> Result<(Vec<KvRegion>, Vec<MappedRegion>, bool), String> {
    let host = regions_of(seg, MemoryKind::HostShm)?;
    if !host.is_empty() {
        let maps = map_all(&host)?;
        return Ok((host, maps, false));
    }
    let gpu = regions_of(seg, MemoryKind::CudaIpc)?;
    if gpu.is_empty() {
        return Err("the engine registered no KV regions".into());
    }
    match super::cuda_side::available() {
        Ok(_) => Ok((gpu, Vec::new(), true)),
        Err(why) => Err(format!("the engine's KV cache is on the GPU and {why}")),
    }
}

/// How a source migrates: the same for every migration of one llumlet.
#[derive(Clone)]
pub struct SourceOptions {
    /// The configured transport choice.
    pub choice: TransportChoice,
    /// This llumlet's UCX, if it has one.
    pub ucx: Option<Arc<UcxSide>>,
    /// Stage and retry tuning.
    pub tuning: SourceTuning,
    /// The key transfer connections are authenticated with.
    pub key: TransferKey,
}

/// Migrates one request to the transfer endpoint at `dst`.
pub fn run_source(
    link: &Arc<EngineLink>,
    src_instance: &str,
    dst: SocketAddr,
    req: &OutRequest,
    opts: &SourceOptions,
) -> SourceReport {
    let (choice, ucx, tuning) = (opts.choice, opts.ucx.as_ref(), opts.tuning);
    let migration_id = link.next_id();
    let Some(seg) = link.segment() else {
        return SourceReport::refused(Reason::NoEngine);
    };
    // Nothing is asked of the engine or the destination before the KV cache is known to be
    // readable here.
    let (regions, src_maps, on_gpu) = match source_regions(&seg) {
        Ok(x) => x,
        Err(e) => {
            return SourceReport::refused(Reason::SourceCache(e));
        }
    };
    // `auto` takes UCX only where it has RDMA (`ucx_side::host_has_rdma`); `ucx` takes it anyway.
    let have_ucx = ucx.is_some_and(|u| u.rdma() || choice == TransportChoice::Ucx);
    let ask = negotiate::ask(choice, on_gpu, have_ucx);
    let begin = Begin {
        migration_id,
        src_instance_id: src_instance.to_string(),
        dst_instance_id: String::new(),
        request_id: req.id.clone(),
        blocks: 0,
        transport: ask.transport.name().into(),
        host: host_identity(),
        regions: regions.iter().map(region_msg).collect(),
        ucx: ask.ucx_welcome,
    };
    let block_tokens = wire::tokens_per_block(&regions).max(1) as u32;
    SourceRun {
        machine: SourceMachine::new(tuning, begin, block_tokens),
        calls: Calls::new(Arc::clone(link), migration_id, STEP_TIMEOUT),
        mailbox: mailbox::path(link.path(), migration_id),
        journal_path: journal::path(link.path(), migration_id),
        migration_id,
        seg,
        req,
        dst,
        ucx,
        key: &opts.key,
        regions,
        src_maps,
        stream: None,
        session: None,
        transport: None,
        used: None,
        buf: Vec::new(),
        table: Vec::new(),
        suspended_at: None,
        downtime: None,
        copies: 0,
        copied: 0,
    }
    .drive()
}

/// One migration out in progress: the machine and what its actions act on.
struct SourceRun<'a> {
    machine: SourceMachine,
    calls: Calls,
    migration_id: u64,
    seg: Arc<ControlSegment>,
    req: &'a OutRequest,
    dst: SocketAddr,
    ucx: Option<&'a Arc<UcxSide>>,
    key: &'a TransferKey,
    regions: Vec<KvRegion>,
    src_maps: Vec<MappedRegion>,
    mailbox: PathBuf,
    journal_path: PathBuf,
    stream: Option<TcpStream>,
    /// The authenticated session of `stream`.
    session: Option<Session>,
    transport: Option<Box<dyn KvTransport>>,
    used: Option<Transport>,
    buf: Vec<u8>,
    table: Vec<u32>,
    suspended_at: Option<Instant>,
    downtime: Option<Duration>,
    copies: u32,
    copied: u64,
}

impl SourceRun<'_> {
    /// Runs the machine to its outcome.
    fn drive(mut self) -> SourceReport {
        let mut queue = VecDeque::from(self.machine.on(SourceEvent::Start));
        while let Some(action) = queue.pop_front() {
            let event = match action {
                SourceAction::Engine(op) => Some(self.engine(op)),
                SourceAction::ReadTable => Some(self.read_table()),
                SourceAction::ReadState => Some(self.read_state()),
                SourceAction::Copy(runs) => Some(self.copy(&runs)),
                SourceAction::Peer(msg) => self.peer(msg),
                SourceAction::Resolve => Some(self.resolve()),
                SourceAction::Done(outcome) => return self.done(outcome),
            };
            if let Some(event) = event {
                queue.extend(self.machine.on(event));
            }
        }
        self.report(Outcome::Aborted(Reason::Protocol(
            "the migration stopped without an outcome".into(),
        )))
    }

    /// A command to the source engine: begin, suspend, commit or abort the migration.
    fn engine(&mut self, op: SourceEngineOp) -> SourceEvent {
        let (migration, slot) = (self.migration_id, self.req.slot);
        let cmd = match op {
            SourceEngineOp::Begin => {
                self.journal(Phase::Open);
                Command::MigrateOutBegin { migration, slot }
            }
            SourceEngineOp::Suspend => {
                self.suspended_at = Some(Instant::now());
                Command::MigrateOutSuspend { migration, slot }
            }
            SourceEngineOp::Commit => {
                fault::at(Point::SrcAfterCommitted);
                Command::MigrateOutCommit { migration, slot }
            }
            SourceEngineOp::Abort => Command::MigrateOutAbort { migration, slot },
        };
        let ok = matches!(self.calls.call(cmd), Ok((true, _)));
        let point = match op {
            SourceEngineOp::Begin => Some(Point::SrcAfterBegin),
            SourceEngineOp::Suspend => Some(Point::SrcAfterSuspend),
            _ => None,
        };
        if let Some(point) = point.filter(|_| ok) {
            if fault::at(point) == Some(Action::Cut) {
                self.cut();
            }
        }
        SourceEvent::Engine { ok }
    }

    /// The request's block table and token count, if the slot still holds this request.
    fn read_table(&mut self) -> SourceEvent {
        let r = read_request(self.seg.requests(), self.req.slot, &mut self.table)
            .ok()
            .flatten();
        SourceEvent::Table(
            r.filter(|r| r.id.as_str() == Some(self.req.id.as_str()))
                .map(|r| {
                    (
                        self.table.clone(),
                        u64::from(r.prompt_tokens) + u64::from(r.output_tokens),
                    )
                }),
        )
    }

    /// The serialized request state the engine left in the mailbox when it suspended.
    fn read_state(&mut self) -> SourceEvent {
        let st = Mail::read(&self.mailbox)
            .ok()
            .filter(|m| m.request_id == self.req.id)
            .map(|m| m.state);
        mailbox::remove(&self.mailbox);
        SourceEvent::State(st)
    }

    /// One stage's copy over the negotiated transport.
    fn copy(&mut self, runs: &[BlockRun]) -> SourceEvent {
        let r = match self.transport.as_mut() {
            Some(t) => t.copy(&self.src_maps, runs).map_err(|e| e.to_string()),
            None => Err("no transport".into()),
        };
        self.copies += 1;
        if let Ok(b) = &r {
            self.copied += b;
        }
        if self.copies == 1 && fault::at(Point::SrcAfterStage0) == Some(Action::Cut) {
            self.cut();
        }
        SourceEvent::Copied(r)
    }

    /// A message to the destination (connecting first), and its reply where one is due.
    fn peer(&mut self, msg: Msg) -> Option<SourceEvent> {
        let expects_reply = !matches!(msg, Msg::Abort(_));
        if self.stream.is_none() {
            match wire::connect(self.dst, self.key) {
                Ok((s, session)) => {
                    self.stream = Some(s);
                    self.session = Some(session);
                }
                Err(e) => return Some(SourceEvent::PeerLost(e)),
            }
        }
        let committing = matches!(msg, Msg::Commit(_));
        if committing {
            self.journal(Phase::Committing);
            if fault::at(Point::SrcBeforeCommit) == Some(Action::Cut) {
                self.cut();
            }
        }
        let (s, session) = (self.stream.as_mut()?, self.session.as_mut()?);
        let sent = wire::send(s, session, msg);
        if sent.is_ok() && committing && fault::at(Point::SrcAfterCommit) == Some(Action::Cut) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Err(e) = sent {
            self.stream = None;
            return Some(SourceEvent::PeerLost(e.to_string()));
        }
        if !expects_reply {
            return None;
        }
        match wire::recv_control(s, session, &mut self.buf) {
            Ok(reply) => Some(self.on_reply(reply)),
            Err(e) => {
                self.stream = None;
                Some(SourceEvent::PeerLost(e))
            }
        }
    }

    /// A reply from the destination: `Reserved` sets the transport up, `Committed` ends the
    /// downtime.
    fn on_reply(&mut self, reply: Msg) -> SourceEvent {
        if let (Msg::Reserved(r), Some(s), Some(session)) =
            (&reply, self.stream.as_ref(), self.session.as_mut())
        {
            if r.ok {
                match setup_transport(&mut self.transport, r, s, session, &self.regions, self.ucx) {
                    Ok(t) => self.used = Some(t),
                    Err(e) => return SourceEvent::Copied(Err(e)),
                }
            }
        }
        if matches!(reply, Msg::Committed(_)) {
            self.downtime = self.suspended_at.map(|t| t.elapsed());
        }
        SourceEvent::Peer(reply)
    }

    /// Asks the destination, on a new connection, how the migration ended.
    fn resolve(&mut self) -> SourceEvent {
        self.stream = None;
        std::thread::sleep(RESOLVE_PAUSE);
        match wire::resolve(self.dst, self.key, self.migration_id, &self.req.id) {
            Ok(r) => SourceEvent::Peer(Msg::Resolution(r)),
            Err(e) => SourceEvent::PeerLost(e),
        }
    }

    /// The outcome: the journal goes (or stays, in doubt, for the recovery to settle).
    fn done(mut self, outcome: Outcome) -> SourceReport {
        if matches!(outcome, Outcome::InDoubt(_)) {
            // The request stays suspended at the engine; the journal's recovery keeps asking
            // the destination and settles it.
            self.journal(Phase::InDoubt);
        } else {
            let _ = std::fs::remove_file(&self.journal_path);
        }
        // Only once no journal of it is left here can no `Resolve` come for it.
        if outcome == Outcome::Migrated {
            self.retire();
        }
        mailbox::remove(&self.mailbox);
        self.report(outcome)
    }

    /// Tells the destination, once this engine has committed, that its record of the commit can
    /// go, and waits for its `Retired` (best effort: without it the record expires by age).
    fn retire(&mut self) {
        let sent = match (self.stream.as_mut(), self.session.as_mut()) {
            (Some(s), Some(session)) => {
                let retire = Msg::Retire(Retire {
                    migration_id: self.migration_id,
                    request_id: self.req.id.clone(),
                });
                wire::send(s, session, retire)
                    .map_err(|e| e.to_string())
                    .and_then(|()| wire::await_retired(s, session, self.migration_id))
            }
            _ => Err("the migration's connection is gone".to_string()),
        };
        // Settled through `Resolve` (the connection was lost after the commit), or no `Retired`
        // came back (the destination had stopped waiting): on a connection of its own.
        let r = sent.or_else(|_| wire::retire(self.dst, self.key, self.migration_id, &self.req.id));
        if let Err(e) = r {
            // The journal's recovery tries again (a destination restarting, say).
            tracing::debug!(error = %e, "cannot retire the destination's record yet; will retry");
            self.journal(Phase::Retiring);
        }
    }

    fn report(self, outcome: Outcome) -> SourceReport {
        SourceReport {
            outcome,
            stages: self.machine.stages(),
            downtime: self.downtime,
            transport: self.used,
            bytes: self.copied,
        }
    }

    fn journal(&self, phase: Phase) {
        let e = Entry {
            phase,
            migration: self.migration_id,
            slot: self.req.slot,
            request_id: self.req.id.clone(),
            dst: self.dst,
            owner: std::process::id(),
        };
        if let Err(err) = e.write(&self.journal_path) {
            tracing::warn!(error = %err, path = %self.journal_path.display(), "cannot write the migration journal");
        }
    }

    /// Shuts the transfer connection down (fault injection).
    fn cut(&self) {
        if let Some(s) = &self.stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The transport a source copies with, from the destination's `Reserved` (built at the first
/// reservation, given each later one); returns which it is. `tcp` writes data frames on `s`,
/// encrypted with `session`'s data key when the connection is encrypted.
pub fn setup_transport(
    t: &mut Option<Box<dyn KvTransport>>,
    r: &Reserved,
    s: &TcpStream,
    session: &mut Session,
    regions: &[KvRegion],
    ucx: Option<&Arc<UcxSide>>,
) -> Result<Transport, String> {
    let kind = Transport::from_wire(&r.transport);
    let reserved = ReservedBlocks::new(&r.blocks);
    if t.is_none() {
        *t = Some(match kind {
            Transport::Cuda => super::cuda_side::transport(regions, &r.regions, reserved.clone())?,
            Transport::Ucx => {
                let side =
                    ucx.ok_or("the destination chose ucx, which this llumlet does not have")?;
                side.transport(r, regions, reserved.clone(), STEP_TIMEOUT)?
            }
            Transport::Shm => {
                let dst: Vec<KvRegion> = r
                    .regions
                    .iter()
                    .map(|g| KvRegion {
                        memory: MemoryKind::HostShm,
                        layout: LayoutKind::KvTogether,
                        layer: g.layer,
                        offset: g.offset,
                        num_blocks: g.num_blocks,
                        block_size_bytes: g.block_size_bytes,
                        token_size_bytes: g.token_size_bytes,
                        handle: g.handle.clone().into_bytes(),
                    })
                    .collect();
                let maps = map_all(&dst)?;
                check_layouts(&layout_of(regions), &layout(&maps)).map_err(|e| e.to_string())?;
                Box::new(ShmTransport::new(maps, reserved.clone()))
            }
            Transport::Tcp => {
                let clone = s.try_clone().map_err(|e| e.to_string())?;
                Box::new(match session.take_data_sealer() {
                    Some(key) => TcpTransport::encrypted(clone, key),
                    None => TcpTransport::new(clone),
                })
            }
        });
    }
    // Data frames name their blocks; the others write into the reservation they are given.
    if kind != Transport::Tcp {
        if let Some(t) = t.as_mut() {
            t.set_reserved(reserved);
        }
    }
    Ok(kind)
}
