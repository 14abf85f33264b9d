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
//!
//! Version 2, encrypted (`LLUMLET_TRANSFER_ENCRYPT`), is the same exchange with an ephemeral
//! X25519 public key after each nonce (`pc`, `ps`), the proofs over the whole transcript
//! `nc ‖ ns ‖ pc ‖ ps` with labels of their own, and keys from the secret, the transcript and the
//! X25519 shared secret: AES-256-GCM for control messages and for data frames, one key per
//! direction and kind, each frame's nonce its sequence number. Every byte after the handshake is
//! then encrypted and authenticated, and traffic recorded today stays unreadable to whoever
//! learns the secret later. A client asks for it with its version; a server with encryption on
//! answers a version-1 hello with its own version 2 header and closes (the client says why).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use llumlet_dataplane::aead::{self, AeadError, FrameKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"LLKT";
/// Authenticated connections.
const VERSION: u8 = 1;
/// Authenticated and encrypted connections.
const VERSION_SEALED: u8 = 2;
/// Bytes of an X25519 public key.
const PUBLIC: usize = 32;
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
    /// The server accepts only encrypted connections; this side did not ask for one.
    #[error("the destination accepts only encrypted transfer connections (set LLUMLET_TRANSFER_ENCRYPT=1 on this llumlet too)")]
    EncryptionRequired,
    /// A client that does not encrypt, refused by a server that requires it.
    #[error("a peer that does not encrypt its transfer connection was refused (LLUMLET_TRANSFER_ENCRYPT=1 here requires it of every peer)")]
    PlainPeer,
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
    /// Every connection is encrypted (`LLUMLET_TRANSFER_ENCRYPT`): this side opens only
    /// encrypted connections and accepts no other.
    encrypt: bool,
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
            encrypt: false,
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
            encrypt: false,
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
            encrypt: false,
        })
    }

    /// This key, with every connection encrypted (`on`) or only authenticated.
    pub fn encrypting(mut self, on: bool) -> TransferKey {
        self.encrypt = on;
        self
    }

    /// Whether connections made or accepted with this key are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypt
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
// Version 2 (encrypted): other labels, so no proof or key of one version serves the other.
const SERVER2: &[u8] = b"llumlet-kvt2 server";
const CLIENT2: &[u8] = b"llumlet-kvt2 client";
const C2S_CONTROL: &[u8] = b"llumlet-kvt2 c2s control";
const S2C_CONTROL: &[u8] = b"llumlet-kvt2 s2c control";
const C2S_DATA: &[u8] = b"llumlet-kvt2 c2s data";
const S2C_DATA: &[u8] = b"llumlet-kvt2 s2c data";

/// Bytes of the tag a control message carries after the handshake (either version).
pub const TAG: usize = 16;

/// One authenticated connection's message keys: one per direction, derived from the key and the
/// handshake (version 1: HMAC tags; version 2: AES-256-GCM, control and data frames apart),
/// each counting its messages.
pub struct Session {
    mode: Mode,
}

// One per connection, made once: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Mode {
    Tagged {
        send: Hmac<Sha256>,
        recv: Hmac<Sha256>,
        send_seq: u64,
        recv_seq: u64,
    },
    Sealed(Box<Sealed>),
}

