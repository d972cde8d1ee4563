//! `flotilla daemon` (one per home) and the CLI side that starts it detached and waits for its
//! ready line.

use super::nats::{self, Event};
use super::{Paths, READY_WAIT, StackError, StackInfo, io_err, lock, remove_if_present, tail};
use crate::config::{NatsSettings, Settings};
use crate::protocol::envelope::now_ms;
use crate::protocol::event::HostEventKind;
use crate::protocol::fleet::HostEvent;
use crate::protocol::{HostId, Subjects};
use futures::StreamExt;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long the daemon gives nats-server to say it listens.
const NATS_UP_WITHIN: Duration = Duration::from_secs(10);
/// How long the daemon gives its agent and controller to come up, after nats-server.
const ROLES_UP_WITHIN: Duration = Duration::from_secs(8);
/// How long a second daemon waits for `daemon.lock` before it says one already runs. A CLI's
/// liveness probe holds it (shared) for microseconds; a daemon holds it for its life.
const LOCK_PATIENCE: Duration = Duration::from_secs(1);
/// nats-server gets this long after SIGTERM before SIGKILL.
const NATS_GRACE: Duration = Duration::from_secs(10);
/// The controller gets this long to stop (it bounds its own requests at 10 s).
const CONTROLLER_GRACE: Duration = Duration::from_secs(15);
/// `daemon.log` is moved to `daemon.log.1` at start once it is this big.
const LOG_ROTATE_BYTES: u64 = 10 << 20;

/// The write end of the CLI's pipe: one line once ready, then closed.
struct ReadyPipe(std::fs::File);

impl ReadyPipe {
    fn adopt(fd: i32) -> Result<ReadyPipe, StackError> {
        let bad = |e: nix::errno::Errno| StackError::Daemon {
            home: Default::default(),
            reason: format!(
                "--ready-fd {fd} is not an open descriptor ({e}): it is for the CLI that starts the daemon; run `flotilla daemon` without it"
            ),
        };
        if fd < 3 {
            return Err(bad(nix::errno::Errno::EBADF));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; it checks that `fd` is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad(nix::errno::Errno::last()));
        }
        // SAFETY: the descriptor is open (checked above) and was handed to this process for it
        // alone by the CLI (`--ready-fd`); nothing else in the daemon uses it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Close-on-exec at once, so nats-server and the workers never hold the CLI's pipe open
        // (the CLI learns of the daemon's death from EOF).
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(bad)?;
        Ok(ReadyPipe(std::fs::File::from(owned)))
    }

    fn ready(mut self, url: &str) {
        use std::io::Write;
        // The CLI may have given up (EPIPE); it then stops us anyway.
        let _ = writeln!(self.0, "ready {url}");
    }
}

/// One in-process role (agent or controller): its stop sender and task.
struct Role<E> {
    name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), E>>,
    ended: bool,
}

impl<E: std::fmt::Display> Role<E> {
    fn outcome(r: Result<Result<(), E>, tokio::task::JoinError>) -> String {
        match r {
            Ok(Ok(())) => "it returned".into(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("it panicked: {e}"),
        }
    }

    /// Asks the role to stop and waits for it (up to `within` if given).
    async fn stop(&mut self, within: Option<Duration>) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if self.ended {
            return;
        }
        self.ended = true;
        let r = match within {
            Some(w) => match tokio::time::timeout(w, &mut self.task).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "the {} did not stop within {}s; leaving it",
                        self.name,
                        w.as_secs()
                    );
                    self.task.abort();
                    return;
                }
            },
            None => (&mut self.task).await,
        };
        match r {
            Ok(Ok(())) => tracing::info!("{} stopped", self.name),
            other => tracing::warn!("{} stopped: {}", self.name, Self::outcome(other)),
        }
    }
}

