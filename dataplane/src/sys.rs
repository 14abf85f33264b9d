//! The operating-system calls the llumlet makes outside the segment's own mapping: process
//! liveness, the monotonic clock, this host's boot id, the parent's pid. One place, so that a port
//! to another OS (or a review of what `libc` is asked) starts here.

use std::io;

/// Whether process `pid` exists and has not exited (a zombie, dead but not yet reaped by its
/// parent, counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    pid_exists(pid) && !zombie(pid)
}

fn zombie(pid: u32) -> bool {
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may hold spaces and parentheses, the state
    // follows the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace()
                .next()
                .map(|st| st == "Z" || st == "X")
        })
        .unwrap_or(false)
}

fn pid_exists(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the process exists.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `CLOCK_MONOTONIC` in ns (the same clock in every process of a host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// This host's identity: the kernel's boot id (two processes with the same boot id see the same
/// /dev/shm unless namespaced). Empty where the kernel does not say.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// This process's real user id.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`; 0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Fills `out` with bytes from the kernel's random generator (`/dev/urandom`).
pub fn random_bytes(out: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(out)
}

/// This process's parent pid (0 if the kernel gives none).
pub fn parent_pid() -> u32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    let p = unsafe { libc::getppid() };
    u32::try_from(p).unwrap_or(0)
}

/// A memory file of `size` bytes that can never shrink or grow: `memfd_create` (close-on-exec),
/// mode 0600, sized, then sealed with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`. A mapping of
/// it cannot fault for lack of backing file, whoever holds it.
pub fn sealed_memory_file(name: &str, size: u64) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::PermissionsExt;
    let name: Vec<u8> = name
        .bytes()
        .filter(|b| *b != 0)
        .take(240)
        .chain(std::iter::once(0))
        .collect();
    // SAFETY: `name` is NUL-terminated and outlives the call; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            name.as_ptr().cast(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Whether `file` is sealed against shrinking (so a mapping of its current length can never
/// lose its backing pages).
pub fn cannot_shrink(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `file` keeps open; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Creates `path` with `bytes` as its whole content (mode 0600) atomically and exclusively: an
/// anonymous file in its directory is written and then linked at `path`, so a reader sees the
/// whole content or no file, a process killed on the way leaves nothing, and an existing file is
/// an `AlreadyExists` error. Where the file system has no anonymous files, a temporary name
/// beside it is linked instead.
pub fn publish_exclusive(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(mut f) => {
            f.write_all(bytes)?;
            let from = format!("/proc/self/fd/{}\0", f.as_raw_fd());
            let to: Vec<u8> = path
                .as_os_str()
                .as_bytes()
                .iter()
                .copied()
                .chain(std::iter::once(0))
                .collect();
            if to[..to.len() - 1].contains(&0) {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            // SAFETY: both paths are NUL-terminated and outlive the call; AT_FDCWD with absolute
            // or cwd-relative paths.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr().cast(),
                    libc::AT_FDCWD,
                    to.as_ptr().cast(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".{}.tmp", std::process::id()));
            let tmp = std::path::PathBuf::from(tmp);
            let _ = std::fs::remove_file(&tmp);
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(bytes))
                .and_then(|()| std::fs::hard_link(&tmp, path));
            let _ = std::fs::remove_file(&tmp);
            written
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_unreaped_process_counts_as_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pid_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "a zombie still counts as alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(pid_exists(pid), "not reaped yet, so the pid still exists");
        child.wait().unwrap();
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn the_clock_moves_forward_and_the_host_and_parent_are_known() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_ns() >= a + 1_000_000);
        assert_eq!(boot_id().len(), 36, "a UUID");
        assert_eq!(parent_pid(), std::os::unix::process::parent_id());
        let meta = std::fs::metadata("/proc/self").unwrap();
        assert_eq!(uid(), std::os::unix::fs::MetadataExt::uid(&meta));
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        assert_ne!(a, b, "two draws of 256 bits differ");
    }
}
