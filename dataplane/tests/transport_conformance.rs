//! The conformance suite every KV transport passes: random runs over real shared-memory regions
//! arrive byte for byte, nothing outside the runs changes, a run outside the reservation is
//! refused before anything is written, and source runs beyond the regions are errors.

use std::net::{TcpListener, TcpStream};

use llumlet_dataplane::aead::FrameKey;
use llumlet_dataplane::kv::{HostKvCache, MappedRegion};
use llumlet_dataplane::rng::SplitMix64;
use llumlet_dataplane::runs::{blocks, coalesce, BlockRun};
use llumlet_dataplane::transport::{
    read_frame, receive_frame_keyed, write_frame, DataSink, Frame, ReservedBlocks, ShmTransport,
    TcpTransport, Transport, TransportError, FRAME_CONTROL,
};

const LAYERS: u32 = 3;
const BLOCKS: u64 = 64;
const BLOCK_BYTES: u64 = 4096;

struct Cache {
    cache: HostKvCache,
}

impl Cache {
    fn new(tag: &str) -> Cache {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/llumlet-conf-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        Cache {
            cache: HostKvCache::create(&path, LAYERS, BLOCKS, BLOCK_BYTES, BLOCK_BYTES).unwrap(),
        }
    }

    fn maps(&self) -> Vec<MappedRegion> {
        self.cache
            .regions()
            .unwrap()
            .iter()
            .map(|r| MappedRegion::map(r).unwrap())
            .collect()
    }

