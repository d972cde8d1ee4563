//! Desired state in JetStream KV, written only by compare-and-set: read the value and its
//! revision, apply a pure updater, write expecting that revision, and on a conflict read again
//! and retry (with jittered backoff) under one deadline. Two writers never lose an update.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// A desired-state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bucket could not be opened or created.
    #[error(
        "cannot open the key-value bucket '{bucket}': {reason} (is JetStream enabled on the server? start nats-server with -js)"
    )]
    Bucket {
        /// Bucket name.
        bucket: String,
        /// Why.
        reason: String,
    },
    /// Talking to NATS failed.
    #[error("{what} '{key}' failed: {reason}")]
    Nats {
        /// read / write.
        what: &'static str,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The stored value is not what this version expects.
    #[error("the value of '{key}' cannot be read: {source} (written by a newer version?)")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Other writers kept winning until the deadline.
    #[error("could not update '{key}' within {deadline:?}: other writers kept changing it; retry")]
    Contended {
        /// The key.
        key: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The updater refused the change.
    #[error("{0}")]
    Refused(String),
}

/// Longest one read may take before it is asked again (within the update's deadline).
const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// Revisions kept per key.
const HISTORY: i64 = 5;

/// A bucket of JSON values with compare-and-set updates.
#[derive(Clone)]
pub struct Store {
    kv: kv::Store,
    deadline: Duration,
}

impl Store {
    /// Opens `bucket`, creating it (file storage, [`HISTORY`] revisions per key) when absent.
    pub async fn open(client: async_nats::Client, bucket: &str) -> Result<Store, StoreError> {
        let js = jetstream::new(client);
        let err = |e: &dyn std::fmt::Display| StoreError::Bucket {
            bucket: bucket.to_string(),
            reason: e.to_string(),
        };
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                // The bucket's stream, made as NATS lays a KV bucket out. Not through
                // `create_key_value`: async-nats 0.51 reads the account info first and cannot
                // parse nats-server 2.9's (no `reserved_memory`), so it fails on Debian's server.
                use jetstream::stream;
                let created = js
                    .create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: HISTORY,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        storage: stream::StorageType::File,
                        num_replicas: 1,
                        ..Default::default()
                    })
                    .await;
                // Another role may have created it at the same moment (an agent and a controller
                // starting together on a fresh server; nats-server 2.9 then answers the second
                // create with "subjects overlap"): the bucket exists, so open it.
                match (created, js.get_key_value(bucket).await) {
                    (_, Ok(kv)) => kv,
                    (Err(e), Err(_)) => return Err(err(&e)),
                    (Ok(_), Err(e)) => return Err(err(&e)),
                }
            }
        };
        Ok(Store {
            kv,
            deadline: Duration::from_secs(5),
        })
    }

    /// The value at `key` and its revision; `None` when absent or deleted.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, StoreError> {
        Ok(match self.entry(key).await? {
            Some((Some(v), rev)) => Some((decode(key, &v)?, rev)),
            _ => None,
        })
    }

    /// `(value, revision)`; the value is `None` for a tombstone (which keeps its revision).
    async fn entry(&self, key: &str) -> Result<Option<(Option<Bytes>, u64)>, StoreError> {
        let e = self.kv.entry(key).await.map_err(|e| StoreError::Nats {
            what: "reading",
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(e.map(|e| match e.operation {
            kv::Operation::Delete | kv::Operation::Purge => (None, e.revision),
            kv::Operation::Put => (Some(e.value), e.revision),
        }))
    }

    /// Applies `f` to the current value (`None` when absent) and writes the result, retrying
    /// on conflict until the deadline. `f` must be pure: it may run several times. Returns the
    /// value written and its revision.
    pub async fn update<T, F>(&self, key: &str, mut f: F) -> Result<(T, u64), StoreError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Result<T, StoreError>,
    {
        let silent = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            let mut backoff = Duration::from_millis(2);
            loop {
                // A read whose answer is lost (it happens right after a bucket is made, on a
                // busy server) is asked again rather than waited for until the deadline.
                let current = match tokio::time::timeout(OP_TIMEOUT, self.entry(key)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        silent.store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                };
                let (value, revision) = match &current {
                    Some((Some(v), rev)) => (Some(decode::<T>(key, v)?), Some(*rev)),
                    Some((None, rev)) => (None, Some(*rev)),
                    None => (None, None),
                };
                let next = f(value)?;
                let bytes: Bytes = serde_json::to_vec(&next)
                    .expect("desired state always serialises")
                    .into();
                let written = match revision {
                    Some(rev) => self.kv.update(key, bytes, rev).await.map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                    None => self.kv.create(key, bytes).await.map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
                };
                match written {
                    Ok(rev) => return Ok((next, rev)),
                    Err((true, _)) => {
                        // Someone else wrote first: read again after a jittered pause.
                        let jitter = uuid::Uuid::new_v4().as_u128() as u64
                            % (backoff.as_micros() as u64 + 1);
                        tokio::time::sleep(backoff / 2 + Duration::from_micros(jitter / 2)).await;
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                    Err((false, reason)) => {
                        return Err(StoreError::Nats {
                            what: "writing",
                            key: key.to_string(),
                            reason,
                        });
                    }
                }
            }
        };
        tokio::time::timeout(self.deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                if silent.load(std::sync::atomic::Ordering::Relaxed) {
                    Err(StoreError::Nats {
                        what: "reading",
                        key: key.to_string(),
                        reason: format!(
                            "JetStream did not answer within {:?}: is the server overloaded, or JetStream unavailable?",
                            self.deadline
                        ),
                    })
                } else {
                    Err(StoreError::Contended {
                        key: key.to_string(),
                        deadline: self.deadline,
                    })
                }
            })
    }

    /// The current value of `key` (if any), then every change: `None` for a delete. The stream
    /// ends when the connection to the watch is lost for good.
    pub async fn watch<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<impl futures::Stream<Item = Result<Option<T>, StoreError>> + use<T>, StoreError>
    {
        use futures::StreamExt;
        let owned = key.to_string();
        let w = self
            .kv
            .watch_with_history(key)
            .await
            .map_err(|e| StoreError::Nats {
                what: "watching",
                key: owned.clone(),
                reason: e.to_string(),
            })?;
        Ok(w.map(move |e| match e {
            Ok(e) => match e.operation {
                kv::Operation::Put => decode(&owned, &e.value).map(Some),
                kv::Operation::Delete | kv::Operation::Purge => Ok(None),
            },
            Err(e) => Err(StoreError::Nats {
                what: "watching",
                key: owned.clone(),
                reason: e.to_string(),
            }),
        }))
    }

    /// Every live key that starts with `prefix`, sorted.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let err = |e: &dyn std::fmt::Display| StoreError::Nats {
            what: "listing",
            key: format!("{prefix}*"),
            reason: e.to_string(),
        };
        let listing = async {
            let keys = self.kv.keys().await.map_err(|e| err(&e))?;
            keys.try_filter(|k| std::future::ready(k.starts_with(prefix)))
                .try_collect::<Vec<String>>()
                .await
                .map_err(|e| err(&e))
        };
        let mut keys = tokio::time::timeout(self.deadline, listing)
            .await
            .unwrap_or_else(|_| Err(err(&"no answer in time")))?;
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key` if it still has `revision` (a tombstone that keeps history).
    pub async fn delete_if(&self, key: &str, revision: u64) -> Result<(), StoreError> {
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| StoreError::Nats {
                what: "deleting",
                key: key.to_string(),
                reason: e.to_string(),
            })
    }
}

fn decode<T: DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Decode {
        key: key.to_string(),
        source,
    })
}
