//! Mutual authentication of transfer connections, before any protocol message is read.
//!
//! Both ends hold one key: the cluster's secret (`LLUMLET_TRANSFER_SECRET_FILE`), or, when none
//! is configured, this host's key: 32 random bytes in `/dev/shm/llumlet-transfer-key-<uid>`,
//! created by the first llumlet of this user, mode 0600. So a peer that cannot read the key file
//! (another host, another local user) cannot complete the handshake, and the zero-configuration
//! single-host path gives the same guarantee as the 0600 control segments.
//!
//! The handshake (fixed sizes, nothing allocated from what a peer declares):
//!
//! 1. client → server: `LLKT`, version 1, a 32-byte random nonce `nc`;
//! 2. server → client: `LLKT`, version 1, its nonce `ns`, and
//!    `HMAC-SHA256(key, "llumlet-kvt server" ‖ nc ‖ ns)`;
//! 3. client → server (after checking that): `HMAC-SHA256(key, "llumlet-kvt client" ‖ nc ‖ ns)`;
//! 4. server → client: one byte, 1 (accepted); a server that does not accept closes instead.
//!
//! Fresh nonces on both sides make every proof single-use; the labels keep a server's proof from
//! serving as a client's. The MACs are compared in constant time.
//!
//! The handshake alone would not bind what follows to it: a peer relaying one llumlet's handshake
//! to another could then speak in its place. So both ends derive a [`Session`] from the key and
//! the two nonces, one key per direction, and every control message after the handshake carries
//! a tag over its sequence number and bytes: a relay can pass messages on, but not forge, drop,
//! reorder or replay one. Data frames (the `tcp` transport's KV bytes) are not tagged: an
//! attacker on the path can read or alter KV bytes, never a `Begin`, `Reserved` or `Commit`
//! (docs/security.md).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"LLKT";
const VERSION: u8 = 1;
const NONCE: usize = 32;
const MAC: usize = 32;
const HELLO: usize = 4 + 1 + NONCE;
const CHALLENGE: usize = 4 + 1 + NONCE + MAC;
/// The shortest secret accepted from a file: a random 32-byte secret (base64 of 32 random bytes
/// is 44) cannot be guessed offline from a handshake a peer observed or provoked.
pub const MIN_SECRET_BYTES: usize = 32;
/// The longest secret read from a file.
const MAX_SECRET_BYTES: usize = 4096;

/// Why a handshake failed. Never carries the key or the proofs.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The connection failed or closed before the handshake finished.
    #[error("the transfer connection closed during its authentication: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak this handshake (an older llumlet, or not a llumlet).
    #[error("the peer does not speak the transfer handshake")]
    NotALlumlet,
    /// The peer's proof does not match this llumlet's key.
    #[error("the peer's transfer credential differs from this llumlet's (set the same LLUMLET_TRANSFER_SECRET_FILE on both)")]
    WrongKey,
    /// The server closed after the client's proof: it did not accept this llumlet's key.
    #[error("the destination refused this llumlet's transfer credential (set the same LLUMLET_TRANSFER_SECRET_FILE on both)")]
    Refused,
}

/// Where a key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySource {
    /// The cluster's secret file.
    File(PathBuf),
    /// This host's key (same-host peers of this user only).
    Host(PathBuf),
}

/// The key transfer connections are authenticated with. Its `Debug` does not show it.
#[derive(Clone)]
pub struct TransferKey {
    key: Arc<[u8]>,
    source: KeySource,
}

impl std::fmt::Debug for TransferKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TransferKey({})", self.describe())
    }
}

impl TransferKey {
    /// The cluster's secret from `path` (`Some`), else this host's key.
    pub fn load(secret_file: Option<&Path>) -> Result<TransferKey, String> {
        match secret_file {
            Some(p) => TransferKey::from_file(p),
            None => TransferKey::host(),
        }
    }

    /// A key given directly (tests, benches).
    pub fn from_bytes(key: &[u8]) -> TransferKey {
        TransferKey {
            key: Arc::from(key),
            source: KeySource::File(PathBuf::from("(given)")),
        }
    }

