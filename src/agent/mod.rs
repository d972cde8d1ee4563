//! `flotilla agent`: one per host. Forks and supervises workers, relays their messages,
//! lifecycle events and log lines to NATS, heartbeats, and answers `pmctl.agent.<host>.*`.
//!
//! Shape: [`run`] connects, starts the relay publisher, the supervisor (which owns the process
//! table), the control server, the heartbeat and the drop reporter, then waits for `shutdown`.
//! On shutdown it stops taking commands, stops every worker gracefully (their events are
//! published), drains the relay queue, flushes NATS and returns. docs/ARCHITECTURE.md has the
//! whole picture.

pub mod control;
pub mod converge;
pub mod ipc;
pub mod local;
pub mod policy;
pub mod publisher;
pub mod relay;
pub use crate::protocol::signals;
pub mod sockets;
pub mod spawn;
pub mod stats;
pub mod supervisor;
pub mod tail;
pub mod watch;
pub mod worker;

use crate::bus::{self, BusError};
use crate::config::Settings;
use crate::protocol::envelope::now_ms;
use crate::protocol::event::HostEventKind;
use crate::protocol::fleet::{Heartbeat, HostEvent};
use crate::protocol::state::{self, Assignment};
use crate::protocol::{HostId, Subjects};
use publisher::{Outgoing, Relay};
use relay::RelayHub;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use supervisor::{SupervisorConfig, SupervisorHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Longest the agent waits at shutdown for queued messages to reach NATS.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Settings are invalid.
    #[error("{0}")]
    Settings(String),
    /// NATS could not be reached or refused us.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Subscribing to the control subjects failed.
    #[error("cannot subscribe to the control subjects: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// Runs the agent until `shutdown` resolves, then stops every worker and returns.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let host = HostId::new(&settings.host_id).map_err(|e| AgentError::Settings(e.to_string()))?;
    let subjects =
        Subjects::new(&settings.subject_prefix).map_err(|e| AgentError::Settings(e.to_string()))?;
    let cancel = CancellationToken::new();
    tokio::pin!(shutdown);

    // The relay, the supervisor and the workers of the local copy of the assignment start
    // before NATS is reached: a NATS outage at agent start never keeps workers down. Their
    // messages queue (and, past `relay.max_wait`, are dropped and counted) until it is.
    let (client_tx, client_rx) = tokio::sync::oneshot::channel::<async_nats::Client>();
    let relay_tasks = TaskTracker::new();
    let relay = Relay::start(
        async move { client_rx.await.ok() },
        publisher::QueueLimits {
            messages: settings.relay.buffer,
            bytes: settings.relay.buffer_bytes,
            max_wait: settings.relay.max_wait,
        },
        &relay_tasks,
    );
    relay.set_max_message(
        settings
            .relay
            .max_message
            .unwrap_or(publisher::DEFAULT_MAX_MESSAGE),
    );
    let hub = Arc::new(RelayHub::new(relay.clone(), subjects.clone()));
    let tasks = TaskTracker::new();
    let sup = supervisor::start(SupervisorConfig {
        host: host.to_string(),
        hub: hub.clone(),
        log_dir: settings.log_dir(),
        tracker: tasks.clone(),
        cancel: cancel.clone(),
    });
    match local::load(&local::path(&settings.home)) {
        Ok(Some(a)) => {
            tracing::info!("starting the workers of the local copy of the assignment");
            sup.converge(a).await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}"),
    }

    let client_name = format!("flotilla-agent-{host}");
    let connected = tokio::select! {
        c = bus::connect_with_retry(&settings, &client_name, &cancel) => Some(c),
        _ = &mut shutdown => None,
    };
    let client = match connected {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            drop(client_tx); // the publisher learns that no client will come
            stop_workers(&sup).await;
            finish(cancel, sup, tasks, &hub, || {}).await;
            drop(hub);
            drain(relay, relay_tasks).await;
            return Err(e.into());
        }
        None => {
            tracing::info!("stopped before NATS was reachable");
            drop(client_tx); // the publisher learns that no client will come
            stop_workers(&sup).await;
            finish(cancel, sup, tasks, &hub, || {}).await;
            drop(hub);
            drain(relay, relay_tasks).await;
            return Ok(());
        }
    };
    let server_max = client.server_info().max_payload.max(1024);
    let max_message = settings
        .relay
        .max_message
        .map_or(server_max, |m| m.min(server_max));
    relay.set_max_message(max_message);
    let _ = client_tx.send(client.clone());
    tracing::info!(
        host = %host,
        url = settings.nats_url(),
        max_message,
        "agent connected"
    );

    let ctl_cancel = cancel.child_token();
    if let Err(e) = control::serve(
        client.clone(),
        subjects.clone(),
        host.clone(),
        sup.clone(),
        ctl_cancel.clone(),
        tasks.clone(),
    )
    .await
    {
        stop_workers(&sup).await;
        finish(cancel, sup, tasks, &hub, || {}).await;
        drop(hub);
        drain(relay, relay_tasks).await;
        return Err(e.into());
    }
    tasks.spawn(follow_assignment(
        client.clone(),
        host.clone(),
        settings.home.clone(),
        sup.clone(),
        cancel.clone(),
    ));
    host_event(&relay, &subjects, &host, &settings, HostEventKind::Online);
    tasks.spawn(heartbeats(
        relay.clone(),
        hub.clone(),
        sup.clone(),
        subjects.clone(),
        host.clone(),
        settings.clone(),
        cancel.clone(),
    ));

    shutdown.await;
    tracing::info!("shutting down: no new commands; stopping workers");
    ctl_cancel.cancel();
    stop_workers(&sup).await;
    let goodbye = || host_event(&relay, &subjects, &host, &settings, HostEventKind::Offline);
    finish(cancel, sup, tasks, &hub, goodbye).await;
    drop(hub);
    drain(relay, relay_tasks).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!("agent stopped");
    Ok(())
}

