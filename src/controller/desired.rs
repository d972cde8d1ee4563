//! The desired state as the verbs see it: every host's [`Assignment`] read from KV, the queries
//! on it (which pm_ids a target names, an app's slots, one host's share of an app), and the two
//! writes every verb uses (one host's assignment by compare-and-set; the app record once no
//! assignment names the app). The queries are pure.

use crate::bus::store::{Store, StoreError};
use crate::protocol::control::Target;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::state::{self, ASSIGN_PREFIX, AssignedApp, Assignment};
use crate::protocol::{AppKey, AppSpec, HostId};
use std::collections::{BTreeMap, BTreeSet};

/// Every host's assignment, by host id.
pub(crate) type Desired = BTreeMap<String, Assignment>;

/// pm_ids per host.
pub(crate) type PerHost = BTreeMap<String, Vec<u32>>;

/// A store failure, as a reply says it.
pub(crate) fn store_err(e: StoreError) -> ControlError {
    ControlError::new(ErrorKind::Internal, e.to_string())
}

/// "Nothing matches `target`".
pub(crate) fn not_found(target: &Target) -> ControlError {
    ControlError::new(
        ErrorKind::NotFound,
        format!("no app or process matches '{target}' in the fleet: `flotilla ls` lists them"),
    )
}

/// Reads every host's assignment.
pub(crate) async fn read(store: &Store) -> Result<Desired, ControlError> {
    let mut out = BTreeMap::new();
    for key in store.keys(ASSIGN_PREFIX).await.map_err(store_err)? {
        if let Some((a, _)) = store.get::<Assignment>(&key).await.map_err(store_err)? {
            let host = key.trim_start_matches(ASSIGN_PREFIX).to_string();
            out.insert(host, a);
        }
    }
    Ok(out)
}

/// Edits one host's assignment by compare-and-set (apps left without instances are dropped);
/// `f` must be pure (it may run again). Returns the assignment written.
pub(crate) async fn edit_host(
    store: &Store,
    host: &str,
    mut f: impl FnMut(&mut Assignment),
) -> Result<Assignment, ControlError> {
    let key = state::assignment_key(&HostId::new(host)?);
    let (a, _) = store
        .update(&key, |a: Option<Assignment>| {
            let mut a = a.unwrap_or_else(|| Assignment {
                host: host.to_string(),
                apps: vec![],
            });
            f(&mut a);
            a.apps.retain(|e| !e.spec.pm_ids.is_empty());
            Ok(a)
        })
        .await
        .map_err(store_err)?;
    Ok(a)
}

/// Deletes the app record of an app no assignment names any more (assignments first, then the
/// record: a crash in between leaves a record without instances, which `start` replaces).
pub(crate) async fn forget_if_empty(store: &Store, app: &AppKey) -> Result<(), ControlError> {
    // The record's revision first: a `start -f` that rewrites the record after this read makes
    // the delete fail instead of deleting an app that has instances again.
    let key = state::app_key(app);
    let Some((_, rev)) = store
        .get::<serde_json::Value>(&key)
        .await
        .map_err(store_err)?
    else {
        return Ok(());
    };
    if !slots(&read(store).await?, app).is_empty() {
        return Ok(());
    }
    if let Err(e) = store.delete_if(&key, rev).await {
        tracing::info!(%app, "app record kept: it changed meanwhile ({e})");
    }
    Ok(())
}

/// True when `target` names instance `pm_id` of `spec`.
pub(crate) fn matches(target: &Target, spec: &AppSpec, pm_id: u32) -> bool {
    match target {
        Target::All => true,
        Target::Id(id) => *id == pm_id,
        Target::Name { namespace, name } => {
            spec.name == *name && namespace.as_deref().is_none_or(|ns| spec.namespace == ns)
        }
    }
}

/// The pm_ids `target` names, per host (hosts with none left out).
pub(crate) fn select(desired: &Desired, target: &Target) -> PerHost {
    let mut out = PerHost::new();
    for (host, a) in desired {
        for app in &a.apps {
            for &id in &app.spec.pm_ids {
                if matches(target, &app.spec, id) {
                    out.entry(host.clone()).or_default().push(id);
                }
            }
        }
    }
    out
}

/// The apps `target` names.
pub(crate) fn apps_of(desired: &Desired, target: &Target) -> BTreeSet<AppKey> {
    desired
        .values()
        .flat_map(|a| &a.apps)
        .filter(|app| {
            app.spec
                .pm_ids
                .iter()
                .any(|&id| matches(target, &app.spec, id))
        })
        .filter_map(AssignedApp::key)
        .collect()
}

/// The pm_ids the desired state keeps stopped, fleet-wide.
pub(crate) fn stopped(desired: &Desired) -> BTreeSet<u32> {
    desired
        .values()
        .flat_map(|a| &a.apps)
        .flat_map(|e| {
            e.spec
                .pm_ids
                .iter()
                .filter(|&&id| !e.wants_running(id))
                .copied()
        })
        .collect()
}

/// One instance of an app where it is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The host it is assigned to.
    pub(crate) host: String,
    /// Its process.
    pub(crate) pm_id: u32,
    /// Its instance number within the app (`NODE_APP_INSTANCE`).
    pub(crate) number: u32,
    /// False when the desired state keeps it stopped.
    pub(crate) running: bool,
}