/// Runs the daemon until `shutdown` (SIGINT/SIGTERM): nats-server child, agent, controller; on
/// shutdown stops the agent first (its workers stop gracefully), then the controller, then
/// nats-server; removes stack.json.
pub async fn daemon(
    settings: Settings,
    ready_fd: Option<i32>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StackError> {
    let ready = ready_fd.map(ReadyPipe::adopt).transpose()?;
    if let Some(url) = &settings.nats.url {
        return Err(StackError::NotLocal { url: url.clone() });
    }
    let home = super::prepare_home(&settings.home)?;
    let paths = Paths::new(&home);
    let fail = |reason: String| StackError::Daemon {
        home: home.clone(),
        reason,
    };
    let mut held = match lock::try_exclusive(&paths.daemon_lock)? {
        Some(l) => l,
        None => lock::exclusive_opt(&paths.daemon_lock, LOCK_PATIENCE)
            .await?
            .ok_or_else(|| StackError::AlreadyRunning {
                home: home.clone(),
                pid: lock::holder_pid(&paths.daemon_lock).unwrap_or(0),
            })?,
    };
    lock::write_pid(&mut held, &paths.daemon_lock)?;
    let host = HostId::new(&settings.host_id).map_err(|e| fail(e.to_string()))?;
    let subjects = Subjects::new(&settings.subject_prefix).map_err(|e| fail(e.to_string()))?;
    let version = nats::version()?;
    if !version.sync_always() {
        tracing::warn!(
            "nats-server {} cannot fsync every JetStream write (sync_interval: always needs 2.10+): \
             acknowledged writes, desired state included, may be lost on power failure; install \
             nats-server 2.10 or newer to close that gap",
            version.text
        );
    }
    tokio::pin!(shutdown);

    // nats-server first: 4222 if free, else any free port (and any free port if 4222 was taken
    // between the check and the bind).
    let preferred = nats::choose_port(settings.nats.local_port.unwrap_or(nats::DEFAULT_PORT));
    let mut cfg = nats::Config {
        paths: paths.clone(),
        version: version.clone(),
        port: preferred,
    };
    let (mut nats, nats_pid, port) = loop {
        let mut sup = nats::Supervisor::start(cfg.clone())?;
        let first = tokio::select! {
            e = tokio::time::timeout(NATS_UP_WITHIN, sup.events.recv()) => e,
            () = &mut shutdown => {
                sup.stop(NATS_GRACE).await;
                return Ok(());
            }
        };
        match first {
            Ok(Some(Event::Listening { pid, port })) => break (sup, pid, port),
            Ok(Some(Event::Exited { status, .. })) if cfg.port != 0 => {
                tracing::warn!(
                    "nats-server did not start on port {} ({status}); trying any free port",
                    cfg.port
                );
                cfg.port = 0;
            }
            other => {
                let reason = match other {
                    Ok(Some(Event::SpawnFailed { reason })) => reason,
                    Ok(Some(Event::Exited { status, .. })) => format!("it exited ({status})"),
                    Ok(_) => "its supervising thread ended".into(),
                    Err(_) => {
                        sup.stop(NATS_GRACE).await;
                        format!(
                            "it did not report listening within {}s",
                            NATS_UP_WITHIN.as_secs()
                        )
                    }
                };
                return Err(StackError::NatsServerFailed {
                    reason,
                    log: sup.log().to_path_buf(),
                    tail: sup.tail(),
                });
            }
        }
    };
    let url = format!("nats://127.0.0.1:{port}");
    tracing::info!(url, pid = nats_pid, "nats-server is up");

    let mut role_settings = settings.clone();
    role_settings.home = home.clone();
    role_settings.nats = NatsSettings {
        url: Some(url.clone()),
        ..NatsSettings::default()
    };
    // The agent's `online` is awaited on a subscription made before the agent exists.
    let watcher = match crate::bus::connect_once(&role_settings, "flotilla-daemon").await {
        Ok(c) => c,
        Err(e) => {
            nats.stop(NATS_GRACE).await;
            return Err(fail(format!("cannot connect to its own nats-server: {e}")));
        }
    };
    let mut online = match watcher.subscribe(subjects.host_event(&host)).await {
        Ok(s) => s,
        Err(e) => {
            nats.stop(NATS_GRACE).await;
            return Err(fail(format!(
                "cannot subscribe to the agent's host events: {e}"
            )));
        }
    };
    let _ = watcher.flush().await;

    // The agent starts once the controller listens, so the controller hears the agent's
    // `online` event and can place on this host at once.
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let mut go = Some(go_tx);
    let agent_settings = role_settings.clone();
    let mut agent = Role {
        name: "agent",
        stop: Some(stop_tx),
        task: tokio::spawn(async move {
            if go_rx.await.is_err() {
                return Ok(());
            }
            crate::agent::run(agent_settings, async move {
                let _ = stop_rx.await;
            })
            .await
        }),
        ended: false,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (up_tx, mut up_rx) = oneshot::channel::<()>();
    let mut controller = Role {
        name: "controller",
        stop: Some(stop_tx),
        task: tokio::spawn(crate::controller::run_ready(
            role_settings.clone(),
            async move {
                let _ = stop_rx.await;
            },
            Some(up_tx),
        )),
        ended: false,
    };

    // Ready = agent online + controller subscribed, under one deadline.
    let deadline = tokio::time::sleep(ROLES_UP_WITHIN);
    tokio::pin!(deadline);
    let (mut agent_up, mut controller_up) = (false, false);
    let failure: Option<String> = loop {
        if agent_up && controller_up {
            break None;
        }
        tokio::select! {
            m = online.next(), if !agent_up => match m {
                Some(m) => {
                    agent_up = serde_json::from_slice::<HostEvent>(&m.payload)
                        .is_ok_and(|e| e.event == HostEventKind::Online);
                }
                None => break Some("the subscription to the agent's host events ended".into()),
            },
            r = &mut up_rx, if !controller_up => match r {
                Ok(()) => {
                    controller_up = true;
                    if let Some(go) = go.take() {
                        let _ = go.send(());
                    }
                }
                Err(_) => break Some("the controller ended before it was ready".into()),
            },
            r = &mut agent.task, if !agent.ended => {
                agent.ended = true;
                break Some(format!("the agent ended: {}", Role::outcome(r)));
            }
            r = &mut controller.task, if !controller.ended => {
                controller.ended = true;
                break Some(format!("the controller ended: {}", Role::outcome(r)));
            }
            () = &mut deadline => {
                let missing = [(!agent_up).then_some("the agent's online event"),
                               (!controller_up).then_some("the controller's API")];
                let missing: Vec<_> = missing.into_iter().flatten().collect();
                break Some(format!(
                    "not ready within {}s of nats-server (waiting for {})",
                    ROLES_UP_WITHIN.as_secs(),
                    missing.join(" and ")
                ));
            }
            () = &mut shutdown => break Some(String::new()),
        }
    };
    drop(online);
    if let Some(reason) = failure {
        agent.stop(None).await;
        controller.stop(Some(CONTROLLER_GRACE)).await;
        nats.stop(NATS_GRACE).await;
        return if reason.is_empty() {
            Ok(())
        } else {
            Err(fail(reason))
        };
    }

    let mut info = StackInfo {
        url: url.clone(),
        pid: std::process::id(),
        nats_pid,
        home: home.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: now_ms(),
        sync_always: version.sync_always(),
    };
    if let Err(e) = super::write_info(&paths, &info) {
        agent.stop(None).await;
        controller.stop(Some(CONTROLLER_GRACE)).await;
        nats.stop(NATS_GRACE).await;
        return Err(e);
    }
    tracing::info!(url, home = %home.display(), "the local stack is ready");
    if let Some(r) = ready {
        r.ready(&url);
    }
    // Its job (hearing the agent's `online`) is done: one connection less on both sides.
    drop(watcher);

    let mut events_open = true;
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            r = &mut agent.task, if !agent.ended => {
                agent.ended = true;
                break Err(fail(format!("the agent ended unexpectedly: {}", Role::outcome(r))));
            }
            r = &mut controller.task, if !controller.ended => {
                controller.ended = true;
                break Err(fail(format!("the controller ended unexpectedly: {}", Role::outcome(r))));
            }
            ev = nats.events.recv(), if events_open => match ev {
                Some(Event::Exited { pid, status, .. }) => tracing::error!(
                    pid, "nats-server exited unexpectedly ({status}); restarting it on port {port} (see {})",
                    nats.log().display()
                ),
                Some(Event::SpawnFailed { reason }) => tracing::error!("restarting nats-server failed: {reason}; trying again"),
                Some(Event::Listening { pid, .. }) => {
                    tracing::info!(pid, "nats-server is back");
                    info.nats_pid = pid;
                    if let Err(e) = super::write_info(&paths, &info) {
                        tracing::error!("{e}");
                    }
                }
                None => events_open = false,
            },
        }
    };
    if let Err(e) = &result {
        tracing::error!("{e}; stopping the local stack");
    }
    tracing::info!("stopping the agent (and its workers), then the controller, then nats-server");
    agent.stop(None).await;
    controller.stop(Some(CONTROLLER_GRACE)).await;
    nats.stop(NATS_GRACE).await;
    if let Err(e) = remove_if_present(&paths.info) {
        tracing::warn!("{e}");
    }
    tracing::info!("the local stack stopped");
    drop(held);
    result
}

