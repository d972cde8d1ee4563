//! `scale`: sets an app's instance count (or changes it by `+N` / `-N`). New instances are
//! placed over the live hosts and started; surplus ones (highest instance numbers first) are
//! deleted.

use crate::controller::agents::{
    Merge, SETTLE_TIMEOUT, START_TIMEOUT, ask_all, combine, merge, start_req, target_req,
};
use crate::controller::desired::{
    self, Desired, PerHost, apps_of, edit_host, not_found, share, slots, store_err,
};
use crate::controller::{Ctx, HOSTS_WAIT, ids, placement, plan};
use crate::protocol::AppKey;
use crate::protocol::api::ScaleRequest;
use crate::protocol::control::{Target, TargetVerb};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::Reply;
use crate::protocol::state::{self, AppRecord, Assignment};
use std::collections::BTreeMap;

/// `scale`.
pub(crate) async fn scale(ctx: &Ctx, r: ScaleRequest) -> Result<Reply, ControlError> {
    let apps = apps_of(&desired::read(&ctx.store).await?, &r.app);
    let mut named = apps.iter();
    let app = match (named.next(), named.next()) {
        (None, _) => return Err(not_found(&r.app)),
        (Some(app), None) => app.clone(),
        _ => {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "'{}' names {} apps ({}): name one as ns/name",
                    r.app,
                    apps.len(),
                    apps.iter()
                        .map(AppKey::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    let _locked = ctx.lock_apps([&app]).await;
    let desired = desired::read(&ctx.store).await?;
    let current = slots(&desired, &app).len();
    let instances = plan::scaled_count(&app, current, r.change, r.instances)?;
    let rec = match ctx
        .store
        .get::<AppRecord>(&state::app_key(&app))
        .await
        .map_err(store_err)?
    {
        Some((rec, _)) => rec,
        None => {
            return Err(ControlError::new(
                ErrorKind::NotFound,
                format!(
                    "{app} has no app record (started by an older version?): delete it and start it again"
                ),
            ));
        }
    };
    let (gained, removed) = rescale(ctx, &app, &rec, instances, &desired).await?;
    let reqs = gained
        .iter()
        .filter_map(|(host, a)| share(a, &app).map(|s| (host.clone(), start_req(s))))
        .collect();
    let started = merge(
        r.request_id,
        ask_all(ctx, reqs, START_TIMEOUT).await,
        Merge::Added,
    );
    let reqs = removed
        .into_iter()
        .map(|(h, ids)| (h, target_req(TargetVerb::Delete, &Target::All, ids)))
        .collect();
    let deleted = merge(
        r.request_id,
        ask_all(ctx, reqs, SETTLE_TIMEOUT).await,
        Merge::Delete,
    );
    Ok(combine(deleted, started))
}

/// Sets `app`'s instance count to `n` in the desired state: new instances are placed over the
/// live hosts (fewest of this app first), surplus ones go, highest instance numbers first.
/// Returns the assignments that gained instances and the pm_ids removed, per host.
pub(super) async fn rescale(
    ctx: &Ctx,
    app: &AppKey,
    rec: &AppRecord,
    n: u32,
    desired: &Desired,
) -> Result<(BTreeMap<String, Assignment>, PerHost), ControlError> {
    let placed = slots(desired, app);
    let cur = placed.len() as u32;
    let mut gained = BTreeMap::new();
    let mut removed = PerHost::new();
    if n > cur {
        let more = placement::add(
            n - cur,
            &ctx.fleet.live_or_wait(HOSTS_WAIT).await,
            &plan::per_host(&placed),
            &rec.hosts,
            &rec.labels,
        )
        .map_err(|e| ControlError::new(ErrorKind::NotFound, e.to_string()))?;
        let ids = ids::allocate(&ctx.store, n - cur)
            .await
            .map_err(store_err)?;
        for (host, list) in plan::grow(&placed, &more, &ids) {
            let a = edit_host(&ctx.store, &host, |a| {
                plan::add_instances(a, app, &rec.spec, &list)
            })
            .await?;
            gained.insert(host, a);
        }
    } else if n < cur {
        removed = plan::shrink(&placed, n);
        for (host, gone) in &removed {
            edit_host(&ctx.store, host, |a| plan::remove_instances(a, app, gone)).await?;
        }
    }
    let key = state::app_key(app);
    ctx.store
        .update(&key, |r: Option<AppRecord>| {
            let mut r = r.unwrap_or_else(|| rec.clone());
            r.spec.instances = Some(n);
            Ok(r)
        })
        .await
        .map_err(store_err)?;
    Ok((gained, removed))
}
