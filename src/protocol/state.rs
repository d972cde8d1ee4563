//! Desired state as stored in JetStream KV: what each host should run.
//!
//! Keys (bucket [`BUCKET`]): `app.<namespace>.<name>` holds an app's [`AppRecord`] (its spec and
//! placement constraints); `assign.<host>` holds that host's [`Assignment`] (which pm_ids of which
//! app run there). The controller writes both with compare-and-set, the app record first when an
//! app is created and last when it is deleted; each agent watches its own assignment and
//! converges to it, and keeps a local copy so a missing controller or a NATS outage never stops
//! running workers.

use super::app::AppSpec;
use super::subjects::{AppKey, HostId};
use serde::{Deserialize, Serialize};

/// The KV bucket of desired state.
pub const BUCKET: &str = "flotilla";

/// `assign.<host>`
pub fn assignment_key(host: &HostId) -> String {
    format!("assign.{host}")
}

/// `app.<namespace>.<name>`
pub fn app_key(app: &AppKey) -> String {
    format!("app.{}.{}", app.namespace(), app.name())
}

/// Prefix of every app record key.
pub const APP_PREFIX: &str = "app.";
/// Prefix of every assignment key.
pub const ASSIGN_PREFIX: &str = "assign.";

/// An app as the controller keeps it: the spec (`instances` is the fleet total) and where it
/// may run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The spec (without pm_ids; those are in the assignments).
    pub spec: AppSpec,
    /// Only these hosts, when not empty.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Only hosts with these labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Epoch ms of creation.
    #[serde(default)]
    pub created_at: u64,
}

/// What one host should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Assignment {
    /// The host this assignment is for (also in its key, `assign.<host>`).
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
    /// pm_ids stopped one by one (`stop 3`) while the app runs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub stopped: std::collections::BTreeSet<u32>,
}

fn yes() -> bool {
    true
}

impl AssignedApp {
    /// The app's key, if its names are valid.
    pub fn key(&self) -> Option<AppKey> {
        AppKey::new(&self.spec.namespace, &self.spec.name).ok()
    }

    /// True when `pm_id` should be running.
    pub fn wants_running(&self, pm_id: u32) -> bool {
        self.running && !self.stopped.contains(&pm_id)
    }

    /// `(pm_id, instance number)` of each instance here.
    pub fn instances(&self) -> Vec<(u32, u32)> {
        self.spec
            .pm_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                (
                    id,
                    self.spec
                        .instance_numbers
                        .get(i)
                        .copied()
                        .unwrap_or(i as u32),
                )
            })
            .collect()
    }

    /// Sets the instances here (keeping `pm_ids`, `instance_numbers` and `instances` in step).
    pub fn set_instances(&mut self, list: &[(u32, u32)]) {
        self.spec.pm_ids = list.iter().map(|x| x.0).collect();
        self.spec.instance_numbers = list.iter().map(|x| x.1).collect();
        self.spec.instances = Some(list.len() as u32);
        let ids: std::collections::BTreeSet<u32> = self.spec.pm_ids.iter().copied().collect();
        self.stopped.retain(|id| ids.contains(id));
    }
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
        assert!(a.wants_running(3));
        let mut a = a;
        assert_eq!(a.instances(), vec![(3, 0), (4, 1)]);
        a.stopped.insert(4);
        a.set_instances(&[(3, 0), (9, 5)]);
        assert_eq!(a.spec.pm_ids, vec![3, 9]);
        assert_eq!(a.spec.instance_numbers, vec![0, 5]);
        assert_eq!(a.spec.instances, Some(2));
        assert!(a.stopped.is_empty());
        assert_eq!(a.key().unwrap().to_string(), "default/api");
    }
}
