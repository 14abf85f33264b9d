//! `llumlet bench transfer --transport cuda`: the GPU side of the perf tool (feature `cuda`).
//!
//! A migration over CUDA IPC has three processes: the source engine exports its GPU KV cache,
//! the destination engine exports its own, and the source llumlet opens both handles and copies
//! device to device. The bench keeps that shape: `bench transfer` plays the llumlet, a
//! `bench gpu-source` child plays the source engine (allocates, fills and exports its cache,
//! reads it back for the digest), and `bench receive` plays the destination (allocates and
//! exports a zeroed cache in its `Reserved` answer, and digests what it holds at the commit).
//! CUDA refuses to open a handle in the process that exported it, so the source cannot live in
//! the sender. The baseline is one plain `cuMemcpyDtoDAsync` of the same size between two
//! allocations of one process, with the same event wait.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::time::Instant;

use llumlet_dataplane::cuda::{Device, GpuKvCache};
use llumlet_dataplane::kv::KvRegion;
use llumlet_dataplane::rng::SplitMix64;

use super::transfer::{Digest, Shape, BLOCK_TOKENS};
use super::Measure;

/// A GPU KV cache of `shape` on GPU 0 (zeroed).
pub fn cache(shape: Shape) -> Result<GpuKvCache, String> {
    GpuKvCache::create(
        0,
        shape.layers,
        shape.blocks,
        shape.block_bytes,
        shape.block_bytes / BLOCK_TOKENS,
    )
    .map_err(|e| format!("cannot allocate a {}-byte GPU KV cache: {e}", shape.bytes()))
}

/// Fills every block of `c` with pseudo-random words from `seed` (host to device, a block at a
/// time).
pub fn fill(c: &GpuKvCache, shape: Shape, seed: u64) -> Result<(), String> {
    let mut rng = SplitMix64(seed);
    let mut block = vec![0u8; shape.block_bytes as usize];
    for layer in 0..shape.layers {
        for b in 0..shape.blocks {
            for w in block.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            c.write_tokens(layer, b, 0, &block)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The digest of every block of `c`, read back from the GPU (the same digest as the host
/// transports').
pub fn digest(c: &GpuKvCache, shape: Shape) -> Result<u64, String> {
    let mut d = Digest::new();
    let mut block = vec![0u8; shape.block_bytes as usize];
    for layer in 0..shape.layers {
        for b in 0..shape.blocks {
            c.read_tokens(layer, b, 0, &mut block)
                .map_err(|e| e.to_string())?;
            d.block(&block);
        }
    }
    Ok(d.value())
}

/// `bench gpu-source`: allocates, fills and exports a cache of `shape`, prints
/// `SOURCE <handle hex> <digest hex>`, and holds it until stdin closes.
pub fn source(shape: Shape, seed: u64) -> Result<(), String> {
    let c = cache(shape)?;
    fill(&c, shape, seed)?;
    // The bytes land before another process reads them.
    c.synchronize().map_err(|e| e.to_string())?;
    let want = digest(&c, shape)?;
    let regions = c.regions().map_err(|e| e.to_string())?;
    let handle = regions
        .first()
        .map(llumlet::migration::cuda_side::handle_text)
        .ok_or("no regions")?;
    super::out(&format!("SOURCE {handle} {want:016x}"));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    Ok(())
}

/// The source engine's stand-in: a `bench gpu-source` child, its regions and their digest.
pub struct Source {
    child: Child,
    /// Its exported regions (one per layer, one allocation).
    pub regions: Vec<KvRegion>,
    /// The digest of its bytes, read back from its GPU memory.
    pub digest: u64,
}

impl Source {
    /// Starts one for `shape`, filled from `seed`.
    pub fn start(shape: Shape, seed: u64) -> Result<Source, String> {
        let args = [
            "bench".to_string(),
            "gpu-source".into(),
            "--layers".into(),
            shape.layers.to_string(),
            "--blocks".into(),
            shape.blocks.to_string(),
            "--block-bytes".into(),
            shape.block_bytes.to_string(),
            "--seed".into(),
            seed.to_string(),
        ];
        let (child, (handle, digest)) =
            super::spawn_child(&args, Stdio::piped(), "the GPU source", |line| {
                let (h, d) = line.strip_prefix("SOURCE ")?.split_once(' ')?;
                let handle = llumlet::migration::cuda_side::handle_bytes(h).ok()?;
                Some((handle, u64::from_str_radix(d, 16).ok()?))
            })?;
        let regions = shape
            .cache()
            .regions(llumlet_dataplane::kv::MemoryKind::CudaIpc, &handle);
        Ok(Source {
            child,
            regions,
            digest,
        })
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One plain device-to-device copy of `shape.bytes()` between two allocations of this process,
/// `iters` times after a warm-up, each waited for.
pub fn baseline(shape: Shape, iters: u32) -> Result<Measure, String> {
    let bytes = shape.bytes() as usize;
    let mut dev = Device::open(0).map_err(|e| e.to_string())?;
    let src = dev.alloc(bytes).map_err(|e| e.to_string())?;
    let dst = dev.alloc(bytes).map_err(|e| e.to_string())?;
    let copy = |dev: &mut Device| {
        dev.copy_buffer(&dst, &src, bytes)
            .map_err(|e| e.to_string())
    };
    copy(&mut dev)?;
    let mut times = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let t0 = Instant::now();
        copy(&mut dev)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut m = Measure::new("cuMemcpyDtoD", shape.bytes(), &times);
    m.bench = "baseline";
    Ok(m)
}
