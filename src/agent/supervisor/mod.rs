//! The process table: one task owns it. Requests arrive with their reply channel; child exits,
//! readiness and timers arrive as messages. Nothing polls.
//!
//! The files: [`actor`] (the messages and the loop), [`table`] (a process and its runs),
//! [`start`], [`spawn_run`] (a new run, then online), [`stop`], [`exit`], [`targeted`]
//! (stop/restart/reload/delete requests), [`settle`] (their replies), [`reload`] (the overlap
//! of old and new runs), [`cluster`] (Node's cluster primary) and [`node_cluster`] (its wire),
//! [`schedules`] (watch, cron, memory), [`assignment`] (convergence), [`queries`] and [`send`].

mod actor;
mod assignment;
mod cluster;
mod exit;
mod node_cluster;
mod queries;
mod reload;
mod schedules;
mod send;
mod settle;
mod spawn_run;
mod start;
mod stop;
mod table;
mod targeted;

pub use node_cluster::{ClusterMsg, ServerQuery};
pub use settle::RELOADED_AS_RESTART;

use actor::{Msg, Supervisor, forward};

use super::relay::RelayHub;
use super::stats::CpuMeter;
use super::worker::WorkerEvent;
use crate::protocol::control::Request;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::Reply;
use crate::protocol::state::Assignment;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
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

/// Starts the supervisor task on the config's tracker.
pub fn start(cfg: SupervisorConfig) -> SupervisorHandle {
    let (tx, rx) = mpsc::channel(1024);
    let (wtx, wrx) = mpsc::channel::<WorkerEvent>(1024);
    let tracker = cfg.tracker.clone();
    // Once, before the actor runs: a failure is told precisely by the first `start`.
    let log_dir_made = std::fs::create_dir_all(&cfg.log_dir).is_ok();
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
        log_dir_made,
    };
    tracker.spawn(sup.run(rx, wtx));
    SupervisorHandle { tx }
}
