//! The shared-memory status path end to end: `llumlet sim-engine` and `llumlet` as separate
//! processes, a real `redis-server`, the engine's status ring in /dev/shm.

use std::collections::HashMap;
use std::time::Duration;

use llumlet_proto::cms::InstanceStatus;
use llumlet_tests::*;
use prost::Message;

fn status(b: Option<&[u8]>) -> Option<InstanceStatus> {
    b.map(|b| InstanceStatus::decode(b).unwrap())
}

fn engine(shm: &str, seed: u64, requests: u32) -> LlumletProcess {
    let args = [
        "sim-engine",
        "--instance-id",
        "ring",
        "--shm",
        shm,
        "--max-tokens",
        "900",
        "--step-ms",
        "5",
        "--num-blocks",
        "64",
        "--block-size",
        "16",
        "--max-prompt",
        "100",
    ];
    let (seed, requests) = (seed.to_string(), requests.to_string());
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["--seed", &seed, "--requests", &requests]);
    LlumletProcess::spawn_args(&a, &HashMap::new())
}

#[test]
fn sim_engine_status_reaches_the_cms_and_engine_faults_are_reported() {
    let redis = RedisServer::start();
    let shm = format!("llumlet-ctl-test-ring-{}", std::process::id());
    let _cleanup = ShmCleanup(shm.clone());
    let mut eng = engine(&shm, 1, 6);
    let mut env = base_env(&redis, "ring", free_port());
    env.insert("LLUMLET_ENGINE_SHM".into(), shm.clone());
    env.insert("LLUMNIX_ENGINE_GET_STATUS_TIMEOUT".into(), "0.5".into());
    let mut llumlet = LlumletProcess::spawn(&env);
    let key = "llumnix:instance_status:ring";
    let meta = "llumnix:instance_metadata:ring";

    // The engine's numbers arrive in the CMS: 64 blocks × 16 tokens, 6 requests admitted, the
    // ones that fit running, the rest waiting (with their ids).
    let s = redis.wait_for(key, Duration::from_secs(10), |b| {
        status(b).filter(|s| s.num_running_requests + s.num_waiting_requests == 6)
    });
    assert_eq!(s.num_total_gpu_tokens, 1024);
    assert!(s.schedulable);
    assert!(s.num_used_gpu_tokens > 0 && s.num_used_gpu_tokens <= 1024);
    assert_eq!(
        s.waiting_requests.len() as i32,
        s.num_waiting_requests.min(8)
    );
    assert!(s.waiting_requests.iter().all(|id| id.starts_with("sim-1-")));
    assert_eq!(s.instance_id, "ring");
    let first_step = s.step_id;
    let s = redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|s| s.step_id > first_step + 10)
    });
    assert!(s.update_id > 1);

    // SIGSTOP: no new status → unschedulable within the timeout, metadata still there.
    eng.signal(libc::SIGSTOP);
    let stalled = redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|s| !s.schedulable)
    });
    assert!(
        redis.get(meta).is_some(),
        "the heartbeat does not wait on the engine"
    );
    // SIGCONT: the first new status flips it back.
    eng.signal(libc::SIGCONT);
    let back = redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|s| s.schedulable)
    });
    assert!(back.update_id > stalled.update_id);

    // Engine killed: the llumlet notices the writer is gone and reports it.
    eng.signal(libc::SIGKILL);
    eng.wait(Duration::from_secs(5));
    redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|s| !s.schedulable)
    });
    let log = llumlet.stderr();
    assert!(log.contains("the engine process is gone"), "{log}");

    // Engine restarted (its stale segment is proven dead and replaced): the llumlet re-attaches.
    // 30 requests of up to 7 blocks cannot all fit in 64 blocks: some wait, with ids of seed 2.
    let mut eng2 = engine(&shm, 2, 30);
    redis.wait_for(key, Duration::from_secs(10), |b| {
        status(b).filter(|s| {
            s.schedulable && s.waiting_requests.iter().any(|id| id.starts_with("sim-2-"))
        })
    });
    assert!(
        llumlet.stderr().contains("re-attaching")
            || llumlet
                .stderr()
                .matches("attached to the engine's status ring")
                .count()
                >= 2
    );

    // Llumlet killed and restarted: the new one attaches to the running engine.
    llumlet.signal(libc::SIGKILL);
    llumlet.wait(Duration::from_secs(5));
    let _: () = redis::cmd("DEL").arg(key).query(&mut redis.conn()).unwrap();
    let llumlet2 = LlumletProcess::spawn(&env);
    let s = redis.wait_for(key, Duration::from_secs(10), |b| {
        status(b).filter(|s| s.schedulable)
    });
    assert_eq!(s.num_total_gpu_tokens, 1024);
    assert!(llumlet2
        .stderr()
        .contains("attached to the engine's status ring"));
    assert!(
        llumlet2
            .stderr()
            .contains("mapped the engine's host KV cache regions=4"),
        "{}",
        llumlet2.stderr()
    );

    eng2.signal(libc::SIGTERM);
    assert_eq!(eng2.wait(Duration::from_secs(5)).code(), Some(0));
    assert!(
        !std::path::Path::new("/dev/shm").join(&shm).exists(),
        "the engine removes its segment on exit"
    );
}

