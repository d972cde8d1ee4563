//! The controller's verbs (`pmctl.api.<verb>`). Each change is written to the desired state
//! first, then carried out by asking the agents concerned (with the exact pm_ids), whose replies
//! make ours. The agents' own convergence to the same state makes either order of arrival safe.

use super::{Ctx, ids, placement};
use crate::bus::store::StoreError;
use crate::protocol::api::{ApiRequest, ApiStartRequest, ScaleRequest};
use crate::protocol::app::MAX_INSTANCES;
use crate::protocol::control::{
    LogsRequest, Request, SendRequest, SignalRequest, StartRequest, Target, TargetRequest,
    TargetVerb,
};
use crate::protocol::envelope::now_ms;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{ChangeKind, ControllerInfo, Reply};
use crate::protocol::state::{self, ASSIGN_PREFIX, AppRecord, AssignedApp, Assignment};
use crate::protocol::{AppKey, AppSpec, HostId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;
use uuid::Uuid;

const CTL: &str = "controller";
/// Longest an agent may take to spawn an app's instances.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an agent may take to stop, restart or delete (graceful stops included).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one instance may take to come back online during a reload.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a read (`ls`, `logs`) waits for an agent.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long placement waits for a first host when the controller knows none yet.
const HOSTS_WAIT: Duration = Duration::from_secs(3);

/// Runs one request.
pub(crate) async fn dispatch(ctx: &Ctx, verb: &str, body: &[u8]) -> Reply {
    let req = match ApiRequest::parse(verb, body) {
        Ok(req) => req,
        // The id, when the body has one, so the caller can match the error to its request.
        Err(e) => return Reply::err(lenient_request_id(body), CTL, e),
    };
    let id = req.request_id();
    let res = match req {
        ApiRequest::Start(r) => start(ctx, *r).await,
        ApiRequest::Scale(r) => scale(ctx, r).await,
        ApiRequest::Targeted(verb, r) => targeted(ctx, verb, r).await,
        ApiRequest::Ls(r) => Ok(ls(ctx, r).await),
        ApiRequest::Send(r) => send(ctx, r).await,
        ApiRequest::Signal(r) => signal(ctx, r).await,
        ApiRequest::Logs(r) => logs(ctx, r).await,
        ApiRequest::Info(_) => Ok(info(ctx, id)),
    };
    res.unwrap_or_else(|e| Reply::err(id, CTL, e))
}

/// The `request_id` of a body that is not a valid request, if it has one.
fn lenient_request_id(body: &[u8]) -> Option<Uuid> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("request_id")?.as_str()?.parse::<Uuid>().ok())
}

fn store_err(e: StoreError) -> ControlError {
    ControlError::new(ErrorKind::Internal, e.to_string())
}

fn info(ctx: &Ctx, id: Option<Uuid>) -> Reply {
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
    r.hosts = ctx.hosts();
    r.controller = Some(me.clone());
    r
}

// ---- the desired state, as the verbs need it ----

/// Every host's assignment.
async fn desired(ctx: &Ctx) -> Result<BTreeMap<String, Assignment>, ControlError> {
    let mut out = BTreeMap::new();
    for key in ctx.store.keys(ASSIGN_PREFIX).await.map_err(store_err)? {
        if let Some((a, _)) = ctx.store.get::<Assignment>(&key).await.map_err(store_err)? {
            let host = key.trim_start_matches(ASSIGN_PREFIX).to_string();
            out.insert(host, a);
        }
    }
    Ok(out)
}

fn matches(target: &Target, spec: &AppSpec, pm_id: u32) -> bool {
    match target {
        Target::All => true,
        Target::Id(id) => *id == pm_id,
        Target::Name { namespace, name } => {
            spec.name == *name && namespace.as_deref().is_none_or(|ns| spec.namespace == ns)
        }
    }
}

