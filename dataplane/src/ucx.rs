//! The UCX transport (feature `ucx`): RDMA puts of KV blocks with UCP, over whatever transports
//! the UCX build and `UCX_TLS` allow (InfiniBand/RoCE verbs, shared memory, TCP).
//!
//! - [`Context`]: one per llumlet, shared by its workers (`mt_workers_shared`), so memory
//!   registrations are made once and used by every migration.
//! - [`Registry`]: each KV region mapped and registered (`ucp_mem_map`) once, with its packed
//!   remote key; re-registered only when the engine's segment is replaced (a restarted engine).
//! - [`Target`]: the destination's worker, progressed by a thread that sleeps on the worker's
//!   event descriptor when there is nothing to do (UCX's software RMA over TCP needs the target
//!   to progress; verbs and shared memory do not, and cost it nothing).
//! - [`Connection`]: the source's worker and endpoint to one destination, the destination's
//!   remote keys, `ucp_put_nbx` per run with the registration's memory handle, and a flush that
//!   returns once every put is complete at the destination.
//!
//! The source checks every run against the destination's reservation and regions before it
//! puts anything (as `shm` does): remote keys cover whole regions, so the destination trusts
//! its peer's llumlet the way a same-host `shm` destination does. All unsafe calls into UCX
//! live in this module.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ucx_sys as sys;

use crate::kv::{KvRegion, MappedRegion};
use crate::runs::BlockRun;
use crate::transport::{
    check_layouts, check_src, layout, ReservedBlocks, Transport, TransportError,
};

/// How long a waiting source polls its worker before it sleeps on the event descriptor.
const SPIN: Duration = Duration::from_micros(200);

/// UCX errors.
#[derive(Debug, thiserror::Error)]
pub enum UcxError {
    /// A UCX call failed.
    #[error("{call}: {status}")]
    Call {
        /// The call.
        call: &'static str,
        /// UCX's status string.
        status: String,
    },
    /// Completion did not come in time.
    #[error("UCX {what} not complete after {after:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// Bad input (a put outside its region, a malformed remote key...).
    #[error("{0}")]
    Invalid(String),
    /// The KV region could not be mapped.
    #[error("{0}")]
    Map(#[from] crate::kv::KvError),
}

fn status_string(s: sys::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated string for every
    // status value (unknown ones included).
    unsafe { CStr::from_ptr(sys::ucs_status_string(s)) }
        .to_string_lossy()
        .into_owned()
}

fn check(call: &'static str, s: sys::ucs_status_t) -> Result<(), UcxError> {
    if s == sys::UCS_OK {
        Ok(())
    } else {
        Err(UcxError::Call {
            call,
            status: status_string(s),
        })
    }
}

/// The UCX library version, `major.minor.release`.
pub fn version() -> String {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: writes three integers we own.
    unsafe { sys::ucp_get_version(&mut a, &mut b, &mut c) };
    format!("{a}.{b}.{c}")
}

/// A UCP context (features: RMA and wakeup; workers may be created and used by different
/// threads).
pub struct Context {
    h: sys::ucp_context_h,
    tls: String,
}

// SAFETY: the context is created with `mt_workers_shared`, which makes the context-level calls
// (worker creation, memory registration, rkey packing) thread-safe; the handle is only freed in
// Drop, when no other reference exists.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// Reads UCX's configuration from the environment (`UCX_TLS`, `UCX_NET_DEVICES`...) and
    /// creates a context.
    pub fn new() -> Result<Arc<Context>, UcxError> {
        Context::with(&[])
    }

