//! Fleet behaviour end to end: a start one agent refuses is undone on every host, an agent that
//! was away converges when it returns, `spawn:error` reaches the bus, `--host`/`--label`
//! placement through the binary, hosts gone (`offline`) or lost (silent) are not placed on, and
//! `--config`/`FLOTILLA_CONFIG` through the binary. Real
//! nats-server, real agents and workers; every wait is on an event under a deadline.

mod support;

use async_nats::Client;
use flotilla::config::Settings;
use flotilla::protocol::api::ApiStartRequest;
use flotilla::protocol::reply::Reply;
use flotilla::protocol::state::{AppRecord, Assignment};
use flotilla::protocol::{AppSpec, Status};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use support::*;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A controller running in-process, ready; stopped on `stop()` (asked to stop on drop).
struct Controller {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), flotilla::controller::ControllerError>>>,
}

impl Controller {
    async fn start(nats: &NatsServer) -> Controller {
        Self::start_with(nats, |_| {}).await
    }

    async fn start_with(nats: &NatsServer, f: impl FnOnce(&mut Settings)) -> Controller {
        let (tx, task) = start_controller(nats.url(), f).await;
        Controller {
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("the controller stopped in time")
                .expect("the controller task ran")
                .expect("the controller stopped cleanly");
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits (under one overall deadline) until each of `hosts` has sent two heartbeats on `beats`
/// (a watch on `pm._fleet.*.host:heartbeat` made before they started): the controller has
/// taken the first by then.
async fn heard(beats: &mut Watch, hosts: &[&str]) {
    let wanted: Vec<String> = hosts
        .iter()
        .map(|h| format!("pm._fleet.{h}.host:heartbeat"))
        .collect();
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    tokio::time::timeout(WAIT, async {
        while wanted
            .iter()
            .any(|w| count.get(w).copied().unwrap_or(0) < 2)
        {
            let m = beats.next_raw().await;
            *count.entry(m.subject.to_string()).or_default() += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("two heartbeats of each of {hosts:?} in time: {count:?}"));
}

/// An agent run as the real binary, in a working directory of its own (the one per-host
/// difference agents on one machine can have: a relative path resolves against it). Stopped
/// with SIGTERM (its workers with it) on `stop()` and on drop.
struct BinAgent {
    child: std::process::Child,
    _home: tempfile::TempDir,
}

impl BinAgent {
    fn spawn(url: &str, host: &str, cwd: &Path) -> BinAgent {
        let home = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
        for k in flotilla_vars() {
            cmd.env_remove(k);
        }
        cmd.env("FLOTILLA_HEARTBEAT_INTERVAL", "200ms")
            .args(["agent", "--nats-url", url, "--host-id", host, "--home"])
            .arg(home.path())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        BinAgent {
            child: cmd.spawn().expect("the flotilla binary runs"),
            _home: home,
        }
    }

    fn term(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    async fn stop(mut self) {
        self.term();
        assert!(
            await_pid_exit(self.child.id() as i32, Duration::from_secs(30)).await,
            "the agent stopped on SIGTERM in 30 s"
        );
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the agent exited cleanly: {status}");
    }
}

impl Drop for BinAgent {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        self.term();
        // Bounded: a pidfd becomes readable when the agent exits.
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.child.id() as i32, 0) };
        if fd >= 0 {
            let mut p = libc::pollfd {
                fd: fd as i32,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the descriptor is ours and closed right after.
            unsafe {
                libc::poll(&mut p, 1, 30_000);
                libc::close(fd as i32);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request to the controller's API, decoded.
async fn api(client: &Client, verb: &str, body: &impl serde::Serialize) -> Reply {
    let m = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(
            format!("pmctl.api.{verb}"),
            serde_json::to_vec(body).unwrap().into(),
        ),
    )
    .await
    .expect("the controller answers")
    .expect("the request went out");
    serde_json::from_slice(&m.payload).expect("the reply decodes")
}

/// The desired state as kept in KV: the app record and each host's assignment.
async fn desired(
    client: &Client,
    app: &str,
    hosts: &[&str],
) -> (Option<AppRecord>, BTreeMap<String, Assignment>) {
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(flotilla::protocol::state::BUCKET)
        .await
        .expect("the desired-state bucket exists");
    let rec = kv
        .get(format!("app.default.{app}"))
        .await
        .unwrap()
        .map(|b| serde_json::from_slice(&b).expect("an app record"));
    let mut out = BTreeMap::new();
    for h in hosts {
        if let Some(b) = kv.get(format!("assign.{h}")).await.unwrap() {
            out.insert(
                h.to_string(),
                serde_json::from_slice(&b).expect("an assignment"),
            );
        }
    }
    (rec, out)
}

/// The pm_ids an assignment gives `app`.
fn assigned(a: Option<&Assignment>, app: &str) -> Vec<u32> {
    a.map(|a| {
        a.apps
            .iter()
            .filter(|x| x.spec.name == app)
            .flat_map(|x| x.spec.pm_ids.clone())
            .collect()
    })
    .unwrap_or_default()
}

/// What an agent's own table holds: (pm_id, status) of every process.
async fn table(client: &Client, host: &str) -> Vec<(u32, Status)> {
    let r = request(client, host, targeted("list", "all")).await;
    assert!(r.error.is_none(), "list on {host}: {r:?}");
    r.processes
        .iter()
        .map(|p| (p.meta.pm_id, p.meta.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_one_agent_refuses_is_undone_on_every_host() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut beats = Watch::new(&client, "pm._fleet.*.host:heartbeat").await;
    let ctl = Controller::start(&nats).await;
    // `a` runs in this process, whose working directory has no `<rel>/app.sh`; `b` runs in a
    // directory that has it. The spec's cwd is relative, so each agent resolves the script
    // against its own working directory: there only on `b`.
    let rel = format!("flotilla-rel-{}", Uuid::new_v4().simple());
    assert!(!Path::new(&rel).exists());
    let b_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(b_dir.path().join(&rel)).unwrap();
    std::fs::write(b_dir.path().join(&rel).join("app.sh"), "exec sleep 600\n").unwrap();
    let a = TestAgent::start(&nats, "a").await;
    let b = BinAgent::spawn(&nats.url(), "b", b_dir.path());
    heard(&mut beats, &["a", "b"]).await;
    let mut events = Watch::new(&client, "pm.default.half.process:event").await;

    let mut app = AppSpec::new("half", "app.sh");
    app.cwd = Some(rel.clone().into());
    app.instances = Some(2);
    let req = ApiStartRequest {
        request_id: Uuid::new_v4(),
        app,
        hosts: vec!["a".into(), "b".into()],
        labels: BTreeMap::new(),
        force: false,
    };
    let r = api(&client, "start", &req).await;
    let e = r.error.expect("the start is refused");
    assert!(
        e.message.contains("does not exist on host a") && e.message.contains("nothing was started"),
        "{e}"
    );
    assert!(!e.message.contains("host b"), "b did not refuse: {e}");
    // `b` did start its share, and the undo deleted it there.
    events
        .until("b's instance started", |s| {
            s.env.process.host == "b" && event_name(s) == Some("online")
        })
        .await;
    events
        .until("b's instance deleted by the undo", |s| {
            s.env.process.host == "b" && event_name(s) == Some("delete")
        })
        .await;
    assert_eq!(table(&client, "a").await, vec![]);
    assert_eq!(table(&client, "b").await, vec![]);
    let (rec, assignments) = desired(&client, "half", &["a", "b"]).await;
    assert!(rec.is_none(), "no app record is left: {rec:?}");
    for h in ["a", "b"] {
        assert_eq!(
            assigned(assignments.get(h), "half"),
            Vec::<u32>::new(),
            "{h}"
        );
    }
    // Nothing half-written stays behind: the same app started where its script is works.
    let retry = ApiStartRequest {
        request_id: Uuid::new_v4(),
        hosts: vec!["b".into()],
        ..req
    };
    let r = api(&client, "start", &retry).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.processes.len(), 2, "{r:?}");
    b.stop().await;
    a.stop().await.unwrap();
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_was_away_converges_when_it_returns() {
    let mut fleet = Fleet::start(&["h1", "h2"]).await;
    let client = fleet.nats.client().await;
    let mut events = Watch::new(&client, "pm.default.away.process:event").await;
    let script = fixture("chatty.js");
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            script.to_str().unwrap(),
            "-i",
            "2",
            "--host",
            "h2",
            "--name",
            "away",
        ])
        .await;
    assert!(ok, "{err}");
    let (_, asg) = desired(&client, "away", &["h2"]).await;
    let both = assigned(asg.get("h2"), "away");
    assert_eq!(both.len(), 2, "{asg:?}");
    events.all_online(&both).await;

    // h2 goes away (a clean stop: its workers stop with it); its home keeps the local copy of
    // its assignment (both instances), which it starts from when it comes back.
    let h2 = fleet.agents.pop().unwrap();
    assert_eq!(h2.host, "h2");
    let (res, home) = h2.stop_keep_home().await;
    res.unwrap();
    let (ok, _, err) = fleet.cli(&["scale", "away", "1"]).await;
    assert!(!ok);
    assert!(err.contains("h2") && err.contains("converges"), "{err}");
    let (_, asg) = desired(&client, "away", &["h2"]).await;
    let kept = assigned(asg.get("h2"), "away");
    assert_eq!(kept.len(), 1, "{asg:?}");

    // h2 comes back with the same id and home: once it is online, each event of its
    // processes is a moment to look at its table, until the table is the desired state.
    let mut host_events = Watch::new(&client, "pm._fleet.h2.host:event").await;
    let back = TestAgent::spawn_in(home, &fleet.nats.url(), "h2", |_| {});
    let m = host_events.next_raw().await;
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["event"], "online", "{v}");
    let want = vec![(kept[0], Status::Online)];
    let mut last = vec![];
    let converged = tokio::time::timeout(WAIT, async {
        loop {
            last = table(&client, "h2").await;
            if last == want {
                return;
            }
            events
                .until("an event of h2's processes", |s| s.env.process.host == "h2")
                .await;
        }
    })
    .await;
    assert!(
        converged.is_ok(),
        "h2 converged to {want:?} in time; its table: {last:?}"
    );
    fleet.agents.push(back);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_that_fails_emits_spawn_error_with_its_reason() {
    let nats = NatsServer::start();
    let agent = TestAgent::start(&nats, "web-1").await;
    let client = nats.client().await;

    // The address is held by the test: the agent cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let mut events = Watch::new(&client, "pm.default.taken.process:event").await;
    let mut spec = AppSpec::new("taken", fixture("listen.js"));
    spec.listen = vec![format!("tcp://{addr}")];
    let r = request(&client, "web-1", start(spec)).await;
    assert!(r.error.is_some(), "the start says it failed: {r:?}");
    let seen = events
        .until("spawn:error of taken", |s| {
            event_name(s) == Some("spawn:error")
        })
        .await;
    assert_eq!(seen.env.process.status, Status::Errored);
    let reason = seen.env.event.unwrap().reason.expect("a reason");
    assert!(
        reason.contains(&addr) && reason.contains("web-1") && reason.contains("another process"),
        "{reason}"
    );

    drop(held);
    agent.stop().await.unwrap();
}

/// `ls --json` through the binary: (name, host) of every process.
async fn placed(home: &Path, url: &str) -> Vec<(String, String)> {
    let (_, out, err) = run_cli(home, &["--nats-url", url, "ls", "--json"]).await;
    let procs: Vec<Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ls --json: {e}: {out} {err}"));
    procs
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["host"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn hosts_of(all: &[(String, String)], name: &str) -> Vec<String> {
    all.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, h)| h.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_label_place_through_the_binary_and_a_gone_host_is_not_chosen() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut beats = Watch::new(&client, "pm._fleet.*.host:heartbeat").await;
    let ctl = Controller::start(&nats).await;
    let zone = |z: &str| -> BTreeMap<String, String> { [("zone".into(), z.into())].into() };
    let (za, zb) = (zone("a"), zone("b"));
    let a = TestAgent::start_with(&nats, "node-a", |s| s.labels = za).await;
    let b = TestAgent::start_with(&nats, "node-b", |s| s.labels = zb).await;
    heard(&mut beats, &["node-a", "node-b"]).await;
    let home = tempfile::tempdir().unwrap();
    let url = nats.url();
    let cli = async |args: &[&str]| {
        let mut all = vec!["--nats-url", url.as_str()];
        all.extend_from_slice(args);
        run_cli(home.path(), &all).await
    };
    let script = fixture("chatty.js");
    let script = script.to_str().unwrap();

    let (ok, _, err) = cli(&[
        "start", script, "-i", "2", "--name", "on-a", "--host", "node-a",
    ])
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&[
        "start", script, "-i", "2", "--name", "on-b", "--label", "zone=b",
    ])
    .await;
    assert!(ok, "{err}");
    let all = placed(home.path(), &url).await;
    assert_eq!(hosts_of(&all, "on-a"), ["node-a", "node-a"], "{all:?}");
    assert_eq!(hosts_of(&all, "on-b"), ["node-b", "node-b"], "{all:?}");

    let (ok, out, err) = cli(&["start", script, "--name", "nowhere", "--label", "zone=c"]).await;
    assert!(!ok, "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no live host fits") && err.contains("zone=c"),
        "{err}"
    );

    // node-b stops cleanly and says `offline`: it is not placed on any more.
    let (ok, _, err) = cli(&["delete", "on-b"]).await;
    assert!(ok, "{err}");
    let mut host_events = Watch::new(&client, "pm._fleet.node-b.host:event").await;
    b.stop().await.unwrap();
    let m = host_events.next_raw().await;
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["event"], "offline", "{v}");
    // The controller got the same `offline` on its connection before the CLI's request that
    // follows (the server delivers to one connection in order); its run loop handles host
    // events and API requests from separate subscriptions, so the order is not a guarantee,
    // but the CLI process starting takes far longer than recording one event.
    let (ok, _, err) = cli(&["start", script, "-i", "2", "--name", "after"]).await;
    assert!(ok, "{err}");
    let all = placed(home.path(), &url).await;
    assert_eq!(hosts_of(&all, "after"), ["node-a", "node-a"], "{all:?}");
    let (ok, _, err) = cli(&["start", script, "--name", "pinned", "--host", "node-b"]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("node-b") && err.contains("not live"), "{err}");
    let (ok, _, err) = cli(&["start", script, "--name", "labelled", "--label", "zone=b"]).await;
    assert!(!ok);
    assert!(
        err.contains("no live host fits") && err.contains("zone=b"),
        "{err}"
    );
    a.stop().await.unwrap();
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_heartbeats_stopped_is_lost_and_not_chosen() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut beats = Watch::new(&client, "pm._fleet.*.host:heartbeat").await;
    // Lost after 2 s without a heartbeat (agents beat every 200 ms here).
    let ctl = Controller::start_with(&nats, |s| s.host_lost_after = Duration::from_secs(2)).await;
    let a = TestAgent::start(&nats, "node-a").await;
    let cwd = tempfile::tempdir().unwrap();
    let mut c = BinAgent::spawn(&nats.url(), "node-c", cwd.path());
    heard(&mut beats, &["node-a", "node-c"]).await;
    // node-c dies without a word (no `offline`): only its silence tells.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    // Each heartbeat of node-a is a moment to ask the controller how it sees node-c.
    let mut seen = vec![];
    let lost = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            beats.next_raw().await;
            let m =
                tokio::time::timeout(WAIT, client.request("pmctl.controllers.info", "{}".into()))
                    .await
                    .expect("the controller answers info")
                    .unwrap();
            let r: Reply = serde_json::from_slice(&m.payload).unwrap();
            seen = r
                .hosts
                .iter()
                .map(|h| (h.host.clone(), h.state.clone()))
                .collect();
            if seen.contains(&("node-c".into(), "lost".into())) {
                return;
            }
        }
    })
    .await;
    assert!(lost.is_ok(), "node-c is lost within 10 s: {seen:?}");
    let home = tempfile::tempdir().unwrap();
    let url = nats.url();
    let script = fixture("chatty.js");
    let script = script.to_str().unwrap();
    let (ok, _, err) = run_cli(
        home.path(),
        &[
            "--nats-url",
            &url,
            "start",
            script,
            "-i",
            "2",
            "--name",
            "spread",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let all = placed(home.path(), &url).await;
    assert_eq!(hosts_of(&all, "spread"), ["node-a", "node-a"], "{all:?}");
    let (ok, _, err) = run_cli(
        home.path(),
        &[
            "--nats-url",
            &url,
            "start",
            script,
            "--name",
            "pinned",
            "--host",
            "node-c",
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("node-c") && err.contains("not live"), "{err}");
    a.stop().await.unwrap();
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_and_flotilla_config_are_honoured_by_the_binary() {
    let fleet = Fleet::start(&["web-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    // HOME is a temp dir too: a binary that ignored the file would find no ~/.flotilla of the
    // machine's.
    let user_home = dir.path().join("user");
    std::fs::create_dir(&user_home).unwrap();
    let file_home = dir.path().join("from-file");
    let cfg = dir.path().join("fleet.toml");
    std::fs::write(
        &cfg,
        format!(
            "home = \"{}\"\n[nats]\nurl = \"{}\"\n",
            file_home.display(),
            fleet.nats.url()
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let script = fixture("chatty.js");

    // --config F: the NATS URL and home come from the file; a start reaches this fleet.
    let env = [("HOME", user_home.as_path())];
    let (ok, out, err) = run_cli_env(&env, &["--config", cfg_s, "info", "--json"]).await;
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["nats_url"], fleet.nats.url().as_str(), "{info}");
    assert_eq!(info["home"], file_home.to_str().unwrap(), "{info}");
    assert_eq!(info["controllers"].as_array().unwrap().len(), 1, "{info}");
    let (ok, _, err) = run_cli_env(
        &env,
        &[
            "--config",
            cfg_s,
            "start",
            script.to_str().unwrap(),
            "--name",
            "by-file",
        ],
    )
    .await;
    assert!(ok, "{err}");

    // FLOTILLA_CONFIG=F: the same.
    let env = [
        ("HOME", user_home.as_path()),
        ("FLOTILLA_CONFIG", cfg.as_path()),
    ];
    let (ok, out, err) = run_cli_env(&env, &["info", "--json"]).await;
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["nats_url"], fleet.nats.url().as_str(), "{info}");
    assert_eq!(info["home"], file_home.to_str().unwrap(), "{info}");
    let (ok, out, err) = run_cli_env(&env, &["ls", "--json"]).await;
    assert!(ok, "{err}");
    let procs: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert_eq!(procs[0]["name"], "by-file");
    assert!(fleet.ls().await.iter().any(|p| p["name"] == "by-file"));

    // A broken file: one line naming the file and the key, non-zero exit, either way.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "heartbeat_interval = \"banana\"\n").unwrap();
    let bad_s = bad.to_str().unwrap();
    let env = [("HOME", user_home.as_path())];
    let (ok, _, err) = run_cli_env(&env, &["--config", bad_s, "info", "--json"]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(bad_s) && err.contains("heartbeat_interval"),
        "{err}"
    );
    let env = [
        ("HOME", user_home.as_path()),
        ("FLOTILLA_CONFIG", bad.as_path()),
    ];
    let (ok, _, err) = run_cli_env(&env, &["info", "--json"]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(bad_s) && err.contains("heartbeat_interval"),
        "{err}"
    );
    // A file that is not there is named too.
    let env = [("HOME", user_home.as_path())];
    let missing = dir.path().join("missing.toml");
    let (ok, _, err) = run_cli_env(&env, &["--config", missing.to_str().unwrap(), "ls"]).await;
    assert!(!ok);
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("no such file"),
        "{err}"
    );
    fleet.stop().await;
}
