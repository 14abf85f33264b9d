//! The control segment: one shared-memory file per engine instance, created by the engine,
//! attached by the llumlet.
//!
//! ```text
//!  /dev/shm/llumlet-ctl-<escaped instance id>   (mode 0600, created exclusively)
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
//! not ready, incompatible (which field), or ready. Every field is an atomic, so any bytes another
//! process left in the file are a valid value to look at. Integers are native-endian: the
//! segment is shared between processes of one host only.

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

use crate::command::{QueueMem, MESSAGE_WORDS, QUEUE_CAPACITY};
use crate::kv::{KvRegistryMem, HANDLE_BYTES, MAX_KV_REGIONS};
use crate::request_table::{RequestTableMem, MAX_BLOCKS_PER_REQUEST, MAX_REQUESTS};
use crate::status_ring::{
    StatusCounters, StatusRecord, StatusRingMem, MAX_REQUEST_IDS, REQUEST_ID_BYTES, STATUS_SLOTS,
};
use crate::sys::{monotonic_ns, pid_alive};

/// `LLUMLETC`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"LLUMLETC");
/// Bumped whenever the layout changes.
pub const LAYOUT_VERSION: u32 = 2;
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
    /// The segment is from another layout, truncated, or garbage.
    Incompatible(Incompatible),
    /// Attached.
    Ready(ControlSegment),
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::NotThere => f.write_str("NotThere"),
            Attach::NotReady => f.write_str("NotReady"),
            Attach::Incompatible(i) => write!(f, "Incompatible({i})"),
            Attach::Ready(s) => write!(f, "Ready(generation {:#x})", s.generation()),
        }
    }
}

/// A mapped control segment.
pub struct ControlSegment {
    map: MmapRaw,
    path: PathBuf,
    ino: u64,
    owner: bool,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ControlSegment {
    /// Creates the segment at `path` exclusively (mode 0600), fills the header and marks it
    /// ready. A segment left there by a process proven dead is removed first.
    pub fn create(path: &Path) -> Result<ControlSegment, SegmentError> {
        let file = match open_new(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                remove_if_stale(path)?;
                open_new(path).map_err(io_err("create", path))?
            }
            Err(e) => return Err(io_err("create", path)(e)),
        };
        let created = (|| {
            file.set_len(SEGMENT_SIZE as u64)
                .map_err(io_err("size", path))?;
            let map = MmapRaw::map_raw(&file).map_err(io_err("map", path))?;
            let ino = file.metadata().map_err(io_err("stat", path))?.ino();
            Ok(ControlSegment {
                map,
                path: path.to_path_buf(),
                ino,
                owner: true,
            })
        })();
        let seg = match created {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let h = seg.header();
        let pid = std::process::id();
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
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        h.generation
            .store(wall ^ (u64::from(pid) << 40) | 1, Ordering::Relaxed);
        h.heartbeat_ns.store(monotonic_ns(), Ordering::Relaxed);
        // Pairs with the Acquire load in `attach`: everything above is visible once ready is.
        h.ready.store(READY, Ordering::Release);
        Ok(seg)
    }

    /// Attaches to the segment at `path`.
    pub fn attach(path: &Path) -> Result<Attach, SegmentError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Attach::NotThere),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let meta = file.metadata().map_err(io_err("stat", path))?;
        let len = meta.len();
        if len == 0 {
            return Ok(Attach::NotReady);
        }
        if len < size_of::<Header>() as u64 {
            return Ok(Attach::Incompatible(Incompatible::Truncated {
                expected: SEGMENT_SIZE as u64,
                found: len,
            }));
        }
        let map = MmapRaw::map_raw(&file).map_err(io_err("map", path))?;
        let seg = ControlSegment {
            map,
            path: path.to_path_buf(),
            ino: meta.ino(),
            owner: false,
        };
        // SAFETY: the mapping holds at least a whole header (checked above), is page-aligned, and
        // every header field is an atomic, for which any bytes are a valid value.
        let h = unsafe { &*(seg.map.as_ptr() as *const Header) };
        // Pairs with the Release store at the end of `create`.
        if h.ready.load(Ordering::Acquire) != READY {
            return Ok(Attach::NotReady);
        }
        let checks: [(&'static str, u64, u64); 7] = [
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
        ];
        for (field, expected, found) in checks {
            if expected != found {
                return Ok(Attach::Incompatible(Incompatible::Field {
                    field,
                    expected,
                    found,
                }));
            }
        }
        if len < SEGMENT_SIZE as u64 {
            return Ok(Attach::Incompatible(Incompatible::Truncated {
                expected: SEGMENT_SIZE as u64,
                found: len,
            }));
        }
        Ok(Attach::Ready(seg))
    }

