//! The verbs that change no desired state: `ls`, `logs`, `send` and `signal` ask the agents
//! holding the processes named; `info` says who answers and the hosts it sees.

use crate::controller::agents::{Merge, READ_TIMEOUT, ask_all, merge};
use crate::controller::desired::{self, not_found, select};
use crate::controller::{CTL, Ctx};
use crate::protocol::control::{
    LogsRequest, Request, SendRequest, SignalRequest, Target, TargetRequest,
};
use crate::protocol::envelope::now_ms;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{ControllerInfo, Reply};
use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;
use uuid::Uuid;

/// `info`: this controller, and every host it has heard.
pub(crate) fn info(ctx: &Ctx, id: Option<Uuid>) -> Reply {
    static ME: OnceLock<ControllerInfo> = OnceLock::new();
    let me = ME.get_or_init(|| ControllerInfo {
        id: Uuid::new_v4(),
        version: env!("CARGO_PKG_VERSION").into(),
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        started_at: now_ms(),
    });
    let mut r = Reply::ok(id, CTL);
    r.hosts = ctx.fleet.hosts();
    r.controller = Some(me.clone());
    r
}

/// Longest `send` and `signal` wait for an agent.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(READ_TIMEOUT.as_secs() * 5);

/// Asks every agent holding processes that `target` names for `req`, aimed at that host's
/// pm_ids; the replies merged. With nothing selected: not found (or an empty reply for `all`,
/// when `empty_ok`).
async fn fan_out(
    ctx: &Ctx,
    (id, target): (Uuid, Target),
    req: Request,
    empty_ok: bool,
    within: Duration,
) -> Result<Reply, ControlError> {
    let sel = select(&desired::read(&ctx.store).await?, &target);
    if sel.is_empty() {
        if empty_ok && target == Target::All {
            return Ok(Reply::ok(Some(id), CTL));
        }
        return Err(not_found(&target));
    }
    let reqs = sel
        .into_iter()
        .map(|(h, ids)| (h, aimed(&req, ids)))
        .collect();
    Ok(merge(id, ask_all(ctx, reqs, within).await, Merge::AsIs))
}

/// `req` under a fresh request id, aimed at exactly `pm_ids` of those its target names.
fn aimed(req: &Request, pm_ids: Vec<u32>) -> Request {
    let mut req = req.clone();
    let fresh = Uuid::new_v4();
    match &mut req {
        Request::Send(r) => (r.request_id, r.pm_ids) = (fresh, pm_ids),
        Request::Signal(r) => (r.request_id, r.pm_ids) = (fresh, pm_ids),
        Request::Logs(r) => (r.request_id, r.pm_ids) = (fresh, pm_ids),
        Request::Stop(r)
        | Request::Restart(r)
        | Request::Reload(r)
        | Request::Delete(r)
        | Request::List(r) => (r.request_id, r.pm_ids) = (fresh, pm_ids),
        // A start names its instances in its spec: never aimed.
        Request::Start(r) => r.request_id = fresh,
    }
    req
}

/// `send`: a message to each process named.
pub(crate) async fn send(ctx: &Ctx, r: SendRequest) -> Result<Reply, ControlError> {
    let asked = (r.request_id, r.target.clone());
    fan_out(ctx, asked, r.into(), false, DELIVER_TIMEOUT).await
}

/// `signal`: a signal to each process named.
pub(crate) async fn signal(ctx: &Ctx, r: SignalRequest) -> Result<Reply, ControlError> {
    crate::protocol::signals::parse(&r.signal)?;
    let asked = (r.request_id, r.target.clone());
    fan_out(ctx, asked, r.into(), false, DELIVER_TIMEOUT).await
}

/// `logs`: the last lines of each process named, by pm_id and stream.
pub(crate) async fn logs(ctx: &Ctx, r: LogsRequest) -> Result<Reply, ControlError> {
    let asked = (r.request_id, r.target.clone());
    let mut reply = fan_out(ctx, asked, Request::Logs(r), true, READ_TIMEOUT * 2).await?;
    reply
        .logs
        .sort_by(|a, b| (a.pm_id, &a.stream).cmp(&(b.pm_id, &b.stream)));
    Ok(reply)
}

/// `ls`: every live agent's processes (so processes started outside the desired state show
/// too), and those of every host the desired state names (a controller that just started has
/// not heard every host yet). A host that does not answer shows its processes as last seen.
pub(crate) async fn ls(ctx: &Ctx, r: TargetRequest) -> Reply {
    let mut hosts: BTreeSet<String> = ctx.fleet.live().into_iter().map(|c| c.host).collect();
    match desired::read(&ctx.store).await {
        Ok(d) => hosts.extend(
            d.into_iter()
                .filter(|(_, a)| !a.apps.is_empty())
                .map(|(h, _)| h),
        ),
        Err(e) => tracing::warn!("ls without the desired state: {e}"),
    }
    let list = Request::List(TargetRequest {
        parallel: 1,
        ..r.clone()
    });
    let reqs: Vec<(String, Request)> = hosts
        .into_iter()
        .map(|host| (host, aimed(&list, vec![])))
        .collect();
    let results = ask_all(ctx, reqs, READ_TIMEOUT).await;
    let mut reply = Reply::ok(Some(r.request_id), CTL);
    let mut silent = vec![];
    for (host, res) in results {
        match res {
            Ok(mut x) => {
                // "No process matches" on one host is not an error of the fleet.
                if let Some(e) = x.error.as_ref().filter(|e| e.kind != ErrorKind::NotFound) {
                    silent.push(format!("{host} ({})", e.message));
                }
                if r.target == Target::All && x.error.is_none() {
                    ctx.fleet.process_list(&host, &x.processes);
                }
                reply.processes.append(&mut x.processes);
            }
            Err(_) => {
                // What it ran when last heard from, without live figures.
                reply.processes.extend(
                    ctx.fleet
                        .last_seen(&host)
                        .into_iter()
                        .filter(|p| r.target.matches(&p.meta)),
                );
                silent.push(host);
            }
        }
    }
    reply.processes.sort_by_key(|p| p.meta.pm_id);
    if !silent.is_empty() {
        reply.error = Some(ControlError::new(
            ErrorKind::Unreachable,
            format!(
                "no answer within {} s from {}: their processes are shown as last seen",
                READ_TIMEOUT.as_secs(),
                silent.join(", ")
            ),
        ));
    } else if reply.processes.is_empty() && r.target != Target::All {
        reply.error = Some(not_found(&r.target));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fanned_out_request_is_aimed_at_one_hosts_pm_ids_under_its_own_id() {
        let asked = SignalRequest {
            request_id: Uuid::new_v4(),
            target: Target::parse("api").expect("a valid name"),
            signal: "SIGUSR2".into(),
            pm_ids: vec![],
        };
        let Request::Signal(r) = aimed(&asked.clone().into(), vec![3, 5]) else {
            panic!("still a signal")
        };
        assert_ne!(r.request_id, asked.request_id);
        assert_eq!(
            (r.pm_ids, r.target, r.signal),
            (vec![3, 5], asked.target, asked.signal)
        );
        let list = Request::List(TargetRequest::new(Target::All));
        let Request::List(r) = aimed(&list, vec![]) else {
            panic!("still a list")
        };
        assert!(r.pm_ids.is_empty());
        assert_ne!(list.request_id(), r.request_id);
    }
}
