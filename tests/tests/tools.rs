//! The newcomer's and the engineer's commands as a user runs them: `llumlet demo` (a local
//! cluster, skewed load, live migrations, a summary, a plot) and `llumlet bench` (transfer by
//! transport with its baseline, migration downtime by length, status path costs), each as a
//! child process.

use std::process::{Command, Output, Stdio};

use llumlet_tests::*;

fn llumlet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(llumlet_bin());
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run llumlet")
}

/// `llumlet` with GPU work: under the test double, unless LLUMLET_TEST_CUDA=real.
fn llumlet_gpu(args: &[&str]) -> Output {
    let env = llumlet_tests::cuda_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    llumlet(args, &env)
}

/// Without a driver (CI), `args` exit 2 naming why; with one (a GPU machine), nothing to check.
fn refused_without_a_driver(args: &[&str], why: &str) {
    if llumlet_dataplane::cuda::probe().is_ok() {
        return;
    }
    let o = llumlet(args, &[]);
    assert_eq!(o.status.code(), Some(2), "{args:?}");
    let err = text(&o.stderr);
    assert!(err.contains(why), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// stdout as JSON objects, one per line (every line must be one).
fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    let err = text(&o.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// The summary row `name`'s value.
fn row<'a>(summary: &'a str, name: &str) -> &'a str {
    summary
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name:?} row in:\n{summary}"))
        .trim()
}

#[test]
fn the_demo_rebalances_a_skewed_cluster_with_verified_migrations_and_plots_it() {
    let dir = TempDir::new("demo");
    let plot = dir.0.join("load.svg");
    let logs = dir.0.join("logs");
    let o = llumlet(
        &[
            "demo",
            "--duration",
            "10",
            "--plot",
            plot.to_str().unwrap(),
            "--logs",
            logs.to_str().unwrap(),
        ],
        &[],
    );
    assert_ok(&o);
    let out = text(&o.stdout);
    assert!(row(&out, "verification").starts_with("ok"), "{out}");
    let moved: u32 = row(&out, "requests migrated")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(moved >= 1, "{out}");
    assert!(row(&out, "transports").contains("shm"), "{out}");
    assert!(row(&out, "downtime p50").ends_with("ms"), "{out}");
    // What the summary counts is what the sources logged.
    let logged: usize = (0..4)
        .map(|i| {
            std::fs::read_to_string(logs.join(format!("demo-{i}-llumlet.log")))
                .unwrap()
                .lines()
                .filter(|l| l.contains("migration out finished") && l.contains("outcome=Migrated"))
                .count()
        })
        .sum();
    assert_eq!(logged, moved as usize);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
    assert_eq!(
        svg.matches("<polyline").count(),
        4,
        "one load line per instance"
    );
    for i in 0..4 {
        assert!(svg.contains(&format!("demo-{i}")), "legend names demo-{i}");
    }
}

/// With the engines' KV caches on the GPU (under the test double unless
/// LLUMLET_TEST_CUDA=real): the moves go over cuda and arrive verified.
#[test]
fn the_demo_with_kv_on_the_gpu_migrates_over_cuda() {
    let dir = TempDir::new("demo-gpu");
    let plot = dir.0.join("load.svg");
    let args = [
        "demo",
        "--instances",
        "2",
        "--duration",
        "6",
        "--kv",
        "gpu",
        "--plot",
        plot.to_str().unwrap(),
    ];
    let o = llumlet_gpu(&args);
    assert_ok(&o);
    let out = text(&o.stdout);
    assert!(row(&out, "verification").starts_with("ok"), "{out}");
    let used = row(&out, "transports");
    assert!(
        used.starts_with("cuda ") && !used.contains(','),
        "only cuda: {out}"
    );
    refused_without_a_driver(&args, "--kv gpu: CUDA unavailable");
}

