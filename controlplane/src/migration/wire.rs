//! The transfer connection's control messages and region descriptions, shared by both sides of
//! a migration and by `llumlet bench transfer`: one control frame per protobuf `Envelope`, KV
//! regions as the wire names them, and the one-shot `Resolve` a source (or its journal's
//! recovery) asks after a migration whose commit it could not see answered.

use std::net::{SocketAddr, TcpStream};

use llumlet_dataplane::kv::{KvRegion, MappedRegion, MemoryKind};
use llumlet_dataplane::transport::{read_frame, write_frame, FRAME_CONTROL};
use llumlet_proto::migration::{envelope::Msg, Envelope, Region, Resolution, Resolve};
use prost::Message;

use super::auth::{self, Session, TransferKey};
use super::STEP_TIMEOUT;

/// This host's identity, as a source sends it in `Begin`: the kernel's boot id (the machine: for
/// `cuda`), then `/` and the device of this process's /dev/shm (the shared-memory namespace: for
/// `shm`; two containers of one machine usually have a /dev/shm each, and two llumlets can use
/// `shm` only if they see the same one).
pub fn host_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    let shm = std::fs::metadata(llumlet_dataplane::segment::SHM_DIR).map_or(0, |m| m.dev());
    format!("{}/{shm:x}", llumlet_dataplane::sys::boot_id())
}

/// Whether a source that sent `host` in its `Begin` shares this machine (its boot id).
pub fn same_machine(host: &str) -> bool {
    let mine = host_identity();
    let machine = |h: &str| h.split('/').next().unwrap_or_default().to_string();
    !host.is_empty() && machine(host) == machine(&mine)
}

/// Whether a source that sent `host` in its `Begin` shares this machine and this /dev/shm.
pub fn same_shm(host: &str) -> bool {
    !host.is_empty() && host == host_identity()
}

/// Sends one control message, tagged for the session.
pub fn send(stream: &mut TcpStream, session: &mut Session, m: Msg) -> std::io::Result<()> {
    // Room for the tag from the start: a `Commit` carrying a large request state is not copied
    // again to append 16 bytes (it is sent in the downtime).
    let env = Envelope { msg: Some(m) };
    let mut bytes = Vec::with_capacity(env.encoded_len() + auth::TAG);
    env.encode(&mut bytes)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    session
        .seal(&mut bytes)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    write_frame(stream, FRAME_CONTROL, &bytes).map_err(|e| std::io::Error::other(e.to_string()))
}

/// The control message in a received control frame's bytes, if its tag is the session's next
/// (decrypted in place on an encrypted connection).
pub fn open_control(session: &mut Session, frame: &mut [u8]) -> Result<Msg, String> {
    let Some(bytes) = session.open(frame) else {
        return Err("control message with a wrong tag".into());
    };
    Envelope::decode(bytes)
        .ok()
        .and_then(|e| e.msg)
        .ok_or_else(|| "malformed control message".to_string())
}

/// Reads one control message of the session; a data frame, a wrong tag or undecodable bytes
/// are errors.
pub fn recv_control(
    stream: &mut TcpStream,
    session: &mut Session,
    buf: &mut Vec<u8>,
) -> Result<Msg, String> {
    match read_frame(stream, buf) {
        Ok(FRAME_CONTROL) => open_control(session, buf),
        Ok(_) => Err("unexpected data frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A KV region as the wire describes it (a CUDA IPC handle in hex, a host segment by name).
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

/// The block layout of a KV cache, `(num_blocks, block_size_bytes)` per region: what
/// `check_layouts` compares between the two ends.
pub fn layout_of(regions: &[KvRegion]) -> Vec<(u64, u64)> {
    regions
        .iter()
        .map(|r| (r.num_blocks, r.block_size_bytes))
        .collect()
}

/// The block layout of regions as the peer described them.
pub fn wire_layout(regions: &[Region]) -> Vec<(u64, u64)> {
    regions
        .iter()
        .map(|r| (r.num_blocks, r.block_size_bytes))
        .collect()
}

/// Tokens per KV block of a cache (every region of one cache has the same block shape); 0 for a
/// cache without regions.
pub fn tokens_per_block(regions: &[KvRegion]) -> u64 {
    regions
        .first()
        .map_or(0, |r| r.block_size_bytes / r.token_size_bytes.max(1))
}

/// The engine's regions of one memory kind.
pub fn regions_of(
    seg: &llumlet_dataplane::segment::ControlSegment,
    memory: MemoryKind,
) -> Result<Vec<KvRegion>, String> {
    let mut v = Vec::new();
    for r in seg.kv().regions() {
        let r = r.map_err(|e| e.to_string())?;
        if r.memory == memory {
            v.push(r);
        }
    }
    Ok(v)
}

/// Maps every host region.
pub fn map_all(regions: &[KvRegion]) -> Result<Vec<MappedRegion>, String> {
    regions
        .iter()
        .map(|r| MappedRegion::map(r).map_err(|e| e.to_string()))
        .collect()
}

/// Connects to the transfer endpoint at `dst` and authenticates both ends with `key`.
pub fn connect(dst: SocketAddr, key: &TransferKey) -> Result<(TcpStream, Session), String> {
    let mut s = TcpStream::connect_timeout(&dst, STEP_TIMEOUT)
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(STEP_TIMEOUT));
    let _ = s.set_write_timeout(Some(STEP_TIMEOUT));
    let session = auth::client(&mut s, key).map_err(|e| format!("{dst}: {e}"))?;
    Ok((s, session))
}

/// Retires the destination's record of committed migration `migration_id` (the source settled
/// it and removed its journal), on a connection of its own.
pub fn retire(
    dst: SocketAddr,
    key: &TransferKey,
    migration_id: u64,
    request_id: &str,
) -> Result<(), String> {
    let (mut s, mut session) = connect(dst, key)?;
    send(
        &mut s,
        &mut session,
        Msg::Retire(llumlet_proto::migration::Retire {
            migration_id,
            request_id: request_id.into(),
        }),
    )
    .map_err(|e| e.to_string())?;
    await_retired(&mut s, &mut session, migration_id)
}

/// Waits a step for the destination's `Retired` answering our `Retire` of `migration_id`: only
/// then is its record known to be gone (a `Retire` written into a connection the destination
/// had already closed, say after a partition outlasted its wait, is lost without an error).
pub fn await_retired(
    s: &mut TcpStream,
    session: &mut Session,
    migration_id: u64,
) -> Result<(), String> {
    s.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match recv_control(s, session, &mut buf)? {
        Msg::Retired(r) if r.migration_id == migration_id => Ok(()),
        _ => Err("expected Retired".into()),
    }
}

/// Asks the destination at `dst` how migration `migration_id` ended (`Resolve`, on a connection
/// of its own); the destination fences a migration it has not committed, so the answer is final.
pub fn resolve(
    dst: SocketAddr,
    key: &TransferKey,
    migration_id: u64,
    request_id: &str,
) -> Result<Resolution, String> {
    let (mut s, mut session) = connect(dst, key)?;
    s.set_read_timeout(Some(STEP_TIMEOUT * 3))
        .map_err(|e| e.to_string())?;
    send(
        &mut s,
        &mut session,
        Msg::Resolve(Resolve {
            migration_id,
            request_id: request_id.into(),
        }),
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match recv_control(&mut s, &mut session, &mut buf)? {
        Msg::Resolution(r) => Ok(r),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
