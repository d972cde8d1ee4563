//! Reload overlap: the new run starts while the old one serves, then the old one retires.

use super::actor::{Msg, Supervisor, schedule};
use super::stop::{AfterStop, ask_to_stop};
use super::table::Retiring;
use crate::agent::worker::WorkerEvent;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// True when a reload can start the new run before stopping the old one: it runs and is online,
/// no other reload of it is under way, and it shares its listening sockets through the agent
/// (so both runs serve the same ones).
pub(super) fn overlaps(running: bool, reloading: bool, status: Status, shares: bool) -> bool {
    running && !reloading && status == Status::Online && shares
}

impl Supervisor {
    /// True when a reload can start the new run before stopping the old one (see [`overlaps`]).
    pub(super) fn can_overlap(&self, pm_id: u32) -> bool {
        self.procs.get(&pm_id).is_some_and(|p| {
            overlaps(
                p.run.is_some(),
                p.retiring.is_some(),
                p.meta.status,
                !p.sockets.is_empty() || !p.cluster_sockets.is_empty(),
            )
        })
    }

    /// pm2's cluster reload: the new run starts while the old one serves; the old one is
    /// stopped (kill signal, SIGKILL after `kill_timeout`) once the new one is online. Returns
    /// false when the new run could not be spawned: the old one then keeps serving.
    pub(super) fn replace_run(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) -> bool {
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
    pub(super) fn overlap_done(&mut self, pm_id: u32) {
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
    pub(super) fn retire(&mut self, pm_id: u32) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_online_run_sharing_sockets_and_not_already_reloading_overlaps() {
        assert!(overlaps(true, false, Status::Online, true));
        assert!(
            !overlaps(true, false, Status::Online, false),
            "no shared socket"
        );
        assert!(
            !overlaps(true, true, Status::Online, true),
            "a reload under way"
        );
        assert!(!overlaps(false, false, Status::Online, true), "no run");
        for status in [
            Status::Launching,
            Status::Stopping,
            Status::Stopped,
            Status::WaitingRestart,
            Status::Errored,
        ] {
            assert!(!overlaps(true, false, status, true), "{status:?}");
        }
    }
}
