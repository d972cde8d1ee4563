//! pm2's verbs over the controller's API. Each prints a human table (through [`super::style`])
//! or, with `--json`, the data; errors are one line and a non-zero exit (the caller prints them).

use super::client::{ANSWER_TIMEOUT, Client};
use super::progress::Line;
use super::style::{self, OutputStyle};
use super::{
    DescribeArgs, LogsArgs, MonitArgs, ReadArgs, ScaleArgs, SendArgs, SignalArgs, StartArgs,
    TargetArgs, ecosystem,
};
use crate::config::Settings;
use crate::protocol::api::ApiRequest;
use crate::protocol::api::{ApiStartRequest, ScaleRequest};
use crate::protocol::control::TargetRequest;
use crate::protocol::control::TargetVerb;
use crate::protocol::control::{LogsRequest, SendRequest, SignalRequest};
use crate::protocol::envelope::now_ms;
use crate::protocol::error::ErrorKind;
use crate::protocol::event::ProcessEvent;
use crate::protocol::reply::ChangeKind;
use crate::protocol::reply::{ProcessInfo, Reply};
use crate::protocol::{AppKey, AppSpec, Envelope, Status, Target};
use anyhow::{Context, bail};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// How long a start may take to bring every instance online.
const START_WITHIN: Duration = Duration::from_secs(60);
/// How long stop, restart and delete may take (graceful stops included).
const SETTLE_WITHIN: Duration = Duration::from_secs(120);
/// How long a rolling reload may take.
const RELOAD_WITHIN: Duration = Duration::from_secs(900);
/// How long a read may take.
const READ_WITHIN: Duration = Duration::from_secs(10);

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn target(s: &str) -> anyhow::Result<Target> {
    Target::parse(s).map_err(|e| {
        anyhow::anyhow!("'{s}' is not a target ({e}): use all, a pm_id, an app name or ns/name")
    })
}

/// Is `p` an ecosystem file (by its name)?
fn is_ecosystem(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    [".toml", ".yaml", ".yml", ".json"]
        .iter()
        .any(|e| name.ends_with(e))
        || [".config.js", ".config.cjs", ".config.mjs"]
            .iter()
            .any(|e| name.ends_with(e))
}

