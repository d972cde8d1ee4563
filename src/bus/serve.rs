//! Serving request/reply on NATS, for the agent's control plane and the controller's API alike.
//!
//! A [`Server`] reads requests from a subscription and answers each in its own task on the
//! caller's [`TaskTracker`] (a `stop` that waits for exits must not hold up a `list`), with at
//! most a fixed number at once: past that it stops reading, and NATS buffers the rest. A request
//! id seen before gets the first reply again, word for word, even while the first still runs
//! ([`Dedupe`]); every reply is published under a deadline, so a NATS that takes no messages
//! never holds up the server (or its shutdown).

use super::dedupe::Dedupe;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::Reply;
use crate::protocol::subjects::{Parsed, Subjects};
use async_nats::{Client, Message};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Replies remembered for repeated request ids.
pub const REMEMBERED: usize = 4096;
/// Longest a reply may wait for the NATS client.
pub const REPLY_WITHIN: Duration = Duration::from_secs(5);

/// A request/reply server: who answers, and how many requests it handles at once.
pub struct Server {
    client: Client,
    subjects: Subjects,
    answerer: String,
    concurrent: usize,
}

impl Server {
    /// A server answering as `answerer` (the `host` of its replies: a host id, `controller`)
    /// with up to `concurrent` requests in hand at once.
    pub fn new(
        client: Client,
        subjects: Subjects,
        answerer: impl Into<String>,
        concurrent: usize,
    ) -> Self {
        Self {
            client,
            subjects,
            answerer: answerer.into(),
            concurrent: concurrent.max(1),
        }
    }

    /// Serves `requests` on `tracker` until `cancel` fires or the stream ends; returns at once.
    ///
    /// Each request on one of our request subjects (`<prefix>ctl.agent.<host>.<verb>`,
    /// `<prefix>ctl.api.<verb>`, `<prefix>ctl.controllers.<verb>`) with a reply subject is
    /// answered by `handler(verb, body)`; other messages are ignored.
    pub fn spawn<S, H, F>(
        self,
        mut requests: S,
        handler: H,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) where
        S: Stream<Item = Message> + Send + Unpin + 'static,
        H: Fn(String, Bytes) -> F + Send + Sync + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        let permits = Arc::new(Semaphore::new(self.concurrent));
        let shared = Arc::new(Shared {
            server: self,
            dedupe: Dedupe::new(REMEMBERED),
            handler,
        });
        let tasks = tracker.clone();
        tracker.spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = requests.next() => m,
                    _ = cancel.cancelled() => break,
                };
                let Some(msg) = msg else { break };
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => p,
                    _ = cancel.cancelled() => break,
                };
                let Ok(permit) = permit else { break };
                let shared = shared.clone();
                tasks.spawn(async move {
                    shared.answer(msg).await;
                    drop(permit);
                });
            }
            // Dropping unsubscribes without waiting: `unsubscribe().await` would block on a
            // full client queue while NATS is down, and with it the shutdown.
            drop(requests);
        });
    }
}

/// What every request's task shares.
struct Shared<H> {
    server: Server,
    dedupe: Dedupe,
    handler: H,
}

impl<H, F> Shared<H>
where
    H: Fn(String, Bytes) -> F,
    F: Future<Output = Reply>,
{
    async fn answer(&self, msg: Message) {
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!(subject = %msg.subject, "request without a reply subject ignored: use request/reply");
            return;
        };
        let verb = match self.server.subjects.parse(&msg.subject) {
            Some(Parsed::AgentCtl { verb, .. } | Parsed::Api { verb }) => verb.to_string(),
            _ => return,
        };
        let work = async { encode(&(self.handler)(verb, msg.payload.clone()).await) };
        let bytes = match request_id(&msg.payload) {
            Some(id) => {
                self.dedupe
                    .reply(id, work, || {
                        encode(&first_copy_lost(id, &self.server.answerer))
                    })
                    .await
            }
            None => work.await,
        };
        // Bounded: while NATS is down the client's queue may be full, and a reply nobody can
        // receive must not hold up the server (or its shutdown).
        let publish = self.server.client.publish(reply_to, bytes);
        match tokio::time::timeout(REPLY_WITHIN, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not send a reply: {e}"),
            Err(_) => tracing::warn!(
                "could not send a reply within {REPLY_WITHIN:?}: NATS is not taking messages"
            ),
        }
    }
}

/// The `request_id` of a request body, if it has a valid one (whether or not the rest of the
/// body is a valid request: its error reply then carries the id).
pub fn request_id(body: &[u8]) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Id>(body)
        .ok()?
        .request_id?
        .as_str()?
        .parse()
        .ok()
}

/// The answer to a repeat of a request whose first copy was dropped unfinished.
fn first_copy_lost(id: Uuid, answerer: &str) -> Reply {
    Reply::err(
        Some(id),
        answerer,
        ControlError::new(
            ErrorKind::Internal,
            "the first copy of this request was lost: retry with a new request id",
        ),
    )
}

fn encode(r: &Reply) -> Bytes {
    serde_json::to_vec(r)
        .expect("a Reply is plain data with string keys: it always serialises")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_read_leniently() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"request_id":"{id}","target":"all"}}"#);
        assert_eq!(request_id(body.as_bytes()), Some(id));
        // A body that is not a valid request still has its id (its error reply carries it).
        let body = format!(r#"{{"request_id":"{id}","target":42,"extra":[1,2]}}"#);
        assert_eq!(request_id(body.as_bytes()), Some(id));
        assert_eq!(request_id(br#"{"request_id":"not-a-uuid"}"#), None);
        assert_eq!(request_id(br#"{"request_id":7}"#), None);
        assert_eq!(request_id(br#"{"target":"all"}"#), None);
        assert_eq!(request_id(b"[1,2]"), None);
        assert_eq!(request_id(b""), None);
        assert_eq!(request_id(b"not json"), None);
    }

    #[test]
    fn the_lost_reply_names_the_request_and_says_to_retry() {
        let id = Uuid::new_v4();
        let r = first_copy_lost(id, "web-1");
        assert_eq!(r.request_id, Some(id));
        assert_eq!(r.host, "web-1");
        let e = r.error.expect("an error reply");
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("retry with a new request id"), "{e:?}");
    }
}
