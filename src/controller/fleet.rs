//! The fleet view: the hosts the controller has heard (heartbeats, `online`/`offline` host
//! events), which of them are live, and every process as last seen (from `ls` answers and
//! lifecycle events), which `ls` shows for a host that does not answer.

use super::placement::Candidate;
use crate::protocol::Envelope;
use crate::protocol::event::{HostEventKind, ProcessEvent};
use crate::protocol::fleet::{Heartbeat, HostEvent, HostView};
use crate::protocol::reply::ProcessInfo;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What the controller knows of the fleet. Shared by the run loop (which records) and the
/// verbs (which read); every lock is held only for a copy.
pub(crate) struct Fleet {
    /// Per host: when last heard from, and what it said (`state` and `last_seen_ms` are filled
    /// in when read).
    hosts: Mutex<BTreeMap<String, (Instant, HostView)>>,
    /// Told whenever a host joins the view.
    joined: Notify,
    /// Per (host, pm_id): the process as last seen.
    procs: Mutex<BTreeMap<(String, u32), ProcessInfo>>,
    /// A host not heard from for this long is lost (not placed on).
    lost_after: Duration,
}

/// A host's view with nothing but what every message about it says.
fn bare(host: String, labels: BTreeMap<String, String>, version: String) -> HostView {
    HostView {
        host,
        labels,
        version,
        state: String::new(),
        last_seen_ms: 0,
        processes: 0,
        online: 0,
        cpus: 0,
        load1: 0.0,
        mem_total: 0,
        mem_available: 0,
        agent_memory: 0,
    }
}

impl Fleet {
    /// An empty view; hosts are lost `lost_after` after their last heartbeat.
    pub(crate) fn new(lost_after: Duration) -> Self {
        Self {
            hosts: Mutex::default(),
            joined: Notify::new(),
            procs: Mutex::default(),
            lost_after,
        }
    }

    /// Records a heartbeat.
    pub(crate) fn heartbeat(&self, b: Heartbeat) {
        let view = HostView {
            processes: b.processes,
            online: b.online,
            cpus: b.cpus,
            load1: b.load1,
            mem_total: b.mem_total,
            mem_available: b.mem_available,
            agent_memory: b.memory,
            ..bare(b.host.clone(), b.labels, b.version)
        };
        let new = self.lock_hosts().insert(b.host, (Instant::now(), view));
        if new.is_none() {
            self.joined.notify_waiters();
        }
    }

    /// Records a host event. An agent says `online` before its first heartbeat: it can be
    /// placed on at once (a local stack's first `start` comes right after its agent is up).
    /// `offline` (a clean stop) takes it out of the view.
    pub(crate) fn host_event(&self, ev: HostEvent) {
        match ev.event {
            HostEventKind::Online => {
                let mut hosts = self.lock_hosts();
                if hosts.contains_key(&ev.host) {
                    return;
                }
                let view = bare(ev.host.clone(), ev.labels, ev.version);
                hosts.insert(ev.host, (Instant::now(), view));
                drop(hosts);
                self.joined.notify_waiters();
            }
            HostEventKind::Offline => {
                self.lock_hosts().remove(&ev.host);
            }
            _ => {}
        }
    }

    /// Records what a lifecycle event says of a process.
    pub(crate) fn process_event(&self, env: Envelope) {
        let key = (env.process.host.clone(), env.process.pm_id);
        let mut procs = self.lock_procs();
        if env
            .event
            .as_ref()
            .is_some_and(|e| e.event == ProcessEvent::Delete)
        {
            procs.remove(&key);
            return;
        }
        match procs.get_mut(&key) {
            Some(p) => p.meta = env.process,
            None => {
                procs.insert(key, ProcessInfo::from_meta(env.process));
            }
        }
    }

    /// Records the processes a host reported (all of them: the others are gone).
    pub(crate) fn process_list(&self, host: &str, list: &[ProcessInfo]) {
        let mut procs = self.lock_procs();
        procs.retain(|(h, _), _| h != host);
        for p in list {
            procs.insert((host.to_string(), p.meta.pm_id), p.clone());
        }
    }

