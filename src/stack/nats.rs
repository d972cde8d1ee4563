//! The daemon's `nats-server` child: loopback only, JetStream stored in `<home>/nats`, restarted
//! on the same port (bounded backoff) if it exits while the daemon runs.
//!
//! One dedicated thread spawns, waits for and respawns the child. It must be a thread that
//! lives as long as the child: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
//! ends, and tokio's blocking threads end when idle. A second thread per run copies nats-server's
//! stderr into `nats.log` and watches for "Listening for client connections on", which is how
//! the daemon learns that the server is up and which port it got.

use super::{Paths, StackError, io_err, proc::PidFd};
use nix::sys::signal::Signal;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The port the local stack prefers.
pub(crate) const DEFAULT_PORT: u16 = 4222;
/// First restart delay; doubles up to [`MAX_BACKOFF`], reset after a run of [`STABLE_RUN`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const STABLE_RUN: Duration = Duration::from_secs(30);
/// `nats.log` is moved to `nats.log.1` at start once it is this big.
const LOG_ROTATE_BYTES: u64 = 10 << 20;

/// `nats-server --version`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    pub major: u32,
    pub minor: u32,
    pub text: String,
}

impl Version {
    /// `sync_interval: always` exists from 2.10 on.
    pub(crate) fn sync_always(&self) -> bool {
        (self.major, self.minor) >= (2, 10)
    }
}

/// Parses "nats-server: v2.9.10".
fn parse_version(out: &str) -> Option<Version> {
    let v = out.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(Version {
        major,
        minor,
        text: v.trim().to_string(),
    })
}

/// Runs `nats-server --version`.
pub(crate) fn version() -> Result<Version, StackError> {
    let out = match Command::new("nats-server").arg("--version").output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StackError::NatsServerMissing);
        }
        Err(e) => {
            return Err(StackError::NatsServerVersion {
                output: e.to_string(),
            });
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_version(&text).ok_or(StackError::NatsServerVersion {
        output: text.trim().to_string(),
    })
}

/// `preferred` (4222 unless `nats.local_port` says otherwise) if it can be bound on 127.0.0.1
/// now, else 0 (nats-server picks a free one: `-p -1`); 0 always means any free port.
pub(crate) fn choose_port(preferred: u16) -> u16 {
    if preferred == 0 {
        return 0;
    }
    match std::net::TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(_) => preferred,
        Err(_) => 0,
    }
}

/// What the child did.
#[derive(Debug)]
pub(crate) enum Event {
    /// It is up (first "Listening for client connections" line).
    Listening { pid: u32, port: u16 },
    /// It exited.
    Exited { pid: u32, status: String },
    /// It could not be spawned.
    SpawnFailed { reason: String },
}

#[derive(Default)]
struct State {
    stopping: bool,
    pid: Option<u32>,
    pidfd: Option<Arc<PidFd>>,
}

/// The supervising thread's handle.
pub(crate) struct Supervisor {
    state: Arc<Mutex<State>>,
    wake: std::sync::mpsc::Sender<()>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Events from the child, in order.
    pub events: mpsc::UnboundedReceiver<Event>,
    log: std::path::PathBuf,
    log_start: u64,
}

/// How to run the child.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub paths: Paths,
    pub version: Version,
    /// 0 for "any free port".
    pub port: u16,
}

impl Supervisor {
    /// Starts the thread, which spawns the child at once. If the first run exits before it
    /// listens, the thread ends (the daemon decides); later exits are restarted.
    pub(crate) fn start(cfg: Config) -> Result<Supervisor, StackError> {
        let paths = &cfg.paths;
        std::fs::create_dir_all(&paths.nats_dir).map_err(io_err("create", &paths.nats_dir))?;
        rotate(&paths.nats_log);
        if cfg.version.sync_always() {
            let conf = format!(
                "# Written by `flotilla daemon` at each start; edits are overwritten.\n\
                 # sync_interval: always = fsync every JetStream write before acknowledging it.\n\
                 jetstream {{\n  store_dir: {}\n  sync_interval: always\n}}\n",
                serde_json::to_string(&paths.nats_dir.display().to_string()).unwrap_or_default()
            );
            std::fs::write(&paths.nats_conf, conf).map_err(io_err("write", &paths.nats_conf))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.nats_log)
            .map_err(io_err("open", &paths.nats_log))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let state = Arc::new(Mutex::new(State::default()));
        let (wake, wake_rx) = std::sync::mpsc::channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let cfg2 = cfg.clone();
        std::thread::Builder::new()
            .name("flotilla-nats".into())
            .spawn(move || {
                supervise(cfg2, log, st, wake_rx, events_tx);
                let _ = done_tx.send(());
            })
            .map_err(io_err(
                "start the thread that runs nats-server for",
                &paths.home,
            ))?;
        Ok(Supervisor {
            state,
            wake,
            done: Some(done),
            events,
            log: cfg.paths.nats_log.clone(),
            log_start,
        })
    }

    /// The last lines nats-server wrote since this supervisor started.
    pub(crate) fn tail(&self) -> String {
        super::tail(&self.log, self.log_start, 15)
    }

    /// nats.log
    pub(crate) fn log(&self) -> &std::path::Path {
        &self.log
    }

