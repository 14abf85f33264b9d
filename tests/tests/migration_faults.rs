//! Migration under faults, with real processes: a fault is injected at a protocol step
//! (`LLUMLET_TEST_FAULTS`: a llumlet or engine killed, the connection cut, a step stalled past
//! its timeout, the engine refusing, the destination out of blocks). Whatever happens, every
//! request finishes exactly once with the token stream of an unmigrated run, no reservation is
//! left at either engine, nothing stays suspended, and every migration slot is free again.

use std::time::Duration;

use llumlet_dataplane::request_table::RequestState;
use llumlet_tests::mig::*;
use llumlet_tests::*;

/// What a case expects of the migration.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The request moved.
    Moved,
    /// The request stayed at the source.
    Stayed,
    /// Either is right (which one depends on a race the protocol settles either way).
    Either,
}

/// Where the fault is armed.
#[derive(Debug, Clone, Copy)]
enum Who {
    SrcLlumlet,
    DstLlumlet,
    SrcEngine,
    DstEngine,
}

struct Case {
    name: &'static str,
    who: Who,
    fault: &'static str,
    expect: Expect,
    /// Restart the killed llumlet (which one, by who) after the Migrate call returns.
    restart: bool,
}

fn run_case(c: &Case, seed: u64) {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src_opts = SimOpts::new(seed, 3);
    src_opts.max_tokens = 400;
    let mut dst_opts = SimOpts::new(seed + 100, 1);
    dst_opts.max_tokens = 400;
    match c.who {
        Who::SrcEngine => src_opts.faults = Some(c.fault.into()),
        Who::DstEngine => dst_opts.faults = Some(c.fault.into()),
        _ => {}
    }
    let faults = [("LLUMLET_TEST_FAULTS", c.fault)];
    type Env<'a> = &'a [(&'a str, &'a str)];
    let (src_env, dst_env): (Env, Env) = match c.who {
        Who::SrcLlumlet => (&faults, &[]),
        Who::DstLlumlet => (&[], &faults),
        _ => (&[], &[]),
    };
    let sid = format!("f{seed}-src");
    let did = format!("f{seed}-dst");
    let mut src = Instance::start(&redis, &sid, src_opts, src_env);
    let mut dst = Instance::start(&redis, &did, dst_opts, dst_env);
    status(&redis, &sid, Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, &did);
    let (ok, msg) = migrate(&rt, &src, &did, port);
    if c.restart {
        match c.who {
            Who::SrcLlumlet => src.restart_llumlet(),
            Who::DstLlumlet => dst.restart_llumlet(),
            _ => {}
        }
    }
    let logs = || {
        format!(
            "case {}: Migrate → ({ok}, {msg})\n{}\n{}",
            c.name,
            src.logs(),
            dst.logs()
        )
    };
    match c.expect {
        Expect::Moved => {
            until(
                Duration::from_secs(30),
                "the request to be freed at the source",
                || src.events("migrated-out ").len() == 1,
                logs,
            );
            assert_eq!(dst.events("migrated-in ").len(), 1, "{}", logs());
        }
        Expect::Stayed => {
            assert!(!ok, "{}", logs());
        }
        Expect::Either => {}
    }
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(60));
    if c.expect == Expect::Stayed {
        assert!(
            src.events("migrated-out ").is_empty() && dst.events("migrated-in ").is_empty(),
            "case {}: nothing moved\n{}\n{}",
            c.name,
            src.logs(),
            dst.logs()
        );
    }
}

fn run_cases(cases: &[Case], seed: u64) {
    for (i, c) in cases.iter().enumerate() {
        eprintln!("fault case {}: {} at {:?}", c.name, c.fault, c.who);
        run_case(c, seed + i as u64 * 10);
    }
}

