//! Waiting until what a `start` or `restart` launched is online. [`OnlineWait`] is the pure part:
//! fed the app's lifecycle events, it says whether it is done, and then whether every instance
//! came online, one could not start, or a Node cluster worker could not listen. [`wait`] feeds
//! it from NATS under a deadline, showing progress.

use crate::cli::progress::Line;
use crate::protocol::reply::{ChangeKind, Reply};
use crate::protocol::{Envelope, ProcessEvent, Status};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a start (or a restart) may take to bring every instance online.
pub const START_WITHIN: Duration = Duration::from_secs(60);

/// Why the wait ended without every instance online.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOnline {
    /// The NATS subscription ended first.
    #[error(
        "{app}: the connection to NATS ended before every instance was online: `flotilla ls` shows where they are"
    )]
    Disconnected {
        /// The app (or target) waited for.
        app: String,
    },
    /// The deadline passed.
    #[error(
        "{app}: pm_id {} not online within {} s: `flotilla logs {}` shows why",
        list(.late), .within.as_secs(), short(.app)
    )]
    Late {
        /// The app (or target) waited for.
        app: String,
        /// The instances not online by then.
        late: Vec<u32>,
        /// The deadline.
        within: Duration,
    },
    /// Instances could not be spawned, or gave up (`spawn:error`, `restart overlimit`).
    #[error("{app}: pm_id {} did not start: {}", list(.failed), .reasons.join("; "))]
    DidNotStart {
        /// The app (or target) waited for.
        app: String,
        /// The instances that failed.
        failed: Vec<u32>,
        /// Why, once per run of equal reasons.
        reasons: Vec<String>,
    },
    /// Node cluster workers came online without the socket they asked for (the port in use, ...).
    #[error(
        "{app}: pm_id {} cannot listen: {} (the app got the error; `flotilla logs {}` shows what it did)",
        list(.failed), .reasons.join("; "), short(.app)
    )]
    CannotListen {
        /// The app (or target) waited for.
        app: String,
        /// The workers whose `listen()` failed.
        failed: Vec<u32>,
        /// Why, once per run of equal reasons.
        reasons: Vec<String>,
    },
}

fn list(ids: &[u32]) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The app's name for `flotilla logs` (`ns/name` → `name`).
fn short(app: &str) -> &str {
    app.rsplit('/').next().unwrap_or(app)
}

/// The wait for some processes of one reply to be online, fed one event at a time.
#[derive(Debug, Clone)]
pub struct OnlineWait {
    app: String,
    ids: BTreeSet<u32>,
    status: BTreeMap<u32, Status>,
    failed: BTreeMap<u32, String>,
    /// The first answer each worker got to a `listen()`: `None` it listens, `Some` why not.
    listen: BTreeMap<u32, Option<String>>,
}

impl OnlineWait {
    /// Waits for `ids`, starting from their status in `reply`; `app` names them in messages.
    pub fn new(app: &str, ids: BTreeSet<u32>, reply: &Reply) -> Self {
        Self {
            app: app.to_string(),
            ids,
            status: reply
                .processes
                .iter()
                .map(|p| (p.meta.pm_id, p.meta.status))
                .collect(),
            failed: BTreeMap::new(),
            listen: BTreeMap::new(),
        }
    }

    /// Waits for what a `start` reply started: every instance but those it removed (a re-applied
    /// start that scaled down).
    pub fn started(app: &str, reply: &Reply) -> Self {
        let ids = reply
            .changes
            .iter()
            .filter(|c| !matches!(c.what, ChangeKind::Deleted | ChangeKind::Absent))
            .map(|c| c.pm_id)
            .collect();
        Self::new(app, ids, reply)
    }

    /// Waits for the processes a `restart` reply restarted.
    pub fn restarted(app: &str, reply: &Reply) -> Self {
        let ids = reply
            .changes
            .iter()
            .filter(|c| c.what == ChangeKind::Restarted)
            .map(|c| c.pm_id)
            .collect();
        Self::new(app, ids, reply)
    }

    /// The processes waited for.
    pub fn ids(&self) -> &BTreeSet<u32> {
        &self.ids
    }

    /// Takes in one lifecycle event; events of other processes are ignored.
    pub fn on_event(&mut self, env: &Envelope) {
        let id = env.process.pm_id;
        if !self.ids.contains(&id) {
            return;
        }
        let Some(ev) = &env.event else {
            self.status.insert(id, env.process.status);
            return;
        };
        let why = || ev.reason.clone().unwrap_or_else(|| ev.event.to_string());
        match ev.event {
            ProcessEvent::Online => {
                self.status.insert(id, Status::Online);
            }
            ProcessEvent::SpawnError | ProcessEvent::RestartOverlimit => {
                self.failed.insert(id, why());
            }
            ProcessEvent::Listening => {
                self.listen.entry(id).or_insert(None);
            }
            ProcessEvent::ListenError => {
                self.listen.entry(id).or_insert_with(|| Some(why()));
            }
            _ => {
                self.status.insert(id, env.process.status);
            }
        }
    }

