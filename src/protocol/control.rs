//! Control plane: request/reply bodies on `pmctl.agent.<host>.<verb>`.
//!
//! One [`Request`] enum, one struct per verb; every request carries a `request_id` (repeating
//! one is harmless: the agent answers it with the reply it gave the first time). New fields get
//! `#[serde(default)]` so agents and controllers of different versions keep talking.

use super::duration;
use super::envelope::{ProcessMeta, Status};
use super::names::{self, NameError, NameKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// The verbs an agent answers.
pub const AGENT_VERBS: &[&str] = &[
    "start", "stop", "restart", "reload", "delete", "send", "signal", "list", "logs",
];

/// Which processes a request is about: a name, `ns/name`, a pm_id, or `all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every process.
    All,
    /// One pm_id.
    Id(u32),
    /// Every instance of an app, in one namespace or in any.
    Name {
        /// `None` matches any namespace.
        namespace: Option<String>,
        /// App name.
        name: String,
    },
}

impl Target {
    /// Parses `all`, `3`, `api` or `ns/api`, validating names.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s == "all" {
            return Ok(Target::All);
        }
        if !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && let Ok(id) = s.parse()
        {
            return Ok(Target::Id(id));
        }
        match s.split_once('/') {
            Some((ns, name)) => {
                names::validate(NameKind::Namespace, ns)?;
                names::validate(NameKind::App, name)?;
                Ok(Target::Name {
                    namespace: Some(ns.into()),
                    name: name.into(),
                })
            }
            None => {
                names::validate(NameKind::App, s)?;
                Ok(Target::Name {
                    namespace: None,
                    name: s.into(),
                })
            }
        }
    }

    /// True when the process matches.
    pub fn matches(&self, m: &ProcessMeta) -> bool {
        match self {
            Target::All => true,
            Target::Id(id) => m.pm_id == *id,
            Target::Name { namespace, name } => {
                m.name == *name && namespace.as_deref().is_none_or(|ns| m.namespace == ns)
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Id(id) => write!(f, "{id}"),
            Target::Name {
                namespace: Some(ns),
                name,
            } => write!(f, "{ns}/{name}"),
            Target::Name {
                namespace: None,
                name,
            } => f.write_str(name),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u32),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(Target::Id(n)),
            Either::S(s) => Target::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Stop exit codes: pm2 accepts a number or a list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExitCodes(pub Vec<i32>);

impl<'de> Deserialize<'de> for ExitCodes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum One {
            N(i32),
            S(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(One),
            Many(Vec<One>),
        }
        let conv = |o: One| -> Result<i32, D::Error> {
            match o {
                One::N(n) => Ok(n),
                One::S(s) => s.trim().parse().map_err(|_| {
                    serde::de::Error::custom(format!("stop_exit_codes: '{s}' is not an exit code"))
                }),
            }
        };
        Ok(ExitCodes(match Either::deserialize(d)? {
            Either::One(o) => vec![conv(o)?],
            Either::Many(v) => v.into_iter().map(conv).collect::<Result<_, _>>()?,
        }))
    }
}

fn default_namespace() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_min_uptime() -> Duration {
    Duration::from_millis(1000)
}
fn default_max_restarts() -> u32 {
    16
}
fn default_kill_timeout() -> Duration {
    Duration::from_millis(1600)
}
fn default_listen_timeout() -> Duration {
    Duration::from_millis(3000)
}
fn default_kill_signal() -> String {
    "SIGINT".into()
}
fn default_watch_delay() -> Duration {
    Duration::from_millis(1000)
}
fn default_instance_var() -> String {
    "NODE_APP_INSTANCE".into()
}

/// What to run: pm2's app options (names and defaults as in pm2 7).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    /// App name (`[A-Za-z0-9_-]+`).
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The script or binary; absolute, or relative to `cwd`.
    pub script: PathBuf,
    /// Arguments after the script.
    #[serde(default)]
    pub args: Vec<String>,
    /// Interpreter; `None` picks from the extension, `"none"` execs the script directly.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Arguments for the interpreter (pm2 `node_args` / `interpreter_args`).
    #[serde(default, alias = "node_args")]
    pub interpreter_args: Vec<String>,
    /// Working directory (default: the script's folder).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Environment for the workers. Never written into events or logs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Number of instances; `None` is one, in fork mode.
    #[serde(default)]
    pub instances: Option<u32>,
    /// `fork` or `cluster`; `None` applies pm2's rule (cluster for node with instances).
    #[serde(default)]
    pub exec_mode: Option<super::envelope::ExecMode>,
    /// Restart when the process exits (pm2 default true).
    #[serde(default = "default_true")]
    pub autorestart: bool,
    /// A run shorter than this counts as unstable (pm2 default 1000 ms).
    #[serde(default = "default_min_uptime", with = "duration::ms")]
    pub min_uptime: Duration,
    /// Unstable restarts before `errored` (pm2 default 16).
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Fixed delay before an automatic restart.
    #[serde(default, with = "duration::ms")]
    pub restart_delay: Duration,
    /// Exponential backoff base; overrides `restart_delay` when set.
    #[serde(default, with = "duration::opt_ms")]
    pub exp_backoff_restart_delay: Option<Duration>,
    /// Exit codes that mean "stopped on purpose, do not restart".
    #[serde(default)]
    pub stop_exit_codes: ExitCodes,
    /// Grace period between the kill signal and SIGKILL (pm2 default 1600 ms).
    #[serde(default = "default_kill_timeout", with = "duration::ms")]
    pub kill_timeout: Duration,
    /// Signal sent to stop (pm2: SIGINT).
    #[serde(default = "default_kill_signal")]
    pub kill_signal: String,
    /// Stop by sending the worker the `'shutdown'` message instead of the kill signal (pm2
    /// `shutdown_with_message`); SIGKILL still follows `kill_timeout`.
    #[serde(default)]
    pub shutdown_with_message: bool,
    /// Signal the whole process group (pm2 `treekill`, default true); false signals the worker only.
    #[serde(default = "default_true")]
    pub treekill: bool,
    /// Online only after the worker sends `'ready'` (or `listen_timeout` passes).
    #[serde(default)]
    pub wait_ready: bool,
    /// How long to wait for `ready` (pm2 default 3000 ms).
    #[serde(default = "default_listen_timeout", with = "duration::ms")]
    pub listen_timeout: Duration,
    /// Name of the instance variable (pm2 `instance_var`).
    #[serde(default = "default_instance_var")]
    pub instance_var: String,
    /// Restart when RSS exceeds this many bytes.
    #[serde(default)]
    pub max_memory_restart: Option<u64>,
    /// The app's id; the agent makes one when absent.
    #[serde(default)]
    pub app_id: Option<Uuid>,
    /// pm_ids chosen by the controller, one per instance; the agent allocates when empty.
    #[serde(default)]
    pub pm_ids: Vec<u32>,
    /// Addresses the agent binds once and hands to every instance (`LISTEN_FDS`, fds from 3):
    /// `tcp://HOST:PORT`, `tcp://:PORT`, `unix:///path`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
    /// Restart on this cron schedule (pm2 `cron_restart`, alias `cron`; local time; `"0"` is
    /// none).
    #[serde(default, alias = "cron", skip_serializing_if = "Option::is_none")]
    pub cron_restart: Option<String>,
    /// Restart when files change (pm2 `watch`: `true` for the working directory, or paths).
    #[serde(default, skip_serializing_if = "super::schedule::Watch::is_off")]
    pub watch: super::schedule::Watch,
    /// Globs of paths not watched, besides dot-files and `node_modules` (pm2 `ignore_watch`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_watch: Vec<String>,
    /// Quiet time after a change before the restart (pm2 `watch_delay`).
    #[serde(default = "default_watch_delay", with = "duration::ms")]
    pub watch_delay: Duration,
    /// Fleet-wide instance numbers (`NODE_APP_INSTANCE`), parallel to `pm_ids`; empty means
    /// 0, 1, ... in order (a host's share of a fleet app gets its numbers from the controller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_numbers: Vec<u32>,
}

