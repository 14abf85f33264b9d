//! `llumlet bench migration`: live migrations of one decoding request by sequence length, with
//! the real processes of a deployment: two simulated engines (an 8B-model-shaped KV layout:
//! blocks of 16 tokens × 8 KV heads × 128 × K,V × fp16, in `--layers` layers), their llumlets,
//! the embedded CMS, and `Migrate` over gRPC. The request moves back and forth `--repeat` times;
//! downtime (the source's suspend to the destination's commit answer), stages and KV bytes come
//! from the source llumlet's `migration out finished` log line, the total time is the `Migrate`
//! call's. Each arrival's KV bytes and token stream are checked by the receiving engine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llumlet_proto::cms::InstanceStatus;
use prost::Message;
use serde_json::json;

use super::{percentile, round, Progress};
use crate::demo::{field, migrate, wait_registered, Cms, EmbeddedCms, Instance};

/// `llumlet bench migration` options.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrationArgs {
    /// Sequence lengths (prompt tokens of the migrated request), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,65536")]
    pub tokens: Vec<u32>,
    /// Migrations per length (the request moves back and forth).
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Engine step in milliseconds (the engine takes commands between steps).
    #[arg(long, default_value_t = 5)]
    pub step_ms: u64,
    /// KV layers (an 8B model has 32; 2 keeps a 64k-token request at 512 MiB per engine).
    #[arg(long, default_value_t = 2)]
    pub layers: u32,
    /// The llumlets' LLUMLET_TRANSPORT (`shm`, `tcp`, `ucx` where built with it). A GPU KV
    /// cache (`--kv gpu`) always moves over `cuda`.
    #[arg(long, default_value = "shm")]
    pub transport: String,
    /// Where the engines keep their KV caches: `host` (shared memory) or `gpu` (GPU 0, CUDA
    /// IPC; feature `cuda` and a GPU).
    #[arg(long, default_value = "host")]
    pub kv: String,
    /// Where to keep the processes' logs (default: a new directory under the system temp dir).
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// Throughput instead: for each value, that many `Migrate` calls in flight at once (one
    /// request each; the llumlets' LLUMNIX_MAX_REQ_MIG_OUT/_IN are 8) until every one of the
    /// source's --requests requests moved. Requests of the first --tokens value.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<u32>,
    /// Requests the source engine holds, decoding, for --concurrency and --drain.
    #[arg(long, default_value_t = 16)]
    pub requests: u32,
    /// A drain: one pre-stop `Migrate` (NUM_REQ -1) moves every request of the source, with
    /// LLUMNIX_MAX_REQ_MIG_OUT 1 (one at a time) and 8; time until the source is empty.
    #[arg(long)]
    pub drain: bool,
}

/// Output tokens the request may still produce: it must keep decoding through every migration.
const HEADROOM_TOKENS: u32 = 8192;

