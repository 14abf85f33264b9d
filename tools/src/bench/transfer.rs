//! `llumlet bench transfer` and `llumlet bench receive`: KV-shaped blocks moved between two
//! processes (or two hosts) through a migration's own code path. The two sides speak the
//! migration protocol (`Begin` → `Reserved`, one `StageDone` → `StageAck` per copy, `Commit` →
//! `Committed`), the sender builds its transport from the receiver's `Reserved` answer with the
//! driver's `setup_transport`, and the receiver applies tcp data frames with the destination's
//! `DataSink`. The `Commit` carries a digest of the sender's KV bytes; the receiver answers
//! whether its own bytes match, so every measurement is also a check that the bytes arrived.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llumlet_dataplane::kv::{HostKvCache, KvRegion, MappedRegion};
use llumlet_dataplane::rng::SplitMix64;
use llumlet_dataplane::runs::{coalesce, BlockRun};
use llumlet_dataplane::transport::{
    receive_frame_keyed, DataSink, Frame, ReservedBlocks, Transport,
};
use llumlet_proto::migration::{
    envelope::Msg, Begin, Commit, Committed, Reserved, StageAck, StageDone,
};

use super::{Measure, Progress};
use llumlet::migration::auth::{self, Session, TransferKey};
use llumlet::migration::source::setup_transport;
use llumlet::migration::ucx_side::UcxSide;
use llumlet::migration::wire::{
    host_identity, map_all, open_control, recv_control, region_msg, send,
};

/// Tokens per block in the bench's KV layout (the llumlet only needs it for slot accounting).
pub const BLOCK_TOKENS: u64 = 16;

/// How long either side waits for the other.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// A KV cache's shape: `layers` regions of `blocks` blocks of `block_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Regions (one per layer).
    pub layers: u32,
    /// Blocks per region.
    pub blocks: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

impl Shape {
    /// The shape moving `bytes` in blocks of `block_bytes` over `layers` layers, or why not.
    pub fn for_bytes(bytes: u64, block_bytes: u64, layers: u32) -> Result<Shape, String> {
        if block_bytes == 0 || !block_bytes.is_multiple_of(BLOCK_TOKENS * 8) {
            return Err(format!(
                "--block-bytes {block_bytes}: must be a positive multiple of {} ({BLOCK_TOKENS} tokens of whole 8-byte words)",
                BLOCK_TOKENS * 8
            ));
        }
        if layers == 0 {
            return Err("--layers must be at least 1".into());
        }
        let per_block = block_bytes * u64::from(layers);
        if bytes == 0 || !bytes.is_multiple_of(per_block) {
            return Err(format!(
                "--size {bytes}: must be a positive multiple of --layers × --block-bytes ({per_block} bytes)"
            ));
        }
        let blocks = bytes / per_block;
        if blocks > u64::from(u32::MAX) {
            return Err(format!(
                "--size {bytes}: {blocks} blocks per layer is more than a block table holds"
            ));
        }
        Ok(Shape {
            layers,
            blocks,
            block_bytes,
        })
    }

    /// The KV cache layout of this shape (16-token blocks).
    pub fn cache(&self) -> llumlet_dataplane::kv::CacheShape {
        llumlet_dataplane::kv::CacheShape {
            layers: self.layers,
            num_blocks: self.blocks,
            block_size_bytes: self.block_bytes,
            token_size_bytes: self.block_bytes / BLOCK_TOKENS,
        }
    }

    /// Bytes in all.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_bytes * u64::from(self.layers)
    }
}

/// A fresh /dev/shm KV cache of `shape` for this process (removed when dropped).
pub fn kv_cache(tag: &str, shape: Shape) -> Result<HostKvCache, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = PathBuf::from(format!(
        "/dev/shm/llumlet-bench-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    HostKvCache::create(
        &path,
        shape.layers,
        shape.blocks,
        shape.block_bytes,
        shape.block_bytes / BLOCK_TOKENS,
    )
    .map_err(|e| format!("cannot create the KV cache {}: {e}", path.display()))
}

/// Fills every token of `cache` with pseudo-random words from `seed`.
pub fn fill(cache: &mut HostKvCache, shape: Shape, seed: u64) {
    let mut rng = SplitMix64(seed);
    for layer in 0..shape.layers {
        for block in 0..shape.blocks {
            for slot in 0..BLOCK_TOKENS {
                if let Some(t) = cache.token_mut(layer, block, slot) {
                    for w in t.chunks_exact_mut(8) {
                        w.copy_from_slice(&rng.next_u64().to_le_bytes());
                    }
                }
            }
        }
    }
}

