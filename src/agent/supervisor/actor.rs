//! The actor: its messages, its state and its loop; one task owns the process table.

use super::settle::{Op, Settle};
use super::shutting_down;
use super::stop::AfterStop;
use super::table::{Proc, Retiring};
use super::{Summary, SupervisorConfig};
use crate::agent::stats::CpuMeter;
use crate::agent::worker::WorkerEvent;
use crate::protocol::control::Request;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::reply::Reply;
use crate::protocol::state::Assignment;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub(super) enum Msg {
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

pub(super) struct Supervisor {
    pub(super) cfg: SupervisorConfig,
    pub(super) tx: mpsc::Sender<Msg>,
    pub(super) procs: BTreeMap<u32, Proc>,
    pub(super) ops: HashMap<u64, Op>,
    pub(super) next_op: u64,
    pub(super) next_pm_id: u32,
    pub(super) shutdown: Option<oneshot::Sender<()>>,
    pub(super) agent_meter: CpuMeter,
    /// The assignment applied last (convergence compares against it).
    pub(super) applied: Option<Assignment>,
    /// Listening sockets by address.
    pub(super) sockets: crate::agent::sockets::Sockets,
    /// The first cluster worker's `data` per queryServer key (echoed to every worker).
    pub(super) cluster_data: HashMap<String, serde_json::Value>,
    /// The log directory exists: made once when the supervisor starts, not on the actor's task
    /// at every `start` (made again only after it failed).
    pub(super) log_dir_made: bool,
}

/// Sends `msg` back to the supervisor at `at`, unless the agent finishes shutting down first
/// (a stale timer must not hold shutdown up: a 5-minute restart delay would).
pub(super) fn schedule(
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

pub(super) async fn forward(mut rx: mpsc::Receiver<WorkerEvent>, tx: mpsc::Sender<Msg>) {
    while let Some(ev) = rx.recv().await {
        if tx.send(Msg::Worker(ev)).await.is_err() {
            break;
        }
    }
}

impl Supervisor {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Msg>, wtx: mpsc::Sender<WorkerEvent>) {
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
                }) => self.on_cluster(pm_id, run_gen, msg),
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

    pub(super) fn host(&self) -> &str {
        &self.cfg.host
    }

    pub(super) fn on_request(
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
            Request::Logs(r) => return self.logs(&r, reply),
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

    pub(super) fn emit(&self, pm_id: u32, ev: EventFields) {
        if let Some(p) = self.procs.get(&pm_id) {
            p.relay.event(&ev);
        }
    }
}
