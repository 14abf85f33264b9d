//! Command queues: an empty poll, and a round trip between two processes (this benchmark
//! re-executes itself as the echoing engine). Baseline in the same run: a round trip over a
//! loopback TCP socket pair between the same two processes.

use std::hint::black_box;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::Criterion;
use llumlet_dataplane::command::{pop, push, Command};
use llumlet_dataplane::endpoint::EngineEndpoint;
use llumlet_dataplane::segment::{Attach, ControlSegment};

const ECHO_ENV: &str = "LLUMLET_BENCH_ECHO_SEGMENT";

/// The engine side: answer every status request at once, busy-polling; echo TCP bytes.
fn echo(path: PathBuf, tcp_port: u16) {
    let engine = EngineEndpoint::create_at(&path).expect("create segment");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", tcp_port)).expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 8];
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match engine.poll_command() {
            Ok(Some(Command::StatusRequest { seq })) => {
                while engine
                    .send(&Command::StatusPublished {
                        seq,
                        publish_seq: 0,
                    })
                    .is_err()
                {}
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(_) => return,
        }
        match tcp.read(&mut byte) {
            Ok(0) => return,
            Ok(n) => tcp.write_all(&byte[..n]).unwrap(),
            Err(_) => {}
        }
    }
}

fn main() {
    if let Ok(p) = std::env::var(ECHO_ENV) {
        let port: u16 = std::env::var("LLUMLET_BENCH_ECHO_TCP")
            .unwrap()
            .parse()
            .unwrap();
        echo(PathBuf::from(p), port);
        return;
    }
    let path = std::env::temp_dir().join(format!("llumlet-bench-rtt-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(ECHO_ENV, &path)
        .env("LLUMLET_BENCH_ECHO_TCP", port.to_string())
        .spawn()
        .unwrap();
    let (mut tcp, _) = listener.accept().unwrap();
    tcp.set_nodelay(true).unwrap();
    let seg = loop {
        if let Ok(Attach::Ready(s)) = ControlSegment::attach(&path) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("command_queue");
    let empty = llumlet_dataplane::command::QueueMem::new_boxed();
    g.bench_function("empty_poll", |b| {
        b.iter(|| black_box(pop(black_box(&empty)).unwrap()))
    });
    let mut seq = 0u64;
    g.bench_function("round_trip_two_processes", |b| {
        b.iter(|| {
            seq += 1;
            push(seg.to_engine(), &Command::StatusRequest { seq }.encode()).unwrap();
            loop {
                if let Some(w) = pop(seg.to_llumlet()).unwrap() {
                    break black_box(w);
                }
                std::hint::spin_loop();
            }
        })
    });
    g.bench_function("baseline_loopback_tcp_round_trip", |b| {
        let mut buf = [0u8; 8];
        b.iter(|| {
            tcp.write_all(&[1u8; 8]).unwrap();
            tcp.read_exact(&mut buf).unwrap();
        })
    });
    g.finish();
    drop(tcp);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    c.final_summary();
}
