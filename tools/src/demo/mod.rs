//! `llumlet demo`: a small local cluster that shows what llumlet-rs is for. It starts simulated
//! engines with their llumlets (separate processes, real shared memory and sockets), a CMS (the
//! embedded one, or a real Redis with `--redis-url`), feeds skewed load (most requests to the
//! first instance), and runs a simple rebalancer that reads the CMS and calls `Migrate` over gRPC
//! when one instance is much busier than another, the way the Llumnix scheduler would. At the end
//! it prints a summary (migrations, bytes, stages, downtime p50/p99, verification) and writes a
//! plot of load per instance over time with the migrations marked. The engines check every
//! migrated request's KV bytes on arrival and its token stream when it finishes; the demo exits
//! non-zero if any check failed, if a request ran twice, or if nothing migrated.

mod cms;
mod plot;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llumlet_proto::cms::{InstanceMetadata, InstanceStatus};
use llumlet_proto::llumlet::llumlet_client::LlumletClient;
use llumlet_proto::llumlet::migrate_request::MigrationValue;
use llumlet_proto::llumlet::MigrateRequest;
use prost::Message;

pub use cms::{serve_bytes, EmbeddedCms};

/// `llumlet demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated engines (each with its llumlet).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=8))]
    pub instances: u32,
    /// Seconds of load before the summary.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Use this Redis as the CMS (`redis://[user:password@]host:port`) instead of the embedded one.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Where to write the plot (SVG).
    #[arg(long, default_value = "llumlet-demo.svg")]
    pub plot: PathBuf,
    /// Engine step in milliseconds (one token per running request per step).
    #[arg(long, default_value_t = 20)]
    pub step_ms: u64,
    /// Where to keep the processes' logs (default: a new directory under the system temp dir).
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// Where the engines keep their KV caches: `host` (shared memory) or `gpu` (GPU 0, moved
    /// over CUDA IPC; feature `cuda` and a GPU).
    #[arg(long, default_value = "host")]
    pub kv: String,
    /// The engines: `sim` (the simulated engine) or `vllm` (vLLM 0.18 with the llumlet-rs
    /// adapter and a stand-in model, from the environment scripts/vllm-env.sh makes, or the
    /// python named by LLUMLET_VLLM_PYTHON).
    #[arg(long, default_value = "sim", value_parser = ["sim", "vllm"])]
    pub engine: String,
}

#[derive(Debug)]
pub(crate) struct Cms {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
}

impl Cms {
    /// The embedded CMS listening on 127.0.0.1:`port`.
    pub(crate) fn local(port: u16) -> Cms {
        Cms {
            host: "127.0.0.1".into(),
            port,
            user: None,
            password: None,
        }
    }

    /// `redis://...` for a client.
    pub(crate) fn url(&self) -> String {
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => format!("redis://{u}:{p}@{}:{}", self.host, self.port),
            (None, Some(p)) => format!("redis://:{p}@{}:{}", self.host, self.port),
            _ => format!("redis://{}:{}", self.host, self.port),
        }
    }
}

/// `redis://[user:password@]host[:port]`.
pub(crate) fn parse_redis_url(url: &str) -> Result<Cms, String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("--redis-url {url:?}: must start with redis://"))?;
    let rest = rest.trim_end_matches('/');
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("--redis-url {url:?}: bad port {p:?}"))?,
        ),
        None => (hostport, 6379),
    };
    if host.is_empty() {
        return Err(format!("--redis-url {url:?}: no host"));
    }
    let (user, password) = match auth.map(|a| a.split_once(':').unwrap_or(("", a))) {
        Some((u, p)) => (
            (!u.is_empty()).then(|| u.to_string()),
            (!p.is_empty()).then(|| p.to_string()),
        ),
        None => (None, None),
    };
    Ok(Cms {
        host: host.to_string(),
        port,
        user,
        password,
    })
}

