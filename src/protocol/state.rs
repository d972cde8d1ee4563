//! Desired state as stored in JetStream KV (issue 4): what each host should run.
//!
//! Keys (bucket [`BUCKET`]): `assign.<host>` holds that host's [`Assignment`]. The controller
//! writes assignments with compare-and-set; each agent watches its own and converges to it, and
//! keeps a local copy so a missing controller or a NATS outage never stops running workers.

use super::control::AppSpec;
use super::subjects::{AppKey, HostId};
use serde::{Deserialize, Serialize};

/// The KV bucket of desired state.
pub const BUCKET: &str = "flotilla";

/// `assign.<host>`
pub fn assignment_key(host: &HostId) -> String {
    format!("assign.{host}")
}

/// What one host should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Assignment {
    /// The host.
    pub host: String,
    /// Apps with their pm_ids on this host.
    #[serde(default)]
    pub apps: Vec<AssignedApp>,
}

/// One app's share of a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignedApp {
    /// The spec; `pm_ids` says which instances run here (one process each).
    pub spec: AppSpec,
    /// `false` when the app is stopped (kept, not running).
    #[serde(default = "yes")]
    pub running: bool,
}

fn yes() -> bool {
    true
}

impl AssignedApp {
    /// The app's key, if its names are valid.
    pub fn key(&self) -> Option<AppKey> {
        AppKey::new(&self.spec.namespace, &self.spec.name).ok()
    }
}

/// `pmctl.api.start`: place an app's instances on the fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiStartRequest {
    /// Idempotency key.
    pub request_id: uuid::Uuid,
    /// The app (`instances` is the total across the fleet).
    pub app: AppSpec,
    /// Only these hosts (`--host`, repeatable); empty means any live host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Only hosts with these labels (`--label k=v`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Start another copy even when the app exists (pm2 `-f`).
    #[serde(default)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_defaults() {
        assert_eq!(
            assignment_key(&HostId::new("web-1").unwrap()),
            "assign.web-1"
        );
        let a: AssignedApp = serde_json::from_value(serde_json::json!({
            "spec": {"name": "api", "script": "/srv/a.js", "pm_ids": [3, 4]}
        }))
        .unwrap();
        assert!(a.running);
        assert_eq!(a.key().unwrap().to_string(), "default/api");
    }
}