#[test]
fn the_demo_runs_against_a_real_redis_when_given_one() {
    let redis = RedisServer::start();
    let dir = TempDir::new("demo-redis");
    let plot = dir.0.join("load.svg");
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let o = llumlet(
        &[
            "demo",
            "--instances",
            "3",
            "--duration",
            "8",
            "--redis-url",
            &url,
            "--plot",
            plot.to_str().unwrap(),
        ],
        &[],
    );
    assert_ok(&o);
    assert!(text(&o.stderr).contains(&format!("redis at 127.0.0.1:{}", redis.port)));
    assert!(row(&text(&o.stdout), "verification").starts_with("ok"));
    let bad = llumlet(&["demo", "--redis-url", "http://nope"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("redis://"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn the_demo_with_vllm_engines_says_how_to_install_vllm_when_it_is_missing() {
    // (The demo with vLLM engines runs in tests/vllm, where vLLM is installed.)
    let o = llumlet(
        &["demo", "--engine", "vllm", "--duration", "1"],
        &[("LLUMLET_VLLM_PYTHON", "/nonexistent/python")],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("no vLLM with the llumlet-rs adapter at /nonexistent/python")
            && err.contains("scripts/vllm-env.sh"),
        "{err}"
    );
}

fn transfer(transport: &str, env: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let o = llumlet(
        &[
            "bench",
            "transfer",
            "--transport",
            transport,
            "--size",
            "1M,4M",
            "--iters",
            "3",
            "--with-baseline",
        ],
        env,
    );
    assert_ok(&o);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (l, bytes) in lines.iter().zip([1u64 << 20, 4 << 20]) {
        assert_eq!(l["transport"], transport, "{l}");
        assert_eq!(l["bytes"], bytes, "{l}");
        assert_eq!(l["iters"], 3, "{l}");
        assert_eq!(l["verified"], true, "{l}");
        assert!(l["gb_per_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["seconds"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["baseline_gb_per_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["ratio"].as_f64().unwrap() > 0.0, "{l}");
    }
    lines
}

#[test]
fn bench_transfer_moves_verified_kv_blocks_over_shm_tcp_and_ucx() {
    transfer("shm", &[]);
    transfer("tcp", &[]);
    // UCX prints its log lines on stdout, set up before `main`: with them on (debug), stdout
    // still carries only the JSON (each line must parse).
    transfer("ucx", &[("UCX_TLS", "tcp"), ("UCX_LOG_LEVEL", "debug")]);
}

/// Over cuda: a GPU source process exports its cache, the receiver exports its own, this
/// process copies device to device between them, and the receiver's digest of its GPU bytes
/// matches (under the test double of the driver unless LLUMLET_TEST_CUDA=real).
#[test]
fn bench_transfer_moves_verified_kv_blocks_over_cuda() {
    let env = llumlet_tests::cuda_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let lines = transfer("cuda", &env);
    for l in lines {
        assert_eq!(l["baseline"], "cuMemcpyDtoD", "{l}");
        let gpu = l["gpu"].as_str().unwrap();
        assert_eq!(
            gpu.contains("test double"),
            llumlet_tests::fake_cuda(),
            "{l}"
        );
    }
    refused_without_a_driver(
        &["bench", "transfer", "--transport", "cuda", "--size", "1M"],
        "--transport cuda: CUDA unavailable",
    );
}

#[test]
fn bench_transfer_reaches_a_receiver_started_by_hand_and_refuses_bad_input() {
    let mut rx = Command::new(llumlet_bin())
        .args(["bench", "receive", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(rx.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let peer = format!("127.0.0.1:{}", port.trim());
    for t in ["tcp", "shm"] {
        let o = llumlet(
            &[
                "bench",
                "transfer",
                "--transport",
                t,
                "--size",
                "2M",
                "--iters",
                "2",
                "--peer",
                &peer,
            ],
            &[],
        );
        assert_ok(&o);
        assert_eq!(json_lines(&o)[0]["verified"], true);
    }
    let _ = rx.kill();
    let _ = rx.wait();
    for (args, why) in [
        (
            vec!["--transport", "pigeon", "--size", "1M"],
            "expected shm, tcp, ucx or cuda",
        ),
        (vec!["--transport", "shm", "--size", "1000"], "--layers"),
        (vec!["--transport", "tcp", "--size", "12Q"], "unknown unit"),
    ] {
        let mut a = vec!["bench", "transfer"];
        a.extend(args);
        let o = llumlet(&a, &[]);
        assert_eq!(o.status.code(), Some(2), "{a:?}");
        let err = text(&o.stderr);
        assert!(err.contains(why), "{a:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn bench_baseline_measures_memcpy_and_loopback_tcp() {
    let o = llumlet(
        &["bench", "baseline", "--size", "1M,2M", "--iters", "3"],
        &[],
    );
    assert_ok(&o);
    let kinds: Vec<(String, u64)> = json_lines(&o)
        .iter()
        .map(|l| {
            assert!(l["gb_per_s"].as_f64().unwrap() > 0.0, "{l}");
            (
                l["transport"].as_str().unwrap().to_string(),
                l["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("memcpy".to_string(), 1 << 20),
            ("tcp-loopback".to_string(), 1 << 20),
            ("memcpy".to_string(), 2 << 20),
            ("tcp-loopback".to_string(), 2 << 20),
        ]
    );
}

#[test]
fn bench_migration_reports_downtime_by_sequence_length_for_verified_moves() {
    let o = llumlet(
        &[
            "bench",
            "migration",
            "--tokens",
            "256,2048",
            "--repeat",
            "2",
        ],
        &[],
    );
    assert_ok(&o);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (l, tokens) in lines.iter().zip([256, 2048]) {
        assert_eq!(l["tokens"], tokens, "{l}");
        assert_eq!(l["migrations"], 2, "{l}");
        assert_eq!(l["verified"], true, "{l}");
        let d = l["downtime_p50_us"].as_f64().unwrap();
        let total = l["total_p50_ms"].as_f64().unwrap() * 1e3;
        assert!(
            d > 0.0 && d < total,
            "downtime is part of the migration: {l}"
        );
        // A longer request carries more KV.
        assert!(
            l["kv_bytes_mean"].as_f64().unwrap() >= f64::from(tokens) * 8192.0,
            "{l}"
        );
    }
    assert!(lines[2]["downtime_ratio_to_first"].as_f64().unwrap() > 0.0);
}

/// With the engines' KV caches on the GPU: every move goes over cuda and arrives verified (the
/// engines read the KV back from the GPU). Under the test double unless LLUMLET_TEST_CUDA=real.
#[test]
fn bench_migration_with_kv_on_the_gpu_moves_over_cuda() {
    let args = [
        "bench",
        "migration",
        "--kv",
        "gpu",
        "--tokens",
        "512",
        "--repeat",
        "2",
    ];
    let o = llumlet_gpu(&args);
    assert_ok(&o);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(
        (l["kv"].as_str(), l["transport"].as_str()),
        (Some("gpu"), Some("cuda")),
        "{l}"
    );
    assert_eq!(
        (l["migrations"].as_u64(), l["verified"].as_bool()),
        (Some(2), Some(true)),
        "{l}"
    );
    assert!(
        l["kv_bytes_mean"].as_f64().unwrap() >= 512.0 * 8192.0,
        "{l}"
    );
    assert_eq!(
        l["gpu"].as_str().unwrap().contains("test double"),
        llumlet_tests::fake_cuda(),
        "{l}"
    );
    refused_without_a_driver(&args, "--kv gpu: CUDA unavailable");
}

#[test]
fn bench_status_reports_ring_costs_and_cpu_per_push_against_redis_benchmark() {
    let o = llumlet(&["bench", "status", "--seconds", "1"], &[]);
    assert_ok(&o);
    let lines = json_lines(&o);
    let what: Vec<&str> = lines.iter().map(|l| l["what"].as_str().unwrap()).collect();
    assert_eq!(
        what,
        [
            "baseline: copy one record",
            "engine publish",
            "llumlet read newest",
            "llumlet CPU per status push",
            "baseline: redis-benchmark SET, 1 client"
        ]
    );
    assert!(lines[1]["p50_ns"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[3]["cms"], "redis-server started here");
    assert!(lines[3]["pushes"].as_f64().unwrap() > 100.0, "{}", lines[3]);
    assert!(lines[3]["cpu_us_per_push"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_fleet_reads_many_llumlets_as_the_scheduler_does_and_survives_a_redis_restart() {
    let o = llumlet(
        &[
            "bench",
            "fleet",
            "--instances",
            "4",
            "--seconds",
            "4",
            "--restart-redis-at",
            "1",
        ],
        &[],
    );
    assert_ok(&o);
    let l = &json_lines(&o)[0];
    assert_eq!(l["bench"], "fleet", "{l}");
    assert_eq!(l["llumlets_alive_at_end"], 4, "{l}");
    // The reader took statuses (how fresh they were is a figure, docs/BENCHMARKS.md).
    assert!(l["statuses_taken"].as_u64().unwrap() > 4, "{l}");
    assert!(l["staleness_ms_p99"].as_f64().is_some(), "{l}");
    assert!(l["llumlet_rss_mib_mean"].as_f64().unwrap() > 1.0, "{l}");
    assert!(
        l["baseline_redis_benchmark_us_per_set"].as_f64().unwrap() > 0.0,
        "{l}"
    );
    // Redis came back empty, and every instance's metadata and status came back (a fast
    // re-registration is tested in process.rs).
    assert!(l["redis_restart"]["all_back_s"].as_f64().is_some(), "{l}");
}

#[test]
fn bench_migration_measures_concurrent_migrations_and_a_drain_with_every_arrival_verified() {
    let o = llumlet(
        &[
            "bench",
            "migration",
            "--tokens",
            "128",
            "--concurrency",
            "1,2",
            "--requests",
            "4",
            "--drain",
        ],
        &[],
    );
    assert_ok(&o);
    let lines = json_lines(&o);
    let what: Vec<&str> = lines.iter().map(|l| l["what"].as_str().unwrap()).collect();
    assert_eq!(
        what,
        [
            "concurrent",
            "concurrent",
            "drain",
            "drain",
            "baseline: the transport's own copy of one migration's bytes"
        ],
        "{lines:?}"
    );
    for l in &lines[..4] {
        assert_eq!(l["verified"], true, "{l}");
        assert!(l["aggregate_gb_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert_eq!(lines[0]["migrations"], 4, "{}", lines[0]);
    // The drain moved all four, first one at a time, then with eight out-slots.
    assert_eq!(
        (
            lines[2]["out_slots"].as_u64(),
            lines[3]["out_slots"].as_u64()
        ),
        (Some(1), Some(8))
    );
    assert!(lines[4]["gb_per_s"].as_f64().unwrap() > 0.0);
}
