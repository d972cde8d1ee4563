//! Desired-state planning, pure: which instances a start creates where, which a rescale adds or
//! takes away, how each verb edits an assignment, and the order of a rolling reload. The verbs
//! (`verbs/`) read the desired state, plan with these, write the result by compare-and-set and
//! ask the agents.

use super::desired::{Desired, PerHost, Slot, matches};
use crate::protocol::app::MAX_INSTANCES;
use crate::protocol::control::{Target, TargetVerb};
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::state::{AssignedApp, Assignment};
use crate::protocol::{AppKey, AppSpec};
use std::collections::{BTreeMap, BTreeSet};

/// `(pm_id, instance number)` pairs.
pub(crate) type Instances = Vec<(u32, u32)>;

/// A new app's entry per host: the fresh `ids` handed out host by host (in host order, as
/// `placed` counts them), numbered from 0.
pub(crate) fn new_app(
    base: &AppSpec,
    ids: &[u32],
    placed: &BTreeMap<String, u32>,
) -> Vec<(String, AssignedApp)> {
    let mut ids = ids.iter().copied();
    let mut number = 0u32;
    let mut out = vec![];
    for (host, &count) in placed {
        let list: Instances = ids
            .by_ref()
            .take(count as usize)
            .zip(number..number + count)
            .collect();
        number += count;
        let mut entry = AssignedApp {
            spec: base.clone(),
            running: true,
            stopped: BTreeSet::new(),
        };
        entry.set_instances(&list);
        out.push((host.clone(), entry));
    }
    out
}

/// Puts `entry` in `a` in place of what `a` had of its app.
pub(crate) fn put(a: &mut Assignment, app: &AppKey, entry: &AssignedApp) {
    a.apps.retain(|e| e.key().as_ref() != Some(app));
    a.apps.push(entry.clone());
}

/// An app's instance count per host.
pub(crate) fn per_host(slots: &[Slot]) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for s in slots {
        *out.entry(s.host.clone()).or_default() += 1;
    }
    out
}

/// The instances a scale-up adds: `more` (new instances per host, from placement) gets the
/// fresh `ids` in host order, and instance numbers that fill the gaps among `slots` first.
pub(crate) fn grow(
    slots: &[Slot],
    more: &BTreeMap<String, u32>,
    ids: &[u32],
) -> BTreeMap<String, Instances> {
    let used: BTreeSet<u32> = slots.iter().map(|s| s.number).collect();
    let mut numbers = (0u32..).filter(|x| !used.contains(x));
    let mut ids = ids.iter().copied();
    more.iter()
        .map(|(host, &count)| {
            let list: Instances = ids
                .by_ref()
                .zip(numbers.by_ref())
                .take(count as usize)
                .collect();
            (host.clone(), list)
        })
        .collect()
}

/// Adds `list` to `app`'s instances in `a` (a new entry made from `base` when `a` has none).
pub(crate) fn add_instances(a: &mut Assignment, app: &AppKey, base: &AppSpec, list: &[(u32, u32)]) {
    match a.apps.iter_mut().find(|e| e.key().as_ref() == Some(app)) {
        Some(e) => {
            let mut all = e.instances();
            all.retain(|x| !list.contains(x));
            all.extend(list.iter().copied());
            e.set_instances(&all);
        }
        None => {
            let mut e = AssignedApp {
                spec: base.clone(),
                running: true,
                stopped: BTreeSet::new(),
            };
            e.set_instances(list);
            a.apps.push(e);
        }
    }
}

/// The instances a scale-down to `n` takes away, per host: the highest instance numbers.
pub(crate) fn shrink(slots: &[Slot], n: u32) -> PerHost {
    let mut by_number = slots.to_vec();
    by_number.sort_by_key(|s| std::cmp::Reverse(s.number));
    let surplus = by_number.len().saturating_sub(n as usize);
    let mut out = PerHost::new();
    for s in by_number.into_iter().take(surplus) {
        out.entry(s.host).or_default().push(s.pm_id);
    }
    out
}

/// Takes the `gone` pm_ids out of `app`'s instances in `a`.
pub(crate) fn remove_instances(a: &mut Assignment, app: &AppKey, gone: &[u32]) {
    for e in a.apps.iter_mut().filter(|e| e.key().as_ref() == Some(app)) {
        let mut all = e.instances();
        all.retain(|(id, _)| !gone.contains(id));
        e.set_instances(&all);
    }
}

/// The pm_ids of `app` that `target` names, per host: what removing them takes away.
pub(crate) fn removal(desired: &Desired, app: &AppKey, target: &Target) -> PerHost {
    let mut out = PerHost::new();
    for (host, a) in desired {
        let gone: Vec<u32> = a
            .apps
            .iter()
            .filter(|e| e.key().as_ref() == Some(app))
            .flat_map(|e| {
                e.spec
                    .pm_ids
                    .iter()
                    .copied()
                    .filter(|&id| matches(target, &e.spec, id))
            })
            .collect();
        if !gone.is_empty() {
            out.insert(host.clone(), gone);
        }
    }
    out
}

