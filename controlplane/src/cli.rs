//! The `llumlet` command line.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::agent::Agent;
use crate::config::{Config, ProcessEnv};
use crate::engine::QueueEngine;
use crate::migrate::NoMigrator;
use crate::migration::driver::{LiveMigrator, TransferServer};
use crate::migration::link::EngineLink;
use crate::ring_source::RingSource;

/// Exit code of a configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code of a start-up failure (bind, registration).
pub const EXIT_START: u8 = 1;

#[derive(Parser)]
#[command(
    name = "llumlet",
    version,
    about = "The engine-side agent of Llumnix: CMS status, gRPC Migrate, live migration."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent, configured from the environment (what `llumlet` with no arguments does).
    Run,
    /// Run the simulated decode engine (publishes its status through the shared-memory
    /// interface, as a real engine linked to llumlet-rs does).
    SimEngine(SimArgs),
    /// Start a small local cluster (simulated engines, their llumlets, a CMS), feed it skewed
    /// load, rebalance it with live migrations, and print what happened (and plot it).
    Demo(crate::demo::DemoArgs),
    /// Measuring tools: KV transfer throughput by transport, its baselines, migration downtime
    /// by sequence length, status path costs. One JSON object per measurement on stdout.
    #[command(subcommand)]
    Bench(crate::bench::BenchCmd),
    /// List every environment variable with its default and meaning.
    Env {
        /// Print the Markdown table of docs/configuration.md.
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// Instance id; the control segment is named from it (see LLUMLET_ENGINE_SHM).
    #[arg(long)]
    instance_id: String,
    /// Control segment name or absolute path (default: from the instance id).
    #[arg(long, env = "LLUMLET_ENGINE_SHM")]
    shm: Option<String>,
    /// Requests admitted over the run, one per step.
    #[arg(long, default_value_t = 16)]
    requests: u32,
    /// Output tokens per request.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Milliseconds per step.
    #[arg(long, default_value_t = 10)]
    step_ms: u64,
    /// Seed of the request generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// KV blocks.
    #[arg(long, default_value_t = 2048)]
    num_blocks: u32,
    /// Largest prompt in tokens.
    #[arg(long, default_value_t = 512)]
    max_prompt: u32,
    /// Smallest prompt in tokens.
    #[arg(long, default_value_t = 1)]
    min_prompt: u32,
    /// Publish the status every this many steps.
    #[arg(long, env = "LLUMNIX_INSTANCE_UPDATE_STEPS", default_value_t = 1)]
    update_steps: u32,
    /// KV cache layers (an 8B model: 32).
    #[arg(long, default_value_t = 4)]
    layers: u32,
    /// KV heads per layer (an 8B model: 8).
    #[arg(long, default_value_t = 2)]
    kv_heads: u32,
    /// Elements per head, fp16 (an 8B model: 128).
    #[arg(long, default_value_t = 64)]
    head_size: u32,
    /// `push`: publish every --update-steps steps; `pull`: only when the llumlet asks.
    #[arg(
        long,
        env = "LLUMNIX_UPDATE_INSTANCE_STATUS_MODE",
        default_value = "push",
        ignore_case = true
    )]
    status_mode: String,
    /// Where the KV cache lives: `host` (shared memory), `gpu` (GPU 0, exported as a CUDA IPC
    /// handle; needs the `cuda` feature and a GPU), or `auto` (the GPU when there is one).
    #[arg(long, default_value = "host", ignore_case = true)]
    kv: String,
}