/// Every instance of `app`, host by host.
pub(crate) fn slots(desired: &Desired, app: &AppKey) -> Vec<Slot> {
    let mut out = vec![];
    for (host, a) in desired {
        for entry in a.apps.iter().filter(|e| e.key().as_ref() == Some(app)) {
            for (pm_id, number) in entry.instances() {
                out.push(Slot {
                    host: host.clone(),
                    pm_id,
                    number,
                    running: entry.wants_running(pm_id),
                });
            }
        }
    }
    out
}

/// The share of `app` that `a` holds and wants running, as a start request's spec for its
/// agent; `None` when there is none.
pub(crate) fn share(a: &Assignment, app: &AppKey) -> Option<AppSpec> {
    a.apps
        .iter()
        .find(|e| e.key().as_ref() == Some(app))
        .map(|e| {
            let mut spec = e.spec.clone();
            let keep: Vec<(u32, u32)> = e
                .instances()
                .into_iter()
                .filter(|(id, _)| e.wants_running(*id))
                .collect();
            spec.pm_ids = keep.iter().map(|x| x.0).collect();
            spec.instance_numbers = keep.iter().map(|x| x.1).collect();
            spec.instances = Some(keep.len() as u32);
            spec
        })
        .filter(|s| !s.pm_ids.is_empty())
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Desired states for the controller's unit tests.

    use super::*;

    /// An app `ns/name` with these `(pm_id, number)` instances, the `stopped` ones kept down.
    pub(crate) fn entry(ns: &str, name: &str, list: &[(u32, u32)], stopped: &[u32]) -> AssignedApp {
        let mut spec = AppSpec::new(name, "/srv/app.js");
        spec.namespace = ns.into();
        let mut e = AssignedApp {
            spec,
            running: true,
            stopped: stopped.iter().copied().collect(),
        };
        e.set_instances(list);
        e
    }

    /// A desired state of `(host, apps)`.
    pub(crate) fn desired(hosts: &[(&str, Vec<AssignedApp>)]) -> Desired {
        hosts
            .iter()
            .map(|(h, apps)| {
                let a = Assignment {
                    host: h.to_string(),
                    apps: apps.clone(),
                };
                (h.to_string(), a)
            })
            .collect()
    }

    /// `ns/name`
    pub(crate) fn key(ns: &str, name: &str) -> AppKey {
        AppKey::new(ns, name).expect("test names are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    /// `api` (pm_ids 0..=3, two per host, 1 stopped) and `web` (pm_id 4) in another namespace.
    fn fleet() -> Desired {
        desired(&[
            (
                "a",
                vec![
                    entry("default", "api", &[(0, 0), (1, 1)], &[1]),
                    entry("ops", "web", &[(4, 0)], &[]),
                ],
            ),
            ("b", vec![entry("default", "api", &[(2, 2), (3, 3)], &[])]),
            ("c", vec![]),
        ])
    }

    #[test]
    fn select_names_pm_ids_per_host() {
        let d = fleet();
        let all = select(&d, &Target::All);
        assert_eq!(
            all,
            [("a".into(), vec![0, 1, 4]), ("b".into(), vec![2, 3])].into()
        );
        let api = select(&d, &Target::parse("api").unwrap());
        assert_eq!(
            api,
            [("a".into(), vec![0, 1]), ("b".into(), vec![2, 3])].into()
        );
        assert_eq!(select(&d, &Target::Id(3)), [("b".into(), vec![3])].into());
        assert_eq!(
            select(&d, &Target::parse("ops/web").unwrap()),
            [("a".into(), vec![4])].into()
        );
        // The namespace must match when given.
        assert!(select(&d, &Target::parse("ops/api").unwrap()).is_empty());
        assert!(select(&d, &Target::Id(9)).is_empty());
    }

    #[test]
    fn apps_of_and_stopped() {
        let d = fleet();
        assert_eq!(
            apps_of(&d, &Target::All),
            [key("default", "api"), key("ops", "web")].into()
        );
        assert_eq!(apps_of(&d, &Target::Id(4)), [key("ops", "web")].into());
        assert!(apps_of(&d, &Target::Id(9)).is_empty());
        assert_eq!(stopped(&d), [1].into());
    }

    #[test]
    fn slots_list_an_apps_instances_where_they_are() {
        let d = fleet();
        let s = slots(&d, &key("default", "api"));
        let got: Vec<_> = s
            .iter()
            .map(|s| (s.host.as_str(), s.pm_id, s.number, s.running))
            .collect();
        assert_eq!(
            got,
            [
                ("a", 0, 0, true),
                ("a", 1, 1, false),
                ("b", 2, 2, true),
                ("b", 3, 3, true)
            ]
        );
        assert!(slots(&d, &key("default", "web")).is_empty());
    }

    #[test]
    fn share_is_what_a_host_runs_of_an_app() {
        let d = fleet();
        let api = key("default", "api");
        // Without the stopped instance, numbers kept in step with pm_ids.
        let s = share(&d["a"], &api).expect("a runs api");
        assert_eq!(
            (s.pm_ids, s.instance_numbers, s.instances),
            (vec![0], vec![0], Some(1))
        );
        let s = share(&d["b"], &api).expect("b runs api");
        assert_eq!((s.pm_ids, s.instance_numbers), (vec![2, 3], vec![2, 3]));
        assert_eq!(share(&d["c"], &api), None);
        // Every instance stopped: nothing to start.
        let d = desired(&[("a", vec![entry("default", "api", &[(0, 0)], &[0])])]);
        assert_eq!(share(&d["a"], &api), None);
    }
}
