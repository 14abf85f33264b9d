//! Migrations between two hosts over a real network link, with the faults loopback cannot show:
//! packet loss, a silent partition at each protocol step (nothing is reset: the peer just goes
//! quiet), a partition that heals, and a peer host that disappears for good. The hosts are
//! network namespaces with a /dev/shm each (`llumlet_tests::netns`), so `auto` has to choose a
//! network transport. Needs root; elsewhere every test says why it is skipped and passes.
//!
//! Every case ends with `check_exactly_once`: every request finished once, at the instance where
//! it went last, with the tokens and KV bytes of an unmigrated run, nothing reserved, suspended,
//! journaled or left in either /dev/shm.

use std::time::{Duration, Instant};

use llumlet_tests::mig::*;
use llumlet_tests::netns::TwoHosts;
use llumlet_tests::*;

/// What every case runs on: the two hosts, the cluster secret they share (and the directory
/// holding it), a Redis both reach, and a runtime for the gRPC calls.
struct Setup {
    hosts: TwoHosts,
    secret: String,
    redis: RedisServer,
    rt: tokio::runtime::Runtime,
    _dir: TempDir,
}

/// The setup on two hosts (`delay_ms`: with a delayed data link), or `None` after saying why
/// this machine cannot build them (the test then passes as skipped).
fn setup_or_skip(test: &str, delay_ms: Option<u32>) -> Option<Setup> {
    let built = match delay_ms {
        Some(ms) => TwoHosts::setup_delayed(ms),
        None => TwoHosts::setup(),
    };
    let hosts = match built {
        Ok(h) => h,
        Err(why) => {
            eprintln!("{test}: skipped: the two-host tests {why}");
            return None;
        }
    };
    let dir = TempDir::new("two-hosts");
    Some(Setup {
        secret: secret(&dir),
        redis: redis_on(&hosts),
        rt: tokio::runtime::Runtime::new().unwrap(),
        hosts,
        _dir: dir,
    })
}

/// The cluster's transfer secret, shared by both hosts (their host keys differ: each host has
/// its own /dev/shm).
fn secret(dir: &TempDir) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mut key = [0u8; 32];
    llumlet_dataplane::sys::random_bytes(&mut key).unwrap();
    let p = dir.0.join("transfer.secret");
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_string_lossy().into_owned()
}

fn redis_on(hosts: &TwoHosts) -> RedisServer {
    RedisServer::start_with(
        vec![
            "--bind".into(),
            "127.0.0.1".into(),
            hosts.bridge_ip.clone(),
            "--protected-mode".into(),
            "no".into(),
        ],
        None,
    )
}

/// Long requests (about 12 s each at 4 ms a step), so that they are alive through a case.
fn opts(seed: u64, requests: u32) -> SimOpts {
    SimOpts {
        max_tokens: 3000,
        num_blocks: 4096,
        ..SimOpts::new(seed, requests)
    }
}

struct Pair {
    a: Instance,
    b: Instance,
}

/// Two instances, one per host, started with `env`; `ucx_on_data_link`: UCX may use the data
/// link only (`UCX_NET_DEVICES`: a delay there is not bypassed over the management link).
fn pair(
    hosts: &TwoHosts,
    redis: &RedisServer,
    tag: &str,
    secret: &str,
    env: &[(&str, &str)],
    b_requests: u32,
    ucx_on_data_link: bool,
) -> Pair {
    let mut all: Vec<(&str, &str)> = vec![
        ("LLUMLET_TRANSFER_SECRET_FILE", secret),
        ("LLUMLET_TRANSFER_IDLE_TIMEOUT", "3"),
    ];
    all.extend_from_slice(env);
    let seed = u64::from(std::process::id()) * 100 + tag.len() as u64;
    let devs = [hosts.data_dev(0), hosts.data_dev(1)];
    let on = |h: usize| {
        let mut v = all.clone();
        if ucx_on_data_link {
            v.push(("UCX_NET_DEVICES", devs[h].as_str()));
        }
        v
    };
    let a = Instance::start_on(
        redis,
        &format!("{tag}-a"),
        opts(seed, 6),
        &on(0),
        Some(Placement::on(hosts, 0)),
    );
    let b = Instance::start_on(
        redis,
        &format!("{tag}-b"),
        opts(seed + 1, b_requests),
        &on(1),
        Some(Placement::on(hosts, 1)),
    );
    a.wait_attached(redis);
    b.wait_attached(redis);
    status(redis, &a.id, Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    Pair { a, b }
}

fn migrate_to(rt: &tokio::runtime::Runtime, src: &Instance, dst: &Instance) -> (bool, String) {
    migrate_via(rt, src, &dst.id, &dst.transfer_ip, dst.transfer_port())
}

/// The transports the finished migrations of `logs` used.
fn transports(logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("migration out finished") && l.contains("outcome=Migrated"))
        .filter_map(|l| {
            let t = l.split("transport=\"").nth(1)?;
            Some(t.split('"').next()?.to_string())
        })
        .collect()
}