/// The pm_ids `target` names, per host.
fn select(desired: &BTreeMap<String, Assignment>, target: &Target) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (host, a) in desired {
        for app in &a.apps {
            for &id in &app.spec.pm_ids {
                if matches(target, &app.spec, id) {
                    out.entry(host.clone()).or_default().push(id);
                }
            }
        }
    }
    out
}

/// The apps `target` names.
fn apps_of(desired: &BTreeMap<String, Assignment>, target: &Target) -> BTreeSet<AppKey> {
    desired
        .values()
        .flat_map(|a| &a.apps)
        .filter(|app| {
            app.spec
                .pm_ids
                .iter()
                .any(|&id| matches(target, &app.spec, id))
        })
        .filter_map(AssignedApp::key)
        .collect()
}

/// One instance of an app where it is placed.
#[derive(Debug, Clone)]
struct Slot {
    host: String,
    pm_id: u32,
    number: u32,
    running: bool,
}

fn slots(desired: &BTreeMap<String, Assignment>, app: &AppKey) -> Vec<Slot> {
    let mut out = vec![];
    for (host, a) in desired {
        for entry in a.apps.iter().filter(|e| e.key().as_ref() == Some(app)) {
            for (pm_id, number) in entry.instances() {
                out.push(Slot {
                    host: host.clone(),
                    pm_id,
                    number,
                    running: entry.wants_running(pm_id),
                });
            }
        }
    }
    out
}

fn not_found(target: &Target) -> ControlError {
    ControlError::new(
        ErrorKind::NotFound,
        format!("no app or process matches '{target}' in the fleet: `flotilla ls` lists them"),
    )
}

/// Edits one host's assignment by compare-and-set; `f` must be pure (it may run again).
async fn edit_host(
    ctx: &Ctx,
    host: &str,
    mut f: impl FnMut(&mut Assignment),
) -> Result<Assignment, ControlError> {
    let key = state::assignment_key(&HostId::new(host)?);
    let (a, _) = ctx
        .store
        .update(&key, |a: Option<Assignment>| {
            let mut a = a.unwrap_or_else(|| Assignment {
                host: host.to_string(),
                apps: vec![],
            });
            f(&mut a);
            a.apps.retain(|e| !e.spec.pm_ids.is_empty());
            Ok(a)
        })
        .await
        .map_err(store_err)?;
    Ok(a)
}

/// The share of `app` that `a` holds, as a start request body for its agent.
fn share(a: &Assignment, app: &AppKey) -> Option<AppSpec> {
    a.apps
        .iter()
        .find(|e| e.key().as_ref() == Some(app))
        .map(|e| {
            let mut spec = e.spec.clone();
            let keep: Vec<(u32, u32)> = e
                .instances()
                .into_iter()
                .filter(|(id, _)| e.wants_running(*id))
                .collect();
            spec.pm_ids = keep.iter().map(|x| x.0).collect();
            spec.instance_numbers = keep.iter().map(|x| x.1).collect();
            spec.instances = Some(keep.len() as u32);
            spec
        })
        .filter(|s| !s.pm_ids.is_empty())
}

// ---- asking agents ----

async fn ask(ctx: &Ctx, host: &str, req: Request, within: Duration) -> Result<Reply, ControlError> {
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

async fn ask_all(
    ctx: &Ctx,
    reqs: Vec<(String, Request)>,
    within: Duration,
) -> Vec<(String, Result<Reply, ControlError>)> {
    let asks = reqs.into_iter().map(|(host, req)| async move {
        let r = ask(ctx, &host, req, within).await;
        (host, r)
    });
    futures::future::join_all(asks).await
}

/// What the replies being merged answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// A delete: `absent` there means deleted all the same.
    Delete,
    /// Anything else, taken as it is.
    AsIs,
}

