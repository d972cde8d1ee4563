//! NATS plumbing shared by every role: connecting with the configured auth and TLS, and the
//! relay, a bounded queue between producers that must never wait (worker pipes, the IPC
//! channel) and the one task that publishes.
//!
//! async-nats's `publish().await` blocks while disconnected once its own queue fills, so
//! producers never call it: they `try_send` into [`Relay`], which drops and counts when full.
//! One publisher task keeps order: per worker, messages leave in the order they were read.

pub mod dedupe;
pub mod serve;
pub mod store;

use crate::config::Settings;
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Connecting failed for good.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A credentials file could not be read.
    #[error("cannot read the NATS credentials file {path}: {source} (check nats.creds)")]
    Creds {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS settings are incomplete.
    #[error("nats.tls.cert and nats.tls.key go together: set both, or neither")]
    TlsPair,
    /// Shutdown was requested while waiting for NATS.
    #[error("stopped while waiting for NATS at {0}")]
    Cancelled(String),
    /// The server refused us (authorisation): retrying would not help.
    #[error(
        "NATS at {url} refused the connection: {reason} (check nats.user/password/token/nkey/creds)"
    )]
    Refused {
        /// The URL.
        url: String,
        /// The server's reason.
        reason: String,
    },
    /// One attempt failed and the caller asked for no retry.
    #[error(
        "cannot reach NATS at {url}: {reason}. Is nats-server running there? Set nats.url (FLOTILLA_NATS_URL) to point elsewhere"
    )]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// Builds connect options from settings (auth, TLS, sizes).
pub async fn connect_options(settings: &Settings, name: &str) -> Result<ConnectOptions, BusError> {
    let n = &settings.nats;
    let mut o = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .client_capacity(8192)
        // Every request is bounded by its caller (a reload may take minutes); async-nats's
        // own 10 s default would cut long ones short.
        .request_timeout(None)
        .event_callback(|ev| async move {
            match ev {
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; buffering"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::SlowConsumer(sid) => {
                    tracing::warn!(
                        sid,
                        "slow consumer: NATS dropped messages for a subscription"
                    )
                }
                other => tracing::debug!("NATS event: {other}"),
            }
        });
    if let Some(creds) = &n.creds {
        o = o
            .credentials_file(creds)
            .await
            .map_err(|source| BusError::Creds {
                path: creds.display().to_string(),
                source,
            })?;
    }
    if let (Some(u), Some(p)) = (&n.user, &n.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &n.token {
        o = o.token(t.clone());
    }
    if let Some(seed) = &n.nkey {
        o = o.nkey(seed.clone());
    }
    if let Some(ca) = &n.tls.ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&n.tls.cert, &n.tls.key) {
        (Some(c), Some(k)) => {
            o = o
                .add_client_certificate(c.clone(), k.clone())
                .require_tls(true)
        }
        (None, None) => {}
        _ => return Err(BusError::TlsPair),
    }
    Ok(o)
}

/// Connects once; the error says which URL and why.
pub async fn connect_once(settings: &Settings, name: &str) -> Result<Client, BusError> {
    let url = settings.nats_url().to_string();
    let opts = connect_options(settings, name).await?;
    opts.connect(url.as_str())
        .await
        .map_err(|e| classify_connect_error(&url, e))
}

fn classify_connect_error(url: &str, e: async_nats::ConnectError) -> BusError {
    use async_nats::ConnectErrorKind as K;
    let reason = e.to_string();
    match e.kind() {
        K::AuthorizationViolation | K::Authentication => BusError::Refused {
            url: url.to_string(),
            reason,
        },
        _ => BusError::Unreachable {
            url: url.to_string(),
            reason,
        },
    }
}