impl fmt::Debug for AppSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSpec")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("script", &self.script)
            .field("args", &self.args)
            .field("interpreter", &self.interpreter)
            .field("cwd", &self.cwd)
            .field("env", &"hidden")
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

impl AppSpec {
    /// A spec with pm2's defaults for `script`, named `name`.
    pub fn new(name: &str, script: impl Into<PathBuf>) -> Self {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "script": script.into(),
        }))
        .expect("defaults always deserialise")
    }
}

/// `start`: run an app's instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// The app.
    pub app: AppSpec,
    /// Start another copy even when the app is already running (pm2 `-f`).
    #[serde(default)]
    pub force: bool,
}

/// `stop`, `restart`, `reload`, `delete`, `list`: a target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    #[serde(default = "target_all")]
    pub target: Target,
    /// When not empty: exactly these processes among those `target` matches (the controller
    /// sends them); ids this agent does not have are reported as `absent`, not as an error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
    /// `reload`: how many instances at a time (default 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub parallel: u32,
}

fn one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

impl TargetRequest {
    /// A request for `target` with a fresh id.
    pub fn new(target: Target) -> Self {
        Self {
            request_id: Uuid::new_v4(),
            target,
            pm_ids: vec![],
            parallel: 1,
        }
    }
}

/// `logs`: the last lines of each targeted process's log files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    #[serde(default = "target_all")]
    pub target: Target,
    /// See [`TargetRequest::pm_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
    /// Lines per file (pm2's default is 15).
    #[serde(default = "default_lines")]
    pub lines: u32,
}

