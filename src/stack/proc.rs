//! Process helpers: pidfds (signal a process without racing pid reuse, await its
//! exit as an event), plain signals.

use nix::sys::signal::Signal;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd: refers to one process even after its pid is reused.
#[derive(Debug)]
pub(crate) struct PidFd(OwnedFd);

impl PidFd {
    /// `None` when the process is already gone.
    pub(crate) fn open(pid: u32) -> Option<PidFd> {
        let pid = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        let fd = i32::try_from(fd).ok()?;
        // SAFETY: the kernel just handed us this descriptor; nobody else owns it.
        Some(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `sig`; a process that has exited (even if reaped) is not signalled.
    pub(crate) fn signal(&self, sig: Signal) {
        // SAFETY: pidfd_send_signal takes our open pidfd, a signal number, no siginfo, no flags.
        let _ = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Waits (as an event: the pidfd turns readable) for the process to exit.
    pub(crate) async fn exited_within(&self, within: Duration) -> bool {
        let Ok(dup) = self.0.try_clone() else {
            return false;
        };
        // SAFETY: `dup` is our own descriptor, moved into the AsyncFd and open for its lifetime.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
        };
        let Ok(afd) = registered else {
            return false;
        };
        tokio::time::timeout(within, afd.readable()).await.is_ok()
    }
}

/// Sends `sig` to `pid` (errors, e.g. it has just exited, are ignored).
pub(crate) fn signal_pid(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// True when `/proc/<pid>/comm` is `name` (a guard before signalling a recorded pid).
pub(crate) fn comm_is(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pidfd_sees_its_process_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id()).expect("alive");
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(comm_is(std::process::id(), me.trim()));
        assert!(!comm_is(std::process::id(), "nats-server"));
        fd.signal(Signal::SIGTERM);
        assert!(fd.exited_within(Duration::from_secs(10)).await);
        let _ = child.wait();
        fd.signal(Signal::SIGTERM); // reaped: harmless
    }
}
