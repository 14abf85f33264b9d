//! The control segment: one shared-memory file per engine instance, created by the engine,
//! attached by the llumlet. It is a sealed memory file (see [`crate::sealed`]): its size can
//! never change, so no truncation by anyone can make a mapping of it fault. At the segment's
//! path the engine publishes the locator that leads to it.
//!
//! ```text
//!  /dev/shm/llumlet-ctl-<escaped instance id>   the locator (mode 0600, created exclusively)
//!  memfd "llumlet-ctl-<escaped instance id>"    sealed, held open by the engine:
//!  +---------------------------------------------+ 0
//!  | Header (64-byte aligned, all atomics)       |  magic, layout version, sizes, layout hash,
//!  |                                             |  generation, writer pid, heartbeat, ready
//!  +---------------------------------------------+ size_of::<Header>()
//!  | StatusRingMem                               |  see status_ring.rs
//!  +---------------------------------------------+
//!  | QueueMem: llumlet → engine                  |  see command.rs
//!  | QueueMem: engine → llumlet                  |
//!  +---------------------------------------------+
//!  | RequestTableMem                             |  see request_table.rs (≈ 4.2 MiB, sparse)
//!  +---------------------------------------------+
//!  | KvRegistryMem                               |  see kv.rs
//!  +---------------------------------------------+ size_of::<ControlLayout>()
//! ```
//!
//! The creator fills the header and stores `ready` last (Release); an attacher loads `ready`
//! first (Acquire) and then checks every other field, so it gets a precise state: not there yet,
//! not ready, incompatible (which field), stale (its engine is gone), or ready. Every field is an atomic, so any bytes another
//! process left in the file are a valid value to look at. Integers are native-endian: the
//! segment is shared between processes of one host only.

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

use crate::command::{QueueMem, MESSAGE_WORDS, QUEUE_CAPACITY};
use crate::kv::{KvRegistryMem, HANDLE_BYTES, MAX_KV_REGIONS};
use crate::request_table::{RequestTableMem, MAX_BLOCKS_PER_REQUEST, MAX_REQUESTS};
use crate::sealed::{Found, Locator, Published, Unusable};
use crate::status_ring::{
    StatusCounters, StatusRecord, StatusRingMem, MAX_REQUEST_IDS, REQUEST_ID_BYTES, STATUS_SLOTS,
};
use crate::sys::monotonic_ns;

/// `LLUMLETC`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"LLUMLETC");
/// Bumped whenever the layout changes.
pub const LAYOUT_VERSION: u32 = 3;
/// The value of `ready` once the header is complete.
pub const READY: u32 = 0x5244_5921;
/// Directory of the segments.
pub const SHM_DIR: &str = "/dev/shm";
/// Prefix of every control segment name.
pub const NAME_PREFIX: &str = "llumlet-ctl-";

/// The segment header.
#[repr(C, align(64))]
pub struct Header {
    magic: AtomicU64,
    layout_version: AtomicU32,
    header_size: AtomicU32,
    status_record_size: AtomicU32,
    status_slots: AtomicU32,
    layout_hash: AtomicU64,
    total_size: AtomicU64,
    generation: AtomicU64,
    writer_pid: AtomicU32,
    ready: AtomicU32,
    heartbeat_ns: AtomicU64,
}

/// The whole control segment.
#[repr(C)]
pub struct ControlLayout {
    header: Header,
    status: StatusRingMem,
    to_engine: QueueMem,
    to_llumlet: QueueMem,
    requests: RequestTableMem,
    kv: KvRegistryMem,
}

/// Bytes of a control segment.
pub const SEGMENT_SIZE: usize = size_of::<ControlLayout>();
#[cfg(not(loom))]
const _: () = assert!(size_of::<Header>() == 64);
const _: () = assert!(SEGMENT_SIZE.is_multiple_of(64));

