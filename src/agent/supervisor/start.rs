//! `start`: new processes, or stopped ones started again; the controller's assigned starts.

use super::actor::Supervisor;
use super::stop::AfterStop;
use super::table::Proc;
use crate::agent::converge::{self};
use crate::agent::policy::RestartState;
use crate::agent::spawn::{self, Launch};
use crate::agent::stats::CpuMeter;
use crate::agent::worker::WorkerEvent;
use crate::protocol::control::StartRequest;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::event::ProcessEvent;
use crate::protocol::reply::{Change, ChangeKind, Reply};
use crate::protocol::{AppKey, AppSpec};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

/// The `n` lowest ids from `from` on that are not `taken` (controller-chosen ids may sit above
/// the counter).
pub(super) fn free_ids(
    from: u32,
    n: u32,
    taken: impl Fn(u32) -> bool,
) -> Result<Vec<u32>, ControlError> {
    let mut ids = Vec::with_capacity(n as usize);
    let mut next = from;
    while ids.len() < n as usize {
        if !taken(next) {
            ids.push(next);
        }
        next = next.checked_add(1).ok_or_else(|| {
            ControlError::new(ErrorKind::InvalidValue, "no pm_id is left on this agent")
        })?;
    }
    Ok(ids)
}

/// The checks of a start whose pm_ids the controller chose: one id per instance, each its own,
/// and instance numbers (if any) for each.
pub(super) fn check_assigned(spec: &AppSpec) -> Result<(), ControlError> {
    let n = spec.instances.unwrap_or(1) as usize;
    if spec.pm_ids.len() != n {
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            format!("pm_ids has {} ids for {n} instances", spec.pm_ids.len()),
        ));
    }
    if !spec.instance_numbers.is_empty() && spec.instance_numbers.len() != n {
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            format!(
                "instance_numbers has {} numbers for {n} instances",
                spec.instance_numbers.len()
            ),
        ));
    }
    let distinct: BTreeSet<u32> = spec.pm_ids.iter().copied().collect();
    if distinct.len() != spec.pm_ids.len() {
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            "pm_ids has the same id twice: each instance needs its own",
        ));
    }
    Ok(())
}

/// What an assigned start does with an id the table has already (same app).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AssignedStep {
    /// It is stopping: a new run with the new options once it has exited (`restarting`).
    AfterStop,
    /// It runs with other options: restarted with the new ones.
    Respec,
    /// It is not running: started again, with the options given.
    StartAgain,
    /// It runs with these options: left alone.
    AlreadyOnline,
}

/// The step for an id in `status` whose options are the `same` as those asked for (or not).
pub(super) fn assigned_step(status: Status, same: bool) -> AssignedStep {
    if status == Status::Stopping {
        AssignedStep::AfterStop
    } else if !same && status.is_alive() {
        AssignedStep::Respec
    } else if !status.is_alive() {
        AssignedStep::StartAgain
    } else {
        AssignedStep::AlreadyOnline
    }
}

