//! The process table's rows: a process, its runs, and what goes with them.

use super::actor::Supervisor;
use super::stop::AfterStop;
use crate::agent::ipc::OutFrame;
use crate::agent::policy::RestartState;
use crate::agent::relay::WorkerRelay;
use crate::agent::spawn::Launch;
use crate::agent::stats::CpuMeter;
use crate::protocol::envelope::{EventFields, ProcessMeta, Status};
use crate::protocol::event::ProcessEvent;
use crate::protocol::{AppKey, AppSpec};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

pub(super) struct Run {
    pub(super) pid: u32,
    pub(super) writer: mpsc::Sender<OutFrame>,
    /// Set once the run is asked to stop: when its group gets SIGKILL.
    pub(super) stop_deadline: Option<Instant>,
    /// A Node cluster worker told to `disconnect`: the kill signal follows once its channel
    /// closes (its servers closed, its connections done), or after `kill_timeout`.
    pub(super) disconnecting: bool,
    /// A Node cluster worker said `listening` at least once.
    pub(super) listened: bool,
    /// Our seq of the boot probe sent when a Node cluster worker says `online` (see
    /// [`Supervisor::on_cluster`]); its answer means the main module has run.
    pub(super) boot_probe: Option<u64>,
    /// Our sequence number in Node's cluster protocol with this run.
    pub(super) cluster_seq: u64,
}

/// A socket a Node cluster worker of a process listens on (Node's `SharedHandle`).
pub(super) struct ClusterSocket {
    /// Node's key for it (`address:port:addressType:fd:index`).
    pub(super) key: String,
    /// The run that asked for it last. A restart's new run takes over the old run's sockets
    /// (they stay open across the gap); those it does not ask for again are let go once it
    /// listens and the old run is gone.
    pub(super) run_gen: u64,
    pub(super) bound: Arc<crate::agent::sockets::Bound>,
}

/// The old run of a reload, serving until the new one is online.
pub(super) struct Retiring {
    pub(super) run: Run,
    pub(super) run_gen: u64,
    /// Its metadata (its pid, its restart count), for its `exit` event.
    pub(super) meta: ProcessMeta,
}

/// Publishes a run's `exit` with that run's pid (the process's own pid is 0 by then).
pub(super) fn exit_event(p: &Proc, pid: u32, ev: &EventFields) {
    let mut meta = p.meta.clone();
    meta.pid = pid;
    p.relay.set_meta(&meta);
    p.relay.event(ev);
    p.relay.set_meta(&p.meta);
}

/// A process stopped for good lets its listening sockets go (the last one closes each), as
/// pm2's stopped app refuses connections; `start` binds them again.
pub(super) fn release_sockets(p: &mut Proc) {
    p.cluster_sockets.clear();
    p.sockets.clear();
}

pub(super) struct Proc {
    pub(super) meta: ProcessMeta,
    pub(super) app: AppKey,
    pub(super) spec: Arc<AppSpec>,
    pub(super) launch: Arc<Launch>,
    pub(super) relay: Arc<WorkerRelay>,
    pub(super) run_gen: u64,
    pub(super) run: Option<Run>,
    pub(super) policy: RestartState,
    pub(super) after_stop: AfterStop,
    pub(super) manual_restart_event: bool,
    pub(super) announce_stop: bool,
    pub(super) waiters: Vec<u64>,
    /// Reloads waiting for this run to be online (ready).
    pub(super) online_waiters: Vec<u64>,
    pub(super) exit_code: Option<i32>,
    pub(super) meter: CpuMeter,
    pub(super) out_log: PathBuf,
    pub(super) err_log: PathBuf,
    pub(super) instances: u32,
    /// Why the last spawn failed, if it did.
    pub(super) spawn_error: Option<String>,
    /// The old run of a reload, still serving until the new one is online, then stopped.
    pub(super) retiring: Option<Retiring>,
    /// Sockets its Node cluster workers asked for (`listen(port)`), kept across its runs so a
    /// restart never closes them.
    pub(super) cluster_sockets: Vec<ClusterSocket>,
    /// The app's listening sockets (`listen`), held while the process exists.
    pub(super) sockets: Vec<Arc<crate::agent::sockets::Bound>>,
    /// The file watch (pm2 `watch`), and what it was made from.
    pub(super) file_watch: Option<crate::agent::watch::FileWatch>,
    pub(super) watch_key: Option<String>,
    pub(super) watch_gen: u64,
    /// Bumped whenever the cron schedule is armed again (stale timers are ignored).
    pub(super) cron_gen: u64,
}

impl Proc {
    /// Sets the status, and tells the relay (the process's lines and events carry it).
    pub(super) fn set_status(&mut self, status: Status) {
        self.meta.status = status;
        self.relay.set_meta(&self.meta);
    }

    /// A run could not be had: `errored`, the reason kept for the reply and told in a
    /// `spawn:error` event.
    pub(super) fn spawn_failed(&mut self, reason: String) {
        self.meta.pid = 0;
        self.set_status(Status::Errored);
        self.spawn_error = Some(reason.clone());
        self.relay
            .event(&EventFields::named(ProcessEvent::SpawnError).reason(reason));
    }

    /// Run `run_gen` of this process, the current one or the old one of a reload (then true).
    pub(super) fn run_of(&self, run_gen: u64) -> Option<(&Run, bool)> {
        match (&self.run, &self.retiring) {
            (Some(run), _) if self.run_gen == run_gen => Some((run, false)),
            (_, Some(r)) if r.run_gen == run_gen => Some((&r.run, true)),
            _ => None,
        }
    }

    /// The same, to change it.
    pub(super) fn run_of_mut(&mut self, run_gen: u64) -> Option<(&mut Run, bool)> {
        match (&mut self.run, &mut self.retiring) {
            (Some(run), _) if self.run_gen == run_gen => Some((run, false)),
            (_, Some(r)) if r.run_gen == run_gen => Some((&mut r.run, true)),
            _ => None,
        }
    }
}

impl Supervisor {
    /// A new process's metadata: launching, never run.
    pub(super) fn new_meta(
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
}
