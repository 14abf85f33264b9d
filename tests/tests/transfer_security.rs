//! Attacks on the transfer endpoint, against the real binary: a peer without the key gets
//! nothing and changes nothing; a peer with the key that goes silent loses its reservation within
//! the idle timeout; a frame header declaring a huge frame costs no memory; a connection flood
//! keeps the thread count bounded; and a real migration still works after each.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use llumlet::migration::auth::{self, AuthError, TransferKey};
use llumlet::migration::wire::{recv_control, region_msg, regions_of, send};
use llumlet_dataplane::kv::MemoryKind;
use llumlet_dataplane::request_table::RequestState;
use llumlet_dataplane::segment::{Attach, ControlSegment};
use llumlet_proto::migration::{envelope::Msg, Begin, Envelope};
use llumlet_tests::mig::*;
use llumlet_tests::*;
use prost::Message;

/// A source engine whose requests outlive the attacks (50 s of decoding).
fn long_running(seed: u64) -> SimOpts {
    let mut o = SimOpts::new(seed, 2);
    o.max_tokens = 5000;
    o.num_blocks = 2048;
    o
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap()
}

/// A `Begin` for `blocks` blocks in the layout of `dst`'s engine, as a source would send it.
fn begin_for(dst: &Instance, blocks: u32) -> Msg {
    let path = std::path::Path::new("/dev/shm").join(format!(
        "llumlet-ctl-test-{}-{}",
        dst.id,
        std::process::id()
    ));
    let Ok(Attach::Ready(seg)) = ControlSegment::attach(&path) else {
        panic!("attach {}", path.display())
    };
    let regions = regions_of(&seg, MemoryKind::HostShm).unwrap();
    Msg::Begin(Begin {
        migration_id: 7,
        src_instance_id: "intruder".into(),
        request_id: "injected".into(),
        blocks,
        transport: "tcp".into(),
        regions: regions.iter().map(region_msg).collect(),
        ..Default::default()
    })
}

fn connect(port: i32) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads until the peer closes; what it said.
fn until_closed(mut s: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn a_peer_without_the_key_can_neither_reserve_nor_learn_anything() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src = Instance::start(&redis, "sec-src", long_running(21), &[]);
    let mut dst = Instance::start(&redis, "sec-dst", SimOpts::new(22, 1), &[]);
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "sec-dst");

    // The attack of the issue: a plain socket sends `Begin` as its first frame.
    let bytes = Envelope {
        msg: Some(begin_for(&dst, 4)),
    }
    .encode_to_vec();
    let mut s = connect(port);
    s.write_all(&(bytes.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&[1]).unwrap();
    s.write_all(&bytes).unwrap();
    assert!(
        until_closed(s).is_empty(),
        "an unauthenticated peer was answered"
    );

    // `Resolve` from a stranger: nothing either.
    let bytes = Envelope {
        msg: Some(Msg::Resolve(llumlet_proto::migration::Resolve {
            migration_id: 7,
            request_id: "x".into(),
        })),
    }
    .encode_to_vec();
    let mut s = connect(port);
    let _ = s.write_all(&(bytes.len() as u32).to_le_bytes());
    let _ = s.write_all(&[1]);
    let _ = s.write_all(&bytes);
    assert!(
        until_closed(s).is_empty(),
        "a stranger's Resolve was answered"
    );

    // A peer that speaks the handshake with another key is refused, and told so.
    let mut s = connect(port);
    let wrong = TransferKey::from_bytes(b"not this cluster's secret at all");
    assert!(matches!(
        auth::client(&mut s, &wrong),
        Err(AuthError::WrongKey)
    ));

    assert!(
        dst.ids_in_state(RequestState::MigratingIn).is_empty(),
        "nothing was reserved"
    );
    assert!(
        !dst.logs().contains("migration in"),
        "no migration in began:\n{}",
        dst.logs()
    );
    // The llumlets themselves still migrate (they share this host's key).
    status(&redis, "sec-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 1
    });
    let (ok, msg) = migrate(&rt, &src, "sec-dst", port);
    assert!(ok, "{msg}\n{}", src.logs());
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}

