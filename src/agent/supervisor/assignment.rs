//! Applies the convergence plan (see [`crate::agent::converge`]) to the table.

use super::actor::Supervisor;
use super::stop::AfterStop;
use crate::agent::converge::{self, Action, Have};
use crate::agent::spawn::{self};
use crate::agent::worker::WorkerEvent;
use crate::protocol::control::StartRequest;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use crate::protocol::state::Assignment;
use std::sync::Arc;
use tokio::sync::mpsc;
use uuid::Uuid;

impl Supervisor {
    /// Applies the convergence plan for `a`.
    pub(super) fn converge(&mut self, a: Assignment, wtx: &mpsc::Sender<WorkerEvent>) {
        let steps = {
            let have: Vec<Have<'_>> = self
                .procs
                .values()
                .map(|p| Have {
                    pm_id: p.meta.pm_id,
                    spec: &p.spec,
                    alive: p.meta.status.is_alive(),
                    stopping: p.meta.status == Status::Stopping,
                })
                .collect();
            converge::plan(&have, self.applied.as_ref(), &a)
        };
        if !steps.is_empty() {
            tracing::info!(steps = steps.len(), "converging to the assignment");
        }
        for step in steps {
            match step {
                Action::Delete(id) => {
                    if !self.stop_one(id, AfterStop::Delete, None) {
                        self.delete_now(id);
                    }
                }
                Action::Stop(id) => {
                    if self.stop_one(id, AfterStop::Nothing, None)
                        && let Some(p) = self.procs.get_mut(&id)
                    {
                        p.announce_stop = true; // `stop` once it has exited
                    }
                }
                Action::Resume(id) => {
                    if !self.stop_one(id, AfterStop::Restart, None) {
                        self.manual_restart(id, wtx);
                    }
                }
                Action::Respec(id, spec) => match spawn::resolve(&spec, &self.cfg.host) {
                    Ok(launch) => {
                        if let Some(p) = self.procs.get_mut(&id) {
                            p.spec = Arc::new(spec);
                            p.launch = Arc::new(launch);
                        }
                        if !self.stop_one(id, AfterStop::Restart, None) {
                            self.manual_restart(id, wtx);
                        }
                    }
                    Err(e) => self.emit(
                        id,
                        EventFields::named(ProcessEvent::SpawnError).reason(e.message),
                    ),
                },
                Action::Start(spec) => {
                    let name = format!("{}/{}", spec.namespace, spec.name);
                    let req = StartRequest {
                        request_id: Uuid::new_v4(),
                        app: spec.clone(),
                        force: true,
                    };
                    match self.start(req, wtx) {
                        Ok(r) if r.error.is_none() => {}
                        Ok(r) => {
                            tracing::error!(app = %name, "assigned app did not start: {:?}", r.error)
                        }
                        Err(e) => {
                            tracing::error!(app = %name, "assigned app cannot start: {e}");
                            self.report_unstartable(&spec, &e);
                        }
                    }
                }
            }
        }
        self.applied = Some(a);
    }
}
