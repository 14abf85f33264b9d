//! The CUDA IPC transport (feature `cuda`): an engine exports its GPU KV regions with
//! `cuIpcGetMemHandle` and registers the 64 handle bytes; a llumlet on the same host opens
//! both engines' handles (`cuIpcOpenMemHandle`) and copies each coalesced run device to device
//! on its own stream, waiting on an event for completion.
//!
//! The driver library is loaded at run time (cudarc's dynamic loading), so the feature builds
//! and runs on machines without a GPU or a driver. cudarc panics when `libcuda` or one of its
//! symbols is missing, so nothing here calls into it before [`probe`] has found the library and
//! every symbol this module uses: without them every entry point returns
//! [`CudaError::Unavailable`] naming what is missing.

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use cudarc::driver::sys;

use crate::kv::CacheShape;
use crate::runs::BlockRun;
use crate::transport::{check_layouts, ReservedBlocks, TransportError};

/// Every driver symbol this module calls.
const SYMBOLS: [&str; 23] = [
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuGetErrorString",
];

/// CUDA errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    /// No driver library, a missing symbol, or no device.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("{call}: {what}")]
    Call {
        /// The call.
        call: &'static str,
        /// The driver's error string.
        what: String,
    },
    /// Bad input (a handle of the wrong size, a copy outside a region).
    #[error("{0}")]
    Invalid(String),
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// GPUs visible.
    pub devices: i32,
    /// The driver's CUDA version (12040 = 12.4).
    pub driver_version: i32,
    /// The driver is the test double (tests/fake-cuda): host memory standing in for a GPU.
    /// Nothing measured over it is a GPU figure.
    pub test_double: bool,
}

/// Looks for the driver library and every symbol used here, then initialises the driver and
/// counts devices; the answer is cached. Never panics.
pub fn probe() -> Result<Gpu, CudaError> {
    static PROBE: OnceLock<Result<Gpu, CudaError>> = OnceLock::new();
    PROBE.get_or_init(probe_once).clone()
}

fn probe_once() -> Result<Gpu, CudaError> {
    let names = cudarc::get_lib_name_candidates("cuda");
    let mut lib = std::ptr::null_mut();
    for n in &names {
        let Ok(c) = std::ffi::CString::new(n.as_str()) else {
            continue;
        };
        // SAFETY: dlopen with a NUL-terminated name; the handle is kept open (cudarc opens the
        // same library by the same names, so it will find it too).
        lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !lib.is_null() {
            break;
        }
    }
    if lib.is_null() {
        return Err(CudaError::Unavailable(
            "no CUDA driver library (libcuda) on this machine".into(),
        ));
    }
    for s in SYMBOLS {
        let c = std::ffi::CString::new(s).expect("symbol names have no NUL");
        // SAFETY: a live handle from dlopen and a NUL-terminated symbol name.
        if unsafe { libc::dlsym(lib, c.as_ptr()) }.is_null() {
            return Err(CudaError::Unavailable(format!(
                "the CUDA driver has no {s} (too old)"
            )));
        }
    }
    // SAFETY: a live handle and a NUL-terminated name; only the test double exports it.
    let test_double = !unsafe { libc::dlsym(lib, c"llumlet_fake_cuda".as_ptr()) }.is_null();
    // SAFETY: the library and every symbol we call are present (checked above), so cudarc's
    // loader does not panic.
    call("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| CudaError::Unavailable(e.to_string()))?;
    let (mut devices, mut driver_version) = (0, 0);
    // SAFETY: as above; each writes one int we own.
    call("cuDeviceGetCount", unsafe {
        sys::cuDeviceGetCount(&mut devices)
    })
    .map_err(|e| CudaError::Unavailable(e.to_string()))?;
    // SAFETY: as above.
    call("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut driver_version)
    })
    .map_err(|e| CudaError::Unavailable(e.to_string()))?;
    if devices == 0 {
        return Err(CudaError::Unavailable("no CUDA device".into()));
    }
    Ok(Gpu {
        devices,
        driver_version,
        test_double,
    })
}

fn call(name: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: only reached after `probe` succeeded (every caller holds a Device, made after
    // it); writes a pointer to a static string or leaves it null.
    unsafe { sys::cuGetErrorString(r, &mut s) };
    let what = if s.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: a static NUL-terminated string from the driver.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    };
    Err(CudaError::Call { call: name, what })
}

