//! Convergence (issue 4): what an agent must do to make its process table match its
//! [`Assignment`]. Pure: the supervisor applies the plan.
//!
//! Rules: a pm_id assigned and absent is started; a pm_id present and no longer assigned is
//! deleted; an assigned app marked not running is stopped; a pm_id whose spec changed is
//! restarted with the new spec. A process that stopped or errored on its own (autorestart off, a
//! stop exit code, `restart overlimit`) is left alone, as pm2 leaves it: convergence acts on
//! changes of the desired state, it does not fight the restart policy.

use crate::protocol::AppSpec;
use crate::protocol::state::Assignment;
use std::collections::{BTreeMap, BTreeSet};

/// One process as the table has it.
#[derive(Debug, Clone)]
pub struct Have<'a> {
    /// pm_id
    pub pm_id: u32,
    /// Its spec.
    pub spec: &'a AppSpec,
    /// True while it runs (or is about to).
    pub alive: bool,
}

/// A step of the plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start these instances (the spec's `pm_ids` are the missing ones).
    Start(AppSpec),
    /// Stop (keep in the table).
    Stop(u32),
    /// Stop and remove.
    Delete(u32),
    /// Restart with a new spec.
    Respec(u32, AppSpec),
}

/// The spec without the fields that differ between instances or hosts.
fn shape(spec: &AppSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).expect("specs always serialise");
    if let Some(o) = v.as_object_mut() {
        o.remove("pm_ids");
        o.remove("instances");
    }
    v
}

/// The steps that take `have` to `want`, deletes first (they free ports and memory).
pub fn plan(have: &[Have<'_>], want: &Assignment) -> Vec<Action> {
    let mut wanted: BTreeMap<u32, (&AppSpec, bool)> = BTreeMap::new();
    for app in &want.apps {
        for &id in &app.spec.pm_ids {
            wanted.insert(id, (&app.spec, app.running));
        }
    }
    let present: BTreeSet<u32> = have.iter().map(|h| h.pm_id).collect();
    let mut out = vec![];
    for h in have {
        match wanted.get(&h.pm_id) {
            None => out.push(Action::Delete(h.pm_id)),
            Some((spec, running)) => {
                if shape(spec) != shape(h.spec) {
                    if *running {
                        out.push(Action::Respec(h.pm_id, (*spec).clone()));
                    } else {
                        out.push(Action::Delete(h.pm_id));
                    }
                } else if !running && h.alive {
                    out.push(Action::Stop(h.pm_id));
                }
            }
        }
    }
    out.sort_by_key(|a| !matches!(a, Action::Delete(_)));
    for app in &want.apps {
        if !app.running {
            continue;
        }
        let missing: Vec<u32> = app
            .spec
            .pm_ids
            .iter()
            .copied()
            .filter(|id| !present.contains(id))
            .collect();
        if !missing.is_empty() {
            let mut spec = app.spec.clone();
            spec.instances = Some(missing.len() as u32);
            spec.pm_ids = missing;
            out.push(Action::Start(spec));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::state::AssignedApp;

    fn spec(name: &str, ids: &[u32]) -> AppSpec {
        let mut s = AppSpec::new(name, "/srv/app.js");
        s.pm_ids = ids.to_vec();
        s.instances = Some(ids.len() as u32);
        s
    }

    fn want(apps: Vec<(AppSpec, bool)>) -> Assignment {
        Assignment {
            host: "h".into(),
            apps: apps
                .into_iter()
                .map(|(spec, running)| AssignedApp { spec, running })
                .collect(),
        }
    }

    #[test]
    fn from_nothing_everything_starts() {
        let w = want(vec![
            (spec("api", &[0, 1]), true),
            (spec("jobs", &[2]), true),
        ]);
        let p = plan(&[], &w);
        assert_eq!(
            p,
            vec![
                Action::Start(spec("api", &[0, 1])),
                Action::Start(spec("jobs", &[2]))
            ]
        );
    }

    #[test]
    fn converged_means_no_action_even_for_processes_that_stopped_on_their_own() {
        let api = spec("api", &[0, 1]);
        let w = want(vec![(api.clone(), true)]);
        let have = [
            Have {
                pm_id: 0,
                spec: &api,
                alive: true,
            },
            Have {
                pm_id: 1,
                spec: &api,
                alive: false,
            },
        ];
        assert_eq!(plan(&have, &w), vec![]);
    }

    #[test]
    fn scale_up_down_stop_delete_and_respec() {
        let old = spec("api", &[0, 1, 2]);
        let jobs = spec("jobs", &[5]);
        let gone = spec("gone", &[9]);
        let have = [
            Have {
                pm_id: 0,
                spec: &old,
                alive: true,
            },
            Have {
                pm_id: 1,
                spec: &old,
                alive: true,
            },
            Have {
                pm_id: 2,
                spec: &old,
                alive: true,
            },
            Have {
                pm_id: 5,
                spec: &jobs,
                alive: true,
            },
            Have {
                pm_id: 9,
                spec: &gone,
                alive: true,
            },
        ];
        let mut new = spec("api", &[0, 1, 3]);
        new.env.insert("K".into(), "v".into()); // changed spec
        let w = want(vec![(new.clone(), true), (jobs.clone(), false)]);
        let p = plan(&have, &w);
        assert_eq!(
            p,
            vec![
                Action::Delete(2),
                Action::Delete(9),
                Action::Respec(0, new.clone()),
                Action::Respec(1, new.clone()),
                Action::Stop(5),
                Action::Start({
                    let mut s = new.clone();
                    s.pm_ids = vec![3];
                    s.instances = Some(1);
                    s
                }),
            ]
        );
    }

    #[test]
    fn instance_count_alone_is_not_a_change_of_spec() {
        let a = spec("api", &[0, 1]);
        let b = spec("api", &[0, 1, 2]);
        let have = [
            Have {
                pm_id: 0,
                spec: &a,
                alive: true,
            },
            Have {
                pm_id: 1,
                spec: &a,
                alive: true,
            },
        ];
        let p = plan(&have, &want(vec![(b, true)]));
        assert_eq!(p.len(), 1);
        assert!(matches!(&p[0], Action::Start(s) if s.pm_ids == vec![2]));
    }
}