/// After the workers have stopped: ends the agent's tasks, queues the last drop and fault
/// reports, then `goodbye` (the `offline` host event).
async fn finish(
    cancel: CancellationToken,
    sup: SupervisorHandle,
    tasks: TaskTracker,
    hub: &RelayHub,
    goodbye: impl FnOnce(),
) {
    tracing::debug!("workers stopped; ending the agent's tasks");
    cancel.cancel();
    drop(sup);
    tasks.close();
    tasks.wait().await;
    hub.report_drops();
    hub.flush_errors();
    goodbye();
}

/// Lets the relay drain to NATS, bounded by [`DRAIN_TIMEOUT`].
async fn drain(relay: Relay, relay_tasks: TaskTracker) {
    tracing::debug!("draining the relay queue");
    drop(relay);
    relay_tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, relay_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "NATS did not take the last queued messages within {DRAIN_TIMEOUT:?}; they are lost"
        );
    }
}

async fn stop_workers(sup: &SupervisorHandle) {
    sup.shutdown().await;
}

fn host_event(
    relay: &Relay,
    subjects: &Subjects,
    host: &HostId,
    settings: &Settings,
    event: HostEventKind,
) {
    let id = Uuid::new_v4();
    let ev = HostEvent {
        at: now_ms(),
        id,
        host: host.to_string(),
        event,
        version: env!("CARGO_PKG_VERSION").into(),
        labels: settings.labels.clone(),
    };
    let _ = relay.send_event(Outgoing::new(
        subjects.host_event(host),
        id,
        serde_json::to_vec(&ev)
            .expect("host events serialise")
            .into(),
    ));
}