    /// As [`Context::new`], with `(name, value)` overrides of UCX settings (`("TLS", "tcp")`
    /// is `UCX_TLS=tcp`).
    pub fn with(overrides: &[(&str, &str)]) -> Result<Arc<Context>, UcxError> {
        let mut config = std::ptr::null_mut();
        // SAFETY: null prefix and file mean "UCX_ from the environment"; `config` receives a
        // handle released below.
        check("ucp_config_read", unsafe {
            sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config)
        })?;
        for (k, v) in overrides {
            let c = |s: &str| {
                std::ffi::CString::new(s)
                    .map_err(|_| UcxError::Invalid(format!("bad UCX setting {s:?}")))
            };
            let (ck, cv) = match (c(k), c(v)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    // SAFETY: released once.
                    unsafe { sys::ucp_config_release(config) };
                    return Err(e);
                }
            };
            // SAFETY: a live config; NUL-terminated strings that outlive the call.
            let s = unsafe { sys::ucp_config_modify(config, ck.as_ptr(), cv.as_ptr()) };
            if let Err(e) = check("ucp_config_modify", s) {
                // SAFETY: released once.
                unsafe { sys::ucp_config_release(config) };
                return Err(e);
            }
        }
        let name = c"llumlet";
        let params = sys::ucp_params_t {
            field_mask: sys::UCP_PARAM_FIELD_FEATURES
                | sys::UCP_PARAM_FIELD_MT_WORKERS_SHARED
                | sys::UCP_PARAM_FIELD_NAME,
            features: sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_WAKEUP,
            request_size: 0,
            request_init: None,
            request_cleanup: None,
            tag_sender_mask: 0,
            mt_workers_shared: 1,
            estimated_num_eps: 0,
            estimated_num_ppn: 0,
            name: name.as_ptr(),
        };
        let mut h = std::ptr::null_mut();
        // SAFETY: params is fully initialised for the fields its mask names and outlives the
        // call; config came from ucp_config_read and is released right after.
        let s = unsafe { sys::ucp_init_version(sys::UCP_API_MAJOR, 12, &params, config, &mut h) };
        // SAFETY: released once, after its last use.
        unsafe { sys::ucp_config_release(config) };
        check("ucp_init", s)?;
        let tls = overrides
            .iter()
            .find(|(k, _)| *k == "TLS")
            .map(|(_, v)| v.to_string())
            .or_else(|| std::env::var("UCX_TLS").ok())
            .unwrap_or_else(|| "all".into());
        Ok(Arc::new(Context { h, tls }))
    }

    /// The UCX transports allowed (`UCX_TLS`; "all" when unset).
    pub fn transports(&self) -> &str {
        &self.tls
    }

    /// Whether the allowed transports include one that can detect a dead peer (UCX's
    /// shared-memory transports cannot).
    fn may_detect_peer_failure(&self) -> bool {
        const LOCAL: [&str; 11] = [
            "posix",
            "sysv",
            "cma",
            "knem",
            "xpmem",
            "self",
            "sm",
            "shm",
            "mm",
            "cuda_ipc",
            "cuda_copy",
        ];
        self.tls
            .trim_start_matches('^')
            .split(',')
            .any(|t| !LOCAL.contains(&t.trim()))
            || self.tls.starts_with('^')
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the last reference: every worker and registration holds an Arc to the
        // context and is gone.
        unsafe { sys::ucp_cleanup(self.h) };
    }
}

/// A UCP worker in single-thread mode (used by one thread at a time), with its wakeup fd.
struct Worker {
    _ctx: Arc<Context>,
    h: sys::ucp_worker_h,
    efd: i32,
}

// SAFETY: single-thread mode means one thread at a time, not a fixed thread; the Worker is
// moved, never shared (it is not Sync).
unsafe impl Send for Worker {}

impl Worker {
    fn new(ctx: &Arc<Context>) -> Result<Worker, UcxError> {
        let params = sys::ucp_worker_params_t {
            field_mask: sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE
                | sys::UCP_WORKER_PARAM_FIELD_EVENTS,
            thread_mode: sys::UCS_THREAD_MODE_SINGLE,
            cpu_mask: [0; 16],
            events: sys::UCP_WAKEUP_RMA | sys::UCP_WAKEUP_TX | sys::UCP_WAKEUP_RX,
            user_data: std::ptr::null_mut(),
            event_fd: -1,
            flags: 0,
            name: std::ptr::null(),
            am_alignment: 0,
            client_id: 0,
        };
        let mut h = std::ptr::null_mut();
        // SAFETY: valid context and params (fields beyond the mask are ignored).
        check("ucp_worker_create", unsafe {
            sys::ucp_worker_create(ctx.h, &params, &mut h)
        })?;
        let mut w = Worker {
            _ctx: Arc::clone(ctx),
            h,
            efd: -1,
        };
        // SAFETY: a live worker; writes one int.
        check("ucp_worker_get_efd", unsafe {
            sys::ucp_worker_get_efd(w.h, &mut w.efd)
        })?;
        Ok(w)
    }