const fn fnv1a(mut h: u64, v: u64) -> u64 {
    let mut i = 0;
    while i < 8 {
        h ^= (v >> (i * 8)) & 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// A hash of everything the layout depends on, so two builds that disagree on any size or
/// offset refuse each other's segments even if they forgot to bump the version.
pub const LAYOUT_HASH: u64 = {
    let parts = [
        LAYOUT_VERSION as u64,
        size_of::<Header>() as u64,
        size_of::<StatusRecord>() as u64,
        STATUS_SLOTS as u64,
        MAX_REQUEST_IDS as u64,
        REQUEST_ID_BYTES as u64,
        offset_of!(StatusRecord, counters) as u64,
        offset_of!(StatusCounters, kv_cache_usage_ratio_migrate_in) as u64,
        offset_of!(StatusRecord, waiting_ids) as u64,
        offset_of!(ControlLayout, status) as u64,
        offset_of!(ControlLayout, to_engine) as u64,
        offset_of!(ControlLayout, to_llumlet) as u64,
        QUEUE_CAPACITY as u64,
        offset_of!(ControlLayout, requests) as u64,
        MAX_REQUESTS as u64,
        MAX_BLOCKS_PER_REQUEST as u64,
        offset_of!(ControlLayout, kv) as u64,
        MAX_KV_REGIONS as u64,
        HANDLE_BYTES as u64,
        MESSAGE_WORDS as u64,
        SEGMENT_SIZE as u64,
    ];
    let mut h = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < parts.len() {
        h = fnv1a(h, parts[i]);
        i += 1;
    }
    h
};

/// The segment name of an instance: `llumlet-ctl-` and the id, with every byte outside
/// `[A-Za-z0-9._-]` written as `%XX`.
pub fn segment_name(instance_id: &str) -> String {
    let mut name = String::from(NAME_PREFIX);
    for b in instance_id.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

/// The instance id a segment name was made from, if it is one.
pub fn parse_segment_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix(NAME_PREFIX)?.as_bytes();
    let mut out = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'%' {
            let hex = std::str::from_utf8(rest.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(rest[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where a segment lives: an absolute path is taken as is, a name goes under [`SHM_DIR`].
pub fn segment_path(name_or_path: &str) -> PathBuf {
    if name_or_path.starts_with('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new(SHM_DIR).join(name_or_path)
    }
}

/// A header field that does not match this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    /// The file at the segment's path is not a locator (the reason).
    #[error("not a segment locator: {0}")]
    Locator(&'static str),
    /// The memory file the locator names is not sealed against truncation.
    #[error("the segment's memory file is not sealed against truncation")]
    NotSealed,
    /// The file is shorter than its header or its layout.
    #[error("segment is truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Bytes this build needs.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// A header field differs.
    #[error("header field {field} is {found:#x}, this build expects {expected:#x}")]
    Field {
        /// The field.
        field: &'static str,
        /// This build's value.
        expected: u64,
        /// The segment's value.
        found: u64,
    },
}

/// Segment errors.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The segment.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The segment belongs to a live process.
    #[error("{path} is in use by the running process {pid}")]
    InUse {
        /// The segment.
        path: PathBuf,
        /// Its writer.
        pid: u32,
    },
    /// A segment is there whose owner cannot be proven dead (remove it by hand if it is stale).
    #[error("{path} exists and its writer cannot be proven dead ({why}); remove it if no engine uses it")]
    Exists {
        /// The segment.
        path: PathBuf,
        /// Why its writer is unknown.
        why: String,
    },
}

/// The result of an attach attempt.
pub enum Attach {
    /// No segment yet: the engine has not started.
    NotThere,
    /// The segment exists but its header is not complete yet.
    NotReady,
    /// The segment is from another layout, truncated, unsealed, or garbage.
    Incompatible(Incompatible),
    /// The locator names a process that no longer holds the segment (an engine that died
    /// without removing it): wait for its successor.
    Stale {
        /// The pid the locator names.
        pid: u32,
    },
    /// Attached.
    Ready(ControlSegment),
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::NotThere => f.write_str("NotThere"),
            Attach::NotReady => f.write_str("NotReady"),
            Attach::Incompatible(i) => write!(f, "Incompatible({i})"),
            Attach::Stale { pid } => write!(f, "Stale(pid {pid})"),
            Attach::Ready(s) => write!(f, "Ready(generation {:#x})", s.generation()),
        }
    }
}

/// A mapped control segment: a sealed memory file (see [`crate::sealed`]), so no truncation by
/// anyone can make the mapping fault.
pub struct ControlSegment {
    map: MmapRaw,
    path: PathBuf,
    locator: Locator,
    /// The locator file's (device, inode).
    locator_id: (u64, u64),
    /// The memory file's (device, inode).
    memory_id: (u64, u64),
    /// The creator's: the memory file, kept open under the descriptor the locator names.
    published: Option<Published>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ControlSegment {
    /// Creates the segment: a sealed memory file with its header filled and marked ready, and
    /// its locator at `path` (mode 0600, created exclusively). A locator left there by a process
    /// that no longer holds its segment is removed first.
    pub fn create(path: &Path) -> Result<ControlSegment, SegmentError> {
        let name = path
            .file_name()
            .map_or_else(|| "llumlet-ctl".into(), |n| n.to_string_lossy());
        let pid = std::process::id();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let generation = wall ^ (u64::from(pid) << 40) | 1;
        let mut mapped = None;
        let mut init = |file: &File| -> io::Result<u64> {
            mapped = Some(init_header(file, pid, generation)?);
            Ok(generation)
        };
        let published = match Published::create(path, &name, SEGMENT_SIZE as u64, &mut init) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                remove_if_stale(path)?;
                Published::create(path, &name, SEGMENT_SIZE as u64, &mut init)
                    .map_err(io_err("create", path))?
            }
            Err(e) => return Err(io_err("create", path)(e)),
        };
        let map = mapped.ok_or_else(|| io_err("map", path)(io::ErrorKind::Other.into()))?;
        Ok(ControlSegment {
            map,
            path: path.to_path_buf(),
            locator: published.locator,
            locator_id: published.locator_id,
            memory_id: published.memory_id,
            published: Some(published),
        })
    }

    /// Attaches to the segment whose locator is at `path`. Nothing is mapped before the memory
    /// file is proven sealed and whole.
    pub fn attach(path: &Path) -> Result<Attach, SegmentError> {
        let (locator, locator_id) = match Locator::find(path).map_err(io_err("read", path))? {
            Found::NotThere => return Ok(Attach::NotThere),
            Found::Locator(l, id) => (l, id),
            Found::Other(_, _, false) if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) => {
                return Ok(Attach::NotReady)
            }
            Found::Other(why, _, _) => return Ok(Attach::Incompatible(Incompatible::Locator(why))),
        };
        if locator.size != SEGMENT_SIZE as u64 {
            return Ok(Attach::Incompatible(Incompatible::Field {
                field: "size",
                expected: SEGMENT_SIZE as u64,
                found: locator.size,
            }));
        }
        let (file, memory_id) = match locator.open() {
            Ok(x) => x,
            Err(Unusable::HolderGone) => return Ok(Attach::Stale { pid: locator.pid }),
            Err(Unusable::Open(e)) => return Err(io_err("open the engine's memory file", path)(e)),
            Err(Unusable::NotSealed) => return Ok(Attach::Incompatible(Incompatible::NotSealed)),
            Err(Unusable::Size { expected, found }) => {
                return Ok(Attach::Incompatible(Incompatible::Truncated {
                    expected,
                    found,
                }))
            }
        };
        let map = MmapRaw::map_raw(&file).map_err(io_err("map", path))?;
        let seg = ControlSegment {
            map,
            path: path.to_path_buf(),
            locator,
            locator_id,
            memory_id,
            published: None,
        };
        let h = seg.header();
        // Pairs with the Release store at the end of `create`.
        if h.ready.load(Ordering::Acquire) != READY {
            return Ok(Attach::NotReady);
        }
        if let Some(i) = seg.header_mismatch() {
            return Ok(Attach::Incompatible(i));
        }
        Ok(Attach::Ready(seg))
    }

    /// The first header field that is not what this build wrote and the locator promised.
    fn header_mismatch(&self) -> Option<Incompatible> {
        let h = self.header();
        let checks: [(&'static str, u64, u64); 9] = [
            ("magic", MAGIC, h.magic.load(Ordering::Relaxed)),
            (
                "layout_version",
                u64::from(LAYOUT_VERSION),
                u64::from(h.layout_version.load(Ordering::Relaxed)),
            ),
            (
                "header_size",
                size_of::<Header>() as u64,
                u64::from(h.header_size.load(Ordering::Relaxed)),
            ),
            (
                "status_record_size",
                size_of::<StatusRecord>() as u64,
                u64::from(h.status_record_size.load(Ordering::Relaxed)),
            ),
            (
                "status_slots",
                STATUS_SLOTS as u64,
                u64::from(h.status_slots.load(Ordering::Relaxed)),
            ),
            (
                "layout_hash",
                LAYOUT_HASH,
                h.layout_hash.load(Ordering::Relaxed),
            ),
            (
                "total_size",
                SEGMENT_SIZE as u64,
                h.total_size.load(Ordering::Relaxed),
            ),
            (
                "generation",
                self.locator.tag,
                h.generation.load(Ordering::Relaxed),
            ),
            (
                "writer_pid",
                u64::from(self.locator.pid),
                u64::from(h.writer_pid.load(Ordering::Relaxed)),
            ),
        ];
        checks
            .into_iter()
            .find(|(_, expected, found)| expected != found)
            .map(|(field, expected, found)| Incompatible::Field {
                field,
                expected,
                found,
            })
    }

    /// Whether the header still says what it said at attach (no one overwrote it).
    pub fn intact(&self) -> Result<(), Incompatible> {
        if self.header().ready.load(Ordering::Acquire) != READY {
            return Err(Incompatible::Field {
                field: "ready",
                expected: u64::from(READY),
                found: u64::from(self.header().ready.load(Ordering::Relaxed)),
            });
        }
        self.header_mismatch().map_or(Ok(()), Err)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is of a memory file sealed against shrinking and proven (or made)
        // SEGMENT_SIZE bytes long, so every page stays backed; it is page-aligned (≥ 64) and
        // every field is an atomic, valid for any bytes another process may write.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The status ring.
    pub fn status(&self) -> &StatusRingMem {
        &self.layout().status
    }

    fn layout(&self) -> &ControlLayout {
        // SAFETY: as in `header`: the mapping holds a whole `ControlLayout` that no truncation
        // can take away, made of atomics only (valid for any bytes), page-aligned.
        unsafe { &*(self.map.as_ptr() as *const ControlLayout) }
    }

    /// The llumlet → engine command queue.
    pub fn to_engine(&self) -> &QueueMem {
        &self.layout().to_engine
    }

    /// The KV region registry.
    pub fn kv(&self) -> &KvRegistryMem {
        &self.layout().kv
    }

    /// The request table.
    pub fn requests(&self) -> &RequestTableMem {
        &self.layout().requests
    }

    /// The engine → llumlet command queue.
    pub fn to_llumlet(&self) -> &QueueMem {
        &self.layout().to_llumlet
    }

    /// The generation: a new value for every segment created (as the locator promised; the
    /// header's copy is checked by [`ControlSegment::intact`]).
    pub fn generation(&self) -> u64 {
        self.locator.tag
    }

    /// The pid of the process that created the segment (as its locator says).
    pub fn writer_pid(&self) -> u32 {
        self.locator.pid
    }

    /// Whether the writer process is still alive and holding this segment: `/proc/<pid>/fd/<fd>`
    /// still leads to it (a zombie holds no descriptors, and a reused pid holds another file).
    pub fn writer_alive(&self) -> bool {
        self.published.is_some() || self.locator.holds(self.memory_id)
    }

    /// Records a sign of life of the writer.
    pub fn beat(&self) {
        self.header()
            .heartbeat_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Nanoseconds since the writer's last sign of life.
    pub fn heartbeat_age_ns(&self) -> u64 {
        monotonic_ns().saturating_sub(self.header().heartbeat_ns.load(Ordering::Relaxed))
    }

    /// Whether the locator at the segment's path is no longer this segment's (the engine
    /// restarted and created a new one, or someone removed or replaced it).
    pub fn replaced(&self) -> bool {
        self.locator_now() != Some(self.locator_id)
    }

    /// The identity (device, inode) of whatever file is at the segment's path now, if any: a
    /// caller that examined one replacement need not examine it again.
    pub fn locator_now(&self) -> Option<(u64, u64)> {
        std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// Where the segment's locator lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Maps a fresh segment's memory file and fills its header, `ready` last.
fn init_header(file: &File, pid: u32, generation: u64) -> io::Result<MmapRaw> {
    let map = MmapRaw::map_raw(file)?;
    // SAFETY: the file was sized to SEGMENT_SIZE and sealed (it stays so); the mapping is
    // page-aligned and every header field is an atomic.
    let h = unsafe { &*(map.as_ptr() as *const Header) };
    h.writer_pid.store(pid, Ordering::Relaxed);
    h.magic.store(MAGIC, Ordering::Relaxed);
    h.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
    h.header_size
        .store(size_of::<Header>() as u32, Ordering::Relaxed);
    h.status_record_size
        .store(size_of::<StatusRecord>() as u32, Ordering::Relaxed);
    h.status_slots.store(STATUS_SLOTS as u32, Ordering::Relaxed);
    h.layout_hash.store(LAYOUT_HASH, Ordering::Relaxed);
    h.total_size.store(SEGMENT_SIZE as u64, Ordering::Relaxed);
    h.generation.store(generation, Ordering::Relaxed);
    h.heartbeat_ns.store(monotonic_ns(), Ordering::Relaxed);
    // Pairs with the Acquire load in `attach`: everything above is visible once ready is.
    h.ready.store(READY, Ordering::Release);
    Ok(map)
}

impl Drop for ControlSegment {
    fn drop(&mut self) {
        // The creator removes its locator when it stops, unless a new one replaced it.
        if let Some(p) = &self.published {
            p.unpublish(&self.path);
        }
    }
}

/// Removes the locator at `path` only if its writer is proven gone.
fn remove_if_stale(path: &Path) -> Result<(), SegmentError> {
    match ControlSegment::attach(path)? {
        Attach::Ready(seg) => Err(SegmentError::InUse {
            path: path.to_path_buf(),
            pid: seg.writer_pid(),
        }),
        Attach::Stale { .. } => std::fs::remove_file(path).map_err(io_err("remove stale", path)),
        Attach::NotThere => Ok(()),
        Attach::NotReady => Err(SegmentError::Exists {
            path: path.to_path_buf(),
            why: "its header is not complete".into(),
        }),
        Attach::Incompatible(i) => Err(SegmentError::Exists {
            path: path.to_path_buf(),
            why: i.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::status_ring::{read_newest, StatusWriter};
    use bytemuck::Zeroable;
    use std::fs::OpenOptions;
    use std::io::{Seek, SeekFrom, Write};

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("llumlet-seg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn names_round_trip() {
        for id in ["inst-1", "a/b c", "ünï", "x%y", ""] {
            let n = segment_name(id);
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)),
                "{n}"
            );
            assert_eq!(parse_segment_name(&n).as_deref(), Some(id));
        }
        assert_eq!(segment_name("a/b"), "llumlet-ctl-a%2Fb");
        assert_eq!(parse_segment_name("other"), None);
        assert_eq!(parse_segment_name("llumlet-ctl-%4"), None);
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn create_attach_publish_read() {
        let p = tmp("basic");
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::NotThere
        ));
        let seg = ControlSegment::create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let Attach::Ready(reader) = ControlSegment::attach(&p).unwrap() else {
            panic!("not ready")
        };
        assert_eq!(reader.generation(), seg.generation());
        assert_eq!(reader.writer_pid(), std::process::id());
        assert!(reader.writer_alive());
        let mut w = StatusWriter::new(seg.status());
        let mut r = StatusRecord::zeroed();
        r.counters.num_running_requests = 5;
        w.publish(seg.status(), &r);
        assert_eq!(
            read_newest(reader.status())
                .unwrap()
                .unwrap()
                .counters
                .num_running_requests,
            5
        );
        // A second creator while the first is alive is refused.
        assert!(matches!(
            ControlSegment::create(&p),
            Err(SegmentError::InUse { .. })
        ));
        drop(seg);
        assert!(!p.exists(), "the creator removes its segment");
        assert!(reader.replaced());
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn bad_segments_are_precise_errors() {
        let p = tmp("bad");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::NotReady
        ));
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Incompatible(Incompatible::Locator(_))
        ));
        // A segment file of an older build (the memory itself at the path).
        std::fs::write(&p, vec![0xAB; SEGMENT_SIZE]).unwrap();
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Incompatible(Incompatible::Locator(_))
        ));
        // A locator that leads to a file that is not sealed.
        std::fs::remove_file(&p).unwrap();
        let plain = tmp("bad-plain");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&plain)
            .unwrap();
        f.set_len(SEGMENT_SIZE as u64).unwrap();
        let l = Locator {
            pid: std::process::id(),
            fd: std::os::fd::AsRawFd::as_raw_fd(&f),
            size: SEGMENT_SIZE as u64,
            tag: 1,
        };
        std::fs::write(&p, l.encode()).unwrap();
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Incompatible(Incompatible::NotSealed)
        ));
        std::fs::remove_file(&plain).unwrap();
        std::fs::remove_file(&p).unwrap();

        // A segment of another layout version.
        let seg = ControlSegment::create(&p).unwrap();
        let other = LAYOUT_VERSION + 1;
        seg.header().layout_version.store(other, Ordering::Relaxed);
        match ControlSegment::attach(&p).unwrap() {
            Attach::Incompatible(Incompatible::Field {
                field,
                expected,
                found,
            }) => {
                assert_eq!(
                    (field, expected, found),
                    (
                        "layout_version",
                        u64::from(LAYOUT_VERSION),
                        u64::from(other)
                    )
                )
            }
            other => panic!("{other:?}"),
        }
        seg.header()
            .layout_version
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        // The memory cannot be truncated through any path to it.
        let (mem, _) = seg.locator.open().unwrap();
        assert_eq!(
            mem.set_len(size_of::<Header>() as u64 + 8)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EPERM)
        );
        // Truncating or overwriting the locator leaves the memory and its readers alone.
        let Attach::Ready(reader) = ControlSegment::attach(&p).unwrap() else {
            panic!("not ready")
        };
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(3)
            .unwrap();
        assert!(reader.intact().is_ok() && reader.writer_alive());
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Incompatible(Incompatible::Locator(_))
        ));
        // An overwritten header is seen.
        seg.header().magic.store(7, Ordering::Relaxed);
        assert!(matches!(
            reader.intact(),
            Err(Incompatible::Field { field: "magic", .. })
        ));
        drop(seg);
        assert!(!p.exists(), "its own locator, damaged or not, is removed");
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn stale_segment_of_a_dead_writer_is_replaced() {
        let p = tmp("stale");
        // The locator of an engine that died without removing it: its pid no longer holds
        // the descriptor.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let l = Locator {
            pid: dead,
            fd: 3,
            size: SEGMENT_SIZE as u64,
            tag: 9,
        };
        std::fs::write(&p, l.encode()).unwrap();
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Stale { pid } if pid == dead
        ));
        let fresh = ControlSegment::create(&p).unwrap();
        assert_ne!(fresh.generation(), 9);
        // A live holder whose descriptor is now some other file (a reused pid, say) is stale
        // too, and never mistaken for the segment.
        let other = std::fs::File::open("/proc/self/stat").unwrap();
        let l = Locator {
            pid: std::process::id(),
            fd: std::os::fd::AsRawFd::as_raw_fd(&other),
            size: SEGMENT_SIZE as u64,
            tag: 9,
        };
        let p2 = tmp("stale2");
        std::fs::write(&p2, l.encode()).unwrap();
        assert!(!matches!(
            ControlSegment::attach(&p2).unwrap(),
            Attach::Ready(_)
        ));
        std::fs::remove_file(&p2).unwrap();
        // Garbage whose writer is unknown is left alone.
        drop(fresh);
        let mut f = std::fs::File::create(&p).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"x").unwrap();
        assert!(matches!(
            ControlSegment::create(&p),
            Err(SegmentError::Exists { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }
}

#[cfg(test)]
mod garbage_tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The stable-toolchain companion of the `segment_attach` fuzz target: random files, and
    /// valid segments with random header words, attach as a precise state and never panic.
    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn random_bytes_never_panic() {
        let p = std::env::temp_dir().join(format!("llumlet-seg-garbage-{}", std::process::id()));
        let mut rng = SplitMix64(42);
        for i in 0..200 {
            let len = (rng.next_u64() % (2 * size_of::<Header>() as u64)) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            std::fs::write(&p, &bytes).unwrap();
            let state = ControlSegment::attach(&p).unwrap();
            assert!(
                !matches!(state, Attach::Ready(_) | Attach::NotThere),
                "case {i}: {state:?}"
            );
        }
        // A real segment with one header word scrambled at a time (through the engine's own
        // mapping: nothing else reaches the memory).
        std::fs::remove_file(&p).unwrap();
        let seg = ControlSegment::create(&p).unwrap();
        let words = size_of::<Header>() / 8;
        for w in 0..words {
            // SAFETY: word `w` is inside the header of a live mapping; atomics only.
            let word = unsafe { &*(seg.map.as_ptr().add(w * 8) as *const AtomicU64) };
            let old = word.swap(rng.next_u64(), Ordering::Relaxed);
            if let Attach::Ready(s) = ControlSegment::attach(&p).unwrap() {
                // Only the heartbeat word may change and still attach.
                assert!(s.intact().is_ok());
                let _ = crate::status_ring::read_newest(s.status());
            }
            word.store(old, Ordering::Relaxed);
        }
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Ready(_)
        ));
        drop(seg);
    }
}