/// Migrations both ways between the hosts over a data link with 10 ms of delay each way and 2 %
/// of every link's packets lost each way: `auto` picks tcp (there is no RDMA device here), `ucx`
/// picks UCX over its TCP transport, and `auto` with encryption picks encrypted tcp (UCX would
/// carry KV bytes in the clear), never `shm`; every Migrate succeeds and every request ends
/// exactly once.
#[test]
fn migrations_between_hosts_pick_the_network_and_survive_delay_and_loss() {
    let Some(Setup {
        hosts,
        secret,
        redis,
        rt,
        _dir,
    }) = setup_or_skip("delay and loss", Some(10))
    else {
        return;
    };
    // The delay is there: a round trip on the data link takes at least twice 10 ms.
    let t = Instant::now();
    let ping = std::process::Command::new(&hosts.wrap(0)[0])
        .args(&hosts.wrap(0)[1..])
        .args(["ping", "-c", "1", "-W", "2", &hosts.data[1]])
        .output();
    if matches!(&ping, Ok(o) if o.status.success()) {
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
    } else {
        // No ping here: a TCP connect is one round trip too.
        let t = Instant::now();
        let _ = std::process::Command::new(&hosts.wrap(0)[0])
            .args(&hosts.wrap(0)[1..])
            .args([
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{}/9 || true", hosts.data[1]),
            ])
            .output();
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
    }
    hosts.loss(2);
    // Without an RDMA device `auto` takes tcp between hosts; `ucx` takes UCX over its TCP
    // transport.
    let cases = [
        ("nl-auto", "auto", "0", "tcp"),
        ("nl-ucx", "ucx", "0", "ucx"),
        ("nl-enc", "auto", "1", "tcp"),
    ];
    for (tag, transport, encrypt, want) in cases {
        let env = [
            ("LLUMLET_TRANSPORT", transport),
            ("UCX_TLS", "tcp"),
            ("LLUMLET_TRANSFER_ENCRYPT", encrypt),
        ];
        let Pair { mut a, mut b } = pair(&hosts, &redis, tag, &secret, &env, 6, true);
        status(&redis, &b.id, Duration::from_secs(15), |s| {
            s.num_running_requests >= 2
        });
        for round in 0..4 {
            let (src, dst) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
            let (ok, msg) = migrate_to(&rt, src, dst);
            assert!(ok, "{tag} round {round}: {msg}\n{}\n{}", a.logs(), b.logs());
        }
        check_exactly_once(&redis, &mut [&mut a, &mut b], Duration::from_secs(90));
        let used = transports(&format!("{}{}", a.logs(), b.logs()));
        assert_eq!(used.len(), 4, "{used:?}");
        assert!(used.iter().all(|t| t == want), "{tag}: {used:?}");
        if encrypt == "1" {
            assert!(a.logs().contains("UCX not used"), "{}", a.logs());
        }
    }
}

/// A silent partition of the data link at each protocol step (the faulted llumlet pauses there
/// for 2 s, the link goes quiet meanwhile), over UCX and over tcp. Before the commit: the Migrate fails in bounded time
/// and the request decodes at the source, the destination frees its reservation when its source
/// goes quiet. After the commit was sent: the partition heals 8 s later, the source learns the
/// outcome (`Resolve`) and the request runs at exactly one place.
#[test]
fn a_partition_at_each_protocol_step_ends_in_bounded_time() {
    let Some(Setup {
        hosts,
        secret,
        redis,
        rt,
        _dir,
    }) = setup_or_skip("partition", None)
    else {
        return;
    };
    let cases = [
        ("src", "src-after-stage0", false),
        ("src", "src-after-suspend", false),
        ("dst", "dst-after-reserve", false),
        ("src", "src-after-commit", true),
        ("dst", "dst-after-commit", true),
    ];
    // UCX over its network transport only, as between two hosts (`ucx`: without an RDMA device
    // `auto` takes tcp). UCX 1.13 may abort a llumlet after such a partition (see
    // `restart_if_ucx_aborted`).
    let runs = [("ucx", "ucx"), ("tcp", "tcp")];
    for (n, ((side, point, after_commit), (transport, want))) in cases
        .into_iter()
        .flat_map(|c| runs.into_iter().map(move |r| (c, r)))
        .enumerate()
    {
        eprintln!("partition at {point} over {want}");
        let tag = format!("pt{n}");
        let env = [("LLUMLET_TRANSPORT", transport), ("UCX_TLS", "tcp")];
        let Pair { mut a, mut b } = pair(&hosts, &redis, &tag, &secret, &env, 0, false);
        let fault = format!("{point}=pause");
        if side == "src" {
            a.restart_llumlet_with(Some(&fault));
            a.wait_attached(&redis);
        } else {
            b.restart_llumlet_with(Some(&fault));
            b.wait_attached(&redis);
        }
        let started = Instant::now();
        let (ok, msg) = std::thread::scope(|s| {
            let faulted = if side == "src" { &a } else { &b };
            let cut = s.spawn(|| {
                let seen = format!("injected fault Pause at {point}");
                until(
                    Duration::from_secs(30),
                    &seen,
                    || faulted.llumlet.stderr().contains(&seen),
                    || faulted.logs(),
                );
                hosts.partition(true);
                if after_commit {
                    std::thread::sleep(Duration::from_secs(8));
                    hosts.partition(false);
                }
            });
            let r = migrate_to(&rt, &a, &b);
            cut.join().unwrap();
            r
        });
        // The call may answer at its 5 s deadline while the migration goes on: it ends when the
        // source says so (restarting the llumlet earlier would be a fault of its own).
        until(
            Duration::from_secs(150),
            "the migration to end at the source",
            || a.llumlet.stderr().contains("migration out finished"),
            || a.logs(),
        );
        let took = started.elapsed();
        hosts.partition(false);
        eprintln!(
            "partition at {point} over {want}: Migrate → ({ok}, {msg}); ended after {took:?}"
        );
        let logs = |a: &Instance, b: &Instance| {
            format!("{point}: ({ok}, {msg})\n{}\n{}", a.logs(), b.logs())
        };
        // Bounded: the step timeouts and the 20 resolution attempts, not forever.
        assert!(took < Duration::from_secs(150), "{}", logs(&a, &b));
        if !after_commit {
            assert!(!ok, "{}", logs(&a, &b));
        }
        if side == "src" {
            a.restart_llumlet();
        } else {
            b.restart_llumlet();
        }
        if want == "ucx" {
            restart_if_ucx_aborted(&redis, &mut a, &mut b);
        }
        check_exactly_once(&redis, &mut [&mut a, &mut b], Duration::from_secs(120));
        if !after_commit {
            assert!(a.events("migrated-out ").is_empty(), "{}", logs(&a, &b));
        } else {
            // The commit had reached the destination before the link went quiet.
            assert_eq!(a.events("migrated-out ").len(), 1, "{}", logs(&a, &b));
            assert_eq!(transports(&a.logs()), [want], "{}", logs(&a, &b));
        }
    }
}

