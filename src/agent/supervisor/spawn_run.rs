//! A new run of a process: spawn it, then online (at once, on `ready`, or on a Node cluster worker's boot).

use super::actor::{Msg, Supervisor, schedule};
use super::table::Run;
use crate::agent::signals;
use crate::agent::spawn::{self, Identity};
use crate::agent::stats::CpuMeter;
use crate::agent::worker::{self, RunContext, WorkerEvent};
use crate::protocol::envelope::{EventFields, Status, now_ms};
use crate::protocol::error::ControlError;
use crate::protocol::event::ProcessEvent;
use nix::sys::signal::Signal;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The sockets for `listen`: those held already when they match, else bound (or shared).
pub(super) fn listening(
    table: &mut crate::agent::sockets::Sockets,
    listen: &[String],
    held: &[Arc<crate::agent::sockets::Bound>],
    host: &str,
) -> Result<Vec<Arc<crate::agent::sockets::Bound>>, ControlError> {
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

impl Supervisor {
    /// Spawns a new run of `pm_id`; on failure the process is `errored` with an event.
    pub(super) fn spawn_proc(&mut self, pm_id: u32, wtx: &mpsc::Sender<WorkerEvent>) {
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
            p.set_status(Status::Stopped);
            return;
        }
        // The app's listening sockets: bound by the first instance, kept by every run.
        let sockets = match listening(&mut self.sockets, &p.spec.listen, &p.sockets, &host) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(pm_id, "{}", e.message);
                p.spawn_failed(e.message);
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
                    p.set_status(Status::Launching);
                    let (run_gen, d) = (p.run_gen, p.spec.listen_timeout);
                    schedule(
                        &tracker,
                        &cancel,
                        &self_tx,
                        Instant::now() + d,
                        Msg::ReadyTimeout { pm_id, run_gen },
                    );
                } else {
                    p.set_status(Status::Online);
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
                p.spawn_failed(reason);
            }
        }
    }

    pub(super) fn on_ready(&mut self, pm_id: u32, run_gen: u64, timed_out: bool) {
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
    pub(super) fn became_online(&mut self, pm_id: u32, reason: Option<String>) {
        let tracker = self.cfg.tracker.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        p.set_status(Status::Online);
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
}
