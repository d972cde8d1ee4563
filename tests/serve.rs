//! The request/reply server the agent and the controller share, against a real nats-server:
//! never more requests in hand than its bound, a repeated request id answered with the first
//! reply, and its tasks on the caller's tracker (the tracker's wait ends once it is cancelled).

mod support;

use flotilla::bus::serve::Server;
use flotilla::protocol::Subjects;
use flotilla::protocol::reply::Reply;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::{NatsServer, WAIT};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Requests in hand now, the most ever in hand, and requests handled.
#[derive(Default)]
struct Counts {
    now: AtomicUsize,
    most: AtomicUsize,
    handled: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_holds_repeats_get_the_first_reply_and_cancel_ends_it() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let subjects = Subjects::new("pm").expect("a valid prefix");
    let requests = client
        .subscribe(subjects.api("*"))
        .await
        .expect("subscribed");
    client.flush().await.expect("flushed");
    let counts = Arc::new(Counts::default());
    let handler = {
        let counts = counts.clone();
        let client = client.clone();
        move |verb: String, _body: bytes::Bytes| {
            let counts = counts.clone();
            let client = client.clone();
            async move {
                let now = counts.now.fetch_add(1, Ordering::SeqCst) + 1;
                counts.most.fetch_max(now, Ordering::SeqCst);
                // A few round trips to the server: requests in hand overlap if they can.
                for _ in 0..3 {
                    let _ = client.flush().await;
                }
                counts.now.fetch_sub(1, Ordering::SeqCst);
                let n = counts.handled.fetch_add(1, Ordering::SeqCst);
                Reply::ok(None, &format!("{verb} #{n}"))
            }
        }
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    Server::new(client.clone(), subjects.clone(), "test", 2).spawn(
        requests,
        handler,
        cancel.clone(),
        &tracker,
    );

    let ask = |verb: &str, id: Uuid| {
        let client = client.clone();
        let subject = subjects.api(verb);
        async move {
            let body = format!(r#"{{"request_id":"{id}"}}"#);
            let m = tokio::time::timeout(WAIT, client.request(subject, body.into()))
                .await
                .expect("answered in time")
                .expect("answered");
            serde_json::from_slice::<Reply>(&m.payload).expect("a reply")
        }
    };
    let replies = futures::future::join_all((0..8).map(|_| ask("go", Uuid::new_v4()))).await;
    assert_eq!(replies.len(), 8);
    assert!(
        replies.iter().all(|r| r.host.starts_with("go #")),
        "{replies:?}"
    );
    assert_eq!(counts.handled.load(Ordering::SeqCst), 8);
    assert!(
        counts.most.load(Ordering::SeqCst) <= 2,
        "{} requests were in hand at once, past the bound of 2",
        counts.most.load(Ordering::SeqCst)
    );

    // The same id again: the first reply, word for word, and the handler not run again.
    let id = Uuid::new_v4();
    let first = ask("again", id).await;
    assert_eq!(ask("again", id).await, first);
    assert_eq!(counts.handled.load(Ordering::SeqCst), 9);

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait())
        .await
        .expect("the server's tasks end once cancelled");
}
