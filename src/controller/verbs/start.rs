//! `start`: a new app is placed over the live hosts and started; an existing one gets the new
//! spec (`-f`, an ecosystem file, or a start of a stopped app). A start an agent refuses is
//! undone whole, so nothing is left half-started.

use crate::bus::store::StoreError;
use crate::controller::agents::{
    Merge, SETTLE_TIMEOUT, START_TIMEOUT, ask_all, combine, join_errors, merge, start_req,
    target_req,
};
use crate::controller::desired::{
    self, Desired, edit_host, forget_if_empty, share, slots, store_err,
};
use crate::controller::{Ctx, HOSTS_WAIT, ids, placement, plan};
use crate::protocol::api::ApiStartRequest;
use crate::protocol::control::{Request, Target, TargetVerb};
use crate::protocol::envelope::now_ms;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::Reply;
use crate::protocol::state::{self, AppRecord};
use crate::protocol::{AppKey, AppSpec, HostId};
use std::collections::BTreeMap;
use uuid::Uuid;

/// `start`.
pub(crate) async fn start(ctx: &Ctx, r: ApiStartRequest) -> Result<Reply, ControlError> {
    let mut spec = r.app;
    spec.validate()?;
    let app = AppKey::new(&spec.namespace, &spec.name)?;
    let n = spec.instances.unwrap_or(1);
    for h in &r.hosts {
        HostId::new(h)?;
    }
    let key = state::app_key(&app);
    let _locked = ctx.lock_apps([&app]).await;
    let desired = desired::read(&ctx.store).await?;
    if let Some((rec, _)) = ctx.store.get::<AppRecord>(&key).await.map_err(store_err)? {
        let placed = slots(&desired, &app);
        let running: Vec<u32> = placed
            .iter()
            .filter(|s| s.running)
            .map(|s| s.pm_id)
            .collect();
        if !running.is_empty() && !r.force {
            return Err(already_runs(&app, placed.len(), &running));
        }
        let change = Change {
            spec,
            hosts: r.hosts,
            labels: r.labels,
        };
        return apply(ctx, r.request_id, &app, rec, change, desired).await;
    }
    spec.app_id = Some(spec.app_id.unwrap_or_else(Uuid::new_v4));
    let placed = placement::place(
        n,
        &ctx.fleet.live_or_wait(HOSTS_WAIT).await,
        &r.hosts,
        &r.labels,
    )
    .map_err(|e| ControlError::new(ErrorKind::NotFound, e.to_string()))?;
    let mut base = spec;
    base.pm_ids.clear();
    base.instance_numbers.clear();
    base.instances = Some(n);
    let rec = AppRecord {
        spec: base.clone(),
        hosts: r.hosts,
        labels: r.labels,
        created_at: now_ms(),
    };
    // The app record first: an assignment never names an app that has no record.
    ctx.store
        .update(&key, |old: Option<AppRecord>| match old {
            Some(_) => Err(StoreError::Refused(format!(
                "{app} was just created by another request: `flotilla ls` shows it"
            ))),
            None => Ok(rec.clone()),
        })
        .await
        .map_err(|e| match e {
            StoreError::Refused(m) => ControlError::new(ErrorKind::AlreadyRunning, m),
            e => store_err(e),
        })?;
    let reqs = match assign_new(ctx, &app, &base, n, placed).await {
        Ok(reqs) => reqs,
        Err(e) => {
            // Nothing half-written stays behind: a retried start then works.
            let _ = remove(ctx, &app).await;
            return Err(e);
        }
    };
    let results = ask_all(ctx, reqs, START_TIMEOUT).await;
    // An agent that refused (script missing there, ...) undoes the whole start: nothing is
    // left half-started. An agent that did not answer keeps its share: it converges later.
    let refused: Vec<ControlError> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().and_then(|x| x.error.clone()))
        .filter(|e| e.kind != ErrorKind::Unreachable)
        .collect();
    if let Some(mut e) = join_errors(refused) {
        let undo = remove(ctx, &app).await;
        e.message.push_str(match undo {
            Ok(()) => ": nothing was started",
            Err(_) => ": the start is being undone",
        });
        return Err(e);
    }
    Ok(merge(r.request_id, results, Merge::Start))
}