    fn is_online(&self, id: &u32) -> bool {
        self.status.get(id) == Some(&Status::Online)
    }

    /// True once every process is online or has failed.
    pub fn is_done(&self) -> bool {
        self.ids
            .iter()
            .all(|id| self.is_online(id) || self.failed.contains_key(id))
    }

    /// How far it is, for the progress line.
    pub fn progress(&self) -> String {
        let online = self.ids.iter().filter(|id| self.is_online(id)).count();
        format!("starting {}: {online}/{} online", self.app, self.ids.len())
    }

    /// The result once done: the instances that did not start, else the cluster workers that
    /// could not listen (a worker is online only once its main module has run, so the answers
    /// to its `listen()`s came before its `online`).
    pub fn outcome(&self) -> Result<(), NotOnline> {
        if !self.failed.is_empty() {
            return Err(NotOnline::DidNotStart {
                app: self.app.clone(),
                failed: self.failed.keys().copied().collect(),
                reasons: runs(self.failed.values()),
            });
        }
        let cannot: BTreeMap<u32, &String> = self
            .listen
            .iter()
            .filter_map(|(id, why)| why.as_ref().map(|w| (*id, w)))
            .collect();
        if cannot.is_empty() {
            return Ok(());
        }
        Err(NotOnline::CannotListen {
            app: self.app.clone(),
            failed: cannot.keys().copied().collect(),
            reasons: runs(cannot.into_values()),
        })
    }

    /// The error when `within` passed first.
    pub fn late(&self, within: Duration) -> NotOnline {
        NotOnline::Late {
            app: self.app.clone(),
            late: self
                .ids
                .iter()
                .filter(|id| !self.is_online(id))
                .copied()
                .collect(),
            within,
        }
    }
}

/// The reasons, with runs of equal ones (in pm_id order) said once.
fn runs<'a>(reasons: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = reasons.cloned().collect();
    out.dedup();
    out
}

/// Feeds `w` the payloads of `events` (the app's `process:event` messages, subscribed before the
/// request was sent) until it is done, the stream ends, or `within` passes; says how far it is on
/// `progress` meanwhile.
pub async fn wait(
    events: &mut (impl Stream<Item = Bytes> + Unpin),
    w: &mut OnlineWait,
    progress: &mut Line,
    within: Duration,
) -> Result<(), NotOnline> {
    let run = async {
        while !w.is_done() {
            progress.say(&w.progress());
            let Some(payload) = events.next().await else {
                return false;
            };
            if let Ok(env) = serde_json::from_slice::<Envelope>(&payload) {
                w.on_event(&env);
            }
        }
        true
    };
    match tokio::time::timeout(within, run).await {
        Ok(true) => w.outcome(),
        Ok(false) => Err(NotOnline::Disconnected { app: w.app.clone() }),
        Err(_) => Err(w.late(within)),
    }
}

/// [`wait`] on a subscription to lifecycle events, for at most [`START_WITHIN`].
pub async fn wait_on(
    events: &mut async_nats::Subscriber,
    w: &mut OnlineWait,
    progress: &mut Line,
) -> Result<(), NotOnline> {
    let mut payloads = events.by_ref().map(|m| m.payload);
    wait(&mut payloads, w, progress, START_WITHIN).await
}

#[cfg(test)]
mod tests {
    use super::super::fixtures;
    use super::*;
    use crate::protocol::reply::{Change, ProcessInfo};

    fn meta(id: u32, status: Status) -> crate::protocol::ProcessMeta {
        fixtures::meta(id, "api", status)
    }

    /// A reply that launched `ids` (each `what`), all still launching.
    fn reply(ids: &[u32], what: ChangeKind) -> Reply {
        let mut r = Reply::ok(None, "controller");
        r.changes = ids.iter().map(|&id| Change::new(id, what)).collect();
        r.processes = ids
            .iter()
            .map(|&id| ProcessInfo::from_meta(meta(id, Status::Launching)))
            .collect();
        r
    }

    fn event(id: u32, status: Status, ev: ProcessEvent, reason: Option<&str>) -> Envelope {
        fixtures::event(meta(id, status), Some(ev), reason)
    }

    fn online(id: u32) -> Envelope {
        event(id, Status::Online, ProcessEvent::Online, None)
    }

    fn started(ids: &[u32]) -> OnlineWait {
        OnlineWait::started("default/api", &reply(ids, ChangeKind::Started))
    }

    #[test]
    fn done_when_every_instance_is_online() {
        let mut w = started(&[1, 2]);
        assert!(!w.is_done());
        assert_eq!(w.progress(), "starting default/api: 0/2 online");
        w.on_event(&online(1));
        w.on_event(&online(7)); // another app's instance
        assert!(!w.is_done());
        assert_eq!(w.progress(), "starting default/api: 1/2 online");
        w.on_event(&online(2));
        assert!(w.is_done());
        assert_eq!(w.outcome(), Ok(()));
    }

