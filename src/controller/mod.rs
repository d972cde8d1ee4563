//! `flotilla controller`: desired state in JetStream KV, placement, the fleet view and the API
//! the CLI calls on `pmctl.api.<verb>`.
//!
//! Every change of the desired state is written first (compare-and-set, through
//! [`crate::bus::store::Store`]), then carried out by asking the agents concerned directly, so
//! the reply says what actually happened; agents also converge to their assignment by
//! themselves, so a lost request or an agent that was away changes nothing in the end. Reads
//! (`ls`, `describe`, `logs`) ask the agents. Requests are deduplicated by request id.

pub mod api;
pub mod ids;
pub mod placement;

use crate::bus::dedupe::Dedupe;
use crate::bus::{self, BusError, store::Store};
use crate::config::Settings;
use crate::protocol::Subjects;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::event::{HostEventKind, ProcessEvent};
use crate::protocol::fleet::{Heartbeat, HostEvent, HostView};
use crate::protocol::reply::Reply;
use crate::protocol::state;
use crate::protocol::subjects::Parsed;
use futures::StreamExt;
use placement::Candidate;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The queue group controllers share the API in.
pub const QUEUE_GROUP: &str = "flotilla-controllers";

/// Replies remembered for repeated request ids.
const REMEMBERED: usize = 4096;

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
    beat: Heartbeat,
}

type Fleet = Arc<Mutex<BTreeMap<String, Seen>>>;

/// What every API handler gets.
pub(crate) struct Ctx {
    client: async_nats::Client,
    subjects: Subjects,
    store: Store,
    fleet: Fleet,
    /// Told whenever a host joins the fleet view.
    joined: tokio::sync::Notify,
    /// Every process as last seen: from `ls` answers and lifecycle events (what `ls` shows for
    /// a host that does not answer).
    procs: Mutex<BTreeMap<(String, u32), crate::protocol::reply::ProcessInfo>>,
    /// One lock per app: the verbs that change an app run one at a time for it (their plans
    /// read the desired state, then write it).
    app_locks: Mutex<BTreeMap<crate::protocol::AppKey, Arc<tokio::sync::Mutex<()>>>>,
    lost_after: Duration,
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
    let mut host_events = client
        .subscribe(format!("{}._fleet.*.host:event", subjects.prefix()))
        .await?;
    let mut lifecycle = client
        .subscribe(format!("{}.*.*.process:event", subjects.prefix()))
        .await?;
    // Several controllers share the API as a queue group: each request reaches one of them
    // (their writes stay consistent through compare-and-set). `info` goes to all.
    let api = client
        .queue_subscribe(subjects.api("*"), QUEUE_GROUP.to_string())
        .await?;
    let all = client.subscribe(subjects.controllers("*")).await?;
    let mut api = futures::stream::select(api, all);
    let _ = client.flush().await;
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        subjects,
        store,
        fleet: fleet.clone(),
        joined: tokio::sync::Notify::new(),
        app_locks: Mutex::default(),
        procs: Mutex::default(),
        lost_after: settings.host_lost_after,
    });
    let dedupe = Arc::new(Dedupe::new(REMEMBERED));
    // The process view, rebuilt from the agents' lists (an `ls` records what it hears).
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = api::dispatch(
                &ctx,
                "ls",
                br#"{"request_id":"00000000-0000-0000-0000-000000000000"}"#,
            )
            .await;
        });
    }
    let tasks = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(m) = beats.next() => {
                match serde_json::from_slice::<Heartbeat>(&m.payload) {
                    Ok(beat) => {
                        let new = fleet.lock().unwrap_or_else(|p| p.into_inner()).insert(
                            beat.host.clone(),
                            Seen { at: Instant::now(), beat },
                        ).is_none();
                        if new {
                            ctx.joined.notify_waiters();
                        }
                    }
                    Err(e) => tracing::debug!(subject = %m.subject, "not a heartbeat: {e}"),
                }
            }
            Some(m) = lifecycle.next() => {
                if let Ok(env) = serde_json::from_slice::<crate::protocol::Envelope>(&m.payload) {
                    ctx.saw_event(env);
                }
            }
            Some(m) = host_events.next() => {
                // An agent says `online` before its first heartbeat: it can be placed on at
                // once (a local stack's first `start` comes right after its agent is up).
                match serde_json::from_slice::<HostEvent>(&m.payload) {
                    Ok(ev) if ev.event == HostEventKind::Online => {
                        let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
                        if !f.contains_key(&ev.host) {
                            f.insert(ev.host.clone(), Seen { at: Instant::now(), beat: Heartbeat {
                                at: ev.at,
                                id: ev.id,
                                host: ev.host.clone(),
                                labels: ev.labels,
                                version: ev.version,
                                processes: 0,
                                online: 0,
                                cpu: 0.0,
                                memory: 0,
                                workers_memory: 0,
                                load1: 0.0,
                                cpus: 0,
                                mem_total: 0,
                                mem_available: 0,
                                counters: Default::default(),
                                dropped_by_process: Default::default(),
                            }});
                            drop(f);
                            ctx.joined.notify_waiters();
                        }
                    }
                    Ok(ev) if ev.event == HostEventKind::Offline => {
                        fleet.lock().unwrap_or_else(|p| p.into_inner()).remove(&ev.host);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(subject = %m.subject, "not a host event: {e}"),
                }
            }
            Some(m) = api.next() => {
                let ctx = ctx.clone();
                let dedupe = dedupe.clone();
                tasks.spawn(async move { handle(&ctx, &dedupe, m).await });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(api);
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

impl Ctx {
    /// Records what a lifecycle event says of a process.
    fn saw_event(&self, env: crate::protocol::Envelope) {
        let key = (env.process.host.clone(), env.process.pm_id);
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        if env
            .event
            .as_ref()
            .is_some_and(|e| e.event == ProcessEvent::Delete)
        {
            procs.remove(&key);
            return;
        }
        match procs.get_mut(&key) {
            Some(p) => p.meta = env.process,
            None => {
                procs.insert(
                    key,
                    crate::protocol::reply::ProcessInfo::from_meta(env.process),
                );
            }
        }
    }

    /// Records the processes a host reported (all of them: the others are gone).
    pub(crate) fn saw_list(&self, host: &str, list: &[crate::protocol::reply::ProcessInfo]) {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs.retain(|(h, _), _| h != host);
        for p in list {
            procs.insert((host.to_string(), p.meta.pm_id), p.clone());
        }
    }

    /// The processes of `host` as last seen.
    pub(crate) fn last_seen(&self, host: &str) -> Vec<crate::protocol::reply::ProcessInfo> {
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|(_, p)| {
                let mut p = p.clone();
                p.cpu = 0.0;
                p.memory = 0;
                p
            })
            .collect()
    }

    /// Holds the locks of `apps` (taken in order, so two requests never wait on each other).
    async fn lock_apps<'a>(
        &self,
        apps: impl IntoIterator<Item = &'a crate::protocol::AppKey>,
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut wanted: Vec<&crate::protocol::AppKey> = apps.into_iter().collect();
        wanted.sort();
        wanted.dedup();
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut m = self.app_locks.lock().unwrap_or_else(|p| p.into_inner());
            wanted
                .into_iter()
                .map(|k| m.entry(k.clone()).or_default().clone())
                .collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for l in locks {
            guards.push(l.lock_owned().await);
        }
        guards
    }

    /// The live hosts; when there are none yet (a controller that just started, before the
    /// first heartbeats), waits up to `within` for one to be heard.
    async fn live_or_wait(&self, within: Duration) -> Vec<Candidate> {
        let deadline = Instant::now() + within;
        loop {
            let joined = self.joined.notified();
            let live = self.live();
            if !live.is_empty() {
                return live;
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return live;
            }
        }
    }

    /// Hosts heard from within `host_lost_after`.
    fn live(&self) -> Vec<Candidate> {
        let now = Instant::now();
        self.fleet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| now.duration_since(s.at) < self.lost_after)
            .map(|(h, s)| Candidate {
                host: h.clone(),
                labels: s.beat.labels.clone(),
                load: s.beat.processes,
            })
            .collect()
    }

    /// Every host heard from since the controller started.
    fn hosts(&self) -> Vec<HostView> {
        let now = Instant::now();
        self.fleet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| {
                let ago = now.duration_since(s.at);
                HostView {
                    host: s.beat.host.clone(),
                    labels: s.beat.labels.clone(),
                    version: s.beat.version.clone(),
                    state: if ago < self.lost_after {
                        "online"
                    } else {
                        "lost"
                    }
                    .into(),
                    last_seen_ms: ago.as_millis() as u64,
                    processes: s.beat.processes,
                    online: s.beat.online,
                    cpus: s.beat.cpus,
                    load1: s.beat.load1,
                    mem_total: s.beat.mem_total,
                    mem_available: s.beat.mem_available,
                    agent_memory: s.beat.memory,
                }
            })
            .collect()
    }
}