    fn header(&self) -> &Header {
        // SAFETY: `create` sized the file to SEGMENT_SIZE and `attach` returns a segment only
        // after checking the length; the mapping is page-aligned (≥ 64) and every field is an
        // atomic, valid for any bytes another process may write.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The status ring.
    pub fn status(&self) -> &StatusRingMem {
        &self.layout().status
    }

    fn layout(&self) -> &ControlLayout {
        // SAFETY: as in `header`: the mapping holds a whole `ControlLayout`, which is made of
        // atomics only (valid for any bytes) and is page-aligned.
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

    /// The generation: a new value for every segment created.
    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Relaxed)
    }

    /// The pid of the process that created the segment.
    pub fn writer_pid(&self) -> u32 {
        self.header().writer_pid.load(Ordering::Relaxed)
    }

    /// Whether the writer process is still alive.
    pub fn writer_alive(&self) -> bool {
        pid_alive(self.writer_pid())
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

    /// Whether the file at the segment's path is no longer this segment (the engine restarted
    /// and created a new one, or removed it).
    pub fn replaced(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |m| m.ino() != self.ino)
    }

    /// Where the segment lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSegment {
    fn drop(&mut self) {
        // The creator removes its segment when it stops, unless a new one replaced it.
        if self.owner && !self.replaced() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Removes the segment at `path` only if its writer is proven dead.
fn remove_if_stale(path: &Path) -> Result<(), SegmentError> {
    match ControlSegment::attach(path)? {
        Attach::Ready(seg) => {
            let pid = seg.writer_pid();
            if pid_alive(pid) {
                return Err(SegmentError::InUse {
                    path: path.to_path_buf(),
                    pid,
                });
            }
            drop(seg);
            std::fs::remove_file(path).map_err(io_err("remove stale", path))
        }
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
            Attach::Incompatible(Incompatible::Truncated { .. })
        ));
        std::fs::write(&p, vec![0xAB; SEGMENT_SIZE]).unwrap();
        assert!(
            matches!(ControlSegment::attach(&p).unwrap(), Attach::NotReady),
            "ready word is garbage"
        );

        // A segment of another layout version.
        std::fs::remove_file(&p).unwrap();
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
        // Truncated after the header.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(size_of::<Header>() as u64 + 8).unwrap();
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Incompatible(Incompatible::Truncated { .. })
        ));
        drop(seg);
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn stale_segment_of_a_dead_writer_is_replaced() {
        let p = tmp("stale");
        let seg = ControlSegment::create(&p).unwrap();
        let old_gen = seg.generation();
        // Pretend the writer was a process that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        seg.header().writer_pid.store(dead, Ordering::Relaxed);
        std::mem::forget(seg);
        let fresh = ControlSegment::create(&p).unwrap();
        assert_ne!(fresh.generation(), old_gen);
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
        // A real segment with one header word scrambled at a time.
        std::fs::remove_file(&p).unwrap();
        let seg = ControlSegment::create(&p).unwrap();
        let words = size_of::<Header>() / 8;
        for w in 0..words {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            use std::io::{Read, Seek, SeekFrom, Write};
            let mut old = [0u8; 8];
            f.seek(SeekFrom::Start((w * 8) as u64)).unwrap();
            f.read_exact(&mut old).unwrap();
            f.seek(SeekFrom::Start((w * 8) as u64)).unwrap();
            f.write_all(&rng.next_u64().to_le_bytes()).unwrap();
            if let Attach::Ready(s) = ControlSegment::attach(&p).unwrap() {
                // Only the generation, pid and heartbeat words may change and still attach.
                let _ = crate::status_ring::read_newest(s.status());
            }
            f.seek(SeekFrom::Start((w * 8) as u64)).unwrap();
            f.write_all(&old).unwrap();
        }
        assert!(matches!(
            ControlSegment::attach(&p).unwrap(),
            Attach::Ready(_)
        ));
        drop(seg);
    }
}