    #[test]
    fn already_online_instances_need_no_event() {
        let mut r = reply(&[1], ChangeKind::AlreadyOnline);
        r.processes[0].meta.status = Status::Online;
        assert!(OnlineWait::started("api", &r).is_done());
    }

    #[test]
    fn other_events_carry_the_status() {
        let mut w = started(&[1]);
        w.on_event(&event(1, Status::Online, ProcessEvent::Ready, None));
        assert!(w.is_done());
        let mut w = started(&[1]);
        w.on_event(&online(1));
        w.on_event(&event(1, Status::Stopped, ProcessEvent::Exit, None));
        assert!(!w.is_done(), "it went down again");
        w.on_event(&fixtures::event(meta(1, Status::Online), None, None));
        assert!(w.is_done());
    }

    #[test]
    fn spawn_errors_and_overlimits_fail_their_instances() {
        let mut w = started(&[1, 2, 3]);
        let e = ProcessEvent::SpawnError;
        w.on_event(&event(1, Status::Errored, e.clone(), Some("no node")));
        w.on_event(&event(2, Status::Errored, e, Some("no node")));
        assert!(!w.is_done());
        w.on_event(&event(
            3,
            Status::Errored,
            ProcessEvent::RestartOverlimit,
            None,
        ));
        assert!(w.is_done());
        let err = w.outcome().unwrap_err();
        assert_eq!(
            err,
            NotOnline::DidNotStart {
                app: "default/api".into(),
                failed: vec![1, 2, 3],
                reasons: vec!["no node".into(), "restart overlimit".into()],
            }
        );
        assert_eq!(
            err.to_string(),
            "default/api: pm_id 1, 2, 3 did not start: no node; restart overlimit"
        );
    }

    #[test]
    fn a_worker_that_cannot_listen_fails_the_wait_once_online() {
        let mut w = started(&[1, 2]);
        let port = Some("EADDRINUSE :8080");
        w.on_event(&event(1, Status::Launching, ProcessEvent::Listening, None));
        w.on_event(&event(
            2,
            Status::Launching,
            ProcessEvent::ListenError,
            port,
        ));
        // The first answer counts.
        w.on_event(&event(2, Status::Launching, ProcessEvent::Listening, None));
        w.on_event(&event(
            1,
            Status::Launching,
            ProcessEvent::ListenError,
            port,
        ));
        w.on_event(&online(1));
        w.on_event(&online(2));
        assert!(w.is_done());
        let err = w.outcome().unwrap_err();
        assert!(matches!(&err, NotOnline::CannotListen { failed, .. } if failed == &[2]));
        assert_eq!(
            err.to_string(),
            "default/api: pm_id 2 cannot listen: EADDRINUSE :8080 (the app got the error; `flotilla logs api` shows what it did)"
        );
    }

    #[test]
    fn a_restart_waits_for_what_it_restarted_a_start_not_for_what_it_removed() {
        let mut r = reply(&[1, 2], ChangeKind::Restarted);
        r.changes.push(Change::new(3, ChangeKind::Stopped));
        assert_eq!(
            OnlineWait::restarted("api", &r).ids(),
            &BTreeSet::from([1, 2])
        );
        let mut r = reply(&[1], ChangeKind::Started);
        r.changes.push(Change::new(4, ChangeKind::Deleted));
        r.changes.push(Change::new(5, ChangeKind::Absent));
        assert_eq!(OnlineWait::started("api", &r).ids(), &BTreeSet::from([1]));
    }

    fn payloads(events: &[Envelope]) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap().into())
            .collect();
        out.insert(0, Bytes::from_static(b"not an envelope"));
        out
    }

    #[tokio::test]
    async fn wait_reads_events_until_done() {
        let mut w = started(&[1, 2]);
        let mut events = futures::stream::iter(payloads(&[online(2), online(1)]))
            .chain(futures::stream::pending());
        let r = wait(&mut events, &mut w, &mut Line::new(), START_WITHIN).await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn wait_says_when_the_connection_ends() {
        let mut w = started(&[1, 2]);
        let mut events = futures::stream::iter(payloads(&[online(1)]));
        let err = wait(&mut events, &mut w, &mut Line::new(), START_WITHIN)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            NotOnline::Disconnected {
                app: "default/api".into()
            }
        );
        assert!(
            err.to_string()
                .contains("`flotilla ls` shows where they are")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_gives_up_at_the_deadline_naming_the_late_ones() {
        let mut w = started(&[1, 2, 3]);
        let mut events =
            futures::stream::iter(payloads(&[online(2)])).chain(futures::stream::pending());
        let err = wait(&mut events, &mut w, &mut Line::new(), START_WITHIN)
            .await
            .unwrap_err();
        assert_eq!(err, w.late(START_WITHIN));
        assert_eq!(
            err.to_string(),
            "default/api: pm_id 1, 3 not online within 60 s: `flotilla logs api` shows why"
        );
    }
}