/// The digest both sides compute over every block, in order.
pub struct Digest(u64);

impl Digest {
    /// Nothing digested yet.
    pub fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    /// Adds one block (whole 8-byte words).
    pub fn block(&mut self, block: &[u8]) {
        for w in block.chunks_exact(8) {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            self.0 = (self.0 ^ u64::from_le_bytes(x)).wrapping_mul(0x0000_0100_0000_01b3);
            self.0 ^= self.0 >> 29;
        }
    }

    /// The digest.
    pub fn value(&self) -> u64 {
        self.0
    }
}

impl Default for Digest {
    fn default() -> Self {
        Digest::new()
    }
}

/// A digest of every block of `maps`, in order (both sides compute it the same way).
pub fn digest(maps: &[MappedRegion]) -> u64 {
    let mut d = Digest::new();
    let mut block = Vec::new();
    for m in maps {
        let r = m.region();
        block.resize(r.block_size_bytes as usize, 0);
        for b in 0..r.num_blocks {
            if !m.read_block(b, &mut block) {
                return 0;
            }
            d.block(&block);
        }
    }
    d.value()
}

fn shape_of(regions: &[llumlet_proto::migration::Region]) -> Result<Shape, String> {
    let first = regions.first().ok_or("the sender named no regions")?;
    if regions
        .iter()
        .any(|r| r.num_blocks != first.num_blocks || r.block_size_bytes != first.block_size_bytes)
    {
        return Err("the sender's regions differ in shape".into());
    }
    let shape = Shape::for_bytes(
        first.num_blocks * first.block_size_bytes * regions.len() as u64,
        first.block_size_bytes,
        regions.len() as u32,
    )?;
    Ok(shape)
}

/// The receiving side: one migration-shaped transfer per connection, until killed. Prints the
/// port it listens on as the first line of stdout.
pub fn receive(listen: &str) -> Result<(), String> {
    let key = transfer_key()?;
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    super::out(&port.to_string());
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        match serve(stream, &key) {
            Ok(()) => {}
            Err(e) => eprintln!("llumlet bench receive: transfer from {peer} failed: {e}"),
        }
    }
    Ok(())
}

fn refuse(stream: &mut TcpStream, sess: &mut Session, error: String) -> Result<(), String> {
    let _ = send(
        stream,
        sess,
        Msg::Reserved(Reserved {
            ok: false,
            error: error.clone(),
            ..Default::default()
        }),
    );
    Err(error)
}

/// The key a llumlet would use (`LLUMLET_TRANSFER_SECRET_FILE`, else this host's key, and
/// `LLUMLET_TRANSFER_ENCRYPT`): the sender and the receiver authenticate each other (and
/// encrypt) as a migration's two llumlets do.
fn transfer_key() -> Result<TransferKey, String> {
    let file = std::env::var_os("LLUMLET_TRANSFER_SECRET_FILE").filter(|v| !v.is_empty());
    let encrypt = encrypting()?;
    TransferKey::load(file.as_deref().map(std::path::Path::new))
        .map(|k| k.encrypting(encrypt))
        .map_err(|e| format!("LLUMLET_TRANSFER_SECRET_FILE: {e}"))
}

/// Whether `LLUMLET_TRANSFER_ENCRYPT` asks for encrypted connections, as a llumlet reads it.
pub fn encrypting() -> Result<bool, String> {
    match std::env::var("LLUMLET_TRANSFER_ENCRYPT") {
        Ok(v) if !v.trim().is_empty() => llumlet::config::parse_bool(v.trim()).ok_or_else(|| {
            format!("LLUMLET_TRANSFER_ENCRYPT={v:?} must be a boolean: 1/0 or True/False")
        }),
        _ => Ok(false),
    }
}