/// A relay: the attacker has llumlet A connect to it (a `Migrate` naming the attacker's address
/// as the destination), passes A's handshake on to llumlet B and B's back, then drops A and
/// speaks to B itself. The handshake completes between A and B, but the attacker holds no
/// session key: its `Begin` is not tagged for the session, and B reserves nothing.
#[test]
fn a_relayed_handshake_gives_the_relay_nothing() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = Instance::start(&redis, "relay-a", long_running(26), &[]);
    let b = Instance::start(&redis, "relay-b", SimOpts::new(27, 0), &[]);
    b.wait_attached(&redis);
    status(&redis, "relay-a", Duration::from_secs(15), |s| {
        s.num_running_requests >= 1
    });
    let b_port = kvt_port(&redis, "relay-b");
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let attacker = std::thread::spawn(move || {
        let (mut from_a, _) = relay.accept().unwrap();
        from_a
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut to_b = connect(b_port);
        let pass = |from: &mut TcpStream, to: &mut TcpStream, n: usize| {
            let mut m = vec![0u8; n];
            from.read_exact(&mut m).unwrap();
            to.write_all(&m).unwrap();
        };
        pass(&mut from_a, &mut to_b, 37); // hello
        pass(&mut to_b, &mut from_a, 69); // challenge and the server's proof
        pass(&mut from_a, &mut to_b, 32); // the client's proof
        pass(&mut to_b, &mut from_a, 1); // accepted
        drop(from_a);
        // Now the attacker's own Begin, with a tag it had to make up.
        let mut bytes = Envelope {
            msg: Some(begin_for(&b, 4)),
        }
        .encode_to_vec();
        bytes.extend_from_slice(&[0u8; 16]);
        to_b.write_all(&(bytes.len() as u32).to_le_bytes()).unwrap();
        to_b.write_all(&[1]).unwrap();
        to_b.write_all(&bytes).unwrap();
        (until_closed(to_b), b)
    });
    // The Migrate A is made to carry out fails (its destination went away).
    let (ok, _) = migrate(&rt, &a, "relay-b", i32::from(relay_port));
    assert!(!ok);
    let (answer, b) = attacker.join().unwrap();
    assert!(answer.is_empty(), "B answered the relay's Begin");
    assert!(b.ids_in_state(RequestState::MigratingIn).is_empty());
    assert!(!b.logs().contains("migration in"), "{}", b.logs());
}

#[test]
fn a_silent_peer_loses_its_reservation_and_huge_headers_cost_nothing() {
    let redis = RedisServer::start();
    let (mport, ms) = {
        let p = free_port();
        (p, p.to_string())
    };
    let dst = Instance::start(
        &redis,
        "idle-dst",
        SimOpts::new(23, 0),
        &[
            ("LLUMLET_TRANSFER_IDLE_TIMEOUT", "2"),
            ("LLUMLET_METRICS_PORT", &ms),
        ],
    );
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "idle-dst");
    // The test runs as the llumlets' user on their host: it can read this host's key.
    let key = TransferKey::host().unwrap();

    // Reserve, then go silent.
    let mut s = connect(port);
    let mut session = auth::client(&mut s, &key).unwrap();
    send(&mut s, &mut session, begin_for(&dst, 8)).unwrap();
    let mut buf = Vec::new();
    let Msg::Reserved(r) = recv_control(&mut s, &mut session, &mut buf).unwrap() else {
        panic!("expected Reserved")
    };
    assert!(r.ok, "{}", r.error);
    assert_eq!(
        dst.ids_in_state(RequestState::MigratingIn),
        vec!["injected"]
    );
    let t = Instant::now();
    wait_for_metric(
        mport,
        "llumlet_migrations_total{side=\"in\",outcome=\"aborted\",reason=\"lost_source\"} 1",
        Duration::from_secs(10),
    );
    let held = t.elapsed();
    assert!(
        held < Duration::from_secs(6),
        "held {held:?} with a 2 s idle timeout"
    );
    until(
        Duration::from_secs(5),
        "the reservation is freed",
        || dst.ids_in_state(RequestState::MigratingIn).is_empty(),
        || dst.logs(),
    );

    // Frame headers that declare 64 MiB control frames, from six authenticated connections
    // that then send nothing: the llumlet allocates nothing for them.
    let rss = proc_status(dst.llumlet.pid(), "VmRSS:");
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = connect(port);
        auth::client(&mut s, &key).unwrap();
        s.write_all(&(64u32 << 20).to_le_bytes()).unwrap();
        s.write_all(&[1]).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown_kb = proc_status(dst.llumlet.pid(), "VmRSS:").saturating_sub(rss);
    assert!(grown_kb < 32 << 10, "RSS grew by {grown_kb} kB");
    drop(held);
}

#[test]
fn a_connection_flood_keeps_threads_bounded_and_the_endpoint_serving() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src = Instance::start(&redis, "flood-src", long_running(24), &[]);
    let mut dst = Instance::start(
        &redis,
        "flood-dst",
        SimOpts::new(25, 0),
        &[("LLUMLET_TRANSFER_MAX_CONNECTIONS", "8")],
    );
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "flood-dst");
    let pid = dst.llumlet.pid();
    let before = proc_status(pid, "Threads:");
    // Idle connections that never say a word.
    let flood: Vec<TcpStream> = (0..200).map(|_| connect(port)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = proc_status(pid, "Threads:");
    assert!(
        during <= before + 8,
        "{during} threads with 200 connections (before: {before})"
    );
    // The handshake's deadline (a step, 5 s) closes them: the endpoint is free again.
    let t = Instant::now();
    for s in flood {
        assert!(until_closed(s).is_empty());
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    status(&redis, "flood-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 1
    });
    let (ok, msg) = migrate(&rt, &src, "flood-dst", port);
    assert!(ok, "{msg}\n{}", src.logs());
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}

