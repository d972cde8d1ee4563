//! Per-worker side of the relay: builds envelopes with the process metadata and queues them on
//! the shared [`Relay`]; counts and reports drops and faulty channel lines.

use super::publisher::{Outgoing, Relay};
use crate::protocol::envelope::{self, EnvelopeOut, EventFields, ProcessMeta, now_ms};
use crate::protocol::event::ProcessEvent;
use crate::protocol::message::Classified;
use crate::protocol::subjects::{AppKey, Subjects, kind};
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use uuid::Uuid;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// here only updates counters, so the data is always consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops not yet reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropWindow {
    /// How many.
    pub count: u64,
    /// Epoch ms of the first.
    pub since: u64,
    /// Epoch ms of the last.
    pub until: u64,
}

#[derive(Default)]
struct Faults {
    pending_drops: Option<DropWindow>,
    pending_errors: u64,
    pending_reasons: Vec<String>,
    last_error_report: u64,
}

/// Distinct reasons kept for one `ipc:error` report.
const MAX_REASONS: usize = 3;

impl Faults {
    /// The count and the reasons (distinct, at most [`MAX_REASONS`]) since the last report.
    fn take_errors(&mut self) -> (u64, String) {
        let count = std::mem::take(&mut self.pending_errors);
        let reasons = std::mem::take(&mut self.pending_reasons);
        let shown = reasons.len() as u64;
        let mut text = reasons.join("; ");
        if count > shown {
            text.push_str(&format!(" (and {} more)", count - shown));
        }
        (count, text)
    }
}

/// Everything a worker's reader tasks need to relay: one per process, kept across restarts.
pub struct WorkerRelay {
    relay: Relay,
    prefix: String,
    meta: RwLock<Arc<Box<RawValue>>>,
    /// The metadata of an old run still running beside the current one (a reload's overlap),
    /// by run generation: its lines carry its own pid.
    kept: RwLock<Vec<(u64, Arc<Box<RawValue>>)>>,
    /// How many are kept (checked first, so the usual case takes no lock).
    kept_count: std::sync::atomic::AtomicUsize,
    dropped: AtomicU64,
    ipc_errors: AtomicU64,
    faults: Mutex<Faults>,
    dropping: AtomicBool,
}

impl WorkerRelay {
    /// Replaces the metadata carried by the next envelopes.
    pub fn set_meta(&self, meta: &ProcessMeta) {
        let encoded = Arc::new(envelope::encode_meta(meta));
        *self.meta.write().unwrap_or_else(|p| p.into_inner()) = encoded;
    }