/// A child process killed (and reaped) on drop; its output goes to a file.
pub(crate) struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, log: PathBuf, stdout: bool) -> std::io::Result<Proc> {
        let f = std::fs::File::create(&log)?;
        let (out, err) = if stdout {
            (Stdio::from(f), Stdio::null())
        } else {
            (Stdio::null(), Stdio::from(f))
        };
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        Ok(Proc { child, log })
    }

    pub(crate) fn terminate(&mut self, within: Duration) {
        // Reaped already: its pid may belong to another process by now.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, which is not reaped (checked above), so it
        // cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A simulated engine and its llumlet. Dropping it stops both and removes what they left in
/// /dev/shm (the control segment is this run's alone, so are the llumlet's migration records
/// and mailboxes named after it).
pub(crate) struct Instance {
    pub(crate) id: String,
    pub(crate) engine: Proc,
    pub(crate) llumlet: Proc,
    shm: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        for p in [&mut self.llumlet, &mut self.engine] {
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        if let Ok(rd) = std::fs::read_dir(llumlet_dataplane::segment::SHM_DIR) {
            for e in rd.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(&self.shm) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// One load sample of one instance.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    /// (used + waiting tokens) / total tokens.
    pub load: f64,
    /// Running requests.
    pub running: i32,
    /// Waiting requests.
    pub waiting: i32,
}

/// One `Migrate` call.
#[derive(Debug, Clone)]
pub struct Call {
    /// Seconds since the start (when it was sent).
    pub t: f64,
    /// Source index.
    pub src: usize,
    /// Destination index.
    pub dst: usize,
    /// The answer.
    pub ok: bool,
    /// Its message.
    pub message: String,
}

fn load_of(s: &InstanceStatus) -> f64 {
    let total = f64::from(s.num_total_gpu_tokens.max(1));
    f64::from(s.num_used_gpu_tokens + s.num_uncomputed_tokens_all_waiting_prefills) / total
}

fn skew(instances: u32) -> Vec<u32> {
    // Most requests to the first instance, a few to the next, none to the last.
    let n = instances as usize;
    (0..n)
        .map(|i| match i {
            0 => 36,
            _ if i == n - 1 => 0,
            1 => 8,
            _ => 3,
        })
        .collect()
}

impl Instance {
    /// Starts simulated engine `id` (with `engine_args` after its own) and its llumlet (with
    /// `llumlet_env` after the defaults here), logging to `dir`.
    pub(crate) fn spawn(
        exe: &Path,
        dir: &Path,
        cms: &Cms,
        id: String,
        engine_args: &[(&str, String)],
        llumlet_env: &[(&str, String)],
    ) -> std::io::Result<Instance> {
        let mut e = Command::new(exe);
        e.arg("sim-engine");
        Instance::spawn_with(e, exe, dir, cms, id, engine_args, llumlet_env)
    }

    /// [`Instance::spawn`] with another engine program: `engine` gets `--instance-id ID --shm
    /// SHM` and `engine_args`.
    pub(crate) fn spawn_with(
        mut e: Command,
        exe: &Path,
        dir: &Path,
        cms: &Cms,
        id: String,
        engine_args: &[(&str, String)],
        llumlet_env: &[(&str, String)],
    ) -> std::io::Result<Instance> {
        let shm = format!("llumlet-ctl-{id}-{}", std::process::id());
        e.args(["--instance-id", &id, "--shm", &shm]);
        for (k, v) in engine_args {
            e.arg(k).arg(v);
        }
        let engine = Proc::spawn(e, dir.join(format!("{id}-engine.log")), true)?;
        let mut l = Command::new(exe);
        l.arg("run").env_clear();
        // LD_LIBRARY_PATH: where the CUDA driver (or, in the tests, its test double) is.
        for k in ["PATH", "HOME", "TMPDIR", "LD_LIBRARY_PATH"] {
            if let Ok(v) = std::env::var(k) {
                l.env(k, v);
            }
        }
        for (k, v) in [
            ("LLUMLET_INSTANCE_ID", id.clone()),
            ("LLUMLET_HOST_IP", "127.0.0.1".into()),
            // Metadata only (nothing listens there in a simulated engine).
            ("LLUMNIX_VLLM_API_SERVER_PORT", "8000".into()),
            // The llumlet binds a free port itself and publishes it in its CMS metadata, which
            // is where the rebalancer finds it (no port picked here that another process could
            // take first).
            ("LLUMNIX_RPC_PORT", "-1".into()),
            ("LLUMNIX_CMS_REDIS_ADDRESS", cms.host.clone()),
            ("LLUMNIX_CMS_REDIS_PORT", cms.port.to_string()),
            ("LLUMNIX_STATUS_PUSH_INTERVAL", "0.1".into()),
            ("LLUMNIX_METADATA_PUSH_INTERVAL", "1".into()),
            ("LLUMNIX_LOGGING_LEVEL", "INFO".into()),
            ("LLUMLET_ENGINE_SHM", shm.clone()),
            ("LLUMLET_PARENT_PID", std::process::id().to_string()),
        ] {
            l.env(k, v);
        }
        if let Some(u) = &cms.user {
            l.env("LLUMNIX_CMS_REDIS_USERNAME", u);
        }
        if let Some(p) = &cms.password {
            l.env("LLUMNIX_CMS_REDIS_PASSWORD", p);
        }
        for (k, v) in llumlet_env {
            l.env(k, v);
        }
        let llumlet = Proc::spawn(l, dir.join(format!("{id}-llumlet.log")), false)?;
        Ok(Instance {
            id,
            engine,
            llumlet,
            shm,
        })
    }
}

fn spawn_instance(
    exe: &Path,
    dir: &Path,
    cms: &Cms,
    i: usize,
    requests: u32,
    a: &DemoArgs,
    vllm: Option<&VllmEnv>,
) -> std::io::Result<Instance> {
    if let Some(v) = vllm {
        let mut e = Command::new(&v.python);
        e.arg(&v.script).env("LLUMLET_FFI_LIB", &v.ffi_lib);
        let engine_args = [
            ("--model", v.model.display().to_string()),
            ("--events-dir", dir.display().to_string()),
            ("--step-ms", a.step_ms.to_string()),
            ("--seed", (i + 1).to_string()),
            // The stand-in's KV cache holds 2048 tokens: a quarter of the simulated load.
            ("--requests", requests.div_ceil(4).to_string()),
            ("--max-tokens", "200".to_string()),
        ];
        let env = [
            ("LLUMNIX_MAX_REQ_MIG_OUT", "2".to_string()),
            ("LLUMNIX_MAX_REQ_MIG_IN", "2".to_string()),
        ];
        return Instance::spawn_with(e, exe, dir, cms, format!("demo-{i}"), &engine_args, &env);
    }
    let engine_args = [
        ("--step-ms", a.step_ms.to_string()),
        ("--seed", (i + 1).to_string()),
        ("--requests", requests.to_string()),
        ("--max-tokens", "1200".to_string()),
        ("--num-blocks", "512".to_string()),
        ("--block-size", "16".to_string()),
        ("--min-prompt", "64".to_string()),
        ("--max-prompt", "256".to_string()),
        ("--kv", a.kv.clone()),
    ];
    let env = [
        ("LLUMNIX_MAX_REQ_MIG_OUT", "2".to_string()),
        ("LLUMNIX_MAX_REQ_MIG_IN", "2".to_string()),
    ];
    Instance::spawn(exe, dir, cms, format!("demo-{i}"), &engine_args, &env)
}

/// What `--engine vllm` runs the engines with.
struct VllmEnv {
    python: PathBuf,
    script: PathBuf,
    model: PathBuf,
    ffi_lib: PathBuf,
}

const VLLM_ENGINE_PY: &str = include_str!("vllm_engine.py");
const TINY_MODEL_CONFIG: &str = include_str!("../../../tests/vllm/tiny-model/config.json");

impl VllmEnv {
    /// The python with vLLM and the adapter, and the engine library beside this binary; the
    /// engine script and the stand-in model's config are written into `dir`.
    fn find(exe: &Path, dir: &Path) -> Result<VllmEnv, String> {
        let install = "install it with scripts/vllm-env.sh (vLLM 0.18.0, the adapter and the \
                       stand-in model into ~/.cache/llumlet-rs/vllm-0.18.0, about 9 GB), or set \
                       LLUMLET_VLLM_PYTHON to a python with vllm==0.18.0 and \
                       `pip install -e ffi/python -e tests/vllm/stand_in`";
        let python = match std::env::var_os("LLUMLET_VLLM_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/llumlet-rs/vllm-0.18.0/bin/python"),
        };
        let found = Command::new(&python)
            .args([
                "-c",
                "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in \
                 ('vllm', 'llumlet_vllm', 'llumlet_stand_in')) else 1)",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "--engine vllm: no vLLM with the llumlet-rs adapter at {}: {install}",
                python.display()
            ));
        }
        let ffi_lib = exe.with_file_name("libllumlet_ffi.so");
        if !ffi_lib.exists() {
            return Err(format!(
                "--engine vllm: the engines need {} (cargo build{} -p llumlet-ffi)",
                ffi_lib.display(),
                if cfg!(debug_assertions) {
                    ""
                } else {
                    " --release"
                }
            ));
        }
        let script = dir.join("vllm_engine.py");
        let model = dir.join("tiny-model");
        std::fs::create_dir_all(&model)
            .and_then(|()| std::fs::write(&script, VLLM_ENGINE_PY))
            .and_then(|()| std::fs::write(model.join("config.json"), TINY_MODEL_CONFIG))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(VllmEnv {
            python,
            script,
            model,
            ffi_lib,
        })
    }
}

/// Waits until every engine said it is ready (a vLLM engine takes seconds to start).
async fn wait_ready(instances: &[Instance], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let out: Vec<String> = instances.iter().map(|i| i.engine.output()).collect();
        if out.iter().all(|o| o.contains("vllm-engine: ready")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            for i in instances {
                eprintln!("--- {} engine:\n{}", i.id, i.engine.output());
            }
            return Err(format!(
                "the engines did not all start within {} s",
                within.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every instance's llumlet registered in the CMS (its metadata names its gRPC and
/// transfer ports); on timeout, prints the llumlets' logs.
pub(crate) async fn wait_registered(
    conn: &mut redis::aio::MultiplexedConnection,
    instances: &[Instance],
    within: Duration,
) -> Result<Vec<InstanceMetadata>, String> {
    let keys: Vec<String> = instances
        .iter()
        .map(|i| llumlet_proto::metadata_key(&i.id))
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(conn)
            .await
            .map_err(|e| format!("CMS: {e}"))?;
        let m: Vec<InstanceMetadata> = vals
            .iter()
            .flatten()
            .filter_map(|v| InstanceMetadata::decode(&v[..]).ok())
            .collect();
        if m.len() == keys.len() {
            return Ok(m);
        }
        if Instant::now() > deadline {
            for i in instances {
                eprintln!("--- {} llumlet:\n{}", i.id, i.llumlet.output());
            }
            return Err(format!(
                "the llumlets did not all register in the CMS within {} s",
                within.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo; the process exit code.
pub fn run(a: DemoArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llumlet demo: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(demo(a)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("llumlet demo: {e}");
            ExitCode::from(2)
        }
    }
}

async fn demo(a: DemoArgs) -> Result<bool, String> {
    if !(a.duration > 0.0 && a.duration <= 3600.0) {
        return Err("--duration must be between 0 and 3600 seconds".into());
    }
    llumlet::migration::cuda_side::check_kv(&a.kv)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let dir = match &a.logs {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("llumlet-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let vllm = match a.engine.as_str() {
        "vllm" => Some(VllmEnv::find(&exe, &dir)?),
        _ => None,
    };
    let (_embedded, cms) = match &a.redis_url {
        Some(u) => (None, parse_redis_url(u)?),
        None => {
            let e = EmbeddedCms::start()
                .await
                .map_err(|e| format!("cannot start the embedded CMS: {e}"))?;
            let c = Cms::local(e.addr().port());
            (Some(e), c)
        }
    };
    let tty = std::io::stderr().is_terminal();
    let say = |s: &str| eprintln!("{s}");
    say(&format!(
        "llumlet demo: {} {} engines with their llumlets, CMS {}, {} s of skewed load; logs in {}",
        a.instances,
        if vllm.is_some() { "vLLM" } else { "simulated" },
        if a.redis_url.is_some() {
            format!("redis at {}:{}", cms.host, cms.port)
        } else {
            format!("embedded at 127.0.0.1:{}", cms.port)
        },
        a.duration,
        dir.display()
    ));
    let requests = skew(a.instances);
    let mut instances = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        instances.push(
            spawn_instance(&exe, &dir, &cms, i, *r, &a, vllm.as_ref())
                .map_err(|e| format!("cannot start instance {i}: {e}"))?,
        );
    }
    let client = redis::Client::open(cms.url()).map_err(|e| format!("CMS: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot reach the CMS at {}:{}: {e}", cms.host, cms.port))?;
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    let metas = wait_registered(&mut conn, &instances, Duration::from_secs(30)).await?;
    if vllm.is_some() {
        say("llumlet demo: waiting for the vLLM engines to start");
        wait_ready(&instances, Duration::from_secs(180)).await?;
    }
    let start = Instant::now();
    let samples: Arc<Mutex<Vec<Vec<Sample>>>> = Arc::new(Mutex::new(vec![Vec::new(); ids.len()]));
    let calls: Arc<Mutex<Vec<Call>>> = Arc::new(Mutex::new(Vec::new()));
    let busy: Arc<Mutex<Vec<bool>>> = Arc::new(Mutex::new(vec![false; ids.len()]));
    let mut inflight = Vec::new();
    let mut last_progress = Instant::now();
    let mut next_decision = Instant::now() + Duration::from_millis(500);
    while start.elapsed().as_secs_f64() < a.duration {
        let keys: Vec<String> = ids.iter().map(|i| llumlet_proto::status_key(i)).collect();
        let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("CMS: {e}"))?;
        let statuses: Vec<Option<InstanceStatus>> = vals
            .iter()
            .map(|v| v.as_ref().and_then(|v| InstanceStatus::decode(&v[..]).ok()))
            .collect();
        let t = start.elapsed().as_secs_f64();
        {
            let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
            for (i, st) in statuses.iter().enumerate() {
                if let Some(st) = st {
                    s[i].push(Sample {
                        t,
                        load: load_of(st),
                        running: st.num_running_requests,
                        waiting: st.num_waiting_requests,
                    });
                }
            }
        }
        if Instant::now() >= next_decision {
            next_decision = Instant::now() + Duration::from_millis(500);
            // (The lock is released before the branch: the branch takes it again.)
            let decision = decide(&statuses, &busy.lock().unwrap_or_else(|p| p.into_inner()));
            if let Some((src, dst)) = decision {
                {
                    let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
                    b[src] = true;
                    b[dst] = true;
                }
                let (busy, calls) = (Arc::clone(&busy), Arc::clone(&calls));
                let (sm, dm) = (metas[src].clone(), metas[dst].clone());
                inflight.push(tokio::spawn(async move {
                    let (ok, message) = migrate(&sm, &dm).await;
                    calls.lock().unwrap_or_else(|p| p.into_inner()).push(Call {
                        t,
                        src,
                        dst,
                        ok,
                        message,
                    });
                    let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
                    b[src] = false;
                    b[dst] = false;
                }));
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let c = calls.lock().unwrap_or_else(|p| p.into_inner());
            let ok = c.iter().filter(|c| c.ok).count();
            let line: Vec<String> = statuses
                .iter()
                .zip(&ids)
                .map(|(s, id)| match s {
                    Some(s) => format!(
                        "{id} {:>3.0}% r{:<2} w{:<2}",
                        load_of(s) * 100.0,
                        s.num_running_requests,
                        s.num_waiting_requests
                    ),
                    None => format!("{id} -"),
                })
                .collect();
            let text = format!(
                "[{t:>5.1}s] {} | migrations {ok} ok, {} failed",
                line.join(" | "),
                c.len() - ok
            );
            if tty {
                eprint!("\r\x1b[2K{text}");
            } else if (t as u64).is_multiple_of(5) {
                eprintln!("{text}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if tty {
        eprintln!();
    }
    for h in inflight {
        let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
    }
    // Stop the llumlets first (nothing migrates any more), then the engines, which print what
    // they hold when they stop.
    for i in &mut instances {
        i.llumlet.terminate(Duration::from_secs(5));
    }
    for i in &mut instances {
        i.engine.terminate(Duration::from_secs(5));
    }
    let calls = calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let logs: Vec<Logs> = instances
        .iter()
        .map(|i| Logs {
            id: i.id.clone(),
            llumlet: i.llumlet.output(),
            engine: i.engine.output(),
        })
        .collect();
    let report = Report::gather(&logs, &calls);
    print!("{}", report.table(a.duration));
    let svg = plot::svg(&ids, &samples, &calls, a.duration);
    match std::fs::write(&a.plot, svg) {
        Ok(()) => println!("plot: {}", a.plot.display()),
        Err(e) => eprintln!(
            "llumlet demo: cannot write the plot {}: {e}",
            a.plot.display()
        ),
    }
    for line in &report.problems {
        eprintln!("llumlet demo: FAILED: {line}");
    }
    Ok(report.problems.is_empty())
}

/// The busiest instance with running requests, and the least loaded; when their loads differ by
/// more than 0.25 and neither is in a migration, migrate.
fn decide(statuses: &[Option<InstanceStatus>], busy: &[bool]) -> Option<(usize, usize)> {
    let loads: Vec<(usize, f64, i32)> = statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|s| (i, load_of(s), s.num_running_requests)))
        .filter(|(i, _, _)| !busy[*i])
        .collect();
    let src = loads
        .iter()
        .filter(|(_, _, running)| *running >= 2)
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    let dst = loads
        .iter()
        .filter(|(i, _, _)| *i != src.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    (src.1 - dst.1 > 0.25).then_some((src.0, dst.0))
}

/// One `Migrate` call to `src`'s llumlet: one request (policy SR) to `dst`.
pub(crate) async fn migrate(src: &InstanceMetadata, dst: &InstanceMetadata) -> (bool, String) {
    migrate_num(src, dst, 1).await
}

/// One `Migrate` call to `src`'s llumlet: `n` requests (policy SR; -1: all, pre-stop) to `dst`.
pub(crate) async fn migrate_num(
    src: &InstanceMetadata,
    dst: &InstanceMetadata,
    n: i64,
) -> (bool, String) {
    let url = format!("http://{}:{}", src.ip, src.llumlet_port);
    let mut c = match LlumletClient::connect(url).await {
        Ok(c) => c,
        Err(e) => return (false, format!("connect {}: {e}", src.instance_id)),
    };
    let ip = if dst.ip_kvt.is_empty() {
        dst.ip.clone()
    } else {
        dst.ip_kvt.clone()
    };
    let r = c
        .migrate(MigrateRequest {
            src_engine_id: src.instance_id.clone(),
            dst_engine_id: dst.instance_id.clone(),
            dst_engine_ip: ip,
            dst_engine_port: dst.kvt_port,
            migration_type: "NUM_REQ".into(),
            migration_req_policy: "SR".into(),
            trigger_policy: "demo-rebalancer".into(),
            migration_value: Some(MigrationValue::NumReqs(n)),
        })
        .await;
    match r {
        Ok(r) => {
            let r = r.into_inner();
            (r.success, r.message)
        }
        Err(s) => (false, format!("{:?}: {}", s.code(), s.message())),
    }
}

/// What one instance's processes wrote.
pub struct Logs {
    /// Instance id.
    pub id: String,
    /// The llumlet's log.
    pub llumlet: String,
    /// The simulated engine's stdout.
    pub engine: String,
}

/// What the processes' logs say happened.
#[derive(Debug, Default)]
pub struct Report {
    /// Requests moved (source log: outcome=Migrated).
    pub moved: usize,
    /// Migrations that did not move a request (aborted, refused).
    pub aborted: usize,
    /// KV bytes copied by moved requests.
    pub bytes: u64,
    /// Stages per moved request.
    pub stages: Vec<u32>,
    /// Downtime per moved request, µs.
    pub downtime_us: Vec<u64>,
    /// Transports used.
    pub transports: HashMap<String, usize>,
    /// Migrated requests that arrived with KV and tokens verified / finished verified.
    pub verified_arrivals: usize,
    /// Migrated requests that finished with their token stream verified.
    pub verified_finishes: usize,
    /// `Migrate` calls answered success / failure.
    pub calls_ok: usize,
    /// Failed calls.
    pub calls_failed: usize,
    /// Everything that failed verification.
    pub problems: Vec<String>,
}

pub(crate) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

impl Report {
    fn gather(instances: &[Logs], calls: &[Call]) -> Report {
        let mut r = Report {
            calls_ok: calls.iter().filter(|c| c.ok).count(),
            calls_failed: calls.iter().filter(|c| !c.ok).count(),
            ..Default::default()
        };
        let mut finished: HashMap<String, usize> = HashMap::new();
        for i in instances {
            for l in i
                .llumlet
                .lines()
                .filter(|l| l.contains("migration out finished"))
            {
                if field(l, "outcome") == Some("Migrated") {
                    r.moved += 1;
                    r.bytes += field(l, "bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
                    r.stages
                        .extend(field(l, "stages").and_then(|s| s.parse::<u32>().ok()));
                    r.downtime_us
                        .extend(field(l, "downtime_us").and_then(|s| s.parse::<u64>().ok()));
                    *r.transports
                        .entry(field(l, "transport").unwrap_or("?").to_string())
                        .or_default() += 1;
                } else {
                    r.aborted += 1;
                }
            }
            for l in i.engine.lines() {
                let Some(ev) = l
                    .strip_prefix("sim-engine: ")
                    .or_else(|| l.strip_prefix("vllm-engine: "))
                else {
                    continue;
                };
                let id = ev.split_whitespace().nth(1).unwrap_or("").to_string();
                if ev.starts_with("migrated-in ") {
                    if ev.contains("kv=ok") && ev.contains("tokens=ok") {
                        r.verified_arrivals += 1;
                    } else {
                        r.problems.push(format!(
                            "{}: arrived with different KV or tokens: {ev}",
                            i.id
                        ));
                    }
                }
                if ev.starts_with("finished ") {
                    *finished.entry(id).or_default() += 1;
                    if ev.contains("migrated_in=true") {
                        if ev.contains("tokens=ok") {
                            r.verified_finishes += 1;
                        } else {
                            r.problems.push(format!(
                                "{}: finished with a different token stream: {ev}",
                                i.id
                            ));
                        }
                    }
                }
            }
        }
        for (id, n) in &finished {
            if *n > 1 {
                r.problems.push(format!("request {id} finished {n} times"));
            }
        }
        if r.verified_arrivals != r.moved {
            r.problems.push(format!(
                "{} requests left their sources but {} arrived verified",
                r.moved, r.verified_arrivals
            ));
        }
        if r.moved == 0 {
            r.problems
                .push("no request migrated: nothing was demonstrated (see the logs)".into());
        }
        r
    }

    fn table(&self, duration: f64) -> String {
        let pct = |p: f64| -> String {
            let mut v = self.downtime_us.clone();
            if v.is_empty() {
                return "-".into();
            }
            v.sort_unstable();
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            format!("{:.1} ms", v[i] as f64 / 1000.0)
        };
        let stages = if self.stages.is_empty() {
            "-".into()
        } else {
            format!(
                "{:.1} (max {})",
                self.stages.iter().sum::<u32>() as f64 / self.stages.len() as f64,
                self.stages.iter().max().unwrap_or(&0)
            )
        };
        let mut transports: Vec<String> = self
            .transports
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        transports.sort();
        let verdict = if self.problems.is_empty() {
            format!(
                "ok ({} arrivals with identical KV bytes and tokens, {} finished with the unmigrated token stream, none ran twice)",
                self.verified_arrivals, self.verified_finishes
            )
        } else {
            format!("FAILED ({} problems)", self.problems.len())
        };
        let rows = [
            ("duration", format!("{duration:.0} s")),
            (
                "Migrate calls",
                format!("{} ok, {} failed", self.calls_ok, self.calls_failed),
            ),
            (
                "requests migrated",
                format!("{} ({} attempts aborted safely)", self.moved, self.aborted),
            ),
            (
                "KV bytes moved",
                format!("{:.1} MiB", self.bytes as f64 / (1 << 20) as f64),
            ),
            ("stages per migration", stages),
            ("downtime p50", pct(0.5)),
            ("downtime p99", pct(0.99)),
            ("transports", transports.join(", ")),
            ("verification", verdict),
        ];
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut s = String::from("\nllumlet demo summary\n");
        for (k, v) in rows {
            s.push_str(&format!("  {k:<w$}  {v}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_parse_and_bad_ones_are_named() {
        let c = parse_redis_url("redis://u:p@127.0.0.1:6380").unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_deref(),
                c.password.as_deref()
            ),
            ("127.0.0.1", 6380, Some("u"), Some("p"))
        );
        let c = parse_redis_url("redis://localhost").unwrap();
        assert_eq!((c.host.as_str(), c.port, c.user), ("localhost", 6379, None));
        assert!(parse_redis_url("http://x")
            .unwrap_err()
            .contains("redis://"));
        assert!(parse_redis_url("redis://x:notaport")
            .unwrap_err()
            .contains("bad port"));
    }

    #[test]
    fn the_rebalancer_moves_from_busy_to_idle_and_leaves_balance_alone() {
        let st = |used: i32, waiting: i32, running: i32| {
            Some(InstanceStatus {
                num_total_gpu_tokens: 1000,
                num_used_gpu_tokens: used,
                num_uncomputed_tokens_all_waiting_prefills: waiting,
                num_running_requests: running,
                ..Default::default()
            })
        };
        let s = [st(900, 500, 10), st(400, 0, 3), st(0, 0, 0)];
        assert_eq!(decide(&s, &[false; 3]), Some((0, 2)));
        assert_eq!(decide(&s, &[false, false, true]), Some((0, 1)));
        assert_eq!(decide(&s, &[true, false, false]), Some((1, 2)));
        let balanced = [st(500, 0, 5), st(450, 0, 5)];
        assert_eq!(decide(&balanced, &[false; 2]), None);
    }

    fn logs(llumlet: &str, engine: &str) -> Logs {
        Logs {
            id: "demo-0".into(),
            llumlet: llumlet.into(),
            engine: engine.into(),
        }
    }

    const MOVED: &str = "[demo-0] t INFO migration out finished request=sim-1-3 outcome=Migrated stages=3 downtime_us=7821 transport=\"shm\" bytes=1048576 dst=x\n";

    #[test]
    fn the_verdict_is_ok_only_when_every_move_arrived_verified_and_nothing_ran_twice() {
        let ok = Report::gather(
            &[logs(MOVED, "sim-engine: migrated-in sim-1-3 output=5 kv=ok tokens=ok\nsim-engine: finished sim-1-3 output=9 migrated_in=true tokens=ok\n")],
            &[],
        );
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert_eq!((ok.moved, ok.bytes, ok.verified_finishes), (1, 1048576, 1));
        let bad_kv = Report::gather(
            &[logs(
                MOVED,
                "sim-engine: migrated-in sim-1-3 output=5 kv=BAD tokens=ok\n",
            )],
            &[],
        );
        assert!(bad_kv.problems.iter().any(|p| p.contains("different KV")));
        let lost = Report::gather(&[logs(MOVED, "")], &[]);
        assert!(lost.problems.iter().any(|p| p.contains("arrived verified")));
        let twice = Report::gather(
            &[logs(MOVED, "sim-engine: migrated-in sim-1-3 output=5 kv=ok tokens=ok\nsim-engine: finished sim-1-3 output=9\nsim-engine: finished sim-1-3 output=9\n")],
            &[],
        );
        assert!(twice
            .problems
            .iter()
            .any(|p| p.contains("finished 2 times")));
        let nothing = Report::gather(&[logs("", "")], &[]);
        assert!(nothing
            .problems
            .iter()
            .any(|p| p.contains("no request migrated")));
    }

    #[test]
    fn log_fields_are_read_as_the_llumlet_writes_them() {
        let l = "[demo-0] 2026-11-25T05:33:05Z  INFO migration out finished request=sim-1-3 outcome=Migrated stages=3 downtime_us=7821 transport=\"shm\" bytes=1048576 dst=127.0.0.1:1";
        assert_eq!(field(l, "outcome"), Some("Migrated"));
        assert_eq!(field(l, "transport"), Some("shm"));
        assert_eq!(field(l, "bytes"), Some("1048576"));
        assert_eq!(field(l, "missing"), None);
    }
}
