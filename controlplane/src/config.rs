//! Configuration: parsed from the environment (names and defaults in [`crate::env`]) and validated
//! before anything else happens, so a bad value never registers a half-configured instance.

use std::net::IpAddr;
use std::time::Duration;

use crate::env;
use crate::status::MetricMask;

/// A configuration value that breaks a rule. Printed as one line naming the variable, the value
/// and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {rule}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// The value found (empty when missing).
    pub value: String,
    /// The rule it breaks.
    pub rule: String,
}

/// How the llumlet obtains the engine's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMode {
    /// The engine pushes (gRPC `PushInstanceStatus`, or the shared-memory ring).
    Push,
    /// The llumlet asks the engine.
    Pull,
}

/// The instance type published in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceType {
    /// Serves prefill and decode.
    Neutral,
    /// Prefill only.
    Prefill,
    /// Decode only.
    Decode,
}

impl InstanceType {
    /// The string the scheduler groups instances by.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceType::Neutral => "neutral",
            InstanceType::Prefill => "prefill",
            InstanceType::Decode => "decode",
        }
    }
}

/// The gRPC port to bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    /// Let the OS pick a free port.
    Any,
    /// This port.
    Fixed(u16),
}

/// Migration limits of this instance (reference §1.2, §4.2).
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationLimits {
    /// `LLUMNIX_ENABLE_MIGRATION`.
    pub enabled: bool,
    /// `LLUMNIX_DETAILED_MIG_STATUS`.
    pub detailed: bool,
    /// `LLUMNIX_MAX_REQ_MIG_IN`.
    pub max_req_in: i32,
    /// `LLUMNIX_MAX_REQ_MIG_OUT`.
    pub max_req_out: i32,
    /// `LLUMNIX_MAX_TOKEN_MIG_IN`.
    pub max_token_in: i32,
    /// `LLUMNIX_MAX_TOKEN_MIG_OUT`.
    pub max_token_out: i32,
    /// `LLUMNIX_MAX_KV_CACHE_USAGE_RATIO_MIG_IN`.
    pub max_ratio_in: f64,
    /// `LLUMNIX_MAX_KV_CACHE_USAGE_RATIO_MIG_OUT`.
    pub max_ratio_out: f64,
}

/// The Redis the CMS lives in.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// ACL user (used only with a password).
    pub username: String,
    /// Password; empty: no AUTH.
    pub password: String,
    /// Connect and command timeout.
    pub socket_timeout: Duration,
    /// Retries of a failed command.
    pub retry_times: u32,
    /// Pause before a retry.
    pub retry_interval: Duration,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `tracing` level filter.
    pub level: tracing::Level,
    /// Whether log lines go to stderr at all.
    pub stream: bool,
    /// Text before every line.
    pub prefix: String,
}

/// `LLUMLET_TRANSPORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// shm when both ends share a host, else tcp.
    Auto,
    /// Shared memory only.
    Shm,
    /// TCP only.
    Tcp,
    /// UCX (RDMA, or UCX's shared memory and TCP): needs the `ucx` feature; falls back to tcp
    /// where the destination has no UCX.
    Ucx,
}