#[test]
fn pull_mode_asks_the_engine_over_the_command_queue() {
    let redis = RedisServer::start();
    let shm = format!("llumlet-ctl-test-pull-{}", std::process::id());
    let _cleanup = ShmCleanup(shm.clone());
    let mut env = base_env(&redis, "pull", free_port());
    env.insert("LLUMLET_ENGINE_SHM".into(), shm.clone());
    env.insert("LLUMNIX_UPDATE_INSTANCE_STATUS_MODE".into(), "PULL".into());
    env.insert("LLUMNIX_ENGINE_GET_STATUS_TIMEOUT".into(), "1".into());
    // The engine in pull mode publishes only when asked.
    let eng = LlumletProcess::spawn_args(
        &[
            "sim-engine",
            "--instance-id",
            "pull",
            "--shm",
            &shm,
            "--status-mode",
            "pull",
            "--requests",
            "3",
            "--step-ms",
            "5",
        ],
        &HashMap::new(),
    );
    let _llumlet = LlumletProcess::spawn(&env);
    let key = "llumnix:instance_status:pull";
    let s = redis.wait_for(key, Duration::from_secs(10), |b| {
        status(b).filter(|s| s.num_running_requests == 3)
    });
    assert!(s.schedulable);
    // Statuses keep coming, one per request: update ids advance.
    let later = redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|x| x.update_id > s.update_id + 3)
    });
    assert!(later.step_id > s.step_id);
    // An engine that stops answering is unschedulable within the timeout.
    eng.signal(libc::SIGSTOP);
    redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|s| !s.schedulable)
    });
    eng.signal(libc::SIGCONT);
    redis.wait_for(key, Duration::from_secs(5), |b| {
        status(b).filter(|s| s.schedulable)
    });
}