fn sim_engine(a: SimArgs) -> ExitCode {
    use llumlet_dataplane::segment::{segment_name, segment_path};
    let bad = |msg: String| {
        eprintln!("llumlet sim-engine: {msg}");
        ExitCode::from(EXIT_CONFIG)
    };
    if [
        a.block_size,
        a.num_blocks,
        a.update_steps,
        a.max_tokens,
        a.max_prompt,
        a.layers,
        a.kv_heads,
        a.head_size,
    ]
    .contains(&0)
    {
        return bad("--block-size, --num-blocks, --max-tokens, --max-prompt, --update-steps, --layers, --kv-heads and --head-size must be at least 1".into());
    }
    let largest = u64::from(a.max_prompt) + u64::from(a.max_tokens);
    if largest.div_ceil(u64::from(a.block_size)) > u64::from(a.num_blocks) {
        return bad(format!(
            "a request of {largest} tokens does not fit in {} blocks of {} tokens",
            a.num_blocks, a.block_size
        ));
    }
    if let Err(e) = llumlet_dataplane::fault::init() {
        return bad(e);
    }
    let push = match a.status_mode.to_ascii_lowercase().as_str() {
        "push" => true,
        "pull" => false,
        other => return bad(format!("--status-mode {other:?}: must be push or pull")),
    };
    let kv_on_gpu = match a.kv.to_ascii_lowercase().as_str() {
        "host" => false,
        "gpu" => match crate::migration::cuda_side::available() {
            Ok(_) => true,
            Err(why) => return bad(format!("--kv gpu: {why}")),
        },
        "auto" => crate::migration::cuda_side::available().is_ok(),
        other => return bad(format!("--kv {other:?}: must be host, gpu or auto")),
    };
    let cfg = llumlet_dataplane::sim::SimConfig {
        kv_on_gpu,
        push,
        layers: a.layers,
        kv_heads: a.kv_heads,
        head_size: a.head_size,
        segment: segment_path(&a.shm.unwrap_or_else(|| segment_name(&a.instance_id))),
        requests: a.requests,
        max_tokens: a.max_tokens,
        step: std::time::Duration::from_millis(a.step_ms),
        seed: a.seed,
        block_size: a.block_size,
        num_blocks: a.num_blocks,
        max_prompt: a.max_prompt,
        min_prompt: a.min_prompt,
        update_steps: a.update_steps,
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("llumlet sim-engine: cannot start the async runtime");
        return ExitCode::from(EXIT_START);
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, path) = (stop.clone(), cfg.segment.clone());
    let engine = std::thread::spawn(move || llumlet_dataplane::sim::run(cfg, &stop2));
    let kv = if kv_on_gpu {
        "on GPU 0"
    } else {
        "in host memory"
    };
    eprintln!(
        "llumlet sim-engine: publishing to {}, KV cache {kv}",
        path.display()
    );
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = async { while !engine.is_finished() { tokio::time::sleep(std::time::Duration::from_millis(50)).await } } => {}
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    match engine.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("llumlet sim-engine: {e}");
            ExitCode::from(EXIT_START)
        }
        Err(_) => {
            eprintln!("llumlet sim-engine: the engine thread failed");
            ExitCode::from(EXIT_START)
        }
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(),
        Command::SimEngine(a) => sim_engine(a),
        Command::Demo(a) => crate::demo::run(a),
        Command::Bench(b) => crate::bench::run(b),
        Command::Env { markdown: true } => {
            print!("{}", crate::env::markdown_table());
            ExitCode::SUCCESS
        }
        Command::Env { markdown: false } => {
            for v in crate::env::ALL {
                println!("{}={}\t{}", v.name, v.default.unwrap_or(""), v.doc);
            }
            ExitCode::SUCCESS
        }
    }
}

