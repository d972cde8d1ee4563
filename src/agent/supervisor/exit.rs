//! What a run's exit means: the end of a stop (then what was asked after it), or pm2's restart
//! policy. The meaning is decided by [`meaning`]; the actor carries it out.

use super::actor::{Msg, Supervisor, schedule};
use super::settle::{SPAWN_FAILED, Settle};
use super::stop::AfterStop;
use super::table::{Retiring, exit_event, release_sockets};
use crate::agent::policy::Decision;
use crate::agent::signals;
use crate::agent::worker::WorkerEvent;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use crate::protocol::reply::{Change, ChangeKind};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the exit of a process's current run means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Meaning {
    /// It was asked to stop: then what was asked after the stop.
    Stopped(AfterStop),
    /// pm2's policy gives up: too many unstable restarts (`errored`).
    Overlimit,
    /// pm2's policy leaves it stopped (`autorestart` off, a stop exit code).
    StaysStopped,
    /// pm2's policy restarts it now.
    RestartNow,
    /// pm2's policy restarts it after this delay (`waiting restart` meanwhile).
    RestartAfter(Duration),
}

impl Meaning {
    /// The status the process has from its exit on.
    pub(super) fn status(self) -> Status {
        match self {
            Meaning::Overlimit => Status::Errored,
            Meaning::RestartAfter(_) => Status::WaitingRestart,
            Meaning::Stopped(_) | Meaning::StaysStopped | Meaning::RestartNow => Status::Stopped,
        }
    }
}

/// What an exit means for a process in `status`: the end of a stop (then `after`), or else what
/// pm2's restart policy decides (`decide` is asked only then: it counts the exit).
pub(super) fn meaning(
    status: Status,
    after: AfterStop,
    decide: impl FnOnce() -> Decision,
) -> Meaning {
    if status == Status::Stopping {
        return Meaning::Stopped(after);
    }
    match decide() {
        Decision::Overlimit => Meaning::Overlimit,
        Decision::Stop => Meaning::StaysStopped,
        Decision::Restart(delay) if delay.is_zero() => Meaning::RestartNow,
        Decision::Restart(delay) => Meaning::RestartAfter(delay),
    }
}

/// The change a restart or reload records once the stop is over: restarted when the new run
/// was spawned, stopped when the agent is shutting down, else not restarted (or not reloaded).
pub(super) fn after_restart(
    pm_id: u32,
    settle: Settle,
    running: bool,
    shutting_down: bool,
) -> Change {
    if running {
        Change::new(pm_id, ChangeKind::Restarted)
    } else if shutting_down {
        Change::new(pm_id, ChangeKind::Stopped).detail("the agent is shutting down")
    } else {
        settle.not_done(pm_id, SPAWN_FAILED)
    }
}

/// The exit code and signal name of an exit status.
fn code_and_signal(
    status: &std::io::Result<std::process::ExitStatus>,
) -> (Option<i32>, Option<String>) {
    match status {
        Ok(s) => (s.code(), s.signal().map(signals::name)),
        Err(_) => (None, None),
    }
}

impl Supervisor {
    /// A run of `pm_id` exited: the old run of a reload, or the current one.
    pub(super) fn on_exit(
        &mut self,
        pm_id: u32,
        run_gen: u64,
        status: std::io::Result<std::process::ExitStatus>,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if let Some(r) = p.retiring.take_if(|r| r.run_gen == run_gen) {
            self.old_run_exited(pm_id, r, &status);
            return;
        }
        if p.run_gen != run_gen {
            return;
        }
        let Some(run) = p.run.take() else {
            return;
        };
        let early = std::mem::take(&mut p.online_waiters);
        if let Err(e) = &status {
            tracing::error!(pm_id, "waiting for the worker failed: {e}");
        }
        let (code, signal) = code_and_signal(&status);
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
        let now = Instant::now();
        let meaning = meaning(p.meta.status, p.after_stop, || {
            p.policy.on_exit(now, code, &p.spec)
        });
        if matches!(meaning, Meaning::Stopped(_)) && p.spec.treekill {
            self.reap_stragglers(run.pid, run.stop_deadline);
        }
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        p.set_status(meaning.status());
        if meaning == Meaning::Overlimit {
            p.relay.event(&EventFields::named(ProcessEvent::RestartOverlimit).reason(format!(
                "{} unstable restarts (runs shorter than min_uptime {} ms): not restarting; fix the crash, then restart it",
                p.spec.max_restarts,
                p.spec.min_uptime.as_millis()
            )));
        }
        if let Meaning::Stopped(_) = meaning {
            exit_ev.manually = Some(true);
        }
        exit_event(p, run.pid, &exit_ev);
        match meaning {
            Meaning::Stopped(_) => self.stop_done(pm_id, wtx),
            Meaning::Overlimit | Meaning::StaysStopped => release_sockets(p),
            Meaning::RestartNow => {
                p.meta.restart_time += 1;
                self.spawn_proc(pm_id, wtx);
            }
            Meaning::RestartAfter(delay) => {
                let run_gen = p.run_gen;
                let msg = Msg::RestartDue { pm_id, run_gen };
                schedule(
                    &self.cfg.tracker,
                    &self.cfg.cancel,
                    &self.tx,
                    Instant::now() + delay,
                    msg,
                );
            }
        }
    }

