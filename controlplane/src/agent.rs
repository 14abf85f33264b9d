//! The running llumlet: binds the gRPC service, registers in the CMS, runs the metadata heartbeat
//! and the status loop, watches the parent, and shuts down in phases (stop accepting, drain with a
//! deadline, remove the instance from the CMS).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llumlet_proto::cms::InstanceMetadata;
use llumlet_proto::llumlet::llumlet_server::LlumletServer;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::cms::Cms;
use crate::config::{Config, PortChoice};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::migration::rpc::{Migrator, SlotLedger};
use crate::service::{LlumletService, Shared};
use crate::status::{wall_ms, MigrationLoad, PushedStatus, StatusReporter, StatusSource, Tick};
use llumlet_dataplane::sys::parent_pid;
use llumlet_dataplane::sys::pid_alive;

/// Registration attempts at start (upstream: 3, 5 s apart).
const REGISTER_ATTEMPTS: u32 = 3;
const REGISTER_RETRY: Duration = Duration::from_secs(5);

/// Why the llumlet could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The gRPC or metrics port could not be bound.
    #[error("cannot listen on {what} port {port}: {source}")]
    Bind {
        /// Which endpoint.
        what: &'static str,
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The status thread could not be started.
    #[error("cannot start the status thread: {source}")]
    Thread {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC service's TLS files could not be used.
    #[error(
        "gRPC TLS (LLUMLET_RPC_TLS_CERT, LLUMLET_RPC_TLS_KEY, LLUMLET_RPC_TLS_CLIENT_CA): {0}"
    )]
    Tls(String),
    /// Registration failed on every attempt.
    #[error("could not register in the CMS after {REGISTER_ATTEMPTS} attempts: {0}")]
    Register(crate::cms::CmsError),
}

/// A started llumlet.
pub struct Agent {
    shared: Arc<Shared>,
    cms: Arc<Cms>,
    rpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    server_stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    loops: Vec<JoinHandle<()>>,
    status: Option<StatusThread>,
    stop_requested: Arc<Notify>,
}

/// The largest gRPC message the service reads or writes (tonic's default, set on purpose: a
/// `PushInstanceStatus` or `Migrate` is a few kilobytes).
pub const MAX_RPC_MESSAGE: usize = 4 << 20;

async fn bind_rpc(choice: PortChoice, bind: Option<IpAddr>) -> Result<TcpListener, StartError> {
    let port = match choice {
        PortChoice::Any => 0,
        PortChoice::Fixed(p) => p,
    };
    if let Some(ip) = bind {
        return TcpListener::bind((ip, port))
            .await
            .map_err(|source| StartError::Bind {
                what: "gRPC",
                port,
                source,
            });
    }
    // Dual-stack `[::]` as upstream; fall back to IPv4 where IPv6 is off.
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(StartError::Bind {
            what: "gRPC",
            port,
            source: e,
        }),
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .map_err(|source| StartError::Bind {
                what: "gRPC",
                port,
                source,
            }),
    }
}

/// The service's TLS identity (and client CA) from the configured PEM files.
fn server_tls(
    tls: &crate::config::RpcTls,
) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StartError::Tls(format!("{}: {e}", p.display())))
    };
    let mut cfg =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(cfg)
}

/// The metadata this instance publishes.
pub fn metadata(config: &Config, llumlet_port: u16, created: f64) -> InstanceMetadata {
    let ip = config.host_ip.to_string();
    InstanceMetadata {
        instance_id: config.instance_id.clone(),
        instance_type: config.instance_type.as_str().into(),
        backend_type: config.backend_type.clone(),
        ip: ip.clone(),
        ip_kvs: ip,
        api_server_port: i32::from(config.api_server_port),
        llumlet_port: i32::from(llumlet_port),
        // The transfer endpoint this llumlet serves (bound before start; HybridConnector's
        // `rpc_port` unless LLUMLET_TRANSFER_PORT says otherwise).
        kvt_port: i32::from(config.transfer_port),
        node_id: String::new(),
        data_parallel_size: config.data_parallel_size,
        tensor_parallel_size: config.tensor_parallel_size,
        unit_id: config.unit_id.clone(),
        dp_rank: config.dp_rank,
        ep_rank: 0,
        dp_local_rank: config.dp_local_rank,
        utc_create: created,
        utc_update: created,
        ip_kvt: config.host_ip.to_string(),
        block_size: config.block_size,
        max_num_batched_tokens: config.max_num_batched_tokens,
    }
}

