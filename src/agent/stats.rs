//! CPU and memory figures read from /proc (Linux).

use std::time::Instant;

/// CPU time (clock ticks) and resident memory (bytes) of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    /// Resident set size, bytes.
    pub rss: u64,
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if t > 0 { t as u64 } else { 4096 }
}

/// Reads `/proc/<pid>/stat` and `statm`; `None` if the process is gone. `pid` 0 is this process.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let dir = if pid == 0 {
        "/proc/self".to_string()
    } else {
        format!("/proc/{pid}")
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let statm = std::fs::read_to_string(format!("{dir}/statm")).ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcSample {
        ticks: utime + stime,
        rss: rss_pages * page_size(),
    })
}

/// Turns successive samples into a CPU percentage (of one core).
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    last: Option<(Instant, u64)>,
    /// Last computed percentage.
    pub cpu: f64,
    /// Last resident memory, bytes.
    pub memory: u64,
}

impl CpuMeter {
    /// Takes a sample of `pid` (0 = self) and updates the figures; intervals under 100 ms keep
    /// the previous percentage.
    pub fn update(&mut self, pid: u32) {
        let Some(s) = sample(pid) else {
            *self = Self::default();
            return;
        };
        let now = Instant::now();
        self.memory = s.rss;
        match self.last {
            Some((at, ticks)) => {
                let dt = now.duration_since(at).as_secs_f64();
                if dt >= 0.1 {
                    let used = s.ticks.saturating_sub(ticks) as f64 / clock_ticks() as f64;
                    self.cpu = (used / dt * 1000.0).round() / 10.0;
                    self.last = Some((now, s.ticks));
                }
            }
            None => self.last = Some((now, s.ticks)),
        }
    }
}

/// Host figures for heartbeats.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSample {
    /// One-minute load average.
    pub load1: f64,
    /// Logical CPUs of the host (the load average's scale).
    pub cpus: u32,
    /// MemTotal, bytes.
    pub mem_total: u64,
    /// MemAvailable, bytes.
    pub mem_available: u64,
}

/// Reads /proc/loadavg and /proc/meminfo.
pub fn host() -> HostSample {
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    HostSample {
        load1,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        mem_total: kb("MemTotal:"),
        mem_available: kb("MemAvailable:"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_self() {
        let s = super::sample(0).unwrap();
        assert!(s.rss > 0);
        let h = super::host();
        assert!(h.mem_total > 0 && h.cpus > 0);
    }
}
