//! `llumlet bench fleet`: many llumlets on one Redis, read the way the Llumnix scheduler reads
//! them.
//!
//! - N real `llumlet` processes (what a deployment runs), each without an engine: one driver
//!   task here pushes each a status over `PushInstanceStatus` every second (far inside the engine
//!   timeout), and each llumlet writes its status to the CMS every `--push-interval`, as it would
//!   beside an engine. No simulated engines: on 2 cores their step loops would crowd out the
//!   llumlets being measured.
//! - A reader doing what the Llumnix scheduler's CMS client does (`pkg/cms/cms_read_client.go`):
//!   every 10 s `SCAN llumnix:instance_metadata:*` + `MGET` of the metadata, every
//!   `--pull-interval-ms` an `MGET` of the statuses of the ids found, a status taken only when
//!   its `timestamp_ms` is newer than the last one taken. Staleness = now − `timestamp_ms` of
//!   each status taken.
//! - Costs over the measured window: Redis's CPU and commands per second, each llumlet's CPU and
//!   resident memory. Baseline in the same run: Redis's own CPU per `SET` of a status-sized value
//!   under `redis-benchmark` (one client), times the fleet's SET rate.
//! - `--restart-redis-at S`: Redis is killed S seconds in and restarted empty on the same port;
//!   the time until every instance's metadata and status are back, when the llumlets' new
//!   connections arrived, and whether every llumlet is still running at the end.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llumlet_proto::cms::{InstanceMetadata, InstanceStatus};
use llumlet_proto::llumlet::llumlet_client::LlumletClient;
use prost::Message;
use serde_json::json;

use super::status::cpu_seconds;
use super::{percentile, round, Progress};

/// `llumlet bench fleet` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// llumlet processes.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub instances: u32,
    /// Every llumlet's LLUMNIX_STATUS_PUSH_INTERVAL (seconds).
    #[arg(long, default_value_t = 0.04)]
    pub push_interval: f64,
    /// The reader's status pull interval (the scheduler's --cms-pull-status-interval-ms).
    #[arg(long, default_value_t = 50)]
    pub pull_interval_ms: u64,
    /// Seconds measured (after every llumlet registered).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Kill Redis this many seconds into the measurement and restart it, empty.
    #[arg(long)]
    pub restart_redis_at: Option<f64>,
}

