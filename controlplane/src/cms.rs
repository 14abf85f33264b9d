//! The CMS writer: `SET key value EX ttl` and `DEL` against a real Redis, with reconnection and
//! backoff. A failed write is logged once per outage; when Redis is back, [`Cms::recovered`] wakes
//! whoever must re-register.
//!
//! It speaks RESP itself over one TCP connection (`AUTH` when a password is set, then `SET` and
//! `DEL`): each command is one `write` of a frame built in a reused buffer and one read of the
//! one-line reply, on the calling task. A general client's multiplexer (a driver task fed
//! through a channel, a response timer, a streaming parser) cost the status path three times the
//! CPU of the write itself (docs/BENCHMARKS.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// A CMS operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CmsError {
    /// Redis refused or failed the command, or the connection broke or timed out.
    #[error("redis {op} {key}: {why}")]
    Redis {
        /// The command.
        op: &'static str,
        /// The key.
        key: String,
        /// What went wrong (Redis's error reply, or the connection's).
        why: String,
    },
    /// No connection: the last attempt failed recently and the backoff has not run out.
    #[error("redis unreachable ({last}), next connection attempt in {wait:?}")]
    Backoff {
        /// Until the next attempt.
        wait: Duration,
        /// Why the last attempt failed (a refused password says so here).
        last: String,
    },
}

/// The connection: the stream, and the buffers reused for every command.
struct Conn {
    stream: BufReader<TcpStream>,
    frame: Vec<u8>,
    reply: Vec<u8>,
}

/// Longest reply line accepted (replies here are `+OK`, `:1` or an error message).
const MAX_REPLY: usize = 64 << 10;

impl Conn {
    async fn connect(cfg: &RedisConfig) -> Result<Conn, String> {
        let stream = TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let mut c = Conn {
            stream: BufReader::new(stream),
            frame: Vec::with_capacity(1024),
            reply: Vec::with_capacity(64),
        };
        if let Some(auth) = auth(cfg) {
            c.command(&auth).await?;
        }
        Ok(c)
    }

    /// Sends one command and reads its one-line reply ([`parse_reply`]).
    async fn command(&mut self, args: &[&[u8]]) -> Result<(), String> {
        encode(args, &mut self.frame);
        self.stream
            .get_mut()
            .write_all(&self.frame)
            .await
            .map_err(|e| e.to_string())?;
        self.reply.clear();
        let n = (&mut self.stream)
            .take(MAX_REPLY as u64)
            .read_until(b'\n', &mut self.reply)
            .await
            .map_err(|e| e.to_string())?;
        parse_reply(&self.reply[..n])
    }
}

/// The same connection with a blocking socket, for the status thread: one `write` and one
/// `read` per command, no scheduler in between.
struct BlockingConn {
    stream: std::io::BufReader<std::net::TcpStream>,
    frame: Vec<u8>,
    reply: Vec<u8>,
}

impl BlockingConn {
    fn connect(cfg: &RedisConfig) -> Result<BlockingConn, String> {
        use std::net::ToSocketAddrs;
        let timeout = cfg.socket_timeout;
        let addr = (cfg.host.as_str(), cfg.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("the host name resolves to no address")?;
        let stream =
            std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let mut c = BlockingConn {
            stream: std::io::BufReader::new(stream),
            frame: Vec::with_capacity(1024),
            reply: Vec::with_capacity(64),
        };
        if let Some(auth) = auth(cfg) {
            c.command(&auth)?;
        }
        Ok(c)
    }

    fn command(&mut self, args: &[&[u8]]) -> Result<(), String> {
        use std::io::{BufRead, Read, Write};
        encode(args, &mut self.frame);
        let timed_out = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "no reply within the socket timeout".to_string()
            }
            _ => e.to_string(),
        };
        self.stream
            .get_mut()
            .write_all(&self.frame)
            .map_err(timed_out)?;
        self.reply.clear();
        let n = (&mut self.stream)
            .take(MAX_REPLY as u64)
            .read_until(b'\n', &mut self.reply)
            .map_err(timed_out)?;
        parse_reply(&self.reply[..n])
    }
}

