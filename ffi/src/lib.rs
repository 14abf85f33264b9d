//! The C ABI of the engine interface: what an engine (C, C++, or Python through ctypes) links to
//! publish its status, keep the request table and serve the llumlet's commands.
//!
//! Every function returns `LLUMLET_OK` (0) or a negative error code; `llumlet_last_error()`
//! gives the text of the last error on the calling thread. Every pointer and length is checked;
//! no panic crosses the boundary (it becomes `LLUMLET_ERR_PANIC`).
//!
//! The header `include/llumlet.h` is generated from this file by cbindgen at build time.

#![warn(missing_docs)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use bytemuck::Zeroable;
use llumlet_dataplane::command::{Command, QueueError};
use llumlet_dataplane::endpoint::{CommandReader, EngineEndpoint, PollError};
use llumlet_dataplane::kv::{KvError, KvRegion, LayoutKind, MappedRegion, MemoryKind};
use llumlet_dataplane::mailbox::{self, Mail, MailError};
use llumlet_dataplane::request_table::{RequestInfo, RequestState, TableError};
use llumlet_dataplane::segment::{segment_name, segment_path};
pub use llumlet_dataplane::status_ring::StatusCounters;
use llumlet_dataplane::status_ring::StatusRecord;

/// Success.
pub const LLUMLET_OK: i32 = 0;
/// A required pointer was NULL.
pub const LLUMLET_ERR_NULL: i32 = -1;
/// An argument is invalid (not UTF-8, out of range, too long).
pub const LLUMLET_ERR_INVALID: i32 = -2;
/// The control segment could not be created.
pub const LLUMLET_ERR_SEGMENT: i32 = -3;
/// A queue or the request table is full; retry later.
pub const LLUMLET_ERR_FULL: i32 = -4;
/// Shared memory is inconsistent, or a message is not a command.
pub const LLUMLET_ERR_CORRUPT: i32 = -5;
/// No such thing (a mailbox that was not written).
pub const LLUMLET_ERR_NOT_FOUND: i32 = -6;
/// The caller's buffer is too small; the size needed was written.
pub const LLUMLET_ERR_TOO_SMALL: i32 = -7;
/// A bug: a panic was caught at the boundary.
pub const LLUMLET_ERR_PANIC: i32 = -99;

/// Command kinds of [`LlumletCommand`].
pub const LLUMLET_CMD_STATUS_REQUEST: u32 = 1;
/// The engine published the status asked for (`id` = request seq, `a` = record seq).
pub const LLUMLET_CMD_STATUS_PUBLISHED: u32 = 2;
/// Abort a request (`id` = correlation id, `a` = request slot).
pub const LLUMLET_CMD_ABORT: u32 = 3;
/// Migration commands (`id` = migration id, `a` = request slot or block count).
pub const LLUMLET_CMD_MIGRATE_OUT_BEGIN: u32 = 10;
/// Suspend a migrating request.
pub const LLUMLET_CMD_MIGRATE_OUT_SUSPEND: u32 = 11;
/// Free a migrated request.
pub const LLUMLET_CMD_MIGRATE_OUT_COMMIT: u32 = 12;
/// Resume a request whose migration failed.
pub const LLUMLET_CMD_MIGRATE_OUT_ABORT: u32 = 13;
/// Reserve `a` blocks for an incoming request.
pub const LLUMLET_CMD_RESERVE_BLOCKS: u32 = 20;
/// Resume an incoming request.
pub const LLUMLET_CMD_MIGRATE_IN_COMMIT: u32 = 21;
/// Drop a reservation.
pub const LLUMLET_CMD_MIGRATE_IN_ABORT: u32 = 22;
/// A reply (`id`, `ok`, `a` = detail value).
pub const LLUMLET_CMD_REPLY: u32 = 30;

/// Request states of the request table.
pub const LLUMLET_REQ_WAITING: u32 = 1;
/// Prefilling.
pub const LLUMLET_REQ_PREFILL: u32 = 2;
/// Decoding.
pub const LLUMLET_REQ_RUNNING: u32 = 3;
/// Suspended for migration.
pub const LLUMLET_REQ_SUSPENDED: u32 = 4;
/// Blocks reserved for a request migrating in.
pub const LLUMLET_REQ_MIGRATING_IN: u32 = 5;

/// KV region memory kinds of [`LlumletKvRegion`]: host memory in a shared-memory segment (the
/// handle is its name under /dev/shm or its absolute path).
pub const LLUMLET_KV_HOST_SHM: u32 = 1;
/// GPU memory exported with `cuIpcGetMemHandle` (the handle is the 64 IPC handle bytes).
pub const LLUMLET_KV_CUDA_IPC: u32 = 2;
/// KV region layouts: K and V of a layer together in each block.
pub const LLUMLET_KV_TOGETHER: u32 = 1;
/// Only the K tensor of a layer.
pub const LLUMLET_KV_KEY_ONLY: u32 = 2;
/// Only the V tensor of a layer.
pub const LLUMLET_KV_VALUE_ONLY: u32 = 3;
/// Bytes of a region's handle.
pub const LLUMLET_KV_HANDLE_BYTES: usize = 64;
/// Bytes a mailbox's request id can take (63 and a NUL).
pub const LLUMLET_MAILBOX_ID_BYTES: usize = 64;

