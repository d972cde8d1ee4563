//! `stop`, `restart`, `reload` and `delete` of a target: the desired state is edited first
//! (stopped, wanted running again, taken out), then the agents holding the selected processes
//! are asked to do the same. A reload rolls: a batch at a time, the next once the previous is
//! back online.

use crate::controller::agents::{
    Answers, Merge, RELOAD_TIMEOUT, SETTLE_TIMEOUT, START_TIMEOUT, ask, ask_all, combine, merge,
    start_req, target_req,
};
use crate::controller::desired::{
    self, Desired, PerHost, apps_of, edit_host, forget_if_empty, not_found, select,
};
use crate::controller::{CTL, Ctx, plan};
use crate::protocol::control::{Target, TargetRequest, TargetVerb};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{ChangeKind, Reply};

/// `stop`, `restart`, `reload` or `delete`.
pub(crate) async fn targeted(
    ctx: &Ctx,
    verb: TargetVerb,
    r: TargetRequest,
) -> Result<Reply, ControlError> {
    let apps = apps_of(&desired::read(&ctx.store).await?, &r.target);
    let _locked = ctx.lock_apps(&apps).await;
    let desired = desired::read(&ctx.store).await?;
    let mut sel = select(&desired, &r.target);
    if sel.is_empty() {
        if r.target == Target::All {
            return Ok(Reply::ok(Some(r.request_id), CTL));
        }
        return Err(not_found(&r.target));
    }
    let was_stopped = desired::stopped(&desired);
    let mut after = Desired::new();
    for (host, ids) in &sel {
        let a = edit_host(&ctx.store, host, |a| plan::edit_targeted(verb, a, ids)).await?;
        after.insert(host.clone(), a);
    }
    if verb == TargetVerb::Delete {
        for app in &apps {
            forget_if_empty(&ctx.store, app).await?;
        }
    }
    let resumed = match verb {
        TargetVerb::Restart | TargetVerb::Reload => {
            // Stopped ones are started (idempotently), not restarted.
            let reqs = plan::resumptions(&mut sel, &after, &was_stopped)
                .into_iter()
                .map(|(host, spec)| (host, start_req(spec)))
                .collect();
            let done = if verb == TargetVerb::Reload {
                ChangeKind::Reloaded
            } else {
                ChangeKind::Restarted
            };
            let answers = ask_all(ctx, reqs, START_TIMEOUT).await;
            merge(r.request_id, answers, Merge::Resumed(done))
        }
        TargetVerb::Stop | TargetVerb::Delete => Reply::ok(Some(r.request_id), CTL),
    };
    let reply = if verb == TargetVerb::Reload {
        reload(ctx, r, sel).await
    } else {
        let reqs = sel
            .into_iter()
            .map(|(h, ids)| (h, target_req(verb, &r.target, ids)))
            .collect();
        let how = if verb == TargetVerb::Delete {
            Merge::Delete
        } else {
            Merge::AsIs
        };
        merge(r.request_id, ask_all(ctx, reqs, SETTLE_TIMEOUT).await, how)
    };
    let mut reply = combine(reply, resumed);
    reply.processes.sort_by_key(|p| p.meta.pm_id);
    Ok(reply)
}

/// A rolling reload: the batches of [`plan::reload_batches`] one after the other, each once
/// the previous one is online again (ready, with `wait_ready`).
async fn reload(ctx: &Ctx, r: TargetRequest, sel: PerHost) -> Reply {
    let mut answers: Answers = vec![];
    for batch in plan::reload_batches(sel, r.parallel) {
        let target = &r.target;
        let asks = batch.into_iter().map(|(id, host)| async move {
            let req = target_req(TargetVerb::Reload, target, vec![id]);
            let res = ask(ctx, &host, req, RELOAD_TIMEOUT).await;
            (host, res)
        });
        for (host, res) in futures::future::join_all(asks).await {
            let back = res.as_ref().is_ok_and(|x| {
                x.error.is_none() && x.changes.iter().all(|c| c.what == ChangeKind::Reloaded)
            });
            if !back {
                // pm2 goes on with the others; so do we (the reply says which did not come back).
                tracing::warn!(host, "reload of an instance did not come back online");
            }
            answers.push((host, res));
        }
    }
    not_back(merge(r.request_id, answers, Merge::AsIs))
}

/// A reload's reply that says, as its error, which instances did not come back (when the
/// agents said no error of their own).
fn not_back(mut reply: Reply) -> Reply {
    let bad: Vec<String> = reply
        .changes
        .iter()
        .filter(|c| c.what != ChangeKind::Reloaded)
        .map(|c| format!("pm_id {}: {c}", c.pm_id))
        .collect();
    if reply.error.is_none() && !bad.is_empty() {
        reply.error = Some(ControlError::new(
            ErrorKind::SpawnFailed,
            format!(
                "not every instance came back online ({}): `flotilla logs` shows why",
                bad.join("; ")
            ),
        ));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reply::Change;

    #[test]
    fn a_reload_says_which_instances_did_not_come_back() {
        let mut r = Reply::ok(None, CTL);
        r.changes = vec![
            Change::new(0, ChangeKind::Reloaded),
            Change::new(1, ChangeKind::NotReloaded).detail("exit 1"),
        ];
        let e = not_back(r.clone()).error.expect("one did not come back");
        assert_eq!(e.kind, ErrorKind::SpawnFailed);
        assert!(e.message.contains("pm_id 1: "), "{e:?}");
        assert!(!e.message.contains("pm_id 0"), "{e:?}");
        // The agents' own error stays the one said.
        r.error = Some(ControlError::new(ErrorKind::Unreachable, "away"));
        assert_eq!(not_back(r.clone()).error, r.error);
        r.error = None;
        r.changes.pop();
        assert_eq!(not_back(r).error, None);
    }
}
