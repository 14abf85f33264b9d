//! Live migration end to end: two simulated engines and two llumlets as separate processes, a
//! real redis-server, `Migrate` over gRPC. The migrated request must finish at the destination
//! with exactly the token stream and KV bytes of an unmigrated run (the engines check every
//! token's KV bytes on arrival and the token digest at the end), and never at the source.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llumlet_proto::cms::{InstanceMetadata, InstanceStatus};
use llumlet_proto::llumlet::migrate_request::MigrationValue;
use llumlet_proto::llumlet::MigrateRequest;
use llumlet_tests::*;
use prost::Message;

fn engine(shm: &str, seed: u64, requests: u32) -> LlumletProcess {
    let (seed, requests) = (seed.to_string(), requests.to_string());
    let args = [
        "sim-engine",
        "--instance-id",
        "x",
        "--shm",
        shm,
        "--max-tokens",
        "700",
        "--step-ms",
        "4",
        "--num-blocks",
        "512",
        "--block-size",
        "16",
        "--max-prompt",
        "200",
        "--seed",
        &seed,
        "--requests",
        &requests,
    ];
    LlumletProcess::spawn_args(&args, &HashMap::new())
}

struct Instance {
    id: String,
    engine: LlumletProcess,
    llumlet: LlumletProcess,
    rpc: u16,
}

fn instance(
    redis: &RedisServer,
    id: &str,
    seed: u64,
    requests: u32,
    extra: &[(&str, &str)],
) -> Instance {
    let shm = format!("llumlet-ctl-test-{id}-{}", std::process::id());
    let engine = engine(&shm, seed, requests);
    let rpc = free_port();
    let mut env = base_env(redis, id, rpc);
    env.insert("LLUMLET_ENGINE_SHM".into(), shm);
    env.insert("LLUMNIX_MAX_REQ_MIG_OUT".into(), "4".into());
    env.insert("LLUMNIX_MAX_REQ_MIG_IN".into(), "4".into());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    let llumlet = LlumletProcess::spawn(&env);
    Instance {
        id: id.into(),
        engine,
        llumlet,
        rpc,
    }
}

fn status(
    redis: &RedisServer,
    id: &str,
    within: Duration,
    f: impl Fn(&InstanceStatus) -> bool,
) -> InstanceStatus {
    redis.wait_for(&format!("llumnix:instance_status:{id}"), within, |b| {
        b.map(|b| InstanceStatus::decode(b).unwrap())
            .filter(|s| f(s))
    })
}

fn kvt_port(redis: &RedisServer, id: &str) -> i32 {
    let m = redis.wait_for(
        &format!("llumnix:instance_metadata:{id}"),
        Duration::from_secs(10),
        |b| b.map(|b| InstanceMetadata::decode(b).unwrap()),
    );
    assert!(m.kvt_port > 0, "the transfer endpoint is published");
    assert_eq!(m.ip_kvt, "127.0.0.1");
    m.kvt_port
}

/// Lines `prefix <id> ...` in `out`.
fn ids_with(out: &str, prefix: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("sim-engine: ")?.strip_prefix(prefix))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect()
}

fn migrate(
    rt: &tokio::runtime::Runtime,
    src: &Instance,
    dst: &Instance,
    port: i32,
) -> (bool, String) {
    rt.block_on(async {
        let mut c = grpc_client(src.rpc, Duration::from_secs(10)).await;
        let r = c
            .migrate(MigrateRequest {
                src_engine_id: src.id.clone(),
                dst_engine_id: dst.id.clone(),
                dst_engine_ip: "127.0.0.1".into(),
                dst_engine_port: port,
                migration_type: "NUM_REQ".into(),
                migration_req_policy: "SR".into(),
                trigger_policy: "test".into(),
                migration_value: Some(MigrationValue::NumReqs(1)),
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                (r.success, r.message)
            }
            Err(s) => (false, format!("{:?}: {}", s.code(), s.message())),
        }
    })
}

/// Waits until `f` holds for the engines' outputs.
fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_moved(src: &Instance, dst: &Instance) -> String {
    let moved_in = ids_with(&dst.engine.stdout(), "migrated-in ");
    let id = moved_in.last().cloned().expect("a request arrived");
    assert!(
        ids_with(&src.engine.stdout(), "migrated-out ").contains(&id),
        "freed at the source"
    );
    let line = dst
        .engine
        .stdout()
        .lines()
        .find(|l| l.contains(&format!("migrated-in {id} ")))
        .unwrap()
        .to_string();
    assert!(
        line.contains("kv=ok") && line.contains("tokens=ok"),
        "KV bytes and tokens identical on arrival: {line}"
    );
    id
}

