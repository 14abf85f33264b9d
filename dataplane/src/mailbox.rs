//! Migration mailboxes: a small file in /dev/shm per migration, beside the control segment,
//! through which an engine and its llumlet hand over what does not fit a 64-byte command: the
//! request id of a reservation (llumlet → destination engine, before `ReserveBlocks`) and the
//! request's serialized state (source engine → llumlet on `MigrateOutSuspend`, llumlet →
//! destination engine before `MigrateInCommit`). The state's format is the engine's own.
//!
//! ```text
//!  magic "LLMB" u32 | version u32 | id_len u32 | state_len u32 | id bytes | state bytes
//! ```
//!
//! Writers write a temporary file and rename it, so a reader sees a whole record or none.

use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: u32 = u32::from_le_bytes(*b"LLMB");
const VERSION: u32 = 1;
const HEADER: usize = 16;
/// The largest request id (as the status ring's ids).
pub const MAX_ID_BYTES: usize = 63;
/// The largest state a mailbox carries.
pub const MAX_STATE_BYTES: usize = 64 << 20;

/// A mailbox's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The request id.
    pub request_id: String,
    /// The engine's serialized request state (empty for a reservation).
    pub state: Vec<u8>,
}

/// Mailbox errors.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// I/O.
    #[error("mailbox {path}: {op}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bytes are not a mailbox record.
    #[error("mailbox record is malformed: {0}")]
    Malformed(&'static str),
    /// Id or state too long.
    #[error("mailbox {what} too long: {len} bytes (at most {max})")]
    TooLong {
        /// Which part.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// The mailbox of migration `id` of the engine whose control segment is `segment`.
pub fn path(segment: &Path, id: u64) -> PathBuf {
    let mut p = segment.as_os_str().to_owned();
    p.push(format!("-mig-{id:016x}"));
    PathBuf::from(p)
}

/// Writes `bytes` to `path` all or nothing: a temporary file beside it (named after this
/// process, so concurrent writers do not meet), then a rename. Every record file of a migration
/// (mailboxes, journals, naming entries) is written this way.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

impl Mail {
    /// The record's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, MailError> {
        if self.request_id.len() > MAX_ID_BYTES {
            return Err(MailError::TooLong {
                what: "request id",
                len: self.request_id.len(),
                max: MAX_ID_BYTES,
            });
        }
        if self.state.len() > MAX_STATE_BYTES {
            return Err(MailError::TooLong {
                what: "state",
                len: self.state.len(),
                max: MAX_STATE_BYTES,
            });
        }
        let mut out = Vec::with_capacity(HEADER + self.request_id.len() + self.state.len());
        for w in [
            MAGIC,
            VERSION,
            self.request_id.len() as u32,
            self.state.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(self.request_id.as_bytes());
        out.extend_from_slice(&self.state);
        Ok(out)
    }

    /// Decodes a record from the other process.
    pub fn decode(b: &[u8]) -> Result<Mail, MailError> {
        let word = |i: usize| -> Result<u32, MailError> {
            b.get(i * 4..i * 4 + 4)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                .ok_or(MailError::Malformed("shorter than its header"))
        };
        if word(0)? != MAGIC {
            return Err(MailError::Malformed("bad magic"));
        }
        if word(1)? != VERSION {
            return Err(MailError::Malformed("unknown version"));
        }
        let (id_len, state_len) = (word(2)? as usize, word(3)? as usize);
        if id_len > MAX_ID_BYTES || state_len > MAX_STATE_BYTES {
            return Err(MailError::Malformed("length beyond the limits"));
        }
        if b.len() != HEADER + id_len + state_len {
            return Err(MailError::Malformed("length does not match the header"));
        }
        let id = std::str::from_utf8(&b[HEADER..HEADER + id_len])
            .map_err(|_| MailError::Malformed("request id is not UTF-8"))?;
        Ok(Mail {
            request_id: id.to_string(),
            state: b[HEADER + id_len..].to_vec(),
        })
    }

    /// Writes the record to `path` ([`write_atomic`], mode 0600).
    pub fn write(&self, path: &Path) -> Result<(), MailError> {
        let bytes = self.encode()?;
        write_atomic(path, &bytes, 0o600).map_err(|source| MailError::Io {
            op: "write",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads the record at `path`.
    pub fn read(path: &Path) -> Result<Mail, MailError> {
        let len = std::fs::metadata(path)
            .map_err(|source| MailError::Io {
                op: "stat",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len > (HEADER + MAX_ID_BYTES + MAX_STATE_BYTES) as u64 {
            return Err(MailError::Malformed("file larger than any record"));
        }
        let b = std::fs::read(path).map_err(|source| MailError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?;
        Mail::decode(&b)
    }
}

/// Removes a mailbox (absent is fine).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed_records() {
        let m = Mail {
            request_id: "req-1".into(),
            state: vec![1, 2, 3],
        };
        let b = m.encode().unwrap();
        assert_eq!(Mail::decode(&b).unwrap(), m);
        assert!(matches!(
            Mail::decode(&b[..b.len() - 1]),
            Err(MailError::Malformed(_))
        ));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(
            Mail::decode(&bad),
            Err(MailError::Malformed("bad magic"))
        ));
        let mut huge = b.clone();
        huge[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(Mail::decode(&huge).is_err());
        for n in 0..b.len() {
            assert!(Mail::decode(&b[..n]).is_err(), "prefix of {n} bytes");
        }
        let long = Mail {
            request_id: "x".repeat(64),
            state: vec![],
        };
        assert!(matches!(long.encode(), Err(MailError::TooLong { .. })));
    }

    #[test]
    #[cfg_attr(miri, ignore = "files are outside Miri")]
    fn files_are_replaced_whole() {
        let seg = std::env::temp_dir().join(format!("llumlet-mail-test-{}", std::process::id()));
        let p = path(&seg, 0xab);
        assert!(p.to_string_lossy().ends_with("-mig-00000000000000ab"));
        let m = Mail {
            request_id: "r".into(),
            state: vec![7; 100],
        };
        m.write(&p).unwrap();
        assert_eq!(Mail::read(&p).unwrap(), m);
        remove(&p);
        assert!(matches!(Mail::read(&p), Err(MailError::Io { .. })));
    }
}
