//! The process table: one task owns it. Requests arrive with their reply channel; child exits,
//! readiness and timers arrive as messages. Nothing polls.

use super::converge::{self, Action, Have};
use super::ipc::OutFrame;
use super::policy::{Decision, RestartState};
use super::relay::{RelayHub, WorkerRelay};
use super::signals;
use super::spawn::{self, Identity, Launch};
use super::stats::CpuMeter;
use super::worker::{self, RunContext, WorkerEvent};
use crate::protocol::control::{
    LogsRequest, Request, SendRequest, SignalRequest, StartRequest, Target, TargetRequest,
};
use crate::protocol::envelope::{EventFields, ProcessMeta, Status, now_ms};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::event::ProcessEvent;
use crate::protocol::reply::{AgentStats, Change, ChangeKind, LogTail, ProcessInfo, Reply};
use crate::protocol::state::Assignment;
use crate::protocol::{AppKey, AppSpec};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// What the supervisor needs from the agent.
pub struct SupervisorConfig {
    /// This host.
    pub host: String,
    /// Relay hub.
    pub hub: Arc<RelayHub>,
    /// Directory of log files.
    pub log_dir: PathBuf,
    /// Tracks every task the supervisor starts.
    pub tracker: TaskTracker,
    /// Fired when the agent has stopped its workers.
    pub cancel: tokio_util::sync::CancellationToken,
}

/// Figures for the heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Processes in the table.
    pub processes: u32,
    /// Online ones.
    pub online: u32,
    /// Sum of their RSS.
    pub workers_memory: u64,
    /// Drops per pm_id (non-zero only).
    pub dropped_by_process: BTreeMap<u32, u64>,
}

enum Msg {
    Request(Box<Request>, oneshot::Sender<Reply>),
    Worker(WorkerEvent),
    RestartDue {
        pm_id: u32,
        run_gen: u64,
    },
    KillTimeout {
        pm_id: u32,
        run_gen: u64,
    },
    ReadyTimeout {
        pm_id: u32,
        run_gen: u64,
    },
    Summary(oneshot::Sender<Summary>),
    Converge(Box<Assignment>),
    Shutdown(oneshot::Sender<()>),
    /// A watched file changed (pm2 `watch`).
    Watched {
        pm_id: u32,
        generation: u64,
        path: PathBuf,
    },
    /// The cron_restart schedule is due.
    CronDue {
        pm_id: u32,
        generation: u64,
    },
    /// A run told to `disconnect` still has its channel open after `kill_timeout`: the kill
    /// signal now.
    DisconnectDue {
        pm_id: u32,
        run_gen: u64,
    },
    /// The old run of a reload had its `kill_timeout`: SIGKILL if it still runs.
    RetireKill {
        pm_id: u32,
        run_gen: u64,
    },
    /// A reloaded Node cluster worker did not say `listening` within `listen_timeout`: the
    /// old run goes anyway (pm2's behaviour).
    RetireDue {
        pm_id: u32,
        run_gen: u64,
    },
}

/// Handle to the supervisor task.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Msg>,
}

impl SupervisorHandle {
    /// Runs one request and returns its reply.
    pub async fn request(&self, req: Request, host: &str) -> Reply {
        let id = req.request_id();
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Request(Box::new(req), tx)).await.is_err() {
            return shutting_down(id, host);
        }
        rx.await.unwrap_or_else(|_| shutting_down(id, host))
    }

    /// Figures for the heartbeat; `None` once stopped.
    pub async fn summary(&self) -> Option<Summary> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Summary(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Makes the table match the assignment (see [`super::converge`]).
    pub async fn converge(&self, a: Assignment) {
        let _ = self.tx.send(Msg::Converge(Box::new(a))).await;
    }

    /// Stops every worker gracefully and waits for them; then the supervisor ends.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn shutting_down(id: Uuid, host: &str) -> Reply {
    Reply::err(
        Some(id),
        host,
        ControlError::new(
            ErrorKind::ShuttingDown,
            format!("the agent on {host} is shutting down: retry when it is back"),
        ),
    )
}

/// A spawn failure, saying where to look.
fn spawn_failed(what: &str, host: &str) -> ControlError {
    ControlError::new(
        ErrorKind::SpawnFailed,
        format!("{what} on host {host} (see the spawn:error event and the agent log)"),
    )
}

/// The sockets for `listen`: those held already when they match, else bound (or shared).
fn listening(
    table: &mut super::sockets::Sockets,
    listen: &[String],
    held: &[Arc<super::sockets::Bound>],
    host: &str,
) -> Result<Vec<Arc<super::sockets::Bound>>, ControlError> {
    let wanted = listen
        .iter()
        .map(|a| crate::protocol::listen::ListenAddr::parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    if held.iter().map(|b| &b.addr).eq(wanted.iter()) {
        return Ok(held.to_vec());
    }
    wanted
        .iter()
        .map(|a| table.get(a, host).map_err(ControlError::from))
        .collect()
}

/// One line of Node's channel protocol.
fn cluster_line(v: serde_json::Value) -> bytes::Bytes {
    let mut line = serde_json::to_vec(&v).expect("a JSON value always serialises");
    line.push(b'\n');
    line.into()
}

/// The socket a cluster worker's `queryServer` asks for: one of the app's `--listen` sockets
/// when it names an fd (`listen({fd: 3})`), else the address, bound once for every worker.
/// Errors carry the errno for Node and a line for people.
fn cluster_socket(
    table: &mut super::sockets::Sockets,
    listen: &[Arc<super::sockets::Bound>],
    msg: &serde_json::Value,
    host: &str,
    cwd: &std::path::Path,
) -> Result<Arc<super::sockets::Bound>, (i32, String)> {
    use crate::protocol::listen::ListenAddr;
    if let Some(fd) = msg.get("fd").and_then(|f| f.as_i64())
        && fd >= 3
    {
        return listen.get((fd - 3) as usize).cloned().ok_or_else(|| {
            (
                libc::EBADF,
                format!("the worker listens on fd {fd}, which is not one of its --listen sockets"),
            )
        });
    }
    let address = msg.get("address").and_then(|a| a.as_str()).unwrap_or("");
    // A number: 4, 6 (TCP) or -1 (a unix path); "udp4"/"udp6" are dgram sockets.
    let Some(kind) = msg.get("addressType").and_then(|t| t.as_i64()) else {
        return Err((
            libc::EAFNOSUPPORT,
            "UDP sockets in cluster mode are not shared by the agent: bind them with `exclusive: true`, or run one instance".into(),
        ));
    };
    let addr = if kind == -1 {
        if address.starts_with('\0') {
            return Err((
                libc::EAFNOSUPPORT,
                "abstract unix sockets in cluster mode are not supported: use a path".into(),
            ));
        }
        // Relative to the app, as if the worker had bound it itself.
        ListenAddr::Unix(cwd.join(address))
    } else {
        let port = msg.get("port").and_then(|p| p.as_u64()).unwrap_or(0);
        let port = u16::try_from(port)
            .map_err(|_| (libc::EINVAL, format!("port {port} is out of range")))?;
        if port == 0 {
            return Err((
                libc::EINVAL,
                "listen(0) in cluster mode would give each worker another port: choose one".into(),
            ));
        }
        ListenAddr::Tcp {
            host: address.to_string(),
            port,
        }
    };
    let bound = table
        .get(&addr, host)
        .map_err(|e| (e.errno, e.error.message))?;
    bound.set_nonblocking().map_err(|e| {
        (
            e.raw_os_error().unwrap_or(libc::EINVAL),
            format!("cannot make the socket for {addr} non-blocking on host {host}: {e}"),
        )
    })?;
    Ok(bound)
}

/// The detail of a reload of a process that shares no socket (a restart, as in pm2).
pub const RELOADED_AS_RESTART: &str = "a restart: it shares no listening socket";

/// The detail of a restart or reload whose new run could not be spawned.
const SPAWN_FAILED: &str = "spawn failed";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Nothing,
    Restart,
    Delete,
}

struct Run {
    pid: u32,
    writer: mpsc::Sender<OutFrame>,
    /// Set once the run is asked to stop: when its group gets SIGKILL.
    stop_deadline: Option<Instant>,
    /// A Node cluster worker told to `disconnect`: the kill signal follows once its channel
    /// closes (its servers closed, its connections done), or after `kill_timeout`.
    disconnecting: bool,
    /// A Node cluster worker said `listening` at least once.
    listened: bool,
    /// Our seq of the boot probe sent when a Node cluster worker says `online` (see
    /// [`Supervisor::on_cluster`]); its answer means the main module has run.
    boot_probe: Option<u64>,
    /// Our sequence number in Node's cluster protocol with this run.
    cluster_seq: u64,
}

/// A socket a Node cluster worker of a process listens on (Node's `SharedHandle`).
struct ClusterSocket {
    /// Node's key for it (`address:port:addressType:fd:index`).
    key: String,
    /// The run that asked for it last. A restart's new run takes over the old run's sockets
    /// (they stay open across the gap); those it does not ask for again are let go once it
    /// listens and the old run is gone.
    run_gen: u64,
    bound: Arc<super::sockets::Bound>,
}

/// The old run of a reload, serving until the new one is online.
struct Retiring {
    run: Run,
    run_gen: u64,
    /// Its metadata (its pid, its restart count), for its `exit` event.
    meta: ProcessMeta,
}

/// The key of the boot probe: one no server has (Node's keys are `address:port:...`).
const BOOT_PROBE_KEY: &str = "flotilla:boot-probe";

/// How long a Node cluster worker that closed its channel after `disconnect` gets to exit on
/// its own before the kill signal.
const DISCONNECT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How a run is first asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopWay {
    /// Node's primary: `disconnect` (servers close, connections finish), then the kill signal.
    Disconnect,
    /// pm2's `shutdown_with_message`: the `'shutdown'` message instead of the signal.
    Message,
    /// The kill signal.
    Signal,
}

fn stop_way(spec: &AppSpec, launch: &Launch) -> StopWay {
    if spec.shutdown_with_message {
        StopWay::Message
    } else if spawn::is_node_cluster(launch) {
        StopWay::Disconnect
    } else {
        StopWay::Signal
    }
}