impl Supervisor {
    pub(super) fn start(
        &mut self,
        r: StartRequest,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) -> Result<Reply, ControlError> {
        let spec = r.app;
        spec.validate()?;
        let app = AppKey::new(&spec.namespace, &spec.name)?;
        let instances = spec.instances.unwrap_or(1);
        let launch = Arc::new(spawn::resolve(&spec, self.host())?);
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        if !spec.pm_ids.is_empty() {
            return self.start_assigned(app, spec, launch, reply, wtx);
        }
        let existing: Vec<u32> = self
            .procs
            .values()
            .filter(|p| p.app == app)
            .map(|p| p.meta.pm_id)
            .collect();
        let spec = Arc::new(spec);
        if !existing.is_empty() && !r.force {
            let alive: Vec<u32> = existing
                .iter()
                .copied()
                .filter(|id| {
                    self.procs[id].meta.status != Status::Stopped
                        && self.procs[id].meta.status != Status::Errored
                })
                .collect();
            if !alive.is_empty() {
                return Err(ControlError::new(
                    ErrorKind::AlreadyRunning,
                    format!(
                        "{app} is already running on host {} (pm_id {}): restart it, or force a second copy",
                        self.host(),
                        alive
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            // pm2: `start` of a stopped app starts it again, with the new options.
            for id in existing {
                self.start_again(id, &spec, &launch, wtx);
                reply.changes.push(Change::new(id, ChangeKind::Started));
                reply.processes.extend(self.info(id));
            }
            return Ok(reply);
        }
        let ids = free_ids(self.next_pm_id, instances, |id| {
            self.procs.contains_key(&id)
        })?;
        let numbers: Vec<u32> = (0..instances).collect();
        self.create(&app, &spec, &launch, &ids, &numbers, &mut reply, wtx)?;
        Ok(reply)
    }

    /// A start with the pm_ids chosen by the controller: idempotent, so that it and the
    /// convergence to the same assignment can arrive in either order. Ids already here with the
    /// same app are left running (`already online`), started again when stopped, or restarted
    /// when their options changed; the others are created.
    pub(super) fn start_assigned(
        &mut self,
        app: AppKey,
        spec: AppSpec,
        launch: Arc<Launch>,
        mut reply: Reply,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) -> Result<Reply, ControlError> {
        check_assigned(&spec)?;
        if let Some(p) = spec
            .pm_ids
            .iter()
            .filter_map(|id| self.procs.get(id))
            .find(|p| p.app != app)
        {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "pm_id {} is already used by {} on host {}",
                    p.meta.pm_id,
                    p.app,
                    self.host()
                ),
            ));
        }
        let spec = Arc::new(spec);
        let (mut ids, mut numbers) = (vec![], vec![]);
        for (i, &id) in spec.pm_ids.iter().enumerate() {
            let Some(p) = self.procs.get(&id) else {
                ids.push(id);
                numbers.push(spec.instance_numbers.get(i).copied().unwrap_or(i as u32));
                continue;
            };
            let step = assigned_step(p.meta.status, converge::same_shape(&p.spec, &spec));
            if step != AssignedStep::AlreadyOnline
                && let Some(p) = self.procs.get_mut(&id)
            {
                p.spec = spec.clone();
                p.launch = launch.clone();
            }
            let what = match step {
                AssignedStep::AfterStop => {
                    // Still stopping (a stop under way when it was wanted running again): run it
                    // again once it has exited, with these options.
                    self.stop_one(id, AfterStop::Restart, None);
                    Change::new(id, ChangeKind::Restarting)
                }
                AssignedStep::Respec => {
                    if !self.stop_one(id, AfterStop::Restart, None) {
                        self.manual_restart(id, wtx);
                    }
                    Change::new(id, ChangeKind::Restarted).detail("with the new options")
                }
                AssignedStep::StartAgain => {
                    self.start_again(id, &spec, &launch, wtx);
                    Change::new(id, ChangeKind::Started)
                }
                AssignedStep::AlreadyOnline => Change::new(id, ChangeKind::AlreadyOnline),
            };
            reply.changes.push(what);
            reply.processes.extend(self.info(id));
        }
        if !ids.is_empty() {
            self.create(&app, &spec, &launch, &ids, &numbers, &mut reply, wtx)?;
        }
        if reply.error.is_none() {
            reply.error = self.spawn_errors(&app, &spec.pm_ids);
        }
        Ok(reply)
    }

    /// pm2: `start` of a stopped app starts it again (a restart), with the options given.
    pub(super) fn start_again(
        &mut self,
        id: u32,
        spec: &Arc<AppSpec>,
        launch: &Arc<Launch>,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.spec = spec.clone();
            p.launch = launch.clone();
        }
        // pm2 restarts it: one more restart, a `restart` event; the same as the convergence's
        // `Resume`, so whichever arrives first, the count is the same.
        self.manual_restart(id, wtx);
    }

