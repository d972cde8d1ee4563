//! Restarts nobody typed: file watch, cron_restart, max_memory_restart.

use super::actor::{Msg, Supervisor, schedule};
use super::stop::AfterStop;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use std::path::PathBuf;
use tokio::time::Instant;

impl Supervisor {
    /// A restart nobody typed (watch, cron, memory): a `restart` event with the reason, then a
    /// graceful stop and a new run.
    pub(super) fn scheduled_restart(&mut self, pm_id: u32, reason: String) {
        tracing::info!(pm_id, "{reason}");
        self.emit(
            pm_id,
            EventFields::named(ProcessEvent::Restart)
                .manually(false)
                .reason(reason),
        );
        self.stop_one(pm_id, AfterStop::Restart, None);
    }

    /// Arms the cron_restart timer for the next occurrence, and (re)makes the file watch when
    /// its settings changed. Called at every new run.
    pub(super) fn arm_schedules(&mut self, pm_id: u32) {
        use crate::protocol::schedule::{CronRestart, Watch};
        let tracker = self.cfg.tracker.clone();
        let tx = self.tx.clone();
        let cancel = self.cfg.cancel.clone();
        let log_dir = self.cfg.log_dir.clone();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        p.cron_gen += 1;
        if let Some(expr) = &p.spec.cron_restart {
            match CronRestart::parse(expr) {
                Ok(Some(c)) => {
                    if let Some(d) = c.next_after(chrono::Local::now()) {
                        let generation = p.cron_gen;
                        schedule(
                            &tracker,
                            &cancel,
                            &tx,
                            Instant::now() + d,
                            Msg::CronDue { pm_id, generation },
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(pm_id, "{e}"),
            }
        }
        let key = (!p.spec.watch.is_off()).then(|| {
            serde_json::json!([
                p.spec.watch,
                p.spec.ignore_watch,
                p.spec.watch_delay.as_millis() as u64,
                p.launch.cwd
            ])
            .to_string()
        });
        if key == p.watch_key {
            return;
        }
        p.file_watch = None;
        p.watch_key = key;
        p.watch_gen += 1;
        let cwd = p.launch.cwd.clone();
        let roots: Vec<PathBuf> = match &p.spec.watch {
            Watch::Off => return,
            Watch::Cwd => vec![cwd],
            Watch::Paths(ps) => ps.iter().map(|x| cwd.join(x)).collect(),
        };
        let generation = p.watch_gen;
        let started = crate::agent::watch::Filter::new(roots, &p.spec.ignore_watch, log_dir)
            .and_then(|f| {
                crate::agent::watch::start(&tracker, f, p.spec.watch_delay, move |path| {
                    if tx
                        .try_send(Msg::Watched {
                            pm_id,
                            generation,
                            path,
                        })
                        .is_err()
                    {
                        tracing::warn!(
                            pm_id,
                            "a file change was not acted on: the agent is busy or stopping"
                        );
                    }
                })
            });
        match started {
            Ok(w) => p.file_watch = Some(w),
            Err(reason) => {
                tracing::warn!(pm_id, "{reason}");
                p.relay
                    .event(&EventFields::named(ProcessEvent::WatchError).reason(reason));
            }
        }
    }

    /// pm2's `max_memory_restart`: checked at every heartbeat sample; a worker over its limit is
    /// restarted gracefully (pm2 reloads it; the counters reset as in pm2).
    pub(super) fn enforce_memory_limits(&mut self) {
        let over: Vec<(u32, u64, u64)> = self
            .procs
            .values()
            .filter_map(|p| {
                let limit = p.spec.max_memory_restart?;
                (p.run.is_some() && p.meta.status == Status::Online && p.meter.memory > limit)
                    .then_some((p.meta.pm_id, p.meter.memory, limit))
            })
            .collect();
        for (pm_id, memory, limit) in over {
            let reason = format!(
                "memory {} MiB is over max_memory_restart {} MiB: restarting",
                memory >> 20,
                limit >> 20
            );
            tracing::warn!(pm_id, "{reason}");
            self.scheduled_restart(pm_id, reason);
        }
    }
}