/// Publishes a run's `exit` with that run's pid (the process's own pid is 0 by then).
fn exit_event(p: &Proc, pid: u32, ev: &EventFields) {
    let mut meta = p.meta.clone();
    meta.pid = pid;
    p.relay.set_meta(&meta);
    p.relay.event(ev);
    p.relay.set_meta(&p.meta);
}

/// A process stopped for good lets its listening sockets go (the last one closes each), as
/// pm2's stopped app refuses connections; `start` binds them again.
fn release_sockets(p: &mut Proc) {
    p.cluster_sockets.clear();
    p.sockets.clear();
}

/// Sends `sig` to a run: its process group with `treekill` (pm2's default), else the worker.
fn kill_run(pid: u32, treekill: bool, sig: Signal) -> nix::Result<()> {
    let pid = Pid::from_raw(pid as i32);
    let res = if treekill {
        killpg(pid, sig)
    } else {
        kill(pid, sig)
    };
    match res {
        Err(nix::errno::Errno::ESRCH) => Ok(()), // already gone: its exit is on the way
        other => other,
    }
}

/// Asks a run to stop the app's way; returns true when the kill signal (or the `'shutdown'`
/// message) went out, so SIGKILL follows `kill_timeout` from now, and false while a Node
/// cluster worker disconnects.
fn ask_to_stop(pm_id: u32, run: &mut Run, spec: &AppSpec, launch: &Launch) -> bool {
    let sig = signals::parse(&spec.kill_signal).unwrap_or(Signal::SIGINT);
    match stop_way(spec, launch) {
        StopWay::Disconnect => {
            let seq = run.cluster_seq;
            let line = cluster_line(serde_json::json!({
                "cmd": "NODE_CLUSTER", "act": "disconnect", "seq": seq
            }));
            if run.writer.try_send(OutFrame::line(line)).is_ok() {
                run.cluster_seq += 1;
                run.disconnecting = true;
                return false;
            }
            tracing::debug!(
                pm_id,
                "the worker's channel is full or closed: {sig} instead"
            );
        }
        StopWay::Message => {
            if run
                .writer
                .try_send(OutFrame::line(bytes::Bytes::from_static(b"\"shutdown\"\n")))
                .is_ok()
            {
                return true;
            }
            tracing::warn!(
                pm_id,
                "the worker's channel is full or closed: {sig} instead of 'shutdown'"
            );
        }
        StopWay::Signal => {}
    }
    if let Err(e) = kill_run(run.pid, spec.treekill, sig) {
        tracing::warn!(pm_id, "sending {sig} failed: {e}");
    }
    true
}

struct Proc {
    meta: ProcessMeta,
    app: AppKey,
    spec: Arc<AppSpec>,
    launch: Arc<Launch>,
    relay: Arc<WorkerRelay>,
    run_gen: u64,
    run: Option<Run>,
    policy: RestartState,
    after_stop: AfterStop,
    manual_restart_event: bool,
    announce_stop: bool,
    waiters: Vec<u64>,
    /// Reloads waiting for this run to be online (ready).
    online_waiters: Vec<u64>,
    exit_code: Option<i32>,
    meter: CpuMeter,
    out_log: PathBuf,
    err_log: PathBuf,
    instances: u32,
    /// Why the last spawn failed, if it did.
    spawn_error: Option<String>,
    /// The old run of a reload, still serving until the new one is online, then stopped.
    retiring: Option<Retiring>,
    /// Sockets its Node cluster workers asked for (`listen(port)`), kept across its runs so a
    /// restart never closes them.
    cluster_sockets: Vec<ClusterSocket>,
    /// The app's listening sockets (`listen`), held while the process exists.
    sockets: Vec<Arc<super::sockets::Bound>>,
    /// The file watch (pm2 `watch`), and what it was made from.
    file_watch: Option<super::watch::FileWatch>,
    watch_key: Option<String>,
    watch_gen: u64,
    /// Bumped whenever the cron schedule is armed again (stale timers are ignored).
    cron_gen: u64,
}

impl Proc {
    /// Run `run_gen` of this process, the current one or the old one of a reload (then true).
    fn run_of(&self, run_gen: u64) -> Option<(&Run, bool)> {
        match (&self.run, &self.retiring) {
            (Some(run), _) if self.run_gen == run_gen => Some((run, false)),
            (_, Some(r)) if r.run_gen == run_gen => Some((&r.run, true)),
            _ => None,
        }
    }

    /// The same, to change it.
    fn run_of_mut(&mut self, run_gen: u64) -> Option<(&mut Run, bool)> {
        match (&mut self.run, &mut self.retiring) {
            (Some(run), _) if self.run_gen == run_gen => Some((run, false)),
            (_, Some(r)) if r.run_gen == run_gen => Some((&mut r.run, true)),
            _ => None,
        }
    }
}

struct Op {
    request_id: Uuid,
    reply: oneshot::Sender<Reply>,
    waiting: BTreeSet<u32>,
    changes: Vec<Change>,
    /// When each process settles.
    settle: Settle,
}

/// When a process of an op settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Stop, delete: once it has exited (or at once when it was not running).
    Exited,
    /// Restart: once its new run is online (ready, or a Node cluster worker's main module
    /// has run), so the reply shows it online.
    Restarted,
    /// Reload: the same, the new run started before the old one stops where sockets are shared.
    Reloaded,
}

impl Settle {
    /// The change once its new run is online.
    fn done(self) -> ChangeKind {
        match self {
            Settle::Restarted => ChangeKind::Restarted,
            _ => ChangeKind::Reloaded,
        }
    }

    /// The change when its new run could not be had, and why.
    fn not_done(self, pm_id: u32, why: &str) -> Change {
        let kind = match self {
            Settle::Reloaded => ChangeKind::NotReloaded,
            _ => ChangeKind::NotRestarted,
        };
        Change::new(pm_id, kind).detail(why)
    }
}

struct Supervisor {
    cfg: SupervisorConfig,
    tx: mpsc::Sender<Msg>,
    procs: BTreeMap<u32, Proc>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    next_pm_id: u32,
    shutdown: Option<oneshot::Sender<()>>,
    agent_meter: CpuMeter,
    /// The assignment applied last (convergence compares against it).
    applied: Option<Assignment>,
    /// Listening sockets by address.
    sockets: super::sockets::Sockets,
    /// The first cluster worker's `data` per queryServer key (echoed to every worker).
    cluster_data: HashMap<String, serde_json::Value>,
}

/// Starts the supervisor task on the config's tracker.
pub fn start(cfg: SupervisorConfig) -> SupervisorHandle {
    let (tx, rx) = mpsc::channel(1024);
    let (wtx, wrx) = mpsc::channel::<WorkerEvent>(1024);
    let tracker = cfg.tracker.clone();
    // Worker events get their own channel so a burst of requests never delays an exit.
    let fwd = tx.clone();
    tracker.spawn(forward(wrx, fwd));
    let sup = Supervisor {
        cfg,
        tx: tx.clone(),
        procs: BTreeMap::new(),
        ops: HashMap::new(),
        next_op: 0,
        next_pm_id: 0,
        shutdown: None,
        agent_meter: CpuMeter::default(),
        applied: None,
        sockets: Default::default(),
        cluster_data: HashMap::new(),
    };
    tracker.spawn(sup.run(rx, wtx));
    SupervisorHandle { tx }
}

/// Sends `msg` back to the supervisor at `at`, unless the agent finishes shutting down first
/// (a stale timer must not hold shutdown up: a 5-minute restart delay would).
fn schedule(
    tracker: &TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
    tx: &mpsc::Sender<Msg>,
    at: Instant,
    msg: Msg,
) {
    let tx = tx.clone();
    tracker.spawn(cancel.clone().run_until_cancelled_owned(async move {
        tokio::time::sleep_until(at).await;
        let _ = tx.send(msg).await;
    }));
}

async fn forward(mut rx: mpsc::Receiver<WorkerEvent>, tx: mpsc::Sender<Msg>) {
    while let Some(ev) = rx.recv().await {
        if tx.send(Msg::Worker(ev)).await.is_err() {
            break;
        }
    }
}

