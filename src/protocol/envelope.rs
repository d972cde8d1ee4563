//! The event envelope: a superset of pm2's bus packet (DESIGN.md, "Event envelope").
//!
//! ```json
//! {"at": 1764000000000, "data": {"any": "json"},
//!  "process": {"pm_id": 3, "name": "api", "namespace": "default", "rev": null, "host": "web-1",
//!              "pid": 4242, "instance": 1, "exec_mode": "cluster", "status": "online",
//!              "restart_time": 2, "pm_uptime": 1763999990000, "app_id": "…uuid…"},
//!  "id": "…uuid…"}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// pm2's process status vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Spawned, not yet online (or waiting for `ready`).
    #[default]
    Launching,
    /// Running.
    Online,
    /// Between a crash and the delayed restart (pm2's `waiting restart`).
    #[serde(rename = "waiting restart")]
    WaitingRestart,
    /// Being stopped.
    Stopping,
    /// Stopped (by request, by `autorestart: false`, or by a stop exit code).
    Stopped,
    /// Gave up: too many unstable restarts, or could not be spawned.
    Errored,
}

impl Status {
    /// The wire word, as in pm2.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Launching => "launching",
            Status::Online => "online",
            Status::WaitingRestart => "waiting restart",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Errored => "errored",
        }
    }
    /// True while a process exists (or is about to).
    pub fn is_running(&self) -> bool {
        matches!(self, Status::Launching | Status::Online | Status::Stopping)
    }

    /// True for processes that exist in the table and are not in a terminal state.
    pub fn is_alive(&self) -> bool {
        self.is_running() || *self == Status::WaitingRestart
    }
}

/// pm2's exec modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExecMode {
    /// One process per app entry.
    #[default]
    Fork,
    /// Node `cluster` semantics (node interpreter with instances).
    Cluster,
}

/// The process metadata every event carries. Never holds environment values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessMeta {
    /// Id, unique across the fleet once the controller allocates it.
    pub pm_id: u32,
    /// The app (`[A-Za-z0-9_-]+`).
    pub name: String,
    /// The app's namespace (`default` unless set).
    pub namespace: String,
    /// Revision (pm2's `rev`; null unless known).
    #[serde(default)]
    pub rev: Option<String>,
    /// Host id of the agent running it.
    pub host: String,
    /// OS pid, 0 when not running.
    #[serde(default)]
    pub pid: u32,
    /// The instance number, 0..N-1 over the fleet (`NODE_APP_INSTANCE`).
    #[serde(default)]
    pub instance: u32,
    /// `fork` or `cluster`.
    #[serde(default)]
    pub exec_mode: ExecMode,
    /// pm2 status word.
    #[serde(default)]
    pub status: Status,
    /// Restarts so far (automatic and manual), as pm2 counts them.
    #[serde(default)]
    pub restart_time: u32,
    /// Epoch ms of the current run's start (0 if never started).
    #[serde(default)]
    pub pm_uptime: u64,
    /// The app this instance belongs to.
    pub app_id: Uuid,
}

/// Lifecycle event fields, at the envelope's top level as in pm2's `process:event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFields {
    /// pm2's event name or ours.
    pub event: super::event::ProcessEvent,
    /// True for actions a user (CLI/API) asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manually: Option<bool>,
    /// Exit code, for `exit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal name (`"SIGKILL"`), for `exit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Count of dropped messages (`dropped`) or of faulty lines (`ipc:error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Epoch ms of the first drop in a `dropped` report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Epoch ms of the last drop in a `dropped` report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// Human explanation (`ipc:error`, `spawn:error`, `restart overlimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl EventFields {
    /// An event with just its name.
    pub fn named(event: super::event::ProcessEvent) -> Self {
        Self {
            event,
            manually: None,
            exit_code: None,
            signal: None,
            count: None,
            since: None,
            until: None,
            reason: None,
        }
    }
    /// Marks a user-initiated action.
    pub fn manually(mut self, m: bool) -> Self {
        self.manually = Some(m);
        self
    }
    /// Adds a reason.
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }
}