    fn fill(&mut self, rng: &mut SplitMix64) {
        for l in 0..LAYERS {
            for b in 0..BLOCKS {
                for x in self.cache.token_mut(l, b, 0).unwrap().chunks_mut(8) {
                    x.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
        }
    }

    fn block(&mut self, l: u32, b: u64) -> Vec<u8> {
        self.cache.token_mut(l, b, 0).unwrap().to_vec()
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Shm,
    Tcp,
    /// `tcp` with encrypted data frames (`LLUMLET_TRANSFER_ENCRYPT`).
    TcpEncrypted,
    /// UCX with `UCX_TLS` set to this.
    #[cfg(feature = "ucx")]
    #[allow(dead_code)]
    Ucx(&'static str),
}

impl Kind {
    fn seed(self) -> u64 {
        match self {
            Kind::Shm => 0,
            Kind::Tcp => 1,
            Kind::TcpEncrypted => 20,
            #[cfg(feature = "ucx")]
            Kind::Ucx(tls) => 2 + tls.len() as u64,
        }
    }
}

/// Copies over UCX the way a migration does: the destination registers its regions and
/// progresses a worker; the source connects to its address, unpacks its keys and puts.
#[cfg(feature = "ucx")]
fn ucx_copy(
    tls: &str,
    src: &Cache,
    dst: &Cache,
    reserved: &[u32],
    runs: &[BlockRun],
) -> Result<u64, String> {
    use llumlet_dataplane::ucx::{Context, Node, Registry, RemoteRegion, UcxTransport};
    use std::sync::Mutex;
    /// Two llumlets' UCX sides, each with its context, registry and worker, living as long as
    /// a llumlet does (the whole test process).
    struct Side {
        node: Node,
        reg: Registry,
    }
    static SIDES: Mutex<Vec<(&'static str, &'static (Side, Side))>> = Mutex::new(Vec::new());
    let side = || {
        let ctx = Context::with(&[("TLS", tls)]).unwrap();
        Side {
            node: Node::start(&ctx).unwrap(),
            reg: Registry::new(ctx),
        }
    };
    let pair = {
        let mut all = SIDES.lock().unwrap();
        match all.iter().find(|(t, _)| *t == tls) {
            Some((_, p)) => *p,
            None => {
                let p: &'static (Side, Side) = Box::leak(Box::new((side(), side())));
                let t: &'static str = Box::leak(tls.to_string().into_boxed_str());
                all.push((t, p));
                p
            }
        }
    };
    let (target, dst_reg) = (&pair.0.node, &pair.0.reg);
    let (source, src_reg) = (&pair.1.node, &pair.1.reg);
    let remote: Vec<RemoteRegion> = dst
        .cache
        .regions()
        .unwrap()
        .iter()
        .map(|r| {
            let g = dst_reg.get(r).unwrap();
            RemoteRegion {
                address: g.address(),
                num_blocks: r.num_blocks,
                block_size_bytes: r.block_size_bytes,
                rkey: g.rkey().to_vec(),
            }
        })
        .collect();
    // Registered once per region: asking again gives the same registration.
    let again = dst_reg.get(&dst.cache.regions().unwrap()[0]).unwrap();
    assert_eq!(again.address(), remote[0].address);
    assert!(dst_reg.len() >= LAYERS as usize);
    let srcs = src
        .cache
        .regions()
        .unwrap()
        .iter()
        .map(|r| src_reg.get(r).unwrap())
        .collect();
    let conn = source
        .connect(target.address(), &remote)
        .map_err(|e| e.to_string())?;
    let mut t = UcxTransport::new(
        conn,
        srcs,
        ReservedBlocks::new(reserved),
        std::time::Duration::from_secs(20),
    );
    assert_eq!(t.name(), "ucx");
    t.copy(&src.maps(), runs).map_err(|e| e.to_string())
}

/// Copies `runs` from `src` to `dst` within `reserved` over `kind`, the way a migration does:
/// data, then a control message the destination answers once everything before it is applied.
fn copy(
    kind: Kind,
    src: &Cache,
    dst: &Cache,
    reserved: &[u32],
    runs: &[BlockRun],
) -> Result<u64, String> {
    let src_maps = src.maps();
    match kind {
        #[cfg(feature = "ucx")]
        Kind::Ucx(tls) => ucx_copy(tls, src, dst, reserved, runs),
        Kind::Shm => {
            let mut t = ShmTransport::new(dst.maps(), ReservedBlocks::new(reserved));
            assert_eq!(t.name(), "shm");
            t.copy(&src_maps, runs).map_err(|e| e.to_string())
        }
        Kind::Tcp | Kind::TcpEncrypted => {
            let encrypted = matches!(kind, Kind::TcpEncrypted);
            let key = [0x5au8; llumlet_dataplane::aead::KEY];
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let sink = DataSink::new(dst.maps(), ReservedBlocks::new(reserved));
            let receiver = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                let mut err = None;
                let mut opener = encrypted.then(|| FrameKey::new(&key));
                loop {
                    match receive_frame_keyed(&mut s, &mut buf, &sink, opener.as_mut()) {
                        Ok(Frame::Data(r)) => {
                            if let Err(e) = r {
                                err.get_or_insert(e.to_string());
                            }
                        }
                        Ok(Frame::Control) => {
                            let answer = err.take().unwrap_or_else(|| "ok".into());
                            write_frame(&mut s, FRAME_CONTROL, answer.as_bytes()).unwrap();
                            return;
                        }
                        Err(e) => panic!("receiver: {e}"),
                    }
                }
            });
            let mut stream = TcpStream::connect(addr).unwrap();
            let clone = stream.try_clone().unwrap();
            let mut t = if encrypted {
                TcpTransport::encrypted(clone, FrameKey::new(&key))
            } else {
                TcpTransport::new(clone)
            };
            assert_eq!(t.name(), "tcp");
            let r = t.copy(&src_maps, runs);
            write_frame(&mut stream, FRAME_CONTROL, b"end").unwrap();
            let mut buf = Vec::new();
            read_frame(&mut stream, &mut buf).unwrap();
            receiver.join().unwrap();
            let bytes = r.map_err(|e| e.to_string())?;
            match std::str::from_utf8(&buf).unwrap() {
                "ok" => Ok(bytes),
                e => Err(e.to_string()),
            }
        }
    }
}

fn conformance(kind: Kind) {
    let mut rng = SplitMix64(kind.seed() + 11);
    for round in 0..20 {
        let mut src = Cache::new("src");
        let mut dst = Cache::new("dst");
        src.fill(&mut rng);
        // A request of n blocks at random source blocks goes to n reserved destination blocks,
        // sometimes consecutive (long runs), sometimes scattered.
        let n = 1 + (rng.next_u64() % 40) as usize;
        let mut pool: Vec<u32> = (0..BLOCKS as u32).collect();
        let pick = |rng: &mut SplitMix64, pool: &mut Vec<u32>, consecutive: bool| -> Vec<u32> {
            if consecutive {
                let start = (rng.next_u64() % (BLOCKS - n as u64 + 1)) as u32;
                (start..start + n as u32).collect()
            } else {
                (0..n)
                    .map(|_| pool.swap_remove((rng.next_u64() % pool.len() as u64) as usize))
                    .collect()
            }
        };
        let s_blocks = pick(&mut rng, &mut pool, round % 2 == 0);
        let mut pool: Vec<u32> = (0..BLOCKS as u32).collect();
        let d_blocks = pick(&mut rng, &mut pool, round % 3 == 0);
        let mut runs = Vec::new();
        coalesce(&s_blocks, &d_blocks, 0..n, &mut runs);
        assert_eq!(blocks(&runs), n as u64);
        let bytes = copy(kind, &src, &dst, &d_blocks, &runs).unwrap();
        assert_eq!(
            bytes,
            n as u64 * BLOCK_BYTES * u64::from(LAYERS),
            "{kind:?}"
        );
        for l in 0..LAYERS {
            for b in 0..BLOCKS {
                let got = dst.block(l, b);
                match d_blocks.iter().position(|&d| u64::from(d) == b) {
                    Some(p) => assert_eq!(
                        got,
                        src.block(l, u64::from(s_blocks[p])),
                        "{kind:?} layer {l} block {b}"
                    ),
                    None => assert!(
                        got.iter().all(|&x| x == 0),
                        "{kind:?}: block {b} outside the runs changed"
                    ),
                }
            }
        }
    }
}

fn refuses_runs_outside_the_reservation(kind: Kind) {
    let mut rng = SplitMix64(5);
    let mut src = Cache::new("src");
    let mut dst = Cache::new("dst");
    src.fill(&mut rng);
    // Reserved 10..14; a run reaching block 14, and one far outside the cache.
    for run in [
        BlockRun {
            src: 0,
            dst: 12,
            len: 3,
        },
        BlockRun {
            src: 0,
            dst: 1000,
            len: 1,
        },
    ] {
        let err = copy(kind, &src, &dst, &[10, 11, 12, 13], &[run]).unwrap_err();
        assert!(err.contains("outside the reservation"), "{kind:?}: {err}");
    }
    for l in 0..LAYERS {
        for b in 0..BLOCKS {
            assert!(
                dst.block(l, b).iter().all(|&x| x == 0),
                "{kind:?}: nothing written"
            );
        }
    }
    // A source run beyond the source's regions.
    let err = copy(
        kind,
        &src,
        &dst,
        &[10],
        &[BlockRun {
            src: BLOCKS as u32,
            dst: 10,
            len: 1,
        }],
    )
    .unwrap_err();
    assert!(err.contains("outside the source"), "{kind:?}: {err}");
}

#[test]
fn shm_conforms() {
    conformance(Kind::Shm);
    refuses_runs_outside_the_reservation(Kind::Shm);
}

#[test]
fn tcp_conforms() {
    conformance(Kind::Tcp);
    refuses_runs_outside_the_reservation(Kind::Tcp);
}

#[test]
fn encrypted_tcp_conforms() {
    conformance(Kind::TcpEncrypted);
    refuses_runs_outside_the_reservation(Kind::TcpEncrypted);
}

/// UCX over its TCP transport (software RMA: the destination's worker thread applies the puts).
#[cfg(feature = "ucx")]
#[test]
fn ucx_over_tcp_conforms() {
    conformance(Kind::Ucx("tcp"));
    refuses_runs_outside_the_reservation(Kind::Ucx("tcp"));
}

/// UCX over shared memory and cross-memory attach (one-sided puts on this host).
#[cfg(feature = "ucx")]
#[test]
fn ucx_over_shared_memory_conforms() {
    conformance(Kind::Ucx("posix,cma"));
    refuses_runs_outside_the_reservation(Kind::Ucx("posix,cma"));
}

#[test]
fn tcp_sink_rejects_malformed_data_frames() {
    let dst = Cache::new("sink");
    let sink = DataSink::new(dst.maps(), ReservedBlocks::new(&[1, 2]));
    assert!(matches!(
        sink.apply(&[0; 8]),
        Err(TransportError::Malformed(_))
    ));
    let mut f = Vec::new();
    for w in [0u32, 1, 2, 0] {
        f.extend_from_slice(&w.to_le_bytes());
    }
    f.extend_from_slice(&[1; 100]);
    assert!(
        matches!(sink.apply(&f), Err(TransportError::Malformed(_))),
        "wrong byte count"
    );
    f[..4].copy_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        sink.apply(&f),
        Err(TransportError::OutOfReservation { region: 7, .. })
    ));
}