/// Where part of the KV cache lives: block `b` of the region is the `block_size_bytes` bytes
/// at `offset + b * block_size_bytes` of the memory the handle names.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LlumletKvRegion {
    /// `LLUMLET_KV_HOST_SHM` or `LLUMLET_KV_CUDA_IPC`.
    pub memory: u32,
    /// `LLUMLET_KV_TOGETHER`, `LLUMLET_KV_KEY_ONLY` or `LLUMLET_KV_VALUE_ONLY`.
    pub layout: u32,
    /// The model layer.
    pub layer: u32,
    /// Bytes of `handle` in use.
    pub handle_len: u32,
    /// Byte offset of block 0 in the memory.
    pub offset: u64,
    /// Blocks in the region.
    pub num_blocks: u64,
    /// Bytes of one block.
    pub block_size_bytes: u64,
    /// Bytes of one token's slot in a block.
    pub token_size_bytes: u64,
    /// The segment name or path (host), or the IPC handle (GPU).
    pub handle: [u8; LLUMLET_KV_HANDLE_BYTES],
}

/// A command or reply, flattened for C.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LlumletCommand {
    /// One of `LLUMLET_CMD_*`.
    pub kind: u32,
    /// Replies: 1 if the command succeeded.
    pub ok: u32,
    /// Sequence, correlation or migration id.
    pub id: u64,
    /// First argument (see the kind).
    pub a: u64,
}

/// An engine's endpoint (opaque to C).
pub struct LlumletEngine {
    endpoint: EngineEndpoint,
    record: StatusRecord,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

type Failure = (i32, String);

/// Runs `f`, turning errors and panics into codes and the thread's last error.
fn boundary(f: impl FnOnce() -> Result<i32, Failure>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err((code, msg))) => {
            set_error(&msg);
            code
        }
        Err(_) => {
            set_error("internal error: a panic was caught at the C boundary");
            LLUMLET_ERR_PANIC
        }
    }
}

fn null(what: &str) -> Failure {
    (LLUMLET_ERR_NULL, format!("{what} is NULL"))
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| (LLUMLET_ERR_INVALID, format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is NULL only if `n` is 0; otherwise it points to `n` readable `u32`s.
unsafe fn blocks_arg<'a>(p: *const u32, n: usize) -> Result<&'a [u32], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null("blocks"));
    }
    // SAFETY: non-NULL and `n` elements readable per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// # Safety
/// `e` is NULL or a pointer returned by `llumlet_engine_create` and not yet destroyed.
unsafe fn engine_arg<'a>(e: *mut LlumletEngine) -> Result<&'a mut LlumletEngine, Failure> {
    // SAFETY: per the caller's contract, a non-NULL `e` is a live engine we created.
    unsafe { e.as_mut() }.ok_or_else(|| null("engine"))
}

fn table_err(e: TableError) -> Failure {
    let code = match e {
        TableError::Full => LLUMLET_ERR_FULL,
        TableError::Busy(_) => LLUMLET_ERR_CORRUPT,
        _ => LLUMLET_ERR_INVALID,
    };
    (code, e.to_string())
}

fn state_arg(s: u32) -> Result<RequestState, Failure> {
    Ok(match s {
        LLUMLET_REQ_WAITING => RequestState::Waiting,
        LLUMLET_REQ_PREFILL => RequestState::Prefill,
        LLUMLET_REQ_RUNNING => RequestState::Running,
        LLUMLET_REQ_SUSPENDED => RequestState::Suspended,
        LLUMLET_REQ_MIGRATING_IN => RequestState::MigratingIn,
        other => {
            return Err((
                LLUMLET_ERR_INVALID,
                format!("request state {other} is not a LLUMLET_REQ_* value"),
            ))
        }
    })
}

/// The text of the last error on this thread ("" if none). Valid until the next call into this
/// library on the same thread.
#[no_mangle]
pub extern "C" fn llumlet_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Creates the engine's control segment. `instance_id` names it (`/dev/shm/llumlet-ctl-<id>`)
/// unless `shm` is non-NULL (a name under /dev/shm or an absolute path). On success `*out` is
/// the engine, to be released with `llumlet_engine_destroy`.
///
/// # Safety
/// `instance_id` and `shm` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_create(
    instance_id: *const c_char,
    shm: *const c_char,
    out: *mut *mut LlumletEngine,
) -> i32 {
    boundary(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: forwarded caller contract.
        let id = unsafe { str_arg(instance_id, "instance_id") }?;
        let name = if shm.is_null() {
            segment_name(id)
        } else {
            // SAFETY: forwarded caller contract.
            unsafe { str_arg(shm, "shm") }?.to_string()
        };
        let path = segment_path(&name);
        let endpoint = EngineEndpoint::create_at(Path::new(&path))
            .map_err(|e| (LLUMLET_ERR_SEGMENT, e.to_string()))?;
        let engine = Box::new(LlumletEngine {
            endpoint,
            record: StatusRecord::zeroed(),
        });
        // SAFETY: `out` is non-NULL and writable per the caller's contract.
        unsafe { *out = Box::into_raw(engine) };
        Ok(LLUMLET_OK)
    })
}

