//! The reads: `ls`, `describe`, `logs` (tails, then with `--follow` the live lines), `monit` (a
//! refreshing `ls`) and `info` (where the CLI points, which controllers and agents answer).

use super::{READ_WITHIN, ls_all, print_json, target};
use crate::cli::client::{ANSWER_TIMEOUT, Client};
use crate::cli::style::{self, OutputStyle};
use crate::cli::{DescribeArgs, LogsArgs, MonitArgs, ReadArgs};
use crate::config::Settings;
use crate::protocol::api::{ApiRequest, InfoRequest};
use crate::protocol::control::{LogsRequest, TargetRequest};
use crate::protocol::envelope::now_ms;
use crate::protocol::reply::Reply;
use crate::protocol::subjects::{Parsed, kind};
use crate::protocol::{Envelope, Subjects};
use anyhow::bail;
use futures::StreamExt;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// `flotilla ls`
pub async fn ls(settings: &Settings, a: &ReadArgs) -> anyhow::Result<()> {
    let client = Client::connect(settings).await?;
    let reply = ls_all(&client).await?;
    if a.json {
        print_json(&reply.processes)?;
    } else {
        print!(
            "{}",
            style::process_table(&reply.processes, &OutputStyle::detect(), now_ms())
        );
    }
    if let Some(e) = reply.error {
        bail!("{}", e.message);
    }
    Ok(())
}

/// `flotilla describe`
pub async fn describe(settings: &Settings, a: &DescribeArgs) -> anyhow::Result<()> {
    let t = target(&a.target)?;
    let client = Client::connect(settings).await?;
    let reply = client
        .api(ApiRequest::Ls(TargetRequest::new(t)), READ_WITHIN)
        .await?;
    if a.json {
        return print_json(&reply.processes);
    }
    let style = OutputStyle::detect();
    for p in &reply.processes {
        print!("{}", style::describe(p, &style, now_ms()));
    }
    Ok(())
}

/// `flotilla logs`
pub async fn logs(
    settings: &Settings,
    a: &LogsArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let t = target(&a.target)?;
    let client = Client::connect(settings).await?;
    // Subscribe first, so no line falls between the tails and the live ones.
    let live = if a.follow {
        let filter = client.subjects.target_wildcard(&t);
        let sub = client
            .nats
            .subscribe(filter.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {filter}: {e}"))?;
        client.nats.flush().await?;
        Some(sub)
    } else {
        None
    };
    let r = LogsRequest {
        request_id: Uuid::new_v4(),
        target: t.clone(),
        pm_ids: vec![],
        lines: a.lines,
    };
    let reply = client.api(r, READ_WITHIN).await?;
    let style = OutputStyle::detect();
    if a.json {
        print_json(&reply.logs)?;
    } else {
        print!("{}", style::log_tails(&reply.logs, &style));
    }
    let Some(mut sub) = live else {
        return Ok(());
    };
    tokio::pin!(stop);
    loop {
        let m = tokio::select! {
            m = sub.next() => m,
            _ = &mut stop => break,
        };
        let Some(m) = m else { break };
        let Some(stream) = log_stream(&client.subjects, &m.subject) else {
            continue;
        };
        let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) else {
            continue;
        };
        if !t.matches(&env.process) {
            continue;
        }
        let mut out = std::io::stdout().lock();
        let res = if a.json {
            writeln!(out, "{}", String::from_utf8_lossy(&m.payload))
        } else {
            let line = match &env.data {
                Some(serde_json::Value::String(l)) => l.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            writeln!(
                out,
                "{}",
                style::log_line(env.process.pm_id, &env.process.name, stream, &line, &style)
            )
        };
        if res.is_err() {
            break; // stdout closed
        }
    }
    Ok(())
}

/// `log:out` or `log:err` lines of an app's subject: `"out"` or `"err"`; `None` for any other.
fn log_stream(subjects: &Subjects, subject: &str) -> Option<&'static str> {
    match subjects.parse(subject)? {
        Parsed::App {
            kind: kind::LOG_OUT,
            ..
        } => Some("out"),
        Parsed::App {
            kind: kind::LOG_ERR,
            ..
        } => Some("err"),
        _ => None,
    }
}

/// What `info` reports (its `--json` too).
#[derive(Debug, serde::Serialize)]
struct InfoOut {
    /// This CLI's version.
    version: &'static str,
    /// `$FLOTILLA_HOME`.
    home: PathBuf,
    /// The configured NATS URL, else the local stack's once it runs.
    nats_url: Option<String>,
    /// True when no NATS URL is configured: the CLI uses the local stack of `home`.
    local_stack: bool,
    /// The local stack's daemon, when it runs.
    daemon_pid: Option<u32>,
    /// True once a connection to `nats_url` succeeded.
    nats_reachable: bool,
    /// The controllers that answered.
    controllers: Vec<crate::protocol::reply::ControllerInfo>,
    /// The agents, as the best-informed controller sees them.
    hosts: Vec<crate::protocol::fleet::HostView>,
    /// What stands in the way, in one line, if anything.
    problem: Option<String>,
}