impl Agent {
    /// Starts a llumlet: binds, serves gRPC, registers, and starts its loops. `source` is where
    /// engine statuses come from besides `PushInstanceStatus` (`None`: only pushes).
    pub async fn start(
        config: Config,
        engine: Arc<dyn Engine>,
        migrator: Arc<dyn Migrator>,
        source: Option<Arc<dyn StatusSource>>,
    ) -> Result<Agent, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let backoff_max = (config.metadata_push_interval / 2).min(Duration::from_secs(1));
        let cms = Arc::new(Cms::new(
            &config.redis,
            config.cms_expired_time,
            backoff_max,
            metrics.clone(),
        ));

        let listener = bind_rpc(config.rpc_port, config.rpc_bind).await?;
        let rpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
            what: "gRPC",
            port: 0,
            source,
        })?;
        let metrics_listener = match config.metrics_port {
            Some(port) => Some(
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    .await
                    .map_err(|source| StartError::Bind {
                        what: "metrics",
                        port,
                        source,
                    })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

        let pushed = Arc::new(PushedStatus::default());
        let shared = Arc::new(Shared {
            config: config.clone(),
            pushed: pushed.clone(),
            ledger: SlotLedger::new(config.migration.clone()),
            migrator,
            engine,
            metrics: metrics.clone(),
            engine_failed: Arc::new(Notify::new()),
        });

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = LlumletServer::new(LlumletService::new(shared.clone()))
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &config.rpc_tls {
            builder = builder
                .tls_config(server_tls(tls)?)
                .map_err(|e| StartError::Tls(e.to_string()))?;
        }
        let server = tokio::spawn(builder.add_service(svc).serve_with_incoming_shutdown(
            crate::rpc_incoming::limited(
                listener,
                config.rpc_max_connections,
                crate::rpc_incoming::FIRST_BYTE_WITHIN,
            ),
            async {
                let _ = stop_rx.await;
            },
        ));
        tracing::info!(grpc = %rpc_addr, metrics = ?metrics_addr, "llumlet listening");

        let mut loops = Vec::new();
        if let Some(l) = metrics_listener {
            loops.push(tokio::spawn(crate::metrics::serve(l, metrics.clone())));
        }

        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let meta = metadata(&config, rpc_addr.port(), created).encode_to_vec();
        let meta_key = llumlet_proto::metadata_key(&config.instance_id);
        let mut attempt = 1;
        loop {
            match cms.set(&meta_key, &meta).await {
                Ok(()) => break,
                Err(e) if attempt >= REGISTER_ATTEMPTS => {
                    let _ = stop_tx.send(());
                    return Err(StartError::Register(e));
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "registration in the CMS failed; retrying in {REGISTER_RETRY:?}");
                    attempt += 1;
                    tokio::time::sleep(REGISTER_RETRY).await;
                }
            }
        }
        metrics.metadata_pushes.inc();
        tracing::info!(instance_id = %config.instance_id, key = %meta_key, "registered in the CMS");

        loops.push(tokio::spawn(metadata_loop(
            cms.clone(),
            config.clone(),
            meta_key,
            meta,
            metrics.clone(),
        )));
        let sources: Vec<Arc<dyn StatusSource>> = std::iter::once(pushed as Arc<dyn StatusSource>)
            .chain(source)
            .collect();
        let status = StatusThread::start(cms.clone(), shared.clone(), sources)
            .map_err(|source| StartError::Thread { source })?;
        // The thread sleeps between ticks; an engine failure wakes it at once.
        loops.push(tokio::spawn({
            let (shared, wake, thread) = (shared.clone(), status.wake.clone(), status.thread());
            async move {
                loop {
                    shared.engine_failed.notified().await;
                    wake.engine_failed.store(true, Ordering::SeqCst);
                    thread.unpark();
                }
            }
        }));

        let stop_requested = Arc::new(Notify::new());
        if let Some(pid) = config.parent_pid {
            loops.push(tokio::spawn(parent_watch(
                pid,
                parent_pid(),
                stop_requested.clone(),
            )));
        }

        Ok(Agent {
            shared,
            cms,
            rpc_addr,
            metrics_addr,
            server_stop: Some(stop_tx),
            server,
            loops,
            status: Some(status),
            stop_requested,
        })
    }

    /// The bound gRPC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The bound metrics address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The state the handlers share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Completes when the llumlet wants to stop by itself (its parent is gone).
    pub async fn stop_requested(&self) {
        self.stop_requested.notified().await
    }

    /// Shuts down: stops the loops, stops accepting RPCs and lets in-flight ones finish within
    /// the grace period, then deletes both CMS keys.
    pub async fn shutdown(mut self) {
        for l in &self.loops {
            l.abort();
        }
        // Stopped and joined before the keys are deleted, so no late push re-creates one.
        if let Some(t) = self.status.take() {
            let _ = tokio::task::spawn_blocking(move || t.stop()).await;
        }
        if let Some(tx) = self.server_stop.take() {
            let _ = tx.send(());
        }
        let grace = self.shared.config.shutdown_grace;
        if tokio::time::timeout(grace, &mut self.server).await.is_err() {
            tracing::warn!(
                ?grace,
                "in-flight RPCs did not finish within the grace period; stopping anyway"
            );
            self.server.abort();
        }
        let id = &self.shared.config.instance_id;
        for key in [
            llumlet_proto::metadata_key(id),
            llumlet_proto::status_key(id),
        ] {
            if let Err(e) = self.cms.del(&key).await {
                tracing::warn!(error = %e, "could not remove the instance from the CMS; it expires with its TTL");
            }
        }
        tracing::info!(instance_id = %id, "llumlet stopped; instance removed from the CMS");
    }
}