    /// The secret in `path`: at least [`MIN_SECRET_BYTES`] bytes, readable by its owner only.
    pub fn from_file(path: &Path) -> Result<TransferKey, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{}: readable by others (mode {:o}); the secret file must be mode 0600 or 0400",
                path.display(),
                meta.mode() & 0o777
            ));
        }
        let mut key = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SECRET_BYTES as u64 + 1).read_to_end(&mut key))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if key.len() > MAX_SECRET_BYTES {
            return Err(format!(
                "{}: longer than {MAX_SECRET_BYTES} bytes",
                path.display()
            ));
        }
        while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
            key.pop();
        }
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "{}: shorter than {MIN_SECRET_BYTES} bytes (use e.g. `head -c 32 /dev/urandom | base64`)",
                path.display()
            ));
        }
        Ok(TransferKey {
            key: Arc::from(key),
            source: KeySource::File(path.to_path_buf()),
        })
    }

    /// This host's key for this user, created (atomically, mode 0600) if it does not exist.
    pub fn host() -> Result<TransferKey, String> {
        let uid = llumlet_dataplane::sys::uid();
        TransferKey::host_at(
            &PathBuf::from(format!("/dev/shm/llumlet-transfer-key-{uid}")),
            uid,
        )
    }

    fn host_at(path: &Path, uid: u32) -> Result<TransferKey, String> {
        if !path.exists() {
            let mut key = [0u8; 32];
            llumlet_dataplane::sys::random_bytes(&mut key).map_err(|e| e.to_string())?;
            // Written whole under a temporary name, then linked into place: a llumlet starting
            // at the same moment sees either no key or the whole key, and one key wins.
            // The temporary name is random, so nobody can take it in advance; only a file this
            // process created is removed.
            let mut tag = [0u8; 8];
            llumlet_dataplane::sys::random_bytes(&mut tag).map_err(|e| e.to_string())?;
            let tmp = path.with_extension(format!("tmp-{:016x}", u64::from_le_bytes(tag)));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(&key))
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                // Another llumlet linked its key first: that one is read below.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        let meta =
            std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{}: not a regular file of this user with mode 0600; remove it",
                path.display()
            ));
        }
        let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if key.len() != 32 {
            return Err(format!(
                "{}: not a key of 32 bytes; remove it",
                path.display()
            ));
        }
        Ok(TransferKey {
            key: Arc::from(key),
            source: KeySource::Host(path.to_path_buf()),
        })
    }

    /// For the logs: where the key came from, never the key.
    pub fn describe(&self) -> String {
        match &self.source {
            KeySource::File(p) => format!("the cluster secret in {}", p.display()),
            KeySource::Host(p) => format!(
                "this host's key {} (peers on this host only; set LLUMLET_TRANSFER_SECRET_FILE for other hosts)",
                p.display()
            ),
        }
    }

    fn proof(&self, label: &[u8], nc: &[u8], ns: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        m.update(label);
        m.update(nc);
        m.update(ns);
        m
    }
}

const SERVER: &[u8] = b"llumlet-kvt server";
const CLIENT: &[u8] = b"llumlet-kvt client";
const CLIENT_TO_SERVER: &[u8] = b"llumlet-kvt c2s";
const SERVER_TO_CLIENT: &[u8] = b"llumlet-kvt s2c";

/// Bytes of the tag a control message carries after the handshake.
pub const TAG: usize = 16;

/// One authenticated connection's message keys: one per direction, derived from the key and the
/// handshake's two nonces, with a sequence number each way.
pub struct Session {
    send: Hmac<Sha256>,
    recv: Hmac<Sha256>,
    send_seq: u64,
    recv_seq: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session(sent {}, received {})",
            self.send_seq, self.recv_seq
        )
    }
}

impl Session {
    fn derive(key: &TransferKey, nc: &[u8], ns: &[u8], client: bool) -> Session {
        let keyed = |label: &[u8]| {
            let k = key.proof(label, nc, ns).finalize().into_bytes();
            <Hmac<Sha256> as Mac>::new_from_slice(&k).expect("HMAC takes a key of any length")
        };
        let (c2s, s2c) = (keyed(CLIENT_TO_SERVER), keyed(SERVER_TO_CLIENT));
        let (send, recv) = if client { (c2s, s2c) } else { (s2c, c2s) };
        Session {
            send,
            recv,
            send_seq: 0,
            recv_seq: 0,
        }
    }

