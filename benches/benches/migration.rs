//! Live migration's data path, each with a baseline measured in the same run:
//!
//! - `coalesce`: block tables into copy runs (contiguous and fragmented tables);
//! - `transport/{shm,tcp}`: one migration's KV bytes by transfer size, against `memcpy` of the
//!   same bytes between two other shared-memory mappings and a plain loopback TCP stream of the
//!   same bytes;
//! - `downtime`: one request's downtime (suspend → resumed at the destination) by sequence
//!   length, with two simulated engines, the transfer endpoint and the source driver in this
//!   process over real shared memory and a real socket.
//!
//! `cargo bench -p llumlet-benches --bench migration`

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llumlet::config::{MigrationLimits, TransportChoice};
use llumlet::migration::auth::TransferKey;
use llumlet::migration::endpoint::{EndpointConfig, TransferServer};
use llumlet::migration::link::EngineLink;
use llumlet::migration::machine::{Outcome, SourceTuning};
use llumlet::migration::rpc::SlotLedger;
use llumlet::migration::source::{run_source, OutRequest, SourceOptions};
use llumlet::status::MigrationLoad;
use llumlet_dataplane::kv::{HostKvCache, MappedRegion};
use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};
use llumlet_dataplane::rng::SplitMix64;
use llumlet_dataplane::runs::{coalesce, BlockRun};
use llumlet_dataplane::segment::{Attach, ControlSegment};
use llumlet_dataplane::transport::{
    read_frame, receive_frame, write_frame, DataSink, Frame, ReservedBlocks, ShmTransport,
    TcpTransport, Transport, FRAME_CONTROL,
};
use llumlet_tools::sim::SimConfig;

/// Both ends of the in-process migrations share one key.
fn bench_key() -> TransferKey {
    TransferKey::from_bytes(b"criterion migration bench key")
}

fn bench_coalesce(c: &mut Criterion) {
    let mut g = c.benchmark_group("coalesce");
    let mut rng = SplitMix64(3);
    for n in [256usize, 4096] {
        let contiguous: Vec<u32> = (1000..1000 + n as u32).collect();
        let mut fragmented: Vec<u32> = (0..4 * n as u32).collect();
        for i in (1..fragmented.len()).rev() {
            fragmented.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        fragmented.truncate(n);
        let dst: Vec<u32> = (0..n as u32).collect();
        let mut out: Vec<BlockRun> = Vec::with_capacity(n);
        g.throughput(Throughput::Elements(n as u64));
        for (name, src) in [("contiguous", &contiguous), ("fragmented", &fragmented)] {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter(|| {
                    out.clear();
                    coalesce(black_box(src), black_box(&dst), 0..n, &mut out);
                    black_box(out.len())
                })
            });
        }
    }
    g.finish();
}

/// An 8B-model-like cache slice: 2 layers of 64 KiB blocks (16 tokens × 8 KV heads × 128 × K,V
/// × fp16).
const LAYERS: u32 = 2;
const BLOCK_BYTES: u64 = 64 * 1024;
const BLOCKS: u64 = 1024;

fn cache(tag: &str) -> HostKvCache {
    let path = PathBuf::from(format!(
        "/dev/shm/llumlet-bench-{tag}-{}",
        std::process::id()
    ));
    HostKvCache::create(&path, LAYERS, BLOCKS, BLOCK_BYTES, BLOCK_BYTES / 16).unwrap()
}

fn maps(c: &HostKvCache) -> Vec<MappedRegion> {
    c.regions()
        .unwrap()
        .iter()
        .map(|r| MappedRegion::map(r).unwrap())
        .collect()
}

/// A fresh /dev/shm file of `len` bytes, mapped and filled.
fn shm_map(tag: &str, len: usize) -> (memmap2::MmapMut, PathBuf) {
    let path = PathBuf::from(format!(
        "/dev/shm/llumlet-bench-{tag}-{}",
        std::process::id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(len as u64).unwrap();
    // SAFETY: the file was just created by this process and is not resized or mapped by anyone
    // else while the map lives.
    let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    m.fill(7);
    (m, path)
}

/// A destination for the tcp transport: a thread applying data frames and answering each
/// control frame once everything before it is written.
fn tcp_sink(dst: Vec<MappedRegion>, reserved: &[u32]) -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = DataSink::new(dst, ReservedBlocks::new(reserved));
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.set_nodelay(true);
        let mut buf = Vec::new();
        loop {
            match receive_frame(&mut s, &mut buf, &sink) {
                Ok(Frame::Data(r)) => {
                    r.unwrap();
                }
                Ok(Frame::Control) => write_frame(&mut s, FRAME_CONTROL, b"ok").unwrap(),
                Err(_) => return,
            }
        }
    });
    let s = TcpStream::connect(addr).unwrap();
    let _ = s.set_nodelay(true);
    s
}