/// Retains GPU `ordinal`'s primary context once for the rest of the process (idempotent). A
/// primary context is destroyed when its last retain is released, and creating one costs the
/// driver a context set-up (tens to hundreds of milliseconds): a llumlet that opens a [`Device`]
/// per migration calls this first, so only its first migration pays.
pub fn keep_primary_context(ordinal: i32) -> Result<(), CudaError> {
    static KEPT: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if !kept.contains(&ordinal) {
        // Deliberately never released.
        retain_primary(ordinal)?;
        kept.push(ordinal);
    }
    Ok(())
}

/// GPU `ordinal` and its primary context, retained once (the caller releases it).
fn retain_primary(ordinal: i32) -> Result<(sys::CUdevice, sys::CUcontext), CudaError> {
    probe()?;
    let mut dev = 0;
    // SAFETY: probe succeeded (library and symbols present); writes one handle.
    call("cuDeviceGet", unsafe {
        sys::cuDeviceGet(&mut dev, ordinal)
    })?;
    let mut ctx = std::ptr::null_mut();
    // SAFETY: as above; writes one handle.
    call("cuDevicePrimaryCtxRetain", unsafe {
        sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
    })?;
    Ok((dev, ctx))
}

/// One GPU: its primary context (made current on the calling thread by every method) and a
/// stream for copies.
pub struct Device {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    done: sys::CUevent,
}

// SAFETY: the context is made current on whichever thread calls a method; the stream and event
// are used by one thread at a time (&mut self for copies; Device is not Sync).
unsafe impl Send for Device {}

impl Device {
    /// Opens GPU `ordinal` (after [`probe`]).
    pub fn open(ordinal: i32) -> Result<Device, CudaError> {
        // The primary context is released in Drop.
        let (dev, ctx) = retain_primary(ordinal)?;
        let mut d = Device {
            dev,
            ctx,
            stream: std::ptr::null_mut(),
            done: std::ptr::null_mut(),
        };
        d.current()?;
        // SAFETY: a current context; the stream and event are destroyed in Drop.
        call("cuStreamCreate", unsafe {
            sys::cuStreamCreate(
                &mut d.stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            )
        })?;
        // SAFETY: as above.
        call("cuEventCreate", unsafe {
            sys::cuEventCreate(
                &mut d.done,
                sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
                    | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32,
            )
        })?;
        Ok(d)
    }

