//! Test fixtures: a real `nats-server -js` per test, an in-process agent, and helpers that
//! await messages under a deadline (never sleep-and-hope).
#![allow(dead_code)]

use async_nats::{Client, Subscriber};
use flotilla::config::Settings;
use flotilla::protocol::control::{Request, StartRequest, TargetRequest};
use flotilla::protocol::reply::Reply;
use flotilla::protocol::{AppSpec, Envelope, Target};
use futures::StreamExt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Default deadline for awaited events.
pub const WAIT: Duration = Duration::from_secs(15);

/// A `nats-server` with JetStream on a free loopback port and its own store; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts on a free port.
    pub fn start() -> Self {
        Self::start_with(None, &[])
    }

    /// Starts on `port` (or a free one) with extra arguments.
    pub fn start_with(port: Option<u16>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = NatsServer {
            child: None,
            port: port.unwrap_or(0),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let port_arg = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(self.dir.path().join("js"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "nats-server not found: install it (apt-get install nats-server) or run .ci/run",
            );
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Listening for client connections on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let port = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(10))
            .ok()
            .flatten()
            .expect("nats-server did not report its port within 10 s");
        self.port = port;
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (a real outage).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A client.
    pub async fn client(&self) -> Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `fut` under one overall deadline (`WAIT`), panicking with what was awaited. For loops
/// that skip messages which keep coming (heartbeats): a per-message deadline alone would let
/// them run forever on a bug.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out ({WAIT:?}) waiting for {what}"))
}

/// Runs `cmd` to its end (stdin closed, output captured) with a deadline: on expiry it is
/// SIGKILLed and the error says what hung. Blocking (a thread waits, the caller waits on it
/// with `recv_timeout`), so it serves `Drop` and plain `#[test]`s too.
pub fn output_within(cmd: &mut Command, within: Duration) -> Result<std::process::Output, String> {
    let what = format!("{:?}", cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what} did not start: {e}"))?;
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.map_err(|e| format!("{what}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(format!("{what} did not finish within {within:?}: killed"))
        }
    }
}

/// Same, panicking with the error.
pub fn output_or_panic(cmd: &mut Command, within: Duration) -> std::process::Output {
    output_within(cmd, within).unwrap_or_else(|e| panic!("{e}"))
}

/// A free loopback port (bound then released). Only for ports a test must name before anything
/// binds them (an app's `--listen` or `PORT`, a server the agent waits for): the kernel may hand
/// the number to another test in between, so a test using it must not conclude anything from
/// someone else holding it (check the socket's inode, as `tests/cli.rs` does). Servers the
/// harness starts itself pick their port with 0 / `-p -1` and read it back.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// (pgid, start time) of the worker groups a test agent was seen to start.
type Groups = std::sync::Arc<std::sync::Mutex<Vec<(i32, Option<u64>)>>>;

/// The result of an in-process agent's `run`.
type AgentTask = tokio::task::JoinHandle<Result<(), flotilla::agent::AgentError>>;

/// An agent running in-process (the same `run` as the binary), stopped on `stop()`.
///
/// Dropped without a clean `stop()` (a test that panicked, or one that never stopped it), it
/// SIGKILLs the process group of every worker it was seen to start (workers are group leaders;
/// some fixtures ignore their kill signal, and grandchildren share the group), tells the agent
/// to stop and waits for it (bounded). Workers are seen through the agent's `process:event`s
/// on NATS, so a worker started while NATS is down is not; `also_kill` adds others (an
/// escapee in a session of its own).
pub struct TestAgent {
    pub host: String,
    pub home: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<AgentTask>,
    /// Told when `run` has returned (a blocking wait for `Drop`).
    done: std::sync::mpsc::Receiver<()>,
    /// (pgid, start time) of each worker seen; the start time tells a reused pid apart.
    groups: Groups,
    recorder: Option<tokio::task::JoinHandle<()>>,
    recording: Option<oneshot::Receiver<()>>,
}

/// Settings for a test agent.
pub fn settings(url: &str, host: &str, home: &Path) -> Settings {
    let mut s = Settings::default();
    s.nats.url = Some(url.into());
    s.host_id = host.into();
    s.home = home.to_path_buf();
    s.heartbeat_interval = Duration::from_millis(200);
    s
}

/// A process's start time (clock ticks since boot; field 22 of `/proc/<pid>/stat`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Records the pid (= pgid) of each worker `host`'s agent reports in a `process:event`.
async fn record_workers(
    url: String,
    host: String,
    groups: Groups,
    subscribed: oneshot::Sender<()>,
) {
    let Ok(client) = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url.as_str())
        .await
    else {
        return;
    };
    let Ok(mut sub) = client.subscribe("*.*.*.process:event").await else {
        return;
    };
    let _ = client.flush().await;
    let _ = subscribed.send(());
    while let Some(m) = sub.next().await {
        let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) else {
            continue;
        };
        let pid = env.process.pid as i32;
        if env.process.host != host || pid <= 0 {
            continue;
        }
        let mut g = groups.lock().unwrap_or_else(|p| p.into_inner());
        if !g.iter().any(|(p, _)| *p == pid) {
            g.push((pid, start_time(pid)));
        }
    }
}

