//! `flotilla controller` (issue 4, in progress): desired state in JetStream KV, placement, the
//! fleet view and the API the CLI calls on `pmctl.api.<verb>`. Desired-state writes go through
//! [`crate::bus::store::Store`] (compare-and-set), which agents use too, to watch their
//! assignment. So far the API answers `start` (allocate pm_ids, place, write assignments) and
//! `ls` (ask every live agent); the rest of the pm2 verbs come next.

pub mod ids;
pub mod placement;

use crate::bus::{self, BusError, store::Store};
use crate::config::Settings;
use crate::protocol::control::{Change, ControlError, ErrorKind, Reply, TargetRequest};
use crate::protocol::fleet::Heartbeat;
use crate::protocol::state::{self, ApiStartRequest, AssignedApp, Assignment};
use crate::protocol::subjects::{HostId, Parsed};
use crate::protocol::{AppKey, Subjects};
use futures::StreamExt;
use placement::Candidate;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use uuid::Uuid;

/// The controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Settings are invalid.
    #[error("{0}")]
    Settings(String),
    /// NATS could not be reached or refused us.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The desired-state bucket could not be opened.
    #[error(transparent)]
    Store(#[from] bus::store::StoreError),
    /// Subscribing failed.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// What the controller knows of a host from its heartbeats.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    labels: BTreeMap<String, String>,
    processes: u32,
}

type Fleet = Arc<Mutex<BTreeMap<String, Seen>>>;

struct Ctx {
    client: async_nats::Client,
    subjects: Subjects,
    store: Store,
    fleet: Fleet,
    lost_after: std::time::Duration,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    run_ready(settings, shutdown, None).await
}

/// Same as [`run`]; `ready` is told once the API is subscribed (the local stack's daemon waits
/// for it before it reports itself ready).
pub async fn run_ready(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), ControllerError> {
    let subjects = Subjects::new(&settings.subject_prefix)
        .map_err(|e| ControllerError::Settings(e.to_string()))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let client = bus::connect_with_retry(&settings, "flotilla-controller", &cancel).await?;
    let store = Store::open(client.clone(), state::BUCKET).await?;
    let fleet: Fleet = Arc::default();
    let mut beats = client
        .subscribe(format!("{}._fleet.*.host:heartbeat", subjects.prefix()))
        .await?;
    let mut api = client.subscribe(subjects.api("*")).await?;
    let _ = client.flush().await;
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        subjects,
        store,
        fleet: fleet.clone(),
        lost_after: settings.host_lost_after,
    });
    let tasks = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(m) = beats.next() => {
                if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&m.payload) {
                    fleet.lock().unwrap_or_else(|p| p.into_inner()).insert(
                        hb.host.clone(),
                        Seen { at: Instant::now(), labels: hb.labels, processes: hb.processes },
                    );
                }
            }
            Some(m) = api.next() => {
                let ctx = ctx.clone();
                tasks.spawn(async move { handle(&ctx, m).await });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(api);
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait()).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await;
    Ok(())
}

/// Hosts heard from within `host_lost_after`.
fn live(ctx: &Ctx) -> Vec<Candidate> {
    let now = Instant::now();
    ctx.fleet
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, s)| now.duration_since(s.at) < ctx.lost_after)
        .map(|(h, s)| Candidate {
            host: h.clone(),
            labels: s.labels.clone(),
            load: s.processes,
        })
        .collect()
}

async fn handle(ctx: &Ctx, msg: async_nats::Message) {
    let Some(reply_to) = msg.reply.clone() else {
        return;
    };
    let verb = match ctx.subjects.parse(&msg.subject) {
        Some(Parsed::Api { verb }) => verb.to_string(),
        _ => return,
    };
    let reply = match verb.as_str() {
        "start" => match serde_json::from_slice::<ApiStartRequest>(&msg.payload) {
            Ok(r) => start(ctx, r).await,
            Err(e) => Reply::err(
                None,
                "controller",
                bad(format!("malformed 'start' request: {e}")),
            ),
        },
        "ls" => match serde_json::from_slice::<TargetRequest>(&msg.payload) {
            Ok(r) => ls(ctx, r).await,
            Err(e) => Reply::err(
                None,
                "controller",
                bad(format!("malformed 'ls' request: {e}")),
            ),
        },
        other => Reply::err(
            None,
            "controller",
            ControlError::new(
                ErrorKind::UnknownVerb,
                format!("unknown verb '{other}': the controller answers start, ls"),
            ),
        ),
    };
    let bytes = serde_json::to_vec(&reply).expect("replies always serialise");
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        ctx.client.publish(reply_to, bytes.into()),
    )
    .await;
}