/// Gives every instance of `app` in `a` the spec `base` (keeping which instances are here)
/// and wants them all running.
pub(crate) fn respec(a: &mut Assignment, app: &AppKey, base: &AppSpec) {
    for e in a.apps.iter_mut().filter(|e| e.key().as_ref() == Some(app)) {
        let list = e.instances();
        e.spec = base.clone();
        e.set_instances(&list);
        e.running = true;
        e.stopped.clear();
    }
}

/// What `verb` does to the `ids` in `a`: `stop` keeps them stopped, `restart` and `reload` want
/// them running again, `delete` takes them out.
pub(crate) fn edit_targeted(verb: TargetVerb, a: &mut Assignment, ids: &[u32]) {
    for e in a.apps.iter_mut() {
        let mine: Vec<u32> = e
            .spec
            .pm_ids
            .iter()
            .copied()
            .filter(|id| ids.contains(id))
            .collect();
        match verb {
            TargetVerb::Stop => e.stopped.extend(mine),
            TargetVerb::Restart | TargetVerb::Reload => {
                for id in mine {
                    e.stopped.remove(&id);
                }
            }
            TargetVerb::Delete => {
                let mut all = e.instances();
                all.retain(|(id, _)| !mine.contains(id));
                e.set_instances(&all);
            }
        }
    }
}

/// A restart or reload of instances that were stopped starts them instead (the agent's
/// convergence may start them first, and a restart would then kill the run it just began).
/// Takes those out of `sel` and returns their start specs per host, made from `after` (the
/// assignments as edited).
pub(crate) fn resumptions(
    sel: &mut PerHost,
    after: &Desired,
    was_stopped: &BTreeSet<u32>,
) -> Vec<(String, AppSpec)> {
    let mut out = vec![];
    for (host, ids) in sel.iter_mut() {
        let back: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| was_stopped.contains(id))
            .collect();
        if back.is_empty() {
            continue;
        }
        ids.retain(|id| !back.contains(id));
        for e in after
            .get(host)
            .map(|a| a.apps.as_slice())
            .unwrap_or_default()
        {
            let list: Instances = e
                .instances()
                .into_iter()
                .filter(|(id, _)| back.contains(id))
                .collect();
            if list.is_empty() {
                continue;
            }
            let mut share = e.clone();
            share.set_instances(&list);
            out.push((host.clone(), share.spec));
        }
    }
    sel.retain(|_, ids| !ids.is_empty());
    out
}

/// A rolling reload's batches: every selected instance in pm_id order, `parallel` at a time
/// (pm2's `--parallel`), never all of them at once (at most all but one, unless there is one).
pub(crate) fn reload_batches(sel: PerHost, parallel: u32) -> Vec<Vec<(u32, String)>> {
    let mut order: Vec<(u32, String)> = sel
        .into_iter()
        .flat_map(|(h, ids)| ids.into_iter().map(move |id| (id, h.clone())))
        .collect();
    order.sort();
    let k = (parallel.max(1) as usize).min(order.len().saturating_sub(1).max(1));
    order.chunks(k).map(<[_]>::to_vec).collect()
}