#[test]
fn a_killed_llumlet_leaves_no_request_lost_or_doubled() {
    use Expect::*;
    use Who::*;
    run_cases(
        &[
            // Before the commit is sent: the restarted source's journal aborts at its engine.
            Case {
                name: "source dies while copying",
                who: SrcLlumlet,
                fault: "src-after-stage0=kill",
                expect: Stayed,
                restart: true,
            },
            Case {
                name: "source dies while the request is suspended",
                who: SrcLlumlet,
                fault: "src-after-suspend=kill",
                expect: Stayed,
                restart: true,
            },
            // After the commit is sent: the restarted source asks the destination.
            Case {
                name: "source dies after sending the commit",
                who: SrcLlumlet,
                fault: "src-after-commit=kill",
                expect: Moved,
                restart: true,
            },
            Case {
                name: "source dies after the commit is acknowledged",
                who: SrcLlumlet,
                fault: "src-after-committed=kill",
                expect: Moved,
                restart: true,
            },
            // The destination dies holding a reservation: the source aborts, the restarted
            // destination frees the reservation.
            Case {
                name: "destination dies after reserving",
                who: DstLlumlet,
                fault: "dst-after-reserve=kill",
                expect: Stayed,
                restart: true,
            },
            // The destination dies with the commit in flight: the source is in doubt and keeps
            // the request suspended until the restarted destination answers (it commits if its
            // engine still holds the reservation, else aborts).
            Case {
                name: "destination dies before committing",
                who: DstLlumlet,
                fault: "dst-before-commit=kill",
                expect: Either,
                restart: true,
            },
            Case {
                name: "destination dies after committing",
                who: DstLlumlet,
                fault: "dst-after-commit=kill",
                expect: Moved,
                restart: true,
            },
        ],
        1000,
    );
}

#[test]
fn cuts_timeouts_and_refusals_leave_no_request_lost_or_doubled() {
    use Expect::*;
    use Who::*;
    run_cases(
        &[
            Case {
                name: "connection cut while copying",
                who: SrcLlumlet,
                fault: "src-after-stage0=cut",
                expect: Stayed,
                restart: false,
            },
            Case {
                name: "connection cut after the commit is sent",
                who: SrcLlumlet,
                fault: "src-after-commit=cut",
                expect: Moved,
                restart: false,
            },
            Case {
                name: "acknowledgement lost",
                who: DstLlumlet,
                fault: "dst-after-commit=cut",
                expect: Moved,
                restart: false,
            },
            Case {
                name: "source engine refuses to begin",
                who: SrcEngine,
                fault: "engine-begin=refuse",
                expect: Stayed,
                restart: false,
            },
            Case {
                name: "destination engine refuses to reserve",
                who: DstEngine,
                fault: "engine-reserve=refuse",
                expect: Stayed,
                restart: false,
            },
            Case {
                name: "destination engine refuses the commit",
                who: DstEngine,
                fault: "engine-commit-in=refuse",
                expect: Stayed,
                restart: false,
            },
            Case {
                name: "source engine stalls on suspend",
                who: SrcEngine,
                fault: "engine-suspend=hang",
                expect: Stayed,
                restart: false,
            },
            Case {
                name: "destination stalls before committing",
                who: DstLlumlet,
                fault: "dst-before-commit=hang",
                expect: Moved,
                restart: false,
            },
        ],
        2000,
    );
}

#[test]
fn a_destination_out_of_blocks_refuses_and_the_request_stays() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (src_m, dst_m) = (free_port(), free_port());
    let (src_ms, dst_ms) = (src_m.to_string(), dst_m.to_string());
    let mut src = Instance::start(
        &redis,
        "oob-src",
        SimOpts::new(5, 3),
        &[("LLUMLET_METRICS_PORT", &src_ms)],
    );
    // Room for one tiny request of its own, never for a migrated one with its headroom.
    let mut small = SimOpts::new(6, 0);
    small.num_blocks = 4;
    small.max_prompt = 16;
    small.max_tokens = 16;
    let mut dst = Instance::start(
        &redis,
        "oob-dst",
        small,
        &[("LLUMLET_METRICS_PORT", &dst_ms)],
    );
    status(&redis, "oob-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "oob-dst");
    let (ok, msg) = migrate(&rt, &src, "oob-dst", port);
    assert!(!ok, "{msg}");
    assert!(msg.contains("could not reserve"), "{msg}\n{}", dst.logs());
    // Both sides count it by its typed reason: the source saw the destination refuse the
    // reservation; the destination's engine could not reserve.
    let counted = |side: &str, reason: &str| {
        format!(
            "llumlet_migrations_total{{side=\"{side}\",outcome=\"aborted\",reason=\"{reason}\"}} 1"
        )
    };
    wait_for_metric(
        src_m,
        &counted("out", "peer_refused"),
        Duration::from_secs(5),
    );
    wait_for_metric(
        dst_m,
        &counted("in", "engine_refused"),
        Duration::from_secs(5),
    );
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}