    /// Creates and spawns the processes `ids` (instance numbers `numbers`) of `app`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        &mut self,
        app: &AppKey,
        spec: &Arc<AppSpec>,
        launch: &Arc<Launch>,
        ids: &[u32],
        numbers: &[u32],
        reply: &mut Reply,
        wtx: &mpsc::Sender<WorkerEvent>,
    ) -> Result<(), ControlError> {
        let app_id = spec.app_id.unwrap_or_else(Uuid::new_v4);
        if !self.log_dir_made || !self.cfg.log_dir.is_dir() {
            // It failed when the supervisor started, or someone removed it since: made again
            // (one stat per start), or the precise error.
            std::fs::create_dir_all(&self.cfg.log_dir).map_err(|e| {
                ControlError::new(
                    ErrorKind::SpawnFailed,
                    format!(
                        "cannot create the log directory {}: {e}",
                        self.cfg.log_dir.display()
                    ),
                )
            })?;
            self.log_dir_made = true;
        }
        let instances = spec.instances.unwrap_or(ids.len() as u32);
        for (i, &pm_id) in ids.iter().enumerate() {
            self.next_pm_id = self.next_pm_id.max(pm_id.saturating_add(1));
            let instance = numbers.get(i).copied().unwrap_or(i as u32);
            let meta = self.new_meta(app, pm_id, instance, launch.exec_mode, app_id);
            let relay = self.cfg.hub.worker(app, &meta);
            let log = |kind: &str| {
                self.cfg
                    .log_dir
                    .join(format!("{}-{kind}-{pm_id}.log", app.name()))
            };
            let proc = Proc {
                out_log: log("out"),
                err_log: log("error"),
                meta,
                app: app.clone(),
                spec: spec.clone(),
                launch: launch.clone(),
                relay,
                run_gen: 0,
                run: None,
                policy: RestartState::new(Instant::now()),
                after_stop: AfterStop::Nothing,
                manual_restart_event: false,
                announce_stop: false,
                waiters: vec![],
                online_waiters: vec![],
                exit_code: None,
                meter: CpuMeter::default(),
                instances,
                spawn_error: None,
                retiring: None,
                cluster_sockets: vec![],
                sockets: vec![],
                file_watch: None,
                watch_key: None,
                watch_gen: 0,
                cron_gen: 0,
            };
            proc.relay
                .event(&EventFields::named(ProcessEvent::Start).manually(true));
            self.procs.insert(pm_id, proc);
            self.spawn_proc(pm_id, wtx);
            reply.changes.push(Change::new(pm_id, ChangeKind::Started));
        }
        reply
            .processes
            .extend(ids.iter().filter_map(|&id| self.info(id)));
        if let Some(e) = self.spawn_errors(app, ids) {
            reply.error = Some(e);
        }
        Ok(())
    }

    /// The error of the `ids` whose spawn failed, with the reasons (`None` when none failed).
    pub(super) fn spawn_errors(&self, app: &AppKey, ids: &[u32]) -> Option<ControlError> {
        let failed: Vec<&Proc> = ids
            .iter()
            .filter_map(|id| self.procs.get(id))
            .filter(|p| p.meta.status == Status::Errored)
            .collect();
        if failed.is_empty() {
            return None;
        }
        let mut reasons: Vec<&str> = failed
            .iter()
            .filter_map(|p| p.spawn_error.as_deref())
            .collect();
        reasons.dedup();
        Some(ControlError::new(
            ErrorKind::SpawnFailed,
            format!(
                "{app}: pm_id {} could not be spawned: {}",
                failed
                    .iter()
                    .map(|p| p.meta.pm_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                if reasons.is_empty() {
                    format!("see the agent log on host {}", self.host())
                } else {
                    reasons.join("; ")
                }
            ),
        ))
    }

    /// An assigned app that cannot start here (its script is missing, ...): a `spawn:error`
    /// event per pm_id, so whoever watches the app (the CLI waiting for `online`) hears why.
    pub(super) fn report_unstartable(&self, spec: &AppSpec, e: &ControlError) {
        let Ok(app) = AppKey::new(&spec.namespace, &spec.name) else {
            return;
        };
        for (i, &pm_id) in spec.pm_ids.iter().enumerate() {
            let instance = spec.instance_numbers.get(i).copied().unwrap_or(i as u32);
            let exec_mode = spec.exec_mode.unwrap_or_default();
            let mut meta = self.new_meta(
                &app,
                pm_id,
                instance,
                exec_mode,
                spec.app_id.unwrap_or_default(),
            );
            meta.status = Status::Errored;
            let relay = self.cfg.hub.worker(&app, &meta);
            relay.event(&EventFields::named(ProcessEvent::SpawnError).reason(e.message.clone()));
            self.cfg.hub.retire(&relay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ids_are_the_lowest_untaken_from_the_counter() {
        let taken = [1, 2, 5];
        let ids = free_ids(1, 3, |id| taken.contains(&id)).expect("ids are left");
        assert_eq!(ids, vec![3, 4, 6]);
        assert_eq!(
            free_ids(7, 0, |_| false).expect("none asked"),
            Vec::<u32>::new()
        );
        let e = free_ids(u32::MAX - 1, 3, |_| false).expect_err("the ids run out");
        assert_eq!(e.kind, ErrorKind::InvalidValue);
    }

    #[test]
    fn an_assigned_start_checks_its_ids() {
        let mut s = AppSpec::new("a", "/x.js");
        s.instances = Some(2);
        s.pm_ids = vec![4, 9];
        assert!(check_assigned(&s).is_ok());
        s.instance_numbers = vec![0];
        assert!(
            check_assigned(&s)
                .expect_err("one number for two")
                .message
                .contains("instance_numbers has 1")
        );
        s.instance_numbers = vec![];
        s.pm_ids = vec![4, 4];
        assert!(
            check_assigned(&s)
                .expect_err("the same id twice")
                .message
                .contains("twice")
        );
        s.pm_ids = vec![4];
        assert!(
            check_assigned(&s)
                .expect_err("one id for two")
                .message
                .contains("pm_ids has 1 ids for 2")
        );
    }

    #[test]
    fn an_assigned_id_present_already_is_restarted_started_or_left() {
        use AssignedStep::*;
        for same in [true, false] {
            assert_eq!(assigned_step(Status::Stopping, same), AfterStop);
            for status in [Status::Stopped, Status::Errored] {
                assert_eq!(assigned_step(status, same), StartAgain, "{status:?}");
            }
        }
        for status in [Status::Online, Status::Launching, Status::WaitingRestart] {
            assert_eq!(assigned_step(status, true), AlreadyOnline);
            assert_eq!(assigned_step(status, false), Respec);
        }
    }
}