/// `flotilla info`: where the CLI points. It does not start the local stack.
pub async fn info(settings: &Settings, a: &ReadArgs) -> anyhow::Result<()> {
    let mut out = InfoOut {
        version: env!("CARGO_PKG_VERSION"),
        home: settings.home.clone(),
        nats_url: settings.nats.url.clone(),
        local_stack: settings.nats.url.is_none(),
        daemon_pid: None,
        nats_reachable: false,
        controllers: vec![],
        hosts: vec![],
        problem: None,
    };
    let mut s = settings.clone();
    if out.local_stack {
        match crate::stack::running(&settings.home)? {
            Some(st) => {
                out.daemon_pid = Some(st.pid);
                out.nats_url = Some(st.url.clone());
                s.nats.url = Some(st.url);
            }
            None => {
                out.problem = Some(format!(
                    "no local stack runs in {}: any verb (`flotilla ls`) starts one",
                    settings.home.display()
                ));
            }
        }
    }
    if s.nats.url.is_some() {
        match crate::bus::connect_once(&s, "flotilla-info").await {
            Err(e) => out.problem = Some(e.to_string()),
            Ok(nats) => {
                out.nats_reachable = true;
                let subjects = Subjects::new(&s.subject_prefix)?;
                let replies = gather(&nats, &subjects.controllers("info")).await?;
                for r in replies {
                    if let Some(c) = r.controller {
                        out.controllers.push(c);
                    }
                    if out.hosts.len() < r.hosts.len() {
                        out.hosts = r.hosts;
                    }
                }
                if out.controllers.is_empty() {
                    out.problem = Some(format!(
                        "no controller answered within {} s on {}: start `flotilla controller` (the local stack runs one)",
                        ANSWER_TIMEOUT.as_secs(),
                        s.nats_url()
                    ));
                }
            }
        }
    }
    if a.json {
        print_json(&out)?;
    } else {
        print_info(&out);
    }
    Ok(())
}

fn print_info(i: &InfoOut) {
    let style = OutputStyle::detect();
    println!("flotilla {}", i.version);
    println!("home:        {}", i.home.display());
    let how = if i.local_stack {
        match i.daemon_pid {
            Some(p) => format!(" (local stack, daemon pid {p})"),
            None => " (local stack, not running)".into(),
        }
    } else {
        " (fleet)".into()
    };
    println!(
        "nats:        {}{how}{}",
        i.nats_url.as_deref().unwrap_or("-"),
        if i.nats_reachable {
            ""
        } else {
            ", unreachable"
        }
    );
    println!("controllers: {} answering", i.controllers.len());
    for c in &i.controllers {
        println!("  {} on {} (version {})", c.id, c.host, c.version);
    }
    println!("agents:");
    print!("{}", style::host_table(&i.hosts, &style));
    if let Some(p) = &i.problem {
        println!(
            "{}",
            style.paint(&format!("problem: {p}"), comfy_table::Color::Red)
        );
    }
}

/// Every reply to one request within a short window: all controllers answer `info`.
async fn gather(nats: &async_nats::Client, subject: &str) -> anyhow::Result<Vec<Reply>> {
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await?;
    let body = ApiRequest::Info(InfoRequest {
        request_id: Some(Uuid::new_v4()),
    })
    .to_body();
    nats.publish_with_reply(subject.to_string(), inbox, body.into())
        .await?;
    nats.flush().await?;
    let mut out = vec![];
    let first = tokio::time::timeout(ANSWER_TIMEOUT, sub.next()).await;
    if let Ok(Some(m)) = first {
        out.extend(serde_json::from_slice::<Reply>(&m.payload).ok());
        // Others answer within a moment of the first.
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            out.extend(serde_json::from_slice::<Reply>(&m.payload).ok());
        }
    }
    Ok(out)
}

/// `flotilla monit`
pub async fn monit(
    settings: &Settings,
    a: &MonitArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let client = Client::connect(settings).await?;
    let tty = std::io::stdout().is_terminal();
    let style = OutputStyle::detect();
    let mut tick = tokio::time::interval(a.interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut frames = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        let reply = ls_all(&client).await?;
        let mut out = std::io::stdout().lock();
        if a.json {
            serde_json::to_writer(&mut out, &reply.processes)?;
            writeln!(out)?;
        } else {
            if tty {
                write!(out, "\x1b[2J\x1b[H")?;
            }
            let restarts: u32 = reply.processes.iter().map(|p| p.meta.restart_time).sum();
            let mem: u64 = reply.processes.iter().map(|p| p.memory).sum();
            writeln!(
                out,
                "flotilla monit · {} processes · {} restarts · {} · {}  (Ctrl-C to quit)",
                reply.processes.len(),
                restarts,
                style::memory(mem),
                client.url
            )?;
            write!(
                out,
                "{}",
                style::process_table(&reply.processes, &style, now_ms())
            )?;
            if let Some(e) = &reply.error {
                writeln!(out, "{}", e.message)?;
            }
        }
        out.flush()?;
        frames += 1;
        if a.frames.is_some_and(|f| frames >= f) {
            break;
        }
    }
    Ok(())
}