/// The envelope as written on the hot path: `process` is pre-serialised once per state change.
#[derive(Serialize)]
pub struct EnvelopeOut<'a> {
    /// Epoch ms.
    pub at: u64,
    /// `data` of a typed message or a log line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// The whole message when it is not `{type, data}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<&'a RawValue>,
    /// Serialised [`ProcessMeta`].
    pub process: &'a RawValue,
    /// Lifecycle fields.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub event: Option<&'a EventFields>,
    /// Unique message id (also the `Nats-Msg-Id` header).
    pub id: Uuid,
}

/// The envelope as read by consumers (CLI, tests, your tools).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Epoch ms.
    pub at: u64,
    /// `data`, for typed messages and log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// `raw`, for anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<serde_json::Value>,
    /// The process.
    pub process: ProcessMeta,
    /// Lifecycle fields (`process:event` only).
    #[serde(flatten, default)]
    pub event: Option<EventFields>,
    /// Unique per message (also the `Nats-Msg-Id` header): consumers dedupe by it.
    pub id: Uuid,
}

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serialises an envelope to bytes. Serialising these types cannot fail (no maps with non-string
/// keys, no failing `Serialize` impls), so the `expect` documents an invariant.
pub fn encode(env: &EnvelopeOut<'_>) -> Vec<u8> {
    // Sized for one allocation: `{"at":…,"data":…,"process":…,"id":"…"}` plus event fields.
    let len = |v: Option<&RawValue>| v.map_or(0, |v| v.get().len());
    let cap = 96
        + env.process.get().len()
        + len(env.data)
        + len(env.raw)
        + env
            .event
            .map_or(0, |e| 64 + e.reason.as_ref().map_or(0, String::len));
    let mut out = Vec::with_capacity(cap);
    serde_json::to_writer(&mut out, env).expect("envelope serialisation is infallible");
    out
}

/// Serialises process metadata for [`EnvelopeOut::process`].
pub fn encode_meta(meta: &ProcessMeta) -> Box<RawValue> {
    let s = serde_json::to_string(meta).expect("metadata serialisation is infallible");
    RawValue::from_string(s).expect("serde_json output is valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event::ProcessEvent;

    fn meta() -> ProcessMeta {
        ProcessMeta {
            pm_id: 3,
            name: "api".into(),
            namespace: "default".into(),
            rev: None,
            host: "web-1".into(),
            pid: 4242,
            instance: 1,
            exec_mode: ExecMode::Cluster,
            status: Status::Online,
            restart_time: 2,
            pm_uptime: 1763999990000,
            app_id: Uuid::nil(),
        }
    }

    #[test]
    fn hot_path_envelope_reads_back() {
        let m = encode_meta(&meta());
        let data: Box<RawValue> = RawValue::from_string(r#"{"any":"json"}"#.into()).unwrap();
        let id = Uuid::new_v4();
        let bytes = encode(&EnvelopeOut {
            at: 1764000000000,
            data: Some(&data),
            raw: None,
            process: &m,
            event: None,
            id,
        });
        let back: Envelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.process, meta());
        assert_eq!(back.data, Some(serde_json::json!({"any": "json"})));
        assert_eq!(back.event, None);
        assert_eq!(back.id, id);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["process"]["status"], "online");
        assert_eq!(v["process"]["exec_mode"], "cluster");
        assert_eq!(v["process"]["rev"], serde_json::Value::Null);
        assert!(v.get("raw").is_none());
    }

    #[test]
    fn event_fields_are_top_level() {
        let m = encode_meta(&meta());
        let ev = EventFields {
            exit_code: Some(1),
            signal: None,
            ..EventFields::named(ProcessEvent::Exit)
        };
        let bytes = encode(&EnvelopeOut {
            at: 1,
            data: None,
            raw: None,
            process: &m,
            event: Some(&ev),
            id: Uuid::nil(),
        });
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["event"], "exit");
        assert_eq!(v["exit_code"], 1);
        assert!(v.get("signal").is_none());
        let back: Envelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.event.unwrap().event, ProcessEvent::Exit);
    }

    #[test]
    fn waiting_restart_status_word() {
        assert_eq!(
            serde_json::to_string(&Status::WaitingRestart).unwrap(),
            "\"waiting restart\""
        );
    }
}
