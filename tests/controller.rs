//! The controller places an app over several agents, which converge; `ls` gathers them.

mod support;

use flotilla::protocol::control::{Reply, TargetRequest};
use flotilla::protocol::state::ApiStartRequest;
use flotilla::protocol::{AppSpec, Status, Target};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;
use uuid::Uuid;

async fn api(client: &async_nats::Client, verb: &str, body: Vec<u8>) -> Reply {
    let m = tokio::time::timeout(
        WAIT,
        client.request(format!("pmctl.api.{verb}"), body.into()),
    )
    .await
    .expect("the controller answers")
    .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_places_instances_across_agents_and_ls_gathers_them() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    // The controller first, so it hears every heartbeat the test hears.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut s = flotilla::config::Settings::default();
    s.nats.url = Some(nats.url());
    s.host_lost_after = Duration::from_secs(10);
    let mut beats = Watch::new(&client, "pm._fleet.*.host:heartbeat").await;
    let ctl = tokio::spawn(flotilla::controller::run(s, async move {
        let _ = stop_rx.await;
    }));
    // Its API answers once it is subscribed (it subscribes to heartbeats before the API).
    // (A request gets "no responders" at once until then; bounded by WAIT.)
    tokio::time::timeout(WAIT, async {
        while client
            .request("pmctl.api.nothing", "{}".into())
            .await
            .is_err()
        {}
    })
    .await
    .expect("the controller came up");
    let a1 = TestAgent::start(&nats, "h1").await;
    let a2 = TestAgent::start(&nats, "h2").await;
    // A second heartbeat from each host: the controller has processed the first by then.
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    while count.values().filter(|&&n| n >= 2).count() < 2 {
        let m = beats.next_raw().await;
        *count.entry(m.subject.to_string()).or_default() += 1;
    }
    let mut events = Watch::new(&client, "pm.default.api.process:event").await;
    let mut app = AppSpec::new("api", fixture("chatty.js"));
    app.instances = Some(4);
    let req = ApiStartRequest {
        request_id: Uuid::new_v4(),
        app,
        hosts: vec![],
        labels: BTreeMap::new(),
        force: false,
    };
    let r = api(&client, "start", serde_json::to_vec(&req).unwrap()).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.changes.len(), 4);
    let on = |h: &str| r.processes.iter().filter(|p| p.meta.host == h).count();
    assert_eq!((on("h1"), on("h2")), (2, 2), "spread over both hosts");
    let mut online = BTreeMap::new();
    events
        .until("4 online", |s| {
            if s.env.event.as_ref().is_some_and(|e| e.event == "online") {
                online.insert(s.env.process.pm_id, s.env.process.host.clone());
            }
            online.len() == 4
        })
        .await;
    // a second start of the same app is refused
    let again = ApiStartRequest {
        request_id: Uuid::new_v4(),
        ..req
    };
    let r = api(&client, "start", serde_json::to_vec(&again).unwrap()).await;
    assert!(r.error.unwrap().message.contains("already runs"));
    // ls gathers every process of the fleet
    let ls = TargetRequest::new(Target::All);
    let r = api(&client, "ls", serde_json::to_vec(&ls).unwrap()).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.processes.len(), 4);
    assert!(r.processes.iter().all(|p| p.meta.status == Status::Online));
    let hosts: std::collections::BTreeSet<_> =
        r.processes.iter().map(|p| p.meta.host.clone()).collect();
    assert_eq!(hosts.len(), 2);
    a1.stop().await.unwrap();
    a2.stop().await.unwrap();
    let _ = stop_tx.send(());
    ctl.await.unwrap().unwrap();
}
