//! Read-only requests: `list`, `logs`, the heartbeat's summary, and the target selection they share.

use super::Summary;
use super::actor::Supervisor;
use crate::protocol::control::{LogsRequest, Target, TargetRequest};
use crate::protocol::envelope::Status;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{AgentStats, LogTail, ProcessInfo, Reply};

impl Supervisor {
    pub(super) fn matching(&self, target: &Target) -> Result<Vec<u32>, ControlError> {
        let ids: Vec<u32> = self
            .procs
            .values()
            .filter(|p| target.matches(&p.meta))
            .map(|p| p.meta.pm_id)
            .collect();
        if ids.is_empty() && *target != Target::All {
            return Err(ControlError::new(
                ErrorKind::NotFound,
                format!(
                    "no process matches '{target}' on host {}: `list` shows what runs there",
                    self.host()
                ),
            ));
        }
        Ok(ids)
    }

    /// The processes a request is about, and (when the request names pm_ids) the ones this
    /// agent does not have.
    pub(super) fn select(
        &self,
        target: &Target,
        pm_ids: &[u32],
    ) -> Result<(Vec<u32>, Vec<u32>), ControlError> {
        if pm_ids.is_empty() {
            return self.matching(target).map(|ids| (ids, vec![]));
        }
        let (mut have, mut absent) = (vec![], vec![]);
        for &id in pm_ids {
            match self.procs.get(&id) {
                Some(p) if target.matches(&p.meta) => have.push(id),
                _ => absent.push(id),
            }
        }
        have.sort_unstable();
        have.dedup();
        Ok((have, absent))
    }

    pub(super) fn info(&mut self, pm_id: u32) -> Option<ProcessInfo> {
        let p = self.procs.get_mut(&pm_id)?;
        if let Some(run) = &p.run {
            p.meter.update(run.pid);
        }
        Some(ProcessInfo {
            meta: p.meta.clone(),
            cpu: if p.run.is_some() { p.meter.cpu } else { 0.0 },
            memory: if p.run.is_some() { p.meter.memory } else { 0 },
            dropped: p.relay.dropped(),
            ipc_errors: p.relay.ipc_errors(),
            unstable_restarts: p.policy.unstable_restarts,
            exit_code: p.exit_code,
            script: p.launch.script.clone(),
            cwd: p.launch.cwd.clone(),
            interpreter: p.launch.interpreter.clone(),
            out_log: p.out_log.clone(),
            err_log: p.err_log.clone(),
        })
    }

    pub(super) fn agent_stats(&mut self) -> AgentStats {
        let s = self.cfg.hub.relay().stats();
        AgentStats {
            host: self.cfg.host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            counters: self.cfg.hub.counters(),
            queued: s.queued,
            max_message: self.cfg.hub.max_message() as u64,
        }
    }

    pub(super) fn list(&mut self, r: &TargetRequest) -> Result<Reply, ControlError> {
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        reply.processes = ids.into_iter().filter_map(|id| self.info(id)).collect();
        reply.agent = Some(self.agent_stats());
        Ok(reply)
    }

    /// The last lines of each process's log files (bounded so the reply fits in a message).
    pub(super) fn logs(&mut self, r: &LogsRequest) -> Result<Reply, ControlError> {
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let lines = r.lines.min(10_000) as usize;
        let files = (ids.len() * 2).max(1) as u64;
        // Half the largest message for the whole reply, shared by the files.
        let per_file = (self.cfg.hub.max_message() as u64 / 2 / files).max(1024);
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        for id in ids {
            let p = &self.procs[&id];
            for (stream, path) in [("out", &p.out_log), ("err", &p.err_log)] {
                let (got, truncated) =
                    crate::agent::tail::tail(path, lines, per_file).map_err(|e| {
                        ControlError::new(
                            ErrorKind::Internal,
                            format!(
                                "cannot read {} on host {}: {e}",
                                path.display(),
                                self.host()
                            ),
                        )
                    })?;
                reply.logs.push(LogTail {
                    pm_id: id,
                    name: p.meta.name.clone(),
                    namespace: p.meta.namespace.clone(),
                    host: self.cfg.host.clone(),
                    stream: stream.into(),
                    path: path.clone(),
                    lines: got,
                    truncated,
                });
            }
        }
        Ok(reply)
    }

    pub(super) fn summary(&mut self) -> Summary {
        let ids: Vec<u32> = self.procs.keys().copied().collect();
        let mut s = Summary::default();
        for id in ids {
            let Some(info) = self.info(id) else { continue };
            s.processes += 1;
            if info.meta.status == Status::Online {
                s.online += 1;
            }
            s.workers_memory += info.memory;
            if info.dropped > 0 {
                s.dropped_by_process.insert(id, info.dropped);
            }
        }
        self.agent_meter.update(0);
        s
    }
}