impl TestAgent {
    /// Starts an agent and waits for its `online` host event.
    pub async fn start(nats: &NatsServer, host: &str) -> TestAgent {
        Self::start_with(nats, host, |_| {}).await
    }

    /// Same, with settings adjusted by `f`.
    pub async fn start_with(
        nats: &NatsServer,
        host: &str,
        f: impl FnOnce(&mut Settings),
    ) -> TestAgent {
        let client = nats.client().await;
        let mut online = client
            .subscribe(format!("pm._fleet.{host}.host:event"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let mut agent = Self::spawn(&nats.url(), host, f);
        let msg = tokio::time::timeout(WAIT, online.next())
            .await
            .expect("agent did not come online in time")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["event"], "online");
        if let Some(r) = agent.recording.take() {
            within("the test's worker recorder to subscribe", r)
                .await
                .expect("the recorder subscribed");
        }
        agent
    }

    /// Spawns without waiting (for tests where NATS is not up yet).
    pub fn spawn(url: &str, host: &str, f: impl FnOnce(&mut Settings)) -> TestAgent {
        Self::spawn_in(tempfile::tempdir().unwrap(), url, host, f)
    }

    /// Spawns with a given home (to restart an agent on the same home).
    pub fn spawn_in(
        home: tempfile::TempDir,
        url: &str,
        host: &str,
        f: impl FnOnce(&mut Settings),
    ) -> TestAgent {
        // FLOTILLA_LOG=debug shows the agent's log in a test's output.
        if let Ok(filter) = std::env::var("FLOTILLA_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let mut s = settings(url, host, home.path());
        f(&mut s);
        let groups = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let (subscribed, recording) = oneshot::channel();
        let recorder = tokio::spawn(record_workers(
            url.to_string(),
            host.to_string(),
            groups.clone(),
            subscribed,
        ));
        let (tx, rx) = oneshot::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let task = tokio::spawn(async move {
            let res = flotilla::agent::run(s, async move {
                let _ = rx.await;
            })
            .await;
            let _ = done_tx.send(());
            res
        });
        TestAgent {
            host: host.into(),
            home,
            stop: Some(tx),
            task: Some(task),
            done,
            groups,
            recorder: Some(recorder),
            recording: Some(recording),
        }
    }

    /// Log directory.
    pub fn log_dir(&self) -> PathBuf {
        self.home.path().join("logs")
    }

    /// Has `Drop` SIGKILL process group `pgid` too (e.g. a descendant that left the worker's
    /// group for a session of its own, which makes it a group leader).
    pub fn also_kill(&self, pgid: i32) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pgid, start_time(pgid)));
    }

    /// Waits for the agent's task under `within`; the task stays ours until it has ended, so a
    /// panic here leaves it to `Drop`.
    async fn finish(
        &mut self,
        within: Duration,
        what: &str,
    ) -> Result<(), flotilla::agent::AgentError> {
        let task = self.task.as_mut().expect("the agent task");
        let res = tokio::time::timeout(within, task)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("agent task panicked");
        self.task = None;
        res
    }

    /// Stops the agent and hands back its home.
    pub async fn stop_keep_home(
        mut self,
    ) -> (Result<(), flotilla::agent::AgentError>, tempfile::TempDir) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = self
            .finish(Duration::from_secs(30), "agent did not stop in 30 s")
            .await;
        let home = std::mem::replace(&mut self.home, tempfile::tempdir().unwrap());
        (res, home)
    }

    /// Waits for `run` to return by itself (e.g. on a fatal error), without asking it to stop.
    pub async fn join(mut self) -> Result<(), flotilla::agent::AgentError> {
        self.finish(WAIT, "agent did not end by itself in time")
            .await
    }

    /// Asks the agent to shut down and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), flotilla::agent::AgentError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.finish(Duration::from_secs(30), "agent did not stop in 30 s")
            .await
    }

    /// SIGKILLs every recorded worker group still there (skipping a pid now someone else's).
    fn kill_groups(&self) {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for &(pgid, started) in groups.iter() {
            let now = start_time(pgid);
            if started.is_some() && now.is_some() && now != started {
                continue; // the leader is gone and its pid was reused
            }
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(r) = self.recorder.take() {
            r.abort();
        }
        let Some(task) = self.task.take() else {
            return; // stopped (or ended) cleanly: its workers are stopped
        };
        let panicking = std::thread::panicking();
        if panicking {
            // No graceful stop for a failed test: nothing of it may outlive it.
            self.kill_groups();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // A blocking wait: the agent runs on the runtime's workers, not on this thread (on a
        // current-thread runtime it cannot run while we wait, so do not).
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi && !task.is_finished() {
            let _ = self.done.recv_timeout(Duration::from_secs(10));
        }
        task.abort();
        self.kill_groups();
    }
}

/// Sends a request to an agent and decodes the reply.
pub async fn request(client: &Client, host: &str, req: Request) -> Reply {
    let subject = format!("pmctl.agent.{host}.{}", req.verb());
    let msg = tokio::time::timeout(WAIT, client.request(subject, req.to_body().into()))
        .await
        .expect("no reply in time")
        .expect("request failed");
    serde_json::from_slice(&msg.payload).expect("reply decodes")
}

/// Sends raw bytes to a verb.
pub async fn request_raw(client: &Client, host: &str, verb: &str, body: &[u8]) -> Reply {
    let msg = tokio::time::timeout(
        WAIT,
        client.request(format!("pmctl.agent.{host}.{verb}"), body.to_vec().into()),
    )
    .await
    .expect("no reply in time")
    .expect("request failed");
    serde_json::from_slice(&msg.payload).expect("reply decodes")
}

/// A start request for `spec`.
pub fn start(spec: AppSpec) -> Request {
    StartRequest {
        request_id: Uuid::new_v4(),
        app: spec,
        force: false,
    }
    .into()
}

/// A targeted request (`stop`, `restart`, `reload`, `delete`, `list`).
pub fn targeted(verb: &str, target: &str) -> Request {
    let r = TargetRequest::new(Target::parse(target).unwrap());
    match flotilla::protocol::TargetVerb::from_verb(verb) {
        Some(v) => v.request(r),
        None if verb == "list" => Request::List(r),
        None => panic!("not a targeted verb: {verb}"),
    }
}

/// Variables of the runner's environment that change how a worker's interpreter starts or
/// behaves (a `NODE_OPTIONS=--require …` from an IDE or a coverage tool, a `PYTHONPATH`, a
/// `PYTHONUNBUFFERED` hiding a buffering bug, a `BASH_ENV` sourced by every bash script).
/// Empty is the same as unset for each of them.
pub const RUNNER_ENV: &[&str] = &[
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_DEBUG",
    "NODE_V8_COVERAGE",
    "NODE_EXTRA_CA_CERTS",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONWARNINGS",
    "PYTHONINSPECT",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "BASH_ENV",
    "ENV",
];

/// A spec whose workers do not see the runner's `RUNNER_ENV`: an in-process agent hands its
/// workers its own environment (the test process's), and changing the process's environment
/// while other tests' threads run is unsound, so each spec sets them, empty, in its `env`
/// (which the agent lays over its own).
pub fn clean_env(mut spec: AppSpec) -> AppSpec {
    for k in RUNNER_ENV {
        if std::env::var_os(k).is_some() {
            spec.env.entry(k.to_string()).or_default();
        }
    }
    spec
}

/// A spec for a fixture script, with a clean environment (`clean_env`).
pub fn fixture_spec(name: &str, script: &str) -> AppSpec {
    clean_env(AppSpec::new(name, fixture(script)))
}

/// A fixture script's absolute path.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// An envelope with its subject and headers.
#[derive(Debug, Clone)]
pub struct Seen {
    pub subject: String,
    pub env: Envelope,
    pub msg_id: Option<String>,
}

/// A subscription that decodes envelopes.
pub struct Watch {
    sub: Subscriber,
}

impl Watch {
    /// Subscribes to `filter` and makes sure the server has the subscription.
    pub async fn new(client: &Client, filter: &str) -> Watch {
        let sub = client.subscribe(filter.to_string()).await.unwrap();
        client.flush().await.unwrap();
        Watch { sub }
    }

    /// Next message, raw.
    pub async fn next_raw(&mut self) -> async_nats::Message {
        tokio::time::timeout(WAIT, self.sub.next())
            .await
            .expect("no message in time")
            .expect("subscription ended")
    }

    /// Messages already delivered to the subscription, without waiting.
    pub fn ready_now(&mut self) -> Vec<async_nats::Message> {
        use futures::FutureExt;
        let mut out = vec![];
        while let Some(Some(m)) = self.sub.next().now_or_never() {
            out.push(m);
        }
        out
    }

    /// Waits for the first envelope matching `pred`, skipping the rest.
    pub async fn until(&mut self, what: &str, mut pred: impl FnMut(&Seen) -> bool) -> Seen {
        self.until_within(WAIT, what, &mut pred).await
    }

    /// Same with a deadline.
    pub async fn until_within(
        &mut self,
        within: Duration,
        what: &str,
        pred: &mut impl FnMut(&Seen) -> bool,
    ) -> Seen {
        let fut = async {
            while let Some(m) = self.sub.next().await {
                let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) else {
                    continue;
                };
                let seen = Seen {
                    subject: m.subject.to_string(),
                    env,
                    msg_id: m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string()),
                };
                if pred(&seen) {
                    return seen;
                }
            }
            panic!("subscription ended while waiting for {what}");
        };
        tokio::time::timeout(within, fut)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    /// Waits for a `process:event` named `event` for `pm_id`.
    pub async fn event(&mut self, pm_id: u32, event: &str) -> Seen {
        self.until(&format!("event '{event}' of pm_id {pm_id}"), |s| {
            s.env.process.pm_id == pm_id
                && s.env
                    .event
                    .as_ref()
                    .is_some_and(|e| e.event.as_str() == event)
        })
        .await
    }

    /// Waits until each of `ids` has had its `online` event, in any order (Node workers boot
    /// at their own pace).
    pub async fn all_online(&mut self, ids: &[u32]) {
        let mut left: std::collections::BTreeSet<u32> = ids.iter().copied().collect();
        self.until(&format!("online of pm_ids {ids:?}"), |s| {
            if s.env
                .event
                .as_ref()
                .is_some_and(|e| e.event.as_str() == "online")
            {
                left.remove(&s.env.process.pm_id);
            }
            left.is_empty()
        })
        .await;
    }
}

