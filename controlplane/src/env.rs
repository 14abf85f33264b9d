//! Every environment variable the llumlet reads, in one place: name, default and meaning.
//!
//! `docs/configuration.md` lists exactly these variables with these defaults; the test
//! `configuration_doc_matches_code` fails if the two disagree. `config.rs` parses them.

/// Who reads a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read and validated by the llumlet.
    Llumlet,
    /// Read by the engine (upstream vLLM patch or our simulated engine); the llumlet validates it
    /// when set so a typo is caught early, but does not otherwise use it.
    Engine,
    /// Accepted for compatibility with the Python llumlet's logging set-up; see the meaning.
    Logging,
}

/// One environment variable.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// The name, e.g. `LLUMNIX_RPC_PORT`.
    pub name: &'static str,
    /// The default as written in the environment (`None`: unset means absent or required).
    pub default: Option<&'static str>,
    /// Who reads it.
    pub scope: Scope,
    /// One line: what it means and which values are accepted.
    pub doc: &'static str,
}

macro_rules! vars {
    ($( $ident:ident = $name:literal, $default:expr, $scope:ident, $doc:literal; )*) => {
        $(
            #[doc = $doc]
            pub const $ident: &str = $name;
        )*
        /// Every variable, in the order of `docs/configuration.md`.
        pub const ALL: &[Var] = &[
            $( Var { name: $name, default: $default, scope: Scope::$scope, doc: $doc }, )*
        ];
    };
}

