//! An embedded CMS for `llumlet demo`: a small in-memory server speaking the Redis protocol
//! (RESP2) on loopback, with the commands the llumlets and the demo's rebalancer use (`SET` with
//! `EX`/`PX`, `GET`, `MGET`, `DEL`, `KEYS`, `SCAN`, `EXPIRE`, `TTL`, plus the connection
//! commands clients send: `PING`, `AUTH`, `CLIENT`, `SELECT`, `HELLO` refused, `COMMAND`, `INFO`,
//! `QUIT`). Keys expire on time. It is the demo's stand-in for a Redis, so a newcomer needs
//! nothing but the binary; `--redis-url` uses a real one instead. Malformed input gets an error
//! reply and the connection is closed; nothing panics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Largest bulk string or array accepted (values here are a few hundred bytes).
const MAX_BULK: usize = 64 << 20;
const MAX_ARGS: usize = 1 << 16;

#[derive(Default)]
struct Store {
    map: HashMap<Vec<u8>, (Vec<u8>, Option<Instant>)>,
}

impl Store {
    fn live(&mut self, key: &[u8], now: Instant) -> Option<&mut (Vec<u8>, Option<Instant>)> {
        let expired = matches!(self.map.get(key), Some((_, Some(t))) if *t <= now);
        if expired {
            self.map.remove(key);
        }
        self.map.get_mut(key)
    }

    fn purge(&mut self, now: Instant) {
        self.map.retain(|_, (_, t)| t.is_none_or(|t| t > now));
    }
}

/// The running server.
pub struct EmbeddedCms {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedCms {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start() -> std::io::Result<EmbeddedCms> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Mutex::new(Store::default()));
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let _ = serve(conn, store).await;
                });
            }
        });
        Ok(EmbeddedCms { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EmbeddedCms {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A protocol error: replied to, then the connection closes.
#[derive(Debug)]
struct Protocol(String);

async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, Protocol> {
    buf.clear();
    let n = (&mut *r)
        .take(MAX_BULK as u64 + 2)
        .read_until(b'\n', buf)
        .await
        .map_err(|e| Protocol(e.to_string()))?;
    if n == 0 {
        return Ok(false);
    }
    if !buf.ends_with(b"\r\n") {
        return Err(Protocol("line without CRLF".into()));
    }
    buf.truncate(buf.len() - 2);
    Ok(true)
}

fn number(line: &[u8], max: usize) -> Result<usize, Protocol> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n <= max)
        .ok_or_else(|| Protocol(format!("bad length {:?}", String::from_utf8_lossy(line))))
}

/// Reads one command: an array of bulk strings, or an inline command.
async fn read_command<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> Result<Option<Vec<Vec<u8>>>, Protocol> {
    if !read_line(r, line).await? {
        return Ok(None);
    }
    if line.first() != Some(&b'*') {
        let args = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        return Ok(Some(args));
    }
    let n = number(&line[1..], MAX_ARGS)?;
    let mut args = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        if !read_line(r, line).await? || line.first() != Some(&b'$') {
            return Err(Protocol("expected a bulk string".into()));
        }
        let len = number(&line[1..], MAX_BULK)?;
        // Grown as the bytes arrive: a length the client declares but does not send costs
        // nothing.
        let mut v = Vec::new();
        (&mut *r)
            .take(len as u64 + 2)
            .read_to_end(&mut v)
            .await
            .map_err(|e| Protocol(e.to_string()))?;
        if v.len() != len + 2 {
            return Err(Protocol("bulk string cut short".into()));
        }
        if !v.ends_with(b"\r\n") {
            return Err(Protocol("bulk string without CRLF".into()));
        }
        v.truncate(len);
        args.push(v);
    }
    Ok(Some(args))
}