/// TLS of the gRPC service: PEM files, read when the service starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcTls {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
    /// Clients must present a certificate this CA signed (mutual TLS).
    pub client_ca: Option<std::path::PathBuf>,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Instance id as written into the CMS (with `_dp<rank>` when data-parallel).
    pub instance_id: String,
    /// Published `instance_type`.
    pub instance_type: InstanceType,
    /// Published `backend_type`.
    pub backend_type: String,
    /// Published `ip`, `ip_kvs` and `ip_kvt`.
    pub host_ip: IpAddr,
    /// Published `api_server_port`.
    pub api_server_port: u16,
    /// gRPC port to bind.
    pub rpc_port: PortChoice,
    /// The address the gRPC service binds (`None`: every address).
    pub rpc_bind: Option<IpAddr>,
    /// `LLUMLET_RPC_MAX_CONNECTIONS`: gRPC connections served at once.
    pub rpc_max_connections: usize,
    /// TLS of the gRPC service (`None`: plain gRPC).
    pub rpc_tls: Option<RpcTls>,
    /// The parsed `LLUMLET_KV_TRANSFER_CONFIG`, if given.
    pub kv_transfer: Option<crate::kv_transfer::KvTransferConfig>,
    /// Port of the transfer endpoint (0: a free one).
    pub transfer_port: u16,
    /// The transport of outgoing migrations.
    pub transport: TransportChoice,
    /// The cluster's transfer secret (`None`: this host's key).
    pub transfer_secret_file: Option<std::path::PathBuf>,
    /// `LLUMLET_TRANSFER_ENCRYPT`: every transfer connection is encrypted.
    pub transfer_encrypt: bool,
    /// How long a migration in waits for its source.
    pub transfer_idle_timeout: Duration,
    /// Transfer connections served at once.
    pub transfer_max_connections: usize,
    /// The engine's control segment.
    pub engine_shm: std::path::PathBuf,
    /// Prometheus endpoint port, if any (0: any free port).
    pub metrics_port: Option<u16>,
    /// Engine pid to watch.
    pub parent_pid: Option<u32>,
    /// Published `data_parallel_size`.
    pub data_parallel_size: i32,
    /// Published `dp_rank`.
    pub dp_rank: i32,
    /// Published `dp_local_rank`.
    pub dp_local_rank: i32,
    /// Published `tensor_parallel_size`.
    pub tensor_parallel_size: i32,
    /// Published `unit_id`.
    pub unit_id: String,
    /// Published `block_size`.
    pub block_size: i32,
    /// Published `max_num_batched_tokens`.
    pub max_num_batched_tokens: i32,
    /// Server-side timeout of every RPC.
    pub rpc_timeout: Duration,
    /// Pause between engine call attempts.
    pub engine_retry_interval: Duration,
    /// How long in-flight RPCs may take on shutdown.
    pub shutdown_grace: Duration,
    /// CMS Redis.
    pub redis: RedisConfig,
    /// TTL of both CMS keys, in seconds.
    pub cms_expired_time: u64,
    /// Period of status writes.
    pub status_push_interval: Duration,
    /// Period of metadata heartbeats.
    pub metadata_push_interval: Duration,
    /// Engine silence after which the instance is unschedulable.
    pub engine_get_status_timeout: Duration,
    /// Per-attempt timeout of engine migrate calls.
    pub engine_migrate_timeout: Duration,
    /// Per-attempt timeout of engine abort calls.
    pub engine_abort_timeout: Duration,
    /// Per-attempt timeout of engine migrate-in calls.
    pub engine_migrate_in_timeout: Duration,
    /// Push or pull.
    pub status_mode: StatusMode,
    /// Migration limits.
    pub migration: MigrationLimits,
    /// Which status fields are written.
    pub metric_mask: MetricMask,
    /// Period of the DEBUG log of the status.
    pub report_status_log_interval: Duration,
    /// Engine steps between status updates (engine side).
    pub instance_update_steps: u32,
    /// Logging.
    pub log: LogConfig,
}

/// Reads variables by name; `std::env::var` in production, a map in tests.
pub trait Lookup {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Lookup for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
    }
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

struct Reader<'a> {
    lookup: &'a dyn Lookup,
}

fn err(var: &'static str, value: &str, rule: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// The shortest duration any interval or timeout takes, in seconds.
const MIN_SECONDS: f64 = 0.001;
/// The longest, in seconds (a day).
const MAX_SECONDS: f64 = 86_400.0;

/// Whether `s` is written as an integer (Python's `int()` syntax), whatever its size.
fn parse_py_int_digits(s: &str) -> bool {
    let t = s.trim();
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    !digits.is_empty()
        && !digits.starts_with('_')
        && !digits.ends_with('_')
        && !digits.contains("__")
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'_')
}

/// Parses an integer the way Python's `int()` does: surrounding whitespace, an optional sign,
/// and `_` between digits are accepted. `None` also for one too large for an `i64`.
pub fn parse_py_int(s: &str) -> Option<i64> {
    if !parse_py_int_digits(s) {
        return None;
    }
    let t = s.trim();
    let neg = t.starts_with('-');
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    let v: i64 = digits.replace('_', "").parse().ok()?;
    Some(if neg { -v } else { v })
}

/// Parses a boolean: `True`/`False` in any case, or an integer (`0` false, any other true) as
/// Python's `bool(int(x))`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        other => parse_py_int(other).map(|v| v != 0),
    }
}