/// An encrypted connection's keys.
struct Sealed {
    send: FrameKey,
    recv: FrameKey,
    data_send: Option<FrameKey>,
    data_recv: FrameKey,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.mode {
            Mode::Tagged {
                send_seq, recv_seq, ..
            } => write!(f, "Session(tagged, sent {send_seq}, received {recv_seq})"),
            Mode::Sealed(k) => write!(
                f,
                "Session(encrypted, {:?} sent, {:?} received)",
                k.send, k.recv
            ),
        }
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
            mode: Mode::Tagged {
                send,
                recv,
                send_seq: 0,
                recv_seq: 0,
            },
        }
    }

    /// Version 2's keys: from the secret, the whole transcript (both nonces and both ephemeral
    /// public keys) and the ephemeral exchange's shared secret (so recorded traffic stays
    /// unreadable to whoever later learns the secret).
    fn derive_sealed(key: &TransferKey, transcript: &[u8], shared: &[u8], client: bool) -> Session {
        let bytes = |label: &[u8]| -> [u8; aead::KEY] {
            key.proof(label, transcript, shared)
                .finalize()
                .into_bytes()
                .into()
        };
        // One frame counter per direction, shared by its control and data keys: a data frame
        // dropped or held back makes the next control frame fail to open.
        let (c2s, s2c) = (
            FrameKey::new(&bytes(C2S_CONTROL)),
            FrameKey::new(&bytes(S2C_CONTROL)),
        );
        let c2s_data = FrameKey::sharing_counter(&bytes(C2S_DATA), &c2s);
        let s2c_data = FrameKey::sharing_counter(&bytes(S2C_DATA), &s2c);
        let (send, recv, data_send, data_recv) = if client {
            (c2s, s2c, c2s_data, s2c_data)
        } else {
            (s2c, c2s, s2c_data, c2s_data)
        };
        Session {
            mode: Mode::Sealed(Box::new(Sealed {
                send,
                recv,
                data_send: Some(data_send),
                data_recv,
            })),
        }
    }

    fn tag(mac: &Hmac<Sha256>, seq: u64, bytes: &[u8]) -> Hmac<Sha256> {
        let mut m = mac.clone();
        m.update(&seq.to_le_bytes());
        m.update(bytes);
        m
    }

    /// Whether this connection is encrypted.
    pub fn encrypted(&self) -> bool {
        matches!(self.mode, Mode::Sealed(_))
    }

    /// Seals the next message this side sends: appends its tag to `bytes` (encrypted first,
    /// in place, on an encrypted connection).
    pub fn seal(&mut self, bytes: &mut Vec<u8>) -> Result<(), AeadError> {
        let tag = match &mut self.mode {
            Mode::Tagged { send, send_seq, .. } => {
                let full = Session::tag(send, *send_seq, bytes).finalize().into_bytes();
                *send_seq += 1;
                let mut t = [0u8; TAG];
                t.copy_from_slice(&full[..TAG]);
                t
            }
            Mode::Sealed(k) => k.send.seal(&[], bytes)?,
        };
        bytes.extend_from_slice(&tag);
        Ok(())
    }

    /// The peer's next message in `frame` (its bytes and tag), if the tag is right (compared in
    /// constant time); decrypted in place on an encrypted connection.
    pub fn open<'a>(&mut self, frame: &'a mut [u8]) -> Option<&'a [u8]> {
        let split = frame.len().checked_sub(TAG)?;
        let (bytes, tag) = frame.split_at_mut(split);
        match &mut self.mode {
            Mode::Tagged { recv, recv_seq, .. } => {
                let ok = Session::tag(recv, *recv_seq, bytes)
                    .verify_truncated_left(tag)
                    .is_ok();
                *recv_seq += 1;
                ok.then_some(&*bytes)
            }
            Mode::Sealed(k) => k.recv.open(&[], bytes, tag).ok().map(|_| &*bytes),
        }
    }

    /// The key this side's data frames are encrypted with (a `tcp` transport's), once; none on
    /// a connection that is not encrypted.
    pub fn take_data_sealer(&mut self) -> Option<FrameKey> {
        match &mut self.mode {
            Mode::Sealed(k) => k.data_send.take(),
            Mode::Tagged { .. } => None,
        }
    }

    /// The key the peer's data frames are decrypted with; none on a connection that is not
    /// encrypted.
    pub fn data_opener(&mut self) -> Option<&mut FrameKey> {
        match &mut self.mode {
            Mode::Sealed(k) => Some(&mut k.data_recv),
            Mode::Tagged { .. } => None,
        }
    }
}

fn nonce() -> std::io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    llumlet_dataplane::sys::random_bytes(&mut n)?;
    Ok(n)
}

/// An ephemeral X25519 key pair, for one handshake.
fn ephemeral() -> std::io::Result<(EphemeralPrivateKey, [u8; PUBLIC])> {
    let failed = |_| std::io::Error::other("cannot make an ephemeral key");
    let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new()).map_err(failed)?;
    let public = private.compute_public_key().map_err(failed)?;
    let mut p = [0u8; PUBLIC];
    p.copy_from_slice(public.as_ref());
    Ok((private, p))
}

/// The encrypted session both ends of a version-2 handshake derive.
fn sealed_session(
    key: &TransferKey,
    private: EphemeralPrivateKey,
    theirs: &[u8],
    transcript: &[u8],
    client: bool,
) -> Result<Session, AuthError> {
    agreement::agree_ephemeral(
        private,
        &UnparsedPublicKey::new(&X25519, theirs),
        |shared| Session::derive_sealed(key, transcript, shared, client),
    )
    // A public key that is not a curve point: only a forger sends one.
    .map_err(|_| AuthError::WrongKey)
}

/// Reads the first 5 bytes of a handshake message: `LLKT` and its version.
fn read_version(s: &mut impl Read) -> Result<u8, AuthError> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    if &head[..4] != MAGIC || !(head[4] == VERSION || head[4] == VERSION_SEALED) {
        return Err(AuthError::NotALlumlet);
    }
    Ok(head[4])
}