/// UCX 1.13 over its TCP transport emulates puts in software, and aborts the process when a put
/// arrives for an endpoint it has timed out ("Endpoint timeout" is fatal in its put handler):
/// after a partition, the healed link can bring the source's retransmitted puts to a destination
/// that gave the migration up. Nothing is lost (a killed llumlet is what the fault suite
/// covers), but the llumlet must be restarted, as its supervisor would. Watches both llumlets
/// for the retransmissions' time after the heal and restarts one that UCX aborted; any other
/// exit fails the test. (`auto` uses UCX only where there is an RDMA device.)
fn restart_if_ucx_aborted(redis: &RedisServer, a: &mut Instance, b: &mut Instance) {
    let until = Instant::now() + Duration::from_secs(10);
    let mut restarted = [false, false];
    while Instant::now() < until && restarted != [true, true] {
        for (k, i) in [&mut *a, &mut *b].into_iter().enumerate() {
            if restarted[k] {
                continue;
            }
            if let Ok(Some(status)) = i.llumlet.child.try_wait() {
                let log = i.llumlet.stderr();
                assert!(
                    log.contains("Endpoint timeout"),
                    "{} exited ({status}) other than by UCX's abort:\n{}",
                    i.id,
                    i.logs()
                );
                eprintln!(
                    "{}: UCX aborted the llumlet (Endpoint timeout); restarted",
                    i.id
                );
                i.restart_llumlet();
                i.wait_attached(redis);
                restarted[k] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The destination host disappears for good (its llumlet and engine killed, the data link
/// deleted) while it holds a reservation: the Migrate fails in bounded time and every request
/// finishes at the source, nothing left suspended or reserved there.
#[test]
fn a_peer_host_that_disappears_for_good() {
    let Some(Setup {
        hosts,
        secret,
        redis,
        rt,
        _dir,
    }) = setup_or_skip("gone", None)
    else {
        return;
    };
    let Pair { mut a, mut b } = pair(&hosts, &redis, "gone", &secret, &[], 0, false);
    b.restart_llumlet_with(Some("dst-after-reserve=pause"));
    b.wait_attached(&redis);
    let (bid, bip, bport) = (b.id.clone(), b.transfer_ip.clone(), b.transfer_port());
    let started = Instant::now();
    let (ok, msg) = std::thread::scope(|s| {
        let (b, hosts) = (&mut b, &hosts);
        let gone = s.spawn(move || {
            let seen = "injected fault Pause at dst-after-reserve";
            until(
                Duration::from_secs(30),
                seen,
                || b.llumlet.stderr().contains(seen),
                || b.logs(),
            );
            // Silence first (a host that loses power sends nothing more), then the processes.
            hosts.partition(true);
            for p in [&mut b.llumlet, &mut b.engine] {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        });
        let r = migrate_via(&rt, &a, &bid, &bip, bport);
        gone.join().unwrap();
        r
    });
    let took = started.elapsed();
    eprintln!("peer gone: Migrate → ({ok}, {msg}) after {took:?}");
    assert!(!ok && took < Duration::from_secs(60), "{msg}\n{}", a.logs());
    check_exactly_once(&redis, &mut [&mut a], Duration::from_secs(120));
    assert!(a.events("migrated-out ").is_empty(), "{}", a.logs());
    drop(b);
}
