//! `stop`, `restart`, `reload`, `delete`: act on each process now, settle the reply later.

use super::actor::Supervisor;
use super::settle::{Op, SPAWN_FAILED, Settle};
use super::stop::AfterStop;
use crate::agent::spawn::{self};
use crate::agent::worker::WorkerEvent;
use crate::protocol::control::TargetRequest;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use crate::protocol::reply::{Change, ChangeKind, Reply};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

impl Supervisor {
    /// `stop`, `restart`, `reload`, `delete`: act now, reply when every process concerned has
    /// settled (for a reload: when its new run is online).
    pub(super) fn targeted(
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

    pub(super) fn manual_restart(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) {
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

    pub(super) fn delete_now(&mut self, pm_id: u32) {
        if let Some(p) = self.procs.remove(&pm_id) {
            if let Some(r) = &p.retiring {
                let _ = killpg(Pid::from_raw(r.run.pid as i32), Signal::SIGKILL);
            }
            p.relay
                .event(&EventFields::named(ProcessEvent::Delete).manually(true));
            self.cfg.hub.retire(&p.relay);
        }
    }
}