impl Supervisor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, wtx: mpsc::Sender<WorkerEvent>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Request(req, reply) => self.on_request(*req, reply, &wtx),
                Msg::Worker(WorkerEvent::Exited {
                    pm_id,
                    run_gen,
                    status,
                }) => self.on_exit(pm_id, run_gen, status, &wtx),
                Msg::Worker(WorkerEvent::Ready { pm_id, run_gen }) => {
                    self.on_ready(pm_id, run_gen, false)
                }
                Msg::ReadyTimeout { pm_id, run_gen } => self.on_ready(pm_id, run_gen, true),
                Msg::Worker(WorkerEvent::Cluster {
                    pm_id,
                    run_gen,
                    msg,
                }) => self.on_cluster(pm_id, run_gen, &msg),
                Msg::RestartDue { pm_id, run_gen } => {
                    if let Some(p) = self.procs.get_mut(&pm_id)
                        && p.run_gen == run_gen
                        && p.meta.status == Status::WaitingRestart
                    {
                        p.meta.restart_time += 1;
                        self.spawn_proc(pm_id, &wtx);
                    }
                }
                Msg::KillTimeout { pm_id, run_gen } => self.on_kill_timeout(pm_id, run_gen),
                Msg::DisconnectDue { pm_id, run_gen } => self.disconnected(pm_id, run_gen),
                Msg::Worker(WorkerEvent::ChannelClosed { pm_id, run_gen }) => {
                    self.channel_closed(pm_id, run_gen)
                }
                Msg::RetireDue { pm_id, run_gen } => {
                    if self.procs.get(&pm_id).is_some_and(|p| p.run_gen == run_gen) {
                        self.overlap_done(pm_id);
                    }
                }
                Msg::RetireKill { pm_id, run_gen } => {
                    if let Some(p) = self.procs.get(&pm_id)
                        && let Some(Retiring { run: old, .. }) =
                            p.retiring.as_ref().filter(|r| r.run_gen == run_gen)
                    {
                        tracing::warn!(
                            pm_id,
                            pid = old.pid,
                            "the old run of a reload is still running after kill_timeout: SIGKILL"
                        );
                        let _ = killpg(Pid::from_raw(old.pid as i32), Signal::SIGKILL);
                    }
                }
                Msg::Watched {
                    pm_id,
                    generation,
                    path,
                } => {
                    let due = self.procs.get(&pm_id).is_some_and(|p| {
                        p.watch_gen == generation
                            && matches!(p.meta.status, Status::Online | Status::Launching)
                    });
                    if due && self.shutdown.is_none() {
                        let reason = format!("watch: {} changed: restarting", path.display());
                        self.scheduled_restart(pm_id, reason);
                    }
                }
                Msg::CronDue { pm_id, generation } => {
                    let Some(p) = self.procs.get(&pm_id) else {
                        continue;
                    };
                    if p.cron_gen != generation || self.shutdown.is_some() {
                        continue;
                    }
                    if matches!(p.meta.status, Status::Online | Status::Launching) {
                        let reason = format!(
                            "cron_restart '{}': restarting",
                            p.spec.cron_restart.as_deref().unwrap_or_default()
                        );
                        self.scheduled_restart(pm_id, reason);
                    } else {
                        // Not running now: the next occurrence may find it running.
                        self.arm_schedules(pm_id);
                    }
                }
                Msg::Summary(reply) => {
                    let _ = reply.send(self.summary());
                    self.enforce_memory_limits();
                }
                Msg::Converge(a) => {
                    if self.shutdown.is_none() {
                        self.converge(*a, &wtx);
                    }
                }
                Msg::Shutdown(done) => {
                    self.shutdown = Some(done);
                    let ids: Vec<u32> = self.procs.keys().copied().collect();
                    for id in ids {
                        self.stop_one(id, AfterStop::Nothing, None);
                    }
                }
            }
            if self.shutdown.is_some()
                && self
                    .procs
                    .values()
                    .all(|p| p.run.is_none() && p.retiring.is_none())
            {
                break;
            }
        }
        for p in self.procs.values() {
            self.cfg.hub.retire(&p.relay);
        }
        if let Some(done) = self.shutdown.take() {
            let _ = done.send(());
        }
    }

    fn host(&self) -> &str {
        &self.cfg.host
    }

    fn on_request(
        &mut self,
        req: Request,
        reply: oneshot::Sender<Reply>,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) {
        let id = req.request_id();
        if self.shutdown.is_some() {
            let _ = reply.send(shutting_down(id, self.host()));
            return;
        }
        let res = match req {
            Request::Start(r) => self.start(*r, wtx),
            Request::List(r) => self.list(&r),
            Request::Send(r) => self.send(r),
            Request::Signal(r) => self.signal(r),
            Request::Logs(r) => self.logs(&r),
            Request::Stop(r) => {
                return self.targeted(r, AfterStop::Nothing, Settle::Exited, reply, wtx);
            }
            Request::Restart(r) => {
                return self.targeted(r, AfterStop::Restart, Settle::Restarted, reply, wtx);
            }
            Request::Reload(r) => {
                return self.targeted(r, AfterStop::Restart, Settle::Reloaded, reply, wtx);
            }
            Request::Delete(r) => {
                return self.targeted(r, AfterStop::Delete, Settle::Exited, reply, wtx);
            }
        };
        let out = match res {
            Ok(r) => r,
            Err(e) => Reply::err(Some(id), self.host(), e),
        };
        let _ = reply.send(out);
    }

    fn matching(&self, target: &Target) -> Result<Vec<u32>, ControlError> {
        let ids: Vec<u32> = self
            .procs
            .values()
            .filter(|p| target.matches(&p.meta))
            .map(|p| p.meta.pm_id)
            .collect();
        if ids.is_empty() && *target != Target::All {
            return Err(ControlError::new(
                ErrorKind::NotFound,
                format!(
                    "no process matches '{target}' on host {}: `list` shows what runs there",
                    self.host()
                ),
            ));
        }
        Ok(ids)
    }

    /// The processes a request is about, and (when the request names pm_ids) the ones this
    /// agent does not have.
    fn select(
        &self,
        target: &Target,
        pm_ids: &[u32],
    ) -> Result<(Vec<u32>, Vec<u32>), ControlError> {
        if pm_ids.is_empty() {
            return self.matching(target).map(|ids| (ids, vec![]));
        }
        let (mut have, mut absent) = (vec![], vec![]);
        for &id in pm_ids {
            match self.procs.get(&id) {
                Some(p) if target.matches(&p.meta) => have.push(id),
                _ => absent.push(id),
            }
        }
        have.sort_unstable();
        have.dedup();
        Ok((have, absent))
    }

    fn info(&mut self, pm_id: u32) -> Option<ProcessInfo> {
        let p = self.procs.get_mut(&pm_id)?;
        if let Some(run) = &p.run {
            p.meter.update(run.pid);
        }
        Some(ProcessInfo {
            meta: p.meta.clone(),
            cpu: if p.run.is_some() { p.meter.cpu } else { 0.0 },
            memory: if p.run.is_some() { p.meter.memory } else { 0 },
            dropped: p.relay.dropped(),
            ipc_errors: p.relay.ipc_errors(),
            unstable_restarts: p.policy.unstable_restarts,
            exit_code: p.exit_code,
            script: p.launch.script.clone(),
            cwd: p.launch.cwd.clone(),
            interpreter: p.launch.interpreter.clone(),
            out_log: p.out_log.clone(),
            err_log: p.err_log.clone(),
        })
    }

    fn agent_stats(&mut self) -> AgentStats {
        let s = self.cfg.hub.relay().stats();
        AgentStats {
            host: self.cfg.host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            counters: self.cfg.hub.counters(),
            queued: s.queued,
            max_message: self.cfg.hub.max_message() as u64,
        }
    }

    fn list(&mut self, r: &TargetRequest) -> Result<Reply, ControlError> {
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        reply.processes = ids.into_iter().filter_map(|id| self.info(id)).collect();
        reply.agent = Some(self.agent_stats());
        Ok(reply)
    }

    /// The last lines of each process's log files (bounded so the reply fits in a message).
    fn logs(&mut self, r: &LogsRequest) -> Result<Reply, ControlError> {
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let lines = r.lines.min(10_000) as usize;
        let files = (ids.len() * 2).max(1) as u64;
        // Half the largest message for the whole reply, shared by the files.
        let per_file = (self.cfg.hub.max_message() as u64 / 2 / files).max(1024);
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        for id in ids {
            let p = &self.procs[&id];
            for (stream, path) in [("out", &p.out_log), ("err", &p.err_log)] {
                let (got, truncated) = super::tail::tail(path, lines, per_file).map_err(|e| {
                    ControlError::new(
                        ErrorKind::Internal,
                        format!(
                            "cannot read {} on host {}: {e}",
                            path.display(),
                            self.host()
                        ),
                    )
                })?;
                reply.logs.push(LogTail {
                    pm_id: id,
                    name: p.meta.name.clone(),
                    namespace: p.meta.namespace.clone(),
                    host: self.cfg.host.clone(),
                    stream: stream.into(),
                    path: path.clone(),
                    lines: got,
                    truncated,
                });
            }
        }
        Ok(reply)
    }

    fn summary(&mut self) -> Summary {
        let ids: Vec<u32> = self.procs.keys().copied().collect();
        let mut s = Summary::default();
        for id in ids {
            let Some(info) = self.info(id) else { continue };
            s.processes += 1;
            if info.meta.status == Status::Online {
                s.online += 1;
            }
            s.workers_memory += info.memory;
            if info.dropped > 0 {
                s.dropped_by_process.insert(id, info.dropped);
            }
        }
        self.agent_meter.update(0);
        s
    }

    /// Applies the convergence plan for `a`.
    fn converge(&mut self, a: Assignment, wtx: &mpsc::Sender<WorkerEvent>) {
        let steps = {
            let have: Vec<Have<'_>> = self
                .procs
                .values()
                .map(|p| Have {
                    pm_id: p.meta.pm_id,
                    spec: &p.spec,
                    alive: p.meta.status.is_alive(),
                    stopping: p.meta.status == Status::Stopping,
                })
                .collect();
            converge::plan(&have, self.applied.as_ref(), &a)
        };
        if !steps.is_empty() {
            tracing::info!(steps = steps.len(), "converging to the assignment");
        }
        for step in steps {
            match step {
                Action::Delete(id) => {
                    if !self.stop_one(id, AfterStop::Delete, None) {
                        self.delete_now(id);
                    }
                }
                Action::Stop(id) => {
                    if self.stop_one(id, AfterStop::Nothing, None)
                        && let Some(p) = self.procs.get_mut(&id)
                    {
                        p.announce_stop = true; // `stop` once it has exited
                    }
                }
                Action::Resume(id) => {
                    if !self.stop_one(id, AfterStop::Restart, None) {
                        self.manual_restart(id, wtx);
                    }
                }
                Action::Respec(id, spec) => match spawn::resolve(&spec, &self.cfg.host) {
                    Ok(launch) => {
                        if let Some(p) = self.procs.get_mut(&id) {
                            p.spec = Arc::new(spec);
                            p.launch = Arc::new(launch);
                        }
                        if !self.stop_one(id, AfterStop::Restart, None) {
                            self.manual_restart(id, wtx);
                        }
                    }
                    Err(e) => self.emit(
                        id,
                        EventFields::named(ProcessEvent::SpawnError).reason(e.message),
                    ),
                },
                Action::Start(spec) => {
                    let name = format!("{}/{}", spec.namespace, spec.name);
                    let req = StartRequest {
                        request_id: Uuid::new_v4(),
                        app: spec.clone(),
                        force: true,
                    };
                    match self.start(req, wtx) {
                        Ok(r) if r.error.is_none() => {}
                        Ok(r) => {
                            tracing::error!(app = %name, "assigned app did not start: {:?}", r.error)
                        }
                        Err(e) => {
                            tracing::error!(app = %name, "assigned app cannot start: {e}");
                            self.report_unstartable(&spec, &e);
                        }
                    }
                }
            }
        }
        self.applied = Some(a);
    }

    /// A restart nobody typed (watch, cron, memory): a `restart` event with the reason, then a
    /// graceful stop and a new run.
    fn scheduled_restart(&mut self, pm_id: u32, reason: String) {
        tracing::info!(pm_id, "{reason}");
        self.emit(
            pm_id,
            EventFields::named(ProcessEvent::Restart)
                .manually(false)
                .reason(reason),
        );
        self.stop_one(pm_id, AfterStop::Restart, None);
    }

    /// Arms the cron_restart timer for the next occurrence, and (re)makes the file watch when
    /// its settings changed. Called at every new run.
    fn arm_schedules(&mut self, pm_id: u32) {
        use crate::protocol::schedule::{CronRestart, Watch};
        let tracker = self.cfg.tracker.clone();
        let tx = self.tx.clone();
        let cancel = self.cfg.cancel.clone();
        let log_dir = self.cfg.log_dir.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        p.cron_gen += 1;
        if let Some(expr) = &p.spec.cron_restart {
            match CronRestart::parse(expr) {
                Ok(Some(c)) => {
                    if let Some(d) = c.next_after(chrono::Local::now()) {
                        let generation = p.cron_gen;
                        schedule(
                            &tracker,
                            &cancel,
                            &tx,
                            Instant::now() + d,
                            Msg::CronDue { pm_id, generation },
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(pm_id, "{e}"),
            }
        }
        let key = (!p.spec.watch.is_off()).then(|| {
            serde_json::json!([
                p.spec.watch,
                p.spec.ignore_watch,
                p.spec.watch_delay.as_millis() as u64,
                p.launch.cwd
            ])
            .to_string()
        });
        if key == p.watch_key {
            return;
        }
        p.file_watch = None;
        p.watch_key = key;
        p.watch_gen += 1;
        let cwd = p.launch.cwd.clone();
        let roots: Vec<PathBuf> = match &p.spec.watch {
            Watch::Off => return,
            Watch::Cwd => vec![cwd],
            Watch::Paths(ps) => ps.iter().map(|x| cwd.join(x)).collect(),
        };
        let generation = p.watch_gen;
        let started =
            super::watch::Filter::new(roots, &p.spec.ignore_watch, log_dir).and_then(|f| {
                super::watch::start(&tracker, f, p.spec.watch_delay, move |path| {
                    if tx
                        .try_send(Msg::Watched {
                            pm_id,
                            generation,
                            path,
                        })
                        .is_err()
                    {
                        tracing::warn!(
                            pm_id,
                            "a file change was not acted on: the agent is busy or stopping"
                        );
                    }
                })
            });
        match started {
            Ok(w) => p.file_watch = Some(w),
            Err(reason) => {
                tracing::warn!(pm_id, "{reason}");
                p.relay
                    .event(&EventFields::named(ProcessEvent::WatchError).reason(reason));
            }
        }
    }

    /// pm2's `max_memory_restart`: checked at every heartbeat sample; a worker over its limit is
    /// restarted gracefully (pm2 reloads it; the counters reset as in pm2).
    fn enforce_memory_limits(&mut self) {
        let over: Vec<(u32, u64, u64)> = self
            .procs
            .values()
            .filter_map(|p| {
                let limit = p.spec.max_memory_restart?;
                (p.run.is_some() && p.meta.status == Status::Online && p.meter.memory > limit)
                    .then_some((p.meta.pm_id, p.meter.memory, limit))
            })
            .collect();
        for (pm_id, memory, limit) in over {
            let reason = format!(
                "memory {} MiB is over max_memory_restart {} MiB: restarting",
                memory >> 20,
                limit >> 20
            );
            tracing::warn!(pm_id, "{reason}");
            self.scheduled_restart(pm_id, reason);
        }
    }

    fn start(
        &mut self,
        r: StartRequest,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) -> Result<Reply, ControlError> {
        let spec = r.app;
        spec.validate()?;
        let app = AppKey::new(&spec.namespace, &spec.name)?;
        let instances = spec.instances.unwrap_or(1);
        let launch = Arc::new(spawn::resolve(&spec, self.host())?);
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        if !spec.pm_ids.is_empty() {
            return self.start_assigned(app, spec, launch, reply, wtx);
        }
        let existing: Vec<u32> = self
            .procs
            .values()
            .filter(|p| p.app == app)
            .map(|p| p.meta.pm_id)
            .collect();
        let spec = Arc::new(spec);
        if !existing.is_empty() && !r.force {
            let alive: Vec<u32> = existing
                .iter()
                .copied()
                .filter(|id| {
                    self.procs[id].meta.status != Status::Stopped
                        && self.procs[id].meta.status != Status::Errored
                })
                .collect();
            if !alive.is_empty() {
                return Err(ControlError::new(
                    ErrorKind::AlreadyRunning,
                    format!(
                        "{app} is already running on host {} (pm_id {}): restart it, or force a second copy",
                        self.host(),
                        alive
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            // pm2: `start` of a stopped app starts it again, with the new options.
            for id in existing {
                self.start_again(id, &spec, &launch, wtx);
                reply.changes.push(Change::new(id, ChangeKind::Started));
                reply.processes.extend(self.info(id));
            }
            return Ok(reply);
        }
        // Lowest free ids from the counter on (controller-chosen ids may sit above it).
        let mut ids = Vec::with_capacity(instances as usize);
        let mut next = self.next_pm_id;
        while ids.len() < instances as usize {
            if !self.procs.contains_key(&next) {
                ids.push(next);
            }
            next = next.checked_add(1).ok_or_else(|| {
                ControlError::new(ErrorKind::InvalidValue, "no pm_id is left on this agent")
            })?;
        }
        let numbers: Vec<u32> = (0..instances).collect();
        self.create(&app, &spec, &launch, &ids, &numbers, &mut reply, wtx)?;
        Ok(reply)
    }

    /// A start with the pm_ids chosen by the controller: idempotent, so that it and the
    /// convergence to the same assignment can arrive in either order. Ids already here with the
    /// same app are left running (`already online`), started again when stopped, or restarted
    /// when their options changed; the others are created.
    fn start_assigned(
        &mut self,
        app: AppKey,
        spec: AppSpec,
        launch: Arc<Launch>,
        mut reply: Reply,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) -> Result<Reply, ControlError> {
        let n = spec.instances.unwrap_or(1) as usize;
        if spec.pm_ids.len() != n {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!("pm_ids has {} ids for {n} instances", spec.pm_ids.len()),
            ));
        }
        if !spec.instance_numbers.is_empty() && spec.instance_numbers.len() != n {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "instance_numbers has {} numbers for {n} instances",
                    spec.instance_numbers.len()
                ),
            ));
        }
        let distinct: BTreeSet<u32> = spec.pm_ids.iter().copied().collect();
        if distinct.len() != spec.pm_ids.len() {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                "pm_ids has the same id twice: each instance needs its own",
            ));
        }
        if let Some(p) = spec
            .pm_ids
            .iter()
            .filter_map(|id| self.procs.get(id))
            .find(|p| p.app != app)
        {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "pm_id {} is already used by {} on host {}",
                    p.meta.pm_id,
                    p.app,
                    self.host()
                ),
            ));
        }
        let spec = Arc::new(spec);
        let (mut ids, mut numbers) = (vec![], vec![]);
        for (i, &id) in spec.pm_ids.iter().enumerate() {
            let Some(p) = self.procs.get(&id) else {
                ids.push(id);
                numbers.push(spec.instance_numbers.get(i).copied().unwrap_or(i as u32));
                continue;
            };
            let same = converge::same_shape(&p.spec, &spec);
            let alive = p.meta.status.is_alive();
            let what = if p.meta.status == Status::Stopping {
                // Still stopping (a stop under way when it was wanted running again): run it
                // again once it has exited, with these options.
                if let Some(p) = self.procs.get_mut(&id) {
                    p.spec = spec.clone();
                    p.launch = launch.clone();
                }
                self.stop_one(id, AfterStop::Restart, None);
                Change::new(id, ChangeKind::Restarting)
            } else if !same && alive {
                if let Some(p) = self.procs.get_mut(&id) {
                    p.spec = spec.clone();
                    p.launch = launch.clone();
                }
                if !self.stop_one(id, AfterStop::Restart, None) {
                    self.manual_restart(id, wtx);
                }
                Change::new(id, ChangeKind::Restarted).detail("with the new options")
            } else if !alive {
                self.start_again(id, &spec, &launch, wtx);
                Change::new(id, ChangeKind::Started)
            } else {
                Change::new(id, ChangeKind::AlreadyOnline)
            };
            reply.changes.push(what);
            reply.processes.extend(self.info(id));
        }
        if !ids.is_empty() {
            self.create(&app, &spec, &launch, &ids, &numbers, &mut reply, wtx)?;
        }
        if reply.error.is_none() {
            reply.error = self.spawn_errors(&app, &spec.pm_ids);
        }
        Ok(reply)
    }

    /// pm2: `start` of a stopped app starts it again (a restart), with the options given.
    fn start_again(
        &mut self,
        id: u32,
        spec: &Arc<AppSpec>,
        launch: &Arc<Launch>,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.spec = spec.clone();
            p.launch = launch.clone();
        }
        // pm2 restarts it: one more restart, a `restart` event; the same as the convergence's
        // `Resume`, so whichever arrives first, the count is the same.
        self.manual_restart(id, wtx);
    }

    /// Creates and spawns the processes `ids` (instance numbers `numbers`) of `app`.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        app: &AppKey,
        spec: &Arc<AppSpec>,
        launch: &Arc<Launch>,
        ids: &[u32],
        numbers: &[u32],
        reply: &mut Reply,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) -> Result<(), ControlError> {
        let app_id = spec.app_id.unwrap_or_else(Uuid::new_v4);
        std::fs::create_dir_all(&self.cfg.log_dir).map_err(|e| {
            ControlError::new(
                ErrorKind::SpawnFailed,
                format!(
                    "cannot create the log directory {}: {e}",
                    self.cfg.log_dir.display()
                ),
            )
        })?;
        let instances = spec.instances.unwrap_or(ids.len() as u32);
        for (i, &pm_id) in ids.iter().enumerate() {
            self.next_pm_id = self.next_pm_id.max(pm_id.saturating_add(1));
            let instance = numbers.get(i).copied().unwrap_or(i as u32);
            let meta = self.new_meta(app, pm_id, instance, launch.exec_mode, app_id);
            let relay = self.cfg.hub.worker(app, &meta);
            let log = |kind: &str| {
                self.cfg
                    .log_dir
                    .join(format!("{}-{kind}-{pm_id}.log", app.name()))
            };
            let proc = Proc {
                out_log: log("out"),
                err_log: log("error"),
                meta,
                app: app.clone(),
                spec: spec.clone(),
                launch: launch.clone(),
                relay,
                run_gen: 0,
                run: None,
                policy: RestartState::new(Instant::now()),
                after_stop: AfterStop::Nothing,
                manual_restart_event: false,
                announce_stop: false,
                waiters: vec![],
                online_waiters: vec![],
                exit_code: None,
                meter: CpuMeter::default(),
                instances,
                spawn_error: None,
                retiring: None,
                cluster_sockets: vec![],
                sockets: vec![],
                file_watch: None,
                watch_key: None,
                watch_gen: 0,
                cron_gen: 0,
            };
            proc.relay
                .event(&EventFields::named(ProcessEvent::Start).manually(true));
            self.procs.insert(pm_id, proc);
            self.spawn_proc(pm_id, wtx);
            reply.changes.push(Change::new(pm_id, ChangeKind::Started));
        }
        reply
            .processes
            .extend(ids.iter().filter_map(|&id| self.info(id)));
        if let Some(e) = self.spawn_errors(app, ids) {
            reply.error = Some(e);
        }
        Ok(())
    }

    /// The error of the `ids` whose spawn failed, with the reasons (`None` when none failed).
    fn spawn_errors(&self, app: &AppKey, ids: &[u32]) -> Option<ControlError> {
        let failed: Vec<&Proc> = ids
            .iter()
            .filter_map(|id| self.procs.get(id))
            .filter(|p| p.meta.status == Status::Errored)
            .collect();
        if failed.is_empty() {
            return None;
        }
        let mut reasons: Vec<&str> = failed
            .iter()
            .filter_map(|p| p.spawn_error.as_deref())
            .collect();
        reasons.dedup();
        Some(ControlError::new(
            ErrorKind::SpawnFailed,
            format!(
                "{app}: pm_id {} could not be spawned: {}",
                failed
                    .iter()
                    .map(|p| p.meta.pm_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                if reasons.is_empty() {
                    format!("see the agent log on host {}", self.host())
                } else {
                    reasons.join("; ")
                }
            ),
        ))
    }

    /// A new process's metadata: launching, never run.
    fn new_meta(
        &self,
        app: &AppKey,
        pm_id: u32,
        instance: u32,
        exec_mode: crate::protocol::ExecMode,
        app_id: Uuid,
    ) -> ProcessMeta {
        ProcessMeta {
            pm_id,
            name: app.name().into(),
            namespace: app.namespace().into(),
            rev: None,
            host: self.cfg.host.clone(),
            pid: 0,
            instance,
            exec_mode,
            status: Status::Launching,
            restart_time: 0,
            pm_uptime: 0,
            app_id,
        }
    }

    /// An assigned app that cannot start here (its script is missing, ...): a `spawn:error`
    /// event per pm_id, so whoever watches the app (the CLI waiting for `online`) hears why.
    fn report_unstartable(&self, spec: &AppSpec, e: &ControlError) {
        let Ok(app) = AppKey::new(&spec.namespace, &spec.name) else {
            return;
        };
        for (i, &pm_id) in spec.pm_ids.iter().enumerate() {
            let instance = spec.instance_numbers.get(i).copied().unwrap_or(i as u32);
            let exec_mode = spec.exec_mode.unwrap_or_default();
            let mut meta = self.new_meta(
                &app,
                pm_id,
                instance,
                exec_mode,
                spec.app_id.unwrap_or_default(),
            );
            meta.status = Status::Errored;
            let relay = self.cfg.hub.worker(&app, &meta);
            relay.event(&EventFields::named(ProcessEvent::SpawnError).reason(e.message.clone()));
            self.cfg.hub.retire(&relay);
        }
    }

    /// Spawns a new run of `pm_id`; on failure the process is `errored` with an event.
    fn spawn_proc(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) {
        let tracker = self.cfg.tracker.clone();
        let self_tx = self.tx.clone();
        let shutting_down = self.shutdown.is_some();
        let cancel = self.cfg.cancel.clone();
        let host = self.cfg.host.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        p.run_gen += 1;
        if shutting_down {
            // A restart that was under way when the agent began to stop: leave it stopped.
            p.meta.status = Status::Stopped;
            p.relay.set_meta(&p.meta);
            return;
        }
        // The app's listening sockets: bound by the first instance, kept by every run.
        let sockets = match listening(&mut self.sockets, &p.spec.listen, &p.sockets, &host) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(pm_id, "{}", e.message);
                p.meta.status = Status::Errored;
                p.meta.pid = 0;
                p.relay.set_meta(&p.meta);
                p.spawn_error = Some(e.message.clone());
                p.relay
                    .event(&EventFields::named(ProcessEvent::SpawnError).reason(e.message));
                return;
            }
        };
        p.sockets = sockets;
        let fds: Vec<std::os::fd::RawFd> = p.sockets.iter().map(|b| b.raw()).collect();
        let mut env = spawn::environment(
            &p.spec,
            &p.launch,
            &Identity {
                pm_id,
                name: &p.meta.name,
                namespace: &p.meta.namespace,
                instance: p.meta.instance,
                instances: p.instances,
            },
        );
        if !fds.is_empty() {
            env.retain(|(k, _)| k != "NODE_CHANNEL_FD");
            let names: Vec<String> = p.sockets.iter().map(|b| b.addr.fd_name()).collect();
            env.push((
                "NODE_CHANNEL_FD".into(),
                spawn::channel_fd(fds.len()).to_string().into(),
            ));
            env.push(("LISTEN_FDS".into(), fds.len().to_string().into()));
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        let death_signal = signals::parse(&p.spec.kill_signal).unwrap_or(Signal::SIGINT) as i32;
        let spawned = spawn::spawn(&p.launch, env, &fds, death_signal).and_then(|sp| {
            let pid = sp.pid;
            let writer = worker::start(
                &tracker,
                sp,
                RunContext {
                    pm_id,
                    run_gen: p.run_gen,
                    relay: p.relay.clone(),
                    events: wtx.clone(),
                    out_log: p.out_log.clone(),
                    err_log: p.err_log.clone(),
                    cancel: cancel.clone(),
                },
            )?;
            Ok((pid, writer))
        });
        match spawned {
            Ok((pid, writer)) => {
                p.run = Some(Run {
                    pid,
                    writer,
                    stop_deadline: None,
                    disconnecting: false,
                    listened: false,
                    boot_probe: None,
                    cluster_seq: 0,
                });
                p.policy.started(Instant::now());
                p.spawn_error = None;
                p.meter = CpuMeter::default();
                p.meta.pid = pid;
                p.meta.pm_uptime = now_ms();
                // Watch and cron are armed before anyone hears `online`: a change made by whoever
                // waited for it counts.
                self.arm_schedules(pm_id);
                let Some(p) = self.procs.get_mut(&pm_id) else {
                    return;
                };
                // A Node cluster worker is online once Node has booted and run the main module
                // (its `listen()`s asked for), unless it is to send 'ready'.
                if p.spec.wait_ready || spawn::is_node_cluster(&p.launch) {
                    p.meta.status = Status::Launching;
                    p.relay.set_meta(&p.meta);
                    let (run_gen, d) = (p.run_gen, p.spec.listen_timeout);
                    schedule(
                        &tracker,
                        &cancel,
                        &self_tx,
                        Instant::now() + d,
                        Msg::ReadyTimeout { pm_id, run_gen },
                    );
                } else {
                    p.meta.status = Status::Online;
                    p.relay.set_meta(&p.meta);
                    p.relay.event(&EventFields::named(ProcessEvent::Online));
                }
                tracing::info!(pm_id, pid, app = %p.app, "worker spawned");
                if p.meta.status == Status::Online && p.retiring.is_some() {
                    self.retire(pm_id);
                }
            }
            Err(e) => {
                let reason = format!(
                    "could not spawn {} for {} on host {}: {e}",
                    p.launch.program.display(),
                    p.app,
                    self.cfg.host
                );
                tracing::error!(pm_id, "{reason}");
                p.meta.status = Status::Errored;
                p.meta.pid = 0;
                p.relay.set_meta(&p.meta);
                p.spawn_error = Some(reason.clone());
                p.relay
                    .event(&EventFields::named(ProcessEvent::SpawnError).reason(reason));
            }
        }
    }

    fn on_ready(&mut self, pm_id: u32, run_gen: u64, timed_out: bool) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.run_gen != run_gen || p.run.is_none() {
            return;
        }
        if !timed_out {
            p.relay.event(&EventFields::named(ProcessEvent::Ready));
        }
        if p.meta.status == Status::Launching {
            let reason = timed_out.then(|| {
                let ms = p.spec.listen_timeout.as_millis();
                if p.spec.wait_ready {
                    format!("no 'ready' within listen_timeout ({ms} ms): online anyway, as pm2 does")
                } else {
                    format!(
                        "the Node cluster worker did not answer within listen_timeout ({ms} ms): online anyway"
                    )
                }
            });
            self.became_online(pm_id, reason);
        }
    }

    /// A launching run is online: `ready` (with `wait_ready`), a Node cluster worker's boot,
    /// or `listen_timeout`. A reload's old run goes now, or for a Node cluster worker once the
    /// new run listens (pm2 waits for `listening`, at most `listen_timeout`).
    fn became_online(&mut self, pm_id: u32, reason: Option<String>) {
        let tracker = self.cfg.tracker.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        p.meta.status = Status::Online;
        p.relay.set_meta(&p.meta);
        let mut ev = EventFields::named(ProcessEvent::Online);
        if let Some(r) = reason {
            ev = ev.reason(r);
        }
        p.relay.event(&ev);
        tracing::info!(pm_id, pid = p.meta.pid, app = %p.app, "worker online");
        if p.retiring.is_some() && !p.spec.wait_ready && spawn::is_node_cluster(&p.launch) {
            if p.run.as_ref().is_some_and(|r| r.listened) {
                self.overlap_done(pm_id);
            } else {
                let (run_gen, d) = (p.run_gen, p.spec.listen_timeout);
                schedule(
                    &tracker,
                    &self.cfg.cancel,
                    &self.tx,
                    Instant::now() + d,
                    Msg::RetireDue { pm_id, run_gen },
                );
            }
            return;
        }
        let waiters = std::mem::take(&mut p.online_waiters);
        self.retire(pm_id);
        self.settle_online(pm_id, waiters);
    }

    /// True when a reload can start the new run before stopping the old one: it runs, and
    /// shares its listening sockets through the agent (so both runs serve the same ones).
    fn can_overlap(&self, pm_id: u32) -> bool {
        self.procs.get(&pm_id).is_some_and(|p| {
            p.run.is_some()
                && p.retiring.is_none()
                && p.meta.status == Status::Online
                && (!p.sockets.is_empty() || !p.cluster_sockets.is_empty())
        })
    }

    /// pm2's cluster reload: the new run starts while the old one serves; the old one is
    /// stopped (kill signal, SIGKILL after `kill_timeout`) once the new one is online. Returns
    /// false when the new run could not be spawned: the old one then keeps serving.
    fn replace_run(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) -> bool {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return false;
        };
        let Some(old) = p.run.take() else {
            return false;
        };
        let old_gen = p.run_gen;
        let old_meta = p.meta.clone();
        // The old run's lines keep its own pid while both run.
        p.relay.keep_meta(old_gen, &old_meta);
        p.retiring = Some(Retiring {
            run: old,
            run_gen: old_gen,
            meta: old_meta.clone(),
        });
        p.policy.reset(Instant::now());
        p.meta.restart_time += 1;
        p.after_stop = AfterStop::Nothing;
        self.spawn_proc(pm_id, wtx);
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return false;
        };
        if p.run.is_none() {
            // Put the old run back: it never stopped.
            if let Some(r) = p.retiring.take() {
                p.relay.forget_meta(r.run_gen);
                p.run = Some(r.run);
                p.run_gen = r.run_gen;
                p.meta = old_meta;
                p.relay.set_meta(&p.meta);
            }
            return false;
        }
        self.emit(
            pm_id,
            EventFields::named(ProcessEvent::Restart).manually(true),
        );
        true
    }

    /// The new run of a reloaded Node cluster worker listens (or had its listen_timeout): the
    /// reload of this instance is done, and the old run goes.
    fn overlap_done(&mut self, pm_id: u32) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.retiring.is_none() {
            return;
        }
        let waiters = std::mem::take(&mut p.online_waiters);
        self.retire(pm_id);
        self.settle_online(pm_id, waiters);
    }

    /// Stops the old run of a reload, if there is one.
    fn retire(&mut self, pm_id: u32) {
        let tracker = self.cfg.tracker.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        let Some(r) = p.retiring.as_mut() else { return };
        if r.run.stop_deadline.is_some() {
            return; // already asked
        }
        let deadline = Instant::now() + p.spec.kill_timeout;
        r.run.stop_deadline = Some(deadline);
        let run_gen = r.run_gen;
        let msg = if ask_to_stop(pm_id, &mut r.run, &p.spec, &p.launch) {
            Msg::RetireKill { pm_id, run_gen }
        } else {
            Msg::DisconnectDue { pm_id, run_gen }
        };
        schedule(&tracker, &self.cfg.cancel, &self.tx, deadline, msg);
    }

    /// A run told to `disconnect` closed its channel: its servers are closed and its
    /// connections done. It usually exits on its own now; the kill signal follows a moment
    /// later for one kept alive by other work. (Node's primary signals at once, which kills most
    /// workers during their own clean exit and hides their exit code.)
    fn channel_closed(&mut self, pm_id: u32, run_gen: u64) {
        let Some(p) = self.procs.get(&pm_id) else {
            return;
        };
        if p.run_of(run_gen).is_some_and(|(run, _)| run.disconnecting) {
            let at = Instant::now() + DISCONNECT_GRACE.min(p.spec.kill_timeout);
            let msg = Msg::DisconnectDue { pm_id, run_gen };
            schedule(&self.cfg.tracker, &self.cfg.cancel, &self.tx, at, msg);
        }
    }

    /// A run told to `disconnect` is still running a moment after its channel closed, or
    /// `kill_timeout` after the `disconnect`: the kill signal, and SIGKILL after `kill_timeout`.
    fn disconnected(&mut self, pm_id: u32, run_gen: u64) {
        let tracker = self.cfg.tracker.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        let spec = p.spec.clone();
        let Some((run, retiring)) = p.run_of_mut(run_gen) else {
            return;
        };
        if !run.disconnecting {
            return;
        }
        run.disconnecting = false;
        let msg = if retiring {
            Msg::RetireKill { pm_id, run_gen }
        } else {
            Msg::KillTimeout { pm_id, run_gen }
        };
        let sig = signals::parse(&spec.kill_signal).unwrap_or(Signal::SIGINT);
        tracing::info!(
            pm_id,
            pid = run.pid,
            "told to disconnect, the worker still runs: {sig}"
        );
        if let Err(e) = kill_run(run.pid, spec.treekill, sig) {
            tracing::warn!(pm_id, "sending {sig} failed: {e}");
        }
        let deadline = Instant::now() + spec.kill_timeout;
        run.stop_deadline = Some(deadline);
        schedule(&tracker, &self.cfg.cancel, &self.tx, deadline, msg);
    }

    /// Node's cluster protocol, the primary's side: a worker's `listen()` becomes a
    /// `queryServer`, answered with the shared listening socket (bound once per address, kept
    /// by the agent) riding on a `NODE_HANDLE` line, or with the errno Node then raises in the
    /// app (`EADDRINUSE`, ...).
    fn on_cluster(&mut self, pm_id: u32, run_gen: u64, msg: &serde_json::Value) {
        let host = self.cfg.host.clone();
        let cwd = self
            .procs
            .get(&pm_id)
            .map(|p| p.launch.cwd.clone())
            .unwrap_or_default();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.run_gen != run_gen {
            return;
        }
        let act = msg.get("act").and_then(|a| a.as_str()).unwrap_or_default();
        if act == "listening" {
            let what = match (msg.get("addressType"), msg.get("address"), msg.get("port")) {
                (Some(t), Some(serde_json::Value::String(path)), _) if t == -1 => path.clone(),
                (_, Some(serde_json::Value::String(a)), Some(port)) => format!("{a}:{port}"),
                (_, _, Some(port)) => format!("port {port}"),
                _ => "a socket".into(),
            };
            p.relay.event(
                &EventFields::named(ProcessEvent::Listening).reason(format!("listening on {what}")),
            );
            if let Some(run) = p.run.as_mut() {
                run.listened = true;
            }
            let old = p.retiring.as_ref().map(|r| r.run_gen);
            p.cluster_sockets
                .retain(|c| c.run_gen >= run_gen || Some(c.run_gen) == old);
            if p.retiring.is_some() && p.meta.status == Status::Online {
                self.overlap_done(pm_id);
            }
            return;
        }
        if act == "online" {
            // Node's worker says `online` before it runs the main module, and reads its channel
            // only once the main module has run. So a message it must answer, sent now, is
            // answered after every `listen()` the main module made has asked for its socket
            // (those come first on the channel): a `newconn` for a key it does not have, with
            // a throwaway descriptor (Node closes it and answers `accepted: false`).
            let Some(run) = p.run.as_mut() else { return };
            if p.meta.status != Status::Launching || p.spec.wait_ready {
                return;
            }
            let our_seq = run.cluster_seq;
            let Ok((probe, _peer)) = std::os::unix::net::UnixStream::pair() else {
                return; // no descriptor to spare: online at listen_timeout instead
            };
            let frame = OutFrame {
                bytes: cluster_line(serde_json::json!({
                    "cmd": "NODE_HANDLE", "type": "net.Native",
                    "msg": {"cmd": "NODE_CLUSTER", "act": "newconn", "key": BOOT_PROBE_KEY, "seq": our_seq}
                })),
                fd: Some(probe.into()),
            };
            if run.writer.try_send(frame).is_ok() {
                run.cluster_seq += 1;
                run.boot_probe = Some(our_seq);
            }
            return;
        }
        if act.is_empty() && msg.get("accepted").is_some() {
            let acked = msg.get("ack").and_then(|a| a.as_u64());
            let probe = p.run.as_ref().and_then(|r| r.boot_probe);
            if acked.is_some() && acked == probe && p.meta.status == Status::Launching {
                self.became_online(pm_id, None);
            }
            return;
        }
        if act == "close" {
            // The app closed a server (`server.close()`): Node's primary lets the socket go
            // once no worker has it; one stopping hands its sockets to the next run instead.
            let key = msg.get("key").and_then(|k| k.as_str()).unwrap_or_default();
            if matches!(p.meta.status, Status::Online | Status::Launching) {
                p.cluster_sockets
                    .retain(|c| !(c.key == key && c.run_gen == run_gen));
            }
            return;
        }
        let Some(run) = p.run.as_mut() else { return };
        let their_seq = msg.get("seq").cloned().unwrap_or(serde_json::Value::Null);
        let our_seq = run.cluster_seq;
        run.cluster_seq += 1;
        let writer = run.writer.clone();
        let frame = match act {
            "exitedAfterDisconnect" => OutFrame::line(cluster_line(serde_json::json!({
                "cmd": "NODE_CLUSTER", "ack": their_seq, "seq": our_seq
            }))),
            "queryServer" => {
                let js = |v: Option<&serde_json::Value>| match v {
                    None => "undefined".to_string(),
                    Some(serde_json::Value::Null) => "null".to_string(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                let key = format!(
                    "{}:{}:{}:{}:{}",
                    js(msg.get("address")),
                    js(msg.get("port")),
                    js(msg.get("addressType")),
                    js(msg.get("fd")),
                    js(msg.get("index"))
                );
                // Node's primary hands every worker the first worker's `data` for a key (TLS
                // session ticket keys), so they all resume each other's sessions.
                let data = self
                    .cluster_data
                    .entry(key.clone())
                    .or_insert_with(|| msg.get("data").cloned().unwrap_or_default())
                    .clone();
                let reply = |errno: i32| {
                    serde_json::json!({
                        "cmd": "NODE_CLUSTER", "errno": errno, "key": key, "ack": their_seq,
                        "data": data, "seq": our_seq
                    })
                };
                match cluster_socket(&mut self.sockets, &p.sockets, msg, &host, &cwd) {
                    Ok(bound) => {
                        let dup = bound.dup();
                        match p.cluster_sockets.iter_mut().find(|c| c.key == key) {
                            Some(c) => {
                                c.run_gen = run_gen;
                                c.bound = bound;
                            }
                            None if !p.sockets.iter().any(|b| b.addr == bound.addr) => {
                                p.cluster_sockets.push(ClusterSocket {
                                    key: key.clone(),
                                    run_gen,
                                    bound,
                                });
                            }
                            None => {}
                        }
                        match dup {
                            Ok(fd) => OutFrame {
                                bytes: cluster_line(serde_json::json!({
                                    "cmd": "NODE_HANDLE", "type": "net.Native", "msg": reply(0)
                                })),
                                fd: Some(fd),
                            },
                            Err(e) => OutFrame::line(cluster_line(reply(
                                -e.raw_os_error().unwrap_or(libc::EMFILE),
                            ))),
                        }
                    }
                    Err((errno, why)) => {
                        tracing::warn!(pm_id, "{why}");
                        p.relay
                            .event(&EventFields::named(ProcessEvent::ListenError).reason(why));
                        OutFrame::line(cluster_line(reply(-errno)))
                    }
                }
            }
            _ => return,
        };
        // Never dropped: Node's listen() waits for this answer with no timeout. The queue may be
        // full of messages for a worker still starting, so wait for room off the actor.
        self.cfg.tracker.spawn(async move {
            if writer.send(frame).await.is_err() {
                tracing::debug!(
                    pm_id,
                    "the worker closed its channel before its cluster reply"
                );
            }
        });
    }

    /// Begins stopping one process; returns true when the caller must wait for its exit.
    fn stop_one(&mut self, pm_id: u32, after: AfterStop, op: Option<u64>) -> bool {
        // The old run of a reload under way goes too.
        self.retire(pm_id);
        let tracker = self.cfg.tracker.clone();
        let self_tx = self.tx.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return false;
        };
        // What happens after the exit, when requests overlap: a delete always wins; a restart
        // does not undo a delete; a user's stop cancels a pending restart.
        p.after_stop = match (p.after_stop, after) {
            (_, AfterStop::Delete) | (AfterStop::Delete, _) => AfterStop::Delete,
            (_, AfterStop::Restart) => AfterStop::Restart,
            (AfterStop::Restart, AfterStop::Nothing) if op.is_none() => AfterStop::Restart,
            (_, AfterStop::Nothing) => AfterStop::Nothing,
        };
        match p.meta.status {
            Status::Launching | Status::Online => {
                p.meta.status = Status::Stopping;
                p.relay.set_meta(&p.meta);
                let deadline = Instant::now() + p.spec.kill_timeout;
                let run_gen = p.run_gen;
                let signalled = match p.run.as_mut() {
                    Some(run) => {
                        run.stop_deadline = Some(deadline);
                        ask_to_stop(pm_id, run, &p.spec, &p.launch)
                    }
                    None => true,
                };
                let msg = if signalled {
                    Msg::KillTimeout { pm_id, run_gen }
                } else {
                    Msg::DisconnectDue { pm_id, run_gen }
                };
                schedule(&tracker, &self.cfg.cancel, &self_tx, deadline, msg);
                p.waiters.extend(op);
                true
            }
            Status::Stopping => {
                p.waiters.extend(op);
                true
            }
            Status::WaitingRestart | Status::Stopped | Status::Errored => {
                if p.meta.status == Status::WaitingRestart {
                    p.run_gen += 1; // cancels the pending restart
                    p.meta.status = Status::Stopped;
                    p.relay.set_meta(&p.meta);
                }
                if after == AfterStop::Nothing {
                    release_sockets(p);
                }
                false
            }
        }
    }

    fn on_kill_timeout(&mut self, pm_id: u32, run_gen: u64) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.run_gen != run_gen || p.meta.status != Status::Stopping || p.run.is_none() {
            return;
        }
        tracing::warn!(
            pm_id,
            "still running {} ms after the kill signal: SIGKILL",
            p.spec.kill_timeout.as_millis()
        );
        if let Some(run) = &p.run {
            // Always the whole group: stragglers included.
            let _ = killpg(Pid::from_raw(run.pid as i32), Signal::SIGKILL);
        }
    }

    /// `stop`, `restart`, `reload`, `delete`: act now, reply when every process concerned has
    /// settled (for a reload: when its new run is online).
    fn targeted(
        &mut self,
        r: TargetRequest,
        after: AfterStop,
        settle: Settle,
        reply: oneshot::Sender<Reply>,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) {
        let (ids, absent) = match self.select(&r.target, &r.pm_ids) {
            Ok(x) => x,
            Err(e) => {
                let _ = reply.send(Reply::err(Some(r.request_id), self.host(), e));
                return;
            }
        };
        let op_id = self.next_op;
        self.next_op += 1;
        let mut op = Op {
            request_id: r.request_id,
            reply,
            waiting: BTreeSet::new(),
            changes: absent
                .into_iter()
                .map(|pm_id| Change::new(pm_id, ChangeKind::Absent))
                .collect(),
            settle,
        };
        let until_online = settle != Settle::Exited;
        for id in ids {
            let was = self.procs[&id].meta.status;
            if settle == Settle::Reloaded && self.can_overlap(id) {
                if !self.replace_run(id, wtx) {
                    op.changes.push(
                        Change::new(id, ChangeKind::NotReloaded)
                            .detail("the new run could not be spawned; the old one keeps serving"),
                    );
                    continue;
                }
                match self.procs.get_mut(&id) {
                    // Settled once online (ready), or for a Node cluster worker once it
                    // listens while the old run is still there.
                    Some(p)
                        if p.meta.status == Status::Launching
                            || (p.retiring.is_some() && spawn::is_node_cluster(&p.launch)) =>
                    {
                        p.online_waiters.push(op_id);
                        op.waiting.insert(id);
                    }
                    _ => op.changes.push(Change::new(id, ChangeKind::Reloaded)),
                }
                continue;
            }
            if self.stop_one(id, after, Some(op_id)) {
                if after == AfterStop::Restart
                    && let Some(p) = self.procs.get_mut(&id)
                {
                    p.manual_restart_event = true;
                }
                op.waiting.insert(id);
                continue;
            }
            // Not running: settle now.
            let what = match after {
                AfterStop::Nothing => {
                    if was == Status::WaitingRestart {
                        self.emit(id, EventFields::named(ProcessEvent::Stop).manually(true));
                        Change::new(id, ChangeKind::Stopped)
                    } else {
                        Change::new(id, ChangeKind::AlreadyStopped)
                    }
                }
                AfterStop::Restart => {
                    self.manual_restart(id, wtx);
                    if until_online {
                        match self.procs.get_mut(&id) {
                            Some(p) if p.meta.status == Status::Launching && p.run.is_some() => {
                                p.online_waiters.push(op_id);
                                op.waiting.insert(id);
                                continue;
                            }
                            Some(p) if p.meta.status == Status::Online => {
                                Change::new(id, settle.done())
                            }
                            _ => settle.not_done(id, SPAWN_FAILED),
                        }
                    } else {
                        Change::new(id, ChangeKind::Restarted)
                    }
                }
                AfterStop::Delete => {
                    self.delete_now(id);
                    Change::new(id, ChangeKind::Deleted)
                }
            };
            op.changes.push(what);
        }
        if op.waiting.is_empty() {
            self.finish_op(op);
        } else {
            self.ops.insert(op_id, op);
        }
    }

    /// True when the op waits for online runs (restart, reload).
    fn until_online(&self, op_id: u64) -> bool {
        self.ops
            .get(&op_id)
            .is_some_and(|op| op.settle != Settle::Exited)
    }

    /// Settles ops waiting for this process's new run to be online, each with its word.
    fn settle_online(&mut self, pm_id: u32, waiters: Vec<u64>) {
        for op_id in waiters {
            let done = self
                .ops
                .get(&op_id)
                .map_or(ChangeKind::Reloaded, |op| op.settle.done());
            self.settle(pm_id, vec![op_id], |id| Change::new(id, done));
        }
    }

    fn emit(&self, pm_id: u32, ev: EventFields) {
        if let Some(p) = self.procs.get(&pm_id) {
            p.relay.event(&ev);
        }
    }

    fn manual_restart(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) {
        if let Some(p) = self.procs.get_mut(&pm_id) {
            p.policy.reset(Instant::now());
            p.meta.restart_time += 1;
            p.after_stop = AfterStop::Nothing;
        }
        self.spawn_proc(pm_id, wtx);
        self.emit(
            pm_id,
            EventFields::named(ProcessEvent::Restart).manually(true),
        );
    }

    fn delete_now(&mut self, pm_id: u32) {
        if let Some(p) = self.procs.remove(&pm_id) {
            if let Some(r) = &p.retiring {
                let _ = killpg(Pid::from_raw(r.run.pid as i32), Signal::SIGKILL);
            }
            p.relay
                .event(&EventFields::named(ProcessEvent::Delete).manually(true));
            self.cfg.hub.retire(&p.relay);
        }
    }

    fn finish_op(&mut self, mut op: Op) {
        if op.settle == Settle::Reloaded {
            // pm2: a reload without a shared socket is a restart; say so.
            for c in op
                .changes
                .iter_mut()
                .filter(|c| c.what == ChangeKind::Reloaded)
            {
                if let Some(p) = self.procs.get(&c.pm_id)
                    && p.sockets.is_empty()
                    && p.cluster_sockets.is_empty()
                {
                    c.detail = RELOADED_AS_RESTART.into();
                }
            }
        }
        let mut reply = Reply::ok(Some(op.request_id), self.host());
        reply.processes = op
            .changes
            .iter()
            .filter_map(|c| self.info(c.pm_id))
            .collect();
        let failed: Vec<String> = op
            .changes
            .iter()
            .filter(|c| c.what.is_failure())
            .map(|c| c.pm_id.to_string())
            .collect();
        if !failed.is_empty() {
            reply.error = Some(spawn_failed(
                &format!("pm_id {} could not be started again", failed.join(", ")),
                self.host(),
            ));
        }
        reply.changes = op.changes;
        let _ = op.reply.send(reply);
    }

    /// Records `change` for `pm_id` in each waiting op, and replies to those that are done.
    fn settle(&mut self, pm_id: u32, waiters: Vec<u64>, change: impl Fn(u32) -> Change) {
        for op_id in waiters {
            let done = match self.ops.get_mut(&op_id) {
                Some(op) => {
                    op.waiting.remove(&pm_id);
                    op.changes.push(change(pm_id));
                    op.waiting.is_empty()
                }
                None => false,
            };
            if done && let Some(op) = self.ops.remove(&op_id) {
                self.finish_op(op);
            }
        }
    }

    fn on_exit(
        &mut self,
        pm_id: u32,
        run_gen: u64,
        status: std::io::Result<std::process::ExitStatus>,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) {
        let tracker = self.cfg.tracker.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.retiring.as_ref().is_some_and(|r| r.run_gen == run_gen) {
            if let Some(r) = p.retiring.take() {
                tracing::info!(pm_id, pid = r.run.pid, "the old run of a reload exited");
                p.relay.forget_meta(r.run_gen);
                if p.run.as_ref().is_some_and(|run| run.listened) {
                    let current = p.run_gen;
                    p.cluster_sockets.retain(|c| c.run_gen >= current);
                }
                // Its own exit event, with its own pid: nobody should think the new run died.
                let mut meta = r.meta;
                meta.status = Status::Stopped;
                meta.pid = r.run.pid;
                let relay = self.cfg.hub.worker(&p.app, &meta);
                let (code, signal) = match &status {
                    Ok(s) => (s.code(), s.signal().map(signals::name)),
                    Err(_) => (None, None),
                };
                relay.event(&EventFields {
                    exit_code: code,
                    signal,
                    manually: Some(true),
                    ..EventFields::named(ProcessEvent::Exit)
                });
                self.cfg.hub.retire(&relay);
            }
            return;
        }
        if p.run_gen != run_gen || p.run.is_none() {
            return;
        }
        let run = p.run.take().expect("checked above");
        let early = std::mem::take(&mut p.online_waiters);
        let (code, signal) = match &status {
            Ok(s) => (s.code(), s.signal().map(signals::name)),
            Err(e) => {
                tracing::error!(pm_id, "waiting for the worker failed: {e}");
                (None, None)
            }
        };
        p.exit_code = code;
        p.meta.pid = 0;
        let mut exit_ev = EventFields {
            exit_code: code,
            signal: signal.clone(),
            ..EventFields::named(ProcessEvent::Exit)
        };
        tracing::info!(pm_id, ?code, ?signal, app = %p.app, "worker exited");
        if !early.is_empty() {
            self.settle(pm_id, early, |id| {
                Change::new(id, ChangeKind::ExitedBeforeOnline)
            });
        }
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };

        if p.meta.status == Status::Stopping {
            // Stragglers in the group get the rest of kill_timeout, then SIGKILL.
            if p.spec.treekill {
                let pgid = Pid::from_raw(run.pid as i32);
                if killpg(pgid, None).is_ok() {
                    let deadline = run.stop_deadline.unwrap_or_else(Instant::now);
                    tracker.spawn(async move {
                        tokio::time::sleep_until(deadline).await;
                        if killpg(pgid, Signal::SIGKILL).is_ok() {
                            tracing::warn!(
                                pgid = pgid.as_raw(),
                                "killed stragglers of a stopped worker"
                            );
                        }
                    });
                }
            }
            p.meta.status = Status::Stopped;
            p.relay.set_meta(&p.meta);
            exit_ev.manually = Some(true);
            exit_event(p, run.pid, &exit_ev);
            let after = std::mem::replace(&mut p.after_stop, AfterStop::Nothing);
            let waiters = std::mem::take(&mut p.waiters);
            let restart_event = std::mem::take(&mut p.manual_restart_event);
            let announce_stop = std::mem::take(&mut p.announce_stop);
            match after {
                AfterStop::Nothing => {
                    release_sockets(p);
                    if !waiters.is_empty() || announce_stop {
                        p.relay
                            .event(&EventFields::named(ProcessEvent::Stop).manually(true));
                    }
                    self.settle(pm_id, waiters, |id| Change::new(id, ChangeKind::Stopped));
                }
                AfterStop::Restart => {
                    if let Some(p) = self.procs.get_mut(&pm_id) {
                        p.policy.reset(Instant::now());
                        p.meta.restart_time += 1;
                    }
                    self.spawn_proc(pm_id, wtx);
                    let running = self.procs.get(&pm_id).is_some_and(|p| p.run.is_some());
                    if running && (restart_event || !waiters.is_empty()) {
                        self.emit(
                            pm_id,
                            EventFields::named(ProcessEvent::Restart).manually(true),
                        );
                    }
                    let shutting_down = self.shutdown.is_some();
                    let word = |settle: Settle| {
                        move |id| {
                            if running {
                                Change::new(id, ChangeKind::Restarted)
                            } else if shutting_down {
                                Change::new(id, ChangeKind::Stopped)
                                    .detail("the agent is shutting down")
                            } else {
                                settle.not_done(id, SPAWN_FAILED)
                            }
                        }
                    };
                    // Reloads settle when the new run is online; the rest now.
                    let (reloads, others): (Vec<u64>, Vec<u64>) =
                        waiters.into_iter().partition(|&op| self.until_online(op));
                    self.settle(pm_id, others, word(Settle::Restarted));
                    let launching = self
                        .procs
                        .get_mut(&pm_id)
                        .filter(|p| running && p.meta.status == Status::Launching);
                    match launching {
                        Some(p) => p.online_waiters.extend(reloads),
                        None if running => self.settle_online(pm_id, reloads),
                        None => self.settle(pm_id, reloads, word(Settle::Reloaded)),
                    }
                }
                AfterStop::Delete => {
                    self.delete_now(pm_id);
                    self.settle(pm_id, waiters, |id| Change::new(id, ChangeKind::Deleted));
                }
            }
            return;
        }

        // An exit nobody asked for: pm2's restart policy.
        let decision = p.policy.on_exit(Instant::now(), code, &p.spec);
        match decision {
            Decision::Overlimit => {
                p.meta.status = Status::Errored;
                p.relay.set_meta(&p.meta);
                p.relay.event(&EventFields::named(ProcessEvent::RestartOverlimit).reason(format!(
                    "{} unstable restarts (runs shorter than min_uptime {} ms): not restarting; fix the crash, then restart it",
                    p.spec.max_restarts,
                    p.spec.min_uptime.as_millis()
                )));
                exit_event(p, run.pid, &exit_ev);
                release_sockets(p);
            }
            Decision::Stop => {
                p.meta.status = Status::Stopped;
                p.relay.set_meta(&p.meta);
                exit_event(p, run.pid, &exit_ev);
                release_sockets(p);
            }
            Decision::Restart(delay) => {
                if delay.is_zero() {
                    p.meta.status = Status::Stopped;
                    p.relay.set_meta(&p.meta);
                    exit_event(p, run.pid, &exit_ev);
                    p.meta.restart_time += 1;
                    self.spawn_proc(pm_id, wtx);
                } else {
                    p.meta.status = Status::WaitingRestart;
                    p.relay.set_meta(&p.meta);
                    exit_event(p, run.pid, &exit_ev);
                    let run_gen = p.run_gen;
                    schedule(
                        &tracker,
                        &self.cfg.cancel,
                        &self.tx,
                        Instant::now() + delay,
                        Msg::RestartDue { pm_id, run_gen },
                    );
                }
            }
        }
    }

    fn send(&mut self, r: SendRequest) -> Result<Reply, ControlError> {
        if let Some(cmd) = r.message.get("cmd").and_then(|c| c.as_str())
            && cmd.starts_with("NODE_")
        {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "messages with \"cmd\": \"{cmd}\" are Node's own channel messages and would be swallowed or crash the worker: use another key"
                ),
            ));
        }
        let mut line = serde_json::to_vec(&r.message).expect("a JSON value always serialises");
        line.push(b'\n');
        let line = bytes::Bytes::from(line);
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        for id in ids {
            let p = &self.procs[&id];
            let not_sent = Change::new(id, ChangeKind::NotSent);
            let change = match &p.run {
                Some(run) if p.meta.status != Status::Stopping => {
                    match run.writer.try_send(OutFrame::line(line.clone())) {
                        Ok(()) => Change::new(id, ChangeKind::Sent),
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            not_sent.detail("the worker is not reading its channel (queue full)")
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            not_sent.detail("the worker closed its channel")
                        }
                    }
                }
                _ => not_sent.detail(p.meta.status.as_str()),
            };
            reply.changes.push(change);
        }
        if !reply.changes.iter().any(|c| c.what == ChangeKind::Sent) {
            let detail = reply
                .changes
                .iter()
                .map(|c| format!("pm_id {}: {c}", c.pm_id))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ControlError::new(
                ErrorKind::ChannelClosed,
                format!(
                    "nothing delivered to '{}' on host {} ({detail})",
                    r.target,
                    self.host()
                ),
            ));
        }
        Ok(reply)
    }

    fn signal(&mut self, r: SignalRequest) -> Result<Reply, ControlError> {
        let sig = signals::parse(&r.signal)?;
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        for id in ids {
            let p = &self.procs[&id];
            let change = match &p.run {
                Some(run) => match kill(Pid::from_raw(run.pid as i32), sig) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {
                        Change::new(id, ChangeKind::Sent).detail(sig.as_str())
                    }
                    Err(e) => Change::new(id, ChangeKind::NotSent).detail(e.to_string()),
                },
                None => Change::new(id, ChangeKind::NotSent).detail(p.meta.status.as_str()),
            };
            reply.changes.push(change);
        }
        Ok(reply)
    }
}