/// A `redis-server` started here on `port` (no persistence: a restart comes back empty).
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Result<Redis, String> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--maxclients", "10000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it on PATH?): {e}"))?;
        let r = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if r.command("PING").is_ok_and(|s| s.contains("PONG")) {
                return Ok(r);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not answer within 5 s".into())
    }

    /// One inline command, the reply's first read (enough for PING and INFO sections).
    fn command(&self, cmd: &str) -> Result<String, String> {
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        s.write_all(format!("{cmd}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 << 10];
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn info_field(&self, section: &str, field: &str) -> Option<f64> {
        let info = self.command(&format!("INFO {section}")).ok()?;
        info.lines().find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn status_of(i: u32) -> InstanceStatus {
    InstanceStatus {
        schedulable: true,
        num_running_requests: 8 + (i % 8) as i32,
        num_waiting_requests: (i % 3) as i32,
        num_total_gpu_tokens: 262_144,
        num_used_gpu_tokens: 65_536 + 1024 * (i % 64) as i32,
        waiting_requests: (0..(i % 3))
            .map(|k| format!("chatcmpl-{i:08}-{k:04}"))
            .collect(),
        profiling_id: -1,
        ..Default::default()
    }
}

struct Reader {
    conn: redis::aio::MultiplexedConnection,
    ids: Vec<String>,
    last_ts: std::collections::HashMap<String, i64>,
    staleness_ms: Vec<f64>,
    taken: u64,
    missing: u64,
    pulls: u64,
}

impl Reader {
    async fn refresh_metadata(&mut self) -> Result<usize, String> {
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", llumlet_proto::METADATA_KEY_PREFIX))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| e.to_string())?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if keys.is_empty() {
            self.ids.clear();
            return Ok(0);
        }
        let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| e.to_string())?;
        self.ids = keys
            .iter()
            .zip(&vals)
            .filter(|(_, v)| {
                v.as_ref()
                    .is_some_and(|v| InstanceMetadata::decode(&v[..]).is_ok())
            })
            .filter_map(|(k, _)| k.strip_prefix(llumlet_proto::METADATA_KEY_PREFIX))
            .map(str::to_string)
            .collect();
        Ok(self.ids.len())
    }

    /// One status pull: how many statuses were present.
    async fn pull(&mut self, record: bool) -> Result<usize, String> {
        if self.ids.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = self
            .ids
            .iter()
            .map(|i| llumlet_proto::status_key(i))
            .collect();
        let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| e.to_string())?;
        let now = wall_ms();
        let mut present = 0;
        for (id, v) in self.ids.iter().zip(&vals) {
            let Some(s) = v.as_ref().and_then(|v| InstanceStatus::decode(&v[..]).ok()) else {
                if record {
                    self.missing += 1;
                }
                continue;
            };
            present += 1;
            let last = self.last_ts.entry(id.clone()).or_insert(i64::MIN);
            if s.timestamp_ms > *last {
                *last = s.timestamp_ms;
                if record {
                    self.taken += 1;
                    self.staleness_ms.push((now - s.timestamp_ms) as f64);
                }
            }
        }
        if record {
            self.pulls += 1;
        }
        Ok(present)
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the fleet; prints one JSON object.
pub fn run(a: &FleetArgs) -> Result<(), String> {
    if !(a.push_interval >= 0.001 && a.seconds > 0.0 && a.pull_interval_ms > 0) {
        return Err(
            "--push-interval must be at least 0.001 s, --seconds and --pull-interval-ms positive"
                .into(),
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(fleet(a))
}

async fn fleet(a: &FleetArgs) -> Result<(), String> {
    let mut redis = Redis::start(free_port()?)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("llumlet-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let progress = Progress::new();
    let mut llumlets: Vec<Child> = Vec::new();
    let cleanup = |ls: &mut Vec<Child>| {
        for c in ls.iter_mut() {
            let _ = c.kill();
        }
        for c in ls.iter_mut() {
            let _ = c.wait();
        }
    };
    for i in 0..a.instances {
        let log =
            std::fs::File::create(dir.join(format!("fleet-{i}.log"))).map_err(|e| e.to_string())?;
        let mut c = Command::new(&exe);
        c.arg("run").env_clear();
        for k in ["PATH", "HOME", "TMPDIR"] {
            if let Ok(v) = std::env::var(k) {
                c.env(k, v);
            }
        }
        c.envs([
            ("LLUMLET_INSTANCE_ID", format!("fleet-{i}")),
            ("LLUMLET_HOST_IP", "127.0.0.1".into()),
            ("LLUMNIX_VLLM_API_SERVER_PORT", "8000".into()),
            ("LLUMNIX_RPC_PORT", "-1".into()),
            ("LLUMLET_TRANSFER_PORT", "0".into()),
            ("LLUMNIX_CMS_REDIS_ADDRESS", "127.0.0.1".into()),
            ("LLUMNIX_CMS_REDIS_PORT", redis.port.to_string()),
            ("LLUMNIX_STATUS_PUSH_INTERVAL", a.push_interval.to_string()),
            // No engine: the segment never appears; statuses come over PushInstanceStatus.
            (
                "LLUMLET_ENGINE_SHM",
                format!("llumlet-bench-fleet-{}-{i}", std::process::id()),
            ),
            ("LLUMNIX_LOGGING_LEVEL", "WARNING".into()),
            ("LLUMLET_PARENT_PID", std::process::id().to_string()),
        ]);
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start llumlet {i}: {e}"))?;
        llumlets.push(child);
    }
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = Reader {
        conn,
        ids: Vec::new(),
        last_ts: Default::default(),
        staleness_ms: Vec::new(),
        taken: 0,
        missing: 0,
        pulls: 0,
    };
    // Every llumlet registered: its metadata names its gRPC port.
    let deadline =
        Instant::now() + Duration::from_secs(60) + Duration::from_millis(200) * a.instances;
    loop {
        let n = reader.refresh_metadata().await?;
        progress.tick(&format!("fleet: {n}/{} llumlets registered", a.instances));
        if n as u32 == a.instances {
            break;
        }
        if Instant::now() > deadline {
            cleanup(&mut llumlets);
            return Err(format!(
                "only {n} of {} llumlets registered (logs in {})",
                a.instances,
                dir.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ports = Vec::new();
    for id in &reader.ids {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(llumlet_proto::metadata_key(id))
            .query_async(&mut reader.conn)
            .await
            .map_err(|e| e.to_string())?;
        let m = InstanceMetadata::decode(&v.unwrap_or_default()[..]).map_err(|e| e.to_string())?;
        ports.push((
            id.trim_start_matches("fleet-").parse::<u32>().unwrap_or(0),
            m.llumlet_port,
        ));
    }
    // The driver: a status to every llumlet now and every second.
    let driver = tokio::spawn(async move {
        let mut clients = Vec::new();
        for (i, port) in ports {
            if let Ok(c) = LlumletClient::connect(format!("http://127.0.0.1:{port}")).await {
                clients.push((i, c));
            }
        }
        loop {
            for (i, c) in clients.iter_mut() {
                let _ = c.push_instance_status(status_of(*i)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // Warm up: every status present once.
    let warm = Instant::now() + Duration::from_secs(30);
    while reader.pull(false).await? < a.instances as usize && Instant::now() < warm {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids: Vec<u32> = llumlets.iter().map(Child::id).collect();
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let redis_cpu0 = cpu_seconds(redis.child.id()).unwrap_or(0.0);
    let cmds0 = redis
        .info_field("stats", "total_commands_processed")
        .unwrap_or(0.0);
    let t0 = Instant::now();
    let pull = Duration::from_millis(a.pull_interval_ms);
    let mut next_meta = t0 + Duration::from_secs(10);
    let mut storm: Option<serde_json::Value> = None;
    let mut redis_cpu_before_restart = 0.0;
    let mut cmds_before_restart = 0.0;
    while t0.elapsed().as_secs_f64() < a.seconds {
        let tick = Instant::now();
        if a.restart_redis_at
            .is_some_and(|s| t0.elapsed().as_secs_f64() >= s)
            && storm.is_none()
        {
            redis_cpu_before_restart = cpu_seconds(redis.child.id()).unwrap_or(0.0) - redis_cpu0;
            cmds_before_restart = redis
                .info_field("stats", "total_commands_processed")
                .unwrap_or(0.0)
                - cmds0;
            storm = Some(restart_storm(&mut redis, &mut reader, a.instances).await?);
            continue;
        }
        if tick >= next_meta {
            next_meta += Duration::from_secs(10);
            let _ = reader.refresh_metadata().await;
        }
        let _ = reader.pull(true).await;
        progress.tick(&format!(
            "fleet: {:.0}/{} s",
            t0.elapsed().as_secs_f64(),
            a.seconds
        ));
        tokio::time::sleep(pull.saturating_sub(tick.elapsed())).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let rss: Vec<f64> = pids
        .iter()
        .map(|p| llumlet_dataplane::sys::rss_kib(*p) as f64 / 1024.0)
        .collect();
    let (redis_cpu, cmds) = if storm.is_some() {
        // Redis restarted: its counters began again.
        (
            redis_cpu_before_restart + cpu_seconds(redis.child.id()).unwrap_or(0.0),
            cmds_before_restart
                + redis
                    .info_field("stats", "total_commands_processed")
                    .unwrap_or(0.0),
        )
    } else {
        (
            cpu_seconds(redis.child.id()).unwrap_or(0.0) - redis_cpu0,
            redis
                .info_field("stats", "total_commands_processed")
                .unwrap_or(0.0)
                - cmds0,
        )
    };
    let alive = llumlets
        .iter_mut()
        .map(|c| c.try_wait())
        .filter(|w| matches!(w, Ok(None)))
        .count();
    driver.abort();
    progress.done();
    let cpu_pct: Vec<f64> = cpu0
        .iter()
        .zip(&cpu1)
        .map(|(a0, a1)| (a1 - a0) / secs * 100.0)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let sets_per_s = f64::from(a.instances) / a.push_interval;
    let value_bytes: usize = {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(llumlet_proto::status_key("fleet-0"))
            .query_async(&mut reader.conn)
            .await
            .unwrap_or(None);
        v.map_or(0, |v| v.len())
    };
    // Baseline: Redis's own CPU per SET of a status-sized value (redis-benchmark, one client).
    let n: u64 = 20_000;
    let rc0 = cpu_seconds(redis.child.id()).unwrap_or(0.0);
    let bench_ok = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &redis.port.to_string(),
            "-c",
            "1",
            "-n",
            &n.to_string(),
        ])
        .args(["-t", "set", "-d", &value_bytes.max(1).to_string(), "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let redis_us_per_set =
        bench_ok.then(|| (cpu_seconds(redis.child.id()).unwrap_or(0.0) - rc0) / n as f64 * 1e6);
    cleanup(&mut llumlets);
    redis.kill();
    let _ = std::fs::remove_dir_all(&dir);
    let st = &reader.staleness_ms;
    let mut out = json!({
        "bench": "fleet", "instances": a.instances, "push_interval_s": a.push_interval,
        "pull_interval_ms": a.pull_interval_ms, "seconds": round(secs, 1),
        "staleness_ms_p50": round(percentile(st, 0.5), 1), "staleness_ms_p99": round(percentile(st, 0.99), 1),
        "staleness_ms_max": round(max(st), 1),
        "goal_p99_ms": round(2.0 * a.push_interval * 1000.0 + a.pull_interval_ms as f64, 1),
        "statuses_taken": reader.taken, "status_pulls": reader.pulls,
        "statuses_missing": reader.missing,
        "redis_cpu_pct": round(redis_cpu / secs * 100.0, 1),
        "redis_cpu_us_per_instance_per_s": round(redis_cpu / secs / f64::from(a.instances) * 1e6, 1),
        "redis_commands_per_s": round(cmds / secs, 0),
        "status_sets_per_s_expected": round(sets_per_s, 0), "status_value_bytes": value_bytes,
        "llumlet_cpu_pct_mean": round(mean(&cpu_pct), 2), "llumlet_cpu_pct_max": round(max(&cpu_pct), 2),
        "llumlet_rss_mib_mean": round(mean(&rss), 1), "llumlet_rss_mib_max": round(max(&rss), 1),
        "llumlets_alive_at_end": alive,
    });
    if let Some(us) = redis_us_per_set {
        out["baseline_redis_benchmark_us_per_set"] = json!(round(us, 2));
        out["baseline_redis_cpu_pct_at_fleet_rate"] = json!(round(us * sets_per_s / 1e4, 1));
    }
    if let Some(s) = storm {
        out["redis_restart"] = s;
    }
    super::out(&out.to_string());
    Ok(())
}

/// Kills Redis, restarts it empty on the same port, and measures the way back.
async fn restart_storm(
    redis: &mut Redis,
    reader: &mut Reader,
    instances: u32,
) -> Result<serde_json::Value, String> {
    let port = redis.port;
    redis.kill();
    let down = Instant::now();
    *redis = Redis::start(port)?;
    let up = down.elapsed();
    // New connections, sampled every 20 ms on one connection of our own: when the llumlets
    // came back.
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
    let mut mon = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let mut arrivals: Vec<(f64, f64)> = Vec::new();
    let mut all_back = None;
    let mut meta_back = None;
    let mut reconnected = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let t = down.elapsed().as_secs_f64();
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut mon)
            .await
            .unwrap_or_default();
        if let Some(c) = info.lines().find_map(|l| {
            l.strip_prefix("total_connections_received:")?
                .trim()
                .parse::<f64>()
                .ok()
        }) {
            arrivals.push((t, c));
        }
        if all_back.is_none() {
            if !reconnected {
                if let Ok(conn) = client.get_multiplexed_async_connection().await {
                    reader.conn = conn;
                    reconnected = true;
                }
            }
            if reconnected {
                let metas = reader.refresh_metadata().await.unwrap_or(0);
                if metas as u32 == instances && meta_back.is_none() {
                    meta_back = Some(t);
                }
                let statuses = reader.pull(false).await.unwrap_or(0);
                if metas as u32 == instances && statuses as u32 == instances {
                    all_back = Some(t);
                }
            }
        }
        if all_back.is_some() && t > all_back.unwrap_or(0.0) + 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connection arrivals over time: the first and last new connection after the restart, and
    // the times by which half and all of them had come (the reader's own are a handful).
    let total = arrivals.last().map_or(0.0, |a| a.1);
    let at = |frac: f64| {
        arrivals
            .iter()
            .find(|(_, c)| *c >= total * frac)
            .map_or(-1.0, |(t, _)| round(*t, 3))
    };
    Ok(json!({
        "restart_s": round(up.as_secs_f64(), 3),
        "metadata_all_back_s": meta_back.map(|t| round(t, 3)),
        "all_back_s": all_back.map(|t| round(t, 3)),
        "connections": total,
        "connections_10pct_s": at(0.1), "connections_50pct_s": at(0.5),
        "connections_90pct_s": at(0.9), "connections_all_s": at(1.0),
    }))
}