/// The event name of a seen envelope, if any.
pub fn event_name(s: &Seen) -> Option<&str> {
    s.env.event.as_ref().map(|e| e.event.as_str())
}

/// A worker stopped gracefully: it exited 0 on its own, or its kill signal (SIGINT) ended it.
/// A Node cluster worker told to `disconnect` usually exits by itself; under load the signal
/// that follows its channel's close may still reach it during its own exit (Node's primary
/// has the same race). SIGKILL (kill_timeout passed) is not graceful.
pub fn stopped_gracefully(e: &flotilla::protocol::envelope::EventFields) -> bool {
    e.exit_code == Some(0) || e.signal.as_deref() == Some("SIGINT")
}

/// The text of a seen log line (`log:out` / `log:err`), if it is one.
pub fn log_line(s: &Seen) -> Option<&str> {
    if !s.subject.contains(".log:") {
        return None;
    }
    s.env.data.as_ref().and_then(|d| d.as_str())
}

/// Waits for a process (not our child) to exit, with pidfd (an event, not polling).
pub async fn await_pid_exit(pid: i32, within: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // already gone
    }
    // SAFETY: the syscall just returned this descriptor to us.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: owned is moved into the AsyncFd and stays open for its lifetime.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    }
    .expect("register pidfd");
    tokio::time::timeout(within, afd.readable()).await.is_ok()
}

