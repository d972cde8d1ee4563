//! What the benches read of other processes in /proc. CPU time and RSS come from the agent's
//! own reader, `flotilla::agent::stats::sample`; what it does not give (the clock tick, the
//! peak RSS and its reset, whether a process is a zombie) is read here.

use flotilla::agent::stats;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; 100 if it fails).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds of a process (all its threads); `None` when it is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stats::sample(pid).map(|s| s.ticks as f64 / clk_tck())
}

/// [`cpu_secs`] of this process.
pub fn self_cpu() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// [`cpu_secs`] summed over `pids` (those gone count 0).
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(*p)).sum()
}

/// Resident set size in KiB; `None` when the process is gone.
pub fn vm_rss(pid: u32) -> Option<u64> {
    stats::sample(pid).map(|s| s.rss / 1024)
}

/// (VmRSS, VmHWM) in KiB from `/proc/<pid>/status` (0 when unreadable).
pub fn mem_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Resets the peak RSS (VmHWM) so the next reading is the peak of what follows.
pub fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z')
}

/// Processes watched for their exit through pidfds (`pidfd_open(2)`): the kernel makes a
/// pidfd readable when its process exits (a zombie counts as exited), so waiting is a `poll`,
/// not a sleep. Open it while the processes run: a pid already gone when [`Exits::watch`]
/// runs is taken as exited (and a reused pid cannot be mistaken for it afterwards).
pub struct Exits {
    fds: Vec<std::os::fd::OwnedFd>,
}

impl Exits {
    /// Opens a pidfd for each of `pids`; those already gone are not watched.
    pub fn watch(pids: &[u32]) -> Exits {
        use std::os::fd::FromRawFd;
        let fds = pids
            .iter()
            .filter_map(|pid| {
                // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, *pid as libc::pid_t, 0) };
                // SAFETY: a fresh fd that nothing else owns.
                (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
            })
            .collect();
        Exits { fds }
    }

    /// Watches `other`'s processes too.
    pub fn extend(&mut self, other: Exits) {
        self.fds.extend(other.fds);
    }

    /// How many of the watched processes are still running.
    pub fn running(&self) -> usize {
        self.fds.len()
    }

    /// Waits until every watched process has exited, or `within` has passed; true when all
    /// have.
    pub fn wait(&mut self, within: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + within;
        while !self.fds.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut polls: Vec<libc::pollfd> = self
                .fds
                .iter()
                .map(|f| libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `polls` is a valid array of its length.
            let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return false;
            }
            let mut i = 0;
            self.fds.retain(|_| {
                let exited = polls[i].revents != 0;
                i += 1;
                !exited
            });
        }
        true
    }
}