/// Destroys an engine and removes its control segment. NULL is ignored.
///
/// # Safety
/// `engine` is NULL or a live engine from `llumlet_engine_create`; it must not be used after.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_destroy(engine: *mut LlumletEngine) {
    if !engine.is_null() {
        // SAFETY: created by Box::into_raw in llumlet_engine_create and not destroyed before.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(engine) })));
    }
}

/// Sets the waiting request ids carried with the next published statuses (at most 8 are
/// carried; `n` may be larger, the rest are counted). `recent` selects the recent-waiting list.
///
/// # Safety
/// `engine` is a live engine; `ids` points to `n` NUL-terminated strings (NULL if `n` is 0).
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_set_waiting_ids(
    engine: *mut LlumletEngine,
    ids: *const *const c_char,
    n: usize,
    recent: bool,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        let mut list = Vec::with_capacity(n);
        if n > 0 {
            if ids.is_null() {
                return Err(null("ids"));
            }
            // SAFETY: `ids` holds `n` pointers per the caller's contract.
            for &p in unsafe { std::slice::from_raw_parts(ids, n) } {
                // SAFETY: each is a NUL-terminated string per the caller's contract.
                list.push(unsafe { str_arg(p, "request id") }?);
            }
        }
        let r = if recent {
            e.record.set_recent_waiting_ids(list.iter().copied())
        } else {
            e.record.set_waiting_ids(list.iter().copied())
        };
        r.map_err(|x| (LLUMLET_ERR_INVALID, x.to_string()))?;
        Ok(LLUMLET_OK)
    })
}

/// Publishes a status into the ring. Allocates nothing and takes no lock.
///
/// # Safety
/// `engine` is a live engine; `status` is NULL or points to a readable `llumlet_status`.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_publish(
    engine: *mut LlumletEngine,
    status: *const StatusCounters,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        // SAFETY: a non-NULL `status` is readable per the caller's contract.
        let s = unsafe { status.as_ref() }.ok_or_else(|| null("status"))?;
        e.record.monotonic_ns = llumlet_dataplane::sys::monotonic_ns();
        e.record.counters = *s;
        let record = e.record;
        e.endpoint.publish(&record);
        Ok(LLUMLET_OK)
    })
}

/// Adds a live request to the request table; `*slot` receives its slot.
///
/// # Safety
/// `engine` is a live engine; `id` a NUL-terminated string; `blocks` points to `n_blocks`
/// `u32`s (NULL if 0); `slot` is writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_add_request(
    engine: *mut LlumletEngine,
    id: *const c_char,
    state: u32,
    arrival: u64,
    prompt_tokens: u32,
    output_tokens: u32,
    blocks: *const u32,
    n_blocks: usize,
    slot: *mut u32,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        if slot.is_null() {
            return Err(null("slot"));
        }
        // SAFETY: forwarded caller contract.
        let (id, blocks) = unsafe { (str_arg(id, "id")?, blocks_arg(blocks, n_blocks)?) };
        let info = RequestInfo {
            id,
            state: state_arg(state)?,
            arrival,
            prompt_tokens,
            output_tokens,
        };
        let s = e.endpoint.add_request(&info, blocks).map_err(table_err)?;
        // SAFETY: non-NULL and writable per the caller's contract.
        unsafe { *slot = s };
        Ok(LLUMLET_OK)
    })
}

/// Records a request's progress: its state, output tokens, and the blocks it gained since the
/// last call.
///
/// # Safety
/// `engine` is a live engine; `new_blocks` points to `n` `u32`s (NULL if 0).
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_request_progress(
    engine: *mut LlumletEngine,
    slot: u32,
    state: u32,
    output_tokens: u32,
    new_blocks: *const u32,
    n: usize,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        // SAFETY: forwarded caller contract.
        let blocks = unsafe { blocks_arg(new_blocks, n) }?;
        e.endpoint
            .request_progress(slot, state_arg(state)?, output_tokens, blocks)
            .map_err(table_err)?;
        Ok(LLUMLET_OK)
    })
}

/// Removes a request from the table.
///
/// # Safety
/// `engine` is a live engine.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_remove_request(
    engine: *mut LlumletEngine,
    slot: u32,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        e.endpoint.remove_request(slot).map_err(table_err)?;
        Ok(LLUMLET_OK)
    })
}