fn bad(m: String) -> ControlError {
    ControlError::new(ErrorKind::BadRequest, m)
}

fn store_err(e: bus::store::StoreError) -> ControlError {
    ControlError::new(ErrorKind::Internal, e.to_string())
}

async fn start(ctx: &Ctx, r: ApiStartRequest) -> Reply {
    let id = Some(r.request_id);
    let res: Result<Reply, ControlError> = async {
        let mut spec = r.app;
        let app = AppKey::new(&spec.namespace, &spec.name)?;
        let n = spec.instances.unwrap_or(1);
        if n == 0 {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                "instances must be at least 1 (the CLI turns 0 and 'max' into a count)",
            ));
        }
        let candidates = live(ctx);
        if !r.force {
            for c in &candidates {
                let key = state::assignment_key(&HostId::new(&c.host)?);
                if let Some((a, _)) = ctx.store.get::<Assignment>(&key).await.map_err(store_err)?
                    && a.apps.iter().any(|x| x.key().as_ref() == Some(&app))
                {
                    return Err(ControlError::new(
                        ErrorKind::AlreadyRunning,
                        format!(
                            "{app} already exists (on {}): restart it, or force a second copy",
                            c.host
                        ),
                    ));
                }
            }
        }
        let placed = placement::place(n, &candidates, &r.hosts, &r.labels)
            .map_err(|e| ControlError::new(ErrorKind::NotFound, e.to_string()))?;
        let ids = ids::allocate(&ctx.store, n).await.map_err(store_err)?;
        spec.app_id = Some(spec.app_id.unwrap_or_else(Uuid::new_v4));
        let mut reply = Reply::ok(Some(r.request_id), "controller");
        let mut ids = ids.into_iter();
        for (host, count) in placed {
            let mut s = spec.clone();
            s.pm_ids = ids.by_ref().take(count as usize).collect();
            s.instances = Some(count);
            let key = state::assignment_key(&HostId::new(&host)?);
            let entry = AssignedApp {
                spec: s.clone(),
                running: true,
            };
            let h = host.clone();
            ctx.store
                .update(&key, move |a: Option<Assignment>| {
                    let mut a = a.unwrap_or(Assignment {
                        host: h.clone(),
                        apps: vec![],
                    });
                    a.apps.push(entry.clone());
                    Ok(a)
                })
                .await
                .map_err(store_err)?;
            for pm_id in s.pm_ids {
                reply.changes.push(Change {
                    pm_id,
                    what: format!("assigned to {host}"),
                });
            }
        }
        Ok(reply)
    }
    .await;
    res.unwrap_or_else(|e| Reply::err(id, "controller", e))
}

async fn ls(ctx: &Ctx, r: TargetRequest) -> Reply {
    let mut reply = Reply::ok(Some(r.request_id), "controller");
    let mut silent = vec![];
    for c in live(ctx) {
        let Ok(host) = HostId::new(&c.host) else {
            continue;
        };
        let body = serde_json::to_vec(&TargetRequest {
            request_id: Uuid::new_v4(),
            target: r.target.clone(),
        })
        .expect("requests always serialise");
        let asked = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            ctx.client
                .request(ctx.subjects.agent_verb(&host, "list"), body.into()),
        )
        .await;
        match asked {
            Ok(Ok(m)) => match serde_json::from_slice::<Reply>(&m.payload) {
                Ok(x) => reply.processes.extend(x.processes),
                Err(_) => silent.push(c.host.clone()),
            },
            _ => silent.push(c.host.clone()),
        }
    }
    reply.processes.sort_by_key(|p| p.meta.pm_id);
    if !silent.is_empty() {
        reply.error = Some(ControlError::new(
            ErrorKind::Other,
            format!(
                "no answer within 2 s from {}: their processes are missing",
                silent.join(", ")
            ),
        ));
    }
    reply
}
