//! Helpers for the multi-process tests: a real `redis-server` on a free port, the `llumlet`
//! binary as a child process, and polling with deadlines (never timing assertions).

pub mod mig;
pub mod netns;

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The Prometheus text a llumlet serves on `port` (`GET /metrics`), with the HTTP head.
pub fn get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Waits up to `within` for the llumlet's metrics on `port` to hold the line `want` (a
/// migration is counted when its handler ends, which may be a moment after the `Migrate` answer);
/// panics with the metrics it last read.
pub fn wait_for_metric(port: u16, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = get_metrics(port);
        if m.lines().any(|l| l == want) {
            return;
        }
        assert!(Instant::now() < deadline, "no {want:?} in\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago, for a process to listen on (a llumlet's fixed gRPC and
/// transfer ports, kept across its restarts). Taken below the kernel's ephemeral range, so no
/// outgoing connection of the suite can be holding it when a restarted llumlet binds it again,
/// and never the same one twice in this process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if low > 12000 {
        let span = u64::from(low - 11000);
        let mut x = u64::from(std::process::id()) << 20 ^ given.len() as u64;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let port = 10000 + ((x >> 33) % span) as u16;
            let free = TcpListener::bind(("0.0.0.0", port)).is_ok()
                && TcpListener::bind(("127.0.0.1", port)).is_ok();
            if free && !given.contains(&port) {
                given.push(port);
                return port;
            }
        }
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    given.push(port);
    port
}