async fn metadata_loop(
    cms: Arc<Cms>,
    config: Arc<Config>,
    key: String,
    meta: Vec<u8>,
    metrics: Arc<Metrics>,
) {
    let interval = config.metadata_push_interval;
    let retry = (interval / 2).min(Duration::from_secs(1));
    let mut ok = true;
    loop {
        let wait = if ok { interval } else { retry };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cms.recovered().notified() => {}
        }
        ok = cms.set(&key, &meta).await.is_ok();
        if ok {
            metrics.metadata_pushes.inc();
        }
    }
}

/// What wakes the status thread before its next tick.
#[derive(Default)]
struct Wake {
    stop: AtomicBool,
    engine_failed: AtomicBool,
}

/// The status loop on its own thread: it sleeps until each tick and writes the status with a
/// blocking socket ([`Cms::set_blocking`]), so a push costs a sleep, a `write` and a `read`
/// and no async scheduling (docs/BENCHMARKS.md: the llumlet's CPU per push).
struct StatusThread {
    handle: Option<std::thread::JoinHandle<()>>,
    thread: std::thread::Thread,
    wake: Arc<Wake>,
}

impl StatusThread {
    fn start(
        cms: Arc<Cms>,
        shared: Arc<Shared>,
        sources: Vec<Arc<dyn StatusSource>>,
    ) -> std::io::Result<StatusThread> {
        let wake = Arc::new(Wake::default());
        let w = wake.clone();
        let handle = std::thread::Builder::new()
            .name("llumlet-status".into())
            .spawn(move || status_loop(&cms, &shared, &sources, &w))?;
        Ok(StatusThread {
            thread: handle.thread().clone(),
            handle: Some(handle),
            wake,
        })
    }

    fn thread(&self) -> std::thread::Thread {
        self.thread.clone()
    }

