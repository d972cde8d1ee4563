//! Read-only requests: `list`, `logs`, the heartbeat's summary, and the target selection they share.

use super::Summary;
use super::actor::Supervisor;
use crate::protocol::control::{LogsRequest, Target, TargetRequest};
use crate::protocol::envelope::{ProcessMeta, Status};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{AgentStats, LogTail, ProcessInfo, Reply};
use tokio::sync::oneshot;

/// The processes of `table` (in pm_id order) a request is about, and (when the request names
/// `pm_ids`) the named ones this agent does not have. A target nothing matches is an error
/// unless it is `all`.
pub(super) fn select(
    table: &[&ProcessMeta],
    target: &Target,
    pm_ids: &[u32],
    host: &str,
) -> Result<(Vec<u32>, Vec<u32>), ControlError> {
    if pm_ids.is_empty() {
        let ids: Vec<u32> = table
            .iter()
            .filter(|m| target.matches(m))
            .map(|m| m.pm_id)
            .collect();
        if ids.is_empty() && *target != Target::All {
            return Err(ControlError::new(
                ErrorKind::NotFound,
                format!(
                    "no process matches '{target}' on host {host}: `list` shows what runs there"
                ),
            ));
        }
        return Ok((ids, vec![]));
    }
    let (mut have, mut absent) = (vec![], vec![]);
    for &id in pm_ids {
        // The table is in pm_id order: a lookup, not a scan, per named id.
        match table
            .binary_search_by_key(&id, |m| m.pm_id)
            .map(|i| table[i])
        {
            Ok(m) if target.matches(m) => have.push(id),
            _ => absent.push(id),
        }
    }
    have.sort_unstable();
    have.dedup();
    Ok((have, absent))
}

/// Fills each tail with the last `lines` lines (at most `per_file` bytes) of its file; the
/// first file that cannot be read fails them all. Blocking.
fn read_tails(
    mut tails: Vec<LogTail>,
    lines: usize,
    per_file: u64,
    host: &str,
) -> Result<Vec<LogTail>, ControlError> {
    for t in &mut tails {
        let (got, truncated) = crate::agent::tail::tail(&t.path, lines, per_file).map_err(|e| {
            ControlError::new(
                ErrorKind::Internal,
                format!("cannot read {} on host {host}: {e}", t.path.display()),
            )
        })?;
        t.lines = got;
        t.truncated = truncated;
    }
    Ok(tails)
}

impl Supervisor {
    /// The processes a request is about, and (when the request names pm_ids) the ones this
    /// agent does not have (see [`select`]).
    pub(super) fn select(
        &self,
        target: &Target,
        pm_ids: &[u32],
    ) -> Result<(Vec<u32>, Vec<u32>), ControlError> {
        let metas: Vec<&ProcessMeta> = self.procs.values().map(|p| &p.meta).collect();
        select(&metas, target, pm_ids, self.host())
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
    /// The paths are gathered here; the files are read on a blocking thread, which replies.
    pub(super) fn logs(&self, r: &LogsRequest, reply: oneshot::Sender<Reply>) {
        let ids = match self.select(&r.target, &r.pm_ids) {
            Ok((ids, _)) => ids,
            Err(e) => {
                let _ = reply.send(Reply::err(Some(r.request_id), self.host(), e));
                return;
            }
        };
        let lines = r.lines.min(10_000) as usize;
        let files = (ids.len() * 2).max(1) as u64;
        // Half the largest message for the whole reply, shared by the files.
        let per_file = (self.cfg.hub.max_message() as u64 / 2 / files).max(1024);
        let mut tails = vec![];
        for id in ids {
            let p = &self.procs[&id];
            for (stream, path) in [("out", &p.out_log), ("err", &p.err_log)] {
                tails.push(LogTail {
                    pm_id: id,
                    name: p.meta.name.clone(),
                    namespace: p.meta.namespace.clone(),
                    host: self.cfg.host.clone(),
                    stream: stream.into(),
                    path: path.clone(),
                    lines: vec![],
                    truncated: false,
                });
            }
        }
        let (request_id, host) = (r.request_id, self.cfg.host.clone());
        self.cfg.tracker.spawn(async move {
            let read = tokio::task::spawn_blocking({
                let host = host.clone();
                move || read_tails(tails, lines, per_file, &host)
            })
            .await
            .unwrap_or_else(|e| {
                Err(ControlError::new(
                    ErrorKind::Internal,
                    format!("reading the log files on host {host} failed: {e}"),
                ))
            });
            let out = match read {
                Ok(logs) => {
                    let mut out = Reply::ok(Some(request_id), &host);
                    out.logs = logs;
                    out
                }
                Err(e) => Reply::err(Some(request_id), &host, e),
            };
            let _ = reply.send(out);
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pm_id: u32, namespace: &str, name: &str) -> ProcessMeta {
        ProcessMeta {
            pm_id,
            name: name.into(),
            namespace: namespace.into(),
            rev: None,
            host: "h".into(),
            pid: 0,
            instance: 0,
            exec_mode: Default::default(),
            status: Status::Online,
            restart_time: 0,
            pm_uptime: 0,
            app_id: Default::default(),
        }
    }

    fn api(namespace: Option<&str>) -> Target {
        Target::Name {
            namespace: namespace.map(Into::into),
            name: "api".into(),
        }
    }

    #[test]
    fn a_target_selects_what_it_matches_in_pm_id_order() {
        let (a, b, c) = (
            meta(0, "default", "api"),
            meta(1, "x", "api"),
            meta(2, "default", "web"),
        );
        let table = [&a, &b, &c];
        assert_eq!(
            select(&table, &api(None), &[], "h").expect("matches"),
            (vec![0, 1], vec![])
        );
        assert_eq!(
            select(&table, &api(Some("x")), &[], "h").expect("matches"),
            (vec![1], vec![])
        );
        assert_eq!(
            select(&table, &Target::Id(2), &[], "h").expect("matches"),
            (vec![2], vec![])
        );
        assert_eq!(
            select(&table, &Target::All, &[], "h").expect("all"),
            (vec![0, 1, 2], vec![])
        );
    }

    #[test]
    fn nothing_matched_is_an_error_except_for_all() {
        let e = select(&[], &api(None), &[], "web-3").expect_err("nothing matches");
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(
            e.message,
            "no process matches 'api' on host web-3: `list` shows what runs there"
        );
        assert_eq!(
            select(&[], &Target::All, &[], "h").expect("all"),
            (vec![], vec![])
        );
    }

    #[test]
    fn named_pm_ids_split_into_present_and_absent() {
        let (a, c) = (meta(0, "default", "api"), meta(2, "default", "web"));
        let table = [&a, &c];
        // 2 is here but another app's: absent for this target; duplicates counted once.
        let got = select(&table, &api(None), &[2, 0, 7, 0], "h").expect("named ids");
        assert_eq!(got, (vec![0], vec![2, 7]));
        assert_eq!(
            select(&table, &Target::All, &[9], "h").expect("named ids"),
            (vec![], vec![9])
        );
    }
}
