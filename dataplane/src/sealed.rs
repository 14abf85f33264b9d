//! Shared memory that cannot be truncated under a mapping.
//!
//! A file in /dev/shm can be truncated, overwritten or replaced by anyone who may write it, and
//! a process that has it mapped dies of SIGBUS the moment it touches a page the truncation took
//! away. So the engine's shared memory (its control segment, and a host KV cache the library
//! creates) is a *sealed memory file* instead: `memfd_create`, sized, and sealed so that its size
//! can never change again, by anyone (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`). It has no
//! name in any directory. What the engine puts at the segment's path in /dev/shm is a *locator*:
//! a few lines of text saying which process holds the memory file and under which descriptor.
//!
//! ```text
//!  llumlet-sealed 1
//!  pid 4242
//!  fd 17
//!  size 4460544
//!  tag 0x1843f0c2a9d80001
//! ```
//!
//! A reader parses the locator (read, never mapped: garbage is an error, not a fault), opens
//! `/proc/<pid>/fd/<fd>` (which the kernel allows only to the holder's user, or a process with
//! `CAP_SYS_PTRACE`), and maps it only after checking that it is sealed against shrinking and
//! exactly `size` bytes long. From then on nothing done to the locator, or to the memory file
//! through any path, can make the mapping fault. The holder is alive exactly as long as
//! `/proc/<pid>/fd/<fd>` still leads to the same memory file, which a reused pid cannot fake.
//!
//! The reader must see the holder's /proc: the llumlet and its engine share a pid namespace (as
//! the writer-pid liveness checks already required).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The first line of every locator.
pub const LOCATOR_MAGIC: &str = "llumlet-sealed 1";
/// The most bytes a locator may have.
pub const LOCATOR_MAX: usize = 256;

/// Where a sealed memory file is: its holder's pid and descriptor, its size and a tag (a value
/// its creator chose, stored inside the memory too where the content allows, so a reader can tell
/// the file it found is the one the locator meant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    /// The holding process.
    pub pid: u32,
    /// Its descriptor of the memory file.
    pub fd: i32,
    /// Bytes of the memory file.
    pub size: u64,
    /// The creator's tag.
    pub tag: u64,
}

/// What a file at a locator's path turned out to be.
#[derive(Debug)]
pub enum Found {
    /// No file there.
    NotThere,
    /// A locator.
    Locator(Locator, (u64, u64)),
    /// Something else (the reason); with its (device, inode) and whether it is small enough to
    /// have been meant as a locator.
    Other(&'static str, (u64, u64), bool),
}

impl Locator {
    /// The locator's text.
    pub fn encode(&self) -> String {
        format!(
            "{LOCATOR_MAGIC}\npid {}\nfd {}\nsize {}\ntag {:#x}\n",
            self.pid, self.fd, self.size, self.tag
        )
    }

