//! The `llumlet` command line.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::agent::Agent;
use crate::config::{Config, ProcessEnv};
use crate::engine::NoEngine;
use crate::migrate::NoMigrator;

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
    /// List every environment variable with its default and meaning.
    Env {
        /// Print the Markdown table of docs/configuration.md.
        #[arg(long)]
        markdown: bool,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(),
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
        let agent = match Agent::start(config, Arc::new(NoEngine), Arc::new(NoMigrator), None).await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("llumlet: cannot start: {e}");
                return ExitCode::from(EXIT_START);
            }
        };
        let reason = signals.wait(&agent).await;
        tracing::info!(reason, "shutting down");
        agent.shutdown().await;
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
