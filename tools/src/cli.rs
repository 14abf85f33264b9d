//! The `llumlet` command line: the agent (no subcommand, or `run`), and the tools around it.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use llumlet::start::{EXIT_CONFIG, EXIT_START};

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
    /// Requests admitted over the run, one per step (see --admit-every).
    #[arg(long, default_value_t = 16)]
    requests: u32,
    /// Steps between two admissions (a steady arrival rate for long runs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    admit_every: u32,
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
        "gpu" => match llumlet::migration::cuda_side::available() {
            Ok(_) => true,
            Err(why) => return bad(format!("--kv gpu: {why}")),
        },
        "auto" => llumlet::migration::cuda_side::available().is_ok(),
        other => return bad(format!("--kv {other:?}: must be host, gpu or auto")),
    };
    let cfg = crate::sim::SimConfig {
        kv_on_gpu,
        push,
        layers: a.layers,
        kv_heads: a.kv_heads,
        head_size: a.head_size,
        segment: segment_path(&a.shm.unwrap_or_else(|| segment_name(&a.instance_id))),
        requests: a.requests,
        admit_every: a.admit_every,
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
    let engine = std::thread::spawn(move || crate::sim::run(cfg, &stop2));
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
        Command::Run => llumlet::start::run(),
        Command::SimEngine(a) => sim_engine(a),
        Command::Demo(a) => crate::demo::run(a),
        Command::Bench(b) => crate::bench::run(b),
        Command::Env { markdown: true } => {
            print!("{}", llumlet::env::markdown_table());
            ExitCode::SUCCESS
        }
        Command::Env { markdown: false } => {
            for v in llumlet::env::ALL {
                println!("{}={}\t{}", v.name, v.default.unwrap_or(""), v.doc);
            }
            ExitCode::SUCCESS
        }
    }
}