fn default_lines() -> u32 {
    15
}

/// The last lines of one log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    /// The process.
    pub pm_id: u32,
    /// App name.
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Host.
    #[serde(default)]
    pub host: String,
    /// `out` or `err`.
    pub stream: String,
    /// The file.
    pub path: PathBuf,
    /// The lines, oldest first, without newlines.
    pub lines: Vec<String>,
    /// True when earlier lines were left out to keep the reply small.
    #[serde(default)]
    pub truncated: bool,
}

fn target_all() -> Target {
    Target::All
}

/// `send`: deliver JSON to each targeted worker's `process.on('message')`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    pub target: Target,
    /// The JSON value, delivered as given.
    pub message: serde_json::Value,
    /// See [`TargetRequest::pm_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
}

/// `signal`: send a signal to each targeted worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    pub target: Target,
    /// `SIGUSR2`, `USR2` or a number.
    pub signal: String,
    /// See [`TargetRequest::pm_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
}

/// A request to an agent; the verb comes from the subject.
#[derive(Debug, Clone)]
pub enum Request {
    /// `start`
    Start(Box<StartRequest>),
    /// `stop`
    Stop(TargetRequest),
    /// `restart`
    Restart(TargetRequest),
    /// `reload`: a restart whose reply waits until the new run is online (ready).
    Reload(TargetRequest),
    /// `delete`
    Delete(TargetRequest),
    /// `send`
    Send(SendRequest),
    /// `signal`
    Signal(SignalRequest),
    /// `list`
    List(TargetRequest),
    /// `logs`
    Logs(LogsRequest),
}

impl From<StartRequest> for Request {
    fn from(r: StartRequest) -> Self {
        Request::Start(Box::new(r))
    }
}
impl From<SendRequest> for Request {
    fn from(r: SendRequest) -> Self {
        Request::Send(r)
    }
}
impl From<SignalRequest> for Request {
    fn from(r: SignalRequest) -> Self {
        Request::Signal(r)
    }
}

impl Request {
    /// Parses a request body for `verb`; errors say what is wrong and where.
    pub fn parse(verb: &str, body: &[u8]) -> Result<Request, ControlError> {
        fn de<T: serde::de::DeserializeOwned>(verb: &str, body: &[u8]) -> Result<T, ControlError> {
            serde_json::from_slice(body).map_err(|e| {
                ControlError::new(
                    ErrorKind::BadRequest,
                    format!("malformed '{verb}' request: {e}"),
                )
            })
        }
        Ok(match verb {
            "start" => Request::Start(de(verb, body)?),
            "stop" => Request::Stop(de(verb, body)?),
            "restart" => Request::Restart(de(verb, body)?),
            "reload" => Request::Reload(de(verb, body)?),
            "logs" => Request::Logs(de(verb, body)?),
            "delete" => Request::Delete(de(verb, body)?),
            "send" => Request::Send(de(verb, body)?),
            "signal" => Request::Signal(de(verb, body)?),
            "list" => Request::List(de(verb, body)?),
            other => {
                return Err(ControlError::new(
                    ErrorKind::UnknownVerb,
                    format!(
                        "unknown verb '{other}': an agent answers {}",
                        AGENT_VERBS.join(", ")
                    ),
                ));
            }
        })
    }

    /// The verb (subject token).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Start(_) => "start",
            Request::Stop(_) => "stop",
            Request::Restart(_) => "restart",
            Request::Reload(_) => "reload",
            Request::Logs(_) => "logs",
            Request::Delete(_) => "delete",
            Request::Send(_) => "send",
            Request::Signal(_) => "signal",
            Request::List(_) => "list",
        }
    }

    /// The request id.
    pub fn request_id(&self) -> Uuid {
        match self {
            Request::Start(r) => r.request_id,
            Request::Stop(r)
            | Request::Restart(r)
            | Request::Reload(r)
            | Request::Delete(r)
            | Request::List(r) => r.request_id,
            Request::Logs(r) => r.request_id,
            Request::Send(r) => r.request_id,
            Request::Signal(r) => r.request_id,
        }
    }

    /// The body as JSON bytes.
    pub fn to_body(&self) -> Vec<u8> {
        let r = match self {
            Request::Start(r) => serde_json::to_vec(r),
            Request::Stop(r)
            | Request::Restart(r)
            | Request::Reload(r)
            | Request::Delete(r)
            | Request::List(r) => serde_json::to_vec(r),
            Request::Logs(r) => serde_json::to_vec(r),
            Request::Send(r) => serde_json::to_vec(r),
            Request::Signal(r) => serde_json::to_vec(r),
        };
        r.expect("request serialisation is infallible")
    }
}

