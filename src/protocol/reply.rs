//! Replies: what every agent and controller request gets back (`changes` per process, the
//! processes concerned, log tails, hosts), and the typed vocabulary of what changed.

use super::envelope::ProcessMeta;
use super::error::ControlError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use uuid::Uuid;

/// What happened to one process, as the `what` of a reply's `changes` (the wire words are
/// lowercase, as below). Peers match on this, never on text; why it happened goes in
/// [`Change::detail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    /// A new run was spawned (or a stopped process started again).
    #[serde(rename = "started")]
    Started,
    /// A start found it running with the same options: left alone.
    #[serde(rename = "already online")]
    AlreadyOnline,
    /// Still stopping: it runs again, with the new options, once it has exited.
    #[serde(rename = "restarting")]
    Restarting,
    /// Its new run is online.
    #[serde(rename = "restarted")]
    Restarted,
    /// A restart whose new run could not be spawned or did not come online.
    #[serde(rename = "not restarted")]
    NotRestarted,
    /// A reload's new run is online (and the old one is going).
    #[serde(rename = "reloaded")]
    Reloaded,
    /// A reload whose new run could not be spawned or did not come online.
    #[serde(rename = "not reloaded")]
    NotReloaded,
    /// A restart or reload whose new run exited before it was online.
    #[serde(rename = "exited before it was online")]
    ExitedBeforeOnline,
    /// It has exited.
    #[serde(rename = "stopped")]
    Stopped,
    /// It was not running.
    #[serde(rename = "already stopped")]
    AlreadyStopped,
    /// Gone from the table.
    #[serde(rename = "deleted")]
    Deleted,
    /// A pm_id the request named that this agent does not have.
    #[serde(rename = "absent")]
    Absent,
    /// The message (or signal) was delivered.
    #[serde(rename = "sent")]
    Sent,
    /// The message (or signal) was not delivered.
    #[serde(rename = "not sent")]
    NotSent,
    /// A kind this version does not know (from a newer peer).
    #[serde(other, rename = "other")]
    Other,
}

impl ChangeKind {
    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Started => "started",
            ChangeKind::AlreadyOnline => "already online",
            ChangeKind::Restarting => "restarting",
            ChangeKind::Restarted => "restarted",
            ChangeKind::NotRestarted => "not restarted",
            ChangeKind::Reloaded => "reloaded",
            ChangeKind::NotReloaded => "not reloaded",
            ChangeKind::ExitedBeforeOnline => "exited before it was online",
            ChangeKind::Stopped => "stopped",
            ChangeKind::AlreadyStopped => "already stopped",
            ChangeKind::Deleted => "deleted",
            ChangeKind::Absent => "absent",
            ChangeKind::Sent => "sent",
            ChangeKind::NotSent => "not sent",
            ChangeKind::Other => "other",
        }
    }

    /// True when what was asked did not happen (shown as a failure).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            ChangeKind::NotRestarted | ChangeKind::NotReloaded | ChangeKind::NotSent
        )
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The process.
    pub pm_id: u32,
    /// What happened.
    pub what: ChangeKind,
    /// For people: why, or how (`spawn failed`, `SIGUSR2`); empty when the kind says it all.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Change {
    /// A change without detail.
    pub fn new(pm_id: u32, what: ChangeKind) -> Self {
        Self {
            pm_id,
            what,
            detail: String::new(),
        }
    }

    /// The same change, saying why or how.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// For people, as pm2 users read it: `sent SIGUSR2`, `restarted with the new options`,
/// `reloaded (a restart: ...)`, `not sent: the worker closed its channel`.
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, detail) = (self.what, &self.detail);
        match what {
            _ if detail.is_empty() => write!(f, "{what}"),
            ChangeKind::Sent | ChangeKind::Restarted => write!(f, "{what} {detail}"),
            ChangeKind::Reloaded => write!(f, "{what} ({detail})"),
            _ => write!(f, "{what}: {detail}"),
        }
    }
}

/// The last lines of one log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    /// The process whose log file this is.
    pub pm_id: u32,
    /// The app (`name`).
    pub name: String,
    /// The app's namespace.
    #[serde(default)]
    pub namespace: String,
    /// The host whose agent read the file.
    #[serde(default)]
    pub host: String,
    /// `out` or `err`.
    pub stream: String,
    /// Where the file is, on that host.
    pub path: PathBuf,
    /// The lines, oldest first, without newlines.
    pub lines: Vec<String>,
    /// True when earlier lines were left out to keep the reply small.
    #[serde(default)]
    pub truncated: bool,
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
    /// The script as the agent resolved it (absolute).
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
    /// The host the agent runs on (`host_id`).
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
    /// The controller's version (`CARGO_PKG_VERSION`).
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_kinds_round_trip_with_their_wire_words() {
        use ChangeKind::*;
        for k in [
            Started,
            AlreadyOnline,
            Restarting,
            Restarted,
            NotRestarted,
            Reloaded,
            NotReloaded,
            ExitedBeforeOnline,
            Stopped,
            AlreadyStopped,
            Deleted,
            Absent,
            Sent,
            NotSent,
            Other,
        ] {
            let v = serde_json::to_value(k).unwrap();
            assert_eq!(v, serde_json::json!(k.as_str()));
            assert_eq!(serde_json::from_value::<ChangeKind>(v).unwrap(), k);
        }
        let c = Change::new(3, NotRestarted).detail("spawn failed");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pm_id": 3, "what": "not restarted", "detail": "spawn failed"})
        );
        assert_eq!(serde_json::from_value::<Change>(v).unwrap(), c);
        assert_eq!(c.to_string(), "not restarted: spawn failed");
        assert_eq!(
            Change::new(3, Sent).detail("SIGUSR2").to_string(),
            "sent SIGUSR2"
        );
        assert_eq!(
            Change::new(3, Reloaded)
                .detail("a restart: it shares no listening socket")
                .to_string(),
            "reloaded (a restart: it shares no listening socket)"
        );
        assert_eq!(Change::new(3, Stopped).to_string(), "stopped");
        assert_eq!(
            serde_json::to_value(Change::new(1, Started)).unwrap(),
            serde_json::json!({"pm_id": 1, "what": "started"})
        );
    }

    #[test]
    fn an_unknown_change_kind_from_a_newer_peer_is_accepted() {
        let c: Change =
            serde_json::from_str(r#"{"pm_id": 4, "what": "moved", "detail": "to web-2"}"#).unwrap();
        assert_eq!(c.what, ChangeKind::Other);
        assert_eq!(c.detail, "to web-2");
        assert!(!c.what.is_failure());
        let r: Reply = serde_json::from_str(
            r#"{"request_id": null, "host": "web-1", "changes": [{"pm_id": 1, "what": "drained"}], "future_field": 1}"#,
        )
        .unwrap();
        assert_eq!(r.changes[0].what, ChangeKind::Other);
    }
}
