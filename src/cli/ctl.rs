//! `flotilla ctl <host> <verb> [json]`: one raw request to an agent's control plane, for
//! debugging and scripts. The pm2-style verbs go through the controller instead.

use super::CtlArgs;
use crate::bus;
use crate::config::Settings;
use crate::protocol::control::AGENT_VERBS;
use crate::protocol::reply::Reply;
use crate::protocol::{HostId, Subjects};
use anyhow::{Context, bail};

/// Sends the request; returns the reply (printed by the caller).
pub async fn run(settings: &Settings, args: &CtlArgs) -> anyhow::Result<Reply> {
    let host = HostId::new(&args.host)?;
    if !AGENT_VERBS.contains(&args.verb.as_str()) {
        bail!(
            "unknown verb '{}': an agent answers {}",
            args.verb,
            AGENT_VERBS.join(", ")
        );
    }
    let mut body: serde_json::Value = serde_json::from_str(&args.body)
        .with_context(|| format!("the request body is not valid JSON: {}", args.body))?;
    let Some(obj) = body.as_object_mut() else {
        bail!("the request body must be a JSON object, like '{{\"target\":\"api\"}}'");
    };
    obj.entry("request_id")
        .or_insert_with(|| serde_json::json!(uuid::Uuid::new_v4()));
    let subjects = Subjects::new(&settings.subject_prefix)?;
    let client = bus::connect_once(settings, "flotilla-ctl").await?;
    let subject = subjects.agent_verb(&host, &args.verb);
    let payload = serde_json::to_vec(&body)?;
    let msg = tokio::time::timeout(args.timeout, client.request(subject, payload.into()))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no agent on {host} answered within {:?} on {}: is `flotilla agent --host-id {host}` running there?",
                args.timeout,
                settings.nats_url()
            )
        })?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => anyhow::anyhow!(
                "no agent on {host} is listening on {}: is `flotilla agent --host-id {host}` running there?",
                settings.nats_url()
            ),
            _ => anyhow::anyhow!("request to {host} failed: {e}"),
        })?;
    let reply: Reply = serde_json::from_slice(&msg.payload)
        .context("the agent's reply is not a Flotilla reply (a different version?)")?;
    Ok(reply)
}
