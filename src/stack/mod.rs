//! The local stack: what the CLI uses when no NATS URL is configured (DESIGN.md, "Single machine
//! default"). One detached `flotilla daemon` per home runs a `nats-server` child (loopback only,
//! JetStream store under `<home>/nats`), an agent and a controller in-process, and records its
//! URL in `<home>/stack.json`.
//!
//! - [`ensure`] finds the running stack of a home or starts one, exactly once even when several
//!   CLIs race (an exclusive `flock` on `<home>/stack.lock` around check, spawn and wait);
//! - [`daemon`] is `flotilla daemon` (it holds `<home>/daemon.lock` for its whole life, so "is it
//!   alive" is "is that lock held", never a pid that may be stale);
//! - [`kill`] stops it and waits until it is gone; [`running`] says whether it runs.
//!
//! docs/ARCHITECTURE.md ("The local stack") has the files, locks, readiness and shutdown order.

mod daemon;
mod lock;
mod nats;
mod proc;

pub use daemon::daemon;

use crate::config::Settings;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a CLI waits for a daemon it started to say it is ready.
pub const READY_WAIT: Duration = Duration::from_secs(20);
/// How long a CLI waits for another CLI that is starting or stopping the stack (`stack.lock`).
pub const LOCK_WAIT: Duration = Duration::from_secs(90);
/// How long `kill` waits for the daemon to stop its workers and exit before it SIGKILLs it.
pub const KILL_WAIT: Duration = Duration::from_secs(60);

/// The local stack of a home, as recorded in `<home>/stack.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackInfo {
    /// The NATS URL every role of the stack uses (`nats://127.0.0.1:<port>`).
    pub url: String,
    /// The daemon's pid.
    pub pid: u32,
    /// The nats-server child's pid (it changes if nats-server is restarted).
    pub nats_pid: u32,
    /// The home (absolute).
    pub home: PathBuf,
    /// The daemon's flotilla version.
    pub version: String,
    /// When the daemon started, epoch ms.
    pub started_at: u64,
    /// Whether nats-server fsyncs every JetStream write (`sync_interval: always`, 2.10+).
    #[serde(default)]
    pub sync_always: bool,
}

/// The local stack could not be found, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A file or folder of the home could not be used.
    #[error("cannot {doing} {}: {source} (check the permissions of the home, set by --home / FLOTILLA_HOME)", path.display())]
    Io {
        /// What we were doing ("create", "read", ...).
        doing: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No `nats-server` binary on PATH.
    #[error(
        "nats-server is not installed (needed for the local stack): `apt-get install nats-server`, or set nats.url / FLOTILLA_NATS_URL to use a running server"
    )]
    NatsServerMissing,
    /// `nats-server --version` said something we cannot read.
    #[error(
        "cannot tell the version of nats-server from `nats-server --version` ({output:?}): reinstall it (`apt-get install nats-server`), or set nats.url / FLOTILLA_NATS_URL to use a running server"
    )]
    NatsServerVersion {
        /// What it printed.
        output: String,
    },
    /// nats-server did not come up.
    #[error(
        "nats-server did not start: {reason}. Its last lines ({}):\n{tail}", log.display()
    )]
    NatsServerFailed {
        /// What happened.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// Another daemon already serves this home.
    #[error(
        "a flotilla daemon already runs for {} (pid {pid}): the CLI uses it; stop it with `flotilla kill`", home.display()
    )]
    AlreadyRunning {
        /// The home.
        home: PathBuf,
        /// Its pid, as written in daemon.lock (0 if unknown).
        pid: u32,
    },
    /// `flotilla daemon` (or `ensure`) was asked to run the local stack while a NATS URL is set.
    #[error(
        "the local stack is only used when no NATS URL is set, but this CLI points at {url} (a fleet): unset nats.url / FLOTILLA_NATS_URL / --nats-url, or run `flotilla agent` and `flotilla controller` against that server"
    )]
    NotLocal {
        /// The configured URL.
        url: String,
    },
    /// `flotilla kill` in a fleet.
    #[error(
        "flotilla kill stops the local stack; this CLI points at {url} (a fleet): use `flotilla stop all`"
    )]
    KillInFleet {
        /// The configured URL.
        url: String,
    },
    /// The daemon did not start or did not become ready.
    #[error(
        "the local stack in {} did not start: {reason}. Last lines of {}:\n{tail}", home.display(), log.display()
    )]
    StartFailed {
        /// The home.
        home: PathBuf,
        /// What happened.
        reason: String,
        /// The daemon's log.
        log: PathBuf,
        /// Its last lines from this start.
        tail: String,
    },
    /// The daemon could not start its nats-server, agent or controller, or one of them ended.
    #[error("the local stack in {}: {reason}", home.display())]
    Daemon {
        /// The home.
        home: PathBuf,
        /// What failed, and how to fix it.
        reason: String,
    },
    /// Another CLI holds `stack.lock` for too long.
    #[error(
        "another flotilla has been starting or stopping the local stack for more than {}s (it holds {}): wait for it, or find it with `fuser {}`", within.as_secs(), path.display(), path.display()
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        within: Duration,
    },
    /// A daemon holds the lock but has not said where its stack is.
    #[error(
        "a flotilla daemon holds {} but {} is missing or unreadable ({reason}): it is starting or stuck; see {}, or stop it with `flotilla kill`", lock.display(), info.display(), log.display()
    )]
    NoInfo {
        /// daemon.lock
        lock: PathBuf,
        /// stack.json
        info: PathBuf,
        /// daemon.log
        log: PathBuf,
        /// Why it could not be read.
        reason: String,
    },
    /// The daemon did not go away, even after SIGKILL.
    #[error(
        "the local stack's daemon (pid {pid}) is still alive {}s after SIGKILL (it holds {}): check it with `ps -p {pid}`", within.as_secs(), lock.display()
    )]
    KillFailed {
        /// The daemon's pid.
        pid: u32,
        /// daemon.lock
        lock: PathBuf,
        /// How long we waited after SIGKILL.
        within: Duration,
    },
}