fn serve(mut stream: TcpStream, key: &TransferKey) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut sess = auth::server(&mut stream, key).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let b: Begin = match recv_control(&mut stream, &mut sess, &mut buf)? {
        Msg::Begin(b) => b,
        other => return Err(format!("expected Begin, got {other:?}")),
    };
    let shape = match shape_of(&b.regions) {
        Ok(s) => s,
        Err(e) => return refuse(&mut stream, &mut sess, e),
    };
    let on_gpu = b.transport == "cuda";
    let cache = match on_gpu {
        true => None,
        false => match kv_cache("rx", shape) {
            Ok(c) => Some(c),
            Err(e) => return refuse(&mut stream, &mut sess, e),
        },
    };
    let regions: Vec<KvRegion> = match &cache {
        Some(c) => c.regions().map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let maps = map_all(&regions)?;
    // The destination engine's GPU cache (cuda): exported in `Reserved`, digested at the commit.
    #[cfg(feature = "cuda")]
    let mut gpu_cache = None;
    let blocks: Vec<u32> = (0..shape.blocks as u32).collect();
    let mut reserved = Reserved {
        ok: true,
        blocks: blocks.clone(),
        transport: b.transport.clone(),
        ..Default::default()
    };
    // Held until the transfer ends: its worker serves the sender's puts.
    let mut _ucx: Option<std::sync::Arc<UcxSide>> = None;
    match b.transport.as_str() {
        "shm" if !b.host.is_empty() && b.host == host_identity() => {
            reserved.regions = regions.iter().map(region_msg).collect();
        }
        "shm" => {
            return refuse(
                &mut stream,
                &mut sess,
                "shm needs both sides on one host (the receiver's boot id differs)".into(),
            )
        }
        "tcp" => {}
        "ucx" => {
            let side = match UcxSide::start() {
                Ok(s) => s,
                Err(e) => {
                    return refuse(
                        &mut stream,
                        &mut sess,
                        format!("the receiver has no UCX: {e}"),
                    )
                }
            };
            let (worker, offered) = match side.offer(&regions) {
                Ok(o) => o,
                Err(e) => {
                    return refuse(
                        &mut stream,
                        &mut sess,
                        format!("UCX registration failed: {e}"),
                    )
                }
            };
            reserved.ucx_worker = worker;
            reserved.ucx_regions = offered;
            _ucx = Some(side);
        }
        "cuda" if b.host.is_empty() || b.host != host_identity() => {
            return refuse(
                &mut stream,
                &mut sess,
                "cuda needs both sides on one host (the receiver's boot id differs)".into(),
            )
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            let c = match super::gpu::cache(shape) {
                Ok(c) => c,
                Err(e) => return refuse(&mut stream, &mut sess, e),
            };
            let exported = match c.regions() {
                Ok(r) => r,
                Err(e) => {
                    return refuse(
                        &mut stream,
                        &mut sess,
                        format!("cannot export the GPU cache: {e}"),
                    )
                }
            };
            reserved.regions = exported.iter().map(region_msg).collect();
            gpu_cache = Some(c);
        }
        #[cfg(not(feature = "cuda"))]
        "cuda" => {
            return refuse(
                &mut stream,
                &mut sess,
                "this receiver was built without the `cuda` feature".into(),
            )
        }
        other => {
            return refuse(
                &mut stream,
                &mut sess,
                format!("unknown transport {other:?}"),
            )
        }
    }
    send(&mut stream, &mut sess, Msg::Reserved(reserved)).map_err(|e| e.to_string())?;
    let sink = DataSink::new(maps, ReservedBlocks::new(&blocks));
    loop {
        let opener = sess.data_opener();
        match receive_frame_keyed(&mut stream, &mut buf, &sink, opener)
            .map_err(|e| e.to_string())?
        {
            Frame::Data(r) => {
                r.map_err(|e| e.to_string())?;
            }
            Frame::Control => match open_control(&mut sess, &mut buf).ok() {
                Some(Msg::StageDone(s)) => {
                    // Every sender has mapped what it needs by its first stage: the name can go,
                    // so a receiver killed mid-transfer leaves nothing in /dev/shm.
                    if let (0, Some(c)) = (s.stage, &cache) {
                        let _ = std::fs::remove_file(c.path());
                    }
                    send(
                        &mut stream,
                        &mut sess,
                        Msg::StageAck(StageAck {
                            stage: s.stage,
                            ok: true,
                            error: String::new(),
                        }),
                    )
                    .map_err(|e| e.to_string())?
                }
                Some(Msg::Commit(c)) => {
                    #[cfg(feature = "cuda")]
                    let mine = match &gpu_cache {
                        Some(c) => super::gpu::digest(c, shape)?,
                        None => digest(sink.regions()),
                    };
                    #[cfg(not(feature = "cuda"))]
                    let mine = digest(sink.regions());
                    let theirs = c
                        .state
                        .get(..8)
                        .and_then(|s| s.try_into().ok())
                        .map(u64::from_le_bytes);
                    let ok = theirs == Some(mine);
                    send(
                        &mut stream,
                        &mut sess,
                        Msg::Committed(Committed {
                            ok,
                            error: if ok {
                                String::new()
                            } else {
                                format!(
                                    "the receiver's KV bytes differ from the sender's (digest {mine:016x}, sender {:016x})",
                                    theirs.unwrap_or(0)
                                )
                            },
                        }),
                    )
                    .map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Some(Msg::Abort(_)) => return Ok(()),
                other => return Err(format!("unexpected message {other:?}")),
            },
        }
    }
}

/// Sends `shape`-sized KV caches to the receiver at `peer` over `transport`: one warm-up copy,
/// then `iters` timed copies (each: the transport's copy of every run, then `StageDone` and the
/// receiver's `StageAck`, so the bytes have landed), then the digest check.
pub fn send_to(
    peer: SocketAddr,
    transport: &str,
    shape: Shape,
    iters: u32,
    progress: &Progress,
) -> Result<Measure, String> {
    let seed = shape.bytes() ^ 0x5eed;
    // The source engine's KV cache: a host segment here, or (cuda) GPU memory exported by a
    // `bench gpu-source` child, which this process opens as a llumlet does.
    #[cfg(feature = "cuda")]
    let gpu_source = match transport {
        "cuda" => Some(super::gpu::Source::start(shape, seed)?),
        _ => None,
    };
    let (_src, regions, maps, want) = match transport {
        #[cfg(feature = "cuda")]
        "cuda" => {
            let s = gpu_source.as_ref().ok_or("no GPU source")?;
            (None, s.regions.clone(), Vec::new(), s.digest)
        }
        _ => {
            let mut src = kv_cache("tx", shape)?;
            fill(&mut src, shape, seed);
            let regions = src.regions().map_err(|e| e.to_string())?;
            let maps = map_all(&regions)?;
            let want = digest(&maps);
            (Some(src), regions, maps, want)
        }
    };
    let mut stream = TcpStream::connect_timeout(&peer, Duration::from_secs(10))
        .map_err(|e| format!("cannot reach the receiver at {peer}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut sess = auth::client(&mut stream, &transfer_key()?).map_err(|e| e.to_string())?;
    let blocks: Vec<u32> = (0..shape.blocks as u32).collect();
    send(
        &mut stream,
        &mut sess,
        Msg::Begin(Begin {
            migration_id: 1,
            src_instance_id: "bench".into(),
            dst_instance_id: String::new(),
            request_id: "bench".into(),
            blocks: shape.blocks as u32,
            transport: transport.into(),
            host: host_identity(),
            regions: regions.iter().map(region_msg).collect(),
            ucx: transport == "ucx",
        }),
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let r = match recv_control(&mut stream, &mut sess, &mut buf)? {
        Msg::Reserved(r) if r.ok => r,
        Msg::Reserved(r) => return Err(format!("the receiver refused: {}", r.error)),
        other => return Err(format!("expected Reserved, got {other:?}")),
    };
    let ucx = if transport == "ucx" {
        Some(UcxSide::start()?)
    } else {
        None
    };
    let mut t: Option<Box<dyn Transport>> = None;
    setup_transport(&mut t, &r, &stream, &mut sess, &regions, ucx.as_ref())?;
    let mut t = t.ok_or("no transport")?;
    let mut runs: Vec<BlockRun> = Vec::new();
    coalesce(&blocks, &r.blocks, 0..blocks.len(), &mut runs);
    let mut stage = |i: u32| -> Result<(), String> {
        let bytes = t.copy(&maps, &runs).map_err(|e| e.to_string())?;
        send(
            &mut stream,
            &mut sess,
            Msg::StageDone(StageDone { stage: i, bytes }),
        )
        .map_err(|e| e.to_string())?;
        match recv_control(&mut stream, &mut sess, &mut buf)? {
            Msg::StageAck(a) if a.ok && a.stage == i => Ok(()),
            other => Err(format!("expected StageAck {i}, got {other:?}")),
        }
    };
    stage(0)?; // warm-up: connection set-up, first touch of the pages on both sides
    let mut times = Vec::with_capacity(iters as usize);
    for i in 1..=iters {
        let t0 = Instant::now();
        stage(i)?;
        times.push(t0.elapsed().as_secs_f64());
        progress.tick(&format!(
            "{transport} {} MiB: {i}/{iters}",
            shape.bytes() >> 20
        ));
    }
    send(
        &mut stream,
        &mut sess,
        Msg::Commit(Commit {
            state: want.to_le_bytes().to_vec(),
            blocks: shape.blocks as u32,
        }),
    )
    .map_err(|e| e.to_string())?;
    match recv_control(&mut stream, &mut sess, &mut buf)? {
        Msg::Committed(c) if c.ok => {}
        Msg::Committed(c) => return Err(c.error),
        other => return Err(format!("expected Committed, got {other:?}")),
    }
    let mut m = Measure::new(t.name(), shape.bytes(), &times);
    m.extra.push(("block_bytes", shape.block_bytes.into()));
    m.extra.push(("layers", shape.layers.into()));
    m.extra.push(("runs", (runs.len() * regions.len()).into()));
    m.extra.push(("verified", true.into()));
    m.extra.push(("encrypted", sess.encrypted().into()));
    // Only tcp's KV bytes cross the connection; shm, ucx and cuda move them beside it.
    m.extra.push((
        "kv_encrypted",
        (sess.encrypted() && t.name() == "tcp").into(),
    ));
    if transport == "cuda" {
        // Names the driver, and says so when it is the test double (no GPU figure).
        let gpu = llumlet::migration::cuda_side::available().unwrap_or_default();
        m.extra.push(("gpu", gpu.into()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver serving one connection on a thread; the sender's side of the stream.
    fn receiver() -> (
        TcpStream,
        Session,
        std::thread::JoinHandle<Result<(), String>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let key = TransferKey::from_bytes(b"bench transfer unit tests");
        let k2 = key.clone();
        let h = std::thread::spawn(move || serve(l.accept().unwrap().0, &k2));
        let mut s = TcpStream::connect(addr).unwrap();
        let sess = auth::client(&mut s, &key).unwrap();
        (s, sess, h)
    }

    fn begin(transport: &str, host: &str, regions: &[KvRegion]) -> Msg {
        Msg::Begin(Begin {
            transport: transport.into(),
            host: host.into(),
            regions: regions.iter().map(region_msg).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn the_receiver_commits_only_the_bytes_the_sender_has() {
        let shape = Shape::for_bytes(256 << 10, 64 << 10, 2).unwrap();
        let mut src = kv_cache("t-src", shape).unwrap();
        let regions = src.regions().unwrap();
        let mut buf = Vec::new();
        // Nothing was sent: the receiver holds zeros, the sender's digest is of other bytes.
        fill(&mut src, shape, 1);
        let sent = digest(&map_all(&regions).unwrap());
        let (mut s, mut sess, h) = receiver();
        send(&mut s, &mut sess, begin("tcp", "", &regions)).unwrap();
        assert!(
            matches!(recv_control(&mut s, &mut sess, &mut buf).unwrap(), Msg::Reserved(r) if r.ok)
        );
        let commit = |d: u64| {
            Msg::Commit(Commit {
                state: d.to_le_bytes().to_vec(),
                blocks: 0,
            })
        };
        send(&mut s, &mut sess, commit(sent)).unwrap();
        match recv_control(&mut s, &mut sess, &mut buf).unwrap() {
            Msg::Committed(c) => assert!(!c.ok && c.error.contains("differ"), "{c:?}"),
            other => panic!("{other:?}"),
        }
        h.join().unwrap().unwrap();
        // The digest of what the receiver does hold (zeros) commits.
        let zeros = kv_cache("t-zeros", shape).unwrap();
        let held = digest(&map_all(&zeros.regions().unwrap()).unwrap());
        let (mut s, mut sess, h) = receiver();
        send(&mut s, &mut sess, begin("tcp", "", &regions)).unwrap();
        assert!(
            matches!(recv_control(&mut s, &mut sess, &mut buf).unwrap(), Msg::Reserved(r) if r.ok)
        );
        send(&mut s, &mut sess, commit(held)).unwrap();
        assert!(
            matches!(recv_control(&mut s, &mut sess, &mut buf).unwrap(), Msg::Committed(c) if c.ok)
        );
        h.join().unwrap().unwrap();
    }

    #[test]
    fn shm_from_another_host_and_unknown_transports_are_refused() {
        let shape = Shape::for_bytes(128 << 10, 64 << 10, 1).unwrap();
        let src = kv_cache("t-refuse", shape).unwrap();
        let regions = src.regions().unwrap();
        let mut buf = Vec::new();
        for (t, host, why) in [
            ("shm", "another-boot-id", "one host"),
            ("carrier-pigeon", "", "unknown transport"),
        ] {
            let (mut s, mut sess, h) = receiver();
            send(&mut s, &mut sess, begin(t, host, &regions)).unwrap();
            match recv_control(&mut s, &mut sess, &mut buf).unwrap() {
                Msg::Reserved(r) => assert!(!r.ok && r.error.contains(why), "{r:?}"),
                other => panic!("{other:?}"),
            }
            assert!(h.join().unwrap().unwrap_err().contains(why));
        }
        let (mut s, mut sess, h) = receiver();
        send(&mut s, &mut sess, begin("tcp", "", &[])).unwrap();
        assert!(
            matches!(recv_control(&mut s, &mut sess, &mut buf).unwrap(), Msg::Reserved(r) if !r.ok)
        );
        assert!(h.join().unwrap().is_err());
    }
}
