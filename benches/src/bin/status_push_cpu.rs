//! CPU time the llumlet spends per status push to a local Redis, against the upstream-style
//! Python path measured in the same run.
//!
//! `cargo run --release -p llumlet-benches --bin status_push_cpu -- [SECONDS] [INTERVAL_S]`
//! (needs `cargo build --release --bins`, `redis-server`, and for the baseline `python3` with the
//! `protobuf`, `grpcio-tools` and `redis` packages). Prints one JSON object per measurement.

use std::process::Command;
use std::time::Duration;

use llumlet_proto::cms::InstanceStatus;
use llumlet_tests::{base_env, free_port, grpc_client, LlumletProcess, RedisServer};
use llumlet_tools::bench::status;

fn cpu_seconds(pid: u32) -> f64 {
    status::cpu_seconds(pid).expect("read /proc/<pid>/stat")
}

fn metric(port: u16, name: &str) -> f64 {
    status::metric(port, name).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let interval: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0.001);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let redis = RedisServer::start();
    let rpc = free_port();
    let mport = free_port();
    let mut env = base_env(&redis, "bench", rpc);
    env.insert("LLUMLET_METRICS_PORT".into(), mport.to_string());
    env.insert("LLUMNIX_STATUS_PUSH_INTERVAL".into(), interval.to_string());
    env.insert("LLUMNIX_ENGINE_GET_STATUS_TIMEOUT".into(), "3600".into());
    env.insert("LLUMNIX_LOGGING_LEVEL".into(), "WARNING".into());
    let p = LlumletProcess::spawn(&env);
    rt.block_on(async {
        let mut c = grpc_client(rpc, Duration::from_secs(10)).await;
        let status = InstanceStatus {
            update_id: 1,
            num_total_gpu_tokens: 1 << 20,
            num_used_gpu_tokens: 123_456,
            num_running_requests: 64,
            num_waiting_requests: 8,
            waiting_requests: (0..8).map(|i| format!("chatcmpl-{i:032}")).collect(),
            ..Default::default()
        };
        c.push_instance_status(status).await.unwrap();
    });
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, n0) = (
        cpu_seconds(p.pid()),
        metric(mport, "llumlet_status_pushes_total"),
    );
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (cpu1, n1) = (
        cpu_seconds(p.pid()),
        metric(mport, "llumlet_status_pushes_total"),
    );
    let pushes = n1 - n0;
    let rust_us = (cpu1 - cpu0) / pushes * 1e6;
    println!(
        "{{\"what\":\"llumlet-rs status push\",\"interval_s\":{interval},\"pushes\":{pushes},\"cpu_s\":{:.3},\"cpu_us_per_push\":{rust_us:.2}}}",
        cpu1 - cpu0
    );
    drop(p);

    // Floor: redis-benchmark, one client, one SET at a time (CPU of the client process).
    let n = (pushes as u64).max(1000);
    match status::redis_benchmark_cpu_us("127.0.0.1", redis.port, None, n) {
        Some(per) => println!(
            "{{\"what\":\"redis-benchmark SET, 1 client (floor)\",\"requests\":{n},\"cpu_us_per_request\":{per:.2}}}"
        ),
        None => eprintln!("redis-benchmark not available; no floor measured"),
    }

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/upstream_status_push.py"
    );
    let out = Command::new("python3")
        .args([
            script,
            &redis.port.to_string(),
            &seconds.to_string(),
            &interval.to_string(),
        ])
        .output()
        .expect("python3");
    if !out.status.success() {
        eprintln!(
            "python baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::process::exit(1);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    print!("{line}");
    let py_us: f64 = line
        .split("\"cpu_us_per_push\":")
        .nth(1)
        .and_then(|s| s.trim_end_matches(['}', '\n']).parse().ok())
        .unwrap_or(f64::NAN);
    println!(
        "{{\"what\":\"ratio python/rust cpu per push\",\"ratio\":{:.1}}}",
        py_us / rust_us
    );
}
