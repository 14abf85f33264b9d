//! The drivers: they run the pure machines over a real transfer connection, the engine's
//! command queues, its request table, mailboxes and KV regions. The source runs one request's
//! migration on a blocking thread; the destination serves the transfer port with a thread per
//! connection.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llumlet_dataplane::command::Command;
use llumlet_dataplane::fault;
use llumlet_dataplane::kv::{KvRegion, LayoutKind, MappedRegion, MemoryKind};
use llumlet_dataplane::mailbox::{self, Mail};
use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};
use llumlet_dataplane::segment::ControlSegment;
use llumlet_dataplane::transport::{
    check_layouts, layout, read_frame, receive_frame, write_frame, DataSink, Frame,
    Reserved as ReservedSet, ShmTransport, TcpTransport, Transport, FRAME_CONTROL,
};
use llumlet_proto::migration::{
    envelope::Msg, resolution::Outcome as Res, Begin, Envelope, Region, Resolution, Resolve,
};
use prost::Message;

use super::journal::{self, Entry, Phase};
use super::link::{CallError, Calls, EngineLink};
use super::machine::{
    DestMachine, DstAction, DstEngineOp, DstEvent, Outcome, SourceMachine, SourceTuning, SrcAction,
    SrcEngineOp, SrcEvent,
};
use crate::config::TransportChoice;
use crate::migrate::SlotLedger;
use crate::migration::ucx_side::UcxSide;

/// How long one protocol step may wait for the peer or the engine.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// This host's identity for `shm` and `cuda`: the kernel's boot id (the destination also checks
/// it can map the regions).
pub fn host_identity() -> String {
    llumlet_dataplane::sys::boot_id()
}

