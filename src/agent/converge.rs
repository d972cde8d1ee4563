//! Convergence: what an agent must do to make its process table match its
//! [`Assignment`]. Pure: the supervisor applies the plan.
//!
//! Rules: a pm_id assigned and absent is started; a pm_id present and no longer assigned is
//! deleted; an assigned pm_id marked not running is stopped; one marked running again (it was
//! marked stopped in the previous assignment) is started again; a pm_id whose spec changed is
//! restarted with the new spec. A process that stopped or errored on its own (autorestart off, a
//! stop exit code, `restart overlimit`) is left alone, as pm2 leaves it: convergence acts on
//! changes of the desired state, it does not fight the restart policy.

use crate::protocol::AppSpec;
use crate::protocol::state::Assignment;
use std::collections::{BTreeMap, BTreeSet};

/// One process as the table has it.
#[derive(Debug, Clone)]
pub struct Have<'a> {
    /// The process (its pm_id).
    pub pm_id: u32,
    /// The options it runs with now.
    pub spec: &'a AppSpec,
    /// True while it runs (or is about to).
    pub alive: bool,
    /// True while a stop is under way.
    pub stopping: bool,
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
    /// Start a stopped process again (it is wanted running again).
    Resume(u32),
}

/// True when two specs differ only in fields that differ between instances or hosts.
pub fn same_shape(a: &AppSpec, b: &AppSpec) -> bool {
    shape(a) == shape(b)
}

/// The spec without the fields that differ between instances or hosts.
fn shape(spec: &AppSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).expect("specs always serialise");
    if let Some(o) = v.as_object_mut() {
        o.remove("pm_ids");
        o.remove("instances");
        o.remove("instance_numbers");
    }
    v
}

/// pm_id → (spec, wanted running) of an assignment.
fn wanted(a: &Assignment) -> BTreeMap<u32, (&AppSpec, bool)> {
    let mut out = BTreeMap::new();
    for app in &a.apps {
        for &id in &app.spec.pm_ids {
            out.insert(id, (&app.spec, app.wants_running(id)));
        }
    }
    out
}

/// The steps that take `have` to `want`, deletes first (they free ports and memory). `prev` is
/// the assignment applied before this one, if any: a process it marked stopped that `want`
/// marks running is started again.
pub fn plan(have: &[Have<'_>], prev: Option<&Assignment>, want: &Assignment) -> Vec<Action> {
    let wanted = wanted(want);
    let before = prev.map(wanted_owned).unwrap_or_default();
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
                } else if *running
                    && (!h.alive || h.stopping)
                    && before.get(&h.pm_id) == Some(&false)
                {
                    out.push(Action::Resume(h.pm_id));
                }
            }
        }
    }
    out.sort_by_key(|a| !matches!(a, Action::Delete(_)));
    for app in &want.apps {
        let mut missing = vec![];
        let mut numbers = vec![];
        for (i, &id) in app.spec.pm_ids.iter().enumerate() {
            if app.wants_running(id) && !present.contains(&id) {
                missing.push(id);
                numbers.push(
                    app.spec
                        .instance_numbers
                        .get(i)
                        .copied()
                        .unwrap_or(i as u32),
                );
            }
        }
        if !missing.is_empty() {
            let mut spec = app.spec.clone();
            spec.instances = Some(missing.len() as u32);
            // All of them, numbered by position: the numbers go without saying.
            let implied =
                app.spec.instance_numbers.is_empty() && missing.len() == app.spec.pm_ids.len();
            spec.pm_ids = missing;
            spec.instance_numbers = if implied { vec![] } else { numbers };
            out.push(Action::Start(spec));
        }
    }
    out
}

fn wanted_owned(a: &Assignment) -> BTreeMap<u32, bool> {
    wanted(a).into_iter().map(|(k, (_, r))| (k, r)).collect()
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
                .map(|(spec, running)| AssignedApp {
                    spec,
                    running,
                    stopped: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn from_nothing_everything_starts() {
        let w = want(vec![
            (spec("api", &[0, 1]), true),
            (spec("jobs", &[2]), true),
        ]);
        let p = plan(&[], None, &w);
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
                stopping: false,
            },
            Have {
                pm_id: 1,
                spec: &api,
                alive: false,
                stopping: false,
            },
        ];
        assert_eq!(plan(&have, None, &w), vec![]);
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
                stopping: false,
            },
            Have {
                pm_id: 1,
                spec: &old,
                alive: true,
                stopping: false,
            },
            Have {
                pm_id: 2,
                spec: &old,
                alive: true,
                stopping: false,
            },
            Have {
                pm_id: 5,
                spec: &jobs,
                alive: true,
                stopping: false,
            },
            Have {
                pm_id: 9,
                spec: &gone,
                alive: true,
                stopping: false,
            },
        ];
        let mut new = spec("api", &[0, 1, 3]);
        new.env.insert("K".into(), "v".into()); // changed spec
        let w = want(vec![(new.clone(), true), (jobs.clone(), false)]);
        let p = plan(&have, None, &w);
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
                    s.instance_numbers = vec![2];
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
                stopping: false,
            },
            Have {
                pm_id: 1,
                spec: &a,
                alive: true,
                stopping: false,
            },
        ];
        let p = plan(&have, None, &want(vec![(b, true)]));
        assert_eq!(p.len(), 1);
        assert!(matches!(&p[0], Action::Start(s) if s.pm_ids == vec![2]));
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;
    use crate::protocol::state::AssignedApp;

    fn app(ids: &[u32], running: bool, stopped: &[u32]) -> Assignment {
        let mut s = AppSpec::new("api", "/srv/app.js");
        s.pm_ids = ids.to_vec();
        s.instance_numbers = ids.iter().map(|i| i * 10).collect();
        Assignment {
            host: "h".into(),
            apps: vec![AssignedApp {
                spec: s,
                running,
                stopped: stopped.iter().copied().collect(),
            }],
        }
    }

    #[test]
    fn one_instance_stopped_then_resumed() {
        let before = app(&[0, 1], true, &[]);
        let spec = &before.apps[0].spec;
        let have = |alive1: bool| {
            vec![
                Have {
                    pm_id: 0,
                    spec,
                    alive: true,
                    stopping: false,
                },
                Have {
                    pm_id: 1,
                    spec,
                    alive: alive1,
                    stopping: false,
                },
            ]
        };
        let stop1 = app(&[0, 1], true, &[1]);
        assert_eq!(
            plan(&have(true), Some(&before), &stop1),
            vec![Action::Stop(1)]
        );
        // Marked running again: started again; without the previous assignment saying it was
        // stopped on purpose, a process that stopped by itself is left alone.
        assert_eq!(
            plan(&have(false), Some(&stop1), &before),
            vec![Action::Resume(1)]
        );
        assert_eq!(plan(&have(false), Some(&before), &before), vec![]);
        assert_eq!(plan(&have(false), None, &before), vec![]);
    }

    #[test]
    fn missing_instances_keep_their_fleet_numbers_and_stopped_ones_stay_down() {
        let want = app(&[4, 5, 6], true, &[5]);
        let p = plan(&[], None, &want);
        let [Action::Start(s)] = p.as_slice() else {
            panic!("{p:?}")
        };
        assert_eq!(s.pm_ids, vec![4, 6]);
        assert_eq!(s.instance_numbers, vec![40, 60]);
        assert_eq!(plan(&[], None, &app(&[4], false, &[])), vec![]);
    }
}