/// A plain loopback stream: the reader discards, then answers one byte per `bytes`.
fn tcp_baseline(bytes: usize) -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 4 << 20];
        let mut left = bytes;
        loop {
            let want = left.min(buf.len());
            match s.read(&mut buf[..want]) {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n,
            }
            if left == 0 {
                if s.write_all(b"k").is_err() {
                    return;
                }
                left = bytes;
            }
        }
    });
    TcpStream::connect(addr).unwrap()
}

fn bench_transport(c: &mut Criterion) {
    let src = cache("src");
    let dst = cache("dst");
    let src_maps = maps(&src);
    let mut g = c.benchmark_group("transport");
    g.sample_size(20);
    for n in [1u32, 16, 256, 1024] {
        let bytes = u64::from(n) * BLOCK_BYTES * u64::from(LAYERS);
        g.throughput(Throughput::Bytes(bytes));
        // Contiguous on both sides: one run per region (the coalescer's best case).
        let blocks: Vec<u32> = (0..n).collect();
        let mut runs = Vec::new();
        coalesce(&blocks, &blocks, 0..n as usize, &mut runs);

        let mut shm = ShmTransport::new(maps(&dst), ReservedBlocks::new(&blocks));
        g.bench_with_input(BenchmarkId::new("shm", bytes), &n, |b, _| {
            b.iter(|| shm.copy(&src_maps, black_box(&runs)).unwrap())
        });

        // The same bytes between two other shared-memory mappings, touched before measuring so
        // that no page fault is timed.
        let (from_map, from_path) = shm_map("memcpy-from", bytes as usize);
        let (mut to_map, to_path) = shm_map("memcpy-to", bytes as usize);
        to_map.copy_from_slice(&from_map);
        g.bench_with_input(BenchmarkId::new("memcpy-baseline", bytes), &n, |b, _| {
            b.iter(|| {
                to_map.copy_from_slice(black_box(&from_map[..]));
                black_box(to_map[to_map.len() - 1])
            })
        });
        drop((to_map, from_map));
        let _ = std::fs::remove_file(to_path);
        let _ = std::fs::remove_file(from_path);

        let mut stream = tcp_sink(maps(&dst), &blocks);
        let mut tcp = TcpTransport::new(stream.try_clone().unwrap());
        let mut buf = Vec::new();
        g.bench_with_input(BenchmarkId::new("tcp", bytes), &n, |b, _| {
            b.iter(|| {
                tcp.copy(&src_maps, black_box(&runs)).unwrap();
                write_frame(&mut stream, FRAME_CONTROL, b"end").unwrap();
                read_frame(&mut stream, &mut buf).unwrap()
            })
        });

        let payload = vec![7u8; bytes as usize];
        let mut plain = tcp_baseline(bytes as usize);
        let mut ack = [0u8; 1];
        g.bench_with_input(BenchmarkId::new("tcp-baseline", bytes), &n, |b, _| {
            b.iter(|| {
                plain.write_all(black_box(&payload)).unwrap();
                plain.read_exact(&mut ack).unwrap();
            })
        });
    }
    g.finish();
    drop((src, dst));
    for tag in ["src", "dst"] {
        let _ = std::fs::remove_file(format!(
            "/dev/shm/llumlet-bench-{tag}-{}",
            std::process::id()
        ));
    }
}