/// Runs the bench; one JSON line per sequence length.
pub fn run(a: &MigrationArgs) -> Result<(), String> {
    if a.tokens.is_empty() || a.tokens.contains(&0) || a.repeat == 0 || a.layers == 0 {
        return Err("--tokens must be positive, --repeat and --layers at least 1".into());
    }
    llumlet::migration::cuda_side::check_kv(&a.kv)?;
    if a.concurrency.contains(&0) || ((a.drain || !a.concurrency.is_empty()) && a.requests == 0) {
        return Err("--concurrency values and --requests must be at least 1".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let cms = EmbeddedCms::start()
            .await
            .map_err(|e| format!("cannot start the embedded CMS: {e}"))?;
        let dir = match &a.logs {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("llumlet-bench-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let progress = Progress::new();
        let cms = Cms::local(cms.addr().port());
        if !a.concurrency.is_empty() || a.drain {
            return throughput(a, &cms, &dir, &progress).await;
        }
        let mut first: Option<f64> = None;
        for &tokens in &a.tokens {
            let r = one_length(a, &cms, &dir, tokens, &progress).await?;
            progress.done();
            let p50 = r["downtime_p50_us"].as_f64().unwrap_or(0.0);
            super::out(&r.to_string());
            match first {
                None => first = Some(p50),
                Some(f) if f > 0.0 => super::out(
                    &json!({"bench": "migration", "tokens": tokens, "tokens_first": a.tokens[0],
                           "downtime_ratio_to_first": round(p50 / f, 3)})
                    .to_string(),
                ),
                Some(_) => {}
            }
        }
        Ok(())
    })
}

async fn status(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
) -> Result<Option<InstanceStatus>, String> {
    let v: Option<Vec<u8>> = redis::cmd("GET")
        .arg(llumlet_proto::status_key(id))
        .query_async(conn)
        .await
        .map_err(|e| format!("CMS: {e}"))?;
    Ok(v.and_then(|v| InstanceStatus::decode(&v[..]).ok()))
}

async fn one_length(
    a: &MigrationArgs,
    cms: &Cms,
    dir: &std::path::Path,
    tokens: u32,
    progress: &Progress,
) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let blocks = (tokens + HEADROOM_TOKENS).div_ceil(16) + 16;
    let engine = |requests: u32| {
        vec![
            ("--requests", requests.to_string()),
            ("--min-prompt", tokens.to_string()),
            ("--max-prompt", tokens.to_string()),
            ("--max-tokens", HEADROOM_TOKENS.to_string()),
            ("--num-blocks", blocks.to_string()),
            ("--block-size", "16".to_string()),
            ("--layers", a.layers.to_string()),
            ("--kv-heads", "8".to_string()),
            ("--head-size", "128".to_string()),
            ("--step-ms", a.step_ms.to_string()),
            ("--kv", a.kv.clone()),
        ]
    };
    let env = [("LLUMLET_TRANSPORT", a.transport.clone())];
    let mut instances = Vec::new();
    for (i, requests) in [1, 0].into_iter().enumerate() {
        let id = format!("bench-{tokens}-{i}");
        instances.push(
            Instance::spawn(&exe, dir, cms, id, &engine(requests), &env)
                .map_err(|e| format!("cannot start an instance: {e}"))?,
        );
    }
    let client = redis::Client::open(cms.url()).map_err(|e| format!("CMS: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("CMS: {e}"))?;
    let metas = wait_registered(&mut conn, &instances, Duration::from_secs(30)).await?;
    // Both engines report their KV caches (so both have registered them), and the request is
    // admitted and prefilled at the first engine's first steps.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in &instances {
        while status(&mut conn, &i.id)
            .await?
            .is_none_or(|s| s.num_total_gpu_tokens <= 0)
        {
            if Instant::now() > deadline {
                return Err(format!("{} never reported its engine's KV cache", i.id));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    loop {
        let s = status(&mut conn, &instances[0].id).await?;
        if s.is_some_and(|s| s.num_running_requests >= 1) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the {tokens}-token request never ran at {}",
                instances[0].id
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut totals = Vec::new();
    let mut failures = Vec::new();
    let mut holder = 0;
    for k in 0..a.repeat {
        progress.tick(&format!(
            "{tokens} tokens: migration {}/{} over {}",
            k + 1,
            a.repeat,
            a.transport
        ));
        let t0 = Instant::now();
        let (ok, message) = tokio::time::timeout(
            Duration::from_secs(120),
            migrate(&metas[holder], &metas[1 - holder]),
        )
        .await
        .unwrap_or((false, "no answer within 120 s".into()));
        if ok {
            totals.push(t0.elapsed().as_secs_f64());
            holder = 1 - holder;
        } else {
            failures.push(message);
        }
        // Let the engines take the request's next steps before it moves again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in &mut instances {
        i.llumlet.terminate(Duration::from_secs(5));
    }
    for i in &mut instances {
        i.engine.terminate(Duration::from_secs(5));
    }
    let (mut downtimes, mut stages, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let mut used: Vec<String> = Vec::new();
    let mut verified = 0;
    for i in &instances {
        for l in i.llumlet.output().lines() {
            if l.contains("migration out finished") && field(l, "outcome") == Some("Migrated") {
                downtimes.extend(field(l, "downtime_us").and_then(|v| v.parse::<f64>().ok()));
                stages.extend(field(l, "stages").and_then(|v| v.parse::<f64>().ok()));
                bytes.extend(field(l, "bytes").and_then(|v| v.parse::<f64>().ok()));
                if let Some(t) = field(l, "transport").map(str::to_string) {
                    if !used.contains(&t) {
                        used.push(t);
                    }
                }
            }
        }
        verified += i
            .engine
            .output()
            .lines()
            .filter(|l| l.starts_with("sim-engine: migrated-in ") && l.contains("kv=ok tokens=ok"))
            .count();
    }
    if totals.is_empty() {
        return Err(format!(
            "no migration of the {tokens}-token request succeeded: {}",
            failures.join("; ")
        ));
    }
    if verified != totals.len() || downtimes.len() != totals.len() {
        return Err(format!(
            "{} migrations answered success, {} were logged by the sources, {} arrived verified (logs in {})",
            totals.len(),
            downtimes.len(),
            verified,
            dir.display()
        ));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut out = json!({
        "bench": "migration",
        "transport": used.join(","),
        "kv": a.kv,
        "tokens": tokens,
        "layers": a.layers,
        "step_ms": a.step_ms,
        "migrations": totals.len(),
        "failed": failures.len(),
        "failures": failures,
        "downtime_p50_us": percentile(&downtimes, 0.5),
        "downtime_p99_us": percentile(&downtimes, 0.99),
        "downtime_max_us": percentile(&downtimes, 1.0),
        "total_p50_ms": round(percentile(&totals, 0.5) * 1e3, 3),
        "stages_mean": round(mean(&stages), 2),
        "kv_bytes_mean": mean(&bytes).round(),
        "verified": true,
    });
    if a.kv == "gpu" {
        // Names the driver, and says so when it is the test double (no GPU figure).
        out["gpu"] = llumlet::migration::cuda_side::available()
            .unwrap_or_default()
            .into();
    }
    Ok(out)
}

/// Two instances for the throughput runs: the source's engine holding `requests` decoding
/// requests of `tokens` prompt tokens, the destination's none; both llumlets with `env`.
async fn pair(
    a: &MigrationArgs,
    cms: &Cms,
    dir: &std::path::Path,
    tag: &str,
    env: &[(&str, String)],
) -> Result<(Vec<Instance>, Vec<llumlet_proto::cms::InstanceMetadata>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let tokens = a.tokens[0];
    const OUTPUT: u32 = 4096;
    let blocks = a.requests * (tokens + OUTPUT).div_ceil(16) + 64;
    let engine = |requests: u32| {
        vec![
            ("--requests", requests.to_string()),
            ("--min-prompt", tokens.to_string()),
            ("--max-prompt", tokens.to_string()),
            ("--max-tokens", OUTPUT.to_string()),
            ("--num-blocks", blocks.to_string()),
            ("--block-size", "16".to_string()),
            ("--layers", a.layers.to_string()),
            ("--kv-heads", "8".to_string()),
            ("--head-size", "128".to_string()),
            ("--step-ms", a.step_ms.to_string()),
            ("--kv", a.kv.clone()),
        ]
    };
    let mut instances = Vec::new();
    for (i, requests) in [a.requests, 0].into_iter().enumerate() {
        let id = format!("bench-{tag}-{i}");
        instances.push(
            Instance::spawn(&exe, dir, cms, id, &engine(requests), env)
                .map_err(|e| format!("cannot start an instance: {e}"))?,
        );
    }
    let client = redis::Client::open(cms.url()).map_err(|e| format!("CMS: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("CMS: {e}"))?;
    let metas = wait_registered(&mut conn, &instances, Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let src = status(&mut conn, &instances[0].id).await?;
        let dst = status(&mut conn, &instances[1].id).await?;
        if src.is_some_and(|s| s.num_running_requests as u32 >= a.requests)
            && dst.is_some_and(|s| s.num_total_gpu_tokens > 0)
        {
            return Ok((instances, metas));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the {} requests never all ran at {}",
                a.requests, instances[0].id
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the source llumlet logged of its migrations, and how many arrived verified.
struct Moved {
    downtimes: Vec<f64>,
    bytes: f64,
    migrated: usize,
    verified: usize,
    transports: Vec<String>,
}

fn moved(instances: &mut [Instance]) -> Moved {
    for i in instances.iter_mut() {
        i.llumlet.terminate(Duration::from_secs(5));
    }
    for i in instances.iter_mut() {
        i.engine.terminate(Duration::from_secs(5));
    }
    let mut m = Moved {
        downtimes: Vec::new(),
        bytes: 0.0,
        migrated: 0,
        verified: 0,
        transports: Vec::new(),
    };
    for l in instances[0].llumlet.output().lines() {
        if l.contains("migration out finished") && field(l, "outcome") == Some("Migrated") {
            m.migrated += 1;
            m.downtimes
                .extend(field(l, "downtime_us").and_then(|v| v.parse::<f64>().ok()));
            m.bytes += field(l, "bytes")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if let Some(t) = field(l, "transport").map(str::to_string) {
                if !m.transports.contains(&t) {
                    m.transports.push(t);
                }
            }
        }
    }
    m.verified = instances[1]
        .engine
        .output()
        .lines()
        .filter(|l| l.starts_with("sim-engine: migrated-in ") && l.contains("kv=ok tokens=ok"))
        .count();
    m
}

/// `--concurrency` and `--drain`.
async fn throughput(
    a: &MigrationArgs,
    cms: &Cms,
    dir: &std::path::Path,
    progress: &Progress,
) -> Result<(), String> {
    let mut env = vec![("LLUMLET_TRANSPORT", a.transport.clone())];
    env.push(("LLUMNIX_MAX_REQ_MIG_IN", "8".to_string()));
    let mut per_migration_bytes = 0.0;
    for &c in &a.concurrency {
        let mut env = env.clone();
        env.push(("LLUMNIX_MAX_REQ_MIG_OUT", "8".to_string()));
        let (mut instances, metas) = pair(a, cms, dir, &format!("c{c}"), &env).await?;
        let t0 = Instant::now();
        let mut failures = Vec::new();
        let mut ok = 0u32;
        while ok < a.requests && failures.len() < 4 * a.requests as usize {
            progress.tick(&format!("concurrency {c}: {ok}/{} moved", a.requests));
            let batch = c.min(a.requests - ok);
            let calls: Vec<_> = (0..batch)
                .map(|_| {
                    let (s, d) = (metas[0].clone(), metas[1].clone());
                    tokio::spawn(async move { migrate(&s, &d).await })
                })
                .collect();
            for h in calls {
                match h.await {
                    Ok((true, _)) => ok += 1,
                    Ok((false, m)) => failures.push(m),
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let m = moved(&mut instances);
        if m.migrated == 0 || m.verified != m.migrated {
            return Err(format!(
                "concurrency {c}: {} migrated, {} arrived verified ({} failures: {:?}; logs in {})",
                m.migrated,
                m.verified,
                failures.len(),
                failures.first(),
                dir.display()
            ));
        }
        per_migration_bytes = m.bytes / m.migrated as f64;
        super::out(&json!({
            "bench": "migration", "what": "concurrent", "concurrency": c, "transport": m.transports.join(","),
            "tokens": a.tokens[0], "step_ms": a.step_ms, "migrations": m.migrated,
            "failed_calls": failures.len(), "seconds": round(wall, 3),
            "migrations_per_s": round(m.migrated as f64 / wall, 2),
            "aggregate_gb_per_s": round(m.bytes / wall / 1e9, 3),
            "downtime_p50_us": percentile(&m.downtimes, 0.5), "downtime_p99_us": percentile(&m.downtimes, 0.99),
            "kv_bytes_per_migration": per_migration_bytes.round(), "verified": true,
        }).to_string());
    }
    if a.drain {
        for out_slots in [1u32, 8] {
            let mut env = env.clone();
            env.push(("LLUMNIX_MAX_REQ_MIG_OUT", out_slots.to_string()));
            let (mut instances, metas) =
                pair(a, cms, dir, &format!("drain{out_slots}"), &env).await?;
            progress.tick(&format!(
                "drain of {} requests, {out_slots} at a time",
                a.requests
            ));
            let t0 = Instant::now();
            let (ok, message) = tokio::time::timeout(
                Duration::from_secs(300),
                crate::demo::migrate_num(&metas[0], &metas[1], -1),
            )
            .await
            .unwrap_or((false, "no answer within 300 s".into()));
            let wall = t0.elapsed().as_secs_f64();
            let m = moved(&mut instances);
            if !ok || m.migrated as u32 != a.requests || m.verified != m.migrated {
                return Err(format!(
                    "drain ({out_slots} at a time): ({ok}, {message}); {} of {} migrated, {} arrived verified (logs in {})",
                    m.migrated, a.requests, m.verified, dir.display()
                ));
            }
            per_migration_bytes = m.bytes / m.migrated as f64;
            super::out(&json!({
                "bench": "migration", "what": "drain", "out_slots": out_slots, "requests": a.requests,
                "transport": m.transports.join(","), "tokens": a.tokens[0], "step_ms": a.step_ms,
                "seconds_until_empty": round(wall, 3),
                "aggregate_gb_per_s": round(m.bytes / wall / 1e9, 3),
                "downtime_p50_us": percentile(&m.downtimes, 0.5), "downtime_p99_us": percentile(&m.downtimes, 0.99),
                "verified": true,
            }).to_string());
        }
    }
    // The transport's own throughput for one migration's bytes, in the same run.
    if per_migration_bytes > 0.0 && a.kv == "host" {
        let bytes = per_migration_bytes as u64;
        let src = super::ShmBuf::new("from", bytes)?;
        let b = if a.transport == "tcp" {
            super::tcp_loopback(&src, 20, super::transfer::encrypting()?)?
        } else {
            super::memcpy(&src, 20)?
        };
        super::out(&json!({
            "bench": "migration", "what": "baseline: the transport's own copy of one migration's bytes",
            "baseline": b.transport, "bytes": bytes, "gb_per_s": round(b.gb_per_s(), 3),
        }).to_string());
    }
    progress.done();
    Ok(())
}
