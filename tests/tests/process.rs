//! The `llumlet` binary as a separate process against a real `redis-server`: registration,
//! status, heartbeat and TTL, Redis outages, ACL, signals, parent death, invalid configuration.

use std::time::{Duration, Instant};

use llumlet_proto::cms::{InstanceMetadata, InstanceStatus};
use llumlet_tests::*;
use prost::Message;

const META: &str = "llumnix:instance_metadata:";
const STATUS: &str = "llumnix:instance_status:";

fn decode_status(b: Option<&[u8]>) -> Option<InstanceStatus> {
    b.map(|b| InstanceStatus::decode(b).expect("status bytes must be valid protobuf"))
}

fn engine_status(update_id: i32) -> InstanceStatus {
    InstanceStatus {
        instance_id: "engine-side-id".into(),
        schedulable: true,
        update_id,
        step_id: update_id,
        num_total_gpu_tokens: 8192,
        num_used_gpu_tokens: 1024,
        num_running_requests: 4,
        num_waiting_requests: 1,
        scheduler_running_to_decode_tokens_num: 900,
        profiling_id: -1,
        ..Default::default()
    }
}

fn assert_clean_log(log: &str) {
    assert!(!log.contains("Traceback"), "log contains Traceback:\n{log}");
    assert!(!log.contains("panicked"), "log contains a panic:\n{log}");
    assert!(
        !log.contains("stack backtrace"),
        "log contains a backtrace:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_reports_status_and_deregisters_on_sigterm() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut env = base_env(&redis, "inst-a", port);
    env.insert("LLUMNIX_USED_METRICS".into(), "num_requests".into());
    env.insert("LLUMNIX_MAX_REQ_MIG_OUT".into(), "3".into());
    let mut p = LlumletProcess::spawn(&env);

    // Registration: metadata first, status only after the engine's first status.
    let meta = redis.wait_for(&format!("{META}inst-a"), Duration::from_secs(10), |b| {
        b.map(|b| InstanceMetadata::decode(b).unwrap())
    });
    assert_eq!(meta.instance_id, "inst-a");
    assert_eq!(meta.instance_type, "neutral");
    assert_eq!(meta.ip, "127.0.0.1");
    assert_eq!(meta.ip_kvs, "127.0.0.1");
    assert_eq!(meta.api_server_port, 8000);
    assert_eq!(meta.llumlet_port, i32::from(port));
    assert_eq!(meta.backend_type, "BackendType.VLLM_V1");
    assert!(meta.utc_create > 0.0);
    assert_eq!(redis.get(&format!("{STATUS}inst-a")), None);
    let ttl = redis.ttl(&format!("{META}inst-a"));
    assert!((1..=3).contains(&ttl), "metadata TTL {ttl}");

    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    let resp = client
        .push_instance_status(engine_status(1))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.success);
    assert_eq!(resp.message, "Push instance status successfully.");

    let st = redis.wait_for(
        &format!("{STATUS}inst-a"),
        Duration::from_secs(5),
        decode_status,
    );
    assert_eq!(
        st.instance_id, "inst-a",
        "the llumlet sets its own instance id"
    );
    assert!(st.schedulable);
    assert_eq!(st.update_id, 1);
    assert_eq!(st.num_total_gpu_tokens, 8192);
    assert_eq!(st.num_running_requests, 4);
    assert_eq!(
        st.scheduler_running_to_decode_tokens_num, 0,
        "masked out by LLUMNIX_USED_METRICS"
    );
    assert_eq!(st.num_available_migrate_out_slots, 3);
    assert_eq!(st.num_available_migrate_in_slots, 1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (now_ms - st.timestamp_ms).abs() < 10_000,
        "wall-clock ms timestamp"
    );

    // Timestamps strictly increase across writes.
    let mut last = st.timestamp_ms;
    for _ in 0..5 {
        last = redis.wait_for(&format!("{STATUS}inst-a"), Duration::from_secs(5), |b| {
            decode_status(b)
                .map(|s| s.timestamp_ms)
                .filter(|t| *t > last)
        });
    }

    // Heartbeat: the keys outlive their 3 s TTL because every write refreshes it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(redis.get(&format!("{META}inst-a")).is_some());
    assert!(redis.get(&format!("{STATUS}inst-a")).is_some());
    assert!(
        redis.ttl(&format!("{STATUS}inst-a")) >= 2,
        "status TTL refreshed on every write"
    );

    p.signal(libc::SIGTERM);
    let status = p.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", p.stderr());
    assert_eq!(redis.get(&format!("{META}inst-a")), None);
    assert_eq!(redis.get(&format!("{STATUS}inst-a")), None);
    assert_clean_log(&p.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_engine_is_reported_unschedulable_then_recovers() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut env = base_env(&redis, "inst-silent", port);
    env.insert("LLUMNIX_ENGINE_GET_STATUS_TIMEOUT".into(), "0.5".into());
    let _p = LlumletProcess::spawn(&env);
    let key = format!("{STATUS}inst-silent");
    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    client.push_instance_status(engine_status(5)).await.unwrap();
    let first = redis.wait_for(&key, Duration::from_secs(5), |b| {
        decode_status(b).filter(|s| s.schedulable)
    });
    let silent = redis.wait_for(&key, Duration::from_secs(5), |b| {
        decode_status(b).filter(|s| !s.schedulable)
    });
    assert_eq!(
        silent.update_id, 5,
        "the unschedulable report keeps update_id"
    );
    assert!(silent.timestamp_ms > first.timestamp_ms);
    // It keeps being written with fresh timestamps while silent.
    let later = redis.wait_for(&key, Duration::from_secs(5), |b| {
        decode_status(b).filter(|s| s.timestamp_ms > silent.timestamp_ms && !s.schedulable)
    });
    assert_eq!(later.update_id, 5);
    // The first new status flips it back.
    client.push_instance_status(engine_status(6)).await.unwrap();
    let back = redis.wait_for(&key, Duration::from_secs(5), |b| {
        decode_status(b).filter(|s| s.schedulable)
    });
    assert_eq!(back.update_id, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_redis_restart_and_re_registers() {
    let mut redis = RedisServer::start();
    let port = free_port();
    let mut p = LlumletProcess::spawn(&base_env(&redis, "inst-r", port));
    let meta_key = format!("{META}inst-r");
    let status_key = format!("{STATUS}inst-r");
    redis.wait_for(&meta_key, Duration::from_secs(10), |b| b.map(|_| ()));
    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    client.push_instance_status(engine_status(1)).await.unwrap();
    redis.wait_for(&status_key, Duration::from_secs(5), |b| b.map(|_| ()));

    redis.kill();
    // Several status ticks and a metadata tick fail meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(p.running(), "the llumlet keeps running while Redis is down");
    redis.restart();
    assert_eq!(redis.dbsize(), 0, "the new Redis starts empty");
    let back = Instant::now();
    // Within one metadata interval (1 s) plus the reconnection backoff (≤ 0.5 s) plus slack.
    redis.wait_for(&meta_key, Duration::from_secs(3), |b| b.map(|_| ()));
    redis.wait_for(&status_key, Duration::from_secs(3), |b| b.map(|_| ()));
    eprintln!("keys back {:?} after Redis restarted", back.elapsed());
    assert!(p.running());

    let log = p.stderr();
    let warnings = log
        .matches("CMS write failed; retrying with backoff")
        .count();
    assert_eq!(
        warnings, 1,
        "one warning per outage, not one per tick:\n{log}"
    );
    assert!(log.contains("CMS reachable again"), "{log}");
    assert_clean_log(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_at_once_gets_the_instance_registered_at_once() {
    // Redis restarts empty before any write fails for long (a retry inside one write makes the
    // new connection): the llumlet registers again at once, not at its next heartbeat (60 s
    // here; the Llumnix scheduler sees no instance without its metadata).
    let mut redis = RedisServer::start();
    let port = free_port();
    let mut env = base_env(&redis, "inst-q", port);
    env.insert("LLUMNIX_METADATA_PUSH_INTERVAL".into(), "60".into());
    env.insert("LLUMNIX_CMS_EXPIRED_TIME".into(), "120".into());
    let mut p = LlumletProcess::spawn(&env);
    let meta_key = format!("{META}inst-q");
    let status_key = format!("{STATUS}inst-q");
    redis.wait_for(&meta_key, Duration::from_secs(10), |b| b.map(|_| ()));
    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    client.push_instance_status(engine_status(1)).await.unwrap();
    redis.wait_for(&status_key, Duration::from_secs(5), |b| b.map(|_| ()));
    redis.restart();
    let back = Instant::now();
    redis.wait_for(&status_key, Duration::from_secs(3), |b| b.map(|_| ()));
    redis.wait_for(&meta_key, Duration::from_secs(3), |b| b.map(|_| ()));
    eprintln!("metadata back {:?} after Redis restarted", back.elapsed());
    assert!(p.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_an_acl_user() {
    let redis = RedisServer::start_with(
        [
            "--user", "default", "off", "--user", "llumnix", "on", ">s3cret", "~*", "+@all",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        Some(("llumnix".into(), "s3cret".into())),
    );
    // Without credentials Redis refuses.
    let anon = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port)).unwrap();
    assert!(anon
        .get_connection()
        .and_then(|mut c| redis::cmd("GET").arg("x").query::<Option<String>>(&mut c))
        .is_err());

    let port = free_port();
    let mut p = LlumletProcess::spawn(&base_env(&redis, "inst-acl", port));
    redis.wait_for(&format!("{META}inst-acl"), Duration::from_secs(10), |b| {
        b.map(|_| ())
    });
    p.signal(libc::SIGINT);
    assert_eq!(p.wait(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(redis.get(&format!("{META}inst-acl")), None);

    // A wrong password: the llumlet gives up registering and says Redis refused the password,
    // not merely that Redis is unreachable.
    let mut env = base_env(&redis, "inst-acl-bad", free_port());
    env.insert("LLUMNIX_CMS_REDIS_PASSWORD".into(), "wrong".into());
    let mut p = LlumletProcess::spawn(&env);
    assert_eq!(p.wait(Duration::from_secs(30)).code(), Some(1));
    let err = p.stderr();
    assert!(err.contains("WRONGPASS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_death_deregisters_and_exits() {
    let redis = RedisServer::start();
    let mut parent = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let mut env = base_env(&redis, "inst-p", free_port());
    env.insert("LLUMLET_PARENT_PID".into(), parent.id().to_string());
    let mut p = LlumletProcess::spawn(&env);
    redis.wait_for(&format!("{META}inst-p"), Duration::from_secs(10), |b| {
        b.map(|_| ())
    });
    parent.kill().unwrap();
    parent.wait().unwrap();
    assert_eq!(
        p.wait(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        p.stderr()
    );
    assert_eq!(redis.get(&format!("{META}inst-p")), None);
    assert!(p.stderr().contains("parent process is gone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leaves_keys_to_expire_with_their_ttl() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut p = LlumletProcess::spawn(&base_env(&redis, "inst-k", port));
    let key = format!("{META}inst-k");
    redis.wait_for(&key, Duration::from_secs(10), |b| b.map(|_| ()));
    p.signal(libc::SIGKILL);
    p.wait(Duration::from_secs(5));
    assert!(redis.get(&key).is_some(), "a crash cannot delete the keys");
    redis.wait_for(&key, Duration::from_secs(6), |b| {
        if b.is_none() {
            Some(())
        } else {
            None
        }
    });
}

/// `LLUMLET_RPC_BIND_ADDRESS` binds the gRPC service to that address only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_service_listens_only_where_it_is_told() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut env = base_env(&redis, "inst-bind", port);
    env.insert("LLUMLET_RPC_BIND_ADDRESS".into(), "127.0.0.1".into());
    let _p = LlumletProcess::spawn(&env);
    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    client.push_instance_status(engine_status(1)).await.unwrap();
    let listening: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "0A" && f[1].ends_with(&format!(":{port:04X}"))
        })
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    assert_eq!(listening, vec![format!("0100007F:{port:04X}")]);
}

/// `LLUMLET_RPC_MAX_CONNECTIONS`: with its connections held open by a peer that says nothing,
/// one more is closed at once; the silent ones are closed after their first 5 s, and the service
/// then answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_grpc_connections_cannot_hold_the_service() {
    use std::io::Read;
    let redis = RedisServer::start();
    let port = free_port();
    let mut env = base_env(&redis, "inst-conns", port);
    env.insert("LLUMLET_RPC_MAX_CONNECTIONS".into(), "4".into());
    let p = LlumletProcess::spawn(&env);
    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    client.push_instance_status(engine_status(1)).await.unwrap();
    // The client holds one; three silent sockets take the rest.
    let silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // Closed by the llumlet: the end of the stream (or a reset), not the read timeout. A
    // served connection would get the server's HTTP/2 settings at once and stay open.
    let closed = |s: &mut std::net::TcpStream| {
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    assert!(
        closed(&mut extra),
        "a connection beyond the limit was served"
    );
    assert!(
        p.stderr().contains("LLUMLET_RPC_MAX_CONNECTIONS"),
        "{}",
        p.stderr()
    );
    // The silent ones go after their first 5 s.
    let t = std::time::Instant::now();
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(closed(&mut s), "a silent connection stayed open");
    }
    assert!(t.elapsed() < Duration::from_secs(9), "{:?}", t.elapsed());
    let mut fresh = grpc_client(port, Duration::from_secs(10)).await;
    fresh.push_instance_status(engine_status(2)).await.unwrap();
    client.push_instance_status(engine_status(3)).await.unwrap();
}

#[test]
fn invalid_configuration_never_registers() {
    let redis = RedisServer::start();
    let cases: &[(&str, &str, &str)] = &[
        (
            "LLUMNIX_CMS_EXPIRED_TIME",
            "1",
            "strictly greater than LLUMNIX_METADATA_PUSH_INTERVAL",
        ),
        ("LLUMNIX_STATUS_PUSH_INTERVAL", "0", "out of range"),
        (
            "LLUMNIX_STATUS_PUSH_INTERVAL",
            "1e-300",
            "between 0.001 and 86400",
        ),
        (
            "LLUMNIX_CMS_EXPIRED_TIME",
            "99999999999999999999",
            "out of range",
        ),
        (
            "LLUMLET_TRANSFER_SECRET_FILE",
            "/nonexistent/secret",
            "/nonexistent/secret",
        ),
        (
            "LLUMLET_RPC_BIND_ADDRESS",
            "everywhere",
            "IPv4 or IPv6 address",
        ),
        (
            "LLUMNIX_UPDATE_INSTANCE_STATUS_MODE",
            "sometimes",
            "push or pull",
        ),
        ("LLUMNIX_RPC_PORT", "99999", "between 1024 and 65535"),
        ("LLUMNIX_CMS_REDIS_PORT", "redis", "integer"),
        ("LLUMNIX_DETAILED_MIG_STATUS", "maybe", "boolean"),
        ("LLUMNIX_INSTANCE_TYPE", "gpu", "prefill, decode, neutral"),
        ("LLUMNIX_VLLM_API_SERVER_PORT", "", "required"),
        ("LLUMLET_INSTANCE_ID", "", "required"),
        (
            "LLUMLET_KV_TRANSFER_CONFIG",
            r#"{"kv_connector": "P2p", "kv_role": "kv_both"}"#,
            "must be HybridConnector or MooncakeConnector",
        ),
    ];
    for (var, value, rule) in cases {
        let mut env = base_env(&redis, "inst-bad", free_port());
        env.insert(var.to_string(), value.to_string());
        let mut p = LlumletProcess::spawn(&env);
        let status = p.wait(Duration::from_secs(10));
        let err = p.stderr();
        assert_eq!(status.code(), Some(2), "{var}={value}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(var) && err.contains(rule),
            "{var}={value}: {err}"
        );
        assert_clean_log(&err);
        assert_eq!(redis.dbsize(), 0, "{var}={value} wrote to the CMS");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_pushes_and_rpcs() {
    let redis = RedisServer::start();
    let port = free_port();
    let mport = free_port();
    let mut env = base_env(&redis, "inst-m", port);
    env.insert("LLUMLET_METRICS_PORT".into(), mport.to_string());
    let _p = LlumletProcess::spawn(&env);
    let mut client = grpc_client(port, Duration::from_secs(10)).await;
    client.push_instance_status(engine_status(1)).await.unwrap();
    redis.wait_for(&format!("{STATUS}inst-m"), Duration::from_secs(5), |b| {
        b.map(|_| ())
    });
    let body = tokio::task::spawn_blocking(move || get_metrics(mport))
        .await
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("llumlet_grpc_requests_total{method=\"PushInstanceStatus\",code=\"OK\"} 1"),
        "{body}"
    );
    let pushes: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("llumlet_status_pushes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(pushes >= 1);
    assert!(body.contains("llumlet_engine_status_age_seconds "));
    assert!(
        body.contains("llumlet_metadata_pushes_total 1")
            || body.contains("llumlet_metadata_pushes_total 2")
    );
}

#[test]
fn kv_transfer_config_shapes_the_metadata() {
    let redis = RedisServer::start();
    let mut env = base_env(&redis, "inst-kvt", free_port());
    env.insert(
        "LLUMLET_KV_TRANSFER_CONFIG".into(),
        r#"{"kv_connector": "HybridConnector", "kv_role": "kv_consumer", "kv_connector_extra_config":
            {"backend": "kvt+migration", "naming_url": "file:/tmp/naming", "kvt_inst_id": "d0", "rpc_port": "29876"}}"#
            .into(),
    );
    let _p = LlumletProcess::spawn(&env);
    let meta = redis.wait_for(&format!("{META}inst-kvt"), Duration::from_secs(10), |b| {
        b.map(|b| InstanceMetadata::decode(b).unwrap())
    });
    assert_eq!(meta.instance_type, "decode", "from kv_role");
    assert_eq!(meta.kvt_port, 29876);
    assert_eq!(meta.ip_kvt, "127.0.0.1");
}
