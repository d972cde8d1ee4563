//! The local stack, driven through the real binary: `ensure` races start exactly one daemon and
//! one nats-server; `flotilla kill` stops workers, daemon and nats-server; desired state
//! survives a kill; clear refusals without nats-server and in a fleet. Every test kills its
//! stack on drop; nothing sleeps.

mod support;

use flotilla::config::Settings;
use flotilla::protocol::api::ApiStartRequest;
use flotilla::protocol::control::TargetRequest;
use flotilla::protocol::reply::Reply;
use flotilla::protocol::{AppSpec, Target};
use flotilla::stack::{self, StackInfo};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::{WAIT, Watch, await_pid_exit};
use uuid::Uuid;

const HOST: &str = "stack-test";

/// Deadline for one run of the binary (a `kill` waits for workers' kill_timeout, a `daemon`
/// for nats-server to start).
const CLI_WITHIN: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_flotilla"))
}

/// Stack starts take it shared; a test that frees its nats-server's port for a while takes it
/// alone, so no other test's stack (tests run at once) can pick that port up in between.
static STARTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A temporary home whose stack is killed (through the binary) on drop.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self) -> PathBuf {
        // The stack records the canonical path.
        std::fs::canonicalize(self.dir.path()).expect("canonical home")
    }

    fn settings(&self) -> Settings {
        Settings {
            home: self.path(),
            host_id: HOST.into(),
            // Any free port: stacks of tests running at once never meet on 4222 (one test kills
            // its nats-server, and another stack's could take the port before it is back).
            nats: flotilla::config::NatsSettings {
                local_port: Some(0),
                ..Default::default()
            },
            heartbeat_interval: Duration::from_millis(200),
            ..Settings::default()
        }
    }

    /// `flotilla <args>` with this home and no NATS URL from the environment, bounded.
    fn flotilla(&self, args: &[&str]) -> Output {
        support::output_or_panic(&mut self.command(args), CLI_WITHIN)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        for k in support::flotilla_vars() {
            c.env_remove(k);
        }
        c.args(args)
            .env("FLOTILLA_HOME", self.dir.path())
            .env("FLOTILLA_NATS__LOCAL_PORT", "0");
        c
    }

    async fn ensure(&self) -> (StackInfo, Vec<String>) {
        let _starting = STARTS.read().await;
        let mut lines = vec![];
        let info = stack::ensure(&self.settings(), bin(), &mut |l| lines.push(l.to_string()))
            .await
            .unwrap_or_else(|e| panic!("ensure failed: {e}"));
        (info, lines)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Bounded and never panicking (a panic while a failed test unwinds would abort).
        if let Err(e) = support::output_within(&mut self.command(&["kill"]), CLI_WITHIN) {
            eprintln!("cleaning up {}: {e}", self.dir.path().display());
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Processes whose command line mentions `home`: (pid, argv).
fn processes_of(home: &Path) -> Vec<(u32, Vec<String>)> {
    let needle = home.display().to_string();
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.iter().any(|a| a.contains(&needle)) {
            out.push((pid, argv));
        }
    }
    out
}

async fn api(client: &async_nats::Client, verb: &str, body: Vec<u8>) -> Reply {
    let m = tokio::time::timeout(
        WAIT,
        client.request(format!("pmctl.api.{verb}"), body.into()),
    )
    .await
    .expect("the controller answers in time")
    .expect("request");
    serde_json::from_slice(&m.payload).expect("a reply")
}

async fn ls(client: &async_nats::Client) -> Reply {
    let req = TargetRequest::new(Target::All);
    api(client, "ls", serde_json::to_vec(&req).unwrap()).await
}

#[test]
fn racing_ensures_start_exactly_one_stack_that_answers() {
    let home = Home::new();
    // A stale stack.json (its daemon long gone) must not fool anyone.
    std::fs::write(
        home.path().join("stack.json"),
        r#"{"url":"nats://127.0.0.1:1","pid":1,"nats_pid":1,"home":"/","version":"0","started_at":0,"sync_always":false}"#,
    )
    .unwrap();
    // Three CLIs at once, each on its own thread and runtime (flock conflicts between open
    // files, so threads race exactly as processes would).
    let results: Vec<(StackInfo, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(home.ensure())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let info = results[0].0.clone();
    for (i, _) in &results {
        assert_eq!(i, &info, "every CLI got the same stack");
    }
    let starters = results
        .iter()
        .filter(|(_, lines)| {
            lines
                .iter()
                .any(|l| l.starts_with("starting the local stack"))
        })
        .count();
    assert_eq!(starters, 1, "exactly one CLI started it: {results:?}");
    assert_eq!(info.home, home.path());
    assert!(info.url.starts_with("nats://127.0.0.1:"), "{}", info.url);
    let v = support::output_or_panic(Command::new("nats-server").arg("--version"), CLI_WITHIN);
    let pre_2_10 = text(&v.stdout).contains(" v2.9.") || text(&v.stdout).contains(" v2.8.");
    assert_eq!(
        info.sync_always, !pre_2_10,
        "sync_interval: always from 2.10 on"
    );

    // Exactly one daemon and one nats-server for this home.
    let procs = processes_of(&home.path());
    let daemons: Vec<_> = procs
        .iter()
        .filter(|(_, a)| a.iter().any(|x| x == "daemon"))
        .collect();
    let servers: Vec<_> = procs
        .iter()
        .filter(|(_, a)| a[0].ends_with("nats-server"))
        .collect();
    assert_eq!(daemons.len(), 1, "{procs:?}");
    assert_eq!(servers.len(), 1, "{procs:?}");
    assert_eq!(daemons[0].0, info.pid);
    assert_eq!(servers[0].0, info.nats_pid);
    let on_disk: StackInfo =
        serde_json::from_slice(&std::fs::read(home.path().join("stack.json")).unwrap()).unwrap();
    assert_eq!(on_disk, info);
    assert_eq!(stack::running(&home.path()).unwrap(), Some(info.clone()));

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        // The URL answers, and so does the stack's controller.
        let client = async_nats::connect(info.url.as_str()).await.unwrap();
        let r = ls(&client).await;
        assert!(r.error.is_none(), "{r:?}");
        // A second daemon for the same home is refused at once, naming the first.
        let out = home.flotilla(&["daemon"]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("already runs") && err.contains(&info.pid.to_string()),
            "{err}"
        );
        // And ensure now finds it without starting anything.
        let (again, lines) = home.ensure().await;
        assert_eq!(again, info);
        assert!(lines.is_empty(), "{lines:?}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stops_workers_daemon_and_nats_server() {
    let home = Home::new();
    let (info, lines) = home.ensure().await;
    assert!(
        lines[0].starts_with("starting the local stack in "),
        "{lines:?}"
    );
    let client = async_nats::connect(info.url.as_str()).await.unwrap();
    let mut events = Watch::new(&client, "pm.default.w.process:event").await;
    let r = support::request(
        &client,
        HOST,
        support::start(support::fixture_spec("w", "worker.py")),
    )
    .await;
    assert!(r.error.is_none(), "{r:?}");
    let worker = events.event(0, "online").await.env.process.pid;

    let out = home.flotilla(&["kill"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("stopped the local stack")
            && said.contains(&format!("daemon pid {}", info.pid))
            && said.contains(&format!("nats-server pid {}", info.nats_pid)),
        "{said}"
    );
    assert!(
        text(&out.stderr).contains("stopping workers, daemon and nats-server"),
        "{}",
        text(&out.stderr)
    );
    for (what, pid) in [
        ("worker", worker),
        ("daemon", info.pid),
        ("nats-server", info.nats_pid),
    ] {
        assert!(
            await_pid_exit(pid as i32, WAIT).await,
            "{what} (pid {pid}) is gone"
        );
    }
    let h = home.path();
    assert!(!h.join("stack.json").exists());
    assert!(h.join("nats").is_dir(), "the JetStream store is kept");
    assert_eq!(stack::running(&h).unwrap(), None);

    let out = home.flotilla(&["kill"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("no local stack runs in"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_survives_kill_and_a_new_start() {
    let home = Home::new();
    let (info, _) = home.ensure().await;
    let client = async_nats::connect(info.url.as_str()).await.unwrap();
    let mut events = Watch::new(&client, "pm.default.kept.process:event").await;
    let req =
        start_through_the_controller(&client, support::fixture_spec("kept", "worker.py")).await;
    events
        .until("kept online", |s| {
            s.env
                .event
                .as_ref()
                .is_some_and(|e| e.event.as_str() == "online")
        })
        .await;
    drop(client);
    let out = home.flotilla(&["kill"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let (again, lines) = home.ensure().await;
    assert_ne!(again.pid, info.pid, "a new daemon");
    assert!(
        lines[0].starts_with("starting the local stack"),
        "{lines:?}"
    );
    let client = async_nats::connect(again.url.as_str()).await.unwrap();
    let mut beats = Watch::new(&client, &format!("pm._fleet.{HOST}.host:heartbeat")).await;
    beats.next_raw().await;
    beats.next_raw().await;
    let r = ls(&client).await;
    assert!(r.error.is_none(), "{r:?}");
    let names: Vec<_> = r.processes.iter().map(|p| p.meta.name.as_str()).collect();
    assert_eq!(names, ["kept"], "the app came back: {r:?}");
    // And the controller still knows it (desired state in the JetStream store).
    let again_req = ApiStartRequest {
        request_id: Uuid::new_v4(),
        ..req
    };
    let r = api(&client, "start", serde_json::to_vec(&again_req).unwrap()).await;
    assert!(
        r.error
            .as_ref()
            .is_some_and(|e| e.message.contains("already runs")),
        "{r:?}"
    );
}

#[test]
fn without_nats_server_the_daemon_says_how_to_get_it() {
    let home = Home::new();
    let empty = tempfile::tempdir().unwrap();
    let out = support::output_or_panic(
        home.command(&["daemon"]).env("PATH", empty.path()),
        CLI_WITHIN,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("nats-server is not installed (needed for the local stack): `apt-get install nats-server`, or set nats.url / FLOTILLA_NATS_URL to use a running server"),
        "{err}"
    );
    assert!(!home.path().join("stack.json").exists());
    assert_eq!(
        stack::running(&home.path()).unwrap(),
        None,
        "it did not stay"
    );
}

#[test]
fn kill_in_a_fleet_refuses_and_points_to_stop_all() {
    let home = Home::new();
    let url = "nats://127.0.0.1:4999";
    for out in [
        home.flotilla(&["--nats-url", url, "kill"]),
        support::output_or_panic(
            home.command(&["kill"]).env("FLOTILLA_NATS_URL", url),
            CLI_WITHIN,
        ),
    ] {
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "flotilla kill stops the local stack; this CLI points at {url} (a fleet): use `flotilla stop all`"
            )),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_cannot_start_says_why_with_its_log() {
    let home = Home::new();
    // The JetStream store cannot be created where a file stands.
    std::fs::write(home.path().join("nats"), "not a folder").unwrap();
    let _starting = STARTS.read().await;
    let err = stack::ensure(&home.settings(), bin(), &mut |_| {})
        .await
        .expect_err("the stack cannot start");
    let msg = err.to_string();
    assert!(
        msg.contains("did not start")
            && msg.contains("exited before it was ready")
            && msg.contains("daemon.log")
            && msg.contains(&format!(
                "cannot create {}",
                home.path().join("nats").display()
            )),
        "{msg}"
    );
    assert_eq!(stack::running(&home.path()).unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_is_restarted_on_the_same_port_when_it_dies() {
    let home = Home::new();
    let (info, _) = home.ensure().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |ev| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ev.to_string());
            }
        })
        .connect(info.url.as_str())
        .await
        .unwrap();
    // The controller says when it serves again after a reconnection.
    let mut serving = Watch::new(&client, "pmctl.controller.serving").await;
    // No other test's stack starts while the port is free (it could take it).
    let _alone = STARTS.write().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(info.nats_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(await_pid_exit(info.nats_pid as i32, WAIT).await);
    // The same URL answers again: our client reconnects.
    tokio::time::timeout(WAIT, async {
        while let Some(ev) = rx.recv().await {
            if ev == "connected" {
                break;
            }
        }
    })
    .await
    .expect("the client reconnected to the same URL");
    // The stack's own clients reconnect on their own schedule. Our client has resubscribed
    // (its request below leaves after its subscriptions): if the controller does not answer
    // yet, its reconnection comes later and ends with its announcement, which we then hear.
    // (Once, a request made just then went unanswered for 10 s instead of "no responders":
    // any error waits for the announcement.)
    if client
        .request("pmctl.controllers.info", "{}".into())
        .await
        .is_err()
    {
        support::within("the controller announcing it serves again", async {
            loop {
                let m = serving.next_raw().await;
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                if v["connection"].as_u64().is_some_and(|n| n >= 2) {
                    break;
                }
            }
        })
        .await;
    }
    assert!(ls(&client).await.error.is_none());
    let servers: Vec<u32> = processes_of(&home.path())
        .into_iter()
        .filter(|(_, a)| a[0].ends_with("nats-server"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        servers.len(),
        1,
        "{servers:?} (the killed one was {}): {:?}",
        info.nats_pid,
        processes_of(&home.path())
    );
    assert_ne!(servers[0], info.nats_pid);
    // The daemon records the new pid when the server says it listens, before our client could
    // reconnect and get an answer through the stack.
    let now = stack::running(&home.path())
        .unwrap()
        .expect("still running");
    assert_eq!((now.url.as_str(), now.pid), (info.url.as_str(), info.pid));
    assert_eq!(now.nats_pid, servers[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_hard_leaves_no_worker_holding_the_port() {
    let home = Home::new();
    let (info, _) = home.ensure().await;
    let client = async_nats::connect(info.url.as_str()).await.unwrap();
    let mut events = Watch::new(&client, "pm.default.held.process:event").await;
    // A fork-mode server that never reads its channel: only a signal stops it.
    let port = support::free_port();
    let mut spec = support::fixture_spec("held", "listen.py");
    spec.listen = vec![format!("tcp://127.0.0.1:{port}")];
    start_through_the_controller(&client, spec).await;
    let worker = events
        .until("held online", |s| {
            s.env
                .event
                .as_ref()
                .is_some_and(|e| e.event.as_str() == "online")
        })
        .await
        .env
        .process
        .pid;
    // Serving: it answers with its pid (the program itself, past any launcher shim).
    let who = ask(port).await;
    assert!(who.contains(&format!("\"pid\": {worker}")), "{who}");
    drop(client);
    // The daemon (agent, controller) dies without stopping anything.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(info.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        await_pid_exit(info.pid as i32, WAIT).await,
        "the daemon is gone"
    );
    // The kernel stops the orphan (PR_SET_PDEATHSIG = its kill_signal).
    assert!(
        await_pid_exit(worker as i32, WAIT).await,
        "worker {worker} outlived its agent"
    );
    // So the next stack binds the port again, and the app serves.
    let (again, _) = home.ensure().await;
    let client = async_nats::connect(again.url.as_str()).await.unwrap();
    let mut events = Watch::new(&client, "pm.default.held.process:event").await;
    let r = ls(&client).await;
    if !r
        .processes
        .iter()
        .any(|p| p.meta.status == flotilla::protocol::Status::Online)
    {
        events
            .until("held online again", |s| {
                s.env
                    .event
                    .as_ref()
                    .is_some_and(|e| e.event.as_str() == "online")
            })
            .await;
    }
    let answer = ask(port).await;
    assert!(answer.contains("\"pm_id\""), "{answer}");
}

/// Waits until the controller has heard the agent (two heartbeats: by the second), then starts
/// `spec` through the controller's API; returns the request.
async fn start_through_the_controller(
    client: &async_nats::Client,
    spec: AppSpec,
) -> ApiStartRequest {
    let mut beats = Watch::new(client, &format!("pm._fleet.{HOST}.host:heartbeat")).await;
    beats.next_raw().await;
    beats.next_raw().await;
    let req = ApiStartRequest {
        request_id: Uuid::new_v4(),
        app: spec,
        hosts: vec![],
        labels: BTreeMap::new(),
        force: false,
    };
    let r = api(client, "start", serde_json::to_vec(&req).unwrap()).await;
    assert!(r.error.is_none(), "{r:?}");
    req
}

/// Connects and reads the server's one-line answer.
async fn ask(port: u16) -> String {
    let mut c = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("connected in time")
        .expect("the port accepts");
    let mut answer = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_string(&mut c, &mut answer),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    answer
}

#[test]
fn a_command_that_hangs_is_killed_and_reported() {
    let started = std::time::Instant::now();
    let err = support::output_within(
        Command::new("sleep").arg("1000"),
        Duration::from_millis(200),
    )
    .expect_err("sleep 1000 cannot finish in 200 ms");
    assert!(err.contains("did not finish within 200ms: killed"), "{err}");
    assert!(started.elapsed() < WAIT, "bounded");
}