enum Reply {
    Ok,
    Simple(&'static str),
    Err(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

fn encode(r: &Reply, out: &mut Vec<u8>) {
    match r {
        Reply::Ok => out.extend_from_slice(b"+OK\r\n"),
        Reply::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Reply::Err(e) => {
            out.extend_from_slice(format!("-{}\r\n", e.replace(['\r', '\n'], " ")).as_bytes())
        }
        Reply::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
        Reply::Bulk(Some(b)) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Array(v) => {
            out.extend_from_slice(format!("*{}\r\n", v.len()).as_bytes());
            for x in v {
                encode(x, out);
            }
        }
    }
}

/// `*` and `?` glob, as Redis's KEYS/SCAN MATCH use them (no character classes). Iterative,
/// backtracking only to the last `*`: at most len(p) × len(s) steps and no recursion, so no
/// pattern or key a client sends can exhaust the stack or take exponential time.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

fn int_arg(a: &[u8]) -> Option<i64> {
    std::str::from_utf8(a).ok()?.parse().ok()
}

fn execute(store: &Mutex<Store>, args: &[Vec<u8>]) -> (Reply, bool) {
    let Some(name) = args.first() else {
        return (Reply::Err("ERR empty command".into()), false);
    };
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let now = Instant::now();
    let mut st = store.lock().unwrap_or_else(|p| p.into_inner());
    let arity = |n: usize| args.len() >= n;
    let wrong = || {
        Reply::Err(format!(
            "ERR wrong number of arguments for '{name}' command"
        ))
    };
    let r = match name.as_str() {
        "PING" => match args.get(1) {
            Some(m) => Reply::Bulk(Some(m.clone())),
            None => Reply::Simple("PONG"),
        },
        "ECHO" if arity(2) => Reply::Bulk(Some(args[1].clone())),
        "AUTH" | "SELECT" | "CLIENT" | "READONLY" => Reply::Ok,
        "QUIT" => return (Reply::Ok, true),
        "COMMAND" => Reply::Array(Vec::new()),
        "INFO" => Reply::Bulk(Some(
            b"# Server\r\nredis_version:7.0.0\r\nllumlet_demo_cms:1\r\n".to_vec(),
        )),
        "DBSIZE" => {
            st.purge(now);
            Reply::Int(st.map.len() as i64)
        }
        "FLUSHALL" | "FLUSHDB" => {
            st.map.clear();
            Reply::Ok
        }
        "SET" if arity(3) => {
            let mut ttl = None;
            let mut i = 3;
            let mut bad = false;
            while i < args.len() {
                let opt = String::from_utf8_lossy(&args[i]).to_ascii_uppercase();
                let v = args.get(i + 1).and_then(|a| int_arg(a)).filter(|v| *v > 0);
                match (opt.as_str(), v) {
                    ("EX", Some(v)) => ttl = Some(Duration::from_secs(v as u64)),
                    ("PX", Some(v)) => ttl = Some(Duration::from_millis(v as u64)),
                    _ => {
                        bad = true;
                        break;
                    }
                }
                i += 2;
            }
            if bad {
                Reply::Err("ERR syntax error".into())
            } else {
                st.map
                    .insert(args[1].clone(), (args[2].clone(), ttl.map(|t| now + t)));
                Reply::Ok
            }
        }
        "GET" if arity(2) => Reply::Bulk(st.live(&args[1], now).map(|(v, _)| v.clone())),
        "MGET" if arity(2) => Reply::Array(
            args[1..]
                .iter()
                .map(|k| Reply::Bulk(st.live(k, now).map(|(v, _)| v.clone())))
                .collect(),
        ),
        "DEL" | "UNLINK" if arity(2) => {
            let mut n = 0;
            for k in &args[1..] {
                if st.live(k, now).is_some() {
                    st.map.remove(k);
                    n += 1;
                }
            }
            Reply::Int(n)
        }
        "EXISTS" if arity(2) => Reply::Int(
            args[1..]
                .iter()
                .filter(|k| st.live(k, now).is_some())
                .count() as i64,
        ),
        "EXPIRE" | "PEXPIRE" if arity(3) => match int_arg(&args[2]) {
            Some(v) => {
                let d = if name == "EXPIRE" {
                    Duration::from_secs(v.max(0) as u64)
                } else {
                    Duration::from_millis(v.max(0) as u64)
                };
                match st.live(&args[1], now) {
                    Some(e) => {
                        e.1 = Some(now + d);
                        Reply::Int(1)
                    }
                    None => Reply::Int(0),
                }
            }
            None => Reply::Err("ERR value is not an integer or out of range".into()),
        },
        "TTL" | "PTTL" if arity(2) => match st.live(&args[1], now) {
            None => Reply::Int(-2),
            Some((_, None)) => Reply::Int(-1),
            Some((_, Some(t))) => {
                let left = t.saturating_duration_since(now);
                Reply::Int(if name == "TTL" {
                    left.as_secs_f64().round() as i64
                } else {
                    left.as_millis() as i64
                })
            }
        },
        "KEYS" if arity(2) => {
            st.purge(now);
            let mut keys: Vec<Vec<u8>> = st
                .map
                .keys()
                .filter(|k| glob(&args[1], k))
                .cloned()
                .collect();
            keys.sort();
            Reply::Array(keys.into_iter().map(|k| Reply::Bulk(Some(k))).collect())
        }
        "SCAN" if arity(2) => {
            // One pass returns everything (cursor 0): the demo's key space is tiny.
            st.purge(now);
            let mut pattern: &[u8] = b"*";
            let mut i = 2;
            while i + 1 < args.len() {
                if args[i].eq_ignore_ascii_case(b"MATCH") {
                    pattern = &args[i + 1];
                }
                i += 2;
            }
            let mut keys: Vec<Vec<u8>> = st
                .map
                .keys()
                .filter(|k| glob(pattern, k))
                .cloned()
                .collect();
            keys.sort();
            Reply::Array(vec![
                Reply::Bulk(Some(b"0".to_vec())),
                Reply::Array(keys.into_iter().map(|k| Reply::Bulk(Some(k))).collect()),
            ])
        }
        "HELLO" => Reply::Err("ERR unknown command 'HELLO' (this CMS speaks RESP2)".into()),
        "SET" | "GET" | "MGET" | "DEL" | "UNLINK" | "EXISTS" | "EXPIRE" | "PEXPIRE" | "TTL"
        | "PTTL" | "KEYS" | "SCAN" | "ECHO" => wrong(),
        other => Reply::Err(format!("ERR unknown command '{other}'")),
    };
    (r, false)
}

async fn serve(conn: TcpStream, store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    let _ = conn.set_nodelay(true);
    let mut r = BufReader::new(conn);
    let mut line = Vec::new();
    let mut out = Vec::new();
    loop {
        out.clear();
        let (reply, quit) = match read_command(&mut r, &mut line).await {
            Ok(None) => return Ok(()),
            Ok(Some(args)) if args.is_empty() => continue,
            Ok(Some(args)) => execute(&store, &args),
            Err(Protocol(e)) => (Reply::Err(format!("ERR Protocol error: {e}")), true),
        };
        encode(&reply, &mut out);
        r.get_mut().write_all(&out).await?;
        if quit {
            return Ok(());
        }
    }
}

/// Reads `input` as a client connection's bytes and runs every command in it on a fresh store,
/// until the input ends or a protocol error (which a connection answers with an error and
/// closes on); returns the replies. The entry point of the fuzz target
/// `fuzz/fuzz_targets/cms_resp.rs`. Not to be called from within an async runtime.
#[doc(hidden)]
pub fn serve_bytes(input: &[u8]) -> Vec<u8> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return Vec::new();
    };
    rt.block_on(async {
        let store = Mutex::new(Store::default());
        let mut r = BufReader::new(input);
        let (mut line, mut out) = (Vec::new(), Vec::new());
        loop {
            let (reply, quit) = match read_command(&mut r, &mut line).await {
                Ok(None) => return out,
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args)) => execute(&store, &args),
                Err(Protocol(e)) => (Reply::Err(format!("ERR Protocol error: {e}")), true),
            };
            encode(&reply, &mut out);
            if quit {
                return out;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_like_redis() {
        assert!(glob(
            b"llumnix:instance_status:*",
            b"llumnix:instance_status:a"
        ));
        assert!(!glob(
            b"llumnix:instance_status:*",
            b"llumnix:instance_metadata:a"
        ));
        assert!(glob(b"a?c", b"abc") && !glob(b"a?c", b"ac"));
        assert!(glob(b"*", b""));
    }

    #[test]
    fn globs_stay_fast_on_adversarial_patterns_and_long_keys() {
        let key = vec![b'a'; 1 << 20];
        let mut pat = b"*a".repeat(30);
        pat.push(b'b');
        let t = std::time::Instant::now();
        assert!(!glob(&pat, &key));
        assert!(glob(b"*a*", &key) && glob(&vec![b'?'; 1 << 20], &key));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_declared_length_that_never_arrives_is_a_protocol_error() {
        let out = serve_bytes(b"*2\r\n$4\r\nPING\r\n$67108864\r\nabc");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "-ERR Protocol error: bulk string cut short\r\n"
        );
        let out = serve_bytes(b"*1\r\n$4\r\nPING\r\n*1\r\n$3\r\nGET");
        assert!(
            out.starts_with(b"+PONG\r\n-ERR Protocol error"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    /// The stable companion of a fuzz target: random and mutated RESP never panics the parser
    /// or the executor; each input is a command, a clean end, or a protocol error.
    #[tokio::test]
    async fn random_and_mutated_input_is_parsed_or_refused_without_panicking() {
        let store = Mutex::new(Store::default());
        let valid: &[&[u8]] = &[
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
            b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nEX\r\n$2\r\n10\r\n",
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            b"*4\r\n$4\r\nSCAN\r\n$1\r\n0\r\n$5\r\nMATCH\r\n$3\r\n*k*\r\n",
            b"PING\r\n",
        ];
        let mut rng = llumlet_dataplane::rng::SplitMix64(11);
        let (mut commands, mut errors) = (0, 0);
        for i in 0..20_000u32 {
            let mut input = valid[(i as usize) % valid.len()].to_vec();
            let edits = if i % 3 == 0 {
                0
            } else {
                1 + rng.next_u64() % 4
            };
            for _ in 0..edits {
                let at = (rng.next_u64() as usize) % input.len();
                match rng.next_u64() % 3 {
                    0 => input[at] = rng.next_u64() as u8,
                    1 => input.truncate(at),
                    _ => input.insert(at, b"*$:\r\n-9"[(rng.next_u64() % 7) as usize]),
                }
                if input.is_empty() {
                    input.push(b'*');
                }
            }
            if i % 97 == 0 {
                input = (0..64).map(|_| rng.next_u64() as u8).collect();
            }
            let mut r = BufReader::new(&input[..]);
            let mut line = Vec::new();
            loop {
                match read_command(&mut r, &mut line).await {
                    Ok(None) => break,
                    Ok(Some(args)) => {
                        commands += 1;
                        if !args.is_empty() {
                            let _ = execute(&store, &args);
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        // Both paths were taken many times.
        assert!(commands > 5_000 && errors > 5_000, "{commands} {errors}");
    }

    #[tokio::test]
    async fn a_redis_client_sets_gets_expires_scans_and_garbage_is_an_error() {
        let cms = EmbeddedCms::start().await.unwrap();
        let client = redis::Client::open(format!("redis://{}", cms.addr())).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("llumnix:instance_status:a")
            .arg(b"\x00\x01bytes")
            .arg("EX")
            .arg(30)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg("llumnix:instance_status:b")
            .arg("x")
            .arg("PX")
            .arg(50)
            .query_async(&mut c)
            .await
            .unwrap();
        let v: Vec<u8> = redis::cmd("GET")
            .arg("llumnix:instance_status:a")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, b"\x00\x01bytes");
        let ttl: i64 = redis::cmd("TTL")
            .arg("llumnix:instance_status:a")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!((29..=30).contains(&ttl), "{ttl}");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("llumnix:instance_status:*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(keys.len(), 2);
        tokio::time::sleep(Duration::from_millis(80)).await;
        let (_, keys): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg("llumnix:*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(keys, ["llumnix:instance_status:a"], "b expired");
        let n: i64 = redis::cmd("DEL")
            .arg("llumnix:instance_status:a")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 1);
        // Garbage: an error reply, the connection closed, the server still serving.
        let mut raw = TcpStream::connect(cms.addr()).await.unwrap();
        raw.write_all(b"*2\r\n$3\r\nGET\r\n$99999999999\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        raw.read_to_end(&mut buf).await.unwrap();
        assert!(
            buf.starts_with(b"-ERR Protocol error"),
            "{:?}",
            String::from_utf8_lossy(&buf)
        );
        let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
        assert_eq!(pong, "PONG");
    }
}