/// Error kinds a reply can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The body is not a valid request.
    BadRequest,
    /// The subject's verb is unknown.
    UnknownVerb,
    /// A name, namespace or host id is invalid.
    InvalidName,
    /// No process matches the target.
    NotFound,
    /// The app is already running (use restart, or force).
    AlreadyRunning,
    /// The script does not exist on this host.
    ScriptNotFound,
    /// The interpreter is not installed on this host.
    InterpreterNotFound,
    /// The process could not be spawned.
    SpawnFailed,
    /// The worker's channel is closed or full.
    ChannelClosed,
    /// The message is larger than allowed.
    TooLarge,
    /// The signal name is unknown.
    UnknownSignal,
    /// A value in the request is out of range.
    InvalidValue,
    /// The agent is shutting down.
    ShuttingDown,
    /// An agent (or the controller) did not answer in time.
    Unreachable,
    /// Anything else.
    Internal,
    /// A kind this version does not know (from a newer peer).
    #[serde(other)]
    Other,
}

/// A precise error: what, where, how to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// Machine-readable kind.
    pub kind: ErrorKind,
    /// One line for people.
    pub message: String,
}

impl ControlError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<NameError> for ControlError {
    fn from(e: NameError) -> Self {
        ControlError::new(ErrorKind::InvalidName, e.to_string())
    }
}

/// What happened to one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The process.
    pub pm_id: u32,
    /// `started`, `stopped`, `already stopped`, `restarted`, `deleted`, `sent`, `signalled`, ...
    pub what: String,
}

/// A process as `list` reports it: the envelope's metadata plus live figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Envelope metadata.
    #[serde(flatten)]
    pub meta: ProcessMeta,
    /// CPU percent (of one core) since the previous sample.
    #[serde(default)]
    pub cpu: f64,
    /// Resident memory, bytes.
    #[serde(default)]
    pub memory: u64,
    /// Messages dropped because the relay queue was full.
    #[serde(default)]
    pub dropped: u64,
    /// Malformed or oversized channel lines.
    #[serde(default)]
    pub ipc_errors: u64,
    /// Unstable restarts counted toward `max_restarts`.
    #[serde(default)]
    pub unstable_restarts: u32,
    /// Last exit code, if any.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Script path.
    #[serde(default)]
    pub script: PathBuf,
    /// Working directory.
    #[serde(default)]
    pub cwd: PathBuf,
    /// Interpreter used (`none` for direct exec).
    #[serde(default)]
    pub interpreter: String,
    /// stdout log file.
    #[serde(default)]
    pub out_log: PathBuf,
    /// stderr log file.
    #[serde(default)]
    pub err_log: PathBuf,
}

impl ProcessInfo {
    /// A process known only by its metadata (no figures, paths unknown).
    pub fn from_meta(meta: ProcessMeta) -> Self {
        Self {
            meta,
            cpu: 0.0,
            memory: 0,
            dropped: 0,
            ipc_errors: 0,
            unstable_restarts: 0,
            exit_code: None,
            script: PathBuf::new(),
            cwd: PathBuf::new(),
            interpreter: String::new(),
            out_log: PathBuf::new(),
            err_log: PathBuf::new(),
        }
    }
}

/// The agent's own figures, in `list` replies and heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Host id.
    pub host: String,
    /// Version of the agent.
    pub version: String,
    /// Relay counters since the agent started.
    #[serde(flatten)]
    pub counters: super::fleet::RelayCounters,
    /// Messages waiting in the relay queue now.
    #[serde(default)]
    pub queued: u64,
    /// Largest message relayed, bytes (the server's max_payload unless configured lower).
    #[serde(default)]
    pub max_message: u64,
}