    /// The old run of a reload exited: its own exit event, with its own pid, so nobody thinks
    /// the new run died.
    fn old_run_exited(
        &mut self,
        pm_id: u32,
        r: Retiring,
        status: &std::io::Result<std::process::ExitStatus>,
    ) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        tracing::info!(pm_id, pid = r.run.pid, "the old run of a reload exited");
        p.relay.forget_meta(r.run_gen);
        if p.run.as_ref().is_some_and(|run| run.listened) {
            let current = p.run_gen;
            p.cluster_sockets.retain(|c| c.run_gen >= current);
        }
        let mut meta = r.meta;
        meta.status = Status::Stopped;
        meta.pid = r.run.pid;
        let relay = self.cfg.hub.worker(&p.app, &meta);
        let (code, signal) = code_and_signal(status);
        relay.event(&EventFields {
            exit_code: code,
            signal,
            manually: Some(true),
            ..EventFields::named(ProcessEvent::Exit)
        });
        self.cfg.hub.retire(&relay);
    }

    /// Stragglers in a stopped run's group get the rest of kill_timeout, then SIGKILL.
    fn reap_stragglers(&self, pid: u32, deadline: Option<Instant>) {
        let pgid = Pid::from_raw(pid as i32);
        if killpg(pgid, None).is_ok() {
            let deadline = deadline.unwrap_or_else(Instant::now);
            self.cfg.tracker.spawn(async move {
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

    /// A stop is over: what was asked after it (nothing, a restart, a delete), and the replies
    /// of the ops that waited for it.
    fn stop_done(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
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
                p.policy.reset(Instant::now());
                p.meta.restart_time += 1;
                self.spawn_proc(pm_id, wtx);
                let running = self.procs.get(&pm_id).is_some_and(|p| p.run.is_some());
                if running && (restart_event || !waiters.is_empty()) {
                    self.emit(
                        pm_id,
                        EventFields::named(ProcessEvent::Restart).manually(true),
                    );
                }
                let shutting_down = self.shutdown.is_some();
                let word = |settle| move |id| after_restart(id, settle, running, shutting_down);
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
                    None => {
                        // Restarts wait for online too: each op gets its own word.
                        for op in reloads {
                            let settle = self.ops.get(&op).map_or(Settle::Reloaded, |o| o.settle);
                            self.settle(pm_id, vec![op], word(settle));
                        }
                    }
                }
            }
            AfterStop::Delete => {
                self.delete_now(pm_id);
                self.settle(pm_id, waiters, |id| Change::new(id, ChangeKind::Deleted));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> Decision {
        panic!("the restart policy is not asked about a stop")
    }

    #[test]
    fn an_exit_while_stopping_ends_the_stop_and_never_counts_for_the_policy() {
        for after in [AfterStop::Nothing, AfterStop::Restart, AfterStop::Delete] {
            let m = meaning(Status::Stopping, after, never);
            assert_eq!(m, Meaning::Stopped(after));
            assert_eq!(m.status(), Status::Stopped);
        }
    }

    #[test]
    fn an_exit_nobody_asked_for_follows_the_policy() {
        let ms = Duration::from_millis;
        let cases = [
            (Decision::Overlimit, Meaning::Overlimit, Status::Errored),
            (Decision::Stop, Meaning::StaysStopped, Status::Stopped),
            (
                Decision::Restart(Duration::ZERO),
                Meaning::RestartNow,
                Status::Stopped,
            ),
            (
                Decision::Restart(ms(250)),
                Meaning::RestartAfter(ms(250)),
                Status::WaitingRestart,
            ),
        ];
        for status in [Status::Online, Status::Launching] {
            for (decision, want, then) in cases {
                let m = meaning(status, AfterStop::Restart, || decision);
                assert_eq!(m, want, "{decision:?} while {status:?}");
                assert_eq!(m.status(), then);
            }
        }
    }

    #[test]
    fn a_restart_settles_restarted_stopped_at_shutdown_or_not_done() {
        let c = after_restart(3, Settle::Reloaded, true, true);
        assert_eq!((c.pm_id, c.what), (3, ChangeKind::Restarted));
        let c = after_restart(3, Settle::Restarted, false, true);
        assert_eq!(c.what, ChangeKind::Stopped);
        assert_eq!(c.detail, "the agent is shutting down");
        let c = after_restart(3, Settle::Restarted, false, false);
        assert_eq!(
            (c.what, c.detail.as_str()),
            (ChangeKind::NotRestarted, SPAWN_FAILED)
        );
        let c = after_restart(3, Settle::Reloaded, false, false);
        assert_eq!(c.what, ChangeKind::NotReloaded);
    }
}
