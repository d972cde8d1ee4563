//! Messages to workers: `send` (a JSON value to `process.on('message')`) and `signal`.

use super::{READ_WITHIN, print_json, target};
use crate::cli::client::Client;
use crate::cli::style::OutputStyle;
use crate::cli::{SendArgs, SignalArgs};
use crate::config::Settings;
use crate::protocol::api::ApiRequest;
use crate::protocol::control::{SendRequest, SignalRequest};
use crate::protocol::reply::Reply;
use anyhow::bail;
use uuid::Uuid;

/// `flotilla send`
pub async fn send(settings: &Settings, a: &SendArgs) -> anyhow::Result<()> {
    let t = target(&a.target)?;
    let message: serde_json::Value = serde_json::from_str(&a.json_message).map_err(|e| {
        anyhow::anyhow!(
            "the message is not valid JSON ({e}): quote it for the shell, e.g. '{{\"topic\":\"reload\"}}' or '\"text\"'"
        )
    })?;
    let r = SendRequest {
        request_id: Uuid::new_v4(),
        target: t,
        message,
        pm_ids: vec![],
    };
    deliver(settings, r, "send", a.json).await
}

/// `flotilla signal`
pub async fn signal(settings: &Settings, a: &SignalArgs) -> anyhow::Result<()> {
    crate::protocol::signals::parse(&a.signal)?;
    let t = target(&a.target)?;
    let r = SignalRequest {
        request_id: Uuid::new_v4(),
        target: t,
        signal: a.signal.clone(),
        pm_ids: vec![],
    };
    deliver(settings, r, "signal", a.json).await
}

/// Asks, prints a line per process (or, with `--json`, the reply), and fails with the reply's
/// error.
async fn deliver(
    settings: &Settings,
    req: impl Into<ApiRequest>,
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    let client = Client::connect(settings).await?;
    let reply = client.api_reply(req, READ_WITHIN).await?;
    print_changes(&reply, verb, json)?;
    if let Some(e) = reply.error {
        bail!("{}", e.message);
    }
    Ok(())
}

fn print_changes(reply: &Reply, verb: &str, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(reply);
    }
    let style = OutputStyle::detect();
    for c in &reply.changes {
        println!(
            "{} {verb} pm_id {}: {c}",
            if c.what.is_failure() {
                style.paint("✗", comfy_table::Color::Red)
            } else {
                style.paint("✓", comfy_table::Color::Green)
            },
            c.pm_id,
        );
    }
    Ok(())
}
