//! Throughput of the llumlet's UCX transport (registered KV regions, one `ucp_put_nbx` per
//! coalesced run, a flush per copy, exactly as a migration stage) against `ucx_perftest
//! -t ucp_put_bw` on the same UCX transports, by transfer size, in the same run.
//!
//! `cargo run --release -p llumlet-benches --bin ucx_perf -- [UCX_TLS] [SIZES_MIB...]`
//! (default `tcp` and 1 4 16 64; needs `ucx_perftest` from Debian's `ucx-utils`). Both sides run
//! on this host: the llumlet's as two UCX contexts and workers in one process, ucx_perftest as
//! a server and a client process. Prints one JSON object per measurement.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llumlet_dataplane::kv::{HostKvCache, MappedRegion};
use llumlet_dataplane::runs::BlockRun;
use llumlet_dataplane::transport::{ReservedBlocks, Transport};
use llumlet_dataplane::ucx::{Context, Node, Registry, RemoteRegion, UcxTransport};

const BLOCK: u64 = 256 << 10;

fn ours(tls: &str, bytes: u64, iters: u32) -> f64 {
    let blocks = bytes / BLOCK;
    let dir = |t: &str| {
        std::path::PathBuf::from(format!(
            "/dev/shm/llumlet-ucxperf-{t}-{}",
            std::process::id()
        ))
    };
    let src = HostKvCache::create(&dir("src"), 1, blocks, BLOCK, BLOCK).unwrap();
    let dst = HostKvCache::create(&dir("dst"), 1, blocks, BLOCK, BLOCK).unwrap();
    let side = || {
        let ctx = Context::with(&[("TLS", tls)]).unwrap();
        (Node::start(&ctx).unwrap(), Registry::new(ctx))
    };
    let (dnode, dreg) = side();
    let (snode, sreg) = side();
    let dr = &dst.regions().unwrap()[0];
    let g = dreg.get(dr).unwrap();
    let remote = [RemoteRegion {
        address: g.address(),
        num_blocks: blocks,
        block_size_bytes: BLOCK,
        rkey: g.rkey().to_vec(),
    }];
    let sr = &src.regions().unwrap()[0];
    let conn = snode.connect(dnode.address(), &remote).unwrap();
    let all: Vec<u32> = (0..blocks as u32).collect();
    let mut t = UcxTransport::new(
        conn,
        vec![sreg.get(sr).unwrap()],
        ReservedBlocks::new(&all),
        Duration::from_secs(60),
    );
    let maps = [MappedRegion::map(sr).unwrap()];
    let runs = [BlockRun {
        src: 0,
        dst: 0,
        len: blocks as u32,
    }];
    t.copy(&maps, &runs).unwrap(); // warm-up (wire-up, first touch)
    let start = Instant::now();
    for _ in 0..iters {
        t.copy(&maps, &runs).unwrap();
    }
    let s = start.elapsed().as_secs_f64();
    bytes as f64 * f64::from(iters) / s / 1e9
}

/// ucx_perftest's overall put bandwidth (it prints MB/s of 2^20 bytes), in GB/s.
fn perftest(tls: &str, bytes: u64, iters: u32) -> Option<f64> {
    let port = llumlet_tests::free_port().to_string();
    let mut server = Command::new("ucx_perftest")
        .args(["-p", &port])
        .env("UCX_TLS", tls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ucx_perftest")
        .args([
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "ucp_put_bw",
            "-s",
            &bytes.to_string(),
            "-n",
            &iters.to_string(),
        ])
        .env("UCX_TLS", tls)
        .stderr(Stdio::null())
        .output()
        .ok();
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let line = BufReader::new(&out.stdout[..])
        .lines()
        .map_while(Result::ok)
        .find(|l| l.trim_start().starts_with("Final:"))?;
    // Final: iters, 50%ile, avg, overall overhead, avg bw, overall bw, avg rate, overall rate
    let f: Vec<&str> = line.split_whitespace().collect();
    let mb: f64 = f.get(6)?.parse().ok()?;
    Some(mb * 1_048_576.0 / 1e9)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tls = args.first().cloned().unwrap_or_else(|| "tcp".into());
    let sizes: Vec<u64> = if args.len() > 1 {
        args[1..].iter().map(|s| s.parse().unwrap()).collect()
    } else {
        vec![1, 4, 16, 64]
    };
    for mib in sizes {
        let bytes = mib << 20;
        let iters = (2048 / mib).clamp(8, 200) as u32;
        let o = ours(&tls, bytes, iters);
        let p = perftest(&tls, bytes, iters);
        let ratio = p.map_or("null".to_string(), |p| format!("{:.2}", o / p));
        let p = p.map_or("null".to_string(), |p| format!("{p:.3}"));
        println!(
            "{{\"transport\":\"ucx\",\"ucx_tls\":\"{tls}\",\"bytes\":{bytes},\"iters\":{iters},\"llumlet_gb_per_s\":{o:.3},\"ucx_perftest_gb_per_s\":{p},\"ratio\":{ratio}}}"
        );
    }
}
