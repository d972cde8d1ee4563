//! NATS plumbing shared by every role: connecting with the configured auth and TLS, and the
//! relay, a bounded queue between producers that must never wait (worker pipes, the IPC
//! channel) and the one task that publishes.
//!
//! async-nats's `publish().await` blocks while disconnected once its own queue fills, so
//! producers never call it: they `try_send` into [`Relay`], which drops and counts when full.
//! One publisher task keeps order: per worker, messages leave in the order they were read.

use crate::config::Settings;
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
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

/// One message waiting to be published.
#[derive(Debug)]
pub struct Outgoing {
    /// Subject (built by `protocol::subjects`).
    pub subject: String,
    /// Goes in `Nats-Msg-Id`.
    pub id: Uuid,
    /// The envelope.
    pub payload: Bytes,
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
    reserve: usize,
    bytes: AtomicUsize,
    max_bytes: usize,
    relayed: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    drops_pending: AtomicBool,
    drained: Notify,
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

impl Relay {
    /// Makes the queue and spawns its publisher on `tracker`. `capacity` messages and
    /// `max_bytes` bytes at most; an eighth of the capacity is kept for lifecycle events so a
    /// flood of worker messages cannot crowd them out.
    pub fn start(
        client: Client,
        capacity: usize,
        max_bytes: usize,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Relay {
        let (tx, rx) = mpsc::channel(capacity);
        let inner = Arc::new(Inner {
            tx,
            capacity,
            reserve: (capacity / 8).max(16),
            bytes: AtomicUsize::new(0),
            max_bytes,
            relayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            drops_pending: AtomicBool::new(false),
            drained: Notify::new(),
        });
        let weak = Arc::downgrade(&inner);
        tracker.spawn(publish_loop(client, rx, weak));
        Relay { inner }
    }

    /// Queues a worker message, or drops it (counted) when the queue is full. Never waits.
    pub fn try_relay(&self, msg: Outgoing) -> Result<(), Dropped> {
        let i = &self.inner;
        if i.tx.capacity() <= i.reserve {
            return Err(self.count_drop(Dropped::Full));
        }
        self.push(msg)
    }

    /// Queues a lifecycle event or heartbeat; it may use the reserved part of the queue.
    pub fn send_event(&self, msg: Outgoing) -> Result<(), Dropped> {
        self.push(msg)
    }

    fn push(&self, msg: Outgoing) -> Result<(), Dropped> {
        let i = &self.inner;
        let len = msg.payload.len();
        if i.bytes.fetch_add(len, Ordering::Relaxed) + len > i.max_bytes {
            i.bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(self.count_drop(Dropped::Full));
        }
        match i.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                i.bytes.fetch_sub(len, Ordering::Relaxed);
                Err(self.count_drop(match e {
                    mpsc::error::TrySendError::Full(_) => Dropped::Full,
                    mpsc::error::TrySendError::Closed(_) => Dropped::Closed,
                }))
            }
        }
    }

    fn count_drop(&self, why: Dropped) -> Dropped {
        self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        self.inner.drops_pending.store(true, Ordering::Release);
        why
    }

    /// Resolves once the queue has drained below half after drops happened: the moment to
    /// report them (NATS is flowing again).
    pub async fn drops_reportable(&self) {
        loop {
            let notified = self.inner.drained.notified();
            if self.inner.drops_pending.load(Ordering::Acquire)
                && self.queued() < self.inner.capacity / 2
            {
                self.inner.drops_pending.store(false, Ordering::Release);
                return;
            }
            notified.await;
        }
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
    client: Client,
    mut rx: mpsc::Receiver<Outgoing>,
    inner: std::sync::Weak<Inner>,
) {
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
        if inner.drops_pending.load(Ordering::Acquire) {
            inner.drained.notify_waiters();
        }
    }
    if let Err(e) = client.flush().await {
        tracing::warn!("final NATS flush failed: {e}");
    }
}

async fn publish_one(client: &Client, m: Outgoing, inner: Option<&Inner>) {
    let len = m.payload.len();
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        m.id.to_string().as_str(),
    );
    let res = client
        .publish_with_headers(m.subject, headers, m.payload)
        .await;
    if let Some(i) = inner {
        i.bytes.fetch_sub(len, Ordering::Relaxed);
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