/// Sends one control message.
pub fn send(stream: &mut TcpStream, m: Msg) -> std::io::Result<()> {
    let bytes = Envelope { msg: Some(m) }.encode_to_vec();
    write_frame(stream, FRAME_CONTROL, &bytes).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Reads one control message.
pub fn recv_control(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Msg, String> {
    match read_frame(stream, buf) {
        Ok(FRAME_CONTROL) => Envelope::decode(&buf[..])
            .ok()
            .and_then(|e| e.msg)
            .ok_or_else(|| "malformed control message".to_string()),
        Ok(_) => Err("unexpected data frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A KV region as the wire describes it.
pub fn region_msg(r: &KvRegion) -> Region {
    Region {
        layer: r.layer,
        handle: if r.memory == MemoryKind::CudaIpc {
            super::cuda_side::handle_text(r)
        } else {
            String::from_utf8_lossy(&r.handle).into_owned()
        },
        offset: r.offset,
        num_blocks: r.num_blocks,
        block_size_bytes: r.block_size_bytes,
        token_size_bytes: r.token_size_bytes,
    }
}

fn host_regions(seg: &ControlSegment) -> Result<Vec<KvRegion>, String> {
    let mut v = Vec::new();
    for r in seg.kv().regions() {
        let r = r.map_err(|e| e.to_string())?;
        if r.memory == MemoryKind::HostShm {
            v.push(r);
        }
    }
    Ok(v)
}

fn gpu_regions(seg: &ControlSegment) -> Result<Vec<KvRegion>, String> {
    let mut v = Vec::new();
    for r in seg.kv().regions() {
        let r = r.map_err(|e| e.to_string())?;
        if r.memory == MemoryKind::CudaIpc {
            v.push(r);
        }
    }
    Ok(v)
}

/// The source's KV cache: host regions mapped here, or (none registered) GPU regions that the
/// `cuda` transport opens later; `true` for GPU.
fn source_regions(
    seg: &ControlSegment,
) -> Result<(Vec<KvRegion>, Vec<MappedRegion>, bool), String> {
    let host = host_regions(seg)?;
    if !host.is_empty() {
        let maps = map_all(&host)?;
        return Ok((host, maps, false));
    }
    let gpu = gpu_regions(seg)?;
    if gpu.is_empty() {
        return Err("the engine registered no KV regions".into());
    }
    match super::cuda_side::available() {
        Ok(_) => Ok((gpu, Vec::new(), true)),
        Err(why) => Err(format!("the engine's KV cache is on the GPU and {why}")),
    }
}

/// Maps every host region.
pub fn map_all(regions: &[KvRegion]) -> Result<Vec<MappedRegion>, String> {
    regions
        .iter()
        .map(|r| MappedRegion::map(r).map_err(|e| e.to_string()))
        .collect()
}

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
    /// The transport used.
    pub transport: &'static str,
    /// KV bytes copied (all stages, all regions).
    pub bytes: u64,
}

/// Migrates one request to the transfer endpoint at `dst`.
pub fn run_source(
    link: &Arc<EngineLink>,
    src_instance: &str,
    dst: SocketAddr,
    req: &OutRequest,
    choice: TransportChoice,
    ucx: Option<&Arc<UcxSide>>,
    tuning: SourceTuning,
) -> SourceReport {
    let migration_id = link.next_id();
    let mut calls = Calls::new(Arc::clone(link), migration_id, STEP_TIMEOUT);
    let Some(seg) = link.segment() else {
        return SourceReport {
            outcome: Outcome::Aborted("no engine attached".into()),
            stages: 0,
            downtime: None,
            transport: "none",
            bytes: 0,
        };
    };
    // Nothing is asked of the engine or the destination before the KV cache is known to be
    // readable here.
    let mapped = source_regions(&seg);
    let (regions, src_maps, on_gpu) = match mapped {
        Ok(x) => x,
        Err(e) => {
            return SourceReport {
                outcome: Outcome::Aborted(format!("cannot map this engine's KV cache: {e}")),
                stages: 0,
                downtime: None,
                transport: "none",
                bytes: 0,
            }
        }
    };
    let block_tokens = regions.first().map_or(16, |r| {
        (r.block_size_bytes / r.token_size_bytes.max(1)) as u32
    });
    let want = match choice {
        // GPU KV caches move device to device (same host).
        _ if on_gpu => "cuda",
        TransportChoice::Tcp => "tcp",
        TransportChoice::Ucx if ucx.is_some() => "ucx",
        TransportChoice::Ucx => "tcp",
        TransportChoice::Shm | TransportChoice::Auto => "shm",
    };
    let begin = Begin {
        migration_id,
        src_instance_id: src_instance.to_string(),
        dst_instance_id: String::new(),
        request_id: req.id.clone(),
        blocks: 0,
        transport: want.into(),
        host: host_identity(),
        regions: regions.iter().map(region_msg).collect(),
        ucx: ucx.is_some() && choice == TransportChoice::Auto && !on_gpu,
    };
    let mut m = SourceMachine::new(tuning, begin, block_tokens);
    let mut stream: Option<TcpStream> = None;
    let mut transport: Option<Box<dyn Transport>> = None;
    let mut used = "none";
    let mut buf = Vec::new();
    let mut table = Vec::new();
    let mut suspended_at = None;
    let mut downtime = None;
    let mut queue = std::collections::VecDeque::from(m.on(SrcEvent::Start));
    let mailbox = mailbox::path(link.path(), migration_id);
    let journal_path = journal::path(link.path(), migration_id);
    let journal = |phase: Phase| {
        let e = Entry {
            phase,
            migration: migration_id,
            slot: req.slot,
            request_id: req.id.clone(),
            dst,
            owner: std::process::id(),
        };
        if let Err(err) = e.write(&journal_path) {
            tracing::warn!(error = %err, path = %journal_path.display(), "cannot write the migration journal");
        }
    };
    let mut copies = 0u32;
    let mut copied = 0u64;
    while let Some(a) = queue.pop_front() {
        let ev = match a {
            SrcAction::Engine(op) => {
                let slot = req.slot;
                match op {
                    SrcEngineOp::Begin => journal(Phase::Open),
                    SrcEngineOp::Commit => {
                        fault::at("src-after-committed");
                    }
                    _ => {}
                }
                let cmd = match op {
                    SrcEngineOp::Begin => Command::MigrateOutBegin {
                        migration: migration_id,
                        slot,
                    },
                    SrcEngineOp::Suspend => {
                        suspended_at = Some(Instant::now());
                        Command::MigrateOutSuspend {
                            migration: migration_id,
                            slot,
                        }
                    }
                    SrcEngineOp::Commit => Command::MigrateOutCommit {
                        migration: migration_id,
                        slot,
                    },
                    SrcEngineOp::Abort => Command::MigrateOutAbort {
                        migration: migration_id,
                        slot,
                    },
                };
                let ok = matches!(calls.call(cmd), Ok((true, _)));
                let point = match op {
                    SrcEngineOp::Begin => Some("src-after-begin"),
                    SrcEngineOp::Suspend => Some("src-after-suspend"),
                    _ => None,
                };
                if let Some(point) = point.filter(|_| ok) {
                    if fault::at(point) == Some(fault::Action::Cut) {
                        cut(&stream);
                    }
                }
                Some(SrcEvent::Engine { ok })
            }
            SrcAction::ReadTable => {
                let r = read_request(seg.requests(), req.slot, &mut table)
                    .ok()
                    .flatten();
                Some(SrcEvent::Table(
                    r.filter(|r| r.id.as_str() == Some(req.id.as_str()))
                        .map(|r| {
                            (
                                table.clone(),
                                u64::from(r.prompt_tokens) + u64::from(r.output_tokens),
                            )
                        }),
                ))
            }
            SrcAction::ReadState => {
                let st = Mail::read(&mailbox)
                    .ok()
                    .filter(|m| m.request_id == req.id)
                    .map(|m| m.state);
                mailbox::remove(&mailbox);
                Some(SrcEvent::State(st))
            }
            SrcAction::Copy(runs) => {
                let r = match transport.as_mut() {
                    Some(t) => t.copy(&src_maps, &runs).map_err(|e| e.to_string()),
                    None => Err("no transport".into()),
                };
                copies += 1;
                if let Ok(b) = &r {
                    copied += b;
                }
                if copies == 1 && fault::at("src-after-stage0") == Some(fault::Action::Cut) {
                    cut(&stream);
                }
                Some(SrcEvent::Copied(r))
            }
            SrcAction::Peer(msg) => {
                let expects_reply = !matches!(msg, Msg::Abort(_));
                if stream.is_none() {
                    match TcpStream::connect_timeout(&dst, STEP_TIMEOUT) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let _ = s.set_read_timeout(Some(STEP_TIMEOUT));
                            stream = Some(s);
                        }
                        Err(e) => {
                            queue.extend(m.on(SrcEvent::PeerLost(format!("connect {dst}: {e}"))));
                            continue;
                        }
                    }
                }
                let committing = matches!(msg, Msg::Commit(_));
                if committing {
                    journal(Phase::Committing);
                    if fault::at("src-before-commit") == Some(fault::Action::Cut) {
                        cut(&stream);
                    }
                }
                let s = stream.as_mut().expect("connected above");
                let sent = send(s, msg);
                if sent.is_ok()
                    && committing
                    && fault::at("src-after-commit") == Some(fault::Action::Cut)
                {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                if let Err(e) = sent {
                    stream = None;
                    Some(SrcEvent::PeerLost(e.to_string()))
                } else if !expects_reply {
                    None
                } else {
                    match recv_control(s, &mut buf) {
                        Ok(reply) => {
                            if let Msg::Reserved(r) = &reply {
                                if r.ok {
                                    match setup_transport(&mut transport, r, s, &regions, ucx) {
                                        Ok(name) => used = name,
                                        Err(e) => {
                                            queue.extend(m.on(SrcEvent::Copied(Err(e))));
                                            continue;
                                        }
                                    }
                                }
                            }
                            if matches!(reply, Msg::Committed(_)) {
                                downtime = suspended_at.map(|t| t.elapsed());
                            }
                            Some(SrcEvent::Peer(reply))
                        }
                        Err(e) => {
                            stream = None;
                            Some(SrcEvent::PeerLost(e))
                        }
                    }
                }
            }
            SrcAction::Resolve => {
                stream = None;
                std::thread::sleep(Duration::from_millis(200));
                Some(resolve(dst, migration_id, &req.id))
            }
            SrcAction::Done(outcome) => {
                if matches!(outcome, Outcome::InDoubt(_)) {
                    // The request stays suspended at the engine; the journal's recovery keeps
                    // asking the destination and settles it.
                    journal(Phase::InDoubt);
                } else {
                    let _ = std::fs::remove_file(&journal_path);
                }
                mailbox::remove(&mailbox);
                return SourceReport {
                    outcome,
                    stages: m.stages(),
                    downtime,
                    transport: used,
                    bytes: copied,
                };
            }
        };
        if let Some(ev) = ev {
            queue.extend(m.on(ev));
        }
    }
    SourceReport {
        outcome: Outcome::Aborted("the migration stopped without an outcome".into()),
        stages: m.stages(),
        downtime,
        transport: used,
        bytes: copied,
    }
}

/// Shuts the transfer connection down (fault injection).
fn cut(stream: &Option<TcpStream>) {
    if let Some(s) = stream {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// The transport a source copies with, from the destination's `Reserved`; its name.
pub fn setup_transport(
    t: &mut Option<Box<dyn Transport>>,
    r: &llumlet_proto::migration::Reserved,
    s: &TcpStream,
    regions: &[KvRegion],
    ucx: Option<&Arc<UcxSide>>,
) -> Result<&'static str, String> {
    let reserved = ReservedSet::new(&r.blocks);
    if r.transport == "cuda" {
        if t.is_none() {
            *t = Some(super::cuda_side::transport(
                regions,
                &r.regions,
                reserved.clone(),
            )?);
        }
        if let Some(t) = t.as_mut() {
            t.set_reserved(reserved);
        }
        Ok("cuda")
    } else if r.transport == "ucx" {
        if t.is_none() {
            let side = ucx.ok_or("the destination chose ucx, which this llumlet does not have")?;
            *t = Some(side.transport(r, regions, reserved.clone(), STEP_TIMEOUT)?);
        }
        if let Some(t) = t.as_mut() {
            t.set_reserved(reserved);
        }
        Ok("ucx")
    } else if r.transport == "shm" {
        if t.is_none() {
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
            let src_layout: Vec<(u64, u64)> = regions
                .iter()
                .map(|r| (r.num_blocks, r.block_size_bytes))
                .collect();
            check_layouts(&src_layout, &layout(&maps)).map_err(|e| e.to_string())?;
            *t = Some(Box::new(ShmTransport::new(maps, reserved.clone())));
        }
        if let Some(t) = t.as_mut() {
            t.set_reserved(reserved);
        }
        Ok("shm")
    } else {
        if t.is_none() {
            let clone = s.try_clone().map_err(|e| e.to_string())?;
            *t = Some(Box::new(TcpTransport::new(clone)));
        }
        Ok("tcp")
    }
}

pub(crate) fn resolve(dst: SocketAddr, migration_id: u64, request_id: &str) -> SrcEvent {
    let attempt = || -> Result<Msg, String> {
        let mut s = TcpStream::connect_timeout(&dst, STEP_TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(STEP_TIMEOUT * 3))
            .map_err(|e| e.to_string())?;
        send(
            &mut s,
            Msg::Resolve(Resolve {
                migration_id,
                request_id: request_id.into(),
            }),
        )
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        recv_control(&mut s, &mut buf)
    };
    match attempt() {
        Ok(m @ Msg::Resolution(_)) => SrcEvent::Peer(m),
        Ok(other) => SrcEvent::PeerLost(format!("unexpected answer {other:?}")),
        Err(e) => SrcEvent::PeerLost(e),
    }
}

/// What the destination remembers of a migration, for `Resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Open,
    Fenced,
    Committing,
    Committed,
    Aborted,
}

/// The destination's transfer endpoint.
pub struct TransferServer {
    link: Arc<EngineLink>,
    ledger: OnceLock<Arc<SlotLedger>>,
    /// The segment whose orphaned reservations were cleared (by address).
    swept: Mutex<usize>,
    known: Mutex<HashMap<(String, u64), Known>>,
    changed: Condvar,
    ucx: OnceLock<Arc<UcxSide>>,
}

impl TransferServer {
    /// Binds `addr` and serves it on a thread; returns the server and the bound address.
    pub fn start(
        link: Arc<EngineLink>,
        addr: SocketAddr,
    ) -> std::io::Result<(Arc<TransferServer>, SocketAddr)> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let server = Arc::new(TransferServer {
            link,
            ledger: OnceLock::new(),
            swept: Mutex::new(0),
            known: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            ucx: OnceLock::new(),
        });
        let s = Arc::clone(&server);
        std::thread::Builder::new()
            .name("llumlet-transfer".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => {
                            let s = Arc::clone(&s);
                            let _ = std::thread::Builder::new()
                                .name("llumlet-migrate-in".into())
                                .spawn(move || s.serve(c));
                        }
                        Err(e) => tracing::warn!(error = %e, "transfer endpoint: accept failed"),
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
        let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut m = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 65_536 {
            m.retain(|_, v| matches!(v, Known::Open | Known::Committing | Known::Fenced));
        }
        m.insert(key.clone(), k);
        self.changed.notify_all();
    }

    fn get(&self, key: &(String, u64)) -> Option<Known> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    fn serve(&self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::new();
        let first = match recv_control(&mut stream, &mut buf) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "transfer connection closed before a message");
                return;
            }
        };
        match first {
            Msg::Resolve(r) => self.answer_resolve(&mut stream, r),
            Msg::Begin(b) => self.migrate_in(stream, b, buf),
            other => {
                tracing::warn!(message = ?other, "transfer connection opened with an unexpected message")
            }
        }
    }

    fn answer_resolve(&self, stream: &mut TcpStream, r: Resolve) {
        // The resolver does not know the source's instance id: look the migration up by id.
        let deadline = Instant::now() + STEP_TIMEOUT * 2;
        let mut m = self.known.lock().unwrap_or_else(|p| p.into_inner());
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
        let outcome = remembered.unwrap_or_else(|| self.resolve_from_record(r.migration_id));
        tracing::info!(migration = r.migration_id, request = %r.request_id, outcome = ?outcome,
            from_record = remembered.is_none(), "resolved a migration for its source");
        let _ = send(
            stream,
            Msg::Resolution(Resolution {
                outcome: outcome as i32,
            }),
        );
    }

    /// A migration this llumlet has no memory of: no record, it never reached the engine's
    /// commit (aborted); "committed": committed; "committing" (the previous llumlet died
    /// waiting for the engine): the engine decides now. Engines answer a repeated commit with
    /// its first answer and refuse a commit of a reservation that is gone.
    fn resolve_from_record(&self, migration: u64) -> Res {
        let Some((path, e)) = journal::find_in(self.link.path(), migration) else {
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

    fn verdict(
        &self,
        b: &Begin,
        seg: Option<&Arc<ControlSegment>>,
    ) -> Result<(Vec<MappedRegion>, Vec<KvRegion>), String> {
        let seg = seg.ok_or("the destination has no engine attached")?;
        let (regions, maps) = if b.transport == "cuda" {
            // The source opens this engine's GPU regions itself: same host only.
            if b.host.is_empty() || b.host != host_identity() {
                return Err(
                    "a GPU KV cache moves over CUDA IPC, which needs both engines on one host"
                        .into(),
                );
            }
            let gpu = gpu_regions(seg)?;
            if gpu.is_empty() {
                return Err("the destination engine has no GPU KV regions".into());
            }
            (gpu, Vec::new())
        } else {
            let host = host_regions(seg)?;
            let maps = map_all(&host)?;
            (host, maps)
        };
        let layout: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.num_blocks, r.block_size_bytes))
            .collect();
        let src: Vec<(u64, u64)> = b
            .regions
            .iter()
            .map(|r| (r.num_blocks, r.block_size_bytes))
            .collect();
        check_layouts(&src, &layout).map_err(|e| e.to_string())?;
        if b.request_id.is_empty() || b.request_id.len() > mailbox::MAX_ID_BYTES {
            return Err(format!("bad request id {:?}", b.request_id));
        }
        Ok((maps, regions))
    }

    fn migrate_in(&self, mut stream: TcpStream, b: Begin, mut buf: Vec<u8>) {
        let swept = self.sweep_orphans();
        let key = (b.src_instance_id.clone(), b.migration_id);
        let seg = self.link.segment();
        let (mut verdict, maps, regions) = match self.verdict(&b, seg.as_ref()) {
            Ok(_) if !swept => (
                Some(
                    "the destination engine still holds reservations of a previous llumlet".into(),
                ),
                Vec::new(),
                Vec::new(),
            ),
            Ok((maps, regions)) => (None, maps, regions),
            Err(e) => (Some(e), Vec::new(), Vec::new()),
        };
        // The in-slot is taken before anything is reserved and held until this function ends.
        let _slot = match (&verdict, self.ledger.get()) {
            (Some(_), _) => None,
            (None, None) => {
                verdict = Some("the destination llumlet is still starting".into());
                None
            }
            (None, Some(ledger)) => {
                let block_tokens = regions
                    .first()
                    .map_or(0, |r| r.block_size_bytes / r.token_size_bytes.max(1));
                let tokens = i64::from(b.blocks).saturating_mul(block_tokens as i64);
                match ledger.reserve_in(tokens) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        verdict = Some(format!("{e} (destination)"));
                        None
                    }
                }
            }
        };
        let shm = b.transport == "shm" && !b.host.is_empty() && b.host == host_identity();
        let wants_ucx = b.transport == "ucx" || (b.ucx && !shm);
        // UCX: this worker's address and the regions registered, offered in `Reserved`.
        let ucx_offer = match self.ucx.get() {
            Some(side) if wants_ucx && verdict.is_none() => match side.offer(&regions) {
                Ok(o) => Some(o),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot offer UCX for a migration in; using tcp");
                    None
                }
            },
            _ => None,
        };
        let transport = if b.transport == "cuda" {
            "cuda"
        } else if shm {
            "shm"
        } else if ucx_offer.is_some() {
            "ucx"
        } else {
            "tcp"
        };
        let mut machine = DestMachine::new();
        let local_id = self.link.next_id();
        let mut calls = Calls::new(Arc::clone(&self.link), local_id, STEP_TIMEOUT);
        let mailbox = seg
            .as_ref()
            .map(|_| mailbox::path(self.link.path(), local_id));
        let in_record = journal::in_path(self.link.path(), local_id);
        let mut sink = DataSink::new(maps, ReservedSet::default());
        let mut slot = None;
        let mut table = Vec::new();
        self.set(&key, Known::Open);
        tracing::info!(request = %b.request_id, source = %b.src_instance_id, migration = b.migration_id, transport, "migration in");
        let mut begin = b.clone();
        begin.transport = transport.into();
        let mut queue =
            std::collections::VecDeque::from(machine.on(DstEvent::Begin(Box::new(begin), verdict)));
        loop {
            let Some(a) = queue.pop_front() else {
                if machine.is_done() {
                    break;
                }
                // Wait for the source.
                let ev = match receive_frame(&mut stream, &mut buf, &sink) {
                    Ok(Frame::Data(Ok(_))) => continue,
                    Ok(Frame::Data(Err(e))) => DstEvent::SinkError(e.to_string()),
                    Ok(Frame::Control) => match Envelope::decode(&buf[..]).ok().and_then(|e| e.msg)
                    {
                        Some(Msg::Commit(c)) if self.get(&key) == Some(Known::Fenced) => {
                            queue.extend(machine.on(DstEvent::Fenced));
                            DstEvent::Peer(Msg::Commit(c))
                        }
                        Some(m) => DstEvent::Peer(m),
                        None => DstEvent::PeerLost("malformed control message".into()),
                    },
                    Err(e) => DstEvent::PeerLost(e.to_string()),
                };
                queue.extend(machine.on(ev));
                continue;
            };
            let ev = match a {
                DstAction::Engine(op) => {
                    let Some(mb) = mailbox.as_ref() else {
                        queue.extend(machine.on(DstEvent::Engine { ok: false }));
                        continue;
                    };
                    let cmd = match &op {
                        DstEngineOp::Reserve(n) => {
                            let mail = Mail {
                                request_id: b.request_id.clone(),
                                state: Vec::new(),
                            };
                            if slot.is_none() && mail.write(mb).is_err() {
                                queue.extend(machine.on(DstEvent::Engine { ok: false }));
                                continue;
                            }
                            Command::ReserveBlocks {
                                migration: local_id,
                                blocks: *n,
                            }
                        }
                        DstEngineOp::Commit(state) => {
                            if self.get(&key) == Some(Known::Fenced) {
                                queue.extend(machine.on(DstEvent::Engine { ok: false }));
                                continue;
                            }
                            self.set(&key, Known::Committing);
                            let mail = Mail {
                                request_id: b.request_id.clone(),
                                state: state.clone(),
                            };
                            let record = journal::InEntry {
                                committed: false,
                                migration: b.migration_id,
                                local: local_id,
                            };
                            if mail.write(mb).is_err() || record.write(&in_record).is_err() {
                                queue.extend(machine.on(DstEvent::Engine { ok: false }));
                                continue;
                            }
                            Command::MigrateInCommit {
                                migration: local_id,
                            }
                        }
                        DstEngineOp::Abort => Command::MigrateInAbort {
                            migration: local_id,
                        },
                    };
                    if matches!(op, DstEngineOp::Commit(_))
                        && fault::at("dst-before-commit") == Some(fault::Action::Cut)
                    {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    let mut r = calls.call(cmd);
                    if matches!(op, DstEngineOp::Commit(_)) {
                        // The engine decides the commit: wait for its answer while it lives.
                        while r == Err(CallError::Timeout) {
                            calls.unstale_last();
                            r = calls.finish();
                        }
                    }
                    if matches!(op, DstEngineOp::Commit(_)) {
                        let done = journal::InEntry {
                            committed: true,
                            migration: b.migration_id,
                            local: local_id,
                        };
                        let kept = match r {
                            Ok((true, _)) => done.write(&in_record),
                            _ => std::fs::remove_file(&in_record),
                        };
                        if let Err(e) = kept {
                            tracing::warn!(error = %e, "cannot update the migration-in record");
                        }
                    }
                    match r {
                        Ok((ok, value)) => {
                            if ok && matches!(op, DstEngineOp::Reserve(_)) {
                                let first = slot.is_none();
                                slot = Some(value as u32);
                                if first
                                    && fault::at("dst-after-reserve") == Some(fault::Action::Cut)
                                {
                                    let _ = stream.shutdown(std::net::Shutdown::Both);
                                }
                            }
                            if ok
                                && matches!(op, DstEngineOp::Commit(_))
                                && fault::at("dst-after-commit") == Some(fault::Action::Cut)
                            {
                                let _ = stream.shutdown(std::net::Shutdown::Both);
                            }
                            DstEvent::Engine { ok }
                        }
                        Err(CallError::Timeout) => DstEvent::EngineTimeout,
                        Err(_) => DstEvent::Engine { ok: false },
                    }
                }
                DstAction::ReadReservation => {
                    let r = slot.and_then(|s| {
                        read_request(
                            self.link.segment().as_ref().map(|g| g.requests())?,
                            s,
                            &mut table,
                        )
                        .ok()
                        .flatten()
                    });
                    DstEvent::Reservation(r.map(|_| table.clone()))
                }
                DstAction::Peer(mut msg) => {
                    if let Msg::Reserved(r) = &mut msg {
                        if r.ok {
                            sink.set_reserved(ReservedSet::new(&r.blocks));
                            if transport == "shm" || transport == "cuda" {
                                r.regions = regions.iter().map(region_msg).collect();
                            }
                            if let Some((worker, offered)) = &ucx_offer {
                                r.ucx_worker = worker.clone();
                                r.ucx_regions = offered.clone();
                            }
                        }
                    }
                    match send(&mut stream, msg) {
                        Ok(()) => {
                            let _ = stream.flush();
                            continue;
                        }
                        Err(e) => DstEvent::PeerLost(e.to_string()),
                    }
                }
                DstAction::Done(o) => {
                    if let Some(mb) = mailbox.as_ref() {
                        mailbox::remove(mb);
                    }
                    let k = if o == Outcome::Migrated {
                        Known::Committed
                    } else {
                        Known::Aborted
                    };
                    self.set(&key, k);
                    tracing::info!(request = %b.request_id, outcome = ?o, "migration in finished");
                    break;
                }
            };
            queue.extend(machine.on(ev));
        }
    }
}