#[test]
fn a_migration_to_an_idle_destination_shows_in_both_statuses() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (src_m, dst_m) = (free_port(), free_port());
    let (src_ms, dst_ms) = (src_m.to_string(), dst_m.to_string());
    let mut src = Instance::start(
        &redis,
        "cms-src",
        SimOpts::new(7, 2),
        &[("LLUMLET_METRICS_PORT", &src_ms)],
    );
    let mut dst = Instance::start(
        &redis,
        "cms-dst",
        SimOpts::new(8, 0),
        &[("LLUMLET_METRICS_PORT", &dst_ms)],
    );
    status(&redis, "cms-src", Duration::from_secs(15), |s| {
        s.num_running_requests == 2
    });
    status(&redis, "cms-dst", Duration::from_secs(15), |s| {
        s.num_used_gpu_tokens == 0
    });
    let port = kvt_port(&redis, "cms-dst");
    let (ok, msg) = migrate(&rt, &src, "cms-dst", port);
    assert!(ok, "{msg}\n{}", src.logs());
    // The source retired the destination's record of the commit: nothing is left behind.
    until(
        Duration::from_secs(5),
        "the destination's commit record is retired",
        || dst.segment_files("-mig-in-").is_empty(),
        || format!("{:?}\n{}", dst.segment_files("-mig-in-"), dst.logs()),
    );
    // Counted on both sides.
    for (port, side) in [(src_m, "out"), (dst_m, "in")] {
        let want = format!(
            "llumlet_migrations_total{{side=\"{side}\",outcome=\"migrated\",reason=\"none\"}} 1"
        );
        wait_for_metric(port, &want, Duration::from_secs(5));
    }
    // The destination, which admitted nothing, now runs the moved request and holds its blocks.
    status(&redis, "cms-dst", Duration::from_secs(5), |s| {
        s.num_running_requests == 1 && s.num_used_gpu_tokens > 0
    });
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}

#[test]
fn a_destination_engine_that_dies_at_the_commit_leaves_the_request_at_the_source() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src = Instance::start(&redis, "dead-src", SimOpts::new(11, 3), &[]);
    let mut doomed = SimOpts::new(12, 0);
    doomed.faults = Some("engine-commit-in=kill".into());
    let dst = Instance::start(&redis, "dead-dst", doomed, &[]);
    status(&redis, "dead-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "dead-dst");
    let (ok, msg) = migrate(&rt, &src, "dead-dst", port);
    assert!(!ok, "{msg}");
    assert!(dst.events("migrated-in ").is_empty(), "{}", dst.logs());
    check_exactly_once(&redis, &mut [&mut src], Duration::from_secs(40));
}

/// A small deterministic generator (xorshift64*), so that a failing run can be replayed from
/// the seed it prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// The files an instance has in /dev/shm (its segment, mailboxes, migration records).
fn shm_files(i: &Instance) -> usize {
    i.segment_files("").len()
}

