//! Fleet behaviour end to end: a start one agent refuses is undone on every host, an agent that
//! was away converges when it returns, `spawn:error` reaches the bus, `--host`/`--label`
//! placement through the binary, and `--config`/`FLOTILLA_CONFIG` through the binary. Real
//! nats-server, real agents and workers; every wait is on an event under a deadline.

mod support;

use async_nats::Client;
use flotilla::config::Settings;
use flotilla::protocol::api::ApiStartRequest;
use flotilla::protocol::reply::Reply;
use flotilla::protocol::state::{AppRecord, Assignment};
use flotilla::protocol::{AppSpec, Status};
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
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut s = Settings::default();
        s.nats.url = Some(nats.url());
        let task = tokio::spawn(flotilla::controller::run_ready(
            s,
            async move {
                let _ = rx.await;
            },
            Some(ready_tx),
        ));
        tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("the controller came up in time")
            .expect("the controller is ready");
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