/// A simulated engine in this process with its llumlet side: the link and the transfer
/// endpoint.
struct Side {
    link: Arc<EngineLink>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    engine: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Side {
    fn start(tag: &str, prompt: u32, requests: u32) -> Side {
        let path = PathBuf::from(format!(
            "/dev/shm/llumlet-bench-mig-{tag}-{}",
            std::process::id()
        ));
        let cfg = SimConfig {
            admit_every: 1,
            segment: path.clone(),
            requests,
            max_tokens: 1_000_000,
            step: Duration::from_millis(5),
            seed: 1,
            block_size: 16,
            num_blocks: 3 * (prompt / 16) + 512,
            max_prompt: prompt,
            min_prompt: prompt,
            update_steps: 1,
            push: true,
            kv_on_gpu: false,
            layers: LAYERS,
            kv_heads: 8,
            head_size: 128,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let engine = std::thread::spawn(move || llumlet_tools::sim::run(cfg, &s2).unwrap());
        let seg = loop {
            match ControlSegment::attach(&path) {
                Ok(Attach::Ready(seg)) => break seg,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let link = EngineLink::new(path.clone());
        link.set_segment(Some(Arc::new(seg)));
        let (server, addr) = TransferServer::start(
            Arc::clone(&link),
            "127.0.0.1:0".parse().unwrap(),
            EndpointConfig::with_key(bench_key()),
        )
        .unwrap();
        let ledger = SlotLedger::new(MigrationLimits {
            enabled: true,
            detailed: false,
            max_req_in: 64,
            max_req_out: 64,
            max_token_in: i32::MAX,
            max_token_out: i32::MAX,
            max_ratio_in: 1.0,
            max_ratio_out: 1.0,
        });
        ledger.observe(MigrationLoad::default());
        server.set_ledger(ledger);
        Side {
            link,
            addr,
            stop,
            engine: Some(engine),
            path,
        }
    }

    /// The longest running request: (slot, id, tokens).
    fn longest(&self) -> Option<(u32, String, u64)> {
        let seg = self.link.segment()?;
        let mut blocks = Vec::new();
        (0..MAX_REQUESTS as u32)
            .filter_map(|slot| {
                let r = read_request(seg.requests(), slot, &mut blocks).ok()??;
                if r.state() != Some(RequestState::Running) {
                    return None;
                }
                let tokens = u64::from(r.prompt_tokens) + u64::from(r.output_tokens);
                Some((slot, r.id.as_str()?.to_string(), tokens))
            })
            .max_by_key(|x| x.2)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
        let name = self
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if let Ok(rd) = std::fs::read_dir("/dev/shm") {
            for e in rd.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn bench_downtime(c: &mut Criterion) {
    let mut g = c.benchmark_group("downtime");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    for len in [512u32, 4096, 16384] {
        let sides = [Side::start("a", len, 2), Side::start("b", len, 0)];
        let mut from = 0;
        while sides[0].longest().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut stages = Vec::new();
        let mut tokens = 0u64;
        let mut total = Duration::ZERO;
        let mut n = 0u32;
        g.bench_with_input(BenchmarkId::new("shm", len), &len, |b, _| {
            b.iter_custom(|iters| {
                let mut sum = Duration::ZERO;
                for _ in 0..iters {
                    let (slot, id, len) = loop {
                        match sides[from].longest() {
                            Some(x) => break x,
                            None => std::thread::sleep(Duration::from_millis(2)),
                        }
                    };
                    let t = Instant::now();
                    let rep = run_source(
                        &sides[from].link,
                        "bench",
                        sides[1 - from].addr,
                        &OutRequest { slot, id },
                        &SourceOptions {
                            choice: TransportChoice::Shm,
                            ucx: None,
                            tuning: SourceTuning::default(),
                            key: bench_key(),
                        },
                    );
                    total += t.elapsed();
                    tokens += len;
                    n += 1;
                    assert_eq!(rep.outcome, Outcome::Migrated, "{rep:?}");
                    stages.push(rep.stages);
                    sum += rep.downtime.unwrap();
                    from = 1 - from;
                }
                sum
            })
        });
        if n == 0 {
            continue; // filtered out
        }
        stages.sort_unstable();
        eprintln!(
            "downtime/shm/{len}: {n} migrations of {} tokens on average, stages median {}, whole migration mean {:.2} ms",
            tokens / u64::from(n.max(1)),
            stages[stages.len() / 2],
            total.as_secs_f64() * 1e3 / f64::from(n.max(1))
        );
    }
    g.finish();
}

criterion_group!(benches, bench_coalesce, bench_transport, bench_downtime);
criterion_main!(benches);