/// Connects, retrying with backoff (100 ms doubling to 5 s) while the server is unreachable,
/// logging each failure with the URL; returns early when `cancel` fires.
pub async fn connect_with_retry(
    settings: &Settings,
    name: &str,
    cancel: &CancellationToken,
) -> Result<Client, BusError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let res = tokio::select! {
            r = connect_once(settings, name) => r,
            _ = cancel.cancelled() => return Err(BusError::Cancelled(settings.nats_url().into())),
        };
        match res {
            Ok(c) => {
                if attempt > 1 {
                    tracing::info!(url = settings.nats_url(), attempt, "connected to NATS");
                }
                return Ok(c);
            }
            Err(e @ (BusError::Refused { .. } | BusError::Creds { .. } | BusError::TlsPair)) => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!("{e}; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(BusError::Cancelled(settings.nats_url().into())),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Largest message relayed until the server's `max_payload` is known: NATS's default.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// One message waiting to be published.
#[derive(Debug)]
pub struct Outgoing {
    /// Subject (built by `protocol::subjects`).
    pub subject: String,
    /// Goes in `Nats-Msg-Id`.
    pub id: Uuid,
    /// The envelope.
    pub payload: Bytes,
    /// Room taken in the queue (worker messages only); given back once published.
    room: Option<Room>,
}

impl Outgoing {
    /// A message for `subject`.
    pub fn new(subject: String, id: Uuid, payload: Bytes) -> Self {
        Self {
            subject,
            id,
            payload,
            room: None,
        }
    }
}

#[derive(Debug)]
struct Room {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The queue is full (NATS slow or down).
    Full,
    /// The publisher has stopped.
    Closed,
}

struct Inner {
    tx: mpsc::Sender<Outgoing>,
    capacity: usize,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
    max_wait: Duration,
    chunk: usize,
    relayed: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    drops_pending: AtomicBool,
    max_message: AtomicUsize,
}

/// Handle to the relay queue: cheap to clone; the publisher ends when every handle is gone and
/// the queue is empty.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

/// Counters, for `list` replies and heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Published.
    pub relayed: u64,
    /// Dropped at the door because the queue was full.
    pub dropped: u64,
    /// Refused by the client (e.g. over max_payload).
    pub failed: u64,
    /// Waiting now.
    pub queued: u64,
}

/// Sizes of the relay queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Messages in the queue at most.
    pub messages: usize,
    /// Bytes of worker messages in the queue at most.
    pub bytes: usize,
    /// How long a worker message may wait for room before it is dropped.
    pub max_wait: Duration,
}

impl Relay {
    /// Makes the queue and spawns its publisher on `tracker`. An eighth of the message capacity
    /// is kept for lifecycle events and heartbeats, so a flood of worker messages cannot crowd
    /// them out.
    ///
    /// The client arrives through `client` once connected, so producers can start (and queue)
    /// before NATS is reachable; if it never arrives, queued messages are counted as dropped.
    pub fn start(
        client: impl std::future::Future<Output = Option<Client>> + Send + 'static,
        limits: QueueLimits,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Relay {
        let capacity = limits.messages.max(2);
        let reserve = (capacity / 8).max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let max_bytes = limits
            .bytes
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
        let inner = Arc::new(Inner {
            tx,
            capacity,
            slots: Arc::new(Semaphore::new(capacity - reserve)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
            max_wait: limits.max_wait,
            chunk: ((capacity - reserve) / 4).max(1),
            relayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            drops_pending: AtomicBool::new(false),
            max_message: AtomicUsize::new(DEFAULT_MAX_MESSAGE),
        });
        let weak = Arc::downgrade(&inner);
        tracker.spawn(publish_loop(client, rx, weak));
        Relay { inner }
    }

    /// Queues worker messages, in order. While the publisher keeps up this waits for room, up
    /// to `max_wait` (backpressure: the worker's channel is read more slowly, nothing is lost);
    /// when the wait runs out (NATS down or stalled) the messages are dropped and counted, and
    /// `dropping` is set so this source's next messages are dropped at once instead of waiting
    /// again, until there is room again. Room is taken for a chunk of messages at a time, so a
    /// waiting reader wakes once per chunk, not once per message. Returns how many were dropped.
    pub async fn relay_batch(&self, msgs: &mut Vec<Outgoing>, dropping: &AtomicBool) -> u64 {
        let i = &self.inner;
        let size = |m: &Outgoing| (m.payload.len() as u64).clamp(1, i.max_bytes as u64) as u32;
        let mut dropped = 0;
        let mut rest = msgs.drain(..).peekable();
        while rest.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0u32;
            while let Some(m) = rest.peek() {
                let len = size(m);
                if !chunk.is_empty()
                    && (chunk.len() >= i.chunk || bytes as u64 + len as u64 > i.max_bytes as u64)
                {
                    break;
                }
                bytes += len;
                chunk.extend(rest.next());
            }
            let n = chunk.len() as u32;
            let room = if dropping.load(Ordering::Relaxed) {
                self.try_room(n, bytes)
            } else {
                match self.try_room(n, bytes) {
                    Some(r) => Some(r),
                    None => {
                        let wait = async {
                            let slots = i.slots.clone().acquire_many_owned(n).await.ok()?;
                            let b = i.bytes.clone().acquire_many_owned(bytes).await.ok()?;
                            Some((slots, b))
                        };
                        tokio::time::timeout(i.max_wait, wait).await.ok().flatten()
                    }
                }
            };
            let Some((mut slots, mut room_bytes)) = room else {
                dropping.store(true, Ordering::Relaxed);
                self.count_drops(n as u64);
                dropped += n as u64;
                continue;
            };
            dropping.store(false, Ordering::Relaxed);
            for mut m in chunk {
                let len = size(&m) as usize;
                m.room = match (slots.split(1), room_bytes.split(len)) {
                    (Some(slot), Some(b)) => Some(Room {
                        _slot: slot,
                        _bytes: b,
                    }),
                    _ => None, // cannot happen: the chunk's room was counted from these sizes
                };
                if self.push(m).is_err() {
                    dropped += 1;
                }
            }
        }
        dropped
    }

    fn try_room(&self, n: u32, bytes: u32) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let i = &self.inner;
        let slots = i.slots.clone().try_acquire_many_owned(n).ok()?;
        let b = i.bytes.clone().try_acquire_many_owned(bytes).ok()?;
        Some((slots, b))
    }

