//! `flotilla controller`: desired state in JetStream KV, placement, the fleet view and the API
//! the CLI calls on `pmctl.api.<verb>`.
//!
//! Every change of the desired state is written first (compare-and-set, through
//! [`crate::bus::store::Store`]), then carried out by asking the agents concerned directly, so
//! the reply says what actually happened; agents also converge to their assignment by
//! themselves, so a lost request or an agent that was away changes nothing in the end. Reads
//! (`ls`, `describe`, `logs`) ask the agents. Requests are deduplicated by request id.
//!
//! This file is the run loop: it records what the fleet says into [`fleet`] and serves the API
//! through [`crate::bus::serve`] into [`dispatch`]. The verbs are in `verbs/`, their pure
//! planning in [`plan`], the desired-state queries in [`desired`], the agent fan-out in [`agents`].

pub(crate) mod agents;
pub(crate) mod desired;
pub(crate) mod dispatch;
pub(crate) mod fleet;
pub mod ids;
pub mod placement;
pub(crate) mod plan;
pub(crate) mod verbs;

use crate::bus::serve::Server;
use crate::bus::{self, BusError, store::Store};
use crate::config::Settings;
use crate::protocol::control::{Target, TargetRequest};
use crate::protocol::fleet::{Heartbeat, HostEvent};
use crate::protocol::{AppKey, Envelope, Subjects, state};
use fleet::Fleet;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The queue group controllers share the API in.
pub const QUEUE_GROUP: &str = "flotilla-controllers";

/// Who the controller's replies come from.
pub(crate) const CTL: &str = "controller";

/// API requests handled at once. A verb may wait a minute for its agents (a graceful stop, a
/// rolling reload); up to this many run side by side (verbs on one app still take turns, see
/// [`Ctx::lock_apps`]), past it the controller stops reading and NATS holds the rest. The same
/// bound as an agent's: each request is one task and a handful of agent requests.
const CONCURRENT: usize = 64;

/// How long placement waits for a first host when the controller knows none yet.
pub(crate) const HOSTS_WAIT: Duration = Duration::from_secs(3);

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

/// What every API handler gets.
pub(crate) struct Ctx {
    /// For asking agents.
    client: async_nats::Client,
    /// The agents' subjects.
    subjects: Subjects,
    /// The desired state.
    store: Store,
    /// Hosts and processes as heard.
    fleet: Fleet,
    /// One lock per app: the verbs that change an app run one at a time for it (their plans
    /// read the desired state, then write it).
    app_locks: Mutex<BTreeMap<AppKey, Arc<tokio::sync::Mutex<()>>>>,
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
    let cancel = CancellationToken::new();
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let client = bus::connect_with_retry_notifying(
        &settings,
        "flotilla-controller",
        &cancel,
        Some(connected_tx),
    )
    .await?;
    let mut connections = 0u64;
    let store = Store::open(client.clone(), state::BUCKET).await?;
    let mut beats = client.subscribe(subjects.all_heartbeats()).await?;
    let mut host_events = client.subscribe(subjects.all_host_events()).await?;
    let mut lifecycle = client.subscribe(subjects.all_process_events()).await?;
    // Several controllers share the API as a queue group: each request reaches one of them
    // (their writes stay consistent through compare-and-set). `info` goes to all.
    let api = client
        .queue_subscribe(subjects.api("*"), QUEUE_GROUP.to_string())
        .await?;
    let all = client.subscribe(subjects.controllers("*")).await?;
    let _ = client.flush().await;
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        subjects: subjects.clone(),
        store,
        fleet: Fleet::new(settings.host_lost_after),
        app_locks: Mutex::default(),
    });
    let tasks = TaskTracker::new();
    // The process view, rebuilt from the agents' lists (an `ls` records what it hears).
    tasks.spawn({
        let ctx = ctx.clone();
        async move { verbs::reads::ls(&ctx, TargetRequest::new(Target::All)).await }
    });
    let handler = {
        let ctx = ctx.clone();
        move |verb: String, body: bytes::Bytes| {
            let ctx = ctx.clone();
            async move { dispatch::dispatch(&ctx, &verb, &body).await }
        }
    };
    Server::new(client.clone(), subjects, CTL, CONCURRENT).spawn(
        futures::stream::select(api, all),
        handler,
        cancel.clone(),
        &tasks,
    );
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(m) = beats.next() => match serde_json::from_slice::<Heartbeat>(&m.payload) {
                Ok(beat) => ctx.fleet.heartbeat(beat),
                Err(e) => tracing::debug!(subject = %m.subject, "not a heartbeat: {e}"),
            },
            Some(m) = lifecycle.next() => {
                if let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) {
                    ctx.fleet.process_event(env);
                }
            }
            Some(m) = host_events.next() => match serde_json::from_slice::<HostEvent>(&m.payload) {
                Ok(ev) => ctx.fleet.host_event(ev),
                Err(e) => tracing::debug!(subject = %m.subject, "not a host event: {e}"),
            },
            // Each (re)connection, the first included: read only once the API is subscribed
            // (above), and published after the client sent its subscriptions again.
            Some(()) = connected.recv() => {
                connections += 1;
                let me = verbs::reads::info(&ctx, None).controller;
                let body = serde_json::json!({ "controller": me, "connection": connections });
                if let Err(e) = client
                    .publish(ctx.subjects.controller_serving(), body.to_string().into())
                    .await
                {
                    tracing::debug!("cannot announce serving: {e}");
                }
            }
            _ = &mut shutdown => break,
        }
    }
    // The API stops taking requests; those in hand get up to 10 s to finish.
    cancel.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

impl Ctx {
    /// Holds the locks of `apps` (taken in order, so two requests never wait on each other).
    async fn lock_apps<'a>(
        &self,
        apps: impl IntoIterator<Item = &'a AppKey>,
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut wanted: Vec<&AppKey> = apps.into_iter().collect();
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
}