/// `flotilla start`
pub async fn start(settings: &Settings, a: &StartArgs) -> anyhow::Result<()> {
    for l in &a.listen {
        crate::protocol::listen::ListenAddr::parse(l)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    }
    if let Some(c) = &a.cron_restart {
        crate::protocol::schedule::CronRestart::parse(c)
            .map_err(|e| anyhow::anyhow!("--cron-restart: {}", e.message))?;
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let path = cwd.join(&a.script);
    let (vars, profiles): (Vec<&String>, Vec<&String>) =
        a.env.iter().partition(|e| e.contains('='));
    if profiles.len() > 1 {
        bail!(
            "--env {} and --env {}: choose one env_<profile>",
            profiles[0],
            profiles[1]
        );
    }
    let profile = profiles.first().map(|s| s.as_str());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let labels = crate::config::parse_labels(&a.labels.join(","))
        .map_err(|e| anyhow::anyhow!("--label: {e} (write --label zone=eu)"))?;
    let apps: Vec<(AppSpec, bool)> = if is_ecosystem(a.script.as_ref()) {
        let eco = ecosystem::load(&path, profile, cpus)?;
        for w in &eco.warnings {
            eprintln!("warning: {w}");
        }
        let mut apps = eco.apps;
        for spec in &mut apps {
            apply_vars(spec, &vars)?;
        }
        // An ecosystem file applies its changes to running apps (pm2).
        apps.into_iter().map(|s| (s, true)).collect()
    } else {
        if let Some(p) = profile {
            bail!(
                "--env {p} selects env_{p} of an ecosystem file; to set a variable write --env {p}=value"
            );
        }
        if !path.exists() {
            // pm2: `start <name|id>` starts a stopped app again.
            if let Ok(t) = Target::parse(&a.script) {
                let client = Client::connect(settings).await?;
                let r = TargetRequest::new(t.clone());
                // Subscribed before asking: every `online` is seen.
                let mut watch = client.watch(client.all_process_events()).await?;
                match client
                    .api(ApiRequest::Targeted(TargetVerb::Restart, r), SETTLE_WITHIN)
                    .await
                {
                    Ok(reply) => {
                        // As for a new app: done when every instance is online (ready).
                        let mut progress = Line::new();
                        let waited = reply_online(
                            &mut watch,
                            &reply,
                            &restarted(&reply),
                            &t.to_string(),
                            &mut progress,
                        )
                        .await;
                        progress.done();
                        after_action(&client, "start", &reply, a.json).await?;
                        return waited.map_err(|e| anyhow::anyhow!("{e}"));
                    }
                    Err(e) if e.refused() == Some(ErrorKind::NotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            bail!(
                "{} does not exist (from {}): give the path of a script, an ecosystem file, or the name of an app",
                a.script,
                cwd.display()
            );
        }
        let script = std::fs::canonicalize(&path).unwrap_or(path.clone());
        let name = match &a.name {
            Some(n) => n.clone(),
            None => script
                .file_stem()
                .and_then(|s| s.to_str())
                .map(crate::protocol::names::sanitise_host_id)
                .unwrap_or_else(|| "app".into()),
        };
        let mut spec = AppSpec::new(&name, &script);
        if let Some(i) = &a.instances {
            spec.instances = Some(ecosystem::parse_instances(i, cpus).ok_or_else(|| {
                anyhow::anyhow!(
                    "-i {i}: write a number, max (one per CPU), 0 (the same) or -N (CPUs minus N)"
                )
            })?);
        }
        if let Some(ns) = &a.namespace {
            spec.namespace = ns.clone();
        }
        spec.cwd = match &a.cwd {
            Some(d) => Some(
                std::fs::canonicalize(cwd.join(d))
                    .map_err(|e| anyhow::anyhow!("--cwd {}: {e}", d.display()))?,
            ),
            None => script.parent().map(Path::to_path_buf),
        };
        spec.interpreter = a.interpreter.clone();
        spec.args = a.args.clone();
        spec.wait_ready = a.wait_ready;
        spec.autorestart = !a.no_autorestart;
        if let Some(m) = &a.max_memory_restart {
            spec.max_memory_restart = Some(ecosystem::parse_bytes(m).ok_or_else(|| {
                anyhow::anyhow!("--max-memory-restart {m}: write a size such as 200M, 1G or 512K")
            })?);
        }
        if let Some(n) = a.max_restarts {
            spec.max_restarts = n;
        }
        if let Some(d) = a.min_uptime {
            spec.min_uptime = d;
        }
        if let Some(d) = a.restart_delay {
            spec.restart_delay = d;
        }
        spec.exp_backoff_restart_delay = a.exp_backoff_restart_delay;
        if let Some(d) = a.kill_timeout {
            spec.kill_timeout = d;
        }
        if let Some(d) = a.listen_timeout {
            spec.listen_timeout = d;
        }
        spec.shutdown_with_message = a.shutdown_with_message;
        spec.cron_restart = a.cron_restart.clone();
        spec.listen = a.listen.clone();
        if a.watch {
            spec.watch = crate::protocol::schedule::Watch::Cwd;
        }
        spec.ignore_watch = a.ignore_watch.clone();
        apply_vars(&mut spec, &vars)?;
        vec![(spec, a.force)]
    };
    for (spec, _) in &apps {
        AppKey::new(&spec.namespace, &spec.name)?;
    }
    let client = Client::connect(settings).await?;
    if client.local {
        for (spec, _) in &apps {
            if !spec.script.exists() {
                bail!(
                    "the script {} of app '{}' does not exist",
                    spec.script.display(),
                    spec.name
                );
            }
        }
    }
    let mut progress = Line::new();
    let mut all_ids = BTreeSet::new();
    let mut failures = vec![];
    for (spec, force) in apps {
        let app = AppKey::new(&spec.namespace, &spec.name)?;
        let n = spec.instances.unwrap_or(1);
        progress.say(&format!("starting {app} ({n} instance{})", plural(n)));
        let mut watch = client.watch(client.subjects.process_event(&app)).await?;
        let req = ApiStartRequest {
            request_id: Uuid::new_v4(),
            app: spec,
            hosts: a.hosts.clone(),
            labels: labels.clone(),
            force: force || a.force,
        };
        let reply = client.api(req, START_WITHIN).await?;
        // Instances a re-applied start removed (scaled down) never come online.
        let ids: BTreeSet<u32> = reply
            .changes
            .iter()
            .filter(|c| !matches!(c.what, ChangeKind::Deleted | ChangeKind::Absent))
            .map(|c| c.pm_id)
            .collect();
        if let Err(e) =
            reply_online(&mut watch, &reply, &ids, &app.to_string(), &mut progress).await
        {
            failures.push(e);
        }
        all_ids.extend(ids);
    }
    progress.done();
    let ls = ls_reply(&client, &TargetRequest::new(Target::All)).await?;
    if a.json {
        let mine: Vec<&ProcessInfo> = ls
            .processes
            .iter()
            .filter(|p| all_ids.contains(&p.meta.pm_id))
            .collect();
        print_json(&mine)?;
    } else {
        print!(
            "{}",
            style::process_table(&ls.processes, &OutputStyle::detect(), now_ms())
        );
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `--env K=V` pairs into the spec.
fn apply_vars(spec: &mut AppSpec, vars: &[&String]) -> anyhow::Result<()> {
    for kv in vars {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k.is_empty() {
            bail!("--env {kv}: the variable needs a name (--env NAME=value)");
        }
        spec.env.insert(k.to_string(), v.to_string());
    }
    Ok(())
}

/// Waits until every id is online (or has failed), from the app's lifecycle events.
async fn wait_online(
    watch: &mut async_nats::Subscriber,
    ids: &BTreeSet<u32>,
    state: &mut BTreeMap<u32, Status>,
    heard: &mut BTreeMap<u32, Option<String>>,
    app: &str,
    progress: &mut Line,
) -> Result<(), String> {
    let mut failed: BTreeMap<u32, String> = BTreeMap::new();
    let done = |state: &BTreeMap<u32, Status>, failed: &BTreeMap<u32, String>| {
        ids.iter()
            .all(|id| state.get(id) == Some(&Status::Online) || failed.contains_key(id))
    };
    let wait = async {
        while !done(state, &failed) {
            let online = ids
                .iter()
                .filter(|id| state.get(id) == Some(&Status::Online))
                .count();
            progress.say(&format!("starting {app}: {online}/{} online", ids.len()));
            let Some(m) = watch.next().await else {
                return false;
            };
            let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) else {
                continue;
            };
            let id = env.process.pm_id;
            if !ids.contains(&id) {
                continue;
            }
            let ev = env.event.as_ref().map(|e| e.event.as_str()).unwrap_or("");
            match ev {
                "online" => {
                    state.insert(id, Status::Online);
                }
                "spawn:error" | "restart overlimit" => {
                    let why = env
                        .event
                        .as_ref()
                        .and_then(|e| e.reason.clone())
                        .unwrap_or_else(|| ev.to_string());
                    failed.insert(id, why);
                }
                "listening" | "listen:error" => {
                    heard.entry(id).or_insert_with(|| listen_outcome(&env));
                }
                _ => {
                    state.insert(id, env.process.status);
                }
            }
        }
        true
    };
    let outcome = tokio::time::timeout(START_WITHIN, wait).await;
    if outcome == Ok(false) {
        return Err(format!(
            "{app}: the connection to NATS ended before every instance was online: `flotilla ls` shows where they are"
        ));
    }
    if outcome.is_err() {
        let late: Vec<String> = ids
            .iter()
            .filter(|id| state.get(id) != Some(&Status::Online))
            .map(u32::to_string)
            .collect();
        return Err(format!(
            "{app}: pm_id {} not online within {} s: `flotilla logs {}` shows why",
            late.join(", "),
            START_WITHIN.as_secs(),
            app.rsplit('/').next().unwrap_or(app)
        ));
    }
    if failed.is_empty() {
        return Ok(());
    }
    let mut reasons: Vec<String> = failed.values().cloned().collect();
    reasons.dedup();
    Err(format!(
        "{app}: pm_id {} did not start: {}",
        failed
            .keys()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        reasons.join("; ")
    ))
}

/// `None` for `listening`, the reason for `listen:error`.
fn listen_outcome(env: &Envelope) -> Option<String> {
    let e = env.event.as_ref()?;
    (e.event == ProcessEvent::ListenError)
        .then(|| e.reason.clone().unwrap_or_else(|| e.event.to_string()))
}

/// The processes a `restart` reply restarted.
fn restarted(reply: &Reply) -> BTreeSet<u32> {
    reply
        .changes
        .iter()
        .filter(|c| c.what == ChangeKind::Restarted)
        .map(|c| c.pm_id)
        .collect()
}

/// Waits until the processes `ids` of a `start` or `restart` reply are online, and fails on a
/// port they cannot have.
async fn reply_online(
    watch: &mut async_nats::Subscriber,
    reply: &Reply,
    ids: &BTreeSet<u32>,
    label: &str,
    progress: &mut Line,
) -> Result<(), String> {
    let mut state: BTreeMap<u32, Status> = reply
        .processes
        .iter()
        .map(|p| (p.meta.pm_id, p.meta.status))
        .collect();
    let mut heard = BTreeMap::new();
    wait_online(watch, ids, &mut state, &mut heard, label, progress).await?;
    listen_failures(ids, &heard, label)
}

/// Fails naming the Node cluster workers that could not listen, and why (the port in use,
/// ...). A cluster worker is online only once its main module has run, so the answers to its
/// `listen()`s, `listen:error` included, came before its `online`.
fn listen_failures(
    ids: &BTreeSet<u32>,
    heard: &BTreeMap<u32, Option<String>>,
    app: &str,
) -> Result<(), String> {
    let failed: BTreeMap<u32, &String> = heard
        .iter()
        .filter(|(id, _)| ids.contains(id))
        .filter_map(|(id, why)| why.as_ref().map(|w| (*id, w)))
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    let mut reasons: Vec<&String> = failed.values().copied().collect();
    reasons.dedup();
    Err(format!(
        "{app}: pm_id {} cannot listen: {} (the app got the error; `flotilla logs {}` shows what it did)",
        failed
            .keys()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        reasons
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        app.rsplit('/').next().unwrap_or(app)
    ))
}

async fn ls_reply(client: &Client, r: &TargetRequest) -> anyhow::Result<Reply> {
    Ok(client
        .api_reply(ApiRequest::Ls(r.clone()), READ_WITHIN)
        .await?)
}

/// What `stop`, `restart`, `reload`, `delete` and friends print: the changes, then the list.
async fn after_action(
    client: &Client,
    verb: &str,
    reply: &Reply,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(reply);
    }
    let style = OutputStyle::detect();
    let names: BTreeMap<u32, String> = reply
        .processes
        .iter()
        .map(|p| (p.meta.pm_id, p.meta.name.clone()))
        .collect();
    for c in &reply.changes {
        let name = names.get(&c.pm_id).map_or("", String::as_str);
        println!(
            "{} {verb} {name}({}): {c}",
            style.paint("✓", comfy_table::Color::Green),
            c.pm_id,
        );
    }
    let ls = ls_reply(client, &TargetRequest::new(Target::All)).await?;
    print!("{}", style::process_table(&ls.processes, &style, now_ms()));
    Ok(())
}

/// `flotilla stop|restart|delete`
pub async fn targeted(settings: &Settings, verb: TargetVerb, a: &TargetArgs) -> anyhow::Result<()> {
    targeted_with(settings, verb, a, 1).await
}

/// Same, with `reload --parallel K`.
pub async fn targeted_with(
    settings: &Settings,
    tverb: TargetVerb,
    a: &TargetArgs,
    parallel: u32,
) -> anyhow::Result<()> {
    let verb = tverb.as_str();
    let t = target(&a.target)?;
    let client = Client::connect(settings).await?;
    let mut r = TargetRequest::new(t.clone());
    r.parallel = parallel.max(1);
    let within = if verb == "reload" {
        RELOAD_WITHIN
    } else {
        SETTLE_WITHIN
    };
    let mut progress = Line::new();
    progress.say(&format!("{verb} {t}"));
    // A reload shows each instance as it comes back; a restart waits until they are online.
    let watcher = if verb == "reload" || verb == "restart" {
        Some(client.watch(client.all_process_events()).await?)
    } else {
        None
    };
    let call = client.api_reply(ApiRequest::Targeted(tverb, r), within);
    let reply = match watcher {
        Some(mut sub) if verb == "restart" => {
            let reply = call.await?;
            // Instances whose new run is still launching (a Node cluster worker booting, or
            // waiting for 'ready') are shown once online, as `start` does.
            if let Err(e) = reply_online(
                &mut sub,
                &reply,
                &restarted(&reply),
                &t.to_string(),
                &mut progress,
            )
            .await
            {
                progress.done();
                after_action(&client, verb, &reply, a.json).await?;
                bail!("{e}");
            }
            reply
        }
        Some(mut sub) => {
            tokio::pin!(call);
            let mut back = 0;
            loop {
                tokio::select! {
                    r = &mut call => break r?,
                    Some(m) = sub.next() => {
                        if let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload)
                            && t.matches(&env.process)
                            && env.event.as_ref().is_some_and(|e| e.event == ProcessEvent::Online)
                        {
                            back += 1;
                            progress.say(&format!("reload {t}: {back} instance{} back online", if back == 1 { "" } else { "s" }));
                        }
                    }
                }
            }
        }
        None => call.await?,
    };
    progress.done();
    after_action(&client, verb, &reply, a.json).await?;
    if let Some(e) = reply.error {
        bail!("{}", e.message);
    }
    Ok(())
}

/// `flotilla scale`
pub async fn scale(settings: &Settings, a: &ScaleArgs) -> anyhow::Result<()> {
    let app = target(&a.app)?;
    if matches!(app, Target::All | Target::Id(_)) {
        bail!("scale wants an app name (or ns/name), not '{}'", a.app);
    }
    let bad = || {
        anyhow::anyhow!(
            "scale {} {}: write a number (4), or a change (+2, -1)",
            a.app,
            a.instances
        )
    };
    let s = a.instances.trim();
    let (instances, change) = if let Some(d) = s.strip_prefix('+') {
        (0, Some(d.parse::<i64>().map_err(|_| bad())?))
    } else if let Some(d) = s.strip_prefix('-') {
        (0, Some(-d.parse::<i64>().map_err(|_| bad())?))
    } else {
        (s.parse::<u32>().map_err(|_| bad())?, None)
    };
    let client = Client::connect(settings).await?;
    let mut progress = Line::new();
    progress.say(&format!("scaling {app} to {s}"));
    let r = ScaleRequest {
        request_id: Uuid::new_v4(),
        app,
        instances,
        change,
    };
    let reply = client.api_reply(r, START_WITHIN).await?;
    progress.done();
    after_action(&client, "scale", &reply, a.json).await?;
    if let Some(e) = reply.error {
        bail!("{}", e.message);
    }
    Ok(())
}

/// `flotilla ls`
pub async fn ls(settings: &Settings, a: &ReadArgs) -> anyhow::Result<()> {
    let client = Client::connect(settings).await?;
    let reply = ls_reply(&client, &TargetRequest::new(Target::All)).await?;
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
        let filter = match &t {
            Target::Name {
                namespace: Some(ns),
                name,
            } => format!("{}.{ns}.{name}.*", client.subjects.prefix()),
            Target::Name {
                namespace: None,
                name,
            } => format!("{}.*.{name}.*", client.subjects.prefix()),
            _ => format!("{}.*.*.*", client.subjects.prefix()),
        };
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
    let log_out = format!(".{}", crate::protocol::subjects::kind::LOG_OUT);
    let log_err = format!(".{}", crate::protocol::subjects::kind::LOG_ERR);
    loop {
        let m = tokio::select! {
            m = sub.next() => m,
            _ = &mut stop => break,
        };
        let Some(m) = m else { break };
        let stream = if m.subject.ends_with(log_out.as_str()) {
            "out"
        } else if m.subject.ends_with(log_err.as_str()) {
            "err"
        } else {
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

/// `flotilla send`
pub async fn send(settings: &Settings, a: &SendArgs) -> anyhow::Result<()> {
    let t = target(&a.target)?;
    let message: serde_json::Value = serde_json::from_str(&a.json_message).map_err(|e| {
        anyhow::anyhow!(
            "the message is not valid JSON ({e}): quote it for the shell, e.g. '{{\"topic\":\"reload\"}}' or '\"text\"'"
        )
    })?;
    let client = Client::connect(settings).await?;
    let r = SendRequest {
        request_id: Uuid::new_v4(),
        target: t,
        message,
        pm_ids: vec![],
    };
    let reply = client.api_reply(r, READ_WITHIN).await?;
    print_changes(&reply, "send", a.json)?;
    if let Some(e) = reply.error {
        bail!("{}", e.message);
    }
    Ok(())
}

/// `flotilla signal`
pub async fn signal(settings: &Settings, a: &SignalArgs) -> anyhow::Result<()> {
    crate::protocol::signals::parse(&a.signal)?;
    let t = target(&a.target)?;
    let client = Client::connect(settings).await?;
    let r = SignalRequest {
        request_id: Uuid::new_v4(),
        target: t,
        signal: a.signal.clone(),
        pm_ids: vec![],
    };
    let reply = client.api_reply(r, READ_WITHIN).await?;
    print_changes(&reply, "signal", a.json)?;
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

/// What `info` reports.
#[derive(Debug, serde::Serialize)]
struct InfoOut {
    version: &'static str,
    home: PathBuf,
    nats_url: Option<String>,
    local_stack: bool,
    daemon_pid: Option<u32>,
    nats_reachable: bool,
    controllers: Vec<crate::protocol::reply::ControllerInfo>,
    hosts: Vec<crate::protocol::fleet::HostView>,
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
                let subjects = crate::protocol::Subjects::new(&s.subject_prefix)?;
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
    let body = serde_json::to_vec(&serde_json::json!({"request_id": Uuid::new_v4()}))?;
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
        let reply = ls_reply(&client, &TargetRequest::new(Target::All)).await?;
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