/// The connecting side's handshake (a source, a resolver, the bench's sender): version 2
/// (encrypted) when `key` encrypts, else version 1.
pub fn client(s: &mut (impl Read + Write), key: &TransferKey) -> Result<Session, AuthError> {
    let nc = nonce()?;
    let eph = if key.encrypt {
        Some(ephemeral()?)
    } else {
        None
    };
    let version = if eph.is_some() {
        VERSION_SEALED
    } else {
        VERSION
    };
    let mut hello = [0u8; HELLO + PUBLIC];
    hello[..4].copy_from_slice(MAGIC);
    hello[4] = version;
    hello[5..HELLO].copy_from_slice(&nc);
    if let Some((_, pc)) = &eph {
        hello[HELLO..].copy_from_slice(pc);
    }
    s.write_all(&hello[..if eph.is_some() { HELLO + PUBLIC } else { HELLO }])?;
    match read_version(s) {
        Ok(v) if v == version => {}
        // A server that accepts only encrypted connections answers a plain hello this way.
        Ok(VERSION_SEALED) => return Err(AuthError::EncryptionRequired),
        Ok(_) => return Err(AuthError::NotALlumlet),
        // Closed before a word (a destination at its connection limit, say): an I/O error.
        Err(e) => return Err(e),
    }
    let Some((private, pc)) = eph else {
        let mut ch = [0u8; NONCE + MAC];
        s.read_exact(&mut ch)?;
        let ns = &ch[..NONCE];
        key.proof(SERVER, &nc, ns)
            .verify_slice(&ch[NONCE..])
            .map_err(|_| AuthError::WrongKey)?;
        let mine = key.proof(CLIENT, &nc, ns).finalize().into_bytes();
        s.write_all(&mine)?;
        accepted(s)?;
        return Ok(Session::derive(key, &nc, ns, true));
    };
    let mut ch = [0u8; NONCE + PUBLIC + MAC];
    s.read_exact(&mut ch)?;
    let (ns, ps) = (&ch[..NONCE], &ch[NONCE..NONCE + PUBLIC]);
    let transcript = [&nc[..], ns, &pc, ps].concat();
    key.proof(SERVER2, &transcript, &[])
        .verify_slice(&ch[NONCE + PUBLIC..])
        .map_err(|_| AuthError::WrongKey)?;
    let mine = key.proof(CLIENT2, &transcript, &[]).finalize().into_bytes();
    s.write_all(&mine)?;
    accepted(s)?;
    sealed_session(key, private, ps, &transcript, true)
}