async fn heartbeats(
    relay: Relay,
    hub: Arc<RelayHub>,
    sup: SupervisorHandle,
    subjects: Subjects,
    host: HostId,
    settings: Settings,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut meter = stats::CpuMeter::default();
    let mut trim = Trim::default();
    let subject = subjects.heartbeat(&host);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        hub.flush_errors();
        if relay.drops_reportable() {
            hub.report_drops();
        }
        trim.after_burst(&relay);
        let Some(summary) = sup.summary().await else {
            return;
        };
        meter.update(0);
        let h = stats::host();
        let id = Uuid::new_v4();
        let hb = Heartbeat {
            at: now_ms(),
            id,
            host: host.to_string(),
            labels: settings.labels.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            processes: summary.processes,
            online: summary.online,
            cpu: meter.cpu,
            memory: meter.memory,
            workers_memory: summary.workers_memory,
            load1: h.load1,
            cpus: h.cpus,
            mem_total: h.mem_total,
            mem_available: h.mem_available,
            counters: hub.counters(),
            dropped_by_process: summary.dropped_by_process,
        };
        let _ = relay.send_event(Outgoing::new(
            subject.clone(),
            id,
            serde_json::to_vec(&hb)
                .expect("heartbeats serialise")
                .into(),
        ));
    }
}

/// Follows `assign.<host>` in KV, saving each new assignment locally (atomically) before
/// applying it. (The local copy itself is applied at start, before NATS is reached.)
async fn follow_assignment(
    client: async_nats::Client,
    host: HostId,
    home: std::path::PathBuf,
    sup: SupervisorHandle,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    let file = local::path(&home);
    let store = match bus::store::Store::open(client, state::BUCKET).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{e}; this agent runs only what it is asked directly");
            return;
        }
    };
    let key = state::assignment_key(&host);
    let mut updates = match store.watch::<Assignment>(&key).await {
        Ok(w) => Box::pin(w),
        Err(e) => {
            tracing::warn!("{e}; this agent runs only what it is asked directly");
            return;
        }
    };
    loop {
        let next = tokio::select! {
            n = updates.next() => n,
            _ = cancel.cancelled() => return,
        };
        // Only the newest of the updates already here counts: the states in between are
        // history, and applying them could start what a later one removes.
        let mut next = next;
        while let Some(Some(newer)) = futures::FutureExt::now_or_never(updates.next()) {
            match newer {
                Ok(v) => next = Some(Ok(v)),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let a = match next {
            Some(Ok(Some(a))) => a,
            Some(Ok(None)) => Assignment {
                host: host.to_string(),
                apps: vec![],
            },
            Some(Err(e)) => {
                tracing::warn!("{e}");
                continue;
            }
            None => {
                tracing::warn!("the watch on {key} ended; running workers are kept");
                return;
            }
        };
        if let Err(e) = local::save(&file, &a) {
            tracing::warn!("could not keep the local copy of the assignment: {e}");
        }
        sup.converge(a).await;
    }
}

/// Gives memory back to the OS after a burst: the allocator keeps freed envelopes otherwise,
/// and the agent's RSS would stay at its peak (BENCHMARKS.md). It trims at a heartbeat that
/// finds the queue empty after a busy spell, and again at the first quiet one after that.
#[derive(Default)]
struct Trim {
    relayed_at_last_tick: u64,
    relayed_at_last_trim: u64,
}

impl Trim {
    /// Messages relayed since the last trim that make another one worth it (a few MB).
    const AFTER: u64 = 4096;
    /// At most this many messages between two heartbeats count as quiet.
    const QUIET: u64 = 64;

    fn after_burst(&mut self, relay: &Relay) {
        let relayed = relay.stats().relayed;
        let empty = relay.queued() == 0;
        let quiet = empty && relayed - self.relayed_at_last_tick <= Self::QUIET;
        let since_trim = relayed - self.relayed_at_last_trim;
        self.relayed_at_last_tick = relayed;
        // Empty after a lot, or quiet after more than a little (the tail of a burst that a
        // trim in its middle left behind).
        if (empty && since_trim >= Self::AFTER) || (quiet && since_trim > Self::QUIET) {
            self.relayed_at_last_trim = relayed;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only asks glibc to release free heap pages; no pointers are
            // involved and it is safe to call at any time from any thread.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}
