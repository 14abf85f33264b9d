//! The KV region registry: where the engine's KV cache lives, so the llumlet can copy blocks
//! itself. Per layer (or per K/V tensor) one entry: a memory handle (a shared-memory segment
//! name for host memory, CUDA IPC handle bytes for GPU memory), the offset of the region in it,
//! the number of blocks, the bytes of a block and of a token, and the layout kind.
//!
//! Entries are append-only: the engine fills an entry, then publishes it by raising `count`
//! (Release); a reader loads `count` (Acquire) and reads only entries below it.

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

/// Regions a registry holds (e.g. 64 layers with K and V split).
pub const MAX_KV_REGIONS: usize = 128;
/// Bytes of a memory handle (a CUDA IPC handle is 64 bytes; a segment name fits too).
pub const HANDLE_BYTES: usize = 64;
const ENTRY_WORDS: usize = 8 + HANDLE_BYTES / 8;

/// Where a region's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Host memory in a shared-memory segment (the handle is its name or absolute path).
    HostShm = 1,
    /// GPU memory exported with `cuIpcGetMemHandle` (the handle is the 64 IPC handle bytes).
    CudaIpc = 2,
}

/// What a region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    /// K and V of a layer together in each block.
    KvTogether = 1,
    /// Only the K tensor of a layer.
    KeyOnly = 2,
    /// Only the V tensor of a layer.
    ValueOnly = 3,
}

/// One registered region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRegion {
    /// Memory kind.
    pub memory: MemoryKind,
    /// Layout kind.
    pub layout: LayoutKind,
    /// The layer.
    pub layer: u32,
    /// Byte offset of block 0 in the memory the handle names.
    pub offset: u64,
    /// Blocks in the region.
    pub num_blocks: u64,
    /// Bytes of one block.
    pub block_size_bytes: u64,
    /// Bytes of one token's slot in a block.
    pub token_size_bytes: u64,
    /// The handle bytes.
    pub handle: Vec<u8>,
}