/// The server's one byte that ends a handshake it accepts.
fn accepted(s: &mut impl Read) -> Result<(), AuthError> {
    let mut ok = [0u8; 1];
    match s.read_exact(&mut ok) {
        Ok(()) if ok[0] == 1 => Ok(()),
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

/// The accepting side's handshake (the transfer endpoint, the bench's receiver): the client's
/// version (2, encrypted, always accepted; 1 only when `key` does not require encryption). On an
/// error the caller closes the connection: a peer without the key gets the challenge (so it
/// learns that a llumlet listens here) and nothing else.
pub fn server(s: &mut (impl Read + Write), key: &TransferKey) -> Result<Session, AuthError> {
    let version = read_version(s)?;
    let ns = nonce()?;
    if version == VERSION {
        if key.encrypt {
            // Tells the client why (it learns nothing else), then closes.
            let mut refuse = [0u8; 5];
            refuse[..4].copy_from_slice(MAGIC);
            refuse[4] = VERSION_SEALED;
            s.write_all(&refuse)?;
            return Err(AuthError::PlainPeer);
        }
        let mut nc = [0u8; NONCE];
        s.read_exact(&mut nc)?;
        let mut ch = [0u8; CHALLENGE];
        ch[..4].copy_from_slice(MAGIC);
        ch[4] = VERSION;
        ch[5..5 + NONCE].copy_from_slice(&ns);
        ch[5 + NONCE..].copy_from_slice(&key.proof(SERVER, &nc, &ns).finalize().into_bytes());
        s.write_all(&ch)?;
        let mut theirs = [0u8; MAC];
        s.read_exact(&mut theirs)?;
        key.proof(CLIENT, &nc, &ns)
            .verify_slice(&theirs)
            .map_err(|_| AuthError::WrongKey)?;
        s.write_all(&[1])?;
        return Ok(Session::derive(key, &nc, &ns, false));
    }
    let mut hello = [0u8; NONCE + PUBLIC];
    s.read_exact(&mut hello)?;
    let (nc, pc) = hello.split_at(NONCE);
    let (private, ps) = ephemeral()?;
    let transcript = [nc, &ns[..], pc, &ps[..]].concat();
    let mut ch = [0u8; 5 + NONCE + PUBLIC + MAC];
    ch[..4].copy_from_slice(MAGIC);
    ch[4] = VERSION_SEALED;
    ch[5..5 + NONCE].copy_from_slice(&ns);
    ch[5 + NONCE..5 + NONCE + PUBLIC].copy_from_slice(&ps);
    ch[5 + NONCE + PUBLIC..]
        .copy_from_slice(&key.proof(SERVER2, &transcript, &[]).finalize().into_bytes());
    s.write_all(&ch)?;
    let mut theirs = [0u8; MAC];
    s.read_exact(&mut theirs)?;
    key.proof(CLIENT2, &transcript, &[])
        .verify_slice(&theirs)
        .map_err(|_| AuthError::WrongKey)?;
    let session = sealed_session(key, private, pc, &transcript, false)?;
    s.write_all(&[1])?;
    Ok(session)
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

    fn sealed(s: &mut Session, m: &[u8]) -> Vec<u8> {
        let mut v = m.to_vec();
        s.seal(&mut v).unwrap();
        v
    }

    fn opened(s: &mut Session, frame: &[u8]) -> Option<Vec<u8>> {
        let mut f = frame.to_vec();
        s.open(&mut f).map(<[u8]>::to_vec)
    }

    #[test]
    fn the_same_key_passes_both_ways_and_a_different_one_fails_both_ways() {
        for encrypt in [false, true] {
            let a = TransferKey::from_bytes(b"0123456789abcdef0123").encrypting(encrypt);
            let b = TransferKey::from_bytes(b"0123456789abcdef0124").encrypting(encrypt);
            let (s, c) = pair(a.clone(), a.clone());
            let (mut s, mut c) = (s.unwrap(), c.unwrap());
            assert_eq!((s.encrypted(), c.encrypted()), (encrypt, encrypt));
            // The sessions agree: each side opens what the other sealed, in order, and nothing
            // else (a replay, a changed byte, another session's or direction's message).
            let f1 = sealed(&mut c, b"Begin");
            let f2 = sealed(&mut c, b"Commit");
            assert_eq!(f1.len(), 5 + TAG);
            assert_eq!(
                f1.starts_with(b"Begin"),
                !encrypt,
                "encrypted connections hide their messages"
            );
            assert_eq!(opened(&mut s, &f1).as_deref(), Some(&b"Begin"[..]));
            assert_eq!(opened(&mut s, &f1), None, "a replay");
            let mut c2 = pair_again(&a);
            let f = sealed(&mut c2, b"Commit");
            assert_eq!(opened(&mut s, &f), None, "another session's message");
            let _ = f2;
            let mut back = sealed(&mut s, b"Committed");
            back[0] ^= 1;
            assert_eq!(opened(&mut c, &back), None, "a changed byte");
            assert_eq!(opened(&mut c, &f1[..3]), None, "shorter than a tag");
            // The client checks the server's proof first, and says which side is wrong.
            let (s, c) = pair(a.clone(), b.clone());
            assert!(matches!(c, Err(AuthError::WrongKey)), "{c:?}");
            assert!(s.is_err());
        }
    }

    /// A client that encrypts is served by any server (encrypted); a server that requires
    /// encryption refuses a client that does not, and the client is told why. Data frames get
    /// keys of their own, one per direction, on encrypted connections only.
    #[test]
    fn encryption_is_what_the_client_asks_and_what_the_server_requires() {
        let plain = TransferKey::from_bytes(b"0123456789abcdef0123");
        let sealing = plain.clone().encrypting(true);
        let (s, c) = pair(plain.clone(), sealing.clone());
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert!(s.encrypted() && c.encrypted());
        let mut sealer = c.take_data_sealer().expect("a data key");
        assert!(c.take_data_sealer().is_none(), "given once");
        let mut block = vec![9u8; 64];
        let tag = sealer.seal(b"head", &mut block).unwrap();
        assert_ne!(block, vec![9u8; 64]);
        s.data_opener()
            .unwrap()
            .open(b"head", &mut block, &tag)
            .unwrap();
        assert_eq!(block, vec![9u8; 64]);
        // Control and data frames of a direction are one sequence: a data frame dropped (or
        // held back) on the way makes the control frame after it fail to open.
        let (s2, c2) = pair(plain.clone(), sealing.clone());
        let (mut s2, mut c2) = (s2.unwrap(), c2.unwrap());
        let mut data = c2.take_data_sealer().unwrap();
        let mut block = vec![1u8; 64];
        let _dropped = data.seal(b"head", &mut block).unwrap();
        let stage_done = sealed(&mut c2, b"StageDone");
        assert_eq!(
            opened(&mut s2, &stage_done),
            None,
            "a dropped data frame went unnoticed"
        );
        let (s, c) = pair(sealing.clone(), plain.clone());
        assert!(matches!(c, Err(AuthError::EncryptionRequired)), "{c:?}");
        assert!(matches!(s, Err(AuthError::PlainPeer)), "{s:?}");
        let (s, c) = pair(plain.clone(), plain);
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert!(c.take_data_sealer().is_none() && s.data_opener().is_none());
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