async fn handle(ctx: &Ctx, dedupe: &Dedupe, msg: async_nats::Message) {
    let Some(reply_to) = msg.reply.clone() else {
        tracing::warn!(subject = %msg.subject, "API message without a reply subject ignored: use request/reply");
        return;
    };
    let verb = match ctx.subjects.parse(&msg.subject) {
        Some(Parsed::Api { verb }) => verb.to_string(),
        _ => return,
    };
    let id = serde_json::from_slice::<serde_json::Value>(&msg.payload)
        .ok()
        .and_then(|v| v.get("request_id")?.as_str()?.parse::<uuid::Uuid>().ok());
    let work = async { encode(&api::dispatch(ctx, &verb, &msg.payload).await) };
    let bytes =
        match id {
            Some(id) => dedupe
                .reply(id, work, || {
                    encode(&Reply::err(
                        Some(id),
                        "controller",
                        ControlError::new(
                            ErrorKind::Internal,
                            "the first copy of this request was lost: retry with a new request id",
                        ),
                    ))
                })
                .await,
            None => work.await,
        };
    if tokio::time::timeout(Duration::from_secs(5), ctx.client.publish(reply_to, bytes))
        .await
        .is_err()
    {
        tracing::warn!("could not send a reply within 5 s: NATS is not taking messages");
    }
}

fn encode(r: &Reply) -> bytes::Bytes {
    serde_json::to_vec(r)
        .expect("replies always serialise")
        .into()
}
