//! Request-id deduplication for request/reply servers (agents and controllers): a request id
//! seen before gets the first reply again, word for word, even while the first is still running.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

type Slot = watch::Receiver<Option<Bytes>>;

/// The replies of the last `capacity` request ids.
pub struct Dedupe {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Uuid, Slot>,
    order: VecDeque<Uuid>,
}

impl Dedupe {
    /// Remembers up to `capacity` replies.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
        }
    }

    /// Runs `work` for a new id and remembers its reply; for an id seen before, waits for and
    /// returns the first reply instead (`lost` builds the answer if the first was dropped
    /// unfinished).
    pub async fn reply<F>(&self, id: Uuid, work: F, lost: impl FnOnce() -> Bytes) -> Bytes
    where
        F: Future<Output = Bytes>,
    {
        let claim = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rx) = g.map.get(&id) {
                Err(rx.clone())
            } else {
                let (tx, rx) = watch::channel(None);
                g.map.insert(id, rx);
                g.order.push_back(id);
                while g.order.len() > self.capacity {
                    if let Some(old) = g.order.pop_front() {
                        g.map.remove(&old);
                    }
                }
                Ok(tx)
            }
        };
        match claim {
            Ok(slot) => {
                let b = work.await;
                slot.send_replace(Some(b.clone()));
                b
            }
            Err(mut seen) => {
                tracing::debug!(%id, "repeated request: answering with the first reply");
                match seen.wait_for(Option::is_some).await {
                    Ok(b) => b.clone().unwrap_or_default(),
                    Err(_) => lost(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_repeat_gets_the_first_reply_even_while_it_runs() {
        let d = std::sync::Arc::new(Dedupe::new(2));
        let id = Uuid::new_v4();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let d = d.clone();
            async move {
                d.reply(
                    id,
                    async move {
                        let _ = go_rx.await;
                        Bytes::from("first")
                    },
                    Bytes::new,
                )
                .await
            }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let d = d.clone();
            async move {
                d.reply(id, async { Bytes::from("second") }, Bytes::new)
                    .await
            }
        });
        tokio::task::yield_now().await;
        go_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap(), "first");
        assert_eq!(second.await.unwrap(), "first");
        // Forgotten past the capacity.
        for _ in 0..2 {
            d.reply(Uuid::new_v4(), async { Bytes::new() }, Bytes::new)
                .await;
        }
        assert_eq!(
            d.reply(id, async { Bytes::from("again") }, Bytes::new)
                .await,
            "again"
        );
    }
}
