//! Helpers for the migration tests: a simulated engine and its llumlet as one instance, the
//! engines' event lines, `Migrate` calls, and the end-of-run invariants.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};
use llumlet_dataplane::segment::{Attach, ControlSegment};
use llumlet_proto::cms::{InstanceMetadata, InstanceStatus};
use llumlet_proto::llumlet::migrate_request::MigrationValue;
use llumlet_proto::llumlet::MigrateRequest;
use prost::Message;

use crate::{base_env, free_port, grpc_client_at, LlumletProcess, RedisServer};

/// How a simulated engine runs.
#[derive(Debug, Clone)]
pub struct SimOpts {
    /// Request generator seed.
    pub seed: u64,
    /// Requests admitted.
    pub requests: u32,
    /// Output tokens per request.
    pub max_tokens: u32,
    /// KV blocks.
    pub num_blocks: u32,
    /// Largest prompt.
    pub max_prompt: u32,
    /// `LLUMLET_TEST_FAULTS` of the engine.
    pub faults: Option<String>,
    /// Steps between two admissions (1: one per step).
    pub admit_every: u32,
    /// The KV cache on the GPU (`--kv gpu`): under the test double of the driver unless
    /// `LLUMLET_TEST_CUDA=real`. `LLUMLET_TEST_KV=gpu` sets it for the whole suite.
    pub gpu: bool,
}

impl SimOpts {
    /// `requests` requests of 700 output tokens, seed `seed`.
    pub fn new(seed: u64, requests: u32) -> SimOpts {
        SimOpts {
            seed,
            requests,
            max_tokens: 700,
            num_blocks: 512,
            max_prompt: 200,
            faults: None,
            admit_every: 1,
            gpu: std::env::var("LLUMLET_TEST_KV").is_ok_and(|v| v == "gpu"),
        }
    }
}

/// Spawns `llumlet sim-engine` publishing to segment `shm`.
pub fn engine(shm: &str, o: &SimOpts) -> LlumletProcess {
    engine_in(&[], shm, o)
}

/// [`engine`], run through `wrap` (on another host: [`crate::netns::TwoHosts::wrap`]).
pub fn engine_in(wrap: &[String], shm: &str, o: &SimOpts) -> LlumletProcess {
    let v = [
        o.seed,
        o.requests.into(),
        o.max_tokens.into(),
        o.num_blocks.into(),
        o.max_prompt.into(),
        o.admit_every.into(),
    ]
    .map(|n| n.to_string());
    let args = [
        "sim-engine",
        "--instance-id",
        "x",
        "--shm",
        shm,
        "--step-ms",
        "4",
        "--block-size",
        "16",
        "--seed",
        &v[0],
        "--requests",
        &v[1],
        "--max-tokens",
        &v[2],
        "--num-blocks",
        &v[3],
        "--max-prompt",
        &v[4],
        "--admit-every",
        &v[5],
        "--kv",
        if o.gpu { "gpu" } else { "host" },
    ];
    let mut env = HashMap::new();
    if let Some(f) = &o.faults {
        env.insert("LLUMLET_TEST_FAULTS".to_string(), f.clone());
    }
    if o.gpu {
        env.extend(crate::cuda_env());
    }
    LlumletProcess::spawn_in(wrap, &args, &env)
}

/// A simulated engine with its llumlet.
pub struct Instance {
    /// Instance id.
    pub id: String,
    /// The engine process.
    pub engine: LlumletProcess,
    /// The llumlet process.
    pub llumlet: LlumletProcess,
    /// The llumlet's gRPC port.
    pub rpc: u16,
    /// The engine's options.
    pub opts: SimOpts,
    env: HashMap<String, String>,
    /// Stdout of engines and stderr of llumlets this instance had before a restart.
    pub earlier_logs: String,
    /// Where the instance runs (empty: here).
    wrap: Vec<String>,
    /// Its /dev/shm, as this process sees it.
    shm_dir: PathBuf,
    /// The address its gRPC service is reached at.
    pub rpc_host: String,
    /// The address its transfer endpoint is reached at by other instances.
    pub transfer_ip: String,
}

