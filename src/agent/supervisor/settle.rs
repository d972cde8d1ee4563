//! Reply settling: an op waits for its processes to exit or be online, then replies once.

use super::actor::Supervisor;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{Change, ChangeKind, Reply};
use std::collections::BTreeSet;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A spawn failure, saying where to look.
pub(super) fn spawn_failed(what: &str, host: &str) -> ControlError {
    ControlError::new(
        ErrorKind::SpawnFailed,
        format!("{what} on host {host} (see the spawn:error event and the agent log)"),
    )
}

/// The detail of a reload of a process that shares no socket (a restart, as in pm2).
pub const RELOADED_AS_RESTART: &str = "a restart: it shares no listening socket";

/// The detail of a restart or reload whose new run could not be spawned.
pub(super) const SPAWN_FAILED: &str = "spawn failed";

pub(super) struct Op {
    pub(super) request_id: Uuid,
    pub(super) reply: oneshot::Sender<Reply>,
    pub(super) waiting: BTreeSet<u32>,
    pub(super) changes: Vec<Change>,
    /// When each process settles.
    pub(super) settle: Settle,
}

/// When a process of an op settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
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
    pub(super) fn done(self) -> ChangeKind {
        match self {
            Settle::Restarted => ChangeKind::Restarted,
            _ => ChangeKind::Reloaded,
        }
    }

    /// The change when its new run could not be had, and why.
    pub(super) fn not_done(self, pm_id: u32, why: &str) -> Change {
        let kind = match self {
            Settle::Reloaded => ChangeKind::NotReloaded,
            _ => ChangeKind::NotRestarted,
        };
        Change::new(pm_id, kind).detail(why)
    }
}

impl Supervisor {
    /// True when the op waits for online runs (restart, reload).
    pub(super) fn until_online(&self, op_id: u64) -> bool {
        self.ops
            .get(&op_id)
            .is_some_and(|op| op.settle != Settle::Exited)
    }

    /// Settles ops waiting for this process's new run to be online, each with its word.
    pub(super) fn settle_online(&mut self, pm_id: u32, waiters: Vec<u64>) {
        for op_id in waiters {
            let done = self
                .ops
                .get(&op_id)
                .map_or(ChangeKind::Reloaded, |op| op.settle.done());
            self.settle(pm_id, vec![op_id], |id| Change::new(id, done));
        }
    }

    pub(super) fn finish_op(&mut self, mut op: Op) {
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
        let failed: Vec<&Change> = op.changes.iter().filter(|c| c.what.is_failure()).collect();
        if !failed.is_empty() {
            let ids: Vec<String> = failed.iter().map(|c| c.pm_id.to_string()).collect();
            let mut whys: Vec<String> = failed.iter().map(|c| c.to_string()).collect();
            whys.dedup();
            reply.error = Some(spawn_failed(
                &format!(
                    "pm_id {} could not be started again ({})",
                    ids.join(", "),
                    whys.join("; ")
                ),
                self.host(),
            ));
        }
        reply.changes = op.changes;
        let _ = op.reply.send(reply);
    }

    /// Records `change` for `pm_id` in each waiting op, and replies to those that are done.
    pub(super) fn settle(&mut self, pm_id: u32, waiters: Vec<u64>, change: impl Fn(u32) -> Change) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_restart_or_reload_says_which_and_why_not() {
        assert_eq!(Settle::Restarted.done(), ChangeKind::Restarted);
        assert_eq!(Settle::Reloaded.done(), ChangeKind::Reloaded);
        let c = Settle::Restarted.not_done(4, SPAWN_FAILED);
        assert_eq!(
            (c.pm_id, c.what, c.detail.as_str()),
            (4, ChangeKind::NotRestarted, SPAWN_FAILED)
        );
        assert_eq!(
            Settle::Reloaded.not_done(4, "x").what,
            ChangeKind::NotReloaded
        );
        assert_eq!(
            Settle::Exited.not_done(4, "x").what,
            ChangeKind::NotRestarted
        );
    }
}
