//! pm2's verbs over the controller's API, by family: [`start`](start()) (with its pure flag
//! mapping in [`spec`] and the wait for `online` in [`online`]), the verbs on running processes
//! ([`targeted`]), the reads ([`reads`]) and messages to workers ([`messages`]). Each prints a
//! human table (through [`super::style`]) or, with `--json`, the data; errors are one line and a
//! non-zero exit (the caller prints them).

pub mod messages;
pub mod online;
pub mod reads;
pub mod spec;
pub mod start;
pub mod targeted;

pub use messages::{send, signal};
pub use reads::{describe, info, logs, ls, monit};
pub use start::start;
pub use targeted::{reload, scale, targeted};

use super::client::Client;
use super::progress::Line;
use super::style::{self, OutputStyle};
use crate::protocol::Target;
use crate::protocol::api::ApiRequest;
use crate::protocol::control::TargetRequest;
use crate::protocol::envelope::now_ms;
use crate::protocol::reply::Reply;
use anyhow::bail;
use online::NotOnline;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

/// How long a read may take.
const READ_WITHIN: Duration = Duration::from_secs(10);

/// Prints `v` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Parses a target argument; the error lists the accepted forms.
fn target(s: &str) -> anyhow::Result<Target> {
    Target::parse(s).map_err(|e| {
        anyhow::anyhow!("'{s}' is not a target ({e}): use all, a pm_id, an app name or ns/name")
    })
}

/// Every process of the fleet (an error reply is returned as it is).
async fn ls_all(client: &Client) -> anyhow::Result<Reply> {
    Ok(client
        .api_reply(ApiRequest::Ls(TargetRequest::new(Target::All)), READ_WITHIN)
        .await?)
}

/// Ends a verb that changed processes: prints the changes, then the list (or, with `--json`,
/// the reply); fails with what the wait for `online` found, else with the reply's error.
async fn conclude(
    client: &Client,
    verb: &str,
    reply: Reply,
    json: bool,
    progress: &mut Line,
    waited: Result<(), NotOnline>,
) -> anyhow::Result<()> {
    progress.done();
    if json {
        print_json(&reply)?;
    } else {
        let style = OutputStyle::detect();
        let names: BTreeMap<u32, &str> = reply
            .processes
            .iter()
            .map(|p| (p.meta.pm_id, p.meta.name.as_str()))
            .collect();
        for c in &reply.changes {
            let name = names.get(&c.pm_id).copied().unwrap_or_default();
            println!(
                "{} {verb} {name}({}): {c}",
                style.paint("✓", comfy_table::Color::Green),
                c.pm_id,
            );
        }
        let ls = ls_all(client).await?;
        print!("{}", style::process_table(&ls.processes, &style, now_ms()));
    }
    waited?;
    match reply.error {
        Some(e) => bail!("{}", e.message),
        None => Ok(()),
    }
}

/// The plural ending for `n` things.
fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Processes and events for the verbs' unit tests.
#[cfg(test)]
mod fixtures {
    use crate::protocol::{Envelope, EventFields, ProcessEvent, ProcessMeta, Status};

    /// Instance `id` of app `name` (namespace `default`, on `web-1`), in `status`.
    pub fn meta(id: u32, name: &str, status: Status) -> ProcessMeta {
        ProcessMeta {
            pm_id: id,
            name: name.into(),
            namespace: "default".into(),
            rev: None,
            host: "web-1".into(),
            pid: 0,
            instance: id,
            exec_mode: Default::default(),
            status,
            restart_time: 0,
            pm_uptime: 0,
            app_id: uuid::Uuid::nil(),
        }
    }

    /// A lifecycle event `ev` (with `reason`) of `process`; `None` for an envelope without one.
    pub fn event(process: ProcessMeta, ev: Option<ProcessEvent>, reason: Option<&str>) -> Envelope {
        Envelope {
            at: 0,
            data: None,
            raw: None,
            process,
            event: ev.map(|e| EventFields {
                reason: reason.map(str::to_string),
                ..EventFields::named(e)
            }),
            id: uuid::Uuid::new_v4(),
        }
    }
}