/// Replaces a request's block table (after a preemption, or a reservation that grew).
///
/// # Safety
/// `engine` is a live engine; `blocks` points to `n` `u32`s (NULL if 0).
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_set_request_blocks(
    engine: *mut LlumletEngine,
    slot: u32,
    blocks: *const u32,
    n: usize,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        // SAFETY: forwarded caller contract.
        let blocks = unsafe { blocks_arg(blocks, n) }?;
        e.endpoint
            .set_request_blocks(slot, blocks)
            .map_err(table_err)?;
        Ok(LLUMLET_OK)
    })
}

fn region_arg(r: &LlumletKvRegion) -> Result<KvRegion, Failure> {
    let invalid = |m: String| (LLUMLET_ERR_INVALID, m);
    let memory = match r.memory {
        LLUMLET_KV_HOST_SHM => MemoryKind::HostShm,
        LLUMLET_KV_CUDA_IPC => MemoryKind::CudaIpc,
        v => {
            return Err(invalid(format!(
                "KV memory kind {v} is not a LLUMLET_KV_* value"
            )))
        }
    };
    let layout = match r.layout {
        LLUMLET_KV_TOGETHER => LayoutKind::KvTogether,
        LLUMLET_KV_KEY_ONLY => LayoutKind::KeyOnly,
        LLUMLET_KV_VALUE_ONLY => LayoutKind::ValueOnly,
        v => {
            return Err(invalid(format!(
                "KV layout {v} is not a LLUMLET_KV_* value"
            )))
        }
    };
    let n = r.handle_len as usize;
    if n == 0 || n > LLUMLET_KV_HANDLE_BYTES {
        return Err(invalid(format!(
            "KV region handle_len {n} is not 1..={LLUMLET_KV_HANDLE_BYTES}"
        )));
    }
    if r.token_size_bytes == 0
        || r.block_size_bytes == 0
        || !r.block_size_bytes.is_multiple_of(r.token_size_bytes)
    {
        return Err(invalid(format!(
            "KV region of layer {}: a block of {} bytes is not a whole number of {}-byte tokens",
            r.layer, r.block_size_bytes, r.token_size_bytes
        )));
    }
    let region = KvRegion {
        memory,
        layout,
        layer: r.layer,
        offset: r.offset,
        num_blocks: r.num_blocks,
        block_size_bytes: r.block_size_bytes,
        token_size_bytes: r.token_size_bytes,
        handle: r.handle[..n].to_vec(),
    };
    if region
        .len()
        .and_then(|l| l.checked_add(region.offset))
        .is_none()
    {
        return Err(invalid(format!(
            "KV region of layer {}: its size overflows",
            r.layer
        )));
    }
    Ok(region)
}

/// Registers where part of the KV cache lives (one call per layer, or per K and V tensor of a
/// layer), in the order the llumlet pairs regions across instances. A host region is checked
/// against its segment now: one that does not fit, or a segment that cannot be opened, is
/// `LLUMLET_ERR_INVALID` naming the layer and sizes. Returns the region's index.
///
/// # Safety
/// `engine` is a live engine; `region` points to a readable `llumlet_kv_region`.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_register_kv_region(
    engine: *mut LlumletEngine,
    region: *const LlumletKvRegion,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        // SAFETY: a non-NULL `region` is readable per the caller's contract.
        let r = region_arg(unsafe { region.as_ref() }.ok_or_else(|| null("region"))?)?;
        if r.memory == MemoryKind::HostShm {
            MappedRegion::map(&r).map_err(|x| (LLUMLET_ERR_INVALID, x.to_string()))?;
        }
        let index = e.endpoint.register_kv_region(&r).map_err(|x| match x {
            KvError::Full => (LLUMLET_ERR_FULL, x.to_string()),
            _ => (LLUMLET_ERR_INVALID, x.to_string()),
        })?;
        Ok(i32::try_from(index).unwrap_or(i32::MAX))
    })
}

fn mailbox_path(e: &LlumletEngine, migration: u64) -> std::path::PathBuf {
    mailbox::path(e.endpoint.segment().path(), migration)
}

/// Writes migration `migration`'s mailbox: the request id and the engine's serialized request
/// state (source engine, before answering `MigrateOutSuspend`). All or nothing: a reader sees
/// the whole record or none.
///
/// # Safety
/// `engine` is a live engine; `request_id` a NUL-terminated string; `state` points to
/// `state_len` readable bytes (NULL if 0).
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_mailbox_write(
    engine: *mut LlumletEngine,
    migration: u64,
    request_id: *const c_char,
    state: *const u8,
    state_len: usize,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        // SAFETY: forwarded caller contract.
        let id = unsafe { str_arg(request_id, "request_id") }?;
        let state = if state_len == 0 {
            &[][..]
        } else if state.is_null() {
            return Err(null("state"));
        } else {
            // SAFETY: non-NULL and `state_len` readable bytes per the caller's contract.
            unsafe { std::slice::from_raw_parts(state, state_len) }
        };
        let mail = Mail {
            request_id: id.to_string(),
            state: state.to_vec(),
        };
        mail.write(&mailbox_path(e, migration))
            .map_err(|x| match x {
                MailError::TooLong { .. } | MailError::Malformed(_) => {
                    (LLUMLET_ERR_INVALID, x.to_string())
                }
                MailError::Io { .. } => (LLUMLET_ERR_SEGMENT, x.to_string()),
            })?;
        Ok(LLUMLET_OK)
    })
}