#[test]
fn requests_move_live_with_their_kv_over_shm_and_tcp_and_finish_once() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = instance(&redis, "mig-a", 1, 4, &[]);
    let b = instance(&redis, "mig-b", 2, 4, &[("LLUMLET_TRANSPORT", "tcp")]);
    for i in [&a, &b] {
        status(&redis, &i.id, Duration::from_secs(15), |s| {
            s.num_running_requests >= 3
        });
    }
    let (port_a, port_b) = (kvt_port(&redis, "mig-a"), kvt_port(&redis, "mig-b"));

    // a → b: both on this host, so shm.
    let (ok, msg) = migrate(&rt, &a, &b, port_b);
    assert!(
        ok,
        "{msg}\nsource llumlet:\n{}\ndestination llumlet:\n{}",
        a.llumlet.stderr(),
        b.llumlet.stderr()
    );
    assert_eq!(msg, "Migrate requests from mig-a to mig-b.");
    let ab = check_moved(&a, &b);
    assert!(
        a.llumlet.stderr().contains("transport=\"shm\""),
        "{}",
        a.llumlet.stderr()
    );

    // b → a with LLUMLET_TRANSPORT=tcp.
    let (ok, msg) = migrate(&rt, &b, &a, port_a);
    assert!(ok, "{msg}\n{}", b.llumlet.stderr());
    let ba = check_moved(&b, &a);
    assert!(
        b.llumlet.stderr().contains("transport=\"tcp\""),
        "{}",
        b.llumlet.stderr()
    );
    assert_ne!(ab, ba);

    // a → b once more, from the user's guide's Python client (stubs generated from proto/).
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/guide_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([
            "migrate",
            "127.0.0.1",
            &a.rpc.to_string(),
            "mig-a",
            "mig-b",
            "127.0.0.1",
            &port_b.to_string(),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.trim(),
        "Success: True, Message: Migrate requests from mig-a to mig-b.",
        "{}",
        a.llumlet.stderr()
    );
    until(
        Duration::from_secs(5),
        "the second request to arrive",
        || ids_with(&b.engine.stdout(), "migrated-in ").len() == 2,
    );
    let ab2 = check_moved(&a, &b);
    assert_ne!(ab2, ab);

    // Every moved request finishes exactly once, where it went last (a request may move twice:
    // SR picks the shortest, often the one that just arrived), with the unmigrated token stream.
    let mut moved: Vec<String> = [&ab, &ba, &ab2].into_iter().cloned().collect();
    moved.dedup();
    let last_home = |id: &String| -> (&Instance, &Instance) {
        let count = |i: &Instance, p: &str| {
            ids_with(&i.engine.stdout(), p)
                .iter()
                .filter(|x| *x == id)
                .count()
        };
        if count(&a, "migrated-in ") > count(&a, "migrated-out ") {
            (&a, &b)
        } else {
            (&b, &a)
        }
    };
    until(
        Duration::from_secs(30),
        "the migrated requests to finish",
        || {
            moved
                .iter()
                .all(|id| ids_with(&last_home(id).0.engine.stdout(), "finished ").contains(id))
        },
    );
    for id in &moved {
        let (at, other) = last_home(id);
        let out = at.engine.stdout();
        let fin = out
            .lines()
            .find(|l| l.contains(&format!("finished {id} ")))
            .unwrap();
        assert!(fin.contains("migrated_in=true tokens=ok"), "{fin}");
        assert_eq!(
            ids_with(&out, "finished ")
                .iter()
                .filter(|x| *x == id)
                .count(),
            1,
            "finished once"
        );
        assert!(
            !ids_with(&other.engine.stdout(), "finished ").contains(id),
            "{id} also finished elsewhere"
        );
    }
    // The CMS shows the move: the destination ran more requests than it admitted itself.
    status(&redis, "mig-b", Duration::from_secs(10), |s| s.schedulable);
}

#[test]
fn migrate_to_a_closed_port_fails_and_the_request_keeps_running_at_the_source() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = instance(&redis, "mig-c", 3, 3, &[]);
    let b_id = Instance {
        id: "nobody".into(),
        engine: engine("llumlet-ctl-unused-x", 9, 0),
        llumlet: LlumletProcess::spawn_args(&["env"], &HashMap::new()),
        rpc: 0,
    };
    status(&redis, "mig-c", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    let (ok, msg) = migrate(&rt, &a, &b_id, i32::from(free_port()));
    assert!(!ok);
    assert!(
        msg.starts_with("Internal: Migration failed due to an unexpected server error"),
        "{msg}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = a.engine.stdout();
    assert!(
        ids_with(&out, "migrated-out ").is_empty(),
        "nothing left the source"
    );
    // Every request still finishes at the source.
    until(
        Duration::from_secs(30),
        "all requests to finish at the source",
        || ids_with(&a.engine.stdout(), "finished ").len() == 3,
    );
}