    fn address(&self) -> Result<Vec<u8>, UcxError> {
        let mut a = std::ptr::null_mut();
        let mut n = 0usize;
        // SAFETY: a live worker; UCX allocates the address and we release it below.
        check("ucp_worker_get_address", unsafe {
            sys::ucp_worker_get_address(self.h, &mut a, &mut n)
        })?;
        // SAFETY: UCX returned `n` readable bytes at `a`.
        let v = unsafe { std::slice::from_raw_parts(a as *const u8, n) }.to_vec();
        // SAFETY: released once, by the worker that made it.
        unsafe { sys::ucp_worker_release_address(self.h, a) };
        Ok(v)
    }

    /// Progresses until nothing is left to do right now.
    fn progress(&self) {
        // SAFETY: a live worker, used by this thread only (single-thread mode, not Sync).
        while unsafe { sys::ucp_worker_progress(self.h) } != 0 {}
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: every endpoint of this worker is closed (Connection closes its endpoint in
        // its own Drop, before its Worker field drops).
        unsafe { sys::ucp_worker_destroy(self.h) };
    }
}

/// A KV region mapped and registered with UCX once.
pub struct Registration {
    ctx: Arc<Context>,
    memh: sys::ucp_mem_h,
    map: MappedRegion,
    rkey: Vec<u8>,
}

// SAFETY: the memory handle is a context-level object (thread-safe with mt_workers_shared);
// the mapping is shared memory accessed through raw pointers only.
unsafe impl Send for Registration {}
// SAFETY: as above; nothing is mutated through &self.
unsafe impl Sync for Registration {}

impl Registration {
    /// Registers a mapped region (its blocks, from block 0 to the last).
    pub fn new(ctx: &Arc<Context>, map: MappedRegion) -> Result<Registration, UcxError> {
        let len = map
            .region()
            .len()
            .filter(|l| *l > 0)
            .ok_or_else(|| UcxError::Invalid("empty KV region".into()))?;
        let base = map
            .block_ptr(0)
            .ok_or_else(|| UcxError::Invalid("empty KV region".into()))?;
        let params = sys::ucp_mem_map_params_t {
            field_mask: sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH,
            address: base as *mut c_void,
            length: len as usize,
            flags: 0,
            prot: 0,
            memory_type: 0,
        };
        let mut memh = std::ptr::null_mut();
        // SAFETY: base..base+len is inside the mapping (`MappedRegion::map` checked the region
        // against the file), which this Registration owns and unmaps only after ucp_mem_unmap.
        check("ucp_mem_map", unsafe {
            sys::ucp_mem_map(ctx.h, &params, &mut memh)
        })?;
        let mut buf = std::ptr::null_mut();
        let mut n = 0usize;
        // SAFETY: a live memh of this context; UCX allocates the buffer, released below.
        let s = unsafe { sys::ucp_rkey_pack(ctx.h, memh, &mut buf, &mut n) };
        if let Err(e) = check("ucp_rkey_pack", s) {
            // SAFETY: registered above, unregistered once.
            unsafe { sys::ucp_mem_unmap(ctx.h, memh) };
            return Err(e);
        }
        // SAFETY: UCX returned `n` readable bytes at `buf`.
        let rkey = unsafe { std::slice::from_raw_parts(buf as *const u8, n) }.to_vec();
        // SAFETY: released once.
        unsafe { sys::ucp_rkey_buffer_release(buf) };
        Ok(Registration {
            ctx: Arc::clone(ctx),
            memh,
            map,
            rkey,
        })
    }

    /// The address of block 0 (the remote address a peer puts at).
    pub fn address(&self) -> u64 {
        self.map.block_ptr(0).map_or(0, |p| p as u64)
    }

    /// The packed remote key.
    pub fn rkey(&self) -> &[u8] {
        &self.rkey
    }