/// The instance count a `scale` asks for: `instances`, or the current count changed by
/// `change` (`+N` / `-N`, resolved against the desired state). Zero (that would be a delete)
/// and more than [`MAX_INSTANCES`] are refused.
pub(crate) fn scaled_count(
    app: &AppKey,
    current: usize,
    change: Option<i64>,
    instances: u32,
) -> Result<u32, ControlError> {
    let n = match change {
        Some(d) => (current as i64)
            .saturating_add(d)
            .clamp(0, i64::from(u32::MAX)) as u32,
        None => instances,
    };
    if n > MAX_INSTANCES {
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            format!("{n} instances is more than {MAX_INSTANCES}"),
        ));
    }
    if n == 0 {
        let name = app.name();
        return Err(ControlError::new(
            ErrorKind::InvalidValue,
            format!(
                "scale {name} to 0 would delete it: `flotilla stop {name}` keeps it, `flotilla delete {name}` removes it"
            ),
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::desired::fixtures::{desired, entry, key};
    use crate::controller::desired::slots;

    fn api() -> AppKey {
        key("default", "api")
    }

    fn base() -> AppSpec {
        entry("default", "api", &[], &[]).spec
    }

    #[test]
    fn a_new_app_is_numbered_across_hosts_in_host_order() {
        let placed: BTreeMap<_, _> = [("b".to_string(), 1), ("a".to_string(), 2)].into();
        let got = new_app(&base(), &[10, 11, 12], &placed);
        let got: Vec<_> = got
            .iter()
            .map(|(h, e)| (h.as_str(), e.instances(), e.running))
            .collect();
        assert_eq!(
            got,
            [
                ("a", vec![(10, 0), (11, 1)], true),
                ("b", vec![(12, 2)], true)
            ]
        );
        // Put in place of what a host had of the app; other apps stay.
        let mut d = desired(&[(
            "a",
            vec![
                entry("default", "api", &[(1, 0)], &[1]),
                entry("default", "x", &[(2, 0)], &[]),
            ],
        )]);
        let a = d.get_mut("a").expect("host a");
        put(
            a,
            &api(),
            &new_app(&base(), &[10], &[("a".into(), 1)].into())[0].1,
        );
        assert_eq!(a.apps.len(), 2);
        assert_eq!(a.apps[1].instances(), [(10, 0)]);
        assert!(a.apps[1].stopped.is_empty());
    }

    #[test]
    fn scale_up_fills_number_gaps_first_and_adds_to_existing_entries() {
        // api has numbers 0 and 2 (1 went earlier).
        let d = desired(&[
            ("a", vec![entry("default", "api", &[(5, 0)], &[])]),
            ("b", vec![entry("default", "api", &[(7, 2)], &[])]),
        ]);
        let s = slots(&d, &api());
        assert_eq!(per_host(&s), [("a".into(), 1), ("b".into(), 1)].into());
        let more: BTreeMap<_, _> = [("a".to_string(), 1), ("c".to_string(), 2)].into();
        let g = grow(&s, &more, &[20, 21, 22]);
        assert_eq!(
            g,
            [
                ("a".to_string(), vec![(20, 1)]),
                ("c".to_string(), vec![(21, 3), (22, 4)])
            ]
            .into()
        );
        let mut a = d["a"].clone();
        add_instances(&mut a, &api(), &base(), &g["a"]);
        assert_eq!(a.apps[0].instances(), [(5, 0), (20, 1)]);
        // Idempotent: the edit may run again on a compare-and-set retry.
        add_instances(&mut a, &api(), &base(), &g["a"]);
        assert_eq!(a.apps[0].instances(), [(5, 0), (20, 1)]);
        let mut c = Assignment::default();
        add_instances(&mut c, &api(), &base(), &g["c"]);
        assert_eq!(c.apps[0].instances(), [(21, 3), (22, 4)]);
        assert_eq!(c.apps[0].spec.instances, Some(2));
    }

    #[test]
    fn scale_down_takes_the_highest_numbers_first() {
        let d = desired(&[
            ("a", vec![entry("default", "api", &[(0, 0), (3, 3)], &[])]),
            ("b", vec![entry("default", "api", &[(1, 1), (2, 2)], &[])]),
        ]);
        let s = slots(&d, &api());
        assert_eq!(
            shrink(&s, 2),
            [("a".to_string(), vec![3]), ("b".to_string(), vec![2])].into()
        );
        assert_eq!(shrink(&s, 1).values().flatten().count(), 3);
        assert!(shrink(&s, 4).is_empty());
        assert!(shrink(&s, 9).is_empty());
        let mut a = d["a"].clone();
        remove_instances(&mut a, &api(), &[3]);
        assert_eq!(a.apps[0].instances(), [(0, 0)]);
    }

    #[test]
    fn removal_takes_what_the_target_names_of_one_app() {
        let d = desired(&[
            (
                "a",
                vec![
                    entry("default", "api", &[(0, 0)], &[]),
                    entry("default", "web", &[(1, 0)], &[]),
                ],
            ),
            ("b", vec![entry("default", "api", &[(2, 1)], &[])]),
        ]);
        assert_eq!(
            removal(&d, &api(), &Target::All),
            [("a".to_string(), vec![0]), ("b".to_string(), vec![2])].into()
        );
        assert_eq!(
            removal(&d, &api(), &Target::Id(2)),
            [("b".to_string(), vec![2])].into()
        );
        assert!(removal(&d, &api(), &Target::Id(1)).is_empty());
    }

    #[test]
    fn respec_gives_every_instance_the_new_spec_and_runs_them() {
        let mut d = desired(&[("a", vec![entry("default", "api", &[(4, 1), (6, 3)], &[6])])]);
        let a = d.get_mut("a").expect("host a");
        a.apps[0].running = false;
        let mut new = base();
        new.args = vec!["--new".into()];
        respec(a, &api(), &new);
        let e = &a.apps[0];
        assert_eq!(e.spec.args, ["--new"]);
        assert_eq!(e.instances(), [(4, 1), (6, 3)]);
        assert!(e.wants_running(4) && e.wants_running(6));
    }

    #[test]
    fn targeted_edits_per_verb() {
        let d = desired(&[(
            "a",
            vec![
                entry("default", "api", &[(0, 0), (1, 1)], &[1]),
                entry("default", "web", &[(2, 0)], &[]),
            ],
        )]);
        let edit = |verb, ids: &[u32]| {
            let mut a = d["a"].clone();
            edit_targeted(verb, &mut a, ids);
            a
        };
        let a = edit(TargetVerb::Stop, &[0, 2]);
        assert_eq!(a.apps[0].stopped, [0, 1].into());
        assert_eq!(a.apps[1].stopped, [2].into());
        for verb in [TargetVerb::Restart, TargetVerb::Reload] {
            let a = edit(verb, &[1]);
            assert!(a.apps[0].stopped.is_empty(), "{verb}");
        }
        let a = edit(TargetVerb::Delete, &[1, 2]);
        assert_eq!(a.apps[0].instances(), [(0, 0)]);
        assert!(
            a.apps[0].stopped.is_empty(),
            "the deleted one is not kept stopped"
        );
        // Emptied entries are dropped by the write (`desired::edit_host`), not here.
        assert!(a.apps[1].spec.pm_ids.is_empty());
        // Ids that are not here change nothing.
        assert_eq!(edit(TargetVerb::Stop, &[9]), d["a"]);
    }

    #[test]
    fn stopped_instances_are_resumed_by_a_start_not_restarted() {
        let after = desired(&[
            ("a", vec![entry("default", "api", &[(0, 0), (1, 1)], &[])]),
            ("b", vec![entry("default", "api", &[(2, 2)], &[])]),
        ]);
        let mut sel: PerHost = [("a".into(), vec![0, 1]), ("b".into(), vec![2])].into();
        let starts = resumptions(&mut sel, &after, &[1, 2].into());
        let starts: Vec<_> = starts
            .iter()
            .map(|(h, s)| (h.as_str(), s.pm_ids.clone(), s.instance_numbers.clone()))
            .collect();
        assert_eq!(starts, [("a", vec![1], vec![1]), ("b", vec![2], vec![2])]);
        // What is left is restarted; hosts with nothing left are dropped.
        assert_eq!(sel, [("a".into(), vec![0])].into());
    }

    #[test]
    fn reloads_go_in_pm_id_order_in_batches_never_all_at_once() {
        let sel = || -> PerHost { [("b".into(), vec![1, 4]), ("a".into(), vec![3, 2])].into() };
        let ids = |b: &[Vec<(u32, String)>]| -> Vec<Vec<u32>> {
            b.iter()
                .map(|x| x.iter().map(|(id, _)| *id).collect())
                .collect()
        };
        assert_eq!(
            reload_batches(sel(), 1),
            [
                vec![(1, "b".to_string())],
                vec![(2, "a".to_string())],
                vec![(3, "a".to_string())],
                vec![(4, "b".to_string())]
            ]
        );
        assert_eq!(ids(&reload_batches(sel(), 0)), [[1], [2], [3], [4]]);
        assert_eq!(ids(&reload_batches(sel(), 2)), [vec![1, 2], vec![3, 4]]);
        // --parallel 4 (or more) of 4: three, then the last, so one stays up.
        assert_eq!(ids(&reload_batches(sel(), 4)), [vec![1, 2, 3], vec![4]]);
        assert_eq!(ids(&reload_batches(sel(), 99)), [vec![1, 2, 3], vec![4]]);
        // One instance alone is reloaded alone.
        let one: PerHost = [("a".into(), vec![7])].into();
        assert_eq!(ids(&reload_batches(one, 5)), [[7]]);
        assert!(reload_batches(PerHost::new(), 3).is_empty());
    }

    #[test]
    fn scale_counts() {
        let app = api();
        assert_eq!(scaled_count(&app, 2, None, 5).unwrap(), 5);
        assert_eq!(scaled_count(&app, 2, Some(3), 0).unwrap(), 5);
        assert_eq!(scaled_count(&app, 4, Some(-1), 9).unwrap(), 3);
        let zero = scaled_count(&app, 2, Some(-5), 0).unwrap_err();
        assert_eq!(zero.kind, ErrorKind::InvalidValue);
        assert!(
            zero.message.contains("`flotilla stop api` keeps it"),
            "{zero:?}"
        );
        assert!(scaled_count(&app, 1, None, 0).is_err());
        assert!(scaled_count(&app, 1, None, MAX_INSTANCES).is_ok());
        let big = scaled_count(&app, 1, None, MAX_INSTANCES + 1).unwrap_err();
        assert!(big.message.contains("more than"), "{big:?}");
        // A huge change saturates (it used to overflow) and is refused.
        assert!(scaled_count(&app, 1, Some(i64::MAX), 0).is_err());
        assert!(scaled_count(&app, 1, Some(i64::MIN), 0).is_err());
    }
}