/// Reads migration `migration`'s mailbox (destination engine: the request id before
/// `ReserveBlocks`, the state before `MigrateInCommit`). `*state_len` always receives the
/// state's length; the id (NUL-terminated) and the state are copied only when both fit
/// (`id_cap` of `LLUMLET_MAILBOX_ID_BYTES` always does), else `LLUMLET_ERR_TOO_SMALL`. No mailbox
/// is `LLUMLET_ERR_NOT_FOUND`; one that is not a record is `LLUMLET_ERR_CORRUPT`.
///
/// # Safety
/// `engine` is a live engine; `id_out` points to `id_cap` writable bytes; `state_out` to
/// `state_cap` writable bytes (NULL if 0); `state_len` is writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_mailbox_read(
    engine: *mut LlumletEngine,
    migration: u64,
    id_out: *mut c_char,
    id_cap: usize,
    state_out: *mut u8,
    state_cap: usize,
    state_len: *mut usize,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        if id_out.is_null() {
            return Err(null("id_out"));
        }
        if state_len.is_null() {
            return Err(null("state_len"));
        }
        let mail = Mail::read(&mailbox_path(e, migration)).map_err(|x| match &x {
            MailError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                (LLUMLET_ERR_NOT_FOUND, x.to_string())
            }
            MailError::Io { .. } => (LLUMLET_ERR_SEGMENT, x.to_string()),
            _ => (LLUMLET_ERR_CORRUPT, x.to_string()),
        })?;
        // SAFETY: non-NULL and writable per the caller's contract.
        unsafe { *state_len = mail.state.len() };
        let id = mail.request_id.as_bytes();
        if id.len() >= id_cap || mail.state.len() > state_cap {
            return Err((
                LLUMLET_ERR_TOO_SMALL,
                format!(
                    "mailbox holds a {}-byte id and a {}-byte state; the buffers take {} and {}",
                    id.len(),
                    mail.state.len(),
                    id_cap,
                    state_cap
                ),
            ));
        }
        if !mail.state.is_empty() && state_out.is_null() {
            return Err(null("state_out"));
        }
        // SAFETY: `id_out` has `id_cap > id.len()` writable bytes and `state_out` has
        // `state_cap >= state.len()` (checked above); neither overlaps our own buffers.
        unsafe {
            std::ptr::copy_nonoverlapping(id.as_ptr(), id_out.cast::<u8>(), id.len());
            *id_out.add(id.len()) = 0;
            if !mail.state.is_empty() {
                std::ptr::copy_nonoverlapping(mail.state.as_ptr(), state_out, mail.state.len());
            }
        }
        Ok(LLUMLET_OK)
    })
}

/// Removes migration `migration`'s mailbox (absent is fine).
///
/// # Safety
/// `engine` is a live engine.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_mailbox_remove(
    engine: *mut LlumletEngine,
    migration: u64,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        mailbox::remove(&mailbox_path(e, migration));
        Ok(LLUMLET_OK)
    })
}

fn to_c(c: Command) -> LlumletCommand {
    let (kind, ok, id, a) = match c {
        Command::StatusRequest { seq } => (LLUMLET_CMD_STATUS_REQUEST, 0, seq, 0),
        Command::StatusPublished { seq, publish_seq } => {
            (LLUMLET_CMD_STATUS_PUBLISHED, 0, seq, publish_seq)
        }
        Command::Abort { id, slot } => (LLUMLET_CMD_ABORT, 0, id, u64::from(slot)),
        Command::MigrateOutBegin { migration, slot } => {
            (LLUMLET_CMD_MIGRATE_OUT_BEGIN, 0, migration, u64::from(slot))
        }
        Command::MigrateOutSuspend { migration, slot } => (
            LLUMLET_CMD_MIGRATE_OUT_SUSPEND,
            0,
            migration,
            u64::from(slot),
        ),
        Command::MigrateOutCommit { migration, slot } => (
            LLUMLET_CMD_MIGRATE_OUT_COMMIT,
            0,
            migration,
            u64::from(slot),
        ),
        Command::MigrateOutAbort { migration, slot } => {
            (LLUMLET_CMD_MIGRATE_OUT_ABORT, 0, migration, u64::from(slot))
        }
        Command::ReserveBlocks { migration, blocks } => {
            (LLUMLET_CMD_RESERVE_BLOCKS, 0, migration, u64::from(blocks))
        }
        Command::MigrateInCommit { migration } => (LLUMLET_CMD_MIGRATE_IN_COMMIT, 0, migration, 0),
        Command::MigrateInAbort { migration } => (LLUMLET_CMD_MIGRATE_IN_ABORT, 0, migration, 0),
        Command::Reply { id, ok, value } => (LLUMLET_CMD_REPLY, u32::from(ok), id, value),
    };
    LlumletCommand { kind, ok, id, a }
}

