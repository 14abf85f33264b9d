//! Live migration end to end: two simulated engines and two llumlets as separate processes, a
//! real redis-server, `Migrate` over gRPC. The migrated request must finish at the destination
//! with exactly the token stream and KV bytes of an unmigrated run (the engines check every
//! token's KV bytes on arrival and the token digest at the end), and never at the source.

use std::time::Duration;

use llumlet_tests::mig::*;
use llumlet_tests::*;

/// The request the source's last successful migration moved (its llumlet logs it before
/// `Migrate` answers), once both engines have printed its events (each at its next step):
/// freed at the source, arrived at the destination with identical KV bytes and tokens.
fn check_moved(src: &Instance, dst: &Instance) -> String {
    let log = src.llumlet.stderr();
    let id = log
        .lines()
        .rev()
        .find(|l| l.contains("migration out finished") && l.contains("outcome=Migrated"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("request="))
        })
        .unwrap_or_else(|| panic!("no migration logged by the source:\n{log}"))
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let arrived = dst
            .engine
            .stdout()
            .lines()
            .find(|l| l.contains(&format!("migrated-in {id} ")))
            .map(str::to_string);
        if let (Some(line), true) = (&arrived, src.events("migrated-out ").contains(&id)) {
            break line.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id}: arrived {arrived:?}, freed at the source: {}\n{}\n{}",
            src.events("migrated-out ").contains(&id),
            src.logs(),
            dst.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
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
    let mut a = Instance::start(&redis, "mig-a", SimOpts::new(1, 4), &[]);
    let mut b = Instance::start(
        &redis,
        "mig-b",
        SimOpts::new(2, 4),
        &[("LLUMLET_TRANSPORT", "tcp")],
    );
    for i in [&a, &b] {
        status(&redis, &i.id, Duration::from_secs(15), |s| {
            s.num_running_requests >= 3
        });
    }
    let (port_a, port_b) = (kvt_port(&redis, "mig-a"), kvt_port(&redis, "mig-b"));

    // a → b: both on this host, so shm.
    let (ok, msg) = migrate(&rt, &a, &b.id, port_b);
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
    let (ok, msg) = migrate(&rt, &b, &a.id, port_a);
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
        || b.events("migrated-in ").len() == 2,
        || b.logs(),
    );
    let ab2 = check_moved(&a, &b);
    assert_ne!(ab2, ab);

    // Every request (moved or not) finishes exactly once, with the unmigrated token stream;
    // nothing is left held at either engine.
    check_exactly_once(&redis, &mut [&mut a, &mut b], Duration::from_secs(40));
}

/// KV caches on the GPU (the simulated engines' `--kv gpu`; under the test double of the driver
/// unless `LLUMLET_TEST_CUDA=real`): the source llumlet opens both engines' CUDA IPC handles and
/// copies device to device; the destination engine reads the request's KV back from the GPU and
/// finds its bytes; both directions; every request exactly once.
#[test]
fn requests_move_with_their_kv_on_the_gpu_over_cuda_ipc() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gpu = |seed| SimOpts {
        gpu: true,
        ..SimOpts::new(seed, 4)
    };
    let mut a = Instance::start(&redis, "gpu-a", gpu(1), &[]);
    let mut b = Instance::start(&redis, "gpu-b", gpu(2), &[("LLUMLET_TRANSPORT", "tcp")]);
    for i in [&a, &b] {
        status(&redis, &i.id, Duration::from_secs(15), |s| {
            s.num_running_requests >= 3
        });
        assert!(
            i.engine.stderr().contains("KV cache on GPU 0"),
            "{}",
            i.logs()
        );
        if llumlet_tests::fake_cuda() {
            assert!(i.llumlet.stderr().contains("test double"), "{}", i.logs());
        }
    }
    let (port_a, port_b) = (kvt_port(&redis, "gpu-a"), kvt_port(&redis, "gpu-b"));
    let (ok, msg) = migrate(&rt, &a, &b.id, port_b);
    assert!(ok, "{msg}\n{}\n{}", a.logs(), b.logs());
    let ab = check_moved(&a, &b);
    // A GPU cache moves over cuda whatever LLUMLET_TRANSPORT says.
    let (ok, msg) = migrate(&rt, &b, &a.id, port_a);
    assert!(ok, "{msg}\n{}\n{}", b.logs(), a.logs());
    let ba = check_moved(&b, &a);
    assert_ne!(ab, ba);
    for i in [&a, &b] {
        let log = i.llumlet.stderr();
        let out: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("migration out finished"))
            .collect();
        assert_eq!(out.len(), 1, "{log}");
        assert!(out[0].contains("transport=\"cuda\""), "{log}");
    }
    check_exactly_once(&redis, &mut [&mut a, &mut b], Duration::from_secs(40));
}