    fn meta(&self) -> Arc<Box<RawValue>> {
        self.meta.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The metadata for a line of run `run_gen`: its kept one if it is an old run, else the
    /// current one.
    fn meta_of(&self, run_gen: u64) -> Arc<Box<RawValue>> {
        if self.kept_count.load(Ordering::Acquire) > 0 {
            let kept = self.kept.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, m)) = kept.iter().find(|(g, _)| *g == run_gen) {
                return m.clone();
            }
        }
        self.meta()
    }

    /// Keeps `meta` for the lines of run `run_gen`, which goes on beside a newer run.
    pub fn keep_meta(&self, run_gen: u64, meta: &ProcessMeta) {
        let mut kept = self.kept.write().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(g, _)| *g != run_gen);
        kept.push((run_gen, Arc::new(envelope::encode_meta(meta))));
        self.kept_count.store(kept.len(), Ordering::Release);
    }

    /// Run `run_gen` has ended: its kept metadata goes.
    pub fn forget_meta(&self, run_gen: u64) {
        let mut kept = self.kept.write().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(g, _)| *g != run_gen);
        self.kept_count.store(kept.len(), Ordering::Release);
    }

    /// Largest message relayed.
    pub fn max_message(&self) -> usize {
        self.relay.max_message()
    }

    /// Builds the envelope of one classified worker message (not Node internals); `None` when
    /// it is too large (reported as an `ipc:error`).
    pub fn message(&self, run_gen: u64, c: &Classified<'_>) -> Option<Outgoing> {
        let (t, data, raw) = match c {
            Classified::Typed { ty, data } => (ty.as_str(), Some(*data), None),
            Classified::Raw { raw, .. } => (kind::PROCESS_MSG, None, Some(*raw)),
            Classified::NodeInternal { .. } => return None,
        };
        self.build_with(self.meta_of(run_gen), t, data, raw, None)
    }

    /// Builds the envelope of one log line (`log:out` / `log:err`).
    pub fn log_line(&self, run_gen: u64, t: &'static str, line: &str) -> Option<Outgoing> {
        let data = serde_json::value::to_raw_value(line).expect("a string always serialises");
        self.build_with(self.meta_of(run_gen), t, Some(&data), None, None)
    }

    /// Queues worker messages and log lines, in order (the vector is emptied): waits for room
    /// while NATS keeps up, drops and counts when it does not (see [`Relay::relay_batch`]).
    pub async fn push(&self, out: &mut Vec<Outgoing>) {
        let dropped = self.relay.relay_batch(out, &self.dropping).await;
        if dropped > 0 {
            self.count_drops(dropped);
        }
    }

    /// Publishes a lifecycle event (`process:event`) at once; it may use the queue's reserve.
    pub fn event(&self, fields: &EventFields) {
        if let Some(out) = self.build(kind::PROCESS_EVENT, None, None, Some(fields))
            && self.relay.send_event(out).is_err()
        {
            self.count_drop();
        }
    }

    fn build(
        &self,
        t: &str,
        data: Option<&RawValue>,
        raw: Option<&RawValue>,
        event: Option<&EventFields>,
    ) -> Option<Outgoing> {
        self.build_with(self.meta(), t, data, raw, event)
    }

    fn build_with(
        &self,
        meta: Arc<Box<RawValue>>,
        t: &str,
        data: Option<&RawValue>,
        raw: Option<&RawValue>,
        event: Option<&EventFields>,
    ) -> Option<Outgoing> {
        let id = Uuid::new_v4();
        let payload = envelope::encode(&EnvelopeOut {
            at: now_ms(),
            data,
            raw,
            process: &meta,
            event,
            id,
        });
        let max_message = self.max_message();
        if payload.len() > max_message {
            self.ipc_error(format!(
                "a message of {} bytes (as an envelope) exceeds the limit of {} bytes (relay.max_message, \
                 default the server's max_payload): send smaller messages",
                payload.len(),
                max_message
            ));
            return None;
        }
        let mut subject = String::with_capacity(self.prefix.len() + t.len());
        subject.push_str(&self.prefix);
        subject.push_str(t);
        Some(Outgoing::new(subject, id, payload.into()))
    }

    fn count_drop(&self) {
        self.count_drops(1);
    }

    fn count_drops(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        let now = now_ms();
        let mut f = lock(&self.faults);
        let w = f.pending_drops.get_or_insert(DropWindow {
            count: 0,
            since: now,
            until: now,
        });
        w.count += n;
        w.until = now;
    }

    /// Records a malformed or oversized channel line; reports at most one `ipc:error` event a
    /// second per worker (with the count since the last report), the rest on [`Self::flush`].
    pub fn ipc_error(&self, reason: String) {
        self.ipc_errors.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let report = {
            let mut f = lock(&self.faults);
            f.pending_errors += 1;
            if f.pending_reasons.len() < MAX_REASONS && !f.pending_reasons.contains(&reason) {
                f.pending_reasons.push(reason);
            }
            if now.saturating_sub(f.last_error_report) >= 1000 {
                f.last_error_report = now;
                Some(f.take_errors())
            } else {
                None
            }
        };
        if let Some((count, reason)) = report {
            self.report_errors(count, reason);
        }
    }

    fn report_errors(&self, count: u64, reason: String) {
        tracing::warn!(worker = %self.prefix, count, "{reason}");
        self.event(&EventFields {
            count: Some(count),
            ..EventFields::named(ProcessEvent::IpcError).reason(reason)
        });
    }

    /// Reports faulty lines held back by the one-a-second rule.
    pub fn flush_errors(&self) {
        let report = {
            let mut f = lock(&self.faults);
            (f.pending_errors > 0).then(|| {
                f.last_error_report = now_ms();
                f.take_errors()
            })
        };
        if let Some((count, reason)) = report {
            self.report_errors(count, reason);
        }
    }

    /// Publishes a `dropped` event for drops not yet reported.
    pub fn report_drops(&self) {
        let w = lock(&self.faults).pending_drops.take();
        if let Some(w) = w {
            tracing::warn!(worker = %self.prefix, count = w.count, "relay queue was full; messages dropped");
            self.event(&EventFields {
                count: Some(w.count),
                since: Some(w.since),
                until: Some(w.until),
                ..EventFields::named(ProcessEvent::Dropped)
            });
        }
    }

    /// Messages of this worker dropped since it was created.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Faulty channel lines since it was created.
    pub fn ipc_errors(&self) -> u64 {
        self.ipc_errors.load(Ordering::Relaxed)
    }
}