fn from_c(c: &LlumletCommand) -> Result<Command, Failure> {
    let slot = || {
        u32::try_from(c.a).map_err(|_| {
            (
                LLUMLET_ERR_INVALID,
                format!("argument {} out of range", c.a),
            )
        })
    };
    Ok(match c.kind {
        LLUMLET_CMD_STATUS_PUBLISHED => Command::StatusPublished {
            seq: c.id,
            publish_seq: c.a,
        },
        LLUMLET_CMD_REPLY => Command::Reply {
            id: c.id,
            ok: c.ok != 0,
            value: c.a,
        },
        LLUMLET_CMD_STATUS_REQUEST => Command::StatusRequest { seq: c.id },
        LLUMLET_CMD_ABORT => Command::Abort {
            id: c.id,
            slot: slot()?,
        },
        other => {
            return Err((
                LLUMLET_ERR_INVALID,
                format!("command kind {other} cannot be sent by an engine"),
            ))
        }
    })
}

/// Takes the next command from the llumlet: returns 1 and fills `*out` if there was one, 0 if
/// the queue is empty (two loads), or a negative error.
///
/// # Safety
/// `engine` is a live engine; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_poll_command(
    engine: *mut LlumletEngine,
    out: *mut LlumletCommand,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        match e.endpoint.poll_command() {
            Ok(None) => Ok(0),
            Ok(Some(c)) => {
                // SAFETY: non-NULL and writable per the caller's contract.
                unsafe { *out = to_c(c) };
                Ok(1)
            }
            Err(e @ PollError::Queue(_)) | Err(e @ PollError::Decode(_)) => {
                Err((LLUMLET_ERR_CORRUPT, e.to_string()))
            }
            Err(e @ PollError::ReaderTaken) => Err((LLUMLET_ERR_INVALID, e.to_string())),
        }
    })
}

/// The engine's command queue, read on a thread of its own (opaque to C).
pub struct LlumletCommandReader {
    reader: CommandReader,
}

/// Takes the engine's command reader (once per engine): from then on commands are read with
/// `llumlet_reader_wait` (on any one thread at a time) and not with
/// `llumlet_engine_poll_command`, while the engine handle keeps publishing and keeping the table
/// on its own thread. Release it with `llumlet_reader_destroy` before or after the engine.
///
/// # Safety
/// `engine` is a live engine; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_command_reader(
    engine: *mut LlumletEngine,
    out: *mut *mut LlumletCommandReader,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        let reader = e.endpoint.command_reader().ok_or_else(|| {
            (
                LLUMLET_ERR_INVALID,
                "the engine's command reader was already taken".to_string(),
            )
        })?;
        // SAFETY: `out` is non-NULL and writable per the caller's contract.
        unsafe { *out = Box::into_raw(Box::new(LlumletCommandReader { reader })) };
        Ok(LLUMLET_OK)
    })
}

/// Waits up to `timeout_us` microseconds for the next command: 1 and `*out` filled if one came,
/// 0 if none did, or a negative error. Polls without holding anything the engine's thread
/// needs (and, from Python's ctypes, without holding the interpreter).
///
/// # Safety
/// `reader` is a live reader used by no other thread during the call; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_reader_wait(
    reader: *mut LlumletCommandReader,
    out: *mut LlumletCommand,
    timeout_us: u64,
) -> i32 {
    boundary(|| {
        // SAFETY: per the caller's contract, a non-NULL `reader` is a live reader we created.
        let r = unsafe { reader.as_ref() }.ok_or_else(|| null("reader"))?;
        if out.is_null() {
            return Err(null("out"));
        }
        match r.reader.wait(std::time::Duration::from_micros(timeout_us)) {
            Ok(None) => Ok(0),
            Ok(Some(c)) => {
                // SAFETY: non-NULL and writable per the caller's contract.
                unsafe { *out = to_c(c) };
                Ok(1)
            }
            Err(e) => Err((LLUMLET_ERR_CORRUPT, e.to_string())),
        }
    })
}

/// Destroys a command reader. NULL is ignored.
///
/// # Safety
/// `reader` is NULL or a live reader; it must not be used after.
#[no_mangle]
pub unsafe extern "C" fn llumlet_reader_destroy(reader: *mut LlumletCommandReader) {
    if !reader.is_null() {
        // SAFETY: created by Box::into_raw in llumlet_engine_command_reader, not destroyed before.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(reader) })));
    }
}