/// What a man in the middle of transfer connections saw: each connection's bytes from the
/// connecting side, in order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A man in the middle on the transfer path: passes every connection on to `to_port` both ways,
/// keeps what the connecting side sent, and (with `tamper`) flips one ciphertext byte of the
/// first data frame of the first connection.
fn man_in_the_middle(to_port: i32, tamper: bool) -> (u16, Seen) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let kept = seen.clone();
    std::thread::spawn(move || {
        for (n, from) in listener.incoming().enumerate() {
            let Ok(from) = from else { return };
            let to = connect(to_port);
            to.set_read_timeout(None).unwrap();
            let (mut a, mut b) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b, &mut a);
                let _ = a.shutdown(std::net::Shutdown::Both);
            });
            let kept = kept.clone();
            kept.lock().unwrap().push(Vec::new());
            std::thread::spawn(move || {
                let (mut from, mut to) = (from, to);
                // The handshake (version 2: hello 69, proof 32), then frames.
                let (mut frame_at, mut flip_at) = (69 + 32, None::<usize>);
                let mut chunk = vec![0u8; 64 << 10];
                loop {
                    let got = match from.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(g) => g,
                    };
                    let start = {
                        let mut k = kept.lock().unwrap();
                        let rec = &mut k[n];
                        let start = rec.len();
                        rec.extend_from_slice(&chunk[..got]);
                        while frame_at + 5 <= rec.len() {
                            let len =
                                u32::from_le_bytes(rec[frame_at..frame_at + 4].try_into().unwrap());
                            if rec[frame_at + 4] == 2 && flip_at.is_none() {
                                // The first byte after the data header: KV ciphertext.
                                flip_at = Some(frame_at + 5 + 16);
                            }
                            frame_at += 5 + len as usize;
                        }
                        start
                    };
                    if let Some(at) =
                        flip_at.filter(|at| tamper && n == 0 && (start..start + got).contains(at))
                    {
                        chunk[at - start] ^= 0x01;
                    }
                    if to.write_all(&chunk[..got]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, seen)
}

/// `LLUMLET_TRANSFER_ENCRYPT=1` on a `tcp` migration, through a man in the middle: it sees
/// neither the request's id nor its state in what the source sent; one KV byte it flips makes
/// the destination drop the migration (the request goes on at the source, its KV intact), where
/// an unencrypted connection would have taken the changed byte; and a llumlet that does not
/// encrypt is refused, and told why.
#[test]
fn an_encrypted_connection_hides_the_request_and_refuses_a_changed_byte() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let enc = [
        ("LLUMLET_TRANSFER_ENCRYPT", "1"),
        ("LLUMLET_TRANSPORT", "tcp"),
    ];
    let mut src = Instance::start(&redis, "enc-src", long_running(31), &enc);
    let mut dst = Instance::start(&redis, "enc-dst", SimOpts::new(32, 0), &enc[..1]);
    let mut plain = Instance::start(
        &redis,
        "plain-src",
        long_running(33),
        &[("LLUMLET_TRANSPORT", "tcp")],
    );
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "enc-dst");
    status(&redis, "enc-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });

    // Recorded on the way.
    let (mitm, seen) = man_in_the_middle(port, false);
    let (ok, msg) = migrate(&rt, &src, "enc-dst", i32::from(mitm));
    assert!(ok, "{msg}\n{}", src.logs());
    let moved = dst.events("migrated-in ");
    assert_eq!(moved.len(), 1, "{}", dst.logs());
    let sent = seen.lock().unwrap()[0].clone();
    assert!(sent.len() > 16 << 10, "{} bytes: KV crossed", sent.len());
    assert!(
        !sent
            .windows(moved[0].len())
            .any(|w| w == moved[0].as_bytes()),
        "the request id crossed in the clear"
    );
    assert!(
        src.logs().contains("encrypted"),
        "the llumlet says it encrypts\n{}",
        src.logs()
    );

    // Tampered with on the way: refused, the request stays at the source.
    let (mitm, _) = man_in_the_middle(port, true);
    let (ok, msg) = migrate(&rt, &src, "enc-dst", i32::from(mitm));
    assert!(!ok, "a migration with a changed KV byte succeeded: {msg}");
    until(
        Duration::from_secs(10),
        "the destination names the forged frame",
        || dst.logs().contains("failed its authentication"),
        || dst.logs(),
    );
    assert_eq!(dst.events("migrated-in ").len(), 1, "{}", dst.logs());
    assert!(
        dst.ids_in_state(RequestState::MigratingIn).is_empty(),
        "{}",
        dst.logs()
    );

    // A llumlet that does not encrypt.
    status(&redis, "plain-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 1
    });
    let (ok, msg) = migrate(&rt, &plain, "enc-dst", port);
    assert!(!ok);
    until(
        Duration::from_secs(10),
        "the plain source is told why",
        || {
            plain
                .logs()
                .contains("accepts only encrypted transfer connections")
        },
        || plain.logs(),
    );
    let _ = msg;
    check_exactly_once(
        &redis,
        &mut [&mut src, &mut dst, &mut plain],
        Duration::from_secs(60),
    );
}