/// Reply to every request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The request this answers.
    #[serde(default)]
    pub request_id: Option<Uuid>,
    /// The host that answered.
    #[serde(default)]
    pub host: String,
    /// `None` on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
    /// What changed, per process.
    #[serde(default)]
    pub changes: Vec<Change>,
    /// The processes concerned (all matching ones for `list`).
    #[serde(default)]
    pub processes: Vec<ProcessInfo>,
    /// The agent's figures (`list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStats>,
    /// Log tails (`logs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogTail>,
    /// The hosts the controller sees (`info`, `hosts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<super::fleet::HostView>,
    /// The controller that answered (`info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerInfo>,
}

/// A controller, as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// Its id (random at each start).
    pub id: Uuid,
    /// Its version.
    pub version: String,
    /// The host it runs on (hostname).
    pub host: String,
    /// Epoch ms of its start.
    pub started_at: u64,
}

impl Reply {
    /// A success reply.
    pub fn ok(request_id: Option<Uuid>, host: &str) -> Self {
        Self {
            request_id,
            host: host.to_string(),
            error: None,
            changes: vec![],
            processes: vec![],
            agent: None,
            logs: vec![],
            hosts: vec![],
            controller: None,
        }
    }
    /// An error reply.
    pub fn err(request_id: Option<Uuid>, host: &str, error: ControlError) -> Self {
        Self {
            error: Some(error),
            ..Self::ok(request_id, host)
        }
    }
    /// `Err` when the reply carries an error.
    pub fn into_result(self) -> Result<Reply, ControlError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }
}

/// True for processes that exist in the table and are not in a terminal state.
pub fn is_alive(s: Status) -> bool {
    s.is_running() || s == Status::WaitingRestart
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("all").unwrap(), Target::All);
        assert_eq!(Target::parse("3").unwrap(), Target::Id(3));
        assert_eq!(
            Target::parse("ns/api").unwrap(),
            Target::Name {
                namespace: Some("ns".into()),
                name: "api".into()
            }
        );
        assert!(Target::parse("a.b").is_err());
        assert!(Target::parse("_x/api").is_err());
        assert!(Target::parse("").is_err());
        for t in ["all", "3", "api", "ns/api"] {
            let v = serde_json::to_value(Target::parse(t).unwrap()).unwrap();
            assert_eq!(v, serde_json::json!(t));
            let back: Target = serde_json::from_value(v).unwrap();
            assert_eq!(back.to_string(), t);
        }
        let n: Target = serde_json::from_str("7").unwrap();
        assert_eq!(n, Target::Id(7));
    }

    #[test]
    fn app_spec_has_pm2_defaults() {
        let s = AppSpec::new("api", "/srv/app.js");
        assert_eq!(s.namespace, "default");
        assert!(s.autorestart);
        assert_eq!(s.max_restarts, 16);
        assert_eq!(s.min_uptime, Duration::from_millis(1000));
        assert_eq!(s.kill_timeout, Duration::from_millis(1600));
        assert_eq!(s.listen_timeout, Duration::from_millis(3000));
        assert_eq!(s.kill_signal, "SIGINT");
        assert!(s.treekill);
        assert_eq!(s.exp_backoff_restart_delay, None);
        assert!(!format!("{s:?}").contains("env: {"));
    }

    #[test]
    fn durations_and_exit_codes_accept_pm2_forms() {
        let s: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "script": "x.js", "min_uptime": "2s", "restart_delay": 250,
            "exp_backoff_restart_delay": "100ms", "stop_exit_codes": [0, "3"]
        }))
        .unwrap();
        assert_eq!(s.min_uptime, Duration::from_secs(2));
        assert_eq!(s.restart_delay, Duration::from_millis(250));
        assert_eq!(
            s.exp_backoff_restart_delay,
            Some(Duration::from_millis(100))
        );
        assert_eq!(s.stop_exit_codes, ExitCodes(vec![0, 3]));
        let one: ExitCodes = serde_json::from_str("2").unwrap();
        assert_eq!(one, ExitCodes(vec![2]));
    }

    #[test]
    fn env_is_hidden_from_debug() {
        let mut s = AppSpec::new("api", "/srv/app.js");
        s.env.insert("SECRET".into(), "hunter2".into());
        let req = Request::from(StartRequest {
            request_id: Uuid::nil(),
            app: s,
            force: false,
        });
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[test]
    fn parse_errors_are_precise() {
        let e = Request::parse("start", b"{\"request_id\": 5}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.starts_with("malformed 'start' request:"), "{e}");
        let e = Request::parse("launch", b"{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownVerb);
        let r = Request::parse(
            "stop",
            br#"{"request_id":"00000000-0000-0000-0000-000000000000","target":"api"}"#,
        )
        .unwrap();
        assert_eq!(r.verb(), "stop");
    }
}