fn rotate(log: &Path) {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
}

/// Starts `exe daemon` detached (own session, stdin /dev/null, output to daemon.log) with the
/// write end of a pipe, and waits up to [`READY_WAIT`] for its ready line. The caller holds
/// stack.lock.
pub(super) async fn spawn_and_wait(paths: &Paths, exe: &Path) -> Result<StackInfo, StackError> {
    rotate(&paths.daemon_log);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.daemon_log)
        .map_err(io_err("open", &paths.daemon_log))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log.try_clone().map_err(io_err("open", &paths.daemon_log))?;
    // Both ends close-on-exec in this process, so other children never inherit them; the child
    // clears the flag on its write end only, between fork and exec.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io_err("create a pipe for", &paths.home)(e.into()))?;
    let wfd = write_end.as_raw_fd();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--home")
        .arg(&paths.home)
        .arg("daemon")
        .arg("--ready-fd")
        .arg(wfd.to_string())
        .arg("--settings-file")
        .arg(&paths.settings)
        .current_dir(&paths.home)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: runs in the forked child before exec; setsid and fcntl are async-signal-safe and
    // the error is built without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let failed = |reason: String| StackError::StartFailed {
        home: paths.home.clone(),
        reason,
        log: paths.daemon_log.clone(),
        tail: tail(&paths.daemon_log, log_start, 20),
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot run {} daemon: {e}", exe.display())))?;
    drop(write_end); // only the daemon holds it now: EOF means it is gone
    let pid = child.id().unwrap_or(0);
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)
        .map_err(|e| io_err("read the pipe of", &paths.home)(e))?;
    let read_line = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        loop {
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.contains(&b'\n') {
                        return true;
                    }
                }
            }
        }
    };
    match tokio::time::timeout(READY_WAIT, read_line).await {
        Ok(true) => {}
        Ok(false) => {
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                _ => "status unknown".into(),
            };
            return Err(failed(format!(
                "the daemon (pid {pid}) exited before it was ready ({status})"
            )));
        }
        Err(_) => {
            super::proc::signal_pid(pid, nix::sys::signal::Signal::SIGTERM);
            return Err(failed(format!(
                "the daemon (pid {pid}) was not ready within {}s; it was stopped",
                READY_WAIT.as_secs()
            )));
        }
    }
    // The daemon wrote stack.json before its ready line. Its process is left to run; tokio reaps
    // it in the background if it ends while this CLI still runs.
    drop(child);
    super::read_info(paths).map_err(|e| failed(e.to_string()))
}