/// Sends a reply or event to the llumlet. A full queue is `LLUMLET_ERR_FULL`: nothing is sent,
/// retry later.
///
/// # Safety
/// `engine` is a live engine; `cmd` points to a readable `LlumletCommand`.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_send(
    engine: *mut LlumletEngine,
    cmd: *const LlumletCommand,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        // SAFETY: a non-NULL `cmd` is readable per the caller's contract.
        let c = unsafe { cmd.as_ref() }.ok_or_else(|| null("cmd"))?;
        e.endpoint.send(&from_c(c)?).map_err(|x| match x {
            QueueError::Full => (LLUMLET_ERR_FULL, x.to_string()),
            QueueError::Corrupt { .. } => (LLUMLET_ERR_CORRUPT, x.to_string()),
        })?;
        Ok(LLUMLET_OK)
    })
}

/// Records publish seq of the newest status (for `LLUMLET_CMD_STATUS_PUBLISHED` replies).
///
/// # Safety
/// `engine` is a live engine; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn llumlet_engine_published(
    engine: *mut LlumletEngine,
    out: *mut u64,
) -> i32 {
    boundary(|| {
        // SAFETY: forwarded caller contract.
        let e = unsafe { engine_arg(engine) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: non-NULL and writable per the caller's contract.
        unsafe { *out = e.endpoint.segment().status().published() };
        Ok(LLUMLET_OK)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    fn msg() -> String {
        // SAFETY: llumlet_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(llumlet_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn bad_arguments_are_codes_not_crashes() {
        // SAFETY: every pointer passed is NULL or valid; that is what is being tested.
        unsafe {
            assert_eq!(
                llumlet_engine_create(ptr::null(), ptr::null(), ptr::null_mut()),
                LLUMLET_ERR_NULL
            );
            assert_eq!(msg(), "out is NULL");
            let mut e = ptr::null_mut();
            assert_eq!(
                llumlet_engine_create(ptr::null(), ptr::null(), &mut e),
                LLUMLET_ERR_NULL
            );
            assert_eq!(msg(), "instance_id is NULL");
            let bad = [0xffu8, 0];
            assert_eq!(
                llumlet_engine_create(bad.as_ptr().cast(), ptr::null(), &mut e),
                LLUMLET_ERR_INVALID
            );
            assert_eq!(
                llumlet_engine_publish(ptr::null_mut(), ptr::null()),
                LLUMLET_ERR_NULL
            );
            let path =
                CString::new(format!("/tmp/llumlet-ffi-test-{}", std::process::id())).unwrap();
            let id = CString::new("x").unwrap();
            assert_eq!(
                llumlet_engine_create(id.as_ptr(), path.as_ptr(), &mut e),
                LLUMLET_OK
            );
            assert_eq!(llumlet_engine_publish(e, ptr::null()), LLUMLET_ERR_NULL);
            assert_eq!(
                llumlet_engine_publish(e, &StatusCounters::default()),
                LLUMLET_OK
            );
            let mut slot = 0;
            assert_eq!(
                llumlet_engine_add_request(e, id.as_ptr(), 77, 0, 1, 0, ptr::null(), 0, &mut slot),
                LLUMLET_ERR_INVALID
            );
            assert!(msg().contains("request state 77"));
            assert_eq!(
                llumlet_engine_add_request(
                    e,
                    id.as_ptr(),
                    LLUMLET_REQ_RUNNING,
                    0,
                    1,
                    0,
                    ptr::null(),
                    3,
                    &mut slot
                ),
                LLUMLET_ERR_NULL
            );
            let blocks = [1u32, 2, 3];
            assert_eq!(
                llumlet_engine_add_request(
                    e,
                    id.as_ptr(),
                    LLUMLET_REQ_RUNNING,
                    0,
                    1,
                    0,
                    blocks.as_ptr(),
                    3,
                    &mut slot
                ),
                LLUMLET_OK
            );
            assert_eq!(
                llumlet_engine_request_progress(e, 9999, LLUMLET_REQ_RUNNING, 1, ptr::null(), 0),
                LLUMLET_ERR_INVALID
            );
            let mut c = LlumletCommand::default();
            assert_eq!(llumlet_engine_poll_command(e, &mut c), 0);
            let bogus = LlumletCommand {
                kind: LLUMLET_CMD_RESERVE_BLOCKS,
                ..Default::default()
            };
            assert_eq!(llumlet_engine_send(e, &bogus), LLUMLET_ERR_INVALID);
            llumlet_engine_destroy(e);
            llumlet_engine_destroy(ptr::null_mut());
        }
    }

    #[test]
    fn mailbox_and_kv_regions_round_trip_and_refuse_bad_input() {
        let dir = std::env::temp_dir();
        let seg = CString::new(format!(
            "{}/llumlet-ffi-mb-{}",
            dir.display(),
            std::process::id()
        ))
        .unwrap();
        let kv_path = format!("{}/llumlet-ffi-kv-{}", dir.display(), std::process::id());
        std::fs::write(&kv_path, vec![0u8; 4096]).unwrap();
        let id = CString::new("inst").unwrap();
        let req = CString::new("req-7").unwrap();
        // SAFETY: every pointer passed is valid for what the function reads or writes.
        unsafe {
            let mut e = ptr::null_mut();
            assert_eq!(
                llumlet_engine_create(id.as_ptr(), seg.as_ptr(), &mut e),
                LLUMLET_OK
            );
            let mut idb = [0 as c_char; LLUMLET_MAILBOX_ID_BYTES];
            let mut st = [0u8; 8];
            let mut n = 0usize;
            let read = |e, idb: &mut [c_char], st: &mut [u8], n: &mut usize| {
                llumlet_engine_mailbox_read(
                    e,
                    5,
                    idb.as_mut_ptr(),
                    idb.len(),
                    st.as_mut_ptr(),
                    st.len(),
                    n,
                )
            };
            assert_eq!(read(e, &mut idb, &mut st, &mut n), LLUMLET_ERR_NOT_FOUND);
            let state = b"0123456789";
            assert_eq!(
                llumlet_engine_mailbox_write(e, 5, req.as_ptr(), state.as_ptr(), state.len()),
                LLUMLET_OK
            );
            assert_eq!(read(e, &mut idb, &mut st, &mut n), LLUMLET_ERR_TOO_SMALL);
            assert_eq!(n, 10);
            let mut big = [0u8; 16];
            assert_eq!(read(e, &mut idb, &mut big, &mut n), LLUMLET_OK);
            assert_eq!(&big[..n], state);
            assert_eq!(CStr::from_ptr(idb.as_ptr()).to_str().unwrap(), "req-7");
            assert_eq!(llumlet_engine_mailbox_remove(e, 5), LLUMLET_OK);
            assert_eq!(read(e, &mut idb, &mut big, &mut n), LLUMLET_ERR_NOT_FOUND);

            let mut r = LlumletKvRegion {
                memory: LLUMLET_KV_HOST_SHM,
                layout: LLUMLET_KV_KEY_ONLY,
                layer: 0,
                handle_len: kv_path.len() as u32,
                offset: 0,
                num_blocks: 4,
                block_size_bytes: 1024,
                token_size_bytes: 64,
                handle: [0; LLUMLET_KV_HANDLE_BYTES],
            };
            r.handle[..kv_path.len()].copy_from_slice(kv_path.as_bytes());
            assert_eq!(llumlet_engine_register_kv_region(e, &r), 0);
            r.layout = LLUMLET_KV_VALUE_ONLY;
            r.offset = 1024;
            assert_eq!(
                llumlet_engine_register_kv_region(e, &r),
                LLUMLET_ERR_INVALID
            );
            assert!(
                msg().contains("layer 0 needs bytes 1024..5120"),
                "{}",
                msg()
            );
            r.offset = 0;
            r.token_size_bytes = 100;
            assert_eq!(
                llumlet_engine_register_kv_region(e, &r),
                LLUMLET_ERR_INVALID
            );
            assert!(msg().contains("whole number"), "{}", msg());
            r.token_size_bytes = 64;
            r.memory = 9;
            assert_eq!(
                llumlet_engine_register_kv_region(e, &r),
                LLUMLET_ERR_INVALID
            );
            r.memory = LLUMLET_KV_HOST_SHM;
            assert_eq!(llumlet_engine_register_kv_region(e, &r), 1);
            let regions = (*e).endpoint.segment().kv().regions();
            assert_eq!(regions.len(), 2);
            let second = regions[1].as_ref().unwrap();
            assert_eq!(second.layout, LayoutKind::ValueOnly);
            assert_eq!(second.handle, kv_path.as_bytes());

            let blocks = [3u32, 4];
            let mut slot = 0;
            assert_eq!(
                llumlet_engine_add_request(
                    e,
                    req.as_ptr(),
                    LLUMLET_REQ_MIGRATING_IN,
                    0,
                    0,
                    0,
                    ptr::null(),
                    0,
                    &mut slot
                ),
                LLUMLET_OK
            );
            assert_eq!(
                llumlet_engine_set_request_blocks(e, slot, blocks.as_ptr(), 2),
                LLUMLET_OK
            );

            // The command reader: once per engine; the engine's own poll then refuses.
            let mut r = ptr::null_mut();
            assert_eq!(llumlet_engine_command_reader(e, &mut r), LLUMLET_OK);
            let mut again = ptr::null_mut();
            assert_eq!(
                llumlet_engine_command_reader(e, &mut again),
                LLUMLET_ERR_INVALID
            );
            let mut c = LlumletCommand::default();
            assert_eq!(llumlet_engine_poll_command(e, &mut c), LLUMLET_ERR_INVALID);
            assert_eq!(llumlet_reader_wait(r, &mut c, 1000), 0);
            llumlet_engine_destroy(e);
            // The reader keeps the segment mapped after the engine is gone.
            assert_eq!(llumlet_reader_wait(r, &mut c, 0), 0);
            llumlet_reader_destroy(r);
            llumlet_reader_destroy(ptr::null_mut());
        }
        let _ = std::fs::remove_file(&kv_path);
    }
}