#[test]
fn request_table_is_visible_across_processes() {
    use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};
    use llumlet_dataplane::segment::{segment_path, Attach, ControlSegment};

    let shm = format!("llumlet-ctl-test-table-{}", std::process::id());
    let _cleanup = ShmCleanup(shm.clone());
    // Room for every request at full length: no preemption, so a snapshot has no block twice.
    let eng = LlumletProcess::spawn_args(
        &[
            "sim-engine",
            "--instance-id",
            "table",
            "--shm",
            &shm,
            "--requests",
            "4",
            "--step-ms",
            "2",
            "--num-blocks",
            "1024",
            "--max-prompt",
            "100",
            "--max-tokens",
            "900",
        ],
        &HashMap::new(),
    );
    let path = segment_path(&shm);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seg = loop {
        if let Ok(Attach::Ready(s)) = ControlSegment::attach(&path) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "engine segment never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // The KV cache, found through the registry, mapped in this process.
    use llumlet_dataplane::kv::MappedRegion;
    use llumlet_tools::sim::{fill_token_kv, request_seed};
    let regions: Vec<MappedRegion> = seg
        .kv()
        .regions()
        .into_iter()
        .map(|r| MappedRegion::map(&r.unwrap()).unwrap())
        .collect();
    assert_eq!(regions.len(), 4, "one region per layer");
    let (block_bytes, token_bytes) = (
        regions[0].region().block_size_bytes as usize,
        regions[0].region().token_size_bytes as usize,
    );
    assert_eq!(
        (block_bytes, token_bytes),
        (16 * 512, 512),
        "2 (K,V) × 2 heads × 64 × fp16, 16 tokens a block"
    );
    let mut block_buf = vec![0u8; block_bytes];
    let mut expect = vec![0u8; token_bytes];
    let mut verified_tokens = 0u64;
    let mut blocks = Vec::new();
    let mut last_outputs = HashMap::new();
    for _ in 0..20 {
        let mut seen_blocks = std::collections::HashSet::new();
        let mut running = 0;
        for slot in 0..MAX_REQUESTS as u32 {
            let Some(r) = read_request(seg.requests(), slot, &mut blocks).unwrap() else {
                continue;
            };
            let id = r.id.as_str().unwrap().to_string();
            assert!(id.starts_with("sim-0-"), "{id}");
            if r.state() == Some(RequestState::Running) {
                running += 1;
                assert_eq!(blocks.len() as u32, r.num_blocks);
                assert!(
                    r.num_blocks * 16 >= r.prompt_tokens + r.output_tokens,
                    "tokens fit the blocks"
                );
                for b in &blocks {
                    assert!(*b < 1024);
                    assert!(seen_blocks.insert(*b), "block {b} held by two requests");
                }
                // Every token's KV bytes in every layer are the deterministic ones.
                let seed = request_seed(&id);
                for pos in 0..(r.prompt_tokens + r.output_tokens) {
                    let block = blocks[(pos / 16) as usize];
                    for (layer, region) in regions.iter().enumerate() {
                        assert!(region.read_block(u64::from(block), &mut block_buf));
                        fill_token_kv(seed, u64::from(pos), layer as u32, &mut expect);
                        let at = (pos % 16) as usize * token_bytes;
                        assert!(
                            block_buf[at..at + token_bytes] == expect[..],
                            "{id}: KV of token {pos}, layer {layer} differs"
                        );
                        verified_tokens += 1;
                    }
                }
                let prev = last_outputs.insert(id, r.output_tokens).unwrap_or(0);
                assert!(r.output_tokens >= prev, "output only grows");
            }
        }
        assert!(running <= 4);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(last_outputs.len(), 4, "all four requests ran");
    assert!(last_outputs.values().all(|o| *o > 0));
    assert!(
        verified_tokens > 1000,
        "checked {verified_tokens} token slots"
    );
    drop(eng);
}

/// Whatever is done to the engine's files in /dev/shm, the llumlet neither crashes nor hangs,
/// reports the instance unschedulable when the engine is gone or its segment overwritten (here
/// with an engine timeout of 30 s, so only the llumlet's own checks can do it within the
/// waits), and attaches to the next healthy engine. The attacks of issue 14, against the real
/// binaries.
#[test]
fn a_damaged_segment_never_crashes_the_llumlet() {
    use llumlet_dataplane::sealed::{Found, Locator};
    use std::os::unix::fs::FileExt;
    let redis = RedisServer::start();
    let shm = format!("llumlet-ctl-test-damage-{}", std::process::id());
    let _cleanup = ShmCleanup(shm.clone());
    let path = std::path::Path::new("/dev/shm").join(&shm);
    let mut env = base_env(&redis, "ring", free_port());
    env.insert("LLUMLET_ENGINE_SHM".into(), shm.clone());
    env.insert("LLUMNIX_ENGINE_GET_STATUS_TIMEOUT".into(), "30".into());
    let key = "llumnix:instance_status:ring";
    let mut eng = engine(&shm, 1, 6);
    let mut llumlet = LlumletProcess::spawn(&env);
    let progressing = |from: i64| {
        redis.wait_for(key, Duration::from_secs(10), |b| {
            status(b).filter(|s| s.schedulable && i64::from(s.step_id) > from + 20)
        })
    };
    let unschedulable = || {
        redis.wait_for(key, Duration::from_secs(5), |b| {
            status(b).filter(|s| !s.schedulable)
        })
    };
    let s = progressing(-1);
    let Found::Locator(loc, _) = Locator::find(&path).unwrap() else {
        panic!("no locator at {}", path.display())
    };
    assert_eq!(loc.pid, eng.pid());

    // The segment's memory cannot be truncated, through any path to it.
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(loc.proc_path())
        .unwrap();
    for len in [0, 4096, 1 << 30] {
        let e = mem.set_len(len).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({len})");
    }
    // `truncate -s 4096`, `truncate -s 0`, then the file replaced by 1 MiB of random bytes: the
    // engine and its llumlet go on as if nothing happened.
    let locator = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    locator.set_len(4096).unwrap();
    locator.set_len(0).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut junk = vec![0u8; 1 << 20];
    llumlet_dataplane::sys::random_bytes(&mut junk).unwrap();
    std::fs::write(&path, &junk).unwrap();
    let s = progressing(i64::from(s.step_id));
    assert!(llumlet.running());

    // The engine killed after that: gone is seen at once, not at the 30 s timeout.
    eng.signal(libc::SIGKILL);
    eng.wait(Duration::from_secs(5));
    unschedulable();
    assert!(llumlet.stderr().contains("the engine process is gone"));
    assert!(llumlet.running());

    // The junk is not a locator, so a new engine refuses to guess and says so; once an operator
    // removes it, the new engine starts and the llumlet attaches to it.
    let mut refused = engine(&shm, 2, 6);
    assert_ne!(refused.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(
        refused.stderr().contains("cannot be proven dead"),
        "{}",
        refused.stderr()
    );
    std::fs::remove_file(&path).unwrap();
    let mut eng2 = engine(&shm, 2, 6);
    let _ = s;
    let s = progressing(-1);

    // Random bytes over the live segment (the header first: what a stray writer with the
    // engine's rights would hit): unschedulable, and the llumlet lives.
    let Found::Locator(loc2, _) = Locator::find(&path).unwrap() else {
        panic!("no locator")
    };
    let mem2 = std::fs::OpenOptions::new()
        .write(true)
        .open(loc2.proc_path())
        .unwrap();
    let mut noise = vec![0u8; 64 << 10];
    llumlet_dataplane::sys::random_bytes(&mut noise).unwrap();
    mem2.write_all_at(&noise, 0).unwrap();
    unschedulable();
    let log = llumlet.stderr();
    assert!(log.contains("control segment was overwritten"), "{log}");
    assert!(llumlet.running());
    let _ = s;

    // That engine killed (its locator left behind, naming a dead holder): the next engine
    // replaces the stale locator and the llumlet attaches to it.
    eng2.signal(libc::SIGKILL);
    eng2.wait(Duration::from_secs(5));
    drop(mem2);
    let mut eng3 = engine(&shm, 3, 6);
    let s = progressing(-1);

    // Its locator deleted while it runs: nothing changes for the instance; the engine then
    // stopping is seen at once.
    std::fs::remove_file(&path).unwrap();
    progressing(i64::from(s.step_id));
    eng3.signal(libc::SIGTERM);
    assert_eq!(eng3.wait(Duration::from_secs(5)).code(), Some(0));
    unschedulable();
    assert!(llumlet.running());
    let log = llumlet.stderr();
    assert!(
        !log.contains("panicked") && !log.contains("SIGBUS"),
        "{log}"
    );
    drop(mem);
}