/// `LLUMLET_FAULT_ROUNDS` rounds (default 10) of a `Migrate` call in a random direction with a
/// random fault armed (or none). Beyond 10 rounds it is a soak: the engines admit a request a
/// second each for as long as the rounds last, and the run prints, as one JSON line, the faults
/// injected by kind, the calls that moved a request, and what the llumlets hold at the start and
/// the end (files in /dev/shm, resident memory). docs/RELIABILITY.md has a 1,000-round run.
#[test]
fn many_migrations_with_random_faults_keep_every_request_exactly_once() {
    let seed = std::env::var("LLUMLET_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: usize = std::env::var("LLUMLET_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("randomized migration run: LLUMLET_FAULT_SEED={seed} LLUMLET_FAULT_ROUNDS={rounds}");
    let mut rng = Rng(seed);
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let soak = rounds > 10;
    let opts = |s: u64| {
        if soak {
            // A request a second (250 steps of 4 ms) for about as long as the rounds last
            // each decoding for about 10 s: some ten alive on each engine at any time.
            SimOpts {
                max_tokens: 2500,
                num_blocks: 4096,
                admit_every: 250,
                ..SimOpts::new(s, (rounds as u32) * 3 / 2 + 10)
            }
        } else {
            SimOpts {
                max_tokens: 5000,
                num_blocks: 4096,
                ..SimOpts::new(s, 6)
            }
        }
    };
    let mut inst = [
        Instance::start(&redis, "rnd-a", opts(21), &[]),
        Instance::start(&redis, "rnd-b", opts(22), &[("LLUMLET_TRANSPORT", "tcp")]),
    ];
    for i in &inst {
        i.wait_attached(&redis);
    }
    // Faults a round may arm at the source (s) or the destination (d) llumlet.
    let faults: &[(&str, &str)] = &[
        ("", ""),
        ("", ""),
        ("", ""),
        ("", ""),
        ("s", "src-after-stage0=cut"),
        ("s", "src-after-suspend=cut"),
        ("s", "src-after-commit=cut"),
        ("d", "dst-after-reserve=cut"),
        ("d", "dst-after-commit=cut"),
        ("s", "src-after-stage0=kill"),
        ("s", "src-after-suspend=kill"),
        ("s", "src-after-commit=kill"),
        ("d", "dst-after-reserve=kill"),
        ("d", "dst-after-commit=kill"),
    ];
    let mut moved = 0;
    let mut injected: std::collections::BTreeMap<&str, u32> = Default::default();
    let files_start: Vec<usize> = inst.iter().map(shm_files).collect();
    let rss_start: Vec<u64> = inst
        .iter()
        .map(|i| llumlet_dataplane::sys::rss_kib(i.llumlet.child.id()))
        .collect();
    let mut rss_max = rss_start.clone();
    let mut files_max = files_start.clone();
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let from = rng.below(2);
        let to = 1 - from;
        let (side, fault) = faults[rng.below(faults.len())];
        *injected
            .entry(if fault.is_empty() { "none" } else { fault })
            .or_default() += 1;
        for (m, i) in rss_max.iter_mut().zip(&inst) {
            *m = (*m).max(llumlet_dataplane::sys::rss_kib(i.llumlet.child.id()));
        }
        for (m, i) in files_max.iter_mut().zip(&inst) {
            *m = (*m).max(shm_files(i));
        }
        eprintln!(
            "round {round}: {} → {} fault {fault:?}",
            inst[from].id, inst[to].id
        );
        if !fault.is_empty() {
            let at = if side == "s" { from } else { to };
            inst[at].restart_llumlet_with(Some(fault));
            inst[at].wait_attached(&redis);
        }
        let port = inst[to].transfer_port();
        let (ok, msg) = migrate(&rt, &inst[from], &inst[to].id.clone(), port);
        eprintln!("round {round}: Migrate → ({ok}, {msg})");
        moved += usize::from(ok);
        // Let the recovery passes (every second) settle what the fault left, as the time
        // between a scheduler's migrations would.
        std::thread::sleep(Duration::from_millis(1200));
        // Bring back whatever died, and disarm the rest.
        for i in inst.iter_mut() {
            if !i.llumlet.running() || i.env_has_faults() {
                i.restart_llumlet();
                i.wait_attached(&redis);
            }
        }
    }
    eprintln!("randomized migration run: {moved} of {rounds} Migrate calls succeeded");
    if std::env::var_os("LLUMLET_FAULT_LOGS").is_some() {
        eprintln!("{}\n{}", inst[0].logs(), inst[1].logs());
    }
    let files_end: Vec<usize> = inst.iter().map(shm_files).collect();
    let rss_end: Vec<u64> = inst
        .iter()
        .map(|i| llumlet_dataplane::sys::rss_kib(i.llumlet.child.id()))
        .collect();
    let seconds = started.elapsed().as_secs();
    let requests: u32 = inst.iter().map(|i| i.opts.requests).sum();
    let [a, b] = &mut inst;
    // Every request admitted ends exactly once (none lost, none run twice), and once every
    // migration has ended each instance holds only its own two files: the check panics
    // otherwise, so a summary printed below says 0 lost and 0 files left.
    check_exactly_once(
        &redis,
        &mut [a, b],
        Duration::from_secs(120 + if soak { rounds as u64 } else { 0 }),
    );
    eprintln!(
        "{}",
        serde_json::json!({
            "soak": soak, "seed": seed, "rounds": rounds, "seconds": seconds,
            "faults": injected, "moved": moved, "requests": requests, "lost": 0, "twice": 0,
            "files_start": files_start, "files_max": files_max, "files_end": files_end,
            "files_left_after_settling": 0,
            "rss_kib_start": rss_start, "rss_kib_end": rss_end, "rss_kib_max": rss_max,
        })
    );
}

fn abort(
    rt: &tokio::runtime::Runtime,
    at: &Instance,
    ids: &[String],
    migrating_in: bool,
) -> String {
    use llumlet_proto::llumlet::{AbortMigrateInRequest, AbortRequests};
    rt.block_on(async {
        let mut c = grpc_client(at.rpc, Duration::from_secs(10)).await;
        let r = if migrating_in {
            c.abort_migrate_in(AbortMigrateInRequest {
                request_ids: ids.to_vec(),
                ..Default::default()
            })
            .await
        } else {
            c.abort(AbortRequests {
                request_ids: ids.to_vec(),
            })
            .await
        };
        match r {
            Ok(r) => r.into_inner().message,
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        }
    })
}