vars! {
    INSTANCE_ID = "LLUMLET_INSTANCE_ID", None, Llumlet,
        "Required. The instance id written into the CMS keys and every status.";
    HOST_IP = "LLUMLET_HOST_IP", None, Llumlet,
        "IP address published as `ip`/`ip_kvs`/`ip_kvt`; falls back to `VLLM_HOST_IP`, then the host's own address.";
    VLLM_HOST_IP = "VLLM_HOST_IP", None, Llumlet,
        "vLLM's host address; used when `LLUMLET_HOST_IP` is not set.";
    INSTANCE_TYPE = "LLUMNIX_INSTANCE_TYPE", Some(""), Llumlet,
        "`prefill`, `decode`, `neutral`, or empty (= `neutral`).";
    API_SERVER_PORT = "LLUMNIX_VLLM_API_SERVER_PORT", None, Llumlet,
        "Required. The engine's API server port, published as `api_server_port` (1-65535).";
    RPC_PORT = "LLUMNIX_RPC_PORT", Some("-1"), Llumlet,
        "gRPC port of the `llumlet.Llumlet` service: 1024-65535, or -1 to pick a free port.";
    RPC_MAX_CONNECTIONS = "LLUMLET_RPC_MAX_CONNECTIONS", Some("1024"), Llumlet,
        "gRPC connections served at once (the Llumnix scheduler keeps one or two); one more is closed at once, and a connection that has not sent its HTTP/2 preface in its first 5 s is closed: 1-65536.";
    RPC_BIND_ADDRESS = "LLUMLET_RPC_BIND_ADDRESS", None, Llumlet,
        "Address the gRPC service listens on (an IPv4 or IPv6 address); unset: every address (`[::]`, else `0.0.0.0`), as upstream.";
    RPC_TLS_CERT = "LLUMLET_RPC_TLS_CERT", None, Llumlet,
        "PEM certificate chain of the gRPC service; with `LLUMLET_RPC_TLS_KEY` the service speaks only TLS. Unset: plain gRPC, as the Llumnix scheduler dials.";
    RPC_TLS_KEY = "LLUMLET_RPC_TLS_KEY", None, Llumlet,
        "PEM private key of `LLUMLET_RPC_TLS_CERT`.";
    RPC_TLS_CLIENT_CA = "LLUMLET_RPC_TLS_CLIENT_CA", None, Llumlet,
        "PEM CA certificate: with TLS on, only clients presenting a certificate it signed are served (mutual TLS).";
    ENGINE_SHM = "LLUMLET_ENGINE_SHM", None, Llumlet,
        "The engine's control segment: a name under /dev/shm or an absolute path; unset: `llumlet-ctl-<instance id>`.";
    KV_TRANSFER_CONFIG = "LLUMLET_KV_TRANSFER_CONFIG", None, Llumlet,
        "The engine's `--kv-transfer-config` JSON (HybridConnector or MooncakeConnector): sets the instance type from `kv_role`, `kvt_port`, and with HybridConnector backend `kvt` turns migration off.";
    TRANSFER_PORT = "LLUMLET_TRANSFER_PORT", None, Llumlet,
        "Port of the migration transfer endpoint, published as `kvt_port`: 1-65535, 0 for a free port; unset: HybridConnector's `rpc_port`, else a free port.";
    TRANSFER_SECRET_FILE = "LLUMLET_TRANSFER_SECRET_FILE", None, Llumlet,
        "File holding the cluster's transfer secret (at least 32 random bytes, mode 0600 or 0400), the same on every llumlet that migrates to or from this one: transfer connections are mutually authenticated with it before any message, and every control message is tagged. Unset: this host's key (`/dev/shm/llumlet-transfer-key-<uid>`, made by the first llumlet), so only llumlets of this user on this host can connect.";
    TRANSFER_ENCRYPT = "LLUMLET_TRANSFER_ENCRYPT", Some("0"), Llumlet,
        "Encrypt every transfer connection (AES-256-GCM, keys from an X25519 exchange authenticated by the transfer secret): control messages, request states and `tcp`'s KV bytes. A llumlet with it accepts no unencrypted connection (set it on every llumlet of the cluster) and does not use UCX, which would move KV bytes unencrypted: between hosts KV moves over encrypted `tcp`; `shm` and `cuda` (one machine) are unchanged.";
    TRANSFER_IDLE_TIMEOUT = "LLUMLET_TRANSFER_IDLE_TIMEOUT", Some("30"), Llumlet,
        "Seconds a migration in may wait for its source before it is aborted and its reservation freed (longer than the longest stage copy): 1-3600.";
    TRANSFER_MAX_CONNECTIONS = "LLUMLET_TRANSFER_MAX_CONNECTIONS", Some("64"), Llumlet,
        "Transfer connections served at once (each a thread); more are closed at once: 1-4096.";
    TRANSPORT = "LLUMLET_TRANSPORT", Some("auto"), Llumlet,
        "KV transport of outgoing migrations: `auto` (shm when the destination is on this host and can map our regions, else ucx where both ends have it, else tcp), `shm`, `tcp`, `ucx` (needs the `ucx` feature; UCX's own `UCX_TLS`, `UCX_NET_DEVICES` apply).";
    TEST_FAULTS = "LLUMLET_TEST_FAULTS", None, Llumlet,
        "Testing only: inject faults at migration steps, `point=action[@n],...` (actions `kill`, `hang`, `pause`, `cut`, `refuse`; points in docs/migration.md). Unset: none.";
    METRICS_PORT = "LLUMLET_METRICS_PORT", None, Llumlet,
        "Port of the Prometheus `/metrics` endpoint: 1-65535, 0 for a free port; unset: no endpoint.";
    PARENT_PID = "LLUMLET_PARENT_PID", None, Llumlet,
        "Pid of the engine; when it is gone the llumlet deregisters and exits 0. Unset: no watch.";
    BACKEND_TYPE = "LLUMLET_BACKEND_TYPE", Some("BackendType.VLLM_V1"), Llumlet,
        "Published as `backend_type` (upstream writes `BackendType.VLLM_V1`; the scheduler does not read it).";
    DATA_PARALLEL_SIZE = "LLUMLET_DATA_PARALLEL_SIZE", Some("1"), Llumlet,
        "Published as `data_parallel_size` (>= 1); above 1 the instance id gets the suffix `_dp<rank>`.";
    DP_RANK = "LLUMLET_DP_RANK", Some("0"), Llumlet,
        "Published as `dp_rank` (0 <= rank < data parallel size).";
    DP_LOCAL_RANK = "LLUMLET_DP_LOCAL_RANK", Some("0"), Llumlet,
        "Published as `dp_local_rank` (0-86400).";
    TENSOR_PARALLEL_SIZE = "LLUMLET_TENSOR_PARALLEL_SIZE", Some("1"), Llumlet,
        "Published as `tensor_parallel_size` (>= 1).";
    UNIT_ID = "LLUMLET_UNIT_ID", None, Llumlet,
        "Published as `unit_id` (failover unit); unset: the instance id.";
    BLOCK_SIZE = "LLUMLET_BLOCK_SIZE", Some("16"), Llumlet,
        "Published as `block_size`: tokens per KV block (>= 1).";
    MAX_NUM_BATCHED_TOKENS = "LLUMLET_MAX_NUM_BATCHED_TOKENS", Some("8192"), Llumlet,
        "Published as `max_num_batched_tokens` (>= 1); the scheduler's TTFT predictor reads it.";
    RPC_TIMEOUT = "LLUMLET_RPC_TIMEOUT", Some("5.0"), Llumlet,
        "Seconds each gRPC call may take before it answers DEADLINE_EXCEEDED (0.001-86400).";
    ENGINE_RETRY_INTERVAL = "LLUMLET_ENGINE_RETRY_INTERVAL", Some("2.0"), Llumlet,
        "Seconds between the 3 attempts of an engine call (0-86400).";
    SHUTDOWN_GRACE = "LLUMLET_SHUTDOWN_GRACE", Some("1.0"), Llumlet,
        "Seconds in-flight gRPC calls may take to finish on shutdown (0.001-86400).";
    CMS_REDIS_ADDRESS = "LLUMNIX_CMS_REDIS_ADDRESS", Some("redis.roles"), Llumlet,
        "Host of the CMS Redis.";
    CMS_REDIS_PORT = "LLUMNIX_CMS_REDIS_PORT", Some("10000"), Llumlet,
        "Port of the CMS Redis (1-65535).";
    CMS_REDIS_USERNAME = "LLUMNIX_CMS_REDIS_USERNAME", Some("default"), Llumlet,
        "Redis ACL user; used (AUTH user password) when a password is set.";
    CMS_REDIS_PASSWORD = "LLUMNIX_CMS_REDIS_PASSWORD", Some(""), Llumlet,
        "Redis password; empty: no AUTH.";
    REDIS_SOCKET_TIMEOUT = "REDIS_SOCKET_TIMEOUT", Some("1"), Llumlet,
        "Seconds one Redis connect or command may take (0.001-86400).";
    REDIS_RETRY_TIMES = "REDIS_RETRY_TIMES", Some("1"), Llumlet,
        "Immediate retries of a failed Redis command on a fresh connection (0-86400).";
    REDIS_RETRY_INTERVAL = "REDIS_RETRY_INTERVAL", Some("0.1"), Llumlet,
        "Seconds before such a retry (0-86400).";
    CMS_EXPIRED_TIME = "LLUMNIX_CMS_EXPIRED_TIME", Some("100"), Llumlet,
        "TTL in whole seconds of both CMS keys; must be strictly greater than both push intervals.";
    STATUS_PUSH_INTERVAL = "LLUMNIX_STATUS_PUSH_INTERVAL", Some("0.04"), Llumlet,
        "Seconds between status writes to the CMS (0.001-86400).";
    METADATA_PUSH_INTERVAL = "LLUMNIX_METADATA_PUSH_INTERVAL", Some("20"), Llumlet,
        "Seconds between metadata heartbeats (0.001-86400); never waits on the engine.";
    ENGINE_GET_STATUS_TIMEOUT = "LLUMNIX_ENGINE_GET_STATUS_TIMEOUT", Some("30.0"), Llumlet,
        "Seconds without a new engine status before the instance is reported `schedulable=false` (0.001-86400).";
    ENGINE_MIGRATE_TIMEOUT = "LLUMNIX_ENGINE_MIGRATE_TIMEOUT", Some("5.0"), Llumlet,
        "Seconds one migrate call to the engine may take (0.001-86400).";
    ENGINE_ABORT_TIMEOUT = "LLUMNIX_ENGINE_ABORT_TIMEOUT", Some("5.0"), Llumlet,
        "Seconds one abort call to the engine may take (0.001-86400).";
    ENGINE_MIGRATE_IN_TIMEOUT = "LLUMNIX_ENGINE_MIGRATE_IN_TIMEOUT", Some("5.0"), Llumlet,
        "Seconds one migrate-in call to the engine may take (0.001-86400).";
    UPDATE_INSTANCE_STATUS_MODE = "LLUMNIX_UPDATE_INSTANCE_STATUS_MODE", Some("push"), Llumlet,
        "`push` or `pull`, any case.";
    ENABLE_MIGRATION = "LLUMNIX_ENABLE_MIGRATION", Some("1"), Llumlet,
        "Boolean (`1`/`0`, `True`/`False`): migration slots are computed and Migrate is served.";
    DETAILED_MIG_STATUS = "LLUMNIX_DETAILED_MIG_STATUS", Some("0"), Llumlet,
        "Boolean: also compute and enforce the token and KV-ratio migration limits.";
    MAX_REQ_MIG_IN = "LLUMNIX_MAX_REQ_MIG_IN", Some("1"), Llumlet,
        "Requests that may migrate in at once (0-86400).";
    MAX_REQ_MIG_OUT = "LLUMNIX_MAX_REQ_MIG_OUT", Some("1"), Llumlet,
        "Requests that may migrate out at once (0-86400).";
    MAX_TOKEN_MIG_IN = "LLUMNIX_MAX_TOKEN_MIG_IN", Some("100000"), Llumlet,
        "Tokens that may migrate in at once, when detailed (0-86400).";
    MAX_TOKEN_MIG_OUT = "LLUMNIX_MAX_TOKEN_MIG_OUT", Some("100000"), Llumlet,
        "Tokens that may migrate out at once, when detailed (0-86400).";
    MAX_KV_CACHE_USAGE_RATIO_MIG_IN = "LLUMNIX_MAX_KV_CACHE_USAGE_RATIO_MIG_IN", Some("0.3"), Llumlet,
        "KV-cache ratio that may migrate in at once, when detailed (0-1).";
    MAX_KV_CACHE_USAGE_RATIO_MIG_OUT = "LLUMNIX_MAX_KV_CACHE_USAGE_RATIO_MIG_OUT", Some("0.3"), Llumlet,
        "KV-cache ratio that may migrate out at once, when detailed (0-1).";
    USED_METRICS = "LLUMNIX_USED_METRICS", Some("all"), Llumlet,
        "Metrics the scheduler uses, separated by `,` or `;`; status fields no listed metric needs are written as 0.";
    REPORT_INSTANCE_STATUS_INTERVAL_S = "LLUMNIX_REPORT_INSTANCE_STATUS_INTERVAL_S", Some("10.0"), Llumlet,
        "Seconds between DEBUG log lines of the status being written (0.001-86400).";
    INSTANCE_UPDATE_STEPS = "LLUMNIX_INSTANCE_UPDATE_STEPS", Some("1"), Engine,
        "Engine steps between status updates (>= 1).";
    ENABLE_LLUMNIX = "VLLM_ENABLE_LLUMNIX", Some("0"), Engine,
        "Boolean: the patched vLLM spawns a llumlet.";
    RECENT_WAITINGS_STALENESS_SECONDS = "LLUMNIX_RECENT_WAITINGS_STALENESS_SECONDS", Some("10"), Engine,
        "Age limit in seconds of `recent_waiting_requests` (0-86400).";
    ENABLE_PROFILING = "LLUMNIX_ENABLE_PROFILING", Some("0"), Engine,
        "Boolean: the engine fills the profiling fields of the status.";
    PROFILING_STEPS = "LLUMNIX_PROFILING_STEPS", Some("50"), Engine,
        "Steps between profiling samples (>= 1).";
    LOGGING_LEVEL = "LLUMNIX_LOGGING_LEVEL", Some("INFO"), Logging,
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`, any case.";
    CONFIGURE_LOGGING = "LLUMNIX_CONFIGURE_LOGGING", Some("1"), Logging,
        "Boolean: `0` leaves logging at WARNING and above, whatever the level.";
    LOG_STREAM = "LLUMNIX_LOG_STREAM", Some("1"), Logging,
        "Empty: no log lines on stderr (as upstream, any non-empty string keeps them).";
    LOGGING_PREFIX = "LLUMNIX_LOGGING_PREFIX", Some(""), Logging,
        "Text put before every log line.";
    LOGGING_CONFIG_PATH = "LLUMNIX_LOGGING_CONFIG_PATH", None, Logging,
        "A Python logging config file; not supported, a warning is logged when set.";
    LOG_NODE_PATH = "LLUMNIX_LOG_NODE_PATH", Some(""), Logging,
        "Directory for log files; not supported yet, a warning is logged when set (logs go to stderr).";
}

/// Looks a variable up by name.
pub fn find(name: &str) -> Option<&'static Var> {
    ALL.iter().find(|v| v.name == name)
}

/// The table of every variable, as `docs/configuration.md` carries it.
pub fn markdown_table() -> String {
    let mut out = String::from("| Variable | Default | Read by | Meaning and accepted values |\n| --- | --- | --- | --- |\n");
    for v in ALL {
        let default = match v.default {
            Some("") => "(empty)".to_string(),
            Some(d) => format!("`{d}`"),
            None => "(unset)".to_string(),
        };
        let scope = match v.scope {
            Scope::Llumlet => "llumlet",
            Scope::Engine => "engine",
            Scope::Logging => "logging",
        };
        out.push_str(&format!(
            "| `{}` | {default} | {scope} | {} |\n",
            v.name, v.doc
        ));
    }
    out
}
