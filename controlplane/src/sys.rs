//! The few operating-system calls the control plane makes through `libc` (whether a pid is
//! alive is `llumlet_dataplane::segment::pid_alive`).

/// This process's parent pid.
pub fn parent_pid_now() -> u32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    let p = unsafe { libc::getppid() };
    u32::try_from(p).unwrap_or(0)
}