    /// Queues a lifecycle event or heartbeat (never waits); it may use the reserved part of
    /// the queue.
    pub fn send_event(&self, msg: Outgoing) -> Result<(), Dropped> {
        self.push(msg)
    }

    fn push(&self, msg: Outgoing) -> Result<(), Dropped> {
        match self.inner.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(self.count_drop(Dropped::Full)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.count_drop(Dropped::Closed)),
        }
    }

    fn count_drop(&self, why: Dropped) -> Dropped {
        self.count_drops(1);
        why
    }

    fn count_drops(&self, n: u64) {
        self.inner.dropped.fetch_add(n, Ordering::Relaxed);
        self.inner.drops_pending.store(true, Ordering::Release);
    }

    /// True once, after drops, when the queue has drained below half again: the moment to
    /// report them (NATS is taking messages again). Asked at every heartbeat.
    pub fn drops_reportable(&self) -> bool {
        let i = &self.inner;
        self.queued() < i.capacity / 2 && i.drops_pending.swap(false, Ordering::AcqRel)
    }

    /// Largest message relayed, bytes.
    pub fn max_message(&self) -> usize {
        self.inner.max_message.load(Ordering::Relaxed)
    }

    /// Sets the largest message relayed (the server's `max_payload`, or less if configured).
    pub fn set_max_message(&self, n: usize) {
        self.inner.max_message.store(n.max(1024), Ordering::Relaxed);
    }

    /// Messages waiting.
    pub fn queued(&self) -> usize {
        self.inner.capacity - self.inner.tx.capacity()
    }

    /// Counters.
    pub fn stats(&self) -> RelayStats {
        let i = &self.inner;
        RelayStats {
            relayed: i.relayed.load(Ordering::Relaxed),
            dropped: i.dropped.load(Ordering::Relaxed),
            failed: i.failed.load(Ordering::Relaxed),
            queued: self.queued() as u64,
        }
    }
}

async fn publish_loop(
    client: impl std::future::Future<Output = Option<Client>>,
    mut rx: mpsc::Receiver<Outgoing>,
    inner: std::sync::Weak<Inner>,
) {
    let Some(client) = client.await else {
        // Never connected: nothing can be published; what was queued is counted as dropped.
        rx.close();
        let mut lost = 0;
        while rx.recv().await.is_some() {
            lost += 1;
        }
        if let Some(i) = inner.upgrade() {
            i.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        if lost > 0 {
            tracing::warn!("{lost} messages were never published: NATS was not reached");
        }
        return;
    };
    let mut batch = Vec::with_capacity(256);
    loop {
        if rx.recv_many(&mut batch, 256).await == 0 {
            break;
        }
        let Some(inner) = inner.upgrade() else {
            // Every handle is gone: publish what is left, then stop.
            for m in batch.drain(..) {
                publish_one(&client, m, None).await;
            }
            continue;
        };
        for m in batch.drain(..) {
            publish_one(&client, m, Some(&inner)).await;
        }
    }
    if let Err(e) = client.flush().await {
        tracing::warn!("final NATS flush failed: {e}");
    }
}

async fn publish_one(client: &Client, m: Outgoing, inner: Option<&Inner>) {
    let len = m.payload.len();
    let mut headers = HeaderMap::new();
    let mut idbuf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        &*m.id.hyphenated().encode_lower(&mut idbuf),
    );
    let res = client
        .publish_with_headers(m.subject, headers, m.payload)
        .await;
    drop(m.room); // room back to the queue
    if let Some(i) = inner {
        match res {
            Ok(()) => {
                i.relayed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                i.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("NATS refused a message of {len} bytes: {e}");
            }
        }
    }
}