    fn tag(mac: &Hmac<Sha256>, seq: u64, bytes: &[u8]) -> Hmac<Sha256> {
        let mut m = mac.clone();
        m.update(&seq.to_le_bytes());
        m.update(bytes);
        m
    }

    /// The tag of the next message this side sends.
    pub fn seal(&mut self, bytes: &[u8]) -> [u8; TAG] {
        let full = Session::tag(&self.send, self.send_seq, bytes)
            .finalize()
            .into_bytes();
        self.send_seq += 1;
        let mut t = [0u8; TAG];
        t.copy_from_slice(&full[..TAG]);
        t
    }

    /// Whether `tag` is the peer's tag of its next message `bytes` (compared in constant time).
    pub fn open(&mut self, bytes: &[u8], tag: &[u8]) -> bool {
        let ok = Session::tag(&self.recv, self.recv_seq, bytes)
            .verify_truncated_left(tag)
            .is_ok()
            && tag.len() == TAG;
        self.recv_seq += 1;
        ok
    }
}

fn nonce() -> std::io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    llumlet_dataplane::sys::random_bytes(&mut n)?;
    Ok(n)
}

/// The connecting side's handshake (a source, a resolver, the bench's sender).
pub fn client(s: &mut (impl Read + Write), key: &TransferKey) -> Result<Session, AuthError> {
    let nc = nonce()?;
    let mut hello = [0u8; HELLO];
    hello[..4].copy_from_slice(MAGIC);
    hello[4] = VERSION;
    hello[5..].copy_from_slice(&nc);
    s.write_all(&hello)?;
    let mut ch = [0u8; CHALLENGE];
    s.read_exact(&mut ch)?;
    if &ch[..4] != MAGIC || ch[4] != VERSION {
        return Err(AuthError::NotALlumlet);
    }
    let ns = &ch[5..5 + NONCE];
    key.proof(SERVER, &nc, ns)
        .verify_slice(&ch[5 + NONCE..])
        .map_err(|_| AuthError::WrongKey)?;
    let mine = key.proof(CLIENT, &nc, ns).finalize().into_bytes();
    s.write_all(&mine)?;
    let mut ok = [0u8; 1];
    match s.read_exact(&mut ok) {
        Ok(()) if ok[0] == 1 => Ok(Session::derive(key, &nc, ns, true)),
        Ok(()) => Err(AuthError::Refused),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(AuthError::Refused),
        Err(e) => Err(e.into()),
    }
}

/// A stream whose reads all end by one deadline (a handshake cannot be stretched by trickling a
/// byte just before each read's timeout).
pub struct Deadline<'a> {
    stream: &'a mut std::net::TcpStream,
    by: std::time::Instant,
}

