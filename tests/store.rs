//! The desired-state store against a real nats-server with JetStream: concurrent writers never
//! lose an update.

mod support;

use flotilla::bus::store::{Store, StoreError};
use support::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_set_writers_lose_no_update() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let store = Store::open(client.clone(), "flotilla_test").await.unwrap();
    let mut tasks = vec![];
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                store
                    .update("counter", |v: Option<u64>| Ok(v.unwrap_or(0) + 1))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (v, _) = store.get::<u64>("counter").await.unwrap().unwrap();
    assert_eq!(v, 80, "every increment survived");
    // a second opener sees the same bucket
    let again = Store::open(client, "flotilla_test").await.unwrap();
    assert_eq!(again.get::<u64>("counter").await.unwrap().unwrap().0, 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_keys_count_as_absent_and_can_be_written_again() {
    let nats = NatsServer::start();
    let store = Store::open(nats.client().await, "flotilla_test")
        .await
        .unwrap();
    let (_, rev) = store
        .update("app", |v: Option<String>| {
            assert!(v.is_none());
            Ok("v1".to_string())
        })
        .await
        .unwrap();
    store.delete_if("app", rev).await.unwrap();
    assert!(store.get::<String>("app").await.unwrap().is_none());
    let (v, _) = store
        .update("app", |v: Option<String>| {
            assert!(v.is_none(), "a tombstone reads as absent");
            Ok("v2".to_string())
        })
        .await
        .unwrap();
    assert_eq!(v, "v2");
    // a stale revision is refused
    assert!(store.delete_if("app", rev).await.is_err());
    // an updater may refuse
    let e = store
        .update("app", |_: Option<String>| {
            Err(StoreError::Refused("no".into()))
        })
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "no");
    // a value of another shape says so
    let e = store.get::<u64>("app").await.unwrap_err();
    assert!(e.to_string().contains("'app' cannot be read"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pm_id_allocations_never_overlap() {
    let nats = NatsServer::start();
    let store = Store::open(nats.client().await, "flotilla_test")
        .await
        .unwrap();
    let mut tasks = vec![];
    for n in 1..=6u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = vec![];
            for _ in 0..5 {
                got.extend(
                    flotilla::controller::ids::allocate(&store, n)
                        .await
                        .unwrap(),
                );
            }
            got
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), total, "no id was handed out twice");
    assert_eq!(
        all,
        (0..total as u32).collect::<Vec<_>>(),
        "and none was skipped"
    );
}