fn run() -> ExitCode {
    if let Err(e) = llumlet_dataplane::fault::init() {
        eprintln!("llumlet: invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llumlet: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    crate::logging::init(&config.log, &config.instance_id);
    for var in Config::unsupported_set(&ProcessEnv) {
        tracing::warn!(
            variable = var,
            "is set but not supported by llumlet-rs; ignored (see docs/configuration.md)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("llumlet: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(async move {
        // Installed before registering, so a signal that arrives during start-up still takes
        // the graceful path.
        let signals = Signals::install();
        let mut config = config;
        let link = EngineLink::new(config.engine_shm.clone());
        let ring = Arc::new(RingSource::with_link(
            Arc::clone(&link),
            config.status_mode,
            config.engine_get_status_timeout,
        ));
        let bind = std::net::SocketAddr::from(([0, 0, 0, 0], config.transfer_port));
        let (transfer_server, transfer) = match TransferServer::start(Arc::clone(&link), bind) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(port = config.transfer_port, "cannot bind the transfer endpoint: {e}");
                eprintln!("llumlet: cannot bind the transfer endpoint on port {}: {e}", config.transfer_port);
                return ExitCode::from(EXIT_START);
            }
        };
        config.transfer_port = transfer.port();
        if cfg!(feature = "cuda") {
            match crate::migration::cuda_side::available() {
                Ok(gpu) => tracing::info!(cuda = %gpu, "GPU KV caches move over CUDA IPC"),
                Err(why) => tracing::info!("{why}: GPU KV caches cannot migrate; host KV caches use shm, tcp or ucx"),
            }
        }
        // UCX, when built in: one context and worker for migrations in and out (a destination
        // offers it to sources that ask, whatever this llumlet's own outgoing choice).
        let ucx = if cfg!(feature = "ucx") {
            match crate::migration::ucx_side::UcxSide::start() {
                Ok(side) => {
                    tracing::info!(ucx = %side.describe(), "UCX transport ready");
                    transfer_server.set_ucx(Arc::clone(&side));
                    Some(side)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "UCX unavailable; migrations use shm or tcp");
                    None
                }
            }
        } else {
            None
        };
        crate::migration::journal::spawn_recovery(
            Arc::clone(&link),
            Arc::clone(&transfer_server),
            std::time::Duration::from_secs(1),
        );
        tracing::info!(port = transfer.port(), transport = ?config.transport, "migration transfer endpoint listening");
        // Peers find this instance's transfer endpoint in the naming directory, if configured.
        let naming_dir = config
            .kv_transfer
            .as_ref()
            .and_then(|k| k.naming_dir())
            .map(std::path::Path::to_path_buf);
        if let Some(dir) = &naming_dir {
            let ip = config.host_ip.to_string();
            match crate::kv_transfer::naming::publish(dir, &config.instance_id, &ip, transfer.port()) {
                Ok(()) => tracing::info!(dir = %dir.display(), "published the transfer endpoint in the naming directory"),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot publish in the naming directory"),
            }
        }
        let migrator: Arc<dyn crate::migrate::Migrator> = if config.migration.enabled {
            LiveMigrator::new(
                Arc::clone(&link),
                config.instance_id.clone(),
                config.transport,
                naming_dir.clone(),
                ucx,
            )
        } else {
            Arc::new(NoMigrator)
        };
        let instance_id = config.instance_id.clone();
        let agent = match Agent::start(
            config,
            Arc::new(QueueEngine::new(Arc::clone(&link))),
            migrator,
            Some(ring),
        )
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("llumlet: cannot start: {e}");
                return ExitCode::from(EXIT_START);
            }
        };
        transfer_server.set_ledger(Arc::clone(&agent.shared().ledger));
        let reason = signals.wait(&agent).await;
        tracing::info!(reason, "shutting down");
        agent.shutdown().await;
        if let Some(dir) = &naming_dir {
            crate::kv_transfer::naming::withdraw(dir, &instance_id);
        }
        ExitCode::SUCCESS
    })
}

struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        if term.is_none() || int.is_none() {
            tracing::error!("cannot install the SIGTERM/SIGINT handlers");
        }
        Signals { term, int }
    }

    /// Waits for SIGTERM, SIGINT, or the agent asking to stop; says which.
    async fn wait(mut self, agent: &Agent) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => "SIGTERM",
            _ = recv(&mut self.int) => "SIGINT",
            _ = agent.stop_requested() => "parent gone",
        }
    }
}
