//! `flotilla events [filter]`: every message on the event plane, as it arrives.

use super::EventsArgs;
use crate::bus;
use crate::config::Settings;
use crate::protocol::Subjects;
use futures::StreamExt;
use std::io::Write;

/// Subscribes and prints until `stop` resolves.
pub async fn run(
    settings: &Settings,
    args: &EventsArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let subjects = Subjects::new(&settings.subject_prefix)?;
    let filter = args.filter.clone().unwrap_or_else(|| subjects.all_events());
    let client = bus::connect_once(settings, "flotilla-events").await?;
    let mut sub = client
        .subscribe(filter.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to '{filter}': {e}"))?;
    tokio::pin!(stop);
    let stdout = std::io::stdout();
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = &mut stop => break,
        };
        let Some(msg) = msg else { break };
        let mut out = stdout.lock();
        let res = if args.subjects {
            writeln!(
                out,
                "{} {}",
                msg.subject,
                String::from_utf8_lossy(&msg.payload)
            )
        } else {
            writeln!(out, "{}", String::from_utf8_lossy(&msg.payload))
        };
        if res.is_err() {
            break; // stdout closed (e.g. piped into head)
        }
    }
    Ok(())
}