/// Resolves `host:port` (the scheduler's `dst_engine_ip`, `dst_engine_port`).
pub fn resolve_addr(ip: &str, port: i32) -> Result<SocketAddr, String> {
    let port = u16::try_from(port).map_err(|_| format!("bad port {port}"))?;
    (ip, port)
        .to_socket_addrs()
        .map_err(|e| format!("{ip}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{ip}:{port}: no address"))
}

/// The live-migration [`crate::migrate::Migrator`]: selects from the engine's request table and
/// migrates each chosen request over the transfer connection.
pub struct LiveMigrator {
    link: Arc<EngineLink>,
    instance_id: String,
    choice: TransportChoice,
    tuning: SourceTuning,
    active: Mutex<HashSet<u32>>,
    naming_dir: Option<std::path::PathBuf>,
    ucx: Option<Arc<UcxSide>>,
}

impl LiveMigrator {
    /// A migrator for the engine behind `link`. With a kv-transfer-config naming directory,
    /// destinations are looked up there first (the scheduler's `dst_engine_ip:dst_engine_port`
    /// is the fallback).
    pub fn new(
        link: Arc<EngineLink>,
        instance_id: String,
        choice: TransportChoice,
        naming_dir: Option<std::path::PathBuf>,
        ucx: Option<Arc<UcxSide>>,
    ) -> Arc<LiveMigrator> {
        Arc::new(LiveMigrator {
            link,
            instance_id,
            choice,
            tuning: SourceTuning::default(),
            active: Mutex::new(HashSet::new()),
            naming_dir,
            ucx,
        })
    }

