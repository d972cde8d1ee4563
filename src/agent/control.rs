//! The agent's control plane: request/reply on `pmctl.agent.<host>.<verb>`.
//!
//! Each request runs in its own task (a `stop` waits for exits, and must not hold up a `list`).
//! A request id seen before gets the first reply again, even while the first is still running.

use super::supervisor::SupervisorHandle;
use crate::bus::dedupe::Dedupe;
use crate::protocol::control::Request;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::Reply;
use crate::protocol::subjects::{HostId, Parsed, Subjects};
use async_nats::{Client, Message};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Replies remembered for repeated request ids.
const REMEMBERED: usize = 4096;
/// Longest a reply may wait for the NATS client.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Requests handled at once.
const CONCURRENT: usize = 64;

/// Serves control requests until `cancel` fires.
pub async fn serve(
    client: Client,
    subjects: Subjects,
    host: HostId,
    sup: SupervisorHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), async_nats::SubscribeError> {
    let mut sub = client.subscribe(subjects.agent_wildcard(&host)).await?;
    // The subscription is registered on the server once this flush returns, so whoever sees
    // the agent's `online` host event can already send commands.
    if let Err(e) = client.flush().await {
        tracing::warn!("flush after subscribing failed: {e}");
    }
    let dedupe = Arc::new(Dedupe::new(REMEMBERED));
    let permits = Arc::new(Semaphore::new(CONCURRENT));
    let ctx = Arc::new((client.clone(), subjects, host, sup));
    tracker.spawn({
        let cancel = cancel.clone();
        let tracker = tracker.clone();
        async move {
            loop {
                let msg = tokio::select! {
                    m = sub.next() => m,
                    _ = cancel.cancelled() => break,
                };
                let Some(msg) = msg else { break };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let ctx = ctx.clone();
                let dedupe = dedupe.clone();
                tracker.spawn(async move {
                    handle(&ctx.0, &ctx.1, &ctx.2, &ctx.3, &dedupe, msg).await;
                    drop(permit);
                });
            }
            // Dropping unsubscribes without waiting: `unsubscribe().await` would block on a
            // full client queue while NATS is down, and with it the agent's shutdown.
            drop(sub);
        }
    });
    Ok(())
}

async fn handle(
    client: &Client,
    subjects: &Subjects,
    host: &HostId,
    sup: &SupervisorHandle,
    dedupe: &Dedupe,
    msg: Message,
) {
    let Some(reply_to) = msg.reply.clone() else {
        tracing::warn!(subject = %msg.subject, "control message without a reply subject ignored: use request/reply");
        return;
    };
    let verb = match subjects.parse(&msg.subject) {
        Some(Parsed::AgentCtl { verb, .. }) => verb.to_string(),
        _ => return,
    };
    let bytes = match Request::parse(&verb, &msg.payload) {
        Err(e) => encode(&Reply::err(None, host.as_str(), e)),
        Ok(req) => {
            let id = req.request_id();
            tracing::debug!(verb, %id, "request");
            let work = async {
                let reply = sup.request(req, host.as_str()).await;
                encode(&reply)
            };
            dedupe
                .reply(id, work, || {
                    encode(&Reply::err(
                        Some(id),
                        host.as_str(),
                        ControlError::new(
                            ErrorKind::Internal,
                            "the first copy of this request was lost: retry with a new request id",
                        ),
                    ))
                })
                .await
        }
    };
    // Bounded: while NATS is down the client's queue may be full, and a reply nobody can
    // receive must not hold up the agent (or its shutdown).
    match tokio::time::timeout(REPLY_TIMEOUT, client.publish(reply_to, bytes)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("could not send a reply: {e}"),
        Err(_) => tracing::warn!(
            "could not send a reply within {REPLY_TIMEOUT:?}: NATS is not taking messages"
        ),
    }
}

fn encode(r: &Reply) -> Bytes {
    serde_json::to_vec(r)
        .expect("replies always serialise")
        .into()
}
