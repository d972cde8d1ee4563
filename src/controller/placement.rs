//! Placement: which hosts run an app's instances. Spread across the eligible hosts,
//! least loaded first; labels and explicit hosts narrow the choice. Pure.

use std::collections::BTreeMap;

/// A live host as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The host's id, as its agent reports it in heartbeats.
    pub host: String,
    /// The labels its agent was started with; `--label k=v` places only on hosts with `k=v`.
    pub labels: BTreeMap<String, String>,
    /// Processes in its table at its last heartbeat (placement prefers the least loaded).
    pub load: u32,
}

/// Placement could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No live host fits.
    #[error("no live host fits{0}: `flotilla info` lists the hosts and their labels")]
    NoHost(String),
    /// An explicitly named host is not live.
    #[error(
        "host '{0}' is not live (no heartbeat): start `flotilla agent` there, or choose another host"
    )]
    UnknownHost(String),
}

/// Spreads `instances` over the eligible candidates: each instance goes to the host with the
/// fewest instances of this app so far, then the fewest processes, then the lowest host id (so
/// placement is stable). An app survives the loss of a host whenever it can. `hosts` (when not empty)
/// names the only eligible hosts; every `labels` pair must match.
pub fn place(
    instances: u32,
    candidates: &[Candidate],
    hosts: &[String],
    labels: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, u32>, PlacementError> {
    add(instances, candidates, &BTreeMap::new(), hosts, labels)
}

/// Places `instances` more instances of an app that has `current` instances per host already
/// (scale up): the same rule, counting the ones in place.
pub fn add(
    instances: u32,
    candidates: &[Candidate],
    current: &BTreeMap<String, u32>,
    hosts: &[String],
    labels: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, u32>, PlacementError> {
    for h in hosts {
        if !candidates.iter().any(|c| &c.host == h) {
            return Err(PlacementError::UnknownHost(h.clone()));
        }
    }
    let eligible: Vec<(u32, &str)> = candidates
        .iter()
        .filter(|c| hosts.is_empty() || hosts.contains(&c.host))
        .filter(|c| labels.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
        .map(|c| (c.load, c.host.as_str()))
        .collect();
    if eligible.is_empty() {
        let why = if labels.is_empty() {
            String::new()
        } else {
            format!(
                " the labels {}",
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        return Err(PlacementError::NoHost(why));
    }
    // (instances of this app on the host, its load, host id): spread first, then least loaded.
    let mut slots: Vec<(u32, u32, &str)> = eligible
        .iter()
        .map(|&(l, h)| (current.get(h).copied().unwrap_or(0), l, h))
        .collect();
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..instances {
        slots.sort();
        let (mine, load, host) = &mut slots[0];
        *mine += 1;
        *load += 1;
        *out.entry(host.to_string()).or_default() += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(host: &str, load: u32, labels: &[(&str, &str)]) -> Candidate {
        Candidate {
            host: host.into(),
            load,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn spreads_least_loaded_first() {
        let cs = [c("a", 3, &[]), c("b", 0, &[]), c("c", 1, &[])];
        let p = place(4, &cs, &[], &BTreeMap::new()).unwrap();
        // One on each host first, least loaded first (b, c, a); the fourth to the least loaded.
        assert_eq!(
            p,
            [
                ("a".to_string(), 1),
                ("b".to_string(), 2),
                ("c".to_string(), 1)
            ]
            .into()
        );
    }

    #[test]
    fn scale_up_fills_the_hosts_with_fewest_instances_first() {
        let cs = [c("a", 5, &[]), c("b", 5, &[]), c("new", 0, &[])];
        let current: BTreeMap<_, _> = [("a".to_string(), 2), ("b".to_string(), 2)].into();
        let p = add(3, &cs, &current, &[], &BTreeMap::new()).unwrap();
        // Fewest of this app first: the new host gets all three (it then has 3, the others 2).
        assert_eq!(p, [("new".to_string(), 3)].into());
        let p = add(4, &cs, &current, &[], &BTreeMap::new()).unwrap();
        assert_eq!(p, [("a".to_string(), 1), ("new".to_string(), 3)].into());
    }

    #[test]
    fn labels_and_explicit_hosts_narrow_the_choice() {
        let cs = [c("a", 0, &[("zone", "eu")]), c("b", 0, &[("zone", "us")])];
        let zone: BTreeMap<_, _> = [("zone".to_string(), "us".to_string())].into();
        assert_eq!(
            place(2, &cs, &[], &zone).unwrap(),
            [("b".to_string(), 2)].into()
        );
        assert_eq!(
            place(1, &cs, &["a".into()], &BTreeMap::new()).unwrap(),
            [("a".to_string(), 1)].into()
        );
        assert_eq!(
            place(1, &cs, &["nope".into()], &BTreeMap::new()).unwrap_err(),
            PlacementError::UnknownHost("nope".into())
        );
        let none: BTreeMap<_, _> = [("zone".to_string(), "ap".to_string())].into();
        let e = place(1, &cs, &[], &none).unwrap_err().to_string();
        assert!(e.contains("zone=ap"), "{e}");
        assert!(place(1, &[], &[], &BTreeMap::new()).is_err());
    }
}