/// "`app` already runs": a start without `-f` of an app with running instances.
fn already_runs(app: &AppKey, instances: usize, running: &[u32]) -> ControlError {
    let ids = running
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    ControlError::new(
        ErrorKind::AlreadyRunning,
        format!(
            "{app} already runs ({instances} instance{}, pm_id {ids}): `flotilla restart {}` restarts it; `flotilla start ... -f` applies new options to it",
            if instances == 1 { "" } else { "s" },
            app.name()
        ),
    )
}

/// Allocates pm_ids for a new app and writes each host's share; returns the start requests.
async fn assign_new(
    ctx: &Ctx,
    app: &AppKey,
    base: &AppSpec,
    n: u32,
    placed: BTreeMap<String, u32>,
) -> Result<Vec<(String, Request)>, ControlError> {
    let ids = ids::allocate(&ctx.store, n).await.map_err(store_err)?;
    let mut reqs = vec![];
    for (host, entry) in plan::new_app(base, &ids, &placed) {
        edit_host(&ctx.store, &host, |a| plan::put(a, app, &entry)).await?;
        reqs.push((host, start_req(entry.spec)));
    }
    Ok(reqs)
}

/// Removes every instance of `app` from the assignments (and then its app record), then asks
/// their agents to delete them: the undo of a start.
async fn remove(ctx: &Ctx, app: &AppKey) -> Result<(), ControlError> {
    let desired = desired::read(&ctx.store).await?;
    let mut reqs = vec![];
    for (host, gone) in plan::removal(&desired, app, &Target::All) {
        edit_host(&ctx.store, &host, |a| plan::remove_instances(a, app, &gone)).await?;
        reqs.push((host, target_req(TargetVerb::Delete, &Target::All, gone)));
    }
    forget_if_empty(&ctx.store, app).await?;
    ask_all(ctx, reqs, SETTLE_TIMEOUT).await;
    Ok(())
}

/// What a start asks of an existing app.
struct Change {
    /// The new spec.
    spec: AppSpec,
    /// New host constraint (none: keep the app's).
    hosts: Vec<String>,
    /// New label constraint (none: keep the app's).
    labels: BTreeMap<String, String>,
}

/// Applies a new spec to an existing app (pm2 `-f`, an ecosystem file, or `start` of a stopped
/// app): every instance gets the new options (agents restart those whose options changed and
/// start those that were stopped), then the app is scaled to the new count.
async fn apply(
    ctx: &Ctx,
    id: Uuid,
    app: &AppKey,
    mut rec: AppRecord,
    change: Change,
    desired: Desired,
) -> Result<Reply, ControlError> {
    // No count given (`start app.js -f`, an ecosystem without `instances`): keep the current one.
    let n = change
        .spec
        .instances
        .unwrap_or_else(|| (slots(&desired, app).len() as u32).max(1));
    let mut base = change.spec;
    base.app_id = rec.spec.app_id;
    base.pm_ids.clear();
    base.instance_numbers.clear();
    base.instances = Some(n);
    rec.spec = base.clone();
    if !change.hosts.is_empty() {
        rec.hosts = change.hosts;
    }
    if !change.labels.is_empty() {
        rec.labels = change.labels;
    }
    let key = state::app_key(app);
    let r2 = rec.clone();
    ctx.store
        .update(&key, |_: Option<AppRecord>| Ok(r2.clone()))
        .await
        .map_err(store_err)?;
    // The count first, then the options: in between, an agent that converges to the middle
    // state never sees an instance that is about to go (it would start it again after our
    // delete, until the next state arrives).
    let (_, removed) = super::scale::rescale(ctx, app, &rec, n, &desired).await?;
    let desired = desired::read(&ctx.store).await?;
    for host in desired.keys() {
        if slots(&desired, app).iter().any(|s| &s.host == host) {
            edit_host(&ctx.store, host, |a| plan::respec(a, app, &base)).await?;
        }
    }
    let reqs = removed
        .into_iter()
        .map(|(host, ids)| (host, target_req(TargetVerb::Delete, &Target::All, ids)))
        .collect();
    let reply = merge(id, ask_all(ctx, reqs, SETTLE_TIMEOUT).await, Merge::Delete);
    let desired = desired::read(&ctx.store).await?;
    let reqs: Vec<(String, Request)> = desired
        .iter()
        .filter_map(|(h, a)| share(a, app).map(|s| (h.clone(), start_req(s))))
        .collect();
    let started = merge(id, ask_all(ctx, reqs, START_TIMEOUT).await, Merge::AsIs);
    Ok(combine(reply, started))
}