/// True while `pid` runs: a zombie (exited, not yet reaped, as the in-process agent's workers
/// are for a moment) has exited and counts as gone.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')', since comm may hold one.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X' | 'x'))
        ),
        Err(_) => false,
    }
}

/// A controller running in-process on `url` (settings changed by `f`), once it is ready: the
/// sender stops it, the handle is its task.
pub async fn start_controller(
    url: String,
    f: impl FnOnce(&mut Settings),
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), flotilla::controller::ControllerError>>,
) {
    let (tx, rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut s = Settings::default();
    s.nats.url = Some(url);
    f(&mut s);
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
    (tx, task)
}

/// A fleet in one test: a real nats-server, a controller and agents running in-process, with
/// the controller having heard every agent's heartbeat.
pub struct Fleet {
    pub nats: NatsServer,
    pub agents: Vec<TestAgent>,
    ctl_stop: Option<oneshot::Sender<()>>,
    ctl: Option<tokio::task::JoinHandle<Result<(), flotilla::controller::ControllerError>>>,
    /// The CLI's home (its own, apart from the agents').
    pub cli_home: tempfile::TempDir,
}

impl Fleet {
    /// Starts the server, the controller and one agent per host id.
    pub async fn start(hosts: &[&str]) -> Fleet {
        let nats = NatsServer::start();
        let client = nats.client().await;
        let mut beats = Watch::new(&client, "pm._fleet.*.host:heartbeat").await;
        let (tx, ctl) = start_controller(nats.url(), |_| {}).await;
        let mut agents = vec![];
        for h in hosts {
            agents.push(TestAgent::start(&nats, h).await);
        }
        // A second heartbeat from each host: the controller has taken the first by then.
        let mut count: std::collections::BTreeMap<String, u32> = Default::default();
        within(&format!("two heartbeats from each of {hosts:?}"), async {
            while count.values().filter(|&&n| n >= 2).count() < hosts.len() {
                let m = beats.next_raw().await;
                *count.entry(m.subject.to_string()).or_default() += 1;
            }
        })
        .await;
        Fleet {
            nats,
            agents,
            ctl_stop: Some(tx),
            ctl: Some(ctl),
            cli_home: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs the real binary against this fleet; returns (exit ok, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let url = self.nats.url();
        let mut all = vec!["--nats-url", url.as_str()];
        all.extend_from_slice(args);
        run_cli(self.cli_home.path(), &all).await
    }

    /// `ls --json`, parsed.
    pub async fn ls(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.cli(&["ls", "--json"]).await;
        assert!(ok, "ls failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ls --json: {e}: {out}"))
    }

    /// Stops agents, then the controller.
    pub async fn stop(mut self) {
        for a in self.agents.drain(..) {
            a.stop().await.unwrap();
        }
        if let Some(tx) = self.ctl_stop.take() {
            let _ = tx.send(());
        }
        if let Some(c) = self.ctl.take() {
            c.await.unwrap().unwrap();
        }
    }
}

/// Runs `flotilla` with `args` (FLOTILLA_* variables removed, `FLOTILLA_HOME=home`), bounded.
/// The FLOTILLA_* variables of the test's own environment: every flotilla the tests run goes
/// without them (the CLI refuses unknown ones, and a URL or home from outside would point it
/// elsewhere).
pub fn flotilla_vars() -> Vec<String> {
    std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("FLOTILLA_"))
        .collect()
}

pub async fn run_cli(home: &Path, args: &[&str]) -> (bool, String, String) {
    run_cli_env(&[("FLOTILLA_HOME", home)], args).await
}

/// Runs the binary with `env` set (and no other FLOTILLA_* variable), bounded.
pub async fn run_cli_env(env: &[(&str, &Path)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
    for k in flotilla_vars() {
        cmd.env_remove(k);
    }
    // A local stack this CLI starts hands its workers its own environment: not the runner's
    // interpreter settings. (Workers of the in-process agents of a `Fleet` see the test
    // process's environment, which cannot be changed safely while other tests run; specs
    // made here go through `clean_env`, and the CLI's `start` cannot unset a variable, so a
    // runner's NODE_OPTIONS can still reach those: run the suite without it.)
    for k in RUNNER_ENV {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("NO_COLOR", "1")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("flotilla {args:?} did not finish in 120 s"))
        .expect("the flotilla binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