impl Reader<'_> {
    /// The raw value, with the default applied.
    fn raw(&self, var: &'static str) -> Option<String> {
        match self.lookup.get(var) {
            Some(v) => Some(v),
            None => env::find(var).and_then(|v| v.default).map(str::to_string),
        }
    }

    fn string(&self, var: &'static str) -> String {
        self.raw(var).unwrap_or_default()
    }

    fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        match self.raw(var) {
            Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            _ => Err(err(var, "", "is required")),
        }
    }

    fn int_in(&self, var: &'static str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let raw = self.required(var)?;
        let range = || format!("is out of range: must be between {min} and {max}");
        let v = match parse_py_int(&raw) {
            Some(v) => v,
            // Digits too many for any integer this llumlet takes.
            None if parse_py_int_digits(&raw) => return Err(err(var, &raw, range())),
            None => return Err(err(var, &raw, "must be an integer")),
        };
        if v < min || v > max {
            return Err(err(var, &raw, range()));
        }
        Ok(v)
    }

    fn i32_min(&self, var: &'static str, min: i64) -> Result<i32, ConfigError> {
        Ok(self.int_in(var, min, i64::from(i32::MAX))? as i32)
    }

    fn float(&self, var: &'static str) -> Result<(f64, String), ConfigError> {
        let raw = self.required(var)?;
        let v: f64 = raw
            .trim()
            .parse()
            .map_err(|_| err(var, &raw, "must be a number"))?;
        if !v.is_finite() {
            return Err(err(var, &raw, "must be a finite number"));
        }
        Ok((v, raw))
    }

    /// Seconds in `min..=max`: every duration has a sane range (a push interval of a
    /// picosecond would send Redis thousands of commands a second; a day is the longest wait any
    /// of them needs).
    fn seconds_in(&self, var: &'static str, min: f64, max: f64) -> Result<Duration, ConfigError> {
        let (v, raw) = self.float(var)?;
        if !(min..=max).contains(&v) {
            return Err(err(
                var,
                &raw,
                format!("is out of range: must be between {min} and {max} (seconds)"),
            ));
        }
        Duration::try_from_secs_f64(v).map_err(|_| err(var, &raw, "is out of range"))
    }

    fn seconds_positive(&self, var: &'static str) -> Result<Duration, ConfigError> {
        self.seconds_in(var, MIN_SECONDS, MAX_SECONDS)
    }

    fn seconds_non_negative(&self, var: &'static str) -> Result<Duration, ConfigError> {
        self.seconds_in(var, 0.0, MAX_SECONDS)
    }

    fn ratio(&self, var: &'static str) -> Result<f64, ConfigError> {
        let (v, raw) = self.float(var)?;
        if !(0.0..=1.0).contains(&v) {
            return Err(err(var, &raw, "must be between 0 and 1"));
        }
        Ok(v)
    }

    fn boolean(&self, var: &'static str) -> Result<bool, ConfigError> {
        let raw = self.required(var)?;
        parse_bool(&raw).ok_or_else(|| err(var, &raw, "must be a boolean: 1/0 or True/False"))
    }

    fn port(&self, var: &'static str) -> Result<u16, ConfigError> {
        Ok(self.int_in(var, 1, 65535)? as u16)
    }

    fn optional(&self, var: &'static str) -> Option<String> {
        self.raw(var).filter(|v| !v.trim().is_empty())
    }
}

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(&ProcessEnv)
    }

    /// Reads and validates the variables `lookup` gives.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Config, ConfigError> {
        let r = Reader { lookup };

        let data_parallel_size = r.i32_min(env::DATA_PARALLEL_SIZE, 1)?;
        let dp_rank = r.i32_min(env::DP_RANK, 0)?;
        if dp_rank >= data_parallel_size {
            return Err(err(
                env::DP_RANK,
                &dp_rank.to_string(),
                format!(
                    "must be less than {} ({data_parallel_size})",
                    env::DATA_PARALLEL_SIZE
                ),
            ));
        }
        let base_id = r.required(env::INSTANCE_ID)?;
        let instance_id = if data_parallel_size > 1 {
            format!("{base_id}_dp{dp_rank}")
        } else {
            base_id
        };

        let kv_transfer = match r.optional(env::KV_TRANSFER_CONFIG) {
            Some(json) => Some(crate::kv_transfer::KvTransferConfig::parse(&json).map_err(
                |rule| {
                    let shown: String = json.chars().take(80).collect();
                    err(env::KV_TRANSFER_CONFIG, &shown, rule)
                },
            )?),
            None => None,
        };
        let instance_type = match r.string(env::INSTANCE_TYPE).trim() {
            "" => kv_transfer
                .as_ref()
                .map_or(InstanceType::Neutral, |k| k.instance_type()),
            "neutral" => InstanceType::Neutral,
            "prefill" => InstanceType::Prefill,
            "decode" => InstanceType::Decode,
            other => {
                return Err(err(
                    env::INSTANCE_TYPE,
                    other,
                    "must be one of prefill, decode, neutral (or empty)",
                ))
            }
        };

        let host_ip = match r.optional(env::HOST_IP) {
            Some(v) => parse_ip(env::HOST_IP, &v)?,
            None => match r.optional(env::VLLM_HOST_IP) {
                Some(v) => parse_ip(env::VLLM_HOST_IP, &v)?,
                None => crate::net::host_ip(),
            },
        };

        let rpc_port = {
            let raw = r.required(env::RPC_PORT)?;
            match parse_py_int(&raw) {
                Some(-1) => PortChoice::Any,
                Some(p) if (1024..=65535).contains(&p) => PortChoice::Fixed(p as u16),
                Some(_) => {
                    return Err(err(
                        env::RPC_PORT,
                        &raw,
                        "must be -1 or between 1024 and 65535",
                    ))
                }
                None => return Err(err(env::RPC_PORT, &raw, "must be an integer")),
            }
        };
        let metrics_port = match r.optional(env::METRICS_PORT) {
            Some(_) => Some(r.int_in(env::METRICS_PORT, 0, 65535)? as u16),
            None => None,
        };
        let parent_pid = match r.optional(env::PARENT_PID) {
            Some(_) => Some(r.int_in(env::PARENT_PID, 1, i64::from(i32::MAX))? as u32),
            None => None,
        };

        let status_push_interval = r.seconds_positive(env::STATUS_PUSH_INTERVAL)?;
        let metadata_push_interval = r.seconds_positive(env::METADATA_PUSH_INTERVAL)?;
        let cms_expired_time = r.int_in(env::CMS_EXPIRED_TIME, 1, i64::from(u32::MAX))? as u64;
        for (var, interval) in [
            (env::STATUS_PUSH_INTERVAL, status_push_interval),
            (env::METADATA_PUSH_INTERVAL, metadata_push_interval),
        ] {
            if Duration::from_secs(cms_expired_time) <= interval {
                return Err(err(
                    env::CMS_EXPIRED_TIME,
                    &cms_expired_time.to_string(),
                    format!(
                        "must be strictly greater than {var} ({})",
                        r.string(var).trim()
                    ),
                ));
            }
        }

        let status_mode = match r
            .string(env::UPDATE_INSTANCE_STATUS_MODE)
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "push" => StatusMode::Push,
            "pull" => StatusMode::Pull,
            _ => {
                return Err(err(
                    env::UPDATE_INSTANCE_STATUS_MODE,
                    &r.string(env::UPDATE_INSTANCE_STATUS_MODE),
                    "must be push or pull (any case)",
                ))
            }
        };

        let migration = MigrationLimits {
            // HybridConnector with backend `kvt` does PD transfer only: no migration.
            enabled: r.boolean(env::ENABLE_MIGRATION)?
                && kv_transfer.as_ref().is_none_or(|k| k.migration_capable()),
            detailed: r.boolean(env::DETAILED_MIG_STATUS)?,
            max_req_in: r.i32_min(env::MAX_REQ_MIG_IN, 0)?,
            max_req_out: r.i32_min(env::MAX_REQ_MIG_OUT, 0)?,
            max_token_in: r.i32_min(env::MAX_TOKEN_MIG_IN, 0)?,
            max_token_out: r.i32_min(env::MAX_TOKEN_MIG_OUT, 0)?,
            max_ratio_in: r.ratio(env::MAX_KV_CACHE_USAGE_RATIO_MIG_IN)?,
            max_ratio_out: r.ratio(env::MAX_KV_CACHE_USAGE_RATIO_MIG_OUT)?,
        };

        let level_raw = r.string(env::LOGGING_LEVEL);
        let level = match level_raw.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => tracing::Level::DEBUG,
            "INFO" => tracing::Level::INFO,
            "WARNING" | "WARN" => tracing::Level::WARN,
            "ERROR" | "CRITICAL" => tracing::Level::ERROR,
            _ => {
                return Err(err(
                    env::LOGGING_LEVEL,
                    &level_raw,
                    "must be DEBUG, INFO, WARNING, ERROR or CRITICAL",
                ))
            }
        };
        let level = if r.boolean(env::CONFIGURE_LOGGING)? {
            level
        } else {
            level.max(tracing::Level::WARN)
        };

        // Engine-side variables: validated so that a typo stops the start here too.
        let instance_update_steps =
            r.int_in(env::INSTANCE_UPDATE_STEPS, 1, i64::from(u32::MAX))? as u32;
        r.boolean(env::ENABLE_LLUMNIX)?;
        r.boolean(env::ENABLE_PROFILING)?;
        r.int_in(env::PROFILING_STEPS, 1, i64::from(u32::MAX))?;
        r.seconds_non_negative(env::RECENT_WAITINGS_STALENESS_SECONDS)?;

        let redis = RedisConfig {
            host: r.required(env::CMS_REDIS_ADDRESS)?,
            port: r.port(env::CMS_REDIS_PORT)?,
            username: r.string(env::CMS_REDIS_USERNAME),
            password: r.string(env::CMS_REDIS_PASSWORD),
            socket_timeout: r.seconds_positive(env::REDIS_SOCKET_TIMEOUT)?,
            retry_times: r.int_in(env::REDIS_RETRY_TIMES, 0, 100)? as u32,
            retry_interval: r.seconds_non_negative(env::REDIS_RETRY_INTERVAL)?,
        };

        let engine_shm = llumlet_dataplane::segment::segment_path(
            &r.optional(env::ENGINE_SHM)
                .unwrap_or_else(|| llumlet_dataplane::segment::segment_name(&instance_id)),
        );
        let transport = match r.string(env::TRANSPORT).trim() {
            "auto" => TransportChoice::Auto,
            "shm" => TransportChoice::Shm,
            "tcp" => TransportChoice::Tcp,
            "ucx" if cfg!(feature = "ucx") => TransportChoice::Ucx,
            "ucx" => {
                return Err(err(
                    env::TRANSPORT,
                    "ucx",
                    "needs a llumlet built with the `ucx` feature (cargo build --features ucx)",
                ))
            }
            other => return Err(err(env::TRANSPORT, other, "must be auto, shm, tcp or ucx")),
        };
        let transfer_port = match r.optional(env::TRANSFER_PORT) {
            Some(_) => r.int_in(env::TRANSFER_PORT, 0, 65535)? as u16,
            None => match kv_transfer.as_ref().map(|k| &k.connector) {
                Some(crate::kv_transfer::Connector::Hybrid { rpc_port, .. }) => *rpc_port,
                _ => 0,
            },
        };
        let rpc_bind = match r.optional(env::RPC_BIND_ADDRESS) {
            Some(a) => Some(a.trim().parse::<IpAddr>().map_err(|_| {
                err(
                    env::RPC_BIND_ADDRESS,
                    &crate::pyrepr::clip(&a, 64),
                    "must be an IPv4 or IPv6 address",
                )
            })?),
            None => None,
        };
        let readable = |var: &'static str, p: String| -> Result<std::path::PathBuf, ConfigError> {
            let p = std::path::PathBuf::from(p.trim());
            std::fs::File::open(&p).map_err(|e| {
                err(
                    var,
                    &p.display().to_string(),
                    format!("cannot be read: {e}"),
                )
            })?;
            Ok(p)
        };
        let client_ca = r.optional(env::RPC_TLS_CLIENT_CA);
        let rpc_tls = match (r.optional(env::RPC_TLS_CERT), r.optional(env::RPC_TLS_KEY)) {
            (Some(cert), Some(key)) => Some(RpcTls {
                cert: readable(env::RPC_TLS_CERT, cert)?,
                key: readable(env::RPC_TLS_KEY, key)?,
                client_ca: client_ca
                    .map(|p| readable(env::RPC_TLS_CLIENT_CA, p))
                    .transpose()?,
            }),
            (None, None) => match client_ca {
                Some(p) => {
                    return Err(err(
                        env::RPC_TLS_CLIENT_CA,
                        &p,
                        "needs LLUMLET_RPC_TLS_CERT and LLUMLET_RPC_TLS_KEY",
                    ))
                }
                None => None,
            },
            (Some(_), None) => {
                return Err(err(
                    env::RPC_TLS_KEY,
                    "",
                    "is required with LLUMLET_RPC_TLS_CERT",
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    env::RPC_TLS_CERT,
                    "",
                    "is required with LLUMLET_RPC_TLS_KEY",
                ))
            }
        };
        let transfer_secret_file = match r.optional(env::TRANSFER_SECRET_FILE) {
            Some(p) => {
                let p = std::path::PathBuf::from(p.trim());
                // Checked now, so a bad secret stops the start with the variable's name; the
                // error names the file and the rule, never the content.
                crate::migration::auth::TransferKey::from_file(&p)
                    .map_err(|e| err(env::TRANSFER_SECRET_FILE, &p.display().to_string(), e))?;
                Some(p)
            }
            None => None,
        };
        let transfer_encrypt = r.boolean(env::TRANSFER_ENCRYPT)?;
        let transfer_idle_timeout =
            Duration::from_secs(r.int_in(env::TRANSFER_IDLE_TIMEOUT, 1, 3600)? as u64);
        let transfer_max_connections = r.int_in(env::TRANSFER_MAX_CONNECTIONS, 1, 4096)? as usize;
        let rpc_max_connections = r.int_in(env::RPC_MAX_CONNECTIONS, 1, 65536)? as usize;
        Ok(Config {
            rpc_bind,
            rpc_max_connections,
            rpc_tls,
            transfer_secret_file,
            transfer_encrypt,
            transfer_idle_timeout,
            transfer_max_connections,
            transfer_port,
            transport,
            unit_id: r
                .optional(env::UNIT_ID)
                .unwrap_or_else(|| instance_id.clone()),
            instance_id,
            instance_type,
            backend_type: r.string(env::BACKEND_TYPE),
            host_ip,
            api_server_port: r.port(env::API_SERVER_PORT)?,
            rpc_port,
            kv_transfer,
            engine_shm,
            metrics_port,
            parent_pid,
            data_parallel_size,
            dp_rank,
            dp_local_rank: r.i32_min(env::DP_LOCAL_RANK, 0)?,
            tensor_parallel_size: r.i32_min(env::TENSOR_PARALLEL_SIZE, 1)?,
            block_size: r.i32_min(env::BLOCK_SIZE, 1)?,
            max_num_batched_tokens: r.i32_min(env::MAX_NUM_BATCHED_TOKENS, 1)?,
            rpc_timeout: r.seconds_positive(env::RPC_TIMEOUT)?,
            engine_retry_interval: r.seconds_non_negative(env::ENGINE_RETRY_INTERVAL)?,
            shutdown_grace: r.seconds_positive(env::SHUTDOWN_GRACE)?,
            redis,
            cms_expired_time,
            status_push_interval,
            metadata_push_interval,
            engine_get_status_timeout: r.seconds_positive(env::ENGINE_GET_STATUS_TIMEOUT)?,
            engine_migrate_timeout: r.seconds_positive(env::ENGINE_MIGRATE_TIMEOUT)?,
            engine_abort_timeout: r.seconds_positive(env::ENGINE_ABORT_TIMEOUT)?,
            engine_migrate_in_timeout: r.seconds_positive(env::ENGINE_MIGRATE_IN_TIMEOUT)?,
            status_mode,
            migration,
            metric_mask: MetricMask::parse(&r.string(env::USED_METRICS)),
            report_status_log_interval: r
                .seconds_positive(env::REPORT_INSTANCE_STATUS_INTERVAL_S)?,
            instance_update_steps,
            log: LogConfig {
                level,
                stream: !r.string(env::LOG_STREAM).is_empty(),
                prefix: r.string(env::LOGGING_PREFIX),
            },
        })
    }

    /// Variables that are set but not supported; each gets one warning at start.
    pub fn unsupported_set(lookup: &dyn Lookup) -> Vec<&'static str> {
        [env::LOGGING_CONFIG_PATH, env::LOG_NODE_PATH]
            .into_iter()
            .filter(|v| lookup.get(v).is_some_and(|s| !s.trim().is_empty()))
            .collect()
    }
}