/// Encrypted data frames as the sender writes them: on the wire the blocks do not appear; any
/// byte altered on the path (head, data header, ciphertext or tag), a frame dropped or one sent
/// twice makes the receiver refuse it with an error that ends the connection.
#[test]
fn encrypted_tcp_frames_hide_the_blocks_and_refuse_any_change() {
    let key = [0x33u8; llumlet_dataplane::aead::KEY];
    let mut rng = SplitMix64(77);
    let mut src = Cache::new("enc-src");
    src.fill(&mut rng);
    let dst = Cache::new("enc-dst");
    let reserved = [4u32, 5, 9, 10];
    let runs = [BlockRun {
        src: 1,
        dst: 4,
        len: 2,
    }];
    // What the sender writes, as the wire carries it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut all).unwrap();
        all
    });
    let stream = TcpStream::connect(addr).unwrap();
    let mut t = TcpTransport::encrypted(stream.try_clone().unwrap(), FrameKey::new(&key));
    t.copy(&src.maps(), &runs).unwrap();
    drop(t);
    drop(stream);
    let wire = reader.join().unwrap();
    // One frame per layer: head, data header, 2 blocks, tag.
    let frame = 5 + 16 + 2 * BLOCK_BYTES as usize + 16;
    assert_eq!(wire.len(), LAYERS as usize * frame);
    let block = src.block(0, 1);
    assert!(
        !wire.windows(64).any(|w| w == &block[..64]),
        "a source block's bytes appear on the wire"
    );

    let mut dst = dst;
    let receive_all = |dst: &Cache, wire: &[u8]| -> Result<(), TransportError> {
        let sink = DataSink::new(dst.maps(), ReservedBlocks::new(&reserved));
        let mut opener = FrameKey::new(&key);
        let mut r = wire;
        let mut buf = Vec::new();
        while !r.is_empty() {
            match receive_frame_keyed(&mut r, &mut buf, &sink, Some(&mut opener))? {
                Frame::Data(Ok(_)) => {}
                Frame::Data(Err(e)) => return Err(e),
                Frame::Control => panic!("a control frame"),
            }
        }
        Ok(())
    };
    receive_all(&dst, &wire).unwrap();
    for l in 0..LAYERS {
        assert_eq!(dst.block(l, 4), src.block(l, 1));
        assert_eq!(dst.block(l, 5), src.block(l, 2));
    }
    // A changed byte: a head that no longer makes sense is refused as it is, the rest fails
    // authentication.
    for at in [0, 4, 5, 13, 21, 21 + 4096, frame - 1, frame + 30] {
        let mut bad = wire.clone();
        bad[at] ^= 0x10;
        assert!(
            receive_all(&dst, &bad).is_err(),
            "a change at byte {at} went unnoticed"
        );
        if at >= 21 {
            assert!(matches!(
                receive_all(&dst, &bad),
                Err(TransportError::Aead(_))
            ));
        }
    }
    // The header is bound too: moved to other reserved blocks (4 -> 9), the frame fails.
    let mut moved = wire.clone();
    moved[9] ^= 4 ^ 9;
    assert!(matches!(
        receive_all(&dst, &moved),
        Err(TransportError::Aead(_))
    ));
    // A frame dropped, or replayed.
    assert!(matches!(
        receive_all(&dst, &wire[frame..]),
        Err(TransportError::Aead(_))
    ));
    let mut twice = wire[..frame].to_vec();
    twice.extend_from_slice(&wire);
    assert!(matches!(
        receive_all(&dst, &twice),
        Err(TransportError::Aead(_))
    ));
}