    fn candidates(
        &self,
        seg: &ControlSegment,
    ) -> (Vec<crate::selection::Candidate>, HashMap<u32, String>) {
        let active = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        let mut ids = HashMap::new();
        let mut blocks = Vec::new();
        for slot in 0..MAX_REQUESTS as u32 {
            let Ok(Some(r)) = read_request(seg.requests(), slot, &mut blocks) else {
                continue;
            };
            let waiting = match r.state() {
                Some(RequestState::Running) => false,
                Some(RequestState::Waiting) => true,
                _ => continue,
            };
            let Some(id) = r.id.as_str() else { continue };
            ids.insert(slot, id.to_string());
            out.push(crate::selection::Candidate {
                slot,
                arrival: r.arrival,
                prompt_tokens: r.prompt_tokens,
                output_tokens: r.output_tokens,
                waiting,
                migrating: active.contains(&slot),
            });
        }
        (out, ids)
    }
}

#[tonic::async_trait]
impl crate::migrate::Migrator for LiveMigrator {
    async fn migrate_out(
        &self,
        dst_ip: &str,
        dst_port: i32,
        params: &crate::migrate::MigrationParams,
    ) -> Result<usize, crate::migrate::MigrateError> {
        use crate::migrate::MigrateError;
        let seg = self
            .link
            .segment()
            .ok_or_else(|| MigrateError::Failed("no engine attached to this llumlet".into()))?;
        let total = llumlet_dataplane::status_ring::read_newest(seg.status())
            .ok()
            .flatten()
            .map_or(0, |r| r.counters.num_total_gpu_tokens.max(0) as u64);
        // Requests a previous llumlet left marked for a migration it never committed are
        // released first, so they can be chosen again.
        let link = Arc::clone(&self.link);
        let _ = tokio::task::spawn_blocking(move || journal::recover_once(&link, true)).await;
        let (cands, ids) = self.candidates(&seg);
        let chosen = crate::selection::select(params, &cands, total);
        let chosen: Vec<u32> = {
            // Take the chosen slots at once so a concurrent Migrate cannot pick them too.
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            chosen.into_iter().filter(|s| active.insert(*s)).collect()
        };
        if chosen.is_empty() {
            return Ok(0);
        }
        let release = |slots: &[u32]| {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            for s in slots {
                active.remove(s);
            }
        };
        let named = self
            .naming_dir
            .as_deref()
            .and_then(|d| crate::kv_transfer::naming::lookup(d, &params.dst_engine_id));
        let (dst_ip, dst_port) = match &named {
            Some((ip, port)) => {
                tracing::debug!(dst = %params.dst_engine_id, ip, port, "destination found in the naming directory");
                (ip.as_str(), i32::from(*port))
            }
            None => (dst_ip, dst_port),
        };
        let dst = match resolve_addr(dst_ip, dst_port) {
            Ok(a) => a,
            Err(e) => {
                release(&chosen);
                return Err(MigrateError::Failed(format!("destination {e}")));
            }
        };
        let mut moved = 0;
        let mut last_err = None;
        for slot in &chosen {
            let req = OutRequest {
                slot: *slot,
                id: ids.get(slot).cloned().unwrap_or_default(),
            };
            let link = Arc::clone(&self.link);
            let (me, choice, tuning) = (self.instance_id.clone(), self.choice, self.tuning);
            let ucx = self.ucx.clone();
            let r = tokio::task::spawn_blocking(move || {
                let report = run_source(&link, &me, dst, &req, choice, ucx.as_ref(), tuning);
                (req, report)
            })
            .await;
            release(&[*slot]);
            match r {
                Ok((req, rep)) => {
                    tracing::info!(request = %req.id, outcome = ?rep.outcome, stages = rep.stages,
                        downtime_us = rep.downtime.map(|d| d.as_micros() as u64), transport = rep.transport, bytes = rep.bytes, %dst,
                        "migration out finished");
                    match rep.outcome {
                        Outcome::Migrated => moved += 1,
                        Outcome::Aborted(e) | Outcome::InDoubt(e) => last_err = Some(e),
                    }
                }
                Err(e) => last_err = Some(format!("migration thread failed: {e}")),
            }
        }
        match (moved, last_err) {
            (0, Some(e)) => Err(MigrateError::Failed(e)),
            _ => Ok(moved),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llumlet_dataplane::engine::EngineEndpoint;
    use llumlet_dataplane::segment::Attach;

    fn gpu_only_engine(tag: &str) -> (EngineEndpoint, std::path::PathBuf) {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/llumlet-ctl-unit-gpu-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let e = EngineEndpoint::create_at(&path).unwrap();
        for layer in 0..2 {
            e.register_kv_region(&KvRegion {
                memory: MemoryKind::CudaIpc,
                layout: LayoutKind::KvTogether,
                layer,
                offset: u64::from(layer) * 4096 * 16,
                num_blocks: 16,
                block_size_bytes: 4096,
                token_size_bytes: 256,
                handle: vec![7; 64],
            })
            .unwrap();
        }
        (e, path)
    }

    /// An engine whose KV cache is only on the GPU: the source takes the `cuda` path where
    /// CUDA works, and otherwise refuses before asking anything of anyone, saying why (on this
    /// machine without a GPU: no driver, or built without the feature).
    #[test]
    fn a_gpu_only_kv_cache_takes_the_cuda_path_or_is_refused_with_the_reason() {
        let (e, path) = gpu_only_engine("src");
        match super::super::cuda_side::available() {
            Ok(_) => {
                let (regions, maps, on_gpu) = source_regions(e.segment()).unwrap();
                assert!(on_gpu && maps.is_empty() && regions.len() == 2);
                assert_eq!(region_msg(&regions[0]).handle, "07".repeat(64));
            }
            Err(why) => {
                let err = source_regions(e.segment()).err().unwrap();
                assert!(
                    err.starts_with("the engine's KV cache is on the GPU and ")
                        && err.contains(&why),
                    "{err}"
                );
            }
        }
        drop(e);
        let _ = std::fs::remove_file(path);
    }

    /// A destination offers its GPU regions (handles in hex) only to a source on its host.
    #[test]
    fn a_destination_offers_gpu_regions_only_on_the_same_host() {
        let (e, path) = gpu_only_engine("dst");
        let Attach::Ready(seg) = ControlSegment::attach(&path).unwrap() else {
            panic!("attach")
        };
        let seg = Arc::new(seg);
        let link = EngineLink::new(path.clone());
        let (server, _) = TransferServer::start(link, "127.0.0.1:0".parse().unwrap()).unwrap();
        let regions: Vec<Region> = gpu_regions(&seg).unwrap().iter().map(region_msg).collect();
        let mut b = Begin {
            request_id: "r".into(),
            transport: "cuda".into(),
            host: host_identity(),
            regions,
            ..Default::default()
        };
        let (maps, offered) = server.verdict(&b, Some(&seg)).unwrap();
        assert!(maps.is_empty());
        assert_eq!(offered.len(), 2);
        b.host = "another-host".into();
        let err = server.verdict(&b, Some(&seg)).err().unwrap();
        assert!(err.contains("one host"), "{err}");
        b.host = host_identity();
        b.regions.pop();
        assert!(
            server.verdict(&b, Some(&seg)).is_err(),
            "layouts must match"
        );
        drop(e);
        let _ = std::fs::remove_file(path);
    }
}