/// Over UCX with UCX's TCP transport (software RMA, the path an RDMA-less network takes) and
/// with its shared-memory transports: both directions, every request exactly once.
#[test]
fn requests_move_over_ucx_with_its_tcp_and_shared_memory_transports() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (n, tls) in [(0, "tcp"), (1, "posix,cma")] {
        let env = [("LLUMLET_TRANSPORT", "ucx"), ("UCX_TLS", tls)];
        let (ida, idb) = (format!("ucx{n}-a"), format!("ucx{n}-b"));
        let mut a = Instance::start(&redis, &ida, SimOpts::new(3 + n, 4), &env);
        let mut b = Instance::start(&redis, &idb, SimOpts::new(5 + n, 4), &env);
        for i in [&a, &b] {
            status(&redis, &i.id, Duration::from_secs(15), |s| {
                s.num_running_requests >= 3
            });
        }
        let (port_a, port_b) = (kvt_port(&redis, &ida), kvt_port(&redis, &idb));
        let (ok, msg) = migrate(&rt, &a, &b.id, port_b);
        assert!(
            ok,
            "{msg}
{}
{}",
            a.llumlet.stderr(),
            b.llumlet.stderr()
        );
        check_moved(&a, &b);
        let (ok, msg) = migrate(&rt, &b, &a.id, port_a);
        assert!(
            ok,
            "{msg}
{}
{}",
            b.llumlet.stderr(),
            a.llumlet.stderr()
        );
        check_moved(&b, &a);
        for i in [&a, &b] {
            let log = i.llumlet.stderr();
            assert!(log.contains("UCX transport ready"), "{log}");
            assert!(log.contains("transport=\"ucx\""), "UCX_TLS={tls}: {log}");
        }
        check_exactly_once(&redis, &mut [&mut a, &mut b], Duration::from_secs(40));
    }
}

#[test]
fn migrate_to_a_closed_port_fails_and_the_request_keeps_running_at_the_source() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut a = Instance::start(&redis, "mig-c", SimOpts::new(3, 3), &[]);
    status(&redis, "mig-c", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    let (ok, msg) = migrate(&rt, &a, "nobody", i32::from(free_port()));
    assert!(!ok);
    assert!(
        msg.starts_with("Internal: Migration failed due to an unexpected server error"),
        "{msg}"
    );
    assert!(
        a.events("migrated-out ").is_empty(),
        "nothing left the source"
    );
    // Every request still finishes at the source.
    check_exactly_once(&redis, &mut [&mut a], Duration::from_secs(30));
}

#[test]
fn the_naming_directory_finds_the_destination_when_the_given_port_is_wrong() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = TempDir::new("naming");
    let kvt = |port: u16| {
        format!(
            r#"{{"kv_connector": "HybridConnector", "kv_role": "kv_both", "kv_connector_extra_config":
               {{"backend": "kvt+migration", "naming_url": "file:{}", "kvt_inst_id": "t", "rpc_port": "{port}"}}}}"#,
            dir.0.display()
        )
    };
    let (pa, pb) = (free_port(), free_port());
    let (ka, kb) = (kvt(pa), kvt(pb));
    let mut a = Instance::start(
        &redis,
        "nm-a",
        SimOpts::new(41, 3),
        &[("LLUMLET_KV_TRANSFER_CONFIG", &ka)],
    );
    let mut b = Instance::start(
        &redis,
        "nm-b",
        SimOpts::new(42, 1),
        &[("LLUMLET_KV_TRANSFER_CONFIG", &kb)],
    );
    status(&redis, "nm-a", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    b.wait_attached(&redis);
    let entry = std::fs::read_to_string(dir.0.join("llumlet-nm-b.json")).unwrap();
    assert!(
        entry.contains(&format!("\"kvt_port\":{}", b.transfer_port())),
        "{entry}"
    );
    // The scheduler's port is wrong (nothing listens there); the directory is right.
    let (ok, msg) = migrate(&rt, &a, "nm-b", i32::from(free_port()));
    assert!(ok, "{msg}\n{}", a.logs());
    assert_eq!(b.events("migrated-in ").len(), 1, "{}", b.logs());
    check_exactly_once(&redis, &mut [&mut a, &mut b], Duration::from_secs(40));
}
