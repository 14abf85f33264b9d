//! The CMS writer: `SET key value EX ttl` and `DEL` against a real Redis, with reconnection and
//! backoff. A failed write is logged once per outage; when Redis is back, [`Cms::recovered`] wakes
//! whoever must re-register.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::Notify;

use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// A CMS operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CmsError {
    /// Redis refused or failed the command, or the connection broke.
    #[error("redis {op} {key}: {source}")]
    Redis {
        /// The command.
        op: &'static str,
        /// The key.
        key: String,
        /// What Redis said.
        #[source]
        source: redis::RedisError,
    },
    /// No connection: the last attempt failed recently and the backoff has not run out.
    #[error("redis unreachable, next connection attempt in {0:?}")]
    Backoff(Duration),
}

struct ConnState {
    conn: Option<MultiplexedConnection>,
    healthy: bool,
    failures: u64,
    next_attempt: Instant,
    backoff: Duration,
}

/// Backoff before the second connection attempt after a failure.
const BACKOFF_START: Duration = Duration::from_millis(50);

/// Writes the instance's two keys into the CMS.
pub struct Cms {
    client: redis::Client,
    conn_config: AsyncConnectionConfig,
    cfg: RedisConfig,
    ttl: u64,
    backoff_max: Duration,
    state: Mutex<ConnState>,
    recovered: Notify,
    metrics: Arc<Metrics>,
}

impl Cms {
    /// A writer for the Redis `cfg` names, with `ttl` seconds on every key; reconnection attempts
    /// back off up to `backoff_max`.
    pub fn new(
        cfg: &RedisConfig,
        ttl: u64,
        backoff_max: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Cms, redis::RedisError> {
        let mut redis_info = RedisConnectionInfo::default();
        if !cfg.password.is_empty() {
            if !cfg.username.is_empty() {
                redis_info = redis_info.set_username(&cfg.username);
            }
            redis_info = redis_info.set_password(&cfg.password);
        }
        let info = ConnectionAddr::Tcp(cfg.host.clone(), cfg.port)
            .into_connection_info()?
            .set_redis_settings(redis_info);
        let client = redis::Client::open(info)?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.socket_timeout))
            .set_response_timeout(Some(cfg.socket_timeout));
        Ok(Cms {
            client,
            conn_config,
            cfg: cfg.clone(),
            ttl,
            backoff_max: backoff_max.max(BACKOFF_START),
            state: Mutex::new(ConnState {
                conn: None,
                healthy: true,
                failures: 0,
                next_attempt: Instant::now(),
                backoff: BACKOFF_START,
            }),
            recovered: Notify::new(),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        // Plain fields written in single statements: consistent even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes (one waiter, or the next to wait) when a write succeeds after an outage.
    pub fn recovered(&self) -> &Notify {
        &self.recovered
    }

    /// Whether the last operation succeeded.
    pub fn healthy(&self) -> bool {
        self.lock().healthy
    }

    async fn connection(&self) -> Result<MultiplexedConnection, CmsError> {
        {
            let st = self.lock();
            if let Some(c) = &st.conn {
                return Ok(c.clone());
            }
            let now = Instant::now();
            if now < st.next_attempt {
                return Err(CmsError::Backoff(st.next_attempt - now));
            }
        }
        match self
            .client
            .get_multiplexed_async_connection_with_config(&self.conn_config)
            .await
        {
            Ok(c) => {
                self.lock().conn = Some(c.clone());
                Ok(c)
            }
            Err(source) => {
                let mut st = self.lock();
                st.next_attempt = Instant::now() + st.backoff;
                st.backoff = (st.backoff * 2).min(self.backoff_max);
                Err(CmsError::Redis {
                    op: "CONNECT",
                    key: format!("{}:{}", self.cfg.host, self.cfg.port),
                    source,
                })
            }
        }
    }

    async fn run(&self, op: &'static str, key: &str, cmd: &redis::Cmd) -> Result<(), CmsError> {
        let mut attempt = 0;
        let result = loop {
            let r = match self.connection().await {
                Ok(mut c) => {
                    cmd.query_async::<()>(&mut c)
                        .await
                        .map_err(|source| CmsError::Redis {
                            op,
                            key: key.to_string(),
                            source,
                        })
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => break Ok(()),
                Err(e) => {
                    if let CmsError::Redis { .. } = e {
                        // The connection may be broken: make the next attempt reconnect.
                        self.lock().conn = None;
                    }
                    if attempt >= self.cfg.retry_times || matches!(e, CmsError::Backoff(_)) {
                        break Err(e);
                    }
                    attempt += 1;
                    tokio::time::sleep(self.cfg.retry_interval).await;
                }
            }
        };
        self.record(&result);
        result
    }

    fn record(&self, result: &Result<(), CmsError>) {
        let mut st = self.lock();
        match result {
            Ok(()) => {
                st.backoff = BACKOFF_START;
                if !st.healthy {
                    st.healthy = true;
                    tracing::info!(failed_operations = st.failures, "CMS reachable again");
                    st.failures = 0;
                    drop(st);
                    self.recovered.notify_one();
                }
            }
            Err(e) => {
                self.metrics.cms_errors.inc();
                st.failures += 1;
                if st.healthy {
                    st.healthy = false;
                    tracing::warn!(error = %e, "CMS write failed; retrying with backoff (further failures of this outage are logged at DEBUG)");
                } else {
                    tracing::debug!(error = %e, "CMS write failed again");
                }
            }
        }
    }

    /// `SET key value EX ttl`.
    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), CmsError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("EX").arg(self.ttl);
        self.run("SET", key, &cmd).await
    }

    /// `DEL key`.
    pub async fn del(&self, key: &str) -> Result<(), CmsError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        self.run("DEL", key, &cmd).await
    }
}