    /// The registered mapping.
    pub fn mapped(&self) -> &MappedRegion {
        &self.map
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: registered in `new`, unregistered once; the mapping (a field) is dropped after.
        unsafe { sys::ucp_mem_unmap(self.ctx.h, self.memh) };
    }
}

/// Registrations by region, made once per region and kept while its segment stays the same
/// file.
pub struct Registry {
    ctx: Arc<Context>,
    entries: Mutex<HashMap<RegionKey, Arc<Registration>>>,
}

/// A region by segment handle, layer and offset.
type RegionKey = (Vec<u8>, u32, u64);

impl Registry {
    /// An empty registry.
    pub fn new(ctx: Arc<Context>) -> Registry {
        Registry {
            ctx,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The registration of `region`: the one made earlier when the segment is still the file
    /// registered then, else a new one (replacing the stale one).
    pub fn get(&self, region: &KvRegion) -> Result<Arc<Registration>, UcxError> {
        let key = (region.handle.clone(), region.layer, region.offset);
        let fresh = MappedRegion::map(region)?;
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = m.get(&key) {
            let same = r.map.file_id() == fresh.file_id()
                && r.map.region().num_blocks == region.num_blocks
                && r.map.region().block_size_bytes == region.block_size_bytes;
            if same {
                return Ok(Arc::clone(r));
            }
        }
        let r = Arc::new(Registration::new(&self.ctx, fresh)?);
        m.insert(key, Arc::clone(&r));
        Ok(r)
    }

    /// Registrations held.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This llumlet's UCX worker, shared by every migration in and out: a thread progresses it
/// and sleeps on its event descriptor when there is nothing to do (UCX's software RMA over TCP
/// needs the destination to progress; verbs and shared memory do not, and cost it nothing);
/// a source waiting for its puts progresses it itself. One long-lived worker also means a
/// destination never answers the wire-up of a source worker that is already gone.
pub struct Node {
    shared: Arc<Shared>,
    address: Vec<u8>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    ctx: Arc<Context>,
    worker: Mutex<Worker>,
    efd: i32,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Worker> {
        self.worker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms the worker and, when nothing is pending, releases it and sleeps on its event
    /// descriptor until an event or `timeout`.
    fn sleep<'a>(
        &'a self,
        w: std::sync::MutexGuard<'a, Worker>,
        timeout: Duration,
    ) -> std::sync::MutexGuard<'a, Worker> {
        // SAFETY: a live worker, used under its lock.
        let s = unsafe { sys::ucp_worker_arm(w.h) };
        if s != sys::UCS_OK {
            // Busy: events are pending. Another failure: do not sleep on an unarmed fd.
            if s != sys::UCS_ERR_BUSY {
                drop(w);
                std::thread::sleep(Duration::from_millis(1));
                return self.lock();
            }
            return w;
        }
        drop(w);
        let mut pfd = libc::pollfd {
            fd: self.efd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one pollfd we own; EINTR is a harmless early return.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.lock()
    }

    /// Waits for `req` (a status pointer from a non-blocking call) and frees it.
    fn complete(
        &self,
        what: &'static str,
        req: sys::ucs_status_ptr_t,
        timeout: Duration,
    ) -> Result<(), UcxError> {
        if !sys::ucs_ptr_is_ptr(req) {
            return check(what, sys::ucs_ptr_status(req));
        }
        let deadline = Instant::now() + timeout;
        let spin_until = Instant::now() + SPIN;
        let mut w = self.lock();
        loop {
            w.progress();
            // SAFETY: `req` is a live request handle until freed below.
            let s = unsafe { sys::ucp_request_check_status(req) };
            if s != sys::UCS_INPROGRESS {
                // SAFETY: complete; freed once.
                unsafe { sys::ucp_request_free(req) };
                return check(what, s);
            }
            let now = Instant::now();
            if now >= deadline {
                // SAFETY: cancel, then free: UCX releases it when the cancel completes.
                unsafe {
                    sys::ucp_request_cancel(w.h, req);
                    sys::ucp_request_free(req);
                }
                return Err(UcxError::Timeout {
                    what,
                    after: timeout,
                });
            }
            // While a transfer is in flight, poll for a moment before sleeping: the next
            // completion is usually microseconds away, and a wakeup costs more than that.
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            w = self.sleep(w, (deadline - now).min(Duration::from_millis(20)));
        }
    }
}

impl Node {
    /// Creates the worker and starts progressing it.
    pub fn start(ctx: &Arc<Context>) -> Result<Node, UcxError> {
        let worker = Worker::new(ctx)?;
        let address = worker.address()?;
        let shared = Arc::new(Shared {
            ctx: Arc::clone(ctx),
            efd: worker.efd,
            worker: Mutex::new(worker),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("llumlet-ucx".into())
            .spawn(move || {
                let mut w = s.lock();
                while !s.stop.load(Ordering::Relaxed) {
                    w.progress();
                    w = s.sleep(w, Duration::from_millis(100));
                }
            })
            .map_err(|e| UcxError::Invalid(format!("cannot start the UCX progress thread: {e}")))?;
        Ok(Node {
            shared,
            address,
            thread: Some(thread),
        })
    }

    /// The worker's address, for a source's endpoint.
    pub fn address(&self) -> &[u8] {
        &self.address
    }

    /// The context.
    pub fn context(&self) -> &Arc<Context> {
        &self.shared.ctx
    }

    /// Connects to the destination worker `address` and unpacks its regions' keys.
    pub fn connect(
        &self,
        address: &[u8],
        regions: &[RemoteRegion],
    ) -> Result<Connection, UcxError> {
        if address.is_empty() {
            return Err(UcxError::Invalid("empty UCX worker address".into()));
        }
        let w = self.shared.lock();
        // Peer-failure handling first (a dead destination fails the puts instead of leaving
        // them pending); UCX's shared-memory transports cannot detect a dead peer, so where
        // only they reach the destination, connect without it: completion is then bounded by
        // the flush timeout alone (a dead same-host destination's memory stays mapped, so late
        // puts land in memory nobody reads).
        let mut ep = std::ptr::null_mut();
        let mut peer_failure = self.shared.ctx.may_detect_peer_failure();
        let modes: &[std::ffi::c_uint] = if peer_failure {
            &[
                sys::UCP_ERR_HANDLING_MODE_PEER,
                sys::UCP_ERR_HANDLING_MODE_NONE,
            ]
        } else {
            &[sys::UCP_ERR_HANDLING_MODE_NONE]
        };
        for &mode in modes {
            let params = ep_params(address, mode);
            // SAFETY: a live worker under its lock; `address` is the peer's packed worker
            // address (UCX validates what it parses); params outlive the call.
            let s = unsafe { sys::ucp_ep_create(w.h, &params, &mut ep) };
            if s == sys::UCS_ERR_UNREACHABLE && mode == sys::UCP_ERR_HANDLING_MODE_PEER {
                peer_failure = false;
                continue;
            }
            check("ucp_ep_create", s)?;
            break;
        }
        drop(w);
        let mut c = Connection {
            shared: Arc::clone(&self.shared),
            rkeys: Vec::with_capacity(regions.len()),
            ep,
            pending: Vec::new(),
            peer_failure,
            failed: false,
        };
        for r in regions {
            if r.rkey.is_empty() {
                return Err(UcxError::Invalid("empty remote key".into()));
            }
            let mut k = std::ptr::null_mut();
            let _w = c.shared.lock();
            // SAFETY: a live endpoint, used under its worker's lock; the buffer holds a key
            // packed by the peer's ucp_rkey_pack (UCX checks what it unpacks).
            check("ucp_ep_rkey_unpack", unsafe {
                sys::ucp_ep_rkey_unpack(c.ep, r.rkey.as_ptr() as *const c_void, &mut k)
            })?;
            c.rkeys.push((k, r.clone()));
        }
        Ok(c)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let w = self.shared.lock();
            // SAFETY: a live worker; wakes the progress thread's poll.
            unsafe { sys::ucp_worker_signal(w.h) };
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the destination tells the source about one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Address of block 0 in the destination's registration.
    pub address: u64,
    /// Blocks.
    pub num_blocks: u64,
    /// Bytes per block.
    pub block_size_bytes: u64,
    /// Packed remote key.
    pub rkey: Vec<u8>,
}

/// An endpoint of this llumlet's worker to one destination, with the destination's keys.
pub struct Connection {
    shared: Arc<Shared>,
    rkeys: Vec<(sys::ucp_rkey_h, RemoteRegion)>,
    ep: sys::ucp_ep_h,
    pending: Vec<sys::ucs_status_ptr_t>,
    peer_failure: bool,
    failed: bool,
}

// SAFETY: the endpoint, keys and requests are only used under the worker's lock; the
// Connection moves between threads, never shared (not Sync).
unsafe impl Send for Connection {}

impl Connection {
    /// Whether UCX detects a dead destination on this connection (false on shared-memory-only
    /// paths).
    pub fn detects_peer_failure(&self) -> bool {
        self.peer_failure
    }

    /// The remote regions.
    pub fn remote(&self) -> impl Iterator<Item = &RemoteRegion> {
        self.rkeys.iter().map(|(_, r)| r)
    }

    /// Starts a put of `len` bytes from `src` (at `src_off` from its block 0) to remote region
    /// `region` at `dst_off`; both ranges are checked. Complete once [`Connection::flush`]
    /// returns.
    pub fn put(
        &mut self,
        src: &Arc<Registration>,
        src_off: u64,
        region: usize,
        dst_off: u64,
        len: u64,
    ) -> Result<(), UcxError> {
        let src_len = src.map.region().len().unwrap_or(0);
        let (k, remote) = self
            .rkeys
            .get(region)
            .ok_or_else(|| UcxError::Invalid(format!("no remote region {region}")))?;
        let dst_len = remote.num_blocks.saturating_mul(remote.block_size_bytes);
        let fits = |off: u64, total: u64| off.checked_add(len).is_some_and(|e| e <= total);
        if len == 0 || !fits(src_off, src_len) || !fits(dst_off, dst_len) {
            return Err(UcxError::Invalid(format!(
                "put of {len} bytes from {src_off} to region {region} at {dst_off} is outside a region"
            )));
        }
        let base = src
            .map
            .block_ptr(0)
            .ok_or_else(|| UcxError::Invalid("empty source region".into()))?;
        let mut param = empty_param(sys::UCP_OP_ATTR_FIELD_MEMH, 0);
        param.memh = src.memh;
        let _w = self.shared.lock();
        // SAFETY: under the worker's lock; the source range is inside the registered mapping
        // (checked above), which the caller's Arc keeps alive, and the transport keeps the Arc
        // until `flush` completed; the remote range is inside the region the key covers
        // (checked above); `k` belongs to this endpoint.
        let r = unsafe {
            sys::ucp_put_nbx(
                self.ep,
                base.add(src_off as usize) as *const c_void,
                len as usize,
                remote.address + dst_off,
                *k,
                &param,
            )
        };
        if sys::ucs_ptr_is_ptr(r) {
            self.pending.push(r);
            Ok(())
        } else {
            let r = check("ucp_put_nbx", sys::ucs_ptr_status(r));
            self.failed |= r.is_err();
            r
        }
    }

    /// Waits until every put so far is complete at the destination (`ucp_ep_flush_nbx`).
    pub fn flush(&mut self, timeout: Duration) -> Result<(), UcxError> {
        let param = empty_param(0, 0);
        let req = {
            let _w = self.shared.lock();
            // SAFETY: a live endpoint under its worker's lock; param outlives the call.
            unsafe { sys::ucp_ep_flush_nbx(self.ep, &param) }
        };
        let flushed = self.shared.complete("ucp_ep_flush_nbx", req, timeout);
        // The puts: complete (the flush waited for them) or failed with the endpoint.
        let mut first_err = None;
        let _w = self.shared.lock();
        for r in self.pending.drain(..) {
            // SAFETY: a live request handle, freed once here.
            let s = unsafe { sys::ucp_request_check_status(r) };
            if s != sys::UCS_OK && s != sys::UCS_INPROGRESS && first_err.is_none() {
                first_err = Some(UcxError::Call {
                    call: "ucp_put_nbx",
                    status: status_string(s),
                });
            }
            // SAFETY: freed once; UCX releases an incomplete one when it completes.
            unsafe { sys::ucp_request_free(r) };
        }
        let r = flushed.and(first_err.map_or(Ok(()), Err));
        self.failed |= r.is_err();
        r
    }
}

fn ep_params(address: &[u8], err_mode: std::ffi::c_uint) -> sys::ucp_ep_params_t {
    sys::ucp_ep_params_t {
        field_mask: sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
            | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        address: address.as_ptr() as *const sys::ucp_address,
        err_mode,
        err_handler: sys::ucp_err_handler_t {
            cb: None,
            arg: std::ptr::null_mut(),
        },
        user_data: std::ptr::null_mut(),
        flags: 0,
        sockaddr: sys::ucs_sock_addr_t {
            addr: std::ptr::null(),
            addrlen: 0,
        },
        conn_request: std::ptr::null_mut(),
        name: std::ptr::null(),
        local_sockaddr: sys::ucs_sock_addr_t {
            addr: std::ptr::null(),
            addrlen: 0,
        },
    }
}

fn empty_param(mask: u32, flags: u32) -> sys::ucp_request_param_t {
    sys::ucp_request_param_t {
        op_attr_mask: mask,
        flags,
        request: std::ptr::null_mut(),
        cb: None,
        datatype: 0,
        user_data: std::ptr::null_mut(),
        reply_buffer: std::ptr::null_mut(),
        memory_type: 0,
        recv_info: std::ptr::null_mut(),
        memh: std::ptr::null_mut(),
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let req = {
            let _w = self.shared.lock();
            for (k, _) in self.rkeys.drain(..) {
                // SAFETY: unpacked by this endpoint, destroyed once, before it closes.
                unsafe { sys::ucp_rkey_destroy(k) };
            }
            for r in self.pending.drain(..) {
                // SAFETY: freed once; UCX releases it when the forced close completes it.
                unsafe { sys::ucp_request_free(r) };
            }
            // A healthy endpoint closes gracefully (the destination's worker drops its side
            // too, so a later endpoint between the same workers starts clean); one that failed
            // is closed by force, without waiting for the peer.
            let param = if self.failed {
                empty_param(sys::UCP_OP_ATTR_FIELD_FLAGS, sys::UCP_EP_CLOSE_FLAG_FORCE)
            } else {
                empty_param(0, 0)
            };
            // SAFETY: a live endpoint, closed once.
            unsafe { sys::ucp_ep_close_nbx(self.ep, &param) }
        };
        let _ = self
            .shared
            .complete("ucp_ep_close_nbx", req, Duration::from_secs(2));
    }
}

/// The source's end of the `ucx` transport: puts each run of every region into the
/// destination's registered regions, checked against the reservation first.
pub struct UcxTransport {
    conn: Connection,
    src: Vec<Arc<Registration>>,
    reserved: ReservedBlocks,
    timeout: Duration,
}

impl UcxTransport {
    /// A transport over `conn`, reading from `src` (this engine's regions, registered; in the
    /// order of the migration's regions), writing within `reserved`; each copy waits at most
    /// `timeout` for completion.
    pub fn new(
        conn: Connection,
        src: Vec<Arc<Registration>>,
        reserved: ReservedBlocks,
        timeout: Duration,
    ) -> UcxTransport {
        UcxTransport {
            conn,
            src,
            reserved,
            timeout,
        }
    }
}

impl Transport for UcxTransport {
    fn name(&self) -> &'static str {
        "ucx"
    }

    fn set_reserved(&mut self, reserved: ReservedBlocks) {
        self.reserved = reserved;
    }

    fn copy(&mut self, src: &[MappedRegion], runs: &[BlockRun]) -> Result<u64, TransportError> {
        let remote: Vec<(u64, u64)> = self
            .conn
            .remote()
            .map(|r| (r.num_blocks, r.block_size_bytes))
            .collect();
        check_layouts(&layout(src), &remote)?;
        if self.src.len() != src.len() {
            return Err(TransportError::Layout(format!(
                "{} registered regions for {} source regions",
                self.src.len(),
                src.len()
            )));
        }
        for r in runs {
            for s in src {
                check_src(s, r)?;
            }
            let inside = remote
                .iter()
                .all(|(n, _)| u64::from(r.dst) + u64::from(r.len) <= *n);
            if !self.reserved.contains_run(r.dst, r.len) || !inside {
                return Err(TransportError::OutOfReservation {
                    region: 0,
                    dst: r.dst,
                    len: r.len,
                });
            }
        }
        let mut bytes = 0;
        for (i, reg) in self.src.iter().enumerate() {
            let bsz = reg.map.region().block_size_bytes;
            for r in runs {
                let len = u64::from(r.len) * bsz;
                self.conn
                    .put(reg, u64::from(r.src) * bsz, i, u64::from(r.dst) * bsz, len)
                    .map_err(|e| TransportError::Backend(e.to_string()))?;
                bytes += len;
            }
        }
        self.conn
            .flush(self.timeout)
            .map_err(|e| TransportError::Backend(e.to_string()))?;
        Ok(bytes)
    }
}
