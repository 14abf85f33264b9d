//! `llumlet bench status`: what the status path costs.
//!
//! - The status ring, in this process: an engine publishing a full record (every numeric field
//!   of `cms.InstanceStatus`, 8 waiting request ids) into a real control segment,
//!   and a reader taking the newest record; baseline: a plain copy of one record. Timed in
//!   batches of 1000 operations; p50 and p99 are over the batches' per-operation means.
//! - The llumlet's CPU per status push: a simulated engine publishing through the ring and its
//!   llumlet writing the status to a Redis every `--interval` (a `redis-server` started here
//!   when one is on PATH, `--redis-url` to use another, else the embedded CMS). The llumlet's
//!   utime + stime (from /proc) over `--seconds`, divided by the pushes its metrics count.
//!   Baseline in the same run where `redis-benchmark` is on PATH: its CPU per `SET` of 200
//!   bytes, one client, one request at a time (the floor of one write over loopback).

use std::hint::black_box;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytemuck::Zeroable;
use llumlet_dataplane::endpoint::EngineEndpoint;
use llumlet_dataplane::segment::{Attach, ControlSegment};
use llumlet_dataplane::status_ring::{read_newest, StatusRecord};
use serde_json::json;

use super::{percentile, round, Progress};
use crate::demo::{parse_redis_url, Cms, EmbeddedCms, Instance};

/// `llumlet bench status` options.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// Seconds of status pushes to measure the llumlet's CPU over.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// LLUMNIX_STATUS_PUSH_INTERVAL while measuring (seconds).
    #[arg(long, default_value_t = 0.001)]
    pub interval: f64,
    /// The Redis to push to (`redis://[user:password@]host:port`).
    #[arg(long)]
    pub redis_url: Option<String>,
}

fn record() -> StatusRecord {
    let mut r = StatusRecord::zeroed();
    r.counters.num_running_requests = 64;
    r.counters.num_waiting_requests = 8;
    r.counters.num_total_gpu_tokens = 1 << 20;
    r.counters.num_used_gpu_tokens = 123_456;
    let ids: Vec<String> = (0..8).map(|i| format!("chatcmpl-{i:032}")).collect();
    let _ = r.set_waiting_ids(ids.iter().map(String::as_str));
    r
}

/// Per-operation nanoseconds of `f`, one figure per batch of 1000 calls.
fn batches(mut f: impl FnMut()) -> Vec<f64> {
    const N: u32 = 1000;
    for _ in 0..N {
        f(); // warm-up
    }
    (0..300)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..N {
                f();
            }
            t0.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .collect()
}

fn ring() -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("llumlet-bench-ring-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut engine = EngineEndpoint::create_at(&path).map_err(|e| e.to_string())?;
    let reader = match ControlSegment::attach(&path).map_err(|e| e.to_string())? {
        Attach::Ready(s) => s,
        _ => return Err("the control segment just created is not ready".into()),
    };
    let rec = record();
    let copy = batches(|| {
        black_box(*black_box(&rec));
    });
    let publish = batches(|| engine.publish(black_box(&rec)));
    let read = batches(|| {
        black_box(read_newest(reader.status()).ok());
    });
    let _ = std::fs::remove_file(&path);
    let base = percentile(&copy, 0.5);
    for (what, v) in [
        ("baseline: copy one record", &copy),
        ("engine publish", &publish),
        ("llumlet read newest", &read),
    ] {
        let p50 = percentile(v, 0.5);
        super::out(&json!({"bench": "status", "what": what, "record_bytes": std::mem::size_of::<StatusRecord>(),
                   "p50_ns": round(p50, 1), "p99_ns": round(percentile(v, 0.99), 1),
                   "ratio_to_copy": round(p50 / base.max(f64::MIN_POSITIVE), 2)}).to_string());
    }
    Ok(())
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("unexpected /proc/<pid>/stat")?;
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() != 2 {
        return Err("unexpected /proc/<pid>/stat".into());
    }
    Ok((f[0] + f[1]) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// user + system CPU of every waited-for child so far, in seconds.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN is a valid target and `ru` is a live, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// CPU microseconds per request of `redis-benchmark` doing `n` 200-byte SETs, one client, one
/// request at a time, against `host:port` (the floor of one write); `None` when it is not on
/// PATH or fails.
pub fn redis_benchmark_cpu_us(
    host: &str,
    port: u16,
    password: Option<&str>,
    n: u64,
) -> Option<f64> {
    let before = children_cpu_seconds();
    let ok = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string()])
        .args([
            "-c",
            "1",
            "-n",
            &n.to_string(),
            "-t",
            "set",
            "-d",
            "200",
            "-q",
        ])
        .args(password.iter().flat_map(|p| ["-a", *p]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| (children_cpu_seconds() - before) / n as f64 * 1e6)
}

/// A counter from the llumlet's /metrics.
pub fn metric(port: u16, name: &str) -> Result<f64, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    out.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| format!("{name} not in the llumlet's /metrics"))
}