    /// Stops the child (SIGTERM; SIGKILL after `grace`) and waits for the thread to end.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        let pidfd = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.stopping = true;
            st.pidfd.clone()
        };
        if let Some(fd) = &pidfd {
            fd.signal(Signal::SIGTERM);
        }
        let _ = self.wake.send(());
        let Some(mut done) = self.done.take() else {
            return;
        };
        if tokio::time::timeout(grace, &mut done).await.is_err() {
            tracing::warn!(
                "nats-server did not stop within {}s of SIGTERM; killing it",
                grace.as_secs()
            );
            if let Some(fd) = &pidfd {
                fd.signal(Signal::SIGKILL);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }
}

fn rotate(log: &std::path::Path) {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
}

fn command(cfg: &Config, port: u16) -> Command {
    let mut c = Command::new("nats-server");
    let port_arg = if port == 0 {
        "-1".to_string()
    } else {
        port.to_string()
    };
    if cfg.version.sync_always() {
        c.arg("-c").arg(&cfg.paths.nats_conf);
    } else {
        c.arg("-js").arg("-sd").arg(&cfg.paths.nats_dir);
    }
    c.args(["-a", "127.0.0.1", "-p", &port_arg]);
    c.current_dir(&cfg.paths.home);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid) and builds an io::Error without allocating.
    unsafe {
        c.pre_exec(move || {
            // SIGTERM, not SIGKILL: nats-server shuts down cleanly if the daemon is SIGKILLed.
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The daemon may have died before prctl: then no signal would ever come.
            if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    c
}

fn supervise(
    cfg: Config,
    log: std::fs::File,
    state: Arc<Mutex<State>>,
    wake: std::sync::mpsc::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
) {
    let port = Arc::new(Mutex::new(cfg.port));
    let mut backoff = FIRST_BACKOFF;
    let mut first = true;
    loop {
        let mut child = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            if st.stopping {
                return;
            }
            let p = *port.lock().unwrap_or_else(|p| p.into_inner());
            let mut cmd = command(&cfg, p);
            let out = log.try_clone().map(Stdio::from).unwrap_or(Stdio::null());
            cmd.stdin(Stdio::null()).stdout(out).stderr(Stdio::piped());
            match cmd.spawn() {
                Ok(c) => {
                    st.pid = Some(c.id());
                    st.pidfd = PidFd::open(c.id()).map(Arc::new);
                    c
                }
                Err(e) => {
                    let reason = if e.kind() == std::io::ErrorKind::NotFound {
                        StackError::NatsServerMissing.to_string()
                    } else {
                        format!("cannot run nats-server: {e}")
                    };
                    let _ = events.send(Event::SpawnFailed { reason });
                    if first {
                        return;
                    }
                    drop(st);
                    if wait_or_stop(&wake, &mut backoff) {
                        return;
                    }
                    continue;
                }
            }
        };
        let pid = child.id();
        let started = Instant::now();
        let listened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = child.stderr.take().map(|stderr| {
            let log = log.try_clone();
            let events = events.clone();
            let listened = listened.clone();
            let port = port.clone();
            std::thread::spawn(move || copy_stderr(stderr, log, pid, &events, &listened, &port))
        });
        let status = child.wait();
        if let Some(r) = reader {
            let _ = r.join();
        }
        let stopping = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.pid = None;
            st.pidfd = None;
            st.stopping
        };
        let listened = listened.load(std::sync::atomic::Ordering::SeqCst);
        let status = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (_, Some(sig)) => format!(
                    "killed by {}",
                    Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
                ),
                _ => s.to_string(),
            },
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let _ = events.send(Event::Exited { pid, status });
        if stopping || (first && !listened) {
            return;
        }
        first = false;
        if started.elapsed() >= STABLE_RUN {
            backoff = FIRST_BACKOFF;
        }
        if wait_or_stop(&wake, &mut backoff) {
            return;
        }
    }
}

/// Waits out the backoff (doubling it), unless woken to stop: true when stopping.
fn wait_or_stop(wake: &std::sync::mpsc::Receiver<()>, backoff: &mut Duration) -> bool {
    let r = wake.recv_timeout(*backoff);
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    !matches!(r, Err(std::sync::mpsc::RecvTimeoutError::Timeout))
}

fn copy_stderr(
    stderr: std::process::ChildStderr,
    log: std::io::Result<std::fs::File>,
    pid: u32,
    events: &mpsc::UnboundedSender<Event>,
    listened: &std::sync::atomic::AtomicBool,
    port: &Mutex<u16>,
) {
    let mut log = log.ok();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(f) = log.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        if listened.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if let Some(p) = listening_port(&line) {
            *port.lock().unwrap_or_else(|p| p.into_inner()) = p;
            listened.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = events.send(Event::Listening { pid, port: p });
        }
    }
}

/// The port in "... Listening for client connections on 127.0.0.1:4222".
fn listening_port(line: &str) -> Option<u16> {
    let rest = line.split("Listening for client connections on ").nth(1)?;
    rest.trim().rsplit(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_the_listening_line_parse() {
        let v = parse_version("nats-server: v2.9.10\n").unwrap();
        assert_eq!((v.major, v.minor, v.text.as_str()), (2, 9, "2.9.10"));
        assert!(!v.sync_always());
        assert!(parse_version("nats-server: v2.10.0").unwrap().sync_always());
        assert!(parse_version("nats-server: v3.0.1").unwrap().sync_always());
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(
            listening_port(
                "[1] 2025/01/01 00:00:00.000000 [INF] Listening for client connections on 127.0.0.1:40123"
            ),
            Some(40123)
        );
        assert_eq!(listening_port("[INF] Server is ready"), None);
    }
}