    /// Parses a locator's text, strictly: every line, in order, nothing else.
    pub fn parse(bytes: &[u8]) -> Result<Locator, &'static str> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not text")?;
        let mut lines = text
            .strip_suffix('\n')
            .ok_or("no final newline")?
            .split('\n');
        if lines.next() != Some(LOCATOR_MAGIC) {
            return Err("not a llumlet locator");
        }
        let mut field = |name: &str| -> Result<&str, &'static str> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|v| v.strip_prefix(' '))
                .ok_or("a field is missing or out of order")
        };
        let pid: u32 = field("pid")?.parse().map_err(|_| "bad pid")?;
        let fd: i32 = field("fd")?.parse().map_err(|_| "bad fd")?;
        let size: u64 = field("size")?.parse().map_err(|_| "bad size")?;
        let tag = field("tag")?
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or("bad tag")?;
        if lines.next().is_some() {
            return Err("trailing lines");
        }
        if pid == 0 || fd < 0 || size == 0 {
            return Err("impossible pid, fd or size");
        }
        Ok(Locator { pid, fd, size, tag })
    }

    /// Reads what is at `path` (at most [`LOCATOR_MAX`] bytes are read; nothing is mapped). A
    /// symbolic link, a FIFO or anything else that is not a regular file, or a file another user
    /// owns, is not a locator (and opening it neither follows the link nor blocks).
    pub fn find(path: &Path) -> io::Result<Found> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::NotThere),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                let id = std::fs::symlink_metadata(path).map_or((0, 0), |m| (m.dev(), m.ino()));
                return Ok(Found::Other("a symbolic link", id, false));
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let id = (meta.dev(), meta.ino());
        if !meta.file_type().is_file() {
            return Ok(Found::Other("not a regular file", id, false));
        }
        if meta.uid() != crate::sys::euid() {
            return Ok(Found::Other("owned by another user", id, false));
        }
        let small = meta.len() <= LOCATOR_MAX as u64;
        let mut buf = Vec::with_capacity(LOCATOR_MAX + 1);
        file.take(LOCATOR_MAX as u64 + 1).read_to_end(&mut buf)?;
        if buf.len() > LOCATOR_MAX {
            return Ok(Found::Other("longer than a locator", id, false));
        }
        Ok(match Locator::parse(&buf) {
            Ok(l) => Found::Locator(l, id),
            Err(why) => Found::Other(why, id, small && !buf.is_empty()),
        })
    }

    /// The holder's descriptor, as a path this process can open.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.pid, self.fd))
    }

    /// Opens the memory file (read-write) and checks it is sealed against shrinking and exactly
    /// [`Locator::size`] bytes. Returns it with its (device, inode).
    pub fn open(&self) -> Result<(File, (u64, u64)), Unusable> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.proc_path())
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Unusable::HolderGone),
            Err(e) => return Err(Unusable::Open(e)),
        };
        let meta = file.metadata().map_err(Unusable::Open)?;
        if !meta.file_type().is_file() || meta.uid() != crate::sys::euid() {
            return Err(Unusable::NotSealed);
        }
        if !crate::sys::cannot_shrink(&file) {
            return Err(Unusable::NotSealed);
        }
        if meta.len() != self.size {
            return Err(Unusable::Size {
                expected: self.size,
                found: meta.len(),
            });
        }
        Ok((file, (meta.dev(), meta.ino())))
    }

    /// Whether the holder is alive and still holds the memory file `id` under its descriptor.
    pub fn holds(&self, id: (u64, u64)) -> bool {
        std::fs::metadata(self.proc_path()).is_ok_and(|m| (m.dev(), m.ino()) == id)
    }
}

/// Why a locator's memory file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// The holder has exited or closed the descriptor.
    #[error("its holder is gone")]
    HolderGone,
    /// Opening it failed (another user's process, say).
    #[error("cannot open it: {0}")]
    Open(io::Error),
    /// It is not a memory file of this user sealed against shrinking.
    #[error("it is not a memory file of this user sealed against truncation")]
    NotSealed,
    /// Sealed, but not the size the locator says.
    #[error("it is {found} bytes, the locator says {expected}")]
    Size {
        /// The locator's size.
        expected: u64,
        /// The file's.
        found: u64,
    },
}

/// A sealed memory file this process created and published at a path.
pub struct Published {
    /// The memory file (kept open: its descriptor is what the locator names).
    pub file: File,
    /// The locator written.
    pub locator: Locator,
    /// The locator file's (device, inode).
    pub locator_id: (u64, u64),
    /// The memory file's (device, inode).
    pub memory_id: (u64, u64),
}

impl Published {
    /// Creates a sealed memory file of `size` bytes named `name` (for /proc listings only) and
    /// publishes its locator at `path`, exclusively. `fill` runs on the file before the locator
    /// is published (it returns the tag). An existing file at `path` is an `AlreadyExists` error.
    pub fn create(
        path: &Path,
        name: &str,
        size: u64,
        fill: impl FnOnce(&File) -> io::Result<u64>,
    ) -> io::Result<Published> {
        use std::os::fd::AsRawFd;
        let file = crate::sys::sealed_memory_file(name, size)?;
        let tag = fill(&file)?;
        let meta = file.metadata()?;
        let locator = Locator {
            pid: std::process::id(),
            fd: file.as_raw_fd(),
            size,
            tag,
        };
        crate::sys::publish_exclusive(path, locator.encode().as_bytes())?;
        let lmeta = std::fs::metadata(path)?;
        Ok(Published {
            file,
            locator,
            locator_id: (lmeta.dev(), lmeta.ino()),
            memory_id: (meta.dev(), meta.ino()),
        })
    }