    /// The processes of `host` as last seen, without live figures.
    pub(crate) fn last_seen(&self, host: &str) -> Vec<ProcessInfo> {
        self.lock_procs()
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|(_, p)| ProcessInfo {
                cpu: 0.0,
                memory: 0,
                ..p.clone()
            })
            .collect()
    }

    /// The live hosts; when there are none yet (a controller that just started, before the
    /// first heartbeats), waits up to `within` for one to be heard.
    pub(crate) async fn live_or_wait(&self, within: Duration) -> Vec<Candidate> {
        let deadline = Instant::now() + within;
        loop {
            let joined = self.joined.notified();
            let live = self.live();
            if !live.is_empty() {
                return live;
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return live;
            }
        }
    }

    /// Hosts heard from within `lost_after`.
    pub(crate) fn live(&self) -> Vec<Candidate> {
        let now = Instant::now();
        self.lock_hosts()
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) < self.lost_after)
            .map(|(h, (_, v))| Candidate {
                host: h.clone(),
                labels: v.labels.clone(),
                load: v.processes,
            })
            .collect()
    }

    /// Every host heard from since the controller started, `online` or `lost`.
    pub(crate) fn hosts(&self) -> Vec<HostView> {
        let now = Instant::now();
        self.lock_hosts()
            .values()
            .map(|(at, v)| {
                let ago = now.duration_since(*at);
                let state = if ago < self.lost_after {
                    "online"
                } else {
                    "lost"
                };
                HostView {
                    state: state.into(),
                    last_seen_ms: ago.as_millis() as u64,
                    ..v.clone()
                }
            })
            .collect()
    }

    fn lock_hosts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Instant, HostView)>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_procs(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), ProcessInfo>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::envelope::now_ms;
    use uuid::Uuid;

    fn beat(host: &str, processes: u32) -> Heartbeat {
        serde_json::from_value(serde_json::json!({
            "at": now_ms(), "id": Uuid::new_v4(), "host": host, "version": "1",
            "labels": {"zone": "eu"}, "processes": processes, "memory": 7,
        }))
        .expect("a valid heartbeat")
    }

    fn host_event(host: &str, event: HostEventKind) -> HostEvent {
        HostEvent {
            at: now_ms(),
            id: Uuid::new_v4(),
            host: host.into(),
            event,
            version: "1".into(),
            labels: BTreeMap::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_are_live_until_lost_after_and_listed_until_offline() {
        let f = Fleet::new(Duration::from_secs(10));
        f.heartbeat(beat("a", 3));
        let live = f.live();
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].host.as_str(), live[0].load), ("a", 3));
        assert_eq!(live[0].labels.get("zone").map(String::as_str), Some("eu"));
        let v = &f.hosts()[0];
        assert_eq!((v.state.as_str(), v.agent_memory), ("online", 7));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(f.live().is_empty());
        assert_eq!(f.hosts()[0].state, "lost");
        assert_eq!(f.hosts()[0].last_seen_ms, 10_000);
        f.heartbeat(beat("a", 4));
        assert_eq!(f.live()[0].load, 4);
        f.host_event(host_event("a", HostEventKind::Offline));
        assert!(f.hosts().is_empty());
    }

    fn event(host: &str, pm_id: u32, event: ProcessEvent) -> Envelope {
        serde_json::from_value(serde_json::json!({
            "at": now_ms(), "id": Uuid::new_v4(), "event": event.as_str(),
            "process": {"pm_id": pm_id, "name": "api", "namespace": "default", "host": host,
                        "app_id": Uuid::nil(), "pid": 40 + pm_id},
        }))
        .expect("a valid event")
    }

    #[test]
    fn processes_as_last_seen_from_lists_and_events() {
        let f = Fleet::new(Duration::from_secs(10));
        let mut listed = ProcessInfo::from_meta(event("a", 1, ProcessEvent::Online).process);
        listed.cpu = 12.5;
        listed.memory = 1 << 20;
        f.process_list("a", &[listed.clone()]);
        f.process_event(event("a", 2, ProcessEvent::Online));
        f.process_event(event("b", 7, ProcessEvent::Online));
        let seen = f.last_seen("a");
        assert_eq!(
            seen.iter().map(|p| p.meta.pm_id).collect::<Vec<_>>(),
            [1, 2]
        );
        // Without live figures.
        assert_eq!((seen[0].cpu, seen[0].memory), (0.0, 0));
        // An event updates what a list said; a delete forgets the process.
        let mut later = event("a", 1, ProcessEvent::Exit);
        later.process.pid = 0;
        f.process_event(later);
        f.process_event(event("a", 2, ProcessEvent::Delete));
        let seen = f.last_seen("a");
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].meta.pm_id, seen[0].meta.pid), (1, 0));
        // A list is all a host has: what it leaves out is gone.
        f.process_list("a", &[]);
        assert!(f.last_seen("a").is_empty());
        assert_eq!(f.last_seen("b").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn online_places_a_host_at_once_without_hiding_its_heartbeat() {
        let f = Fleet::new(Duration::from_secs(10));
        f.host_event(host_event("a", HostEventKind::Online));
        assert_eq!(f.live()[0].load, 0);
        f.heartbeat(beat("a", 5));
        // A late `online` does not wipe what the heartbeat said.
        f.host_event(host_event("a", HostEventKind::Online));
        assert_eq!(f.live()[0].load, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn live_or_wait_returns_when_a_first_host_joins() {
        let f = std::sync::Arc::new(Fleet::new(Duration::from_secs(10)));
        assert!(f.live_or_wait(Duration::from_secs(3)).await.is_empty());
        let waiting = tokio::spawn({
            let f = f.clone();
            async move { f.live_or_wait(Duration::from_secs(3)).await }
        });
        tokio::task::yield_now().await;
        f.heartbeat(beat("b", 0));
        let live = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by the join, not the 3 s deadline")
            .expect("the task ran");
        assert_eq!(live[0].host, "b");
    }
}
