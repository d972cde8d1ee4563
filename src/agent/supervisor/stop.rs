//! Stopping a process: how a run is asked to stop, the merge of overlapping requests, and the kill timers.

use super::actor::{Msg, Supervisor, schedule};
use super::node_cluster;
use super::table::{Run, release_sockets};
use crate::agent::ipc::OutFrame;
use crate::agent::signals;
use crate::agent::spawn::{self, Launch};
use crate::protocol::AppSpec;
use crate::protocol::envelope::Status;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;

/// What happens once a stopping process has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterStop {
    /// It stays stopped.
    Nothing,
    /// A new run.
    Restart,
    /// It leaves the table.
    Delete,
}

impl AfterStop {
    /// What happens after the exit when a stop asking for `asked` overlaps one pending with
    /// `self`: a delete always wins; a restart does not undo a delete; a user's stop (one that
    /// `replies`, as a request does) cancels a pending restart, a stop nobody asked for does not.
    pub(super) fn then(self, asked: AfterStop, replies: bool) -> AfterStop {
        match (self, asked) {
            (_, AfterStop::Delete) | (AfterStop::Delete, _) => AfterStop::Delete,
            (_, AfterStop::Restart) => AfterStop::Restart,
            (AfterStop::Restart, AfterStop::Nothing) if !replies => AfterStop::Restart,
            (_, AfterStop::Nothing) => AfterStop::Nothing,
        }
    }
}

/// How long a Node cluster worker that closed its channel after `disconnect` gets to exit on
/// its own before the kill signal.
pub(super) const DISCONNECT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How a run is first asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopWay {
    /// Node's primary: `disconnect` (servers close, connections finish), then the kill signal.
    Disconnect,
    /// pm2's `shutdown_with_message`: the `'shutdown'` message instead of the signal.
    Message,
    /// The kill signal.
    Signal,
}

pub(super) fn stop_way(shutdown_with_message: bool, node_cluster: bool) -> StopWay {
    if shutdown_with_message {
        StopWay::Message
    } else if node_cluster {
        StopWay::Disconnect
    } else {
        StopWay::Signal
    }
}

/// Sends `sig` to a run: its process group with `treekill` (pm2's default), else the worker.
pub(super) fn kill_run(pid: u32, treekill: bool, sig: Signal) -> nix::Result<()> {
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
pub(super) fn ask_to_stop(pm_id: u32, run: &mut Run, spec: &AppSpec, launch: &Launch) -> bool {
    let sig = signals::parse(&spec.kill_signal).unwrap_or(Signal::SIGINT);
    match stop_way(spec.shutdown_with_message, spawn::is_node_cluster(launch)) {
        StopWay::Disconnect => {
            let seq = run.cluster_seq;
            let line = node_cluster::disconnect(seq);
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

impl Supervisor {
    /// Begins stopping one process; returns true when the caller must wait for its exit.
    pub(super) fn stop_one(&mut self, pm_id: u32, after: AfterStop, op: Option<u64>) -> bool {
        // The old run of a reload under way goes too.
        self.retire(pm_id);
        let tracker = self.cfg.tracker.clone();
        let self_tx = self.tx.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return false;
        };
        p.after_stop = p.after_stop.then(after, op.is_some());
        match p.meta.status {
            Status::Launching | Status::Online => {
                p.set_status(Status::Stopping);
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
                    p.set_status(Status::Stopped);
                }
                if after == AfterStop::Nothing {
                    release_sockets(p);
                }
                false
            }
        }
    }

    pub(super) fn on_kill_timeout(&mut self, pm_id: u32, run_gen: u64) {
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

    /// A run told to `disconnect` closed its channel: its servers are closed and its
    /// connections done. It usually exits on its own now; the kill signal follows a moment
    /// later for one kept alive by other work. (Node's primary signals at once, which kills most
    /// workers during their own clean exit and hides their exit code.)
    pub(super) fn channel_closed(&mut self, pm_id: u32, run_gen: u64) {
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
    pub(super) fn disconnected(&mut self, pm_id: u32, run_gen: u64) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use AfterStop::{Delete, Nothing, Restart};

    #[test]
    fn a_delete_always_wins_and_a_restart_never_undoes_it() {
        for pending in [Nothing, Restart, Delete] {
            for replies in [false, true] {
                assert_eq!(pending.then(Delete, replies), Delete);
                assert_eq!(Delete.then(pending, replies), Delete);
            }
        }
        assert_eq!(Nothing.then(Restart, true), Restart);
        assert_eq!(Nothing.then(Restart, false), Restart);
    }

    #[test]
    fn a_users_stop_cancels_a_pending_restart_a_scheduled_one_does_not() {
        assert_eq!(Restart.then(Nothing, true), Nothing);
        assert_eq!(Restart.then(Nothing, false), Restart);
        assert_eq!(Nothing.then(Nothing, false), Nothing);
        assert_eq!(Restart.then(Restart, true), Restart);
    }

    #[test]
    fn a_run_is_asked_to_stop_the_apps_way() {
        assert_eq!(stop_way(true, true), StopWay::Message);
        assert_eq!(stop_way(true, false), StopWay::Message);
        assert_eq!(stop_way(false, true), StopWay::Disconnect);
        assert_eq!(stop_way(false, false), StopWay::Signal);
    }
}