/// Makes [`WorkerRelay`]s and finds them again to report drops and errors.
pub struct RelayHub {
    relay: Relay,
    subjects: Subjects,
    workers: Mutex<Vec<Weak<WorkerRelay>>>,
    ipc_errors_total: AtomicU64,
}

impl RelayHub {
    /// A hub over the shared relay queue.
    pub fn new(relay: Relay, subjects: Subjects) -> Self {
        Self {
            relay,
            subjects,
            workers: Mutex::new(Vec::new()),
            ipc_errors_total: AtomicU64::new(0),
        }
    }

    /// The shared queue.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Largest message relayed.
    pub fn max_message(&self) -> usize {
        self.relay.max_message()
    }

    /// A relay for one process.
    pub fn worker(&self, app: &AppKey, meta: &ProcessMeta) -> Arc<WorkerRelay> {
        let w = Arc::new(WorkerRelay {
            relay: self.relay.clone(),
            prefix: self.subjects.app_prefix(app),
            meta: RwLock::new(Arc::new(envelope::encode_meta(meta))),
            kept: RwLock::new(Vec::new()),
            kept_count: std::sync::atomic::AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            ipc_errors: AtomicU64::new(0),
            faults: Mutex::new(Faults::default()),
            dropping: AtomicBool::new(false),
        });
        let mut ws = lock(&self.workers);
        ws.retain(|w| w.strong_count() > 0);
        ws.push(Arc::downgrade(&w));
        w
    }

    fn live(&self) -> Vec<Arc<WorkerRelay>> {
        lock(&self.workers)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Reports pending drops of every worker.
    pub fn report_drops(&self) {
        for w in self.live() {
            w.report_drops();
        }
    }

    /// Reports held-back channel faults of every worker; sums errors for the heartbeat.
    pub fn flush_errors(&self) {
        for w in self.live() {
            w.flush_errors();
        }
    }

    /// Faulty lines of every live worker plus those of deleted ones.
    pub fn ipc_errors(&self) -> u64 {
        self.ipc_errors_total.load(Ordering::Relaxed)
            + self.live().iter().map(|w| w.ipc_errors()).sum::<u64>()
    }

    /// The agent's relay counters.
    pub fn counters(&self) -> crate::protocol::fleet::RelayCounters {
        let s = self.relay.stats();
        crate::protocol::fleet::RelayCounters {
            relayed: s.relayed,
            dropped: s.dropped,
            ipc_errors: self.ipc_errors(),
        }
    }

    /// Keeps a deleted worker's error count in the totals.
    pub fn retire(&self, w: &WorkerRelay) {
        w.flush_errors();
        w.report_drops();
        self.ipc_errors_total
            .fetch_add(w.ipc_errors(), Ordering::Relaxed);
    }
}