    /// Stops the thread and waits for it (at most one push in flight, bounded by the socket
    /// timeout).
    fn stop(mut self) {
        self.wake.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for StatusThread {
    fn drop(&mut self) {
        // Dropped without `stop` (the agent dropped without shutting down): stop, do not wait.
        self.wake.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

fn status_loop(cms: &Cms, shared: &Shared, sources: &[Arc<dyn StatusSource>], wake: &Wake) {
    let config = &shared.config;
    let key = llumlet_proto::status_key(&config.instance_id);
    let mut reporter = StatusReporter::new(
        config.instance_id.clone(),
        config.migration.clone(),
        config.metric_mask,
        config.engine_get_status_timeout,
    );
    let interval = config.status_push_interval;
    let mut next = Instant::now();
    let mut last_tick = Tick::NoStatus;
    let mut last_debug = Instant::now();
    loop {
        // Until the next tick (the first is at once), or an engine failure, or stop. A late tick
        // delays the ones after it rather than bunching them up.
        loop {
            if wake.stop.load(Ordering::SeqCst) {
                return;
            }
            if wake.engine_failed.swap(false, Ordering::SeqCst) {
                reporter.mark_engine_failed();
                break;
            }
            let now = Instant::now();
            if now >= next {
                next = if next + interval <= now {
                    now + interval
                } else {
                    next + interval
                };
                break;
            }
            std::thread::park_timeout(next - now);
        }
        let now = Instant::now();
        let mut fresh = false;
        for s in sources {
            if s.engine_failed() {
                reporter.mark_engine_failed();
            }
            if let Some(status) = s.take_newest() {
                shared.metrics.engine_status_at(now);
                shared.ledger.observe(MigrationLoad::of(&status));
                reporter.accept(status, now);
                fresh = true;
            }
        }
        let tick = reporter.tick(fresh, now, wall_ms(), &shared.ledger.local());
        match (last_tick, tick) {
            (_, Tick::NoStatus) => continue,
            (Tick::EngineSilent, Tick::EngineSilent) => {}
            (_, Tick::EngineSilent) => tracing::warn!(
                timeout = ?config.engine_get_status_timeout,
                "no status from the engine within the timeout; reporting schedulable=false"
            ),
            (Tick::EngineSilent, _) => {
                tracing::info!("engine status resumed; reporting schedulable=true")
            }
            _ => {}
        }
        last_tick = tick;
        if now.duration_since(last_debug) >= config.report_status_log_interval {
            last_debug = now;
            tracing::debug!(status = ?reporter.last(), "instance status");
        }
        if cms.set_blocking(&key, reporter.encoded()).is_ok() {
            shared.metrics.status_pushes.inc();
        }
    }
}

/// Watches `pid`: gone (or, when it was our parent at start, we were re-parented) → stop.
async fn parent_watch(pid: u32, parent_at_start: u32, stop: Arc<Notify>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        ticker.tick().await;
        // A dead parent lingers as a zombie until reaped, so also notice the re-parenting.
        let reparented = parent_at_start == pid && parent_pid() != pid;
        if reparented || !pid_alive(pid) {
            tracing::info!(parent_pid = pid, "parent process is gone; shutting down");
            stop.notify_one();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::mpsc;

    struct Env(HashMap<&'static str, String>);

    impl crate::config::Lookup for Env {
        fn get(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    /// A Redis stand-in on loopback that answers `+OK` to everything and sends each SET's value
    /// through the channel.
    fn fake_redis() -> (u16, mpsc::Receiver<Vec<u8>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let n: usize = line[1..].trim().parse().unwrap();
                        let mut args = Vec::new();
                        for _ in 0..n {
                            line.clear();
                            r.read_line(&mut line).unwrap();
                            let len: usize = line[1..].trim().parse().unwrap();
                            let mut a = vec![0u8; len + 2];
                            r.read_exact(&mut a).unwrap();
                            a.truncate(len);
                            args.push(a);
                        }
                        if args[0] == b"SET" {
                            let _ = tx.send(args[2].clone());
                        }
                        w.write_all(b"+OK\r\n").unwrap();
                    }
                });
            }
        });
        (port, rx)
    }

    #[test]
    fn the_status_thread_pushes_at_once_on_an_engine_failure_and_stops_promptly() {
        let (port, sets) = fake_redis();
        let env = Env(HashMap::from([
            ("LLUMLET_INSTANCE_ID", "t".to_string()),
            ("LLUMNIX_VLLM_API_SERVER_PORT", "8000".to_string()),
            ("LLUMNIX_CMS_REDIS_ADDRESS", "127.0.0.1".to_string()),
            ("LLUMNIX_CMS_REDIS_PORT", port.to_string()),
            // Far longer than the test: every push after the first is a wake-up.
            ("LLUMNIX_STATUS_PUSH_INTERVAL", "60".to_string()),
        ]));
        let config = Arc::new(Config::from_lookup(&env).unwrap());
        let metrics = Arc::new(Metrics::default());
        let pushed = Arc::new(PushedStatus::default());
        pushed.push(llumlet_proto::cms::InstanceStatus {
            schedulable: true,
            num_total_gpu_tokens: 100,
            ..Default::default()
        });
        let shared = Arc::new(Shared {
            config: config.clone(),
            pushed: pushed.clone(),
            ledger: SlotLedger::new(config.migration.clone()),
            migrator: Arc::new(crate::migration::rpc::NoMigrator),
            engine: Arc::new(crate::engine::NoEngine),
            metrics: metrics.clone(),
            engine_failed: Arc::new(Notify::new()),
        });
        let cms = Arc::new(Cms::new(&config.redis, 10, Duration::from_secs(1), metrics));
        let t = StatusThread::start(cms, shared, vec![pushed as Arc<dyn StatusSource>]).unwrap();
        let decode = |b: Vec<u8>| llumlet_proto::cms::InstanceStatus::decode(&b[..]).unwrap();
        // The first tick is at once.
        let first = decode(sets.recv_timeout(Duration::from_secs(5)).unwrap());
        assert!(first.schedulable);
        assert!(sets.recv_timeout(Duration::from_millis(300)).is_err());
        // An engine failure is reported at once, not a minute later.
        t.wake.engine_failed.store(true, Ordering::SeqCst);
        t.thread().unpark();
        let failed = decode(sets.recv_timeout(Duration::from_secs(5)).unwrap());
        assert!(!failed.schedulable);
        let begin = Instant::now();
        t.stop();
        assert!(
            begin.elapsed() < Duration::from_secs(2),
            "{:?}",
            begin.elapsed()
        );
    }
}