/// The files of a home that belong to the local stack.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The home.
    pub home: PathBuf,
    /// `stack.json`: [`StackInfo`], written atomically by the daemon once ready.
    pub info: PathBuf,
    /// `stack.lock`: held by a CLI while it checks, starts and waits for (or stops) the stack.
    pub stack_lock: PathBuf,
    /// `daemon.lock`: held by the daemon for its whole life; holds its pid.
    pub daemon_lock: PathBuf,
    /// `daemon.log`: the daemon's stdout and stderr.
    pub daemon_log: PathBuf,
    /// `daemon.settings.json`: the settings the starting CLI resolved, for the daemon.
    pub settings: PathBuf,
    /// `nats/`: the JetStream store (kept across restarts and `kill`).
    pub nats_dir: PathBuf,
    /// `nats.log`: nats-server's output.
    pub nats_log: PathBuf,
    /// `nats.conf`: nats-server's config (2.10+ only, for `sync_interval: always`).
    pub nats_conf: PathBuf,
}

impl Paths {
    /// The stack's files in `home`.
    pub fn new(home: &Path) -> Self {
        Self {
            home: home.to_path_buf(),
            info: home.join("stack.json"),
            stack_lock: home.join("stack.lock"),
            daemon_lock: home.join("daemon.lock"),
            daemon_log: home.join("daemon.log"),
            settings: home.join("daemon.settings.json"),
            nats_dir: home.join("nats"),
            nats_log: home.join("nats.log"),
            nats_conf: home.join("nats.conf"),
        }
    }
}