/// Where an instance runs when not on this host's namespaces: a host of
/// [`crate::netns::TwoHosts`].
pub struct Placement {
    /// The command prefix that runs a program there.
    pub wrap: Vec<String>,
    /// Its /dev/shm as the test sees it.
    pub shm_dir: PathBuf,
    /// Its management address (gRPC).
    pub mgmt_ip: String,
    /// Its data-link address (transfer connections).
    pub data_ip: String,
    /// Where it reaches Redis.
    pub redis_ip: String,
}

impl Placement {
    /// Host `h` of `hosts`.
    pub fn on(hosts: &crate::netns::TwoHosts, h: usize) -> Placement {
        Placement {
            wrap: hosts.wrap(h),
            shm_dir: hosts.shm_dir(h),
            mgmt_ip: hosts.mgmt[h].clone(),
            data_ip: hosts.data[h].clone(),
            redis_ip: hosts.bridge_ip.clone(),
        }
    }
}

impl Instance {
    /// Starts an engine and its llumlet (`extra`: more llumlet environment).
    pub fn start(redis: &RedisServer, id: &str, opts: SimOpts, extra: &[(&str, &str)]) -> Instance {
        Instance::start_on(redis, id, opts, extra, None)
    }

    /// [`Instance::start`] on another host (`None`: this one).
    pub fn start_on(
        redis: &RedisServer,
        id: &str,
        opts: SimOpts,
        extra: &[(&str, &str)],
        at: Option<Placement>,
    ) -> Instance {
        let shm = format!("llumlet-ctl-test-{id}-{}", std::process::id());
        let wrap = at.as_ref().map(|p| p.wrap.clone()).unwrap_or_default();
        let engine = engine_in(&wrap, &shm, &opts);
        let rpc = free_port();
        let mut env = base_env(redis, id, rpc);
        if let Some(p) = &at {
            env.insert("LLUMNIX_CMS_REDIS_ADDRESS".into(), p.redis_ip.clone());
            env.insert("LLUMLET_HOST_IP".into(), p.data_ip.clone());
        }
        env.insert("LLUMLET_ENGINE_SHM".into(), shm);
        env.insert("LLUMNIX_MAX_REQ_MIG_OUT".into(), "4".into());
        env.insert("LLUMNIX_MAX_REQ_MIG_IN".into(), "4".into());
        // A fixed transfer port, so that a restarted llumlet is found where it was.
        env.insert("LLUMLET_TRANSFER_PORT".into(), free_port().to_string());
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        // The whole suite can run over another transport: LLUMLET_TEST_TRANSPORT=ucx overrides
        // every instance's choice (UCX's own UCX_* settings pass through).
        if let Ok(t) = std::env::var("LLUMLET_TEST_TRANSPORT") {
            env.insert("LLUMLET_TRANSPORT".into(), t);
        }
        // ... and with every transfer connection encrypted: LLUMLET_TEST_ENCRYPT=1.
        if let Ok(v) = std::env::var("LLUMLET_TEST_ENCRYPT") {
            env.entry("LLUMLET_TRANSFER_ENCRYPT".into()).or_insert(v);
        }
        for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("UCX_")) {
            env.entry(k).or_insert(v);
        }
        if opts.gpu {
            env.extend(crate::cuda_env());
        }
        let llumlet = LlumletProcess::spawn_in(&wrap, &[], &env);
        Instance {
            id: id.into(),
            engine,
            llumlet,
            rpc,
            opts,
            env,
            earlier_logs: String::new(),
            wrap,
            shm_dir: at
                .as_ref()
                .map_or_else(|| PathBuf::from("/dev/shm"), |p| p.shm_dir.clone()),
            rpc_host: at
                .as_ref()
                .map_or_else(|| "127.0.0.1".into(), |p| p.mgmt_ip.clone()),
            transfer_ip: at.map_or_else(|| "127.0.0.1".into(), |p| p.data_ip),
        }
    }

    /// Whether the running llumlet was started with `LLUMLET_TEST_FAULTS`.
    pub fn env_has_faults(&self) -> bool {
        self.env.contains_key("LLUMLET_TEST_FAULTS")
    }

    /// The ids of the requests in state `state` in the engine's request table.
    pub fn ids_in_state(&self, state: RequestState) -> Vec<String> {
        let path = self.shm_dir.join(&self.env["LLUMLET_ENGINE_SHM"]);
        let Ok(Attach::Ready(seg)) = ControlSegment::attach(&path) else {
            return Vec::new();
        };
        let mut blocks = Vec::new();
        (0..MAX_REQUESTS as u32)
            .filter_map(|s| read_request(seg.requests(), s, &mut blocks).ok().flatten())
            .filter(|r| r.state() == Some(state))
            .filter_map(|r| r.id.as_str().map(str::to_string))
            .collect()
    }

    /// Waits until the llumlet reports its engine's status (attached to the engine).
    /// (A status written from now on: a restarted llumlet's predecessor's status does not count.)
    pub fn wait_attached(&self, redis: &RedisServer) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let key = format!("llumnix:instance_status:{}", self.id);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = redis
                .get(&key)
                .and_then(|b| InstanceStatus::decode(&b[..]).ok());
            if s.is_some_and(|s| s.num_total_gpu_tokens > 0 && s.timestamp_ms > now) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{key}: no status from the llumlet within 15 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The files in /dev/shm beside the engine's control segment whose names go on with `rest`
    /// (`-mig-in-`: the destination's records of committed migrations in).
    pub fn segment_files(&self, rest: &str) -> Vec<String> {
        let prefix = format!("{}{rest}", self.env["LLUMLET_ENGINE_SHM"]);
        std::fs::read_dir(&self.shm_dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The files in /dev/shm beside the control segment other than its own and its KV cache's.
    pub fn leftover_files(&self) -> Vec<String> {
        let shm = &self.env["LLUMLET_ENGINE_SHM"];
        let own = [shm.clone(), format!("{shm}-kv")];
        self.segment_files("")
            .into_iter()
            .filter(|n| !own.contains(n))
            .collect()
    }

    /// The transfer port (published as `kvt_port`).
    pub fn transfer_port(&self) -> i32 {
        self.env["LLUMLET_TRANSFER_PORT"].parse().unwrap()
    }

    /// Kills the llumlet (if alive) and starts a new one with the same environment, without
    /// `LLUMLET_TEST_FAULTS`.
    pub fn restart_llumlet(&mut self) {
        self.restart_llumlet_with(None);
    }

    /// Kills the llumlet (if alive) and starts a new one with `LLUMLET_TEST_FAULTS=faults`.
    pub fn restart_llumlet_with(&mut self, faults: Option<&str>) {
        let _ = self.llumlet.child.kill();
        let _ = self.llumlet.child.wait();
        self.earlier_logs.push_str(&self.llumlet.stderr());
        match faults {
            Some(f) => self.env.insert("LLUMLET_TEST_FAULTS".into(), f.into()),
            None => self.env.remove("LLUMLET_TEST_FAULTS"),
        };
        self.llumlet = LlumletProcess::spawn_in(&self.wrap, &[], &self.env);
    }

    /// The engine's event lines `prefix <id> ...`: the ids.
    pub fn events(&self, prefix: &str) -> Vec<String> {
        ids_with(&self.engine.stdout(), prefix)
    }

    /// Both processes' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} engine:\n{}\n--- {} llumlet:\n{}{}",
            self.id,
            self.engine.stdout(),
            self.id,
            self.earlier_logs,
            self.llumlet.stderr()
        )
    }

    /// Stops the engine with SIGTERM and returns its summary line (free blocks, requests held).
    pub fn stop_engine(&mut self) -> String {
        self.engine.signal(libc::SIGTERM);
        self.engine.wait(Duration::from_secs(10));
        self.engine
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("sim-engine: stopped "))
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Instance {
    /// Stops both processes, then removes the engine's files in /dev/shm (segment, KV cache,
    /// mailboxes, journals and records).
    fn drop(&mut self) {
        for p in [&mut self.llumlet, &mut self.engine] {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        crate::remove_shm_files(&self.env["LLUMLET_ENGINE_SHM"]);
    }
}

/// Waits for the instance's CMS status to satisfy `f`.
pub fn status(
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

/// The instance's published `kvt_port` (checks `ip_kvt` too).
pub fn kvt_port(redis: &RedisServer, id: &str) -> i32 {
    let m = redis.wait_for(
        &format!("llumnix:instance_metadata:{id}"),
        Duration::from_secs(10),
        |b| b.map(|b| InstanceMetadata::decode(b).unwrap()),
    );
    assert!(m.kvt_port > 0, "the transfer endpoint is published");
    assert_eq!(m.ip_kvt, "127.0.0.1");
    m.kvt_port
}

/// The ids of lines `sim-engine: <prefix><id> ...` in `out`.
pub fn ids_with(out: &str, prefix: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("sim-engine: ")?.strip_prefix(prefix))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect()
}

/// `Migrate` one request (`NUM_REQ` 1, `SR`) from `src` to instance `dst_id`'s transfer port:
/// `(success, message)`, or `(false, "<code>: <message>")` for an error status.
pub fn migrate(
    rt: &tokio::runtime::Runtime,
    src: &Instance,
    dst_id: &str,
    port: i32,
) -> (bool, String) {
    migrate_via(rt, src, dst_id, "127.0.0.1", port)
}

/// [`migrate`] to the destination's transfer endpoint at `ip:port`.
pub fn migrate_via(
    rt: &tokio::runtime::Runtime,
    src: &Instance,
    dst_id: &str,
    ip: &str,
    port: i32,
) -> (bool, String) {
    rt.block_on(async {
        let mut c = grpc_client_at(&src.rpc_host, src.rpc, Duration::from_secs(10)).await;
        let r = c
            .migrate(MigrateRequest {
                src_engine_id: src.id.clone(),
                dst_engine_id: dst_id.to_string(),
                dst_engine_ip: ip.into(),
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

/// Polls `f` every 50 ms until it holds; panics with `what` (and `logs()`) after `within`.
pub fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The invariants after a run in which every instance admitted `opts.requests` requests and
/// any migrations happened: every request finishes (or is aborted) exactly once, at the instance where it went
/// last, with the token stream of an unmigrated run; every arrival carried identical KV bytes;
/// once the engines stop, every block is free and no request is held (no leaked reservation,
/// nothing left suspended). Waits up to `within` for the requests to finish.
pub fn check_exactly_once(redis: &RedisServer, instances: &mut [&mut Instance], within: Duration) {
    let total: u32 = instances.iter().map(|i| i.opts.requests).sum();
    let logs = |is: &[&mut Instance]| is.iter().map(|i| i.logs()).collect::<String>();
    let deadline = Instant::now() + within;
    loop {
        // A request ends by finishing or by being aborted (gRPC `Abort`).
        let finished: usize = instances
            .iter()
            .map(|i| i.events("finished ").len() + i.events("aborted ").len())
            .sum();
        if finished as u32 >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {finished} of {total} requests finished\n{}",
            logs(instances)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Run over another transport (LLUMLET_TEST_TRANSPORT), every finished migration used it; a
    // GPU KV cache (LLUMLET_TEST_KV=gpu) always moves over cuda.
    let gpu = std::env::var("LLUMLET_TEST_KV").is_ok_and(|v| v == "gpu");
    let forced = std::env::var("LLUMLET_TEST_TRANSPORT").ok();
    if let Some(t) = if gpu {
        Some("cuda".to_string())
    } else {
        forced
    } {
        let all = logs(instances);
        let want = format!("transport=\"{t}\"");
        for l in all
            .lines()
            .filter(|l| l.contains("migration out finished") && l.contains("outcome=Migrated"))
        {
            assert!(l.contains(&want), "not over {t}: {l}");
        }
    }
    // Run encrypted (LLUMLET_TEST_ENCRYPT=1), every llumlet said so.
    if std::env::var("LLUMLET_TEST_ENCRYPT").is_ok_and(|v| v == "1") {
        for i in instances.iter() {
            assert!(
                i.logs().contains("authenticated and encrypted"),
                "{} does not encrypt\n{}",
                i.id,
                i.logs()
            );
        }
    }
    let mut seen = HashMap::new();
    for i in instances.iter() {
        let out = i.engine.stdout();
        for l in out.lines().filter(|l| {
            l.starts_with("sim-engine: finished ") || l.starts_with("sim-engine: aborted ")
        }) {
            let id = l.split_whitespace().nth(2).unwrap().to_string();
            assert!(
                !l.contains("migrated_in=true") || l.contains("tokens=ok"),
                "{l}\n{}",
                logs(instances)
            );
            if let Some(other) = seen.insert(id.clone(), i.id.clone()) {
                panic!("{id} ended at {other} and at {}\n{}", i.id, logs(instances));
            }
        }
        for l in out
            .lines()
            .filter(|l| l.starts_with("sim-engine: migrated-in "))
        {
            assert!(
                l.contains("kv=ok") && l.contains("tokens=ok"),
                "{l}\n{}",
                logs(instances)
            );
        }
    }
    assert_eq!(seen.len() as u32, total, "{}", logs(instances));
    // Every migration slot is free again, as the CMS shows it.
    for i in instances.iter() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = redis
                .get(&format!("llumnix:instance_status:{}", i.id))
                .map(|b| InstanceStatus::decode(&b[..]).unwrap())
                .unwrap_or_default();
            if s.num_available_migrate_in_slots == 4 && s.num_available_migrate_out_slots == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: migration slots not released: {s:?}\n{}",
                i.id,
                i.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Every migration a llumlet journaled (dead owner, or in doubt) is settled.
    for i in instances.iter() {
        let seg = format!("{}-mig-", i.env["LLUMLET_ENGINE_SHM"]);
        let pending = || -> Vec<String> {
            i.segment_files("-mig-")
                .into_iter()
                .filter(|n| n.starts_with(&seg) && n.ends_with(".out"))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pending().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{}: unsettled migration journals {:?}\n{}",
                i.id,
                pending(),
                i.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Every destination's record of a commit is retired by its source, on the migration's
    // connection or, after settling through `Resolve`, on one of its own: none is left to
    // expire by age (what a soak would otherwise pile up).
    for i in instances.iter() {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !i.segment_files("-mig-in-").is_empty() {
            assert!(
                Instant::now() < deadline,
                "{}: migration-in records left {:?}\n{}",
                i.id,
                i.segment_files("-mig-in-"),
                logs(instances)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Nor anything else: once every migration has ended, an instance's files in /dev/shm are its
    // control segment's and its KV cache's locators (no mailbox, journal or temporary file).
    for i in instances.iter() {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = i.leftover_files();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: files left {left:?}\n{}",
                i.id,
                logs(instances)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for i in instances.iter_mut() {
        let summary = i.stop_engine();
        let want = format!(
            "free_blocks={n} of {n} running=0 waiting=0 suspended=0 incoming=0",
            n = i.opts.num_blocks
        );
        assert_eq!(
            summary,
            want,
            "{}: engine state at the end\n{}",
            i.id,
            i.logs()
        );
    }
}
