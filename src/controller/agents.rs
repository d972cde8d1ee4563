//! Asking agents: one request to one agent under a deadline ([`ask`]), the same to many at
//! once ([`ask_all`]), and their replies made one ([`merge`], [`combine`], [`join_errors`]).
//! Merging is pure.

use super::{CTL, Ctx};
use crate::protocol::AppSpec;
use crate::protocol::HostId;
use crate::protocol::control::{Request, StartRequest, Target, TargetRequest, TargetVerb};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{ChangeKind, Reply};
use std::time::Duration;
use uuid::Uuid;

/// Longest an agent may take to spawn an app's instances.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an agent may take to stop, restart or delete (graceful stops included).
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one instance may take to come back online during a reload.
pub(crate) const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a read (`ls`, `logs`) waits for an agent.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Each host's answer (or why there is none).
pub(crate) type Answers = Vec<(String, Result<Reply, ControlError>)>;

/// Sends `req` to the agent on `host` and waits up to `within` for its reply.
pub(crate) async fn ask(
    ctx: &Ctx,
    host: &str,
    req: Request,
    within: Duration,
) -> Result<Reply, ControlError> {
    let subject = ctx.subjects.agent_verb(&HostId::new(host)?, req.verb());
    match tokio::time::timeout(within, ctx.client.request(subject, req.to_body().into())).await {
        Err(_) => Err(ControlError::new(
            ErrorKind::Unreachable,
            format!(
                "the agent on {host} did not answer within {} s: the desired state is saved, and {host} converges to it once it is back",
                within.as_secs()
            ),
        )),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            Err(ControlError::new(
                ErrorKind::Unreachable,
                format!(
                    "no agent runs on {host} now: the desired state is saved, and {host} converges to it once its agent is back"
                ),
            ))
        }
        Ok(Err(e)) => Err(ControlError::new(
            ErrorKind::Unreachable,
            format!("asking the agent on {host} failed: {e}"),
        )),
        Ok(Ok(m)) => serde_json::from_slice::<Reply>(&m.payload).map_err(|e| {
            ControlError::new(
                ErrorKind::Internal,
                format!("the agent on {host} sent a reply this controller cannot read ({e}): are they the same version?"),
            )
        }),
    }
}

/// Sends each request to its host, all at once; every answer, in the order of `reqs`.
pub(crate) async fn ask_all(ctx: &Ctx, reqs: Vec<(String, Request)>, within: Duration) -> Answers {
    let asks = reqs.into_iter().map(|(host, req)| async move {
        let r = ask(ctx, &host, req, within).await;
        (host, r)
    });
    futures::future::join_all(asks).await
}

/// A start of `spec`'s instances (`force`: the controller has decided; the agent applies).
pub(crate) fn start_req(spec: AppSpec) -> Request {
    StartRequest {
        request_id: Uuid::new_v4(),
        app: spec,
        force: true,
    }
    .into()
}

/// `verb` of exactly `pm_ids` among those `target` names.
pub(crate) fn target_req(verb: TargetVerb, target: &Target, pm_ids: Vec<u32>) -> Request {
    verb.request(TargetRequest {
        request_id: Uuid::new_v4(),
        target: target.clone(),
        pm_ids,
        parallel: 1,
    })
}

/// How the changes in the agents' replies read in the controller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merge {
    /// As the agents said them.
    AsIs,
    /// A delete: `absent` there (its convergence got there first) means deleted all the same.
    Delete,
    /// A start of a new app: an instance its convergence started first was started all the same.
    Start,
    /// A scale-up's starts: instances that were already online are not news, and are left out.
    Added,
    /// Stopped instances started again by a restart or reload: started (or already online)
    /// there reads as this kind (restarted, reloaded).
    Resumed(ChangeKind),
}

/// One reply from many: changes (sorted by pm_id, relabelled as `how` says), processes (sorted
/// by pm_id) and logs together; errors joined.
pub(crate) fn merge(id: Uuid, answers: Answers, how: Merge) -> Reply {
    let mut reply = Reply::ok(Some(id), CTL);
    let mut errors: Vec<ControlError> = vec![];
    for (_, r) in answers {
        match r {
            Ok(mut x) => {
                reply.changes.append(&mut x.changes);
                reply.processes.append(&mut x.processes);
                reply.logs.append(&mut x.logs);
                errors.extend(x.error);
            }
            Err(e) => errors.push(e),
        }
    }
    relabel(&mut reply, how);
    reply.changes.sort_by_key(|c| c.pm_id);
    reply.processes.sort_by_key(|p| p.meta.pm_id);
    reply.error = join_errors(errors);
    reply
}