/// Removes every file in /dev/shm whose name starts with `prefix` (what an engine killed with
/// SIGKILL leaves: its control segment, KV cache, mailboxes, journals).
pub fn remove_shm_files(prefix: &str) {
    if let Ok(rd) = fs::read_dir("/dev/shm") {
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Calls [`remove_shm_files`] when dropped: declared before the processes that create the
/// files, it runs after they are killed.
pub struct ShmCleanup(pub String);

impl Drop for ShmCleanup {
    fn drop(&mut self) {
        remove_shm_files(&self.0);
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("llumlet-test-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` child on a free loopback port; killed on drop.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
    /// Credentials the test client uses (user, password), if ACLs are on.
    pub auth: Option<(String, String)>,
}

impl RedisServer {
    /// Starts one with no persistence.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new(), None)
    }

    /// Starts one with extra arguments; `auth` is what the test client logs in with.
    pub fn start_with(extra: Vec<String>, auth: Option<(String, String)>) -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            extra,
            child: None,
            auth,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut c) = self.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A client for the test's own reads.
    pub fn client(&self) -> redis::Client {
        let url = match &self.auth {
            Some((u, p)) => format!("redis://{u}:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        };
        redis::Client::open(url).unwrap()
    }

    /// A connection.
    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// The bytes under `key`, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        redis::cmd("GET").arg(key).query(&mut self.conn()).unwrap()
    }

    /// The TTL of `key` in seconds (-2: missing, -1: no TTL).
    pub fn ttl(&self, key: &str) -> i64 {
        redis::cmd("TTL").arg(key).query(&mut self.conn()).unwrap()
    }

    /// Number of keys.
    pub fn dbsize(&self) -> i64 {
        redis::cmd("DBSIZE").query(&mut self.conn()).unwrap()
    }

    /// Polls until `key` holds a value that `pred` accepts, or panics after `within`.
    pub fn wait_for<T>(
        &self,
        key: &str,
        within: Duration,
        mut pred: impl FnMut(Option<&[u8]>) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let v = self.get(key);
            if let Some(t) = pred(v.as_deref()) {
                return t;
            }
            if Instant::now() > deadline {
                panic!(
                    "{key} did not reach the expected state within {within:?}; last value: {v:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `llumlet` binary of this build: beside the running executable (a tool in
/// `target/<profile>/`) or one level up (a test in `target/<profile>/deps/`).
pub fn llumlet_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let candidates = [
        dir.join("llumlet"),
        dir.parent().map(|d| d.join("llumlet")).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("llumlet binary not found near {}: run `cargo build --bins` first (scripts/test.sh does)", dir.display()))
}

/// Environment for a llumlet talking to `redis`, with short intervals.
pub fn base_env(redis: &RedisServer, instance_id: &str, rpc_port: u16) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("LLUMLET_INSTANCE_ID", instance_id.to_string()),
        ("LLUMLET_HOST_IP", "127.0.0.1".into()),
        ("LLUMNIX_VLLM_API_SERVER_PORT", "8000".into()),
        ("LLUMNIX_RPC_PORT", rpc_port.to_string()),
        ("LLUMNIX_CMS_REDIS_ADDRESS", "127.0.0.1".into()),
        ("LLUMNIX_CMS_REDIS_PORT", redis.port.to_string()),
        ("LLUMNIX_STATUS_PUSH_INTERVAL", "0.05".into()),
        ("LLUMNIX_METADATA_PUSH_INTERVAL", "1".into()),
        ("LLUMNIX_CMS_EXPIRED_TIME", "3".into()),
        ("LLUMNIX_LOGGING_LEVEL", "DEBUG".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some((u, p)) = &redis.auth {
        env.insert("LLUMNIX_CMS_REDIS_USERNAME".into(), u.clone());
        env.insert("LLUMNIX_CMS_REDIS_PASSWORD".into(), p.clone());
    }
    env
}

/// A `llumlet` child process; its stderr goes to a file; killed on drop.
pub struct LlumletProcess {
    /// The child.
    pub child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl LlumletProcess {
    /// Spawns `llumlet` with exactly `env` (plus PATH).
    pub fn spawn(env: &HashMap<String, String>) -> LlumletProcess {
        LlumletProcess::spawn_args(&[], env)
    }

    /// Spawns `llumlet ARGS...` with exactly `env` (plus PATH).
    pub fn spawn_args(args: &[&str], env: &HashMap<String, String>) -> LlumletProcess {
        LlumletProcess::spawn_in(&[], args, env)
    }

    /// Spawns `WRAP... llumlet ARGS...` (`wrap`: a command that runs the rest elsewhere, such as
    /// `nsenter` into another host's namespaces, and execs it: the child is the llumlet).
    pub fn spawn_in(
        wrap: &[String],
        args: &[&str],
        env: &HashMap<String, String>,
    ) -> LlumletProcess {
        let dir = TempDir::new("llumlet");
        let log = dir.0.join("stderr.log");
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(llumlet_bin());
                c
            }
            None => Command::new(llumlet_bin()),
        };
        let child = cmd
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdout(fs::File::create(dir.0.join("stdout.log")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        LlumletProcess {
            child,
            log,
            _dir: dir,
        }
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.log.with_file_name("stdout.log")).unwrap_or_default()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0);
    }

    /// Waits for it to exit, or panics after `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "llumlet did not exit within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for LlumletProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC client of the llumlet at `127.0.0.1:port`, retrying the connection until `within`.
pub async fn grpc_client(
    port: u16,
    within: Duration,
) -> llumlet_proto::llumlet::llumlet_client::LlumletClient<tonic::transport::Channel> {
    grpc_client_at("127.0.0.1", port, within).await
}

/// A gRPC client of the llumlet at `host:port`, retrying the connection for up to `within`.
pub async fn grpc_client_at(
    host: &str,
    port: u16,
    within: Duration,
) -> llumlet_proto::llumlet::llumlet_client::LlumletClient<tonic::transport::Channel> {
    let deadline = Instant::now() + within;
    loop {
        match llumlet_proto::llumlet::llumlet_client::LlumletClient::connect(format!(
            "http://{host}:{port}"
        ))
        .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => {
                panic!("cannot connect to the llumlet on {port}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The directory holding the test double of the CUDA driver (`libcuda.so.1`, built from
/// tests/fake-cuda by this crate's build script). A process started with `LD_LIBRARY_PATH` set
/// to it finds the double instead of a driver: GPU code paths then run on host memory.
pub const FAKE_CUDA_DIR: &str = env!("LLUMLET_FAKE_CUDA_DIR");

/// Whether GPU work runs under the test double of the driver (the default), not the machine's
/// driver (`LLUMLET_TEST_CUDA=real`, a GPU machine running the suite on its GPU).
pub fn fake_cuda() -> bool {
    std::env::var("LLUMLET_TEST_CUDA").map_or(true, |v| v != "real")
}

/// The environment a process with GPU work gets (processes started with a cleared
/// environment too): `LD_LIBRARY_PATH` pointing at the test double, or, with the real driver,
/// this process's own `LD_LIBRARY_PATH` (where the driver may be found).
pub fn cuda_env() -> Option<(String, String)> {
    let path = if fake_cuda() {
        FAKE_CUDA_DIR.to_string()
    } else {
        std::env::var("LD_LIBRARY_PATH").ok()?
    };
    Some(("LD_LIBRARY_PATH".into(), path))
}

/// Points `cmd` at the test double of the CUDA driver (see [`FAKE_CUDA_DIR`]).
pub fn with_fake_cuda(cmd: &mut Command) -> &mut Command {
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{FAKE_CUDA_DIR}:{p}"),
        _ => FAKE_CUDA_DIR.to_string(),
    };
    cmd.env("LD_LIBRARY_PATH", path)
}