    /// Removes the locator at `path` if it is still this one.
    pub fn unpublish(&self, path: &Path) {
        if std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.locator_id) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_round_trip_and_garbage_is_refused() {
        let l = Locator {
            pid: 42,
            fd: 7,
            size: 4096,
            tag: 0xdead_beef,
        };
        assert_eq!(Locator::parse(l.encode().as_bytes()), Ok(l));
        for bad in [
            &b""[..],
            b"llumlet-sealed 1\n",
            b"llumlet-sealed 2\npid 1\nfd 1\nsize 1\ntag 0x1\n",
            b"llumlet-sealed 1\npid 1\nfd 1\nsize 1\ntag 0x1",
            b"llumlet-sealed 1\nfd 1\npid 1\nsize 1\ntag 0x1\n",
            b"llumlet-sealed 1\npid 0\nfd 1\nsize 1\ntag 0x1\n",
            b"llumlet-sealed 1\npid 1\nfd -1\nsize 1\ntag 0x1\n",
            b"llumlet-sealed 1\npid 1\nfd 1\nsize 99999999999999999999\ntag 0x1\n",
            b"llumlet-sealed 1\npid 1\nfd 1\nsize 1\ntag 0x1\nmore\n",
            b"\xff\xfe",
        ] {
            assert!(Locator::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn a_published_file_is_found_sealed_and_its_holder_known() {
        let path = std::env::temp_dir().join(format!("llumlet-sealed-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p = Published::create(&path, "t", 8192, |_| Ok(5)).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o600,
            "the locator"
        );
        let Found::Locator(l, id) = Locator::find(&path).unwrap() else {
            panic!("not found")
        };
        assert_eq!((l, id), (p.locator, p.locator_id));
        let (f, mid) = l.open().unwrap();
        assert_eq!(mid, p.memory_id);
        assert!(l.holds(mid));
        // Nobody can change its size, through any descriptor.
        assert_eq!(f.set_len(10).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(
            f.set_len(1 << 20).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        // A second publication at the same path is refused.
        let again = Published::create(&path, "t", 8192, |_| Ok(6));
        assert_eq!(
            again.err().map(|e| e.kind()),
            Some(io::ErrorKind::AlreadyExists)
        );
        // Once the holder closes it, it is gone.
        p.unpublish(&path);
        assert!(matches!(Locator::find(&path).unwrap(), Found::NotThere));
        drop(p);
        assert!(!l.holds(mid));
        assert!(matches!(l.open(), Err(Unusable::HolderGone)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn links_and_fifos_are_not_locators_and_never_block() {
        let dir = std::env::temp_dir().join(format!("llumlet-sealed-odd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        let l = Locator {
            pid: 1,
            fd: 1,
            size: 1,
            tag: 1,
        };
        std::fs::write(&target, l.encode()).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            Locator::find(&link).unwrap(),
            Found::Other("a symbolic link", _, _)
        ));
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            Locator::find(&fifo).unwrap(),
            Found::Other("not a regular file", _, _)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg_attr(miri, ignore = "files and mmap are outside Miri")]
    fn an_unsealed_file_is_refused() {
        use std::os::fd::AsRawFd;
        let f = tempfile_in_shm();
        f.set_len(4096).unwrap();
        let l = Locator {
            pid: std::process::id(),
            fd: f.as_raw_fd(),
            size: 4096,
            tag: 1,
        };
        assert!(matches!(l.open(), Err(Unusable::NotSealed)));
    }

    fn tempfile_in_shm() -> File {
        let p = std::env::temp_dir().join(format!("llumlet-unsealed-{}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }
}
