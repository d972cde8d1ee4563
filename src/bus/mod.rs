//! NATS plumbing shared by every role: connecting with the configured auth and TLS (retrying
//! while the server is unreachable), the desired-state store ([`store`]) and the request
//! dedupe ([`dedupe`]). The agent's publishing queue lives with the agent
//! ([`crate::agent::publisher`]).

pub mod dedupe;
pub mod serve;
pub mod store;

use crate::config::Settings;
use async_nats::{Client, ConnectOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    connect_options_notifying(settings, name, None).await
}

/// Same; `connected` is told each time the client has (re)connected. A message the owner
/// publishes after hearing it leaves after the client's subscriptions were sent again.
pub async fn connect_options_notifying(
    settings: &Settings,
    name: &str,
    connected: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<ConnectOptions, BusError> {
    let n = &settings.nats;
    let mut o = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .client_capacity(8192)
        // Every request is bounded by its caller (a reload may take minutes); async-nats's
        // own 10 s default would cut long ones short.
        .request_timeout(None)
        .event_callback(move |ev| {
            let connected = connected.clone();
            async move {
                match ev {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; buffering")
                    }
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connected");
                        if let Some(tx) = &connected {
                            let _ = tx.send(());
                        }
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(
                            sid,
                            "slow consumer: NATS dropped messages for a subscription"
                        )
                    }
                    other => tracing::debug!("NATS event: {other}"),
                }
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
    connect_once_notifying(settings, name, None).await
}

/// Same, telling `connected` of each (re)connection (see [`connect_options_notifying`]).
pub async fn connect_once_notifying(
    settings: &Settings,
    name: &str,
    connected: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<Client, BusError> {
    let url = settings.nats_url().to_string();
    let opts = connect_options_notifying(settings, name, connected).await?;
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
    connect_with_retry_notifying(settings, name, cancel, None).await
}

/// Same, telling `connected` of each (re)connection (see [`connect_options_notifying`]).
pub async fn connect_with_retry_notifying(
    settings: &Settings,
    name: &str,
    cancel: &CancellationToken,
    connected: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<Client, BusError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let res = tokio::select! {
            r = connect_once_notifying(settings, name, connected.clone()) => r,
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