impl<'a> Deadline<'a> {
    /// Reads on `stream` from now on end by `within` from now.
    pub fn new(stream: &'a mut std::net::TcpStream, within: std::time::Duration) -> Deadline<'a> {
        Deadline {
            stream,
            by: std::time::Instant::now() + within,
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.by.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// The accepting side's handshake (the transfer endpoint, the bench's receiver). On an error
/// the caller closes the connection: a peer without the key gets the challenge (so it learns
/// that a llumlet listens here) and nothing else.
pub fn server(s: &mut (impl Read + Write), key: &TransferKey) -> Result<Session, AuthError> {
    let mut hello = [0u8; HELLO];
    s.read_exact(&mut hello)?;
    if &hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(AuthError::NotALlumlet);
    }
    let nc = &hello[5..];
    let ns = nonce()?;
    let mut ch = [0u8; CHALLENGE];
    ch[..4].copy_from_slice(MAGIC);
    ch[4] = VERSION;
    ch[5..5 + NONCE].copy_from_slice(&ns);
    ch[5 + NONCE..].copy_from_slice(&key.proof(SERVER, nc, &ns).finalize().into_bytes());
    s.write_all(&ch)?;
    let mut theirs = [0u8; MAC];
    s.read_exact(&mut theirs)?;
    key.proof(CLIENT, nc, &ns)
        .verify_slice(&theirs)
        .map_err(|_| AuthError::WrongKey)?;
    s.write_all(&[1])?;
    Ok(Session::derive(key, nc, &ns, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    type Pair = (Result<Session, AuthError>, Result<Session, AuthError>);

    fn pair(server_key: TransferKey, client_key: TransferKey) -> Pair {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            server(&mut s, &server_key)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let r = client(&mut c, &client_key);
        drop(c);
        (t.join().unwrap(), r)
    }

    #[test]
    fn the_same_key_passes_both_ways_and_a_different_one_fails_both_ways() {
        let a = TransferKey::from_bytes(b"0123456789abcdef0123");
        let b = TransferKey::from_bytes(b"0123456789abcdef0124");
        let (s, c) = pair(a.clone(), a.clone());
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        // The sessions agree: each side opens what the other sealed, in order, and nothing
        // else (a replay, a changed byte, another direction's tag).
        let t1 = c.seal(b"Begin");
        let t2 = c.seal(b"Commit");
        assert!(s.open(b"Begin", &t1));
        assert!(!s.open(b"Begin", &t1), "a replay");
        let mut c2 = pair_again(&a);
        let t = c2.seal(b"Commit");
        assert!(!s.open(b"Commit", &t), "another session's tag");
        let _ = t2;
        let back = s.seal(b"Committed");
        assert!(!c.open(b"Committed!", &back));
        // The client checks the server's proof first, and says which side is wrong.
        let (s, c) = pair(a.clone(), b.clone());
        assert!(matches!(c, Err(AuthError::WrongKey)), "{c:?}");
        assert!(s.is_err());
    }

    fn pair_again(k: &TransferKey) -> Session {
        pair(k.clone(), k.clone()).1.unwrap()
    }

    #[test]
    fn a_peer_that_does_not_speak_the_handshake_gets_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let key = TransferKey::from_bytes(b"0123456789abcdef0123");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let r = server(&mut s, &key);
            drop(s);
            r
        });
        let mut c = TcpStream::connect(addr).unwrap();
        // A protobuf frame header and bytes, as an unauthenticated `Begin` would start.
        c.write_all(&[200, 0, 0, 0, 1]).unwrap();
        c.write_all(&[0x0a; 64]).unwrap();
        assert!(matches!(t.join().unwrap(), Err(AuthError::NotALlumlet)));
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty(), "the server said {} bytes", got.len());
    }

    #[test]
    fn secret_files_must_be_private_and_long_enough_and_the_host_key_is_made_once() {
        let dir = std::env::temp_dir().join(format!("llumlet-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("secret");
        std::fs::write(&p, b"0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(TransferKey::from_file(&p)
            .unwrap_err()
            .contains("readable by others"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = TransferKey::from_file(&p).unwrap();
        assert_eq!(
            &*k.key, b"0123456789abcdef0123456789abcdef",
            "the newline is not part of it"
        );
        assert!(!format!("{k:?}").contains("0123"), "Debug shows no key");
        std::fs::write(&p, b"0123456789abcdef0123456789abcde").unwrap();
        assert!(TransferKey::from_file(&p).unwrap_err().contains("shorter"));
        let host = dir.join("host-key");
        let uid = llumlet_dataplane::sys::uid();
        let a = TransferKey::host_at(&host, uid).unwrap();
        let b = TransferKey::host_at(&host, uid).unwrap();
        assert_eq!(a.key, b.key, "the second llumlet reads the first one's key");
        assert_eq!(std::fs::metadata(&host).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            TransferKey::host_at(&host, uid).is_err(),
            "a readable host key is refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A peer that trickles its hello a byte at a time cannot stretch the handshake past its
    /// deadline.
    #[test]
    fn a_trickled_handshake_ends_at_its_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let key = TransferKey::from_bytes(b"0123456789abcdef0123456789abcdef");
            let started = std::time::Instant::now();
            let r = server(
                &mut Deadline::new(&mut s, std::time::Duration::from_millis(800)),
                &key,
            );
            (r, started.elapsed())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let writer = std::thread::spawn(move || {
            // 20 bytes, 300 ms apart: 6 s if each byte reset the wait.
            for b in b"LLKT\x01".iter().chain(&[0u8; 15]) {
                if c.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        });
        let (r, took) = t.join().unwrap();
        writer.join().unwrap();
        assert!(r.is_err());
        assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
    }
}