fn io_err(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StackError {
    let path = path.to_path_buf();
    move |source| StackError::Io {
        doing,
        path,
        source,
    }
}

/// `home` with `$HOME` written `~`, for human lines.
pub fn pretty(home: &Path) -> String {
    if let Some(h) = std::env::var_os("HOME").map(PathBuf::from)
        && let Ok(rest) = home.strip_prefix(&h)
    {
        if rest.as_os_str().is_empty() {
            return "~".into();
        }
        return format!("~/{}", rest.display());
    }
    home.display().to_string()
}

/// The stack of `home` if its daemon is alive (decided by the daemon's lock, not by a pid that
/// may be stale).
///
/// A stale `stack.json` (its daemon is gone) reads as `None`; a live daemon that has not written
/// it yet is [`StackError::NoInfo`].
pub fn running(home: &Path) -> Result<Option<StackInfo>, StackError> {
    let paths = Paths::new(home);
    if !lock::held(&paths.daemon_lock)? {
        return Ok(None);
    }
    read_info(&paths).map(Some)
}

fn read_info(paths: &Paths) -> Result<StackInfo, StackError> {
    let no_info = |reason: String| StackError::NoInfo {
        lock: paths.daemon_lock.clone(),
        info: paths.info.clone(),
        log: paths.daemon_log.clone(),
        reason,
    };
    let bytes = std::fs::read(&paths.info).map_err(|e| no_info(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| no_info(e.to_string()))
}

/// Writes `bytes` to `file` atomically and durably: a temporary file beside it, fsync, rename,
/// fsync of the folder.
fn write_atomic(file: &Path, bytes: &[u8]) -> Result<(), StackError> {
    let dir = file.parent().unwrap_or(Path::new("."));
    // Unique per call: two threads of one process may write the same file.
    let tmp = file.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("write", &tmp)(e));
    }
    std::fs::rename(&tmp, file).map_err(io_err("replace", file))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn write_info(paths: &Paths, info: &StackInfo) -> Result<(), StackError> {
    // A struct of strings and numbers always serialises.
    let bytes = serde_json::to_vec_pretty(info).unwrap_or_default();
    write_atomic(&paths.info, &bytes)
}

fn remove_if_present(path: &Path) -> Result<bool, StackError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Creates the home if needed and makes it absolute (the daemon runs in it).
fn prepare_home(home: &Path) -> Result<PathBuf, StackError> {
    std::fs::create_dir_all(home).map_err(io_err("create", home))?;
    std::fs::canonicalize(home).map_err(io_err("resolve", home))
}

/// The last `n` lines of `path` from byte `from` on ("(empty)" when there are none).
fn tail(path: &Path, from: u64, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return format!("({} cannot be read)", path.display());
    };
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Finds the running stack of `settings.home` or starts one (`exe daemon`, detached) — exactly
/// once even when several CLIs race. Returns when the stack answers (nats-server up, agent
/// online, controller subscribed). `progress` gets human lines like "starting the local stack
/// in ~/.flotilla".
pub async fn ensure(
    settings: &Settings,
    exe: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<StackInfo, StackError> {
    if let Some(url) = &settings.nats.url {
        return Err(StackError::NotLocal { url: url.clone() });
    }
    let home = prepare_home(&settings.home)?;
    let paths = Paths::new(&home);
    // Fast path, no lock: a live daemon with its stack.json. (Anything else, e.g. a daemon that
    // another CLI is starting right now, is decided under the lock.)
    if let Ok(Some(info)) = running(&home) {
        check_version(&info, progress);
        return Ok(info);
    }
    let _guard = lock::exclusive(&paths.stack_lock, LOCK_WAIT).await?;
    if let Some(info) = running(&home)? {
        check_version(&info, progress);
        return Ok(info);
    }
    if crate::which::which("nats-server", None).is_none() {
        return Err(StackError::NatsServerMissing);
    }
    if remove_if_present(&paths.info)? {
        tracing::debug!("removed a stale {}", paths.info.display());
    }
    progress(&format!("starting the local stack in {}", pretty(&home)));
    let mut daemon_settings = settings.clone();
    daemon_settings.home = home.clone();
    // The daemon connects its roles to its own server (no auth, no TLS): nothing of `nats`
    // applies, and no credentials go to disk.
    daemon_settings.nats = crate::config::NatsSettings::default();
    // Settings are plain data and always serialise.
    let bytes = serde_json::to_vec_pretty(&daemon_settings).unwrap_or_default();
    write_atomic(&paths.settings, &bytes)?;
    let info = daemon::spawn_and_wait(&paths, exe).await?;
    progress(&format!(
        "local stack ready at {} (daemon pid {}, nats-server pid {})",
        info.url, info.pid, info.nats_pid
    ));
    Ok(info)
}

fn check_version(info: &StackInfo, progress: &mut dyn FnMut(&str)) {
    let mine = env!("CARGO_PKG_VERSION");
    if info.version != mine {
        progress(&format!(
            "the local stack in {} runs flotilla {}, this CLI is {mine}: restart it with `flotilla kill` (desired state is kept)",
            pretty(&info.home),
            info.version
        ));
    }
}

/// Reads settings written by [`ensure`] for the daemon (`flotilla daemon --settings-file F`).
pub fn load_settings_file(path: &Path) -> Result<Settings, StackError> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    let s: Settings = serde_json::from_slice(&bytes).map_err(|e| StackError::Daemon {
        home: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        reason: format!(
            "{} is not valid settings ({e}): remove it and start the stack again",
            path.display()
        ),
    })?;
    s.validate().map_err(|e| StackError::Daemon {
        home: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        reason: e.to_string(),
    })
}

/// Stops the stack of `home` (workers, daemon, nats-server) and waits until they are gone.
/// `Ok(None)` when none was running (a stale `stack.json` is removed).
pub async fn kill(
    home: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<StackInfo>, StackError> {
    if !home.is_dir() {
        return Ok(None);
    }
    let paths = Paths::new(home);
    let _guard = lock::exclusive(&paths.stack_lock, LOCK_WAIT).await?;
    if !lock::held(&paths.daemon_lock)? {
        if remove_if_present(&paths.info)? {
            progress(&format!(
                "removed a stale {} (its daemon had gone)",
                paths.info.display()
            ));
        }
        return Ok(None);
    }
    let recorded = read_info(&paths).ok();
    // The pid in daemon.lock is written by the holder itself; stack.json may be older.
    let pid = lock::holder_pid(&paths.daemon_lock)
        .or(recorded.as_ref().map(|i| i.pid))
        .ok_or_else(|| StackError::NoInfo {
            lock: paths.daemon_lock.clone(),
            info: paths.info.clone(),
            log: paths.daemon_log.clone(),
            reason: "and daemon.lock does not say which pid holds it".into(),
        })?;
    let info = match recorded {
        Some(i) if i.pid == pid => i,
        _ => StackInfo {
            url: String::new(),
            pid,
            nats_pid: 0,
            home: home.to_path_buf(),
            version: String::from("unknown"),
            started_at: 0,
            sync_always: false,
        },
    };
    let nats = if info.nats_pid != 0 {
        format!(", nats-server pid {}", info.nats_pid)
    } else {
        String::new()
    };
    progress(&format!(
        "stopping workers, daemon and nats-server (daemon pid {pid}{nats}) in {}",
        pretty(home)
    ));
    // Opened before signalling, so a nats-server that outlives a SIGKILLed daemon can be awaited.
    let nats_fd = (info.nats_pid != 0)
        .then(|| proc::PidFd::open(info.nats_pid))
        .flatten()
        .filter(|_| proc::comm_is(info.nats_pid, "nats-server"));
    proc::signal_pid(pid, nix::sys::signal::Signal::SIGTERM);
    if let Some(l) = lock::exclusive_opt(&paths.daemon_lock, KILL_WAIT).await? {
        drop(l);
    } else {
        progress(&format!(
            "the daemon did not stop within {}s; killing it and nats-server (SIGKILL); workers it could not stop may remain",
            KILL_WAIT.as_secs()
        ));
        proc::signal_pid(pid, nix::sys::signal::Signal::SIGKILL);
        if let Some(fd) = &nats_fd {
            fd.signal(nix::sys::signal::Signal::SIGKILL);
        }
        let within = Duration::from_secs(10);
        match lock::exclusive_opt(&paths.daemon_lock, within).await? {
            Some(l) => drop(l),
            None => {
                return Err(StackError::KillFailed {
                    pid,
                    lock: paths.daemon_lock.clone(),
                    within,
                });
            }
        }
    }
    if let Some(fd) = nats_fd
        && !fd.exited_within(Duration::from_secs(10)).await
    {
        fd.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = fd.exited_within(Duration::from_secs(5)).await;
    }
    remove_if_present(&paths.info)?;
    Ok(Some(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_the_trip_to_the_daemon() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Settings {
            home: d.path().to_path_buf(),
            host_id: "web-1".into(),
            heartbeat_interval: Duration::from_millis(250),
            ..Settings::default()
        };
        s.labels.insert("zone".into(), "a".into());
        let p = d.path().join("daemon.settings.json");
        write_atomic(&p, &serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(load_settings_file(&p).unwrap(), s);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["daemon.settings.json"], "no temp file is left");
    }

    #[test]
    fn a_stale_stack_json_is_not_a_running_stack() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let info = StackInfo {
            url: "nats://127.0.0.1:4222".into(),
            pid: std::process::id(), // alive, but it does not hold the lock
            nats_pid: 1,
            home: d.path().to_path_buf(),
            version: "0".into(),
            started_at: 0,
            sync_always: false,
        };
        write_info(&paths, &info).unwrap();
        assert_eq!(running(d.path()).unwrap(), None);
        std::fs::write(&paths.daemon_lock, b"1\n").unwrap();
        assert_eq!(running(d.path()).unwrap(), None);
        // Held: the recorded stack is running.
        let f = std::fs::File::open(&paths.daemon_lock).unwrap();
        let held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).unwrap();
        assert_eq!(running(d.path()).unwrap(), Some(info));
        drop(held);
        assert_eq!(running(d.path()).unwrap(), None);
    }

    #[test]
    fn tail_keeps_the_last_lines_after_an_offset() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "old\na\nb\n\nc\n").unwrap();
        assert_eq!(tail(&p, 4, 2), "b\nc");
        assert_eq!(tail(&p, 100, 2), "(empty)");
    }

    #[test]
    fn pretty_writes_home_as_tilde() {
        if let Some(h) = std::env::var_os("HOME") {
            let h = PathBuf::from(h);
            assert_eq!(pretty(&h.join(".flotilla")), "~/.flotilla");
        }
        assert_eq!(pretty(Path::new("/nonexistent-x/y")), "/nonexistent-x/y");
    }
}
