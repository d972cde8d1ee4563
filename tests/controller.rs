//! The controller places an app over several agents, which converge; `ls` gathers them.

mod support;

use flotilla::protocol::api::ApiStartRequest;
use flotilla::protocol::control::TargetRequest;
use flotilla::protocol::reply::Reply;
use flotilla::protocol::{Status, Target};
use std::collections::BTreeMap;
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
    let fleet = Fleet::start(&["h1", "h2"]).await;
    let client = fleet.nats.client().await;
    let mut events = Watch::new(&client, "pm.default.api.process:event").await;
    let mut app = fixture_spec("api", "chatty.js");
    app.instances = Some(4);
    let req = ApiStartRequest {
        request_id: Uuid::new_v4(),
        app,
        hosts: vec![],
        labels: BTreeMap::new(),
        force: false,
    };
    let body = serde_json::to_vec(&req).unwrap();
    let r = api(&client, "start", body.clone()).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.changes.len(), 4);
    // The same request id again: the first reply, not a second start refused as a duplicate.
    let repeated = api(&client, "start", body).await;
    assert_eq!(repeated, r);
    let on = |h: &str| r.processes.iter().filter(|p| p.meta.host == h).count();
    assert_eq!((on("h1"), on("h2")), (2, 2), "spread over both hosts");
    let mut online = BTreeMap::new();
    events
        .until("4 online", |s| {
            if s.env
                .event
                .as_ref()
                .is_some_and(|e| e.event.as_str() == "online")
            {
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
    fleet.stop().await;
}