/// One reply from many: changes, processes and logs together; errors joined.
fn merge(id: Uuid, results: Vec<(String, Result<Reply, ControlError>)>, verb: Merge) -> Reply {
    let mut reply = Reply::ok(Some(id), CTL);
    let mut errors: Vec<ControlError> = vec![];
    for (_, r) in results {
        match r {
            Ok(mut x) => {
                if verb == Merge::Delete {
                    // Already gone there (its convergence got there first): deleted all the same.
                    for c in &mut x.changes {
                        if c.what == ChangeKind::Absent {
                            c.what = ChangeKind::Deleted;
                        }
                    }
                }
                reply.changes.append(&mut x.changes);
                reply.processes.append(&mut x.processes);
                reply.logs.append(&mut x.logs);
                errors.extend(x.error);
            }
            Err(e) => errors.push(e),
        }
    }
    reply.changes.sort_by_key(|c| c.pm_id);
    reply.processes.sort_by_key(|p| p.meta.pm_id);
    reply.error = join_errors(errors);
    reply
}

fn join_errors(mut errors: Vec<ControlError>) -> Option<ControlError> {
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

fn start_req(spec: AppSpec) -> Request {
    StartRequest {
        request_id: Uuid::new_v4(),
        app: spec,
        force: true,
    }
    .into()
}

fn target_req(verb: TargetVerb, target: &Target, pm_ids: Vec<u32>) -> Request {
    verb.request(TargetRequest {
        request_id: Uuid::new_v4(),
        target: target.clone(),
        pm_ids,
        parallel: 1,
    })
}

// ---- the verbs ----

async fn start(ctx: &Ctx, r: ApiStartRequest) -> Result<Reply, ControlError> {
    let mut spec = r.app;
    spec.validate()?;
    let app = AppKey::new(&spec.namespace, &spec.name)?;
    let n = spec.instances.unwrap_or(1);
    for h in &r.hosts {
        HostId::new(h)?;
    }
    let key = state::app_key(&app);
    let _locked = ctx.lock_apps([&app]).await;
    let desired = desired(ctx).await?;
    if let Some((rec, _)) = ctx.store.get::<AppRecord>(&key).await.map_err(store_err)? {
        let placed = slots(&desired, &app);
        let running: Vec<u32> = placed
            .iter()
            .filter(|s| s.running)
            .map(|s| s.pm_id)
            .collect();
        if !running.is_empty() && !r.force {
            return Err(ControlError::new(
                ErrorKind::AlreadyRunning,
                format!(
                    "{app} already runs ({} instance{}, pm_id {}): `flotilla restart {}` restarts it; `flotilla start ... -f` applies new options to it",
                    placed.len(),
                    if placed.len() == 1 { "" } else { "s" },
                    ids_text(&running),
                    app.name()
                ),
            ));
        }
        return apply(
            ctx,
            r.request_id,
            &app,
            rec,
            spec,
            r.hosts,
            r.labels,
            desired,
        )
        .await;
    }
    spec.app_id = Some(spec.app_id.unwrap_or_else(Uuid::new_v4));
    let placed = placement::place(n, &ctx.live_or_wait(HOSTS_WAIT).await, &r.hosts, &r.labels)
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
            let _ = remove(ctx, &app, &Target::All).await;
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
    if !refused.is_empty() {
        let undo = remove(ctx, &app, &Target::All).await;
        let mut e = join_errors(refused).expect("not empty");
        e.message.push_str(match undo {
            Ok(()) => ": nothing was started",
            Err(_) => ": the start is being undone",
        });
        return Err(e);
    }
    let mut reply = merge(r.request_id, results, Merge::AsIs);
    for c in &mut reply.changes {
        if c.what == ChangeKind::AlreadyOnline {
            c.what = ChangeKind::Started;
        }
    }
    Ok(reply)
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
    let mut ids = ids.into_iter();
    let mut number = 0u32;
    let mut reqs = vec![];
    for (host, count) in placed {
        let list: Vec<(u32, u32)> = ids
            .by_ref()
            .take(count as usize)
            .zip(number..number + count)
            .collect();
        number += count;
        let mut entry = AssignedApp {
            spec: base.clone(),
            running: true,
            stopped: BTreeSet::new(),
        };
        entry.set_instances(&list);
        let spec = entry.spec.clone();
        edit_host(ctx, &host, |a| {
            a.apps.retain(|e| e.key().as_ref() != Some(app));
            a.apps.push(entry.clone());
        })
        .await?;
        reqs.push((host, start_req(spec)));
    }
    Ok(reqs)
}

fn ids_text(ids: &[u32]) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Applies a new spec to an existing app (pm2 `-f`, an ecosystem file, or `start` of a stopped
/// app): every instance gets the new options (agents restart those whose options changed and
/// start those that were stopped), then the app is scaled to the new count.
#[allow(clippy::too_many_arguments)]
async fn apply(
    ctx: &Ctx,
    id: Uuid,
    app: &AppKey,
    mut rec: AppRecord,
    spec: AppSpec,
    hosts: Vec<String>,
    labels: BTreeMap<String, String>,
    desired: BTreeMap<String, Assignment>,
) -> Result<Reply, ControlError> {
    // No count given (`start app.js -f`, an ecosystem without `instances`): keep the current one.
    let n = spec
        .instances
        .unwrap_or_else(|| (slots(&desired, app).len() as u32).max(1));
    let mut base = spec;
    base.app_id = rec.spec.app_id;
    base.pm_ids.clear();
    base.instance_numbers.clear();
    base.instances = Some(n);
    rec.spec = base.clone();
    if !hosts.is_empty() {
        rec.hosts = hosts;
    }
    if !labels.is_empty() {
        rec.labels = labels;
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
    let (_, removed) = rescale(ctx, app, &rec, n, &desired).await?;
    let desired = self::desired(ctx).await?;
    for host in desired.keys() {
        if slots(&desired, app).iter().any(|s| &s.host == host) {
            edit_host(ctx, host, |a| {
                for e in a.apps.iter_mut().filter(|e| e.key().as_ref() == Some(app)) {
                    let list = e.instances();
                    e.spec = base.clone();
                    e.set_instances(&list);
                    e.running = true;
                    e.stopped.clear();
                }
            })
            .await?;
        }
    }
    let mut reqs = vec![];
    for (host, ids) in removed {
        reqs.push((host, target_req(TargetVerb::Delete, &Target::All, ids)));
    }
    let results = ask_all(ctx, reqs, SETTLE_TIMEOUT).await;
    let mut reply = merge(id, results, Merge::Delete);
    let desired = self::desired(ctx).await?;
    let reqs: Vec<(String, Request)> = desired
        .iter()
        .filter_map(|(h, a)| share(a, app).map(|s| (h.clone(), start_req(s))))
        .collect();
    let started = merge(id, ask_all(ctx, reqs, START_TIMEOUT).await, Merge::AsIs);
    reply.changes.extend(started.changes);
    reply.processes.extend(started.processes);
    reply.error = join_errors(reply.error.into_iter().chain(started.error).collect());
    reply.changes.sort_by_key(|c| c.pm_id);
    Ok(reply)
}

/// Sets `app`'s instance count to `n` in the desired state: new instances are placed over the
/// live hosts (fewest of this app first), surplus ones go, highest instance numbers first.
/// Returns the assignments that gained instances and the pm_ids removed, per host.
async fn rescale(
    ctx: &Ctx,
    app: &AppKey,
    rec: &AppRecord,
    n: u32,
    desired: &BTreeMap<String, Assignment>,
) -> Result<(BTreeMap<String, Assignment>, BTreeMap<String, Vec<u32>>), ControlError> {
    let placed = slots(desired, app);
    let cur = placed.len() as u32;
    let mut gained = BTreeMap::new();
    let mut removed: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    if n > cur {
        let mut current: BTreeMap<String, u32> = BTreeMap::new();
        for s in &placed {
            *current.entry(s.host.clone()).or_default() += 1;
        }
        let more = placement::add(
            n - cur,
            &ctx.live_or_wait(HOSTS_WAIT).await,
            &current,
            &rec.hosts,
            &rec.labels,
        )
        .map_err(|e| ControlError::new(ErrorKind::NotFound, e.to_string()))?;
        let used: BTreeSet<u32> = placed.iter().map(|s| s.number).collect();
        let mut numbers = (0u32..).filter(|x| !used.contains(x));
        let mut ids = ids::allocate(&ctx.store, n - cur)
            .await
            .map_err(store_err)?
            .into_iter();
        for (host, count) in more {
            let list: Vec<(u32, u32)> = ids
                .by_ref()
                .zip(numbers.by_ref())
                .take(count as usize)
                .collect();
            let base = rec.spec.clone();
            let a = edit_host(ctx, &host, |a| {
                match a.apps.iter_mut().find(|e| e.key().as_ref() == Some(app)) {
                    Some(e) => {
                        let mut all = e.instances();
                        all.retain(|x| !list.contains(x));
                        all.extend(list.iter().copied());
                        e.set_instances(&all);
                    }
                    None => {
                        let mut e = AssignedApp {
                            spec: base.clone(),
                            running: true,
                            stopped: BTreeSet::new(),
                        };
                        e.set_instances(&list);
                        a.apps.push(e);
                    }
                }
            })
            .await?;
            gained.insert(host, a);
        }
    } else if n < cur {
        let mut by_number = placed.clone();
        by_number.sort_by_key(|s| std::cmp::Reverse(s.number));
        for s in by_number.into_iter().take((cur - n) as usize) {
            removed.entry(s.host).or_default().push(s.pm_id);
        }
        for (host, gone) in &removed {
            edit_host(ctx, host, |a| {
                for e in a.apps.iter_mut().filter(|e| e.key().as_ref() == Some(app)) {
                    let mut all = e.instances();
                    all.retain(|(id, _)| !gone.contains(id));
                    e.set_instances(&all);
                }
            })
            .await?;
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

async fn scale(ctx: &Ctx, r: ScaleRequest) -> Result<Reply, ControlError> {
    let desired = desired(ctx).await?;
    let apps = apps_of(&desired, &r.app);
    let app = match apps.len() {
        0 => return Err(not_found(&r.app)),
        1 => apps.into_iter().next().expect("one"),
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
    let desired = self::desired(ctx).await?;
    // `+N` / `-N` are resolved here, against the desired state (not what answered an `ls`).
    let instances = match r.change {
        Some(d) => (slots(&desired, &app).len() as i64 + d).clamp(0, i64::from(u32::MAX)) as u32,
        None => r.instances,
    };
    if instances > MAX_INSTANCES {
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            format!("{instances} instances is more than {MAX_INSTANCES}"),
        ));
    }
    if instances == 0 {
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            format!(
                "scale {} to 0 would delete it: `flotilla stop {}` keeps it, `flotilla delete {}` removes it",
                app.name(),
                app.name(),
                app.name()
            ),
        ));
    }
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
    let mut reqs = vec![];
    for (host, a) in &gained {
        if let Some(s) = share(a, &app) {
            reqs.push((host.clone(), start_req(s)));
        }
    }
    let started = merge(
        r.request_id,
        ask_all(ctx, reqs, START_TIMEOUT).await,
        Merge::AsIs,
    );
    let reqs = removed
        .into_iter()
        .map(|(h, ids)| (h, target_req(TargetVerb::Delete, &Target::All, ids)))
        .collect();
    let mut reply = merge(
        r.request_id,
        ask_all(ctx, reqs, SETTLE_TIMEOUT).await,
        Merge::Delete,
    );
    reply.changes.extend(
        started
            .changes
            .into_iter()
            .filter(|c| c.what != ChangeKind::AlreadyOnline),
    );
    reply.processes.extend(started.processes);
    reply.error = join_errors(reply.error.into_iter().chain(started.error).collect());
    reply.changes.sort_by_key(|c| c.pm_id);
    Ok(reply)
}

/// Removes the processes `target` names from `app`'s assignments (and the app record once it
/// has none left), then asks their agents to delete them.
async fn remove(ctx: &Ctx, app: &AppKey, target: &Target) -> Result<(), ControlError> {
    let desired = desired(ctx).await?;
    let mut reqs = vec![];
    for (host, a) in &desired {
        let gone: Vec<u32> = a
            .apps
            .iter()
            .filter(|e| e.key().as_ref() == Some(app))
            .flat_map(|e| {
                e.spec
                    .pm_ids
                    .iter()
                    .copied()
                    .filter(|&id| matches(target, &e.spec, id))
            })
            .collect();
        if gone.is_empty() {
            continue;
        }
        edit_host(ctx, host, |a| {
            for e in a.apps.iter_mut().filter(|e| e.key().as_ref() == Some(app)) {
                let mut all = e.instances();
                all.retain(|(id, _)| !gone.contains(id));
                e.set_instances(&all);
            }
        })
        .await?;
        reqs.push((
            host.clone(),
            target_req(TargetVerb::Delete, &Target::All, gone),
        ));
    }
    forget_if_empty(ctx, app).await?;
    ask_all(ctx, reqs, SETTLE_TIMEOUT).await;
    Ok(())
}

/// Deletes the app record of an app no assignment names any more (assignments first, then the
/// record: a crash in between leaves a record without instances, which `start` replaces).
async fn forget_if_empty(ctx: &Ctx, app: &AppKey) -> Result<(), ControlError> {
    // The record's revision first: a `start -f` that rewrites the record after this read makes
    // the delete fail instead of deleting an app that has instances again.
    let key = state::app_key(app);
    let Some((_, rev)) = ctx
        .store
        .get::<serde_json::Value>(&key)
        .await
        .map_err(store_err)?
    else {
        return Ok(());
    };
    let desired = desired(ctx).await?;
    if !slots(&desired, app).is_empty() {
        return Ok(());
    }
    if let Err(e) = ctx.store.delete_if(&key, rev).await {
        tracing::info!(%app, "app record kept: it changed meanwhile ({e})");
    }
    Ok(())
}

async fn targeted(ctx: &Ctx, verb: TargetVerb, r: TargetRequest) -> Result<Reply, ControlError> {
    let apps = apps_of(&desired(ctx).await?, &r.target);
    let _locked = ctx.lock_apps(&apps).await;
    let desired = desired(ctx).await?;
    let sel = select(&desired, &r.target);
    if sel.is_empty() {
        if r.target == Target::All {
            return Ok(Reply::ok(Some(r.request_id), CTL));
        }
        return Err(not_found(&r.target));
    }
    // Stopped ones are started (idempotently), not restarted: the agent's convergence may
    // start them first, and a restart would then kill the run it just began.
    let was_stopped: BTreeSet<u32> = desired
        .values()
        .flat_map(|a| &a.apps)
        .flat_map(|e| {
            e.spec
                .pm_ids
                .iter()
                .filter(|&&id| !e.wants_running(id))
                .copied()
        })
        .collect();
    let mut after: BTreeMap<String, Assignment> = BTreeMap::new();
    for (host, ids) in &sel {
        let a = edit_host(ctx, host, |a| {
            for e in a.apps.iter_mut() {
                let mine: Vec<u32> = e
                    .spec
                    .pm_ids
                    .iter()
                    .copied()
                    .filter(|id| ids.contains(id))
                    .collect();
                match verb {
                    TargetVerb::Stop => e.stopped.extend(mine),
                    TargetVerb::Restart | TargetVerb::Reload => {
                        for id in mine {
                            e.stopped.remove(&id);
                        }
                    }
                    TargetVerb::Delete => {
                        let mut all = e.instances();
                        all.retain(|(id, _)| !mine.contains(id));
                        e.set_instances(&all);
                    }
                }
            }
        })
        .await?;
        after.insert(host.clone(), a);
    }
    if verb == TargetVerb::Delete {
        for app in &apps {
            forget_if_empty(ctx, app).await?;
        }
    }
    let mut resumed = Reply::ok(Some(r.request_id), CTL);
    let mut sel = sel;
    if matches!(verb, TargetVerb::Restart | TargetVerb::Reload) {
        let mut reqs = vec![];
        for (host, ids) in sel.iter_mut() {
            let back: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|id| was_stopped.contains(id))
                .collect();
            if back.is_empty() {
                continue;
            }
            ids.retain(|id| !back.contains(id));
            for e in after
                .get(host)
                .map(|a| a.apps.as_slice())
                .unwrap_or_default()
            {
                let list: Vec<(u32, u32)> = e
                    .instances()
                    .into_iter()
                    .filter(|(id, _)| back.contains(id))
                    .collect();
                if list.is_empty() {
                    continue;
                }
                let mut share = e.clone();
                share.set_instances(&list);
                reqs.push((host.clone(), start_req(share.spec)));
            }
        }
        sel.retain(|_, ids| !ids.is_empty());
        resumed = merge(
            r.request_id,
            ask_all(ctx, reqs, START_TIMEOUT).await,
            Merge::AsIs,
        );
        let done = if verb == TargetVerb::Reload {
            ChangeKind::Reloaded
        } else {
            ChangeKind::Restarted
        };
        for c in &mut resumed.changes {
            if matches!(c.what, ChangeKind::Started | ChangeKind::AlreadyOnline) {
                c.what = done;
            }
        }
    }
    let mut reply = if verb == TargetVerb::Reload {
        reload(ctx, r, sel).await?
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
    reply.changes.extend(resumed.changes);
    reply.processes.extend(resumed.processes);
    reply.error = join_errors(reply.error.into_iter().chain(resumed.error).collect());
    reply.changes.sort_by_key(|c| c.pm_id);
    reply.processes.sort_by_key(|p| p.meta.pm_id);
    Ok(reply)
}

/// A rolling reload: one instance at a time, in pm_id order, the next only once the previous
/// one is online again (ready, with `wait_ready`).
async fn reload(
    ctx: &Ctx,
    r: TargetRequest,
    sel: BTreeMap<String, Vec<u32>>,
) -> Result<Reply, ControlError> {
    let mut order: Vec<(u32, String)> = sel
        .into_iter()
        .flat_map(|(h, ids)| ids.into_iter().map(move |id| (id, h.clone())))
        .collect();
    order.sort();
    // `--parallel K` instances at a time (pm2's), never more than all but one of them.
    let k = (r.parallel.max(1) as usize).min(order.len().saturating_sub(1).max(1));
    let mut results = vec![];
    for batch in order.chunks(k) {
        let target = &r.target;
        let asks = batch.iter().map(|(id, host)| async move {
            let res = ask(
                ctx,
                host,
                target_req(TargetVerb::Reload, target, vec![*id]),
                RELOAD_TIMEOUT,
            )
            .await;
            (host.clone(), res)
        });
        for (host, res) in futures::future::join_all(asks).await {
            let failed = match &res {
                Ok(x) => {
                    x.error.is_some() || x.changes.iter().any(|c| c.what != ChangeKind::Reloaded)
                }
                Err(_) => true,
            };
            if failed {
                // pm2 goes on with the others; so do we (the reply says which did not come back).
                tracing::warn!(host, "reload of an instance did not come back online");
            }
            results.push((host, res));
        }
    }
    let mut reply = merge(r.request_id, results, Merge::AsIs);
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
    Ok(reply)
}

/// Asks every agent holding processes that `target` names, each request made by `make` from
/// that host's pm_ids; the replies merged. With nothing selected: not found (or an empty reply
/// for `all`, when `empty_ok`).
async fn fan_out(
    ctx: &Ctx,
    id: Uuid,
    target: &Target,
    empty_ok: bool,
    within: Duration,
    make: impl Fn(Vec<u32>) -> Request,
) -> Result<Reply, ControlError> {
    let desired = desired(ctx).await?;
    let sel = select(&desired, target);
    if sel.is_empty() {
        if empty_ok && *target == Target::All {
            return Ok(Reply::ok(Some(id), CTL));
        }
        return Err(not_found(target));
    }
    let reqs = sel.into_iter().map(|(h, ids)| (h, make(ids))).collect();
    Ok(merge(id, ask_all(ctx, reqs, within).await, Merge::AsIs))
}

async fn send(ctx: &Ctx, r: SendRequest) -> Result<Reply, ControlError> {
    fan_out(
        ctx,
        r.request_id,
        &r.target,
        false,
        READ_TIMEOUT * 5,
        |ids| {
            Request::Send(SendRequest {
                request_id: Uuid::new_v4(),
                target: r.target.clone(),
                message: r.message.clone(),
                pm_ids: ids,
            })
        },
    )
    .await
}

async fn signal(ctx: &Ctx, r: SignalRequest) -> Result<Reply, ControlError> {
    crate::protocol::signals::parse(&r.signal)?;
    fan_out(
        ctx,
        r.request_id,
        &r.target,
        false,
        READ_TIMEOUT * 5,
        |ids| {
            Request::Signal(SignalRequest {
                request_id: Uuid::new_v4(),
                target: r.target.clone(),
                signal: r.signal.clone(),
                pm_ids: ids,
            })
        },
    )
    .await
}

async fn logs(ctx: &Ctx, r: LogsRequest) -> Result<Reply, ControlError> {
    let mut reply = fan_out(
        ctx,
        r.request_id,
        &r.target,
        true,
        READ_TIMEOUT * 2,
        |ids| {
            Request::Logs(LogsRequest {
                request_id: Uuid::new_v4(),
                target: r.target.clone(),
                pm_ids: ids,
                lines: r.lines,
            })
        },
    )
    .await?;
    reply
        .logs
        .sort_by(|a, b| (a.pm_id, &a.stream).cmp(&(b.pm_id, &b.stream)));
    Ok(reply)
}

/// Every live agent's processes (so processes started outside the desired state show too),
/// and those of every host the desired state names (a controller that just started has not
/// heard every host yet).
async fn ls(ctx: &Ctx, r: TargetRequest) -> Reply {
    let mut hosts: BTreeSet<String> = ctx.live().into_iter().map(|c| c.host).collect();
    match desired(ctx).await {
        Ok(d) => hosts.extend(
            d.into_iter()
                .filter(|(_, a)| !a.apps.is_empty())
                .map(|(h, _)| h),
        ),
        Err(e) => tracing::warn!("ls without the desired state: {e}"),
    }
    let reqs: Vec<(String, Request)> = hosts
        .into_iter()
        .map(|host| {
            (
                host,
                Request::List(TargetRequest {
                    request_id: Uuid::new_v4(),
                    target: r.target.clone(),
                    pm_ids: vec![],
                    parallel: 1,
                }),
            )
        })
        .collect();
    let results = ask_all(ctx, reqs, READ_TIMEOUT).await;
    let mut reply = Reply::ok(Some(r.request_id), CTL);
    let mut silent = vec![];
    for (host, res) in results {
        match res {
            Ok(mut x) => {
                // "No process matches" on one host is not an error of the fleet.
                if x.error
                    .as_ref()
                    .is_some_and(|e| e.kind != ErrorKind::NotFound)
                {
                    silent.push(format!(
                        "{host} ({})",
                        x.error.as_ref().map_or("", |e| &e.message)
                    ));
                }
                if r.target == Target::All && x.error.is_none() {
                    ctx.saw_list(&host, &x.processes);
                }
                reply.processes.append(&mut x.processes);
            }
            Err(_) => {
                // What it ran when last heard from, without live figures.
                reply.processes.extend(
                    ctx.last_seen(&host)
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
