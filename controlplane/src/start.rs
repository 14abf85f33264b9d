//! The `llumlet` process: configuration from the environment, then the engine link, the transfer
//! endpoint, UCX and CUDA when built in, the journal's recovery, the naming directory, the agent,
//! and a graceful stop on SIGTERM, SIGINT or the parent's exit. The `llumlet` binary (in
//! `llumlet-tools`) calls [`run`] when started with no subcommand.

use std::process::ExitCode;
use std::sync::Arc;

use crate::agent::Agent;
use crate::config::{Config, ProcessEnv};
use crate::engine::QueueEngine;
use crate::migration::auth::TransferKey;
use crate::migration::endpoint::{EndpointConfig, TransferServer};
use crate::migration::link::EngineLink;
use crate::migration::migrator::LiveMigrator;
use crate::migration::rpc::NoMigrator;
use crate::ring_source::RingSource;

/// Exit code of a configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code of a start-up failure (bind, registration).
pub const EXIT_START: u8 = 1;

/// Runs the agent configured from the environment until it is told to stop; returns the
/// process exit code ([`EXIT_CONFIG`], [`EXIT_START`], or success).
pub fn run() -> ExitCode {
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
        let key = match TransferKey::load(config.transfer_secret_file.as_deref()) {
            Ok(k) => k.encrypting(config.transfer_encrypt),
            Err(e) => {
                tracing::error!("cannot load the transfer key: {e}");
                eprintln!("llumlet: cannot load the transfer key: {e}");
                return ExitCode::from(EXIT_START);
            }
        };
        if key.encrypts() {
            tracing::info!(key = %key.describe(), "transfer connections are authenticated and encrypted");
        } else {
            tracing::info!(key = %key.describe(), "transfer connections are authenticated");
        }
        let endpoint = EndpointConfig {
            key: key.clone(),
            idle_timeout: config.transfer_idle_timeout,
            max_connections: config.transfer_max_connections,
        };
        let bind = std::net::SocketAddr::from(([0, 0, 0, 0], config.transfer_port));
        let (transfer_server, transfer) = match TransferServer::start(Arc::clone(&link), bind, endpoint) {
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
        let ucx = if cfg!(feature = "ucx") && key.encrypts() {
            tracing::info!("UCX not used: it would move KV bytes unencrypted (LLUMLET_TRANSFER_ENCRYPT); migrations use shm or encrypted tcp");
            None
        } else if cfg!(feature = "ucx") {
            match crate::migration::ucx_side::UcxSide::start() {
                Ok(side) => {
                    if side.rdma() {
                        tracing::info!(ucx = %side.describe(), "UCX transport ready");
                    } else {
                        tracing::info!(ucx = %side.describe(), "UCX transport ready; no RDMA device here, so `auto` moves KV between hosts over tcp (LLUMLET_TRANSPORT=ucx still uses UCX)");
                    }
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
            key.clone(),
            {
                let server = Arc::clone(&transfer_server);
                move || server.sweep_orphans()
            },
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
        let live = config.migration.enabled.then(|| {
            LiveMigrator::new(
                Arc::clone(&link),
                config.instance_id.clone(),
                config.transport,
                naming_dir.clone(),
                ucx,
                key,
                usize::try_from(config.migration.max_req_out).unwrap_or(1),
            )
        });
        let migrator: Arc<dyn crate::migration::rpc::Migrator> = match &live {
            Some(l) => Arc::clone(l) as Arc<dyn crate::migration::rpc::Migrator>,
            None => Arc::new(NoMigrator),
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
        let counts = &agent.shared().metrics.migrations;
        transfer_server.set_counts(Arc::clone(counts));
        if let Some(l) = &live {
            l.set_counts(Arc::clone(counts));
        }
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