fn parse_ip(var: &'static str, v: &str) -> Result<IpAddr, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| err(var, v, "must be an IPv4 or IPv6 address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut m: HashMap<String, String> = HashMap::new();
        m.insert(env::INSTANCE_ID.into(), "inst-1".into());
        m.insert(env::API_SERVER_PORT.into(), "8000".into());
        m.insert(env::HOST_IP.into(), "10.0.0.1".into());
        for (k, v) in pairs {
            m.insert(k.to_string(), v.to_string());
        }
        Config::from_lookup(&move |k: &str| m.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_upstream_code_defaults() {
        let c = with(&[]).unwrap();
        assert_eq!(c.redis.host, "redis.roles");
        assert_eq!(c.redis.port, 10000);
        assert_eq!(c.cms_expired_time, 100);
        assert_eq!(c.status_push_interval, Duration::from_millis(40));
        assert_eq!(c.metadata_push_interval, Duration::from_secs(20));
        assert_eq!(c.engine_get_status_timeout, Duration::from_secs(30));
        assert_eq!(c.status_mode, StatusMode::Push);
        assert!(c.migration.enabled);
        assert!(!c.migration.detailed);
        assert_eq!((c.migration.max_req_in, c.migration.max_req_out), (1, 1));
        assert_eq!(
            (c.migration.max_token_in, c.migration.max_token_out),
            (100_000, 100_000)
        );
        assert_eq!(c.rpc_port, PortChoice::Any);
        assert_eq!(c.instance_type, InstanceType::Neutral);
        assert_eq!(c.rpc_timeout, Duration::from_secs(5));
        assert!(c.metric_mask.is_all());
    }

    /// Every number has a sane range: a push interval below a millisecond, or an integer too
    /// large for any type, is "out of range", with the rule; a word is "must be a number".
    #[test]
    fn numbers_outside_their_range_say_so() {
        let rule = |pairs: &[(&str, &str)]| with(pairs).unwrap_err().to_string();
        let e = rule(&[(env::STATUS_PUSH_INTERVAL, "1e-300")]);
        assert!(
            e.contains(env::STATUS_PUSH_INTERVAL) && e.contains("out of range"),
            "{e}"
        );
        let e = rule(&[(env::METADATA_PUSH_INTERVAL, "1e9")]);
        assert!(e.contains("out of range"), "{e}");
        let e = rule(&[(env::CMS_EXPIRED_TIME, "99999999999999999999")]);
        assert!(
            e.contains(env::CMS_EXPIRED_TIME) && e.contains("out of range"),
            "{e}"
        );
        let e = rule(&[(env::CMS_EXPIRED_TIME, "ten")]);
        assert!(e.contains("must be an integer"), "{e}");
        let e = rule(&[(env::TRANSFER_IDLE_TIMEOUT, "0")]);
        assert!(e.contains("out of range"), "{e}");
        assert_eq!(
            with(&[(env::STATUS_PUSH_INTERVAL, "0.001")])
                .unwrap()
                .status_push_interval,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn spellings_of_the_users_guide_are_accepted() {
        let c = with(&[
            (env::UPDATE_INSTANCE_STATUS_MODE, "PUSH"),
            (env::DETAILED_MIG_STATUS, "True"),
            (env::ENABLE_MIGRATION, "0"),
        ])
        .unwrap();
        assert_eq!(c.status_mode, StatusMode::Push);
        assert!(c.migration.detailed);
        assert!(!c.migration.enabled);
        assert_eq!(
            with(&[(env::UPDATE_INSTANCE_STATUS_MODE, "pull")])
                .unwrap()
                .status_mode,
            StatusMode::Pull
        );
        assert!(
            !with(&[(env::DETAILED_MIG_STATUS, "false")])
                .unwrap()
                .migration
                .detailed
        );
        assert_eq!(
            with(&[(env::CMS_REDIS_PORT, " 6_379 ")])
                .unwrap()
                .redis
                .port,
            6379
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_rule() {
        let e = with(&[(env::CMS_EXPIRED_TIME, "20")]).unwrap_err();
        assert_eq!(e.var, env::CMS_EXPIRED_TIME);
        assert!(
            e.rule
                .contains("strictly greater than LLUMNIX_METADATA_PUSH_INTERVAL"),
            "{e}"
        );
        let e = with(&[
            (env::STATUS_PUSH_INTERVAL, "5"),
            (env::CMS_EXPIRED_TIME, "5"),
            (env::METADATA_PUSH_INTERVAL, "1"),
        ])
        .unwrap_err();
        assert!(e.rule.contains("LLUMNIX_STATUS_PUSH_INTERVAL"), "{e}");
        let cases: &[(&str, &str)] = &[
            (env::STATUS_PUSH_INTERVAL, "0"),
            (env::STATUS_PUSH_INTERVAL, "-1"),
            (env::STATUS_PUSH_INTERVAL, "nan"),
            (env::METADATA_PUSH_INTERVAL, "abc"),
            (env::UPDATE_INSTANCE_STATUS_MODE, "poll"),
            (env::RPC_PORT, "80"),
            (env::RPC_PORT, "70000"),
            (env::RPC_PORT, "1.0"),
            (env::CMS_REDIS_PORT, "0"),
            (env::DETAILED_MIG_STATUS, "yes"),
            (env::MAX_REQ_MIG_OUT, "-2"),
            (env::INSTANCE_TYPE, "PREFILL"),
            (env::API_SERVER_PORT, ""),
            (env::INSTANCE_ID, " "),
            (env::HOST_IP, "not-an-ip"),
            (env::MAX_KV_CACHE_USAGE_RATIO_MIG_OUT, "1.5"),
            (env::INSTANCE_UPDATE_STEPS, "0"),
            (env::LOGGING_LEVEL, "LOUD"),
        ];
        for (var, value) in cases {
            let e = with(&[(var, value)]).expect_err(&format!("{var}={value} accepted"));
            assert_eq!(&e.var, var, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn kv_transfer_config_sets_type_and_migration() {
        let hybrid = |backend: &str, role: &str| {
            format!(
                r#"{{"kv_connector":"HybridConnector","kv_role":"{role}","kv_connector_extra_config":{{"backend":"{backend}","naming_url":"file:/tmp/n","kvt_inst_id":"t","rpc_port":"29876"}}}}"#
            )
        };
        let c = with(&[(env::KV_TRANSFER_CONFIG, &hybrid("kvt", "kv_producer"))]).unwrap();
        assert_eq!(c.instance_type, InstanceType::Prefill);
        assert!(!c.migration.enabled);
        let c = with(&[(
            env::KV_TRANSFER_CONFIG,
            &hybrid("kvt+migration", "kv_consumer"),
        )])
        .unwrap();
        assert_eq!(c.instance_type, InstanceType::Decode);
        assert!(c.migration.enabled);
        let c = with(&[
            (
                env::KV_TRANSFER_CONFIG,
                &hybrid("kvt+migration", "kv_consumer"),
            ),
            (env::INSTANCE_TYPE, "neutral"),
        ])
        .unwrap();
        assert_eq!(
            c.instance_type,
            InstanceType::Neutral,
            "an explicit type wins"
        );
        let e = with(&[(env::KV_TRANSFER_CONFIG, "{not json")]).unwrap_err();
        assert_eq!(e.var, env::KV_TRANSFER_CONFIG);
        assert!(e.rule.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn python_int_semantics() {
        assert_eq!(parse_py_int(" -12 "), Some(-12));
        assert_eq!(parse_py_int("1_000"), Some(1000));
        assert_eq!(parse_py_int("1.0"), None);
        assert_eq!(parse_py_int("_1"), None);
        assert_eq!(parse_py_int(""), None);
        assert_eq!(parse_bool("2"), Some(true));
        assert_eq!(parse_bool("TRUE"), Some(true));
    }

    #[test]
    fn data_parallel_suffix_and_host_ip_fallback() {
        let c = with(&[(env::DATA_PARALLEL_SIZE, "2"), (env::DP_RANK, "1")]).unwrap();
        assert_eq!(c.instance_id, "inst-1_dp1");
        let mut m: HashMap<String, String> = HashMap::new();
        m.insert(env::INSTANCE_ID.into(), "x".into());
        m.insert(env::API_SERVER_PORT.into(), "1".into());
        m.insert(env::VLLM_HOST_IP.into(), "10.1.2.3".into());
        let c = Config::from_lookup(&move |k: &str| m.get(k).cloned()).unwrap();
        assert_eq!(c.host_ip.to_string(), "10.1.2.3");
    }
}