#[test]
fn abort_reaches_the_engine_for_its_own_and_for_migrated_in_requests() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src = Instance::start(&redis, "ab-src", SimOpts::new(51, 3), &[]);
    let mut dst = Instance::start(&redis, "ab-dst", SimOpts::new(52, 0), &[]);
    status(&redis, "ab-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    dst.wait_attached(&redis);
    // One of the source's own requests.
    let own = src
        .ids_in_state(RequestState::Running)
        .pop()
        .expect("a running request");
    let msg = abort(&rt, &src, &[own.clone(), "nobody".into()], false);
    assert_eq!(msg, format!("Requests ['{own}', 'nobody'] aborted."));
    until(
        Duration::from_secs(5),
        "the engine to abort it",
        || src.events("aborted ").contains(&own),
        || src.logs(),
    );
    // A request that migrated in.
    let (ok, m) = migrate(&rt, &src, "ab-dst", dst.transfer_port());
    assert!(ok, "{m}");
    let moved = dst.events("migrated-in ").pop().unwrap();
    abort(&rt, &dst, std::slice::from_ref(&moved), false);
    until(
        Duration::from_secs(5),
        "the destination to abort it",
        || dst.events("aborted ").contains(&moved),
        || dst.logs(),
    );
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}

#[test]
fn abort_migrate_in_drops_the_reservation_and_the_source_keeps_the_request() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src = Instance::start(&redis, "ami-src", SimOpts::new(53, 3), &[]);
    // The destination stalls before its engine commits: the request sits there migrating in.
    let mut dst = Instance::start(
        &redis,
        "ami-dst",
        SimOpts::new(54, 0),
        &[("LLUMLET_TEST_FAULTS", "dst-before-commit=hang")],
    );
    status(&redis, "ami-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    dst.wait_attached(&redis);
    let port = dst.transfer_port();
    let src_ref = &src;
    std::thread::scope(|sc| {
        let call = sc.spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            migrate(&rt, src_ref, "ami-dst", port)
        });
        let mut incoming = Vec::new();
        until(
            Duration::from_secs(10),
            "a request migrating in",
            || {
                incoming = dst.ids_in_state(RequestState::MigratingIn);
                !incoming.is_empty()
            },
            || dst.logs(),
        );
        let msg = abort(&rt, &dst, &incoming, true);
        assert!(
            msg.starts_with("AbortMigrateIn request processed successfully."),
            "{msg}"
        );
        until(
            Duration::from_secs(5),
            "the reservation to go",
            || dst.events("aborted-in ").contains(&incoming[0]),
            || dst.logs(),
        );
        let (ok, m) = call.join().unwrap();
        assert!(!ok, "the commit was refused, so nothing moved: {m}");
    });
    assert!(dst.events("migrated-in ").is_empty(), "{}", dst.logs());
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}

/// A device-to-device copy that fails midway (the test double fails every copy after the
/// first in the source llumlet): the migration aborts naming the failed call, the destination
/// frees what it reserved, and the request goes on at the source, exactly once.
#[test]
fn a_gpu_copy_that_fails_midway_aborts_and_the_request_stays() {
    if !llumlet_tests::fake_cuda() {
        eprintln!("skipped: a real GPU does not fail on demand (LLUMLET_TEST_CUDA=real)");
        return;
    }
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gpu = |seed| SimOpts {
        gpu: true,
        ..SimOpts::new(seed, 3)
    };
    let mut src = Instance::start(
        &redis,
        "gpuf-src",
        gpu(31),
        &[("LLUMLET_FAKE_CUDA_FAIL_COPY_AFTER", "1")],
    );
    let mut dst = Instance::start(&redis, "gpuf-dst", gpu(32), &[]);
    status(&redis, "gpuf-src", Duration::from_secs(15), |s| {
        s.num_running_requests >= 2
    });
    dst.wait_attached(&redis);
    let port = kvt_port(&redis, "gpuf-dst");
    let (ok, msg) = migrate(&rt, &src, "gpuf-dst", port);
    assert!(!ok, "{msg}\n{}", src.logs());
    let log = src.llumlet.stderr();
    assert!(
        log.contains("cuMemcpyDtoDAsync_v2: unspecified launch failure"),
        "{msg}\n{log}"
    );
    assert!(dst.events("migrated-in ").is_empty(), "{}", dst.logs());
    check_exactly_once(&redis, &mut [&mut src, &mut dst], Duration::from_secs(40));
}
