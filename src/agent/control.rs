//! The agent's control plane: request/reply on `pmctl.agent.<host>.<verb>`, served by
//! [`crate::bus::serve::Server`] (each request in its own task, repeats answered with the first
//! reply, replies under a deadline).

use super::supervisor::SupervisorHandle;
use crate::bus::serve::Server;
use crate::protocol::control::Request;
use crate::protocol::reply::Reply;
use crate::protocol::subjects::{HostId, Subjects};
use async_nats::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Requests handled at once: a `stop` may wait a grace period for its exits, and the requests
/// behind it (a `list`, the controller's next verb) must not wait for it; past this many the
/// agent stops reading and NATS holds the rest.
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
    let sub = client.subscribe(subjects.agent_wildcard(&host)).await?;
    // The subscription is registered on the server once this flush returns, so whoever sees
    // the agent's `online` host event can already send commands.
    if let Err(e) = client.flush().await {
        tracing::warn!("flush after subscribing failed: {e}");
    }
    let server = Server::new(client, subjects, host.as_str(), CONCURRENT);
    let handler = move |verb: String, body: bytes::Bytes| {
        let sup = sup.clone();
        let host = host.clone();
        async move {
            match Request::parse(&verb, &body) {
                Err(e) => Reply::err(crate::bus::serve::request_id(&body), host.as_str(), e),
                Ok(req) => {
                    tracing::debug!(verb, id = %req.request_id(), "request");
                    sup.request(req, host.as_str()).await
                }
            }
        }
    };
    server.spawn(sub, handler, cancel, &tracker);
    Ok(())
}
