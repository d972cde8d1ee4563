//! What a run's exit means: the end of a stop (then what was asked after it), or pm2's restart policy.

use super::actor::{Msg, Supervisor, schedule};
use super::settle::{SPAWN_FAILED, Settle};
use super::stop::AfterStop;
use super::table::{exit_event, release_sockets};
use crate::agent::policy::Decision;
use crate::agent::signals;
use crate::agent::worker::WorkerEvent;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use crate::protocol::reply::{Change, ChangeKind};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

impl Supervisor {
    pub(super) fn on_exit(
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
}