/// The metrics port in the llumlet's `llumlet listening ... metrics=Some(addr:port)` line.
fn metrics_port(log: &str) -> Option<u16> {
    let l = log.lines().find(|l| l.contains("llumlet listening"))?;
    let addr = l.split("metrics=Some(").nth(1)?.split(')').next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// A `redis-server` on a free loopback port, killed when dropped.
struct RedisChild(Child, u16);

impl RedisChild {
    fn start() -> Option<RedisChild> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = RedisChild(child, port);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let mut b = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut b).is_ok() {
                    return Some(r);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn push_cpu(a: &StatusArgs) -> Result<(), String> {
    if !(a.seconds > 0.0 && a.interval > 0.0) {
        return Err("--seconds and --interval must be positive".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let mut _embedded = None;
    let mut _redis = None;
    let (cms, which) = match &a.redis_url {
        Some(u) => (parse_redis_url(u)?, "redis (--redis-url)"),
        None => match RedisChild::start() {
            Some(r) => {
                let c = Cms::local(r.1);
                _redis = Some(r);
                (c, "redis-server started here")
            }
            None => {
                let e = rt
                    .block_on(EmbeddedCms::start())
                    .map_err(|e| format!("cannot start the embedded CMS: {e}"))?;
                let c = Cms::local(e.addr().port());
                _embedded = Some(e);
                (c, "embedded CMS (no redis-server on PATH)")
            }
        },
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("llumlet-bench-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let engine = [
        ("--requests", "64".to_string()),
        ("--max-tokens", "100000".to_string()),
        ("--max-prompt", "64".to_string()),
        ("--num-blocks", "65536".to_string()),
        ("--step-ms", "10".to_string()),
    ];
    let env = [
        ("LLUMNIX_STATUS_PUSH_INTERVAL", a.interval.to_string()),
        // A free port, which the llumlet names in its start-up line (INFO; it logs nothing
        // per push at that level).
        ("LLUMLET_METRICS_PORT", "0".to_string()),
        ("LLUMNIX_LOGGING_LEVEL", "INFO".to_string()),
    ];
    let mut inst = Instance::spawn(&exe, &dir, &cms, "bench-status".into(), &engine, &env)
        .map_err(|e| format!("cannot start the llumlet: {e}"))?;
    let pid = inst.llumlet.pid();
    let progress = Progress::new();
    // Until its start-up line names the metrics port, its metrics answer, and it has pushed a
    // while.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut mport = None;
    while mport.is_none_or(|p| metric(p, llumlet::metrics::names::STATUS_PUSHES).is_err()) {
        mport = mport.or_else(|| metrics_port(&inst.llumlet.output()));
        if Instant::now() > deadline {
            return Err(format!(
                "the llumlet did not start:\n{}",
                inst.llumlet.output()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mport = mport.ok_or("no metrics port")?;
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, n0) = (
        cpu_seconds(pid)?,
        metric(mport, llumlet::metrics::names::STATUS_PUSHES)?,
    );
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < a.seconds {
        progress.tick(&format!(
            "status pushes: {:.0}/{} s",
            t0.elapsed().as_secs_f64(),
            a.seconds
        ));
        std::thread::sleep(Duration::from_millis(250));
    }
    let (cpu1, n1) = (
        cpu_seconds(pid)?,
        metric(mport, llumlet::metrics::names::STATUS_PUSHES)?,
    );
    progress.done();
    inst.llumlet.terminate(Duration::from_secs(5));
    inst.engine.terminate(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
    let pushes = n1 - n0;
    if pushes <= 0.0 {
        return Err("the llumlet pushed no status while measuring".into());
    }
    let ours = (cpu1 - cpu0) / pushes * 1e6;
    super::out(
        &json!({"bench": "status", "what": "llumlet CPU per status push", "cms": which,
               "interval_s": a.interval, "pushes": pushes, "cpu_s": round(cpu1 - cpu0, 3),
               "cpu_us_per_push": round(ours, 2)})
        .to_string(),
    );
    let n = (pushes as u64).max(1000);
    let floor = redis_benchmark_cpu_us(&cms.host, cms.port, cms.password.as_deref(), n);
    if let Some(per) = floor {
        let cpu = per * n as f64 / 1e6;
        super::out(&json!({"bench": "status", "what": "baseline: redis-benchmark SET, 1 client", "cms": which,
                   "requests": n, "cpu_s": round(cpu, 3), "cpu_us_per_request": round(per, 2),
                   "llumlet_ratio_to_baseline": round(ours / per.max(f64::MIN_POSITIVE), 2)}).to_string());
    } else {
        eprintln!("llumlet bench status: redis-benchmark is not on PATH (or failed): no baseline measured");
    }
    Ok(())
}

/// Runs both parts.
pub fn run(a: &StatusArgs) -> Result<(), String> {
    ring()?;
    push_cpu(a)
}
