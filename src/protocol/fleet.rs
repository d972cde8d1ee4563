//! Host-level payloads on `pm._fleet.<host>.*`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// An agent's relay counters since it started (in heartbeats and `list` replies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayCounters {
    /// Messages published.
    #[serde(default)]
    pub relayed: u64,
    /// Messages dropped (no room in the queue within `relay.max_wait`: NATS down or stalled).
    #[serde(default)]
    pub dropped: u64,
    /// Malformed or oversized worker lines.
    #[serde(default)]
    pub ipc_errors: u64,
}

/// `pm._fleet.<host>.host:heartbeat`, every `heartbeat_interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Epoch ms.
    pub at: u64,
    /// Unique id (also `Nats-Msg-Id`).
    pub id: Uuid,
    /// The agent's host id (`host_id`).
    pub host: String,
    /// The host's labels (`labels`), which placement matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Processes in the table.
    #[serde(default)]
    pub processes: u32,
    /// How many of those processes are online.
    #[serde(default)]
    pub online: u32,
    /// Agent CPU percent (of one core) since the previous heartbeat.
    #[serde(default)]
    pub cpu: f64,
    /// Agent resident memory, bytes.
    #[serde(default)]
    pub memory: u64,
    /// Sum of the workers' resident memory, bytes.
    #[serde(default)]
    pub workers_memory: u64,
    /// Host one-minute load average.
    #[serde(default)]
    pub load1: f64,
    /// CPUs on the host.
    #[serde(default)]
    pub cpus: u32,
    /// Host memory total, bytes.
    #[serde(default)]
    pub mem_total: u64,
    /// Host memory available, bytes.
    #[serde(default)]
    pub mem_available: u64,
    /// The agent's relay counters.
    #[serde(flatten)]
    pub counters: RelayCounters,
    /// Dropped count per pm_id (only processes with drops).
    #[serde(default)]
    pub dropped_by_process: BTreeMap<u32, u64>,
}

/// `pm._fleet.<host>.host:event`: `online` when an agent starts, `offline` when it stops cleanly.
/// (The controller adds `lost`, `back`, `draining`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEvent {
    /// Epoch ms.
    pub at: u64,
    /// Unique id.
    pub id: Uuid,
    /// The agent's host id (`host_id`).
    pub host: String,
    /// What happened.
    pub event: super::event::HostEventKind,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// The host's labels, which placement matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A host as the controller sees it (`info` and `hosts` replies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    /// The agent's host id.
    pub host: String,
    /// The host's labels, which placement matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The agent's version, as its last heartbeat said.
    #[serde(default)]
    pub version: String,
    /// `online` (heard from within `host_lost_after`) or `lost`.
    pub state: String,
    /// Milliseconds since its last heartbeat.
    #[serde(default)]
    pub last_seen_ms: u64,
    /// Processes in its table.
    #[serde(default)]
    pub processes: u32,
    /// How many of its processes are online.
    #[serde(default)]
    pub online: u32,
    /// Logical CPUs of the host.
    #[serde(default)]
    pub cpus: u32,
    /// One-minute load average.
    #[serde(default)]
    pub load1: f64,
    /// Memory total, bytes.
    #[serde(default)]
    pub mem_total: u64,
    /// Memory available, bytes.
    #[serde(default)]
    pub mem_available: u64,
    /// Agent resident memory, bytes.
    #[serde(default)]
    pub agent_memory: u64,
}