fn relabel(reply: &mut Reply, how: Merge) {
    let (from, to): (&[ChangeKind], ChangeKind) = match how {
        Merge::AsIs => return,
        Merge::Added => {
            reply
                .changes
                .retain(|c| c.what != ChangeKind::AlreadyOnline);
            return;
        }
        Merge::Delete => (&[ChangeKind::Absent], ChangeKind::Deleted),
        Merge::Start => (&[ChangeKind::AlreadyOnline], ChangeKind::Started),
        Merge::Resumed(to) => (&[ChangeKind::Started, ChangeKind::AlreadyOnline], to),
    };
    for c in reply.changes.iter_mut().filter(|c| from.contains(&c.what)) {
        c.what = to;
    }
}

/// `later` added to `reply`: changes (then sorted by pm_id) and processes together, errors
/// joined (`reply`'s first).
pub(crate) fn combine(mut reply: Reply, later: Reply) -> Reply {
    reply.changes.extend(later.changes);
    reply.processes.extend(later.processes);
    reply.error = join_errors(reply.error.into_iter().chain(later.error).collect());
    reply.changes.sort_by_key(|c| c.pm_id);
    reply
}

/// One error from many: the first one's kind, every message, in order.
pub(crate) fn join_errors(mut errors: Vec<ControlError>) -> Option<ControlError> {
    match errors.len() {
        0 => None,
        1 => errors.pop(),
        _ => Some(ControlError::new(
            errors[0].kind,
            errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reply::Change;

    fn reply(host: &str, changes: &[(u32, ChangeKind)]) -> Reply {
        let mut r = Reply::ok(Some(Uuid::new_v4()), host);
        r.changes = changes.iter().map(|&(id, k)| Change::new(id, k)).collect();
        r
    }

    fn kinds(r: &Reply) -> Vec<(u32, ChangeKind)> {
        r.changes.iter().map(|c| (c.pm_id, c.what)).collect()
    }

    fn err(kind: ErrorKind, m: &str) -> ControlError {
        ControlError::new(kind, m)
    }

    #[test]
    fn merge_joins_replies_sorted_and_keeps_every_error() {
        let id = Uuid::new_v4();
        let mut b = reply("b", &[(3, ChangeKind::Stopped)]);
        b.error = Some(err(ErrorKind::NotFound, "b said no"));
        let answers = vec![
            ("b".into(), Ok(b)),
            ("a".into(), Ok(reply("a", &[(1, ChangeKind::Stopped)]))),
            ("c".into(), Err(err(ErrorKind::Unreachable, "c is away"))),
        ];
        let r = merge(id, answers, Merge::AsIs);
        assert_eq!((r.request_id, r.host.as_str()), (Some(id), CTL));
        assert_eq!(
            kinds(&r),
            [(1, ChangeKind::Stopped), (3, ChangeKind::Stopped)]
        );
        let e = r.error.expect("errors joined");
        assert_eq!(e.kind, ErrorKind::NotFound, "the first error's kind");
        assert_eq!(e.message, "b said no; c is away");
        assert_eq!(merge(id, vec![], Merge::AsIs).error, None);
    }

    #[test]
    fn merge_relabels_per_verb() {
        let answers = || {
            vec![(
                "a".to_string(),
                Ok(reply(
                    "a",
                    &[
                        (0, ChangeKind::Absent),
                        (1, ChangeKind::AlreadyOnline),
                        (2, ChangeKind::Started),
                        (3, ChangeKind::Deleted),
                    ],
                )),
            )]
        };
        let id = Uuid::new_v4();
        use ChangeKind::*;
        assert_eq!(
            kinds(&merge(id, answers(), Merge::AsIs)),
            [(0, Absent), (1, AlreadyOnline), (2, Started), (3, Deleted)]
        );
        // Absent → deleted on delete.
        assert_eq!(
            kinds(&merge(id, answers(), Merge::Delete)),
            [(0, Deleted), (1, AlreadyOnline), (2, Started), (3, Deleted)]
        );
        // AlreadyOnline → started on start.
        assert_eq!(
            kinds(&merge(id, answers(), Merge::Start)),
            [(0, Absent), (1, Started), (2, Started), (3, Deleted)]
        );
        assert_eq!(
            kinds(&merge(id, answers(), Merge::Added)),
            [(0, Absent), (2, Started), (3, Deleted)]
        );
        assert_eq!(
            kinds(&merge(id, answers(), Merge::Resumed(Reloaded))),
            [(0, Absent), (1, Reloaded), (2, Reloaded), (3, Deleted)]
        );
    }

    #[test]
    fn combine_adds_a_later_reply() {
        let mut first = reply("x", &[(5, ChangeKind::Deleted)]);
        first.error = Some(err(ErrorKind::Unreachable, "first"));
        let mut later = reply("y", &[(2, ChangeKind::Started)]);
        later.error = Some(err(ErrorKind::SpawnFailed, "later"));
        let r = combine(first.clone(), later);
        assert_eq!(
            kinds(&r),
            [(2, ChangeKind::Started), (5, ChangeKind::Deleted)]
        );
        let e = r.error.expect("both errors");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Unreachable, "first; later")
        );
        let r = combine(first.clone(), reply("y", &[]));
        assert_eq!(r.error, first.error);
    }
}