/// The `AUTH` command `cfg` asks for: none without a password, the ACL form with a user.
fn auth(cfg: &RedisConfig) -> Option<Vec<&[u8]>> {
    match (cfg.username.as_str(), cfg.password.as_str()) {
        (_, "") => None,
        ("", p) => Some(vec![b"AUTH", p.as_bytes()]),
        (u, p) => Some(vec![b"AUTH", u.as_bytes(), p.as_bytes()]),
    }
}

/// `args` as a RESP array of bulk strings, into `frame`.
fn encode(args: &[&[u8]], frame: &mut Vec<u8>) {
    use std::io::Write;
    frame.clear();
    let _ = write!(frame, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(frame, "${}\r\n", a.len());
        frame.extend_from_slice(a);
        frame.extend_from_slice(b"\r\n");
    }
}

/// A one-line reply: `Ok` for `+...` and `:n`, Redis's message for `-...`.
fn parse_reply(reply: &[u8]) -> Result<(), String> {
    if reply.is_empty() {
        return Err("connection closed by Redis".into());
    }
    let line = reply.strip_suffix(b"\r\n").ok_or("malformed reply")?;
    match line.first() {
        Some(b'+') | Some(b':') => Ok(()),
        Some(b'-') => Err(String::from_utf8_lossy(&line[1..]).into_owned()),
        _ => Err(format!(
            "unexpected reply {:?}",
            String::from_utf8_lossy(&line[..line.len().min(64)])
        )),
    }
}

struct ConnState {
    healthy: bool,
    failures: u64,
    next_attempt: Instant,
    backoff: Duration,
    /// Why the last connection attempt failed.
    last_failure: String,
    /// Spreads the backoff of many llumlets that lost Redis at the same moment.
    jitter: llumlet_dataplane::rng::SplitMix64,
}

/// A seed for the backoff jitter, different in every process.
fn jitter_seed() -> u64 {
    let mut b = [0u8; 8];
    match llumlet_dataplane::sys::random_bytes(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ u64::from(std::process::id()).rotate_left(32)
        }
    }
}

/// Backoff before the second connection attempt after a failure.
const BACKOFF_START: Duration = Duration::from_millis(50);

/// Writes the instance's two keys into the CMS.
pub struct Cms {
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// The status thread's connection ([`Cms::set_blocking`]).
    blocking: Mutex<Option<BlockingConn>>,
    cfg: RedisConfig,
    /// The TTL in seconds, as sent.
    ttl: String,
    backoff_max: Duration,
    state: Mutex<ConnState>,
    recovered: Notify,
    connected: [AtomicBool; 2],
    metrics: Arc<Metrics>,
}

impl Cms {
    /// A writer for the Redis `cfg` names, with `ttl` seconds on every key; reconnection attempts
    /// back off up to `backoff_max`.
    pub fn new(cfg: &RedisConfig, ttl: u64, backoff_max: Duration, metrics: Arc<Metrics>) -> Cms {
        Cms {
            conn: tokio::sync::Mutex::new(None),
            blocking: Mutex::new(None),
            cfg: cfg.clone(),
            ttl: ttl.to_string(),
            backoff_max: backoff_max.max(BACKOFF_START),
            state: Mutex::new(ConnState {
                healthy: true,
                failures: 0,
                next_attempt: Instant::now(),
                backoff: BACKOFF_START,
                last_failure: String::new(),
                jitter: llumlet_dataplane::rng::SplitMix64(jitter_seed()),
            }),
            recovered: Notify::new(),
            connected: [AtomicBool::new(false), AtomicBool::new(false)],
            metrics,
        }
    }