    fn current(&self) -> Result<(), CudaError> {
        // SAFETY: a retained primary context.
        call("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    /// Allocates `bytes` of device memory (an engine's KV region; the tests' and the
    /// benchmark's buffers).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        self.current()?;
        let mut ptr = 0;
        // SAFETY: a current context; freed in DeviceBuffer's Drop.
        call("cuMemAlloc_v2", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, bytes)
        })?;
        Ok(DeviceBuffer {
            ctx: self.ctx,
            ptr,
            len: bytes,
        })
    }

    /// Opens another process's exported allocation (64 handle bytes); `len` is what the
    /// exporter registered (the driver maps the whole allocation).
    pub fn open_ipc(&self, handle: &[u8], len: u64) -> Result<IpcMapping, CudaError> {
        let h = ipc_handle(handle)?;
        self.current()?;
        let mut ptr = 0;
        // SAFETY: a current context; the handle bytes are whatever the peer registered (the
        // driver validates them); closed in Drop.
        call("cuIpcOpenMemHandle_v2", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        Ok(IpcMapping {
            ctx: self.ctx,
            ptr,
            len,
        })
    }

    /// Copies runs between opened regions on this device's stream and waits for the event
    /// recorded after them; returns the bytes copied. Every run is checked first.
    pub fn copy_runs(
        &mut self,
        src: &[DeviceRegion],
        dst: &[DeviceRegion],
        reserved: &ReservedBlocks,
        runs: &[BlockRun],
    ) -> Result<u64, TransportError> {
        let shape = |v: &[DeviceRegion]| -> Vec<(u64, u64)> {
            v.iter()
                .map(|r| (r.num_blocks, r.block_size_bytes))
                .collect()
        };
        check_layouts(&shape(src), &shape(dst))?;
        for r in runs {
            let end = |n: u64| r.len > 0 && u64::from(r.src) + u64::from(r.len) <= n;
            if !src.iter().all(|s| end(s.num_blocks)) {
                return Err(TransportError::OutOfSource {
                    src: r.src,
                    len: r.len,
                });
            }
            let inside = dst
                .iter()
                .all(|d| u64::from(r.dst) + u64::from(r.len) <= d.num_blocks);
            if !reserved.contains_run(r.dst, r.len) || !inside {
                return Err(TransportError::OutOfReservation {
                    region: 0,
                    dst: r.dst,
                    len: r.len,
                });
            }
        }
        let backend = |e: CudaError| TransportError::Backend(e.to_string());
        self.current().map_err(backend)?;
        let mut bytes = 0;
        for (s, d) in src.iter().zip(dst) {
            for r in runs {
                let n = u64::from(r.len) * s.block_size_bytes;
                let sp = s.base + u64::from(r.src) * s.block_size_bytes;
                let dp = d.base + u64::from(r.dst) * d.block_size_bytes;
                // SAFETY: both ranges lie inside their regions (checked above against
                // num_blocks; each region lies inside its opened allocation, checked when the
                // DeviceRegion was made); different allocations, so no overlap.
                call("cuMemcpyDtoDAsync_v2", unsafe {
                    sys::cuMemcpyDtoDAsync_v2(dp, sp, n as usize, self.stream)
                })
                .map_err(backend)?;
                bytes += n;
            }
        }
        self.wait_stream().map_err(backend)?;
        Ok(bytes)
    }

    /// Records the event after what is queued on the stream and waits for it (the current
    /// context is this device's).
    fn wait_stream(&mut self) -> Result<(), CudaError> {
        // SAFETY: live event and stream of this context.
        call("cuEventRecord", unsafe {
            sys::cuEventRecord(self.done, self.stream)
        })?;
        // SAFETY: a recorded event.
        call("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.done)
        })
    }

    /// The plain device-to-device copy the `cuda` transport is measured against: the first
    /// `bytes` of `src` into `dst` as one copy on this device's stream, then the same event
    /// wait as [`Device::copy_runs`].
    pub fn copy_buffer(
        &mut self,
        dst: &DeviceBuffer,
        src: &DeviceBuffer,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if bytes > dst.len || bytes > src.len {
            return Err(CudaError::Invalid(format!(
                "{bytes} bytes do not fit buffers of {} and {}",
                src.len, dst.len
            )));
        }
        self.current()?;
        // SAFETY: both ranges lie inside their allocations (checked above); different
        // allocations (two DeviceBuffers), so no overlap.
        call("cuMemcpyDtoDAsync_v2", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst.ptr, src.ptr, bytes, self.stream)
        })?;
        self.wait_stream()
    }

    /// Waits until everything this process asked of the GPU has completed, host-to-device
    /// copies included (from pageable memory they may return before the bytes land, and
    /// another process reads them on its own stream).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.current()?;
        // SAFETY: a current context.
        call("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    /// The device ordinal's handle.
    pub fn ordinal(&self) -> i32 {
        self.dev
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.current();
        // SAFETY: created in `open`, destroyed once; the primary context is released last.
        unsafe {
            if !self.done.is_null() {
                sys::cuEventDestroy_v2(self.done);
            }
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

fn ipc_handle(bytes: &[u8]) -> Result<sys::CUipcMemHandle, CudaError> {
    if bytes.len() != 64 {
        return Err(CudaError::Invalid(format!(
            "a CUDA IPC handle is 64 bytes, got {}",
            bytes.len()
        )));
    }
    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
    for (d, s) in h.reserved.iter_mut().zip(bytes) {
        *d = *s as std::ffi::c_char;
    }
    Ok(h)
}

/// Device memory this process allocated.
pub struct DeviceBuffer {
    ctx: sys::CUcontext,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a device address and a context handle; the context is made current before use.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 64 bytes another process opens this allocation with.
    pub fn ipc_handle(&self) -> Result<[u8; 64], CudaError> {
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: the owning context made current; `ptr` is this allocation's base.
        call("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })?;
        // SAFETY: as above; writes the handle we own.
        call("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut h, self.ptr)
        })?;
        let mut out = [0u8; 64];
        for (d, s) in out.iter_mut().zip(h.reserved) {
            *d = s as u8;
        }
        Ok(out)
    }

    /// Host to device at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), CudaError> {
        write_at(self.ctx, self.ptr, self.len, off, data)
    }

    /// Device to host from `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<(), CudaError> {
        read_at(self.ctx, self.ptr, self.len, off, out)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `Device::alloc`, freed once, with its context current.
        unsafe {
            sys::cuCtxSetCurrent(self.ctx);
            sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// Another process's allocation, opened here.
pub struct IpcMapping {
    ctx: sys::CUcontext,
    ptr: sys::CUdeviceptr,
    len: u64,
}

// SAFETY: as DeviceBuffer.
unsafe impl Send for IpcMapping {}

impl IpcMapping {
    /// The device address here.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// A region of `num_blocks` blocks of `block_size_bytes` at `offset` in this mapping,
    /// checked against the registered length.
    pub fn region(
        &self,
        offset: u64,
        num_blocks: u64,
        block_size_bytes: u64,
    ) -> Result<DeviceRegion, CudaError> {
        let end = num_blocks
            .checked_mul(block_size_bytes)
            .and_then(|l| l.checked_add(offset));
        match end {
            Some(e) if e <= self.len => Ok(DeviceRegion {
                base: self.ptr + offset,
                num_blocks,
                block_size_bytes,
            }),
            _ => Err(CudaError::Invalid(format!(
                "region of {num_blocks} blocks of {block_size_bytes} bytes at {offset} is larger than the {}-byte allocation",
                self.len
            ))),
        }
    }

    /// Device to host from `off` (checks).
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<(), CudaError> {
        read_at(self.ctx, self.ptr, self.len as usize, off, out)
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // SAFETY: opened in `Device::open_ipc`, closed once, with its context current.
        unsafe {
            sys::cuCtxSetCurrent(self.ctx);
            sys::cuIpcCloseMemHandle(self.ptr);
        }
    }
}

/// Blocks in device memory: base address, count and size (checked against its allocation when
/// made).
#[derive(Debug, Clone, Copy)]
pub struct DeviceRegion {
    base: u64,
    num_blocks: u64,
    block_size_bytes: u64,
}

impl DeviceRegion {
    /// A region inside a buffer this process allocated.
    pub fn in_buffer(
        b: &DeviceBuffer,
        offset: u64,
        num_blocks: u64,
        block_size_bytes: u64,
    ) -> Result<DeviceRegion, CudaError> {
        let end = num_blocks
            .checked_mul(block_size_bytes)
            .and_then(|l| l.checked_add(offset));
        match end {
            Some(e) if e <= b.len as u64 => Ok(DeviceRegion {
                base: b.ptr + offset,
                num_blocks,
                block_size_bytes,
            }),
            _ => Err(CudaError::Invalid("region larger than its buffer".into())),
        }
    }
}

fn bounds(len: usize, off: usize, n: usize) -> Result<(), CudaError> {
    match off.checked_add(n) {
        Some(e) if e <= len => Ok(()),
        _ => Err(CudaError::Invalid(format!(
            "{n} bytes at {off} is outside a {len}-byte allocation"
        ))),
    }
}

fn write_at(
    ctx: sys::CUcontext,
    ptr: u64,
    len: usize,
    off: usize,
    data: &[u8],
) -> Result<(), CudaError> {
    bounds(len, off, data.len())?;
    // SAFETY: a live context.
    call("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
    // SAFETY: the device range is inside the allocation (checked); `data` is readable.
    call("cuMemcpyHtoD_v2", unsafe {
        sys::cuMemcpyHtoD_v2(ptr + off as u64, data.as_ptr() as *const c_void, data.len())
    })
}

fn read_at(
    ctx: sys::CUcontext,
    ptr: u64,
    len: usize,
    off: usize,
    out: &mut [u8],
) -> Result<(), CudaError> {
    bounds(len, off, out.len())?;
    // SAFETY: a live context.
    call("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
    // SAFETY: the device range is inside the allocation (checked); `out` is writable and ours.
    call("cuMemcpyDtoH_v2", unsafe {
        sys::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, ptr + off as u64, out.len())
    })
}

/// GPU regions named by IPC handles (one engine's KV cache), opened here: each distinct handle
/// once, each region checked against what its allocation was registered with.
pub struct OpenedRegions {
    _maps: Vec<IpcMapping>,
    regions: Vec<DeviceRegion>,
}

impl OpenedRegions {
    /// Opens `regions` (`(handle, offset, num_blocks, block_size_bytes)` each) on `dev`.
    pub fn open(
        dev: &Device,
        regions: &[(Vec<u8>, u64, u64, u64)],
    ) -> Result<OpenedRegions, CudaError> {
        let mut maps: Vec<(Vec<u8>, IpcMapping)> = Vec::new();
        let mut out = Vec::with_capacity(regions.len());
        for (handle, offset, blocks, bsz) in regions {
            // The allocation is at least as long as the furthest region registered in it.
            let len = regions
                .iter()
                .filter(|r| &r.0 == handle)
                .filter_map(|r| r.2.checked_mul(r.3).and_then(|l| l.checked_add(r.1)))
                .max()
                .unwrap_or(0);
            let i = match maps.iter().position(|(h, _)| h == handle) {
                Some(i) => i,
                None => {
                    maps.push((handle.clone(), dev.open_ipc(handle, len)?));
                    maps.len() - 1
                }
            };
            out.push(maps[i].1.region(*offset, *blocks, *bsz)?);
        }
        Ok(OpenedRegions {
            _maps: maps.into_iter().map(|(_, m)| m).collect(),
            regions: out,
        })
    }
}

/// The source's end of the `cuda` transport: both engines' GPU regions opened in this llumlet,
/// runs copied device to device on one stream, checked against the reservation first.
pub struct CudaTransport {
    dev: Device,
    src: OpenedRegions,
    dst: OpenedRegions,
    reserved: ReservedBlocks,
}

impl CudaTransport {
    /// A transport copying from `src` to `dst` (opened on `dev`) within `reserved`.
    pub fn new(
        dev: Device,
        src: OpenedRegions,
        dst: OpenedRegions,
        reserved: ReservedBlocks,
    ) -> CudaTransport {
        CudaTransport {
            dev,
            src,
            dst,
            reserved,
        }
    }
}

impl crate::transport::Transport for CudaTransport {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn set_reserved(&mut self, reserved: ReservedBlocks) {
        self.reserved = reserved;
    }

    /// `_host` is empty: the source's regions are the GPU regions opened in `new`.
    fn copy(
        &mut self,
        _host: &[crate::kv::MappedRegion],
        runs: &[BlockRun],
    ) -> Result<u64, TransportError> {
        self.dev
            .copy_runs(&self.src.regions, &self.dst.regions, &self.reserved, runs)
    }
}

/// An engine's KV cache on the GPU (the simulated engine's GPU mode): one allocation holding
/// `layers` regions of `num_blocks` blocks each, exported as one IPC handle. The engine writes
/// token slots with host-to-device copies and reads them back to verify.
pub struct GpuKvCache {
    // Dropped before `dev`, whose primary context it is freed in.
    buf: DeviceBuffer,
    dev: Device,
    shape: CacheShape,
}

impl GpuKvCache {
    /// Allocates the cache on GPU `ordinal`, zeroed.
    pub fn create(
        ordinal: i32,
        layers: u32,
        num_blocks: u64,
        block_size_bytes: u64,
        token_size_bytes: u64,
    ) -> Result<GpuKvCache, CudaError> {
        let shape = CacheShape {
            layers,
            num_blocks,
            block_size_bytes,
            token_size_bytes,
        };
        let total = shape
            .total_bytes()
            .and_then(|t| usize::try_from(t).ok())
            .ok_or_else(|| CudaError::Invalid("empty or overflowing KV cache shape".into()))?;
        let dev = Device::open(ordinal)?;
        let buf = dev.alloc(total)?;
        let zeros = vec![0u8; total.min(8 << 20)];
        let mut off = 0;
        while off < total {
            let n = zeros.len().min(total - off);
            buf.write(off, &zeros[..n])?;
            off += n;
        }
        dev.synchronize()?;
        Ok(GpuKvCache { buf, dev, shape })
    }

    /// The regions to register, one per layer, each naming the allocation's IPC handle.
    pub fn regions(&self) -> Result<Vec<crate::kv::KvRegion>, CudaError> {
        let handle = self.buf.ipc_handle()?;
        Ok(self.shape.regions(crate::kv::MemoryKind::CudaIpc, &handle))
    }

    /// Bytes of one token slot.
    pub fn token_size_bytes(&self) -> u64 {
        self.shape.token_size_bytes
    }

    /// Waits until every write to the cache has landed in device memory. A host-to-device copy
    /// from pageable memory may return before its DMA completes, and another process (the
    /// llumlet) reads the cache on its own stream: the engine calls this at the end of each
    /// step, before it reports the step's state, as a real engine's step ends synchronized.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.dev.synchronize()
    }

    /// The byte offset of `len` bytes of whole token slots of one block from `slot`.
    fn span(&self, layer: u32, block: u64, slot: u64, len: usize) -> Result<usize, CudaError> {
        let tsb = self.shape.token_size_bytes;
        let n = len as u64 / tsb;
        match self.shape.span(layer, block, slot, n) {
            Some(off) if n * tsb == len as u64 => Ok(off as usize),
            _ => Err(CudaError::Invalid(format!(
                "{len} bytes at layer {layer} block {block} slot {slot} are not whole token slots inside the block"
            ))),
        }
    }

    /// Writes `data` (whole token slots) into one block from `slot`.
    pub fn write_tokens(
        &self,
        layer: u32,
        block: u64,
        slot: u64,
        data: &[u8],
    ) -> Result<(), CudaError> {
        self.buf
            .write(self.span(layer, block, slot, data.len())?, data)
    }

    /// Reads whole token slots of one block from `slot` into `out`.
    pub fn read_tokens(
        &self,
        layer: u32,
        block: u64,
        slot: u64,
        out: &mut [u8],
    ) -> Result<(), CudaError> {
        let off = self.span(layer, block, slot, out.len())?;
        self.buf.read(off, out)
    }
}