impl KvRegion {
    /// Bytes the region spans.
    pub fn len(&self) -> Option<u64> {
        self.num_blocks.checked_mul(self.block_size_bytes)
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// Registry and mapping errors.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// All entries are used.
    #[error("the KV region registry is full ({MAX_KV_REGIONS} regions)")]
    Full,
    /// The handle does not fit.
    #[error("a memory handle is at most {HANDLE_BYTES} bytes, got {0}")]
    HandleTooLong(usize),
    /// An entry holds values this build does not know or that do not add up.
    #[error("KV region {index} is invalid: {why}")]
    Invalid {
        /// Entry index.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The region does not fit in its segment.
    #[error("KV region of layer {layer} needs bytes {offset}..{end} but {path} has {size}")]
    TooLarge {
        /// The layer.
        layer: u32,
        /// Start.
        offset: u64,
        /// End.
        end: u64,
        /// The segment.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Only host regions can be mapped here.
    #[error("KV region of layer {0} is GPU memory; it is opened by the CUDA transport")]
    NotHost(u32),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The segment.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The registry's memory (atomics only: valid for any bytes).
#[repr(C, align(64))]
pub struct KvRegistryMem {
    count: AtomicU32,
    _pad: [u32; 15],
    entries: [[AtomicU64; ENTRY_WORDS]; MAX_KV_REGIONS],
}

impl KvRegistryMem {
    /// Registers `region`; returns its index. Engine side, single writer.
    pub fn register(&self, region: &KvRegion) -> Result<usize, KvError> {
        if region.handle.len() > HANDLE_BYTES {
            return Err(KvError::HandleTooLong(region.handle.len()));
        }
        let index = self.count.load(Ordering::Relaxed) as usize;
        let entry = self.entries.get(index).ok_or(KvError::Full)?;
        let mut handle = [0u8; HANDLE_BYTES];
        handle[..region.handle.len()].copy_from_slice(&region.handle);
        let words: [u64; 8] = [
            region.memory as u64 | (region.layout as u64) << 8 | (region.handle.len() as u64) << 16,
            u64::from(region.layer),
            region.offset,
            region.num_blocks,
            region.block_size_bytes,
            region.token_size_bytes,
            0,
            0,
        ];
        for (d, s) in entry.iter().zip(words) {
            d.store(s, Ordering::Relaxed);
        }
        for (d, chunk) in entry[8..].iter().zip(handle.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            d.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        // Pairs with the Acquire load in `regions`: the entry is complete once counted.
        self.count.store(index as u32 + 1, Ordering::Release);
        Ok(index)
    }

    /// The registered regions, each validated (a garbage entry is an error, not a panic).
    pub fn regions(&self) -> Vec<Result<KvRegion, KvError>> {
        // Pairs with the Release store in `register`.
        let n = (self.count.load(Ordering::Acquire) as usize).min(MAX_KV_REGIONS);
        (0..n).map(|i| decode(i, &self.entries[i])).collect()
    }
}

fn decode(index: usize, e: &[AtomicU64; ENTRY_WORDS]) -> Result<KvRegion, KvError> {
    let w: Vec<u64> = e.iter().map(|x| x.load(Ordering::Relaxed)).collect();
    let invalid = |why: String| KvError::Invalid { index, why };
    let memory = match w[0] & 0xff {
        1 => MemoryKind::HostShm,
        2 => MemoryKind::CudaIpc,
        v => return Err(invalid(format!("memory kind {v}"))),
    };
    let layout = match (w[0] >> 8) & 0xff {
        1 => LayoutKind::KvTogether,
        2 => LayoutKind::KeyOnly,
        3 => LayoutKind::ValueOnly,
        v => return Err(invalid(format!("layout kind {v}"))),
    };
    let handle_len = ((w[0] >> 16) & 0xffff) as usize;
    if handle_len > HANDLE_BYTES {
        return Err(invalid(format!("handle length {handle_len}")));
    }
    let layer = u32::try_from(w[1]).map_err(|_| invalid(format!("layer {}", w[1])))?;
    let mut handle = Vec::with_capacity(HANDLE_BYTES);
    for x in &w[8..] {
        handle.extend_from_slice(&x.to_le_bytes());
    }
    handle.truncate(handle_len);
    let r = KvRegion {
        memory,
        layout,
        layer,
        offset: w[2],
        num_blocks: w[3],
        block_size_bytes: w[4],
        token_size_bytes: w[5],
        handle,
    };
    if r.len().is_none() || r.offset.checked_add(r.len().unwrap_or(0)).is_none() {
        return Err(invalid("size overflows".into()));
    }
    if r.token_size_bytes == 0
        || r.block_size_bytes == 0
        || !r.block_size_bytes.is_multiple_of(r.token_size_bytes)
    {
        return Err(invalid(format!(
            "block of {} bytes is not a whole number of {}-byte tokens",
            r.block_size_bytes, r.token_size_bytes
        )));
    }
    Ok(r)
}

/// A host KV region mapped into this process.
pub struct MappedRegion {
    map: MmapRaw,
    region: KvRegion,
    file: (u64, u64),
}

impl MappedRegion {
    /// Maps a host region, checking that it fits in its segment. A segment published through a
    /// locator is its sealed memory file (which no truncation can take from under the mapping); a
    /// plain file is mapped as it is, and stays exposed to truncation by its owner's user.
    pub fn map(region: &KvRegion) -> Result<MappedRegion, KvError> {
        if region.memory != MemoryKind::HostShm {
            return Err(KvError::NotHost(region.layer));
        }
        let name = std::str::from_utf8(&region.handle).map_err(|_| KvError::Invalid {
            index: 0,
            why: "segment name is not UTF-8".into(),
        })?;
        let path = crate::segment::segment_path(name);
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| KvError::Io { op, path, source }
        };
        // A sealed memory file behind a locator cannot be truncated under the mapping; a plain
        // file (another allocator's shared memory, such as PyTorch's) is mapped as it is.
        let (file, meta) = match crate::sealed::Locator::find(&path).map_err(io("read", &path))? {
            crate::sealed::Found::Locator(l, _) => {
                let (file, _) = l.open().map_err(|e| KvError::Io {
                    op: "open the memory file of",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let meta = file.metadata().map_err(io("stat", &path))?;
                (file, meta)
            }
            _ => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io("open", &path))?;
                let meta = file.metadata().map_err(io("stat", &path))?;
                (file, meta)
            }
        };
        let size = meta.len();
        let len = region.len().unwrap_or(u64::MAX);
        let end = region.offset.saturating_add(len);
        if end > size {
            return Err(KvError::TooLarge {
                layer: region.layer,
                offset: region.offset,
                end,
                path,
                size,
            });
        }
        let map = memmap2::MmapOptions::new()
            .offset(0)
            .len(end as usize)
            .map_raw(&file)
            .map_err(io("map", &path))?;
        use std::os::unix::fs::MetadataExt;
        Ok(MappedRegion {
            map,
            region: region.clone(),
            file: (meta.dev(), meta.ino()),
        })
    }

    /// The mapped file's (device, inode): a restarted engine's new segment of the same name is
    /// a different file.
    pub fn file_id(&self) -> (u64, u64) {
        self.file
    }

    /// The region.
    pub fn region(&self) -> &KvRegion {
        &self.region
    }

    /// Pointer to block `b`, if it exists. The memory is shared with the engine, which may write
    /// it at any time: copy through raw pointers, never through references.
    pub fn block_ptr(&self, b: u64) -> Option<*mut u8> {
        if b >= self.region.num_blocks {
            return None;
        }
        let off = self.region.offset + b * self.region.block_size_bytes;
        // SAFETY: off + block_size_bytes <= offset + len <= mapping length (checked in `map`).
        Some(unsafe { self.map.as_mut_ptr().add(off as usize) })
    }

    /// Copies block `b` out (for checks and tests).
    pub fn read_block(&self, b: u64, out: &mut [u8]) -> bool {
        let Some(p) = self.block_ptr(b) else {
            return false;
        };
        let n = (self.region.block_size_bytes as usize).min(out.len());
        // SAFETY: `p` points to a block of block_size_bytes inside the mapping; `out` is ours and
        // does not overlap shared memory; the engine may be writing the block concurrently, which
        // gives stale or mixed bytes but no undefined behaviour for a byte copy through raw
        // pointers.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), n) };
        true
    }
}

/// The layout of a paged KV cache in one allocation (a host segment or a GPU buffer): `layers`
/// regions of `num_blocks` blocks of `block_size_bytes`, layer after layer, each block whole
/// token slots of `token_size_bytes` (the `KvTogether` layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Regions (one per layer).
    pub layers: u32,
    /// Blocks per region.
    pub num_blocks: u64,
    /// Bytes of one block.
    pub block_size_bytes: u64,
    /// Bytes of one token slot.
    pub token_size_bytes: u64,
}

impl CacheShape {
    /// Bytes in all, or `None` when empty, overflowing, or when a block is not whole token slots.
    pub fn total_bytes(&self) -> Option<u64> {
        u64::from(self.layers)
            .checked_mul(self.num_blocks)
            .and_then(|x| x.checked_mul(self.block_size_bytes))
            .filter(|t| {
                *t > 0
                    && self.token_size_bytes > 0
                    && self.block_size_bytes.is_multiple_of(self.token_size_bytes)
            })
    }

    /// The byte offset of `n` token slots of one block from `slot`, or `None` outside that block
    /// (the shape is valid: see [`CacheShape::total_bytes`]).
    pub fn span(&self, layer: u32, block: u64, slot: u64, n: u64) -> Option<u64> {
        let per_block = self.block_size_bytes / self.token_size_bytes.max(1);
        let inside = slot.checked_add(n).is_some_and(|e| e <= per_block);
        if layer >= self.layers || block >= self.num_blocks || n == 0 || !inside {
            return None;
        }
        Some(
            (u64::from(layer) * self.num_blocks + block) * self.block_size_bytes
                + slot * self.token_size_bytes,
        )
    }

    /// The regions to register, one per layer, each naming `handle`.
    pub fn regions(&self, memory: MemoryKind, handle: &[u8]) -> Vec<KvRegion> {
        (0..self.layers)
            .map(|layer| KvRegion {
                memory,
                layout: LayoutKind::KvTogether,
                layer,
                offset: u64::from(layer) * self.num_blocks * self.block_size_bytes,
                num_blocks: self.num_blocks,
                block_size_bytes: self.block_size_bytes,
                token_size_bytes: self.token_size_bytes,
                handle: handle.to_vec(),
            })
            .collect()
    }
}

/// A paged KV cache in one host shared-memory segment (see [`CacheShape`]): a sealed memory file
/// with its locator at the segment's path ([`crate::sealed`]), so a llumlet copying blocks can
/// never fault on a truncated file. The engine side of the simulated engine (and of any engine
/// that keeps its KV cache in host memory through this library). Removes its locator when
/// dropped.
pub struct HostKvCache {
    map: MmapRaw,
    path: PathBuf,
    shape: CacheShape,
    published: crate::sealed::Published,
}

impl HostKvCache {
    /// Creates the segment, its locator at `path` (mode 0600, replacing a file left there).
    pub fn create(
        path: &Path,
        layers: u32,
        num_blocks: u64,
        block_size_bytes: u64,
        token_size_bytes: u64,
    ) -> Result<HostKvCache, KvError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| KvError::Io { op, path, source }
        };
        let shape = CacheShape {
            layers,
            num_blocks,
            block_size_bytes,
            token_size_bytes,
        };
        let total = shape.total_bytes().ok_or_else(|| KvError::Invalid {
            index: 0,
            why: "empty or overflowing KV cache shape".into(),
        })?;
        let _ = std::fs::remove_file(path);
        let name = path
            .file_name()
            .map_or_else(|| "llumlet-kv".into(), |n| n.to_string_lossy());
        let mut mapped = None;
        let published = crate::sealed::Published::create(path, &name, total, |file| {
            mapped = Some(MmapRaw::map_raw(file)?);
            Ok(0)
        })
        .map_err(io("create"))?;
        let map = mapped.ok_or_else(|| io("map")(std::io::ErrorKind::Other.into()))?;
        Ok(HostKvCache {
            map,
            path: path.to_path_buf(),
            shape,
            published,
        })
    }

    /// The regions to register, one per layer. The handle is the segment's name when it lives
    /// under /dev/shm, else its absolute path.
    pub fn regions(&self) -> Result<Vec<KvRegion>, KvError> {
        let shm_dir = Path::new(crate::segment::SHM_DIR);
        let handle = match self.path.strip_prefix(shm_dir) {
            Ok(name) => name.to_string_lossy().into_owned(),
            Err(_) => self.path.to_string_lossy().into_owned(),
        };
        if handle.len() > HANDLE_BYTES {
            return Err(KvError::HandleTooLong(handle.len()));
        }
        Ok(self.shape.regions(MemoryKind::HostShm, handle.as_bytes()))
    }

    /// The bytes of one token slot, to be written by the engine (its only writer in this
    /// process). `None` outside the cache.
    pub fn token_mut(&mut self, layer: u32, block: u64, slot: u64) -> Option<&mut [u8]> {
        self.tokens_mut(layer, block, slot, 1)
    }

    /// The bytes of `n` consecutive token slots of one block from `slot` (contiguous in the
    /// `KvTogether` layout), to be written by the engine. `None` outside the block.
    pub fn tokens_mut(&mut self, layer: u32, block: u64, slot: u64, n: u64) -> Option<&mut [u8]> {
        let off = self.shape.span(layer, block, slot, n)?;
        // SAFETY: `span` puts off + n * token_size_bytes inside block `block` of layer `layer`,
        // so inside the mapping (layers * num_blocks * block_size_bytes long); `&mut self` makes
        // this the only reference in this process. Other processes (the llumlet) only read the
        // mapping through raw-pointer copies.
        Some(unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_mut_ptr().add(off as usize),
                (n * self.shape.token_size_bytes) as usize,
            )
        })
    }

    /// Bytes of one token slot.
    pub fn token_size_bytes(&self) -> u64 {
        self.shape.token_size_bytes
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HostKvCache {
    fn drop(&mut self) {
        self.published.unpublish(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_shape_refuses_bad_layouts_and_spans_outside_a_block() {
        let shape = |layers, num_blocks, block_size_bytes, token_size_bytes| CacheShape {
            layers,
            num_blocks,
            block_size_bytes,
            token_size_bytes,
        };
        assert_eq!(shape(2, 4, 64, 16).total_bytes(), Some(512));
        for bad in [
            shape(0, 4, 64, 16),
            shape(2, 4, 64, 0),
            shape(2, 4, 64, 24),
            shape(u32::MAX, u64::MAX, 64, 16),
        ] {
            assert_eq!(bad.total_bytes(), None, "{bad:?}");
        }
        let s = shape(2, 4, 64, 16);
        assert_eq!(s.span(1, 3, 2, 2), Some((4 + 3) * 64 + 32));
        for (layer, block, slot, n) in [(2, 0, 0, 1), (0, 4, 0, 1), (0, 0, 3, 2), (0, 0, 0, 0)] {
            assert_eq!(
                s.span(layer, block, slot, n),
                None,
                "{layer} {block} {slot} {n}"
            );
        }
        let r = s.regions(MemoryKind::CudaIpc, b"h");
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].offset, r[1].handle.as_slice()), (256, &b"h"[..]));
    }

    fn mem() -> Box<KvRegistryMem> {
        Box::new(KvRegistryMem {
            count: AtomicU32::new(0),
            _pad: [0; 15],
            entries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        })
    }

    fn region(name: &str, blocks: u64) -> KvRegion {
        KvRegion {
            memory: MemoryKind::HostShm,
            layout: LayoutKind::KvTogether,
            layer: 3,
            offset: 4096,
            num_blocks: blocks,
            block_size_bytes: 1024,
            token_size_bytes: 64,
            handle: name.as_bytes().to_vec(),
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn register_read_map() {
        let path = std::env::temp_dir().join(format!("llumlet-kv-test-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 4096 + 10 * 1024]).unwrap();
        let m = mem();
        let r = region(path.to_str().unwrap(), 10);
        assert_eq!(m.register(&r).unwrap(), 0);
        let got = m.regions();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap(), &r);
        let mapped = MappedRegion::map(&r).unwrap();
        let mut buf = vec![0u8; 1024];
        assert!(mapped.read_block(9, &mut buf));
        assert!(buf.iter().all(|b| *b == 7));
        assert!(!mapped.read_block(10, &mut buf));
        // One block more than the segment holds: a clear error.
        match MappedRegion::map(&region(path.to_str().unwrap(), 11)) {
            Err(KvError::TooLarge { end, size, .. }) => {
                assert_eq!((end, size), (4096 + 11 * 1024, 4096 + 10 * 1024))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("mapped a region larger than its segment"),
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_entries_are_typed_errors() {
        let m = mem();
        assert!(matches!(
            m.register(&region(&"x".repeat(65), 1)),
            Err(KvError::HandleTooLong(65))
        ));
        let mut r = region("seg", 1);
        r.token_size_bytes = 100;
        m.register(&r).unwrap();
        assert!(matches!(&m.regions()[0], Err(KvError::Invalid { .. })));
        m.entries[0][0].store(9, Ordering::Relaxed);
        assert!(matches!(&m.regions()[0], Err(KvError::Invalid { .. })));
        for _ in 1..MAX_KV_REGIONS {
            m.register(&region("seg", 1)).unwrap();
        }
        assert!(matches!(m.register(&region("seg", 1)), Err(KvError::Full)));
        let mut gpu = region("seg", 1);
        gpu.memory = MemoryKind::CudaIpc;
        assert!(matches!(MappedRegion::map(&gpu), Err(KvError::NotHost(3))));
    }
}