    /// A connection (0: the async one, 1: the status thread's) was made. Made again after an
    /// earlier one was lost, Redis may have restarted empty: wake the metadata loop so that the
    /// instance is registered again now, not at its next heartbeat. (Retries can make a new
    /// connection inside one write, so no failed write has to be seen for this.)
    fn connected(&self, which: usize) {
        if self.connected[which].swap(true, Ordering::Relaxed) {
            self.recovered.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        // Plain fields written in single statements: consistent even after a panic elsewhere.
        crate::sync::lock(&self.state)
    }

    /// Wakes (one waiter, or the next to wait) when a write succeeds after an outage.
    pub fn recovered(&self) -> &Notify {
        &self.recovered
    }

    /// Whether the last operation succeeded.
    #[cfg(test)]
    fn healthy(&self) -> bool {
        self.lock().healthy
    }

    /// Runs `args` on the connection (made first if there is none and the backoff allows);
    /// a failure (or cancellation) drops the connection, so the next command reconnects.
    async fn attempt(&self, op: &'static str, key: &str, args: &[&[u8]]) -> Result<(), CmsError> {
        let mut conn = self.conn.lock().await;
        let timeout = self.cfg.socket_timeout;
        let failed = |why: String| CmsError::Redis {
            op,
            key: key.to_string(),
            why,
        };
        // The connection is taken out while a command runs and put back only once its reply is
        // read: a command cancelled midway (its task aborted) drops the connection with it, so
        // no later command reads an earlier one's reply.
        let mut c = match conn.take() {
            Some(c) => c,
            None => {
                self.may_connect()?;
                let made = tokio::time::timeout(timeout, Conn::connect(&self.cfg))
                    .await
                    .unwrap_or_else(|_| Err(format!("no connection within {timeout:?}")));
                let c = made.map_err(|why| self.connect_failed(why))?;
                self.connected(0);
                c
            }
        };
        let r = tokio::time::timeout(timeout, c.command(args))
            .await
            .unwrap_or_else(|_| Err(format!("no reply within {timeout:?}")));
        if r.is_ok() {
            *conn = Some(c);
        }
        r.map_err(failed)
    }

    /// Whether a connection attempt may be made now (the backoff after a failed one ran out).
    fn may_connect(&self) -> Result<(), CmsError> {
        let st = self.lock();
        let now = Instant::now();
        if now < st.next_attempt {
            return Err(CmsError::Backoff {
                wait: st.next_attempt - now,
                last: st.last_failure.clone(),
            });
        }
        Ok(())
    }

    /// Records a failed connection attempt (the backoff doubles) and says why it failed. The
    /// wait is the backoff times a random factor in [0.5, 1.5): llumlets that lost Redis together
    /// do not come back together.
    fn connect_failed(&self, why: String) -> CmsError {
        let mut st = self.lock();
        let factor = 0.5 + (st.jitter.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        st.next_attempt = Instant::now() + st.backoff.mul_f64(factor);
        st.backoff = (st.backoff * 2).min(self.backoff_max);
        st.last_failure = why.clone();
        CmsError::Redis {
            op: "CONNECT",
            key: format!("{}:{}", self.cfg.host, self.cfg.port),
            why,
        }
    }

    /// [`Cms::attempt`] on the blocking connection.
    fn attempt_blocking(
        &self,
        op: &'static str,
        key: &str,
        args: &[&[u8]],
    ) -> Result<(), CmsError> {
        let mut conn = crate::sync::lock(&self.blocking);
        let mut c = match conn.take() {
            Some(c) => c,
            None => {
                self.may_connect()?;
                let c = BlockingConn::connect(&self.cfg).map_err(|why| self.connect_failed(why))?;
                self.connected(1);
                c
            }
        };
        let r = c.command(args);
        if r.is_ok() {
            *conn = Some(c);
        }
        r.map_err(|why| CmsError::Redis {
            op,
            key: key.to_string(),
            why,
        })
    }

    /// `SET key value EX ttl` from a thread that may block (the status thread): its own
    /// connection with a blocking socket, the same retries, backoff and outage accounting as
    /// [`Cms::set`].
    pub fn set_blocking(&self, key: &str, value: &[u8]) -> Result<(), CmsError> {
        let args: [&[u8]; 5] = [b"SET", key.as_bytes(), value, b"EX", self.ttl.as_bytes()];
        let mut attempt = 0;
        let result = loop {
            match self.attempt_blocking("SET", key, &args) {
                Ok(()) => break Ok(()),
                Err(e) => {
                    if attempt >= self.cfg.retry_times || matches!(e, CmsError::Backoff { .. }) {
                        break Err(e);
                    }
                    attempt += 1;
                    std::thread::sleep(self.cfg.retry_interval);
                }
            }
        };
        self.record(&result);
        result
    }

    async fn run(&self, op: &'static str, key: &str, args: &[&[u8]]) -> Result<(), CmsError> {
        let mut attempt = 0;
        let result = loop {
            match self.attempt(op, key, args).await {
                Ok(()) => break Ok(()),
                Err(e) => {
                    if attempt >= self.cfg.retry_times || matches!(e, CmsError::Backoff { .. }) {
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
        let args: [&[u8]; 5] = [b"SET", key.as_bytes(), value, b"EX", self.ttl.as_bytes()];
        self.run("SET", key, &args).await
    }

    /// `DEL key`.
    pub async fn del(&self, key: &str) -> Result<(), CmsError> {
        self.run("DEL", key, &[b"DEL", key.as_bytes()]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn config(port: u16, password: &str) -> RedisConfig {
        RedisConfig {
            host: "127.0.0.1".into(),
            port,
            username: String::new(),
            password: password.into(),
            socket_timeout: Duration::from_millis(500),
            retry_times: 0,
            retry_interval: Duration::from_millis(10),
        }
    }

    /// Reads one command's bytes (`want` long) from `s` and checks them.
    async fn expect(s: &mut tokio::net::TcpStream, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    }

    const SET: &[u8] = b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n$2\r\nEX\r\n$1\r\n7\r\n";

    #[tokio::test]
    async fn commands_are_resp_frames_and_a_dropped_connection_is_made_again() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            expect(&mut s, SET).await;
            s.write_all(b"+OK\r\n").await.unwrap();
            expect(&mut s, b"*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n").await;
            s.write_all(b":1\r\n").await.unwrap();
            drop(s); // the next command finds the connection closed
            let (mut s, _) = l.accept().await.unwrap();
            expect(&mut s, SET).await;
            s.write_all(b"+OK\r\n").await.unwrap();
            // Never answers the next one.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let cms = Cms::new(&config(port, ""), 7, BACKOFF_START, Arc::default());
        cms.set("k", b"v1").await.unwrap();
        cms.del("k").await.unwrap();
        let e = cms.set("k", b"v1").await.unwrap_err().to_string();
        assert!(e.contains("redis SET k"), "{e}");
        assert!(!cms.healthy());
        cms.set("k", b"v1").await.unwrap();
        assert!(cms.healthy());
        let e = cms.set("k", b"v1").await.unwrap_err().to_string();
        assert!(e.contains("no reply within"), "{e}");
        server.abort();
    }

    #[tokio::test]
    async fn a_command_cancelled_midway_does_not_leave_its_reply_to_the_next() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            expect(&mut s, SET).await;
            // Answers late: the caller has given up by then.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = s.write_all(b"+OK\r\n").await;
            let (mut s2, _) = l.accept().await.unwrap();
            expect(&mut s2, b"*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n").await;
            s2.write_all(b"-ERR from the second connection\r\n")
                .await
                .unwrap();
        });
        let cms = Cms::new(&config(port, ""), 7, BACKOFF_START, Arc::default());
        let cancelled = tokio::time::timeout(Duration::from_millis(50), cms.set("k", b"v1")).await;
        assert!(cancelled.is_err(), "the SET should still be waiting");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // On the old connection this DEL would read the SET's +OK and succeed.
        let e = cms.del("k").await.unwrap_err().to_string();
        assert!(e.contains("from the second connection"), "{e}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_password_is_named_and_backs_off() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                expect(&mut s, b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n").await;
                s.write_all(b"-WRONGPASS invalid username-password pair\r\n")
                    .await
                    .unwrap();
            }
        });
        let cms = Cms::new(
            &config(port, "secret"),
            7,
            Duration::from_secs(1),
            Arc::default(),
        );
        let e = cms.set("k", b"v1").await.unwrap_err().to_string();
        assert!(e.contains("CONNECT") && e.contains("WRONGPASS"), "{e}");
        // Within the backoff no new connection is attempted, and the refusal is still the
        // reason given (a llumlet that gives up ends with it, not with "unreachable").
        match cms.set("k", b"v1").await {
            Err(CmsError::Backoff { last, .. }) => assert!(last.contains("WRONGPASS"), "{last}"),
            other => panic!("{other:?}"),
        }
        server.abort();
    }
}
