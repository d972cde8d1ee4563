//! The agent end to end: a real nats-server, real Node and Python workers, real signals.

mod support;

use flotilla::protocol::ChangeKind;
use flotilla::protocol::control::{SendRequest, SignalRequest, StartRequest};
use flotilla::protocol::error::ErrorKind;
use flotilla::protocol::{AppSpec, ExecMode, Request, Status, Target};
use std::time::Duration;
use support::*;
use uuid::Uuid;

fn spec(name: &str, script: &str) -> AppSpec {
    fixture_spec(name, script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_workers_messages_logs_and_lifecycle_reach_nats_with_metadata() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut all = Watch::new(&client, "pm.>").await;
    let agent = TestAgent::start(&nats, "web-1").await;

    let mut s = spec("api", "chatty.js");
    s.instances = Some(2);
    s.env.insert("SECRET".into(), "hunter2".into());
    let reply = request(&client, "web-1", start(s)).await;
    assert!(reply.error.is_none(), "{reply:?}");
    assert_eq!(reply.changes.len(), 2);
    let ids: Vec<u32> = reply.processes.iter().map(|p| p.meta.pm_id).collect();
    assert_eq!(ids, vec![0, 1]);

    let mut seen = vec![];
    // start, online, 3 typed messages, chat:new, raw string, raw bad token, log:out, log:err per instance
    let want = |seen: &Vec<Seen>| {
        (0..2).all(|i| {
            let mine: Vec<&Seen> = seen.iter().filter(|s| s.env.process.pm_id == i).collect();
            let count = |subj: &str| mine.iter().filter(|s| s.subject == subj).count();
            count("pm.default.api.process:msg") >= 5
                && count("pm.default.api.chat:new") == 1
                && count("pm.default.api.log:out") >= 1
                && count("pm.default.api.log:err") >= 1
                && mine.iter().any(|s| event_name(s) == Some("online"))
                && mine.iter().any(|s| event_name(s) == Some("start"))
        })
    };
    all.until("all messages of both instances", |s| {
        seen.push(s.clone());
        want(&seen)
    })
    .await;

    for s in &seen {
        // Nats-Msg-Id equals the envelope id.
        assert_eq!(s.msg_id.as_deref(), Some(s.env.id.to_string().as_str()));
        assert_eq!(s.env.process.host, "web-1");
        assert_eq!(s.env.process.namespace, "default");
        assert_eq!(s.env.process.exec_mode, ExecMode::Cluster);
        // no env values anywhere in events
        let text = serde_json::to_string(&s.env).unwrap();
        assert!(!text.contains("hunter2"), "secret leaked: {text}");
    }
    let online: Vec<&Seen> = seen
        .iter()
        .filter(|s| event_name(s) == Some("online"))
        .collect();
    for o in &online {
        assert_eq!(o.env.process.status, Status::Online);
        assert!(o.env.process.pid > 0);
        assert!(o.env.process.pm_uptime > 0);
    }
    let instances: std::collections::BTreeSet<u32> =
        online.iter().map(|o| o.env.process.instance).collect();
    assert_eq!(instances, [0, 1].into());
    // typed message: data only; raw: whole message
    let typed = seen
        .iter()
        .find(|s| s.subject.ends_with("chat:new"))
        .unwrap();
    assert_eq!(typed.env.data, Some(serde_json::json!({"text": "hi"})));
    assert!(typed.env.raw.is_none());
    assert!(
        seen.iter()
            .any(|s| s.env.raw == Some(serde_json::json!("just a string")))
    );
    assert!(
        seen.iter()
            .any(|s| s.env.raw == Some(serde_json::json!({"type": "a.b", "data": 1}))),
        "a type that is no valid token goes to process:msg as raw"
    );
    let hello = seen
        .iter()
        .find(|s| s.subject.ends_with("log:out") && s.env.process.pm_id == 0)
        .unwrap();
    assert_eq!(
        hello.env.data,
        Some(serde_json::json!("hello from instance 0 pm_id 0"))
    );

    // send: delivered to process.on('message') as given; the echo comes back typed.
    let mut echo = Watch::new(&client, "pm.default.api.echo").await;
    let reply = request(
        &client,
        "web-1",
        SendRequest {
            request_id: Uuid::new_v4(),
            target: Target::Id(1),
            message: serde_json::json!({"topic": "hello", "n": [1, 2]}),
            pm_ids: vec![],
        }
        .into(),
    )
    .await;
    assert!(reply.error.is_none(), "{reply:?}");
    let e = echo.until("echo", |_| true).await;
    assert_eq!(e.env.process.pm_id, 1);
    assert_eq!(
        e.env.data,
        Some(serde_json::json!({"got": {"topic": "hello", "n": [1, 2]}, "env_secret_seen": true}))
    );

    // log files, as pm2 keeps them
    let out = std::fs::read_to_string(agent.log_dir().join("api-out-0.log")).unwrap();
    assert!(out.contains("hello from instance 0 pm_id 0"), "{out}");
    let err = std::fs::read_to_string(agent.log_dir().join("api-error-1.log")).unwrap();
    assert!(err.contains("a line on stderr"), "{err}");

    // list
    let list = request(&client, "web-1", targeted("list", "all")).await;
    assert_eq!(list.processes.len(), 2);
    assert!(
        list.processes
            .iter()
            .all(|p| p.meta.status == Status::Online && p.memory > 0)
    );
    let stats = list.agent.unwrap();
    assert!(stats.counters.relayed > 10);
    assert_eq!(stats.counters.dropped, 0);

    // stop: exit + stop events, status stopped
    let reply = request(&client, "web-1", targeted("stop", "api")).await;
    assert!(reply.error.is_none());
    assert!(reply.changes.iter().all(|c| c.what == ChangeKind::Stopped));
    assert!(
        reply
            .processes
            .iter()
            .all(|p| p.meta.status == Status::Stopped && p.meta.pid == 0)
    );
    all.event(0, "stop").await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_uses_the_channel_on_fd3() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.py.>").await;
    let agent = TestAgent::start(&nats, "h").await;
    let reply = request(&client, "h", start(spec("py", "worker.py"))).await;
    assert!(reply.error.is_none(), "{reply:?}");
    assert_eq!(reply.processes[0].interpreter, "python3");
    assert_eq!(reply.processes[0].meta.exec_mode, ExecMode::Fork);
    // The channel and stdout are separate streams: either may arrive first.
    let (mut hello, mut up) = (None, false);
    w.until("py:hello and the stdout line", |s| {
        if s.subject == "pm.default.py.py:hello" {
            hello = s.env.data.clone();
        }
        up |= s.subject.ends_with("log:out")
            && s.env.data == Some(serde_json::json!("python worker up"));
        hello.is_some() && up
    })
    .await;
    assert_eq!(hello, Some(serde_json::json!({"instance": "0"})));
    let reply = request(
        &client,
        "h",
        SendRequest {
            request_id: Uuid::new_v4(),
            target: Target::parse("default/py").unwrap(),
            message: serde_json::json!(["any", "json", 1]),
            pm_ids: vec![],
        }
        .into(),
    )
    .await;
    assert!(reply.error.is_none(), "{reply:?}");
    let echo = w
        .until("py:echo", |s| s.subject == "pm.default.py.py:echo")
        .await;
    assert_eq!(echo.env.data, Some(serde_json::json!(["any", "json", 1])));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_lines_are_reported_and_the_worker_keeps_running() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.bad.>").await;
    let agent = TestAgent::start_with(&nats, "h", |s| s.relay.max_message = Some(4096)).await;
    let reply = request(&client, "h", start(spec("bad", "malformed.py"))).await;
    assert!(reply.error.is_none(), "{reply:?}");
    let mut errors = 0;
    let mut reasons = vec![];
    let mut after = false;
    w.until("3 faults reported and the good message", |s| {
        if event_name(s) == Some("ipc:error") {
            let e = s.env.event.as_ref().unwrap();
            errors += e.count.unwrap();
            reasons.push(e.reason.clone().unwrap());
        }
        if s.subject == "pm.default.bad.after" {
            after = true;
        }
        errors >= 3 && after
    })
    .await;
    let text = reasons.join(" | ");
    assert!(text.contains("malformed line"), "{text}");
    let list = request(&client, "h", targeted("list", "bad")).await;
    let p = &list.processes[0];
    assert_eq!(p.meta.status, Status::Online, "the worker keeps running");
    assert_eq!(p.ipc_errors, 3);
    assert_eq!(p.meta.restart_time, 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_reason_names_the_limit() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.big.>").await;
    let agent = TestAgent::start_with(&nats, "h", |s| s.relay.max_message = Some(4096)).await;
    let mut s = spec("big", "malformed.py");
    s.env.insert("BIG".into(), "100000".into());
    request(&client, "h", start(s)).await;
    let mut reasons = String::new();
    w.until("oversized report", |s| {
        if let Some(e) = s
            .env
            .event
            .as_ref()
            .filter(|e| e.event.as_str() == "ipc:error")
        {
            reasons.push_str(e.reason.as_deref().unwrap_or_default());
            reasons.push('|');
        }
        reasons.contains("exceeds the limit of 4096 bytes")
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_reaches_restart_overlimit_and_errored() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.crash.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("crash", "crash.js");
    s.max_restarts = 3;
    request(&client, "h", start(s)).await;
    let mut names = vec![];
    let over = w
        .until("restart overlimit", |s| {
            names.push(event_name(s).unwrap_or_default().to_string());
            event_name(s) == Some("restart overlimit")
        })
        .await;
    assert_eq!(over.env.process.status, Status::Errored);
    // pm2's sequence: start, online, (exit, online)×2, then overlimit; no `restart` events
    assert_eq!(
        names,
        vec![
            "start",
            "online",
            "exit",
            "online",
            "exit",
            "online",
            "restart overlimit"
        ]
    );
    let exit = w.event(0, "exit").await;
    assert_eq!(exit.env.event.unwrap().exit_code, Some(1));
    let list = request(&client, "h", targeted("list", "crash")).await;
    assert_eq!(list.processes[0].meta.status, Status::Errored);
    assert_eq!(list.processes[0].meta.restart_time, 2);
    // a manual restart resets the counters and runs it again
    let r = request(&client, "h", targeted("restart", "crash")).await;
    assert_eq!(r.changes[0].what, ChangeKind::Restarted);
    w.event(0, "online").await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_exit_codes_and_no_autorestart_leave_it_stopped() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.*.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("codes", "crash.js");
    s.env.insert("EXIT_CODE".into(), "3".into());
    s.stop_exit_codes.0 = vec![3];
    let r = request(&client, "h", start(s)).await;
    let id = r.processes[0].meta.pm_id;
    let exit = w.event(id, "exit").await;
    assert_eq!(exit.env.process.status, Status::Stopped);
    let mut s = spec("noauto", "crash.js");
    s.autorestart = false;
    let r = request(&client, "h", start(s)).await;
    let id2 = r.processes[0].meta.pm_id;
    let exit = w.event(id2, "exit").await;
    assert_eq!(exit.env.process.status, Status::Stopped);
    let list = request(&client, "h", targeted("list", "all")).await;
    assert!(
        list.processes
            .iter()
            .all(|p| p.meta.status == Status::Stopped && p.meta.restart_time == 0)
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_delay_waits_before_restarting() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.slow.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("slow", "crash.js");
    s.restart_delay = Duration::from_millis(300);
    request(&client, "h", start(s)).await;
    let exit = w.event(0, "exit").await;
    assert_eq!(exit.env.process.status, Status::WaitingRestart);
    let online = w.event(0, "online").await;
    assert_eq!(online.env.process.restart_time, 1);
    assert!(
        online.env.at >= exit.env.at + 300,
        "restarted after the delay"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_message_stops_with_the_message_instead_of_the_signal() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.polite.>").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("polite", "shutdown_msg.js");
    s.shutdown_with_message = true;
    s.kill_timeout = Duration::from_secs(30); // a SIGKILL would take 30 s: the test would time out
    request(&client, "h", start(s)).await;
    w.until("it is up", |s| {
        log_line(s).is_some_and(|l| l.starts_with("up "))
    })
    .await;
    let r = request(&client, "h", targeted("stop", "polite")).await;
    assert!(r.error.is_none(), "{r:?}");
    let mut said = false;
    let exit = w
        .until("its exit", |s| {
            said |= log_line(s).is_some_and(|l| l.starts_with("shutdown message"));
            assert!(log_line(s) != Some("SIGINT ignored"), "it got the signal");
            event_name(s) == Some("exit")
        })
        .await;
    assert!(said, "the app saw the 'shutdown' message");
    assert_eq!(exit.env.event.unwrap().exit_code, Some(0));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sigkills_the_whole_group_after_kill_timeout() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.stubborn.>").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("stubborn", "stubborn.sh");
    s.kill_timeout = Duration::from_millis(300);
    request(&client, "h", start(s)).await;
    let line = w
        .until("grandchild pid", |s| {
            s.env
                .data
                .as_ref()
                .and_then(|d| d.as_str())
                .is_some_and(|l| l.starts_with("grandchild "))
        })
        .await;
    let gpid: i32 = line.env.data.unwrap().as_str().unwrap()[11..]
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(gpid));
    let r = request(&client, "h", targeted("stop", "stubborn")).await;
    assert!(r.error.is_none());
    let exit = w.event(0, "exit").await;
    assert_eq!(exit.env.event.unwrap().signal.as_deref(), Some("SIGKILL"));
    assert!(
        await_pid_exit(gpid, WAIT).await,
        "grandchild {gpid} survived"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_goes_online_on_ready_or_after_listen_timeout() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.*.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("rdy", "ready.js");
    s.wait_ready = true;
    let r = request(&client, "h", start(s)).await;
    assert_eq!(r.processes[0].meta.status, Status::Launching);
    let ready = w.event(0, "ready").await;
    assert_eq!(ready.env.process.status, Status::Launching);
    let online = w.event(0, "online").await;
    assert_eq!(online.env.process.status, Status::Online);

    let mut s = spec("never", "ready.js");
    s.wait_ready = true;
    s.listen_timeout = Duration::from_millis(300);
    s.env.insert("NEVER".into(), "1".into());
    let r = request(&client, "h", start(s)).await;
    let id = r.processes[0].meta.pm_id;
    let online = w.event(id, "online").await;
    let reason = online.env.event.unwrap().reason.unwrap();
    assert!(reason.contains("listen_timeout"), "{reason}");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors_and_disturb_nothing() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let agent = TestAgent::start(&nats, "h").await;
    let ok = request(&client, "h", start(spec("api", "chatty.js"))).await;
    assert!(ok.error.is_none());

    let err = |r: flotilla::protocol::Reply| r.error.expect("an error");
    let e = err(request(&client, "h", start(spec("my app", "chatty.js"))).await);
    assert_eq!(e.kind, ErrorKind::InvalidName);
    assert!(e.message.contains("'my app'"), "{e}");
    let mut s = spec("x", "chatty.js");
    s.namespace = "_fleet".into();
    assert_eq!(
        err(request(&client, "h", start(s)).await).kind,
        ErrorKind::InvalidName
    );
    let e = err(request(&client, "h", start(AppSpec::new("x", "/no/such/app.js"))).await);
    assert_eq!(e.kind, ErrorKind::ScriptNotFound);
    assert!(
        e.message.contains("host h") && e.message.contains("/no/such/app.js"),
        "{e}"
    );
    let mut s = spec("x", "chatty.js");
    s.interpreter = Some("nodezilla".into());
    assert_eq!(
        err(request(&client, "h", start(s)).await).kind,
        ErrorKind::InterpreterNotFound
    );
    let mut s = spec("x", "chatty.js");
    s.instances = Some(0);
    assert_eq!(
        err(request(&client, "h", start(s)).await).kind,
        ErrorKind::InvalidValue
    );
    let e = err(request(&client, "h", start(spec("api", "chatty.js"))).await);
    assert_eq!(e.kind, ErrorKind::AlreadyRunning);
    let mut s = spec("dup", "chatty.js");
    s.instances = Some(2);
    s.pm_ids = vec![5, 5];
    let e = err(request(&client, "h", start(s)).await);
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(e.message.contains("same id twice"), "{e}");
    let e = err(request(&client, "h", targeted("stop", "nope")).await);
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("'nope'"), "{e}");
    let e = err(request(&client, "h", targeted("restart", "42")).await);
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = err(request_raw(&client, "h", "start", b"{not json").await);
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = err(request_raw(
        &client,
        "h",
        "stop",
        br#"{"request_id":"00000000-0000-0000-0000-000000000001","target":"a.b"}"#,
    )
    .await);
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("'a.b'"), "{e}");
    let e = err(request_raw(&client, "h", "launch", b"{}").await);
    assert_eq!(e.kind, ErrorKind::UnknownVerb);
    let sig = |s: &str| -> Request {
        SignalRequest {
            request_id: Uuid::new_v4(),
            target: Target::All,
            signal: s.into(),
            pm_ids: vec![],
        }
        .into()
    };
    assert_eq!(
        err(request(&client, "h", sig("SIGFOO")).await).kind,
        ErrorKind::UnknownSignal
    );
    let e = err(request(
        &client,
        "h",
        SendRequest {
            request_id: Uuid::new_v4(),
            target: Target::All,
            message: serde_json::json!({"cmd": "NODE_HANDLE_ACK"}),
            pm_ids: vec![],
        }
        .into(),
    )
    .await);
    assert_eq!(e.kind, ErrorKind::InvalidValue);

    // nothing was disturbed
    let list = request(&client, "h", targeted("list", "all")).await;
    assert_eq!(list.processes.len(), 1);
    assert_eq!(list.processes[0].meta.status, Status::Online);
    assert_eq!(list.processes[0].meta.restart_time, 0);
    // a signal that is fine
    let r = request(&client, "h", sig("SIGUSR2")).await;
    assert_eq!(r.changes[0].what, ChangeKind::Sent);
    assert_eq!(r.changes[0].detail, "SIGUSR2");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_a_request_id_is_harmless() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let agent = TestAgent::start(&nats, "h").await;
    let req: Request = StartRequest {
        request_id: Uuid::new_v4(),
        app: spec("api", "chatty.js"),
        force: false,
    }
    .into();
    let a = request(&client, "h", req.clone()).await;
    let b = request(&client, "h", req.clone()).await;
    assert!(a.error.is_none());
    assert_eq!(a, b, "the same reply, word for word");
    let stop = targeted("stop", "api");
    let (x, y) = tokio::join!(
        request(&client, "h", stop.clone()),
        request(&client, "h", stop.clone())
    );
    assert_eq!(x, y);
    let list = request(&client, "h", targeted("list", "all")).await;
    assert_eq!(list.processes.len(), 1, "one app, not two");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_waits_for_nats_and_connects_when_it_appears() {
    // The agent must be given the URL before the server exists, so the port is picked by
    // binding and releasing it: another test's server (`-p -1`) could take it in between,
    // which would fail this test, never pass it wrongly.
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let agent = TestAgent::spawn(&url, "late", |_| {});
    // Nothing listens on the port: the agent can only be retrying (a first attempt that gave
    // up would have ended `run`).
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something already listens on {port}"
    );
    // Bring the server up on that port; a heartbeat from the agent (they keep coming, so
    // subscribing late cannot miss them, unlike the one-off `online`) shows it connected
    // after the server appeared.
    let nats = NatsServer::start_with(Some(port), &[]);
    let client = nats.client().await;
    let mut beats = Watch::new(&client, "pm._fleet.late.host:heartbeat").await;
    let beat = beats.next_raw().await;
    let beat: flotilla::protocol::fleet::Heartbeat = serde_json::from_slice(&beat.payload).unwrap();
    assert_eq!(beat.host, "late");
    let list = request(&client, "late", targeted("list", "all")).await;
    assert!(list.error.is_none());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_host_figures() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut hb = Watch::new(&client, "pm._fleet.hb.host:heartbeat").await;
    let agent = TestAgent::start_with(&nats, "hb", |s| {
        s.labels.insert("zone".into(), "a".into());
    })
    .await;
    request(&client, "hb", start(spec("api", "chatty.js"))).await;
    let beat = within("a heartbeat counting the worker online", async {
        loop {
            let m = hb.next_raw().await;
            let v: flotilla::protocol::fleet::Heartbeat =
                serde_json::from_slice(&m.payload).unwrap();
            if v.online == 1 {
                break v;
            }
        }
    })
    .await;
    assert_eq!(beat.host, "hb");
    assert_eq!(beat.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(beat.processes, 1);
    assert!(beat.memory > 0 && beat.mem_total > 0 && beat.cpus > 0);
    assert!(beat.workers_memory > 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_workers_gracefully_and_says_goodbye() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.>").await;
    let agent = TestAgent::start(&nats, "bye").await;
    let mut s = spec("api", "chatty.js");
    s.instances = Some(2);
    s.kill_timeout = Duration::from_secs(10); // a loaded host may starve a worker past 1.6 s
    let r = request(&client, "bye", start(s)).await;
    let pids: Vec<i32> = r.processes.iter().map(|p| p.meta.pid as i32).collect();
    // Both have installed their SIGINT handlers once they have logged.
    let mut hellos = 0;
    w.until("both hello lines", |s| {
        hellos += s.subject.ends_with("log:out") as u32;
        hellos == 2
    })
    .await;
    agent.stop().await.unwrap();
    let mut exits = 0;
    let mut offline = false;
    w.until("exit events and offline", |s| {
        if event_name(s) == Some("exit") {
            let e = s.env.event.as_ref().unwrap();
            // Cluster workers (node, 2 instances): told to disconnect, they exit on their own.
            assert!(stopped_gracefully(e), "a clean exit: {e:?}");
            exits += 1;
        }
        exits == 2
    })
    .await;
    let m = within("the host event after the exits", async {
        loop {
            let m = w.next_raw().await;
            if m.subject.as_str() == "pm._fleet.bye.host:event" {
                break m;
            }
        }
    })
    .await;
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    offline |= v["event"] == "offline";
    assert!(offline);
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} still alive after shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_drops_are_counted_and_reported_and_workers_keep_running() {
    let mut nats = NatsServer::start();
    let client = nats.client().await;
    let agent = TestAgent::start_with(&nats, "out", |s| s.relay.buffer = 256).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("done");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut s = spec("blast", "blaster.py");
    s.env.insert("DONE_FIFO".into(), fifo.display().to_string());
    s.env.insert("COUNT".into(), "50000".into());
    let mut logs = Watch::new(&client, "pm.default.blast.log:out").await;
    let r = request(&client, "out", start(s)).await;
    let pid = r.processes[0].meta.pid as i32;
    // Its SIGUSR2 handler is installed once it says so.
    logs.until("blaster ready", |s| {
        s.env.data == Some(serde_json::json!("blaster ready"))
    })
    .await;
    drop(client);

    nats.kill();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    // The worker says when it has sent everything (a FIFO read: an event, not a timer).
    let mut rx = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&fifo)
        .unwrap();
    let mut done = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::io::AsyncReadExt::read_to_string(&mut rx, &mut done),
    )
    .await
    .expect("the worker did not finish its burst")
    .unwrap();
    assert_eq!(done, "done\n");

    nats.restart();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.blast.process:event").await;
    let dropped = w
        .until("dropped event", |s| event_name(s) == Some("dropped"))
        .await;
    let e = dropped.env.event.unwrap();
    assert!(e.count.unwrap() > 0);
    assert!(e.since.unwrap() <= e.until.unwrap());
    let list = request(&client, "out", targeted("list", "blast")).await;
    let p = &list.processes[0];
    assert_eq!(p.meta.status, Status::Online);
    assert_eq!(p.meta.pid as i32, pid, "the same worker kept running");
    assert!(p.dropped > 0);
    assert!(list.agent.unwrap().counters.dropped >= p.dropped);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_restart_by_target() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.*.*.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("api", "chatty.js");
    s.namespace = "shop".into();
    s.instances = Some(2);
    request(&client, "h", start(s)).await;
    w.event(1, "online").await;
    let r = request(&client, "h", targeted("restart", "shop/api")).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(
        r.processes
            .iter()
            .all(|p| p.meta.status == Status::Online && p.meta.restart_time == 1)
    );
    w.event(0, "restart").await;
    let r = request(&client, "h", targeted("delete", "0")).await;
    assert_eq!(r.changes[0].what, ChangeKind::Deleted);
    w.event(0, "delete").await;
    let list = request(&client, "h", targeted("list", "all")).await;
    assert_eq!(list.processes.len(), 1);
    assert_eq!(list.processes[0].meta.pm_id, 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_restart_restarts_a_worker_over_its_limit() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.hog.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("hog", "hog.js");
    s.max_memory_restart = Some(40 << 20);
    s.env.insert("HOG_MB".into(), "80".into());
    request(&client, "h", start(s)).await;
    let r = w.event(0, "restart").await;
    let e = r.env.event.unwrap();
    assert_eq!(e.manually, Some(false));
    assert!(e.reason.unwrap().contains("max_memory_restart 40 MiB"));
    let online = w.event(0, "online").await;
    assert_eq!(online.env.process.restart_time, 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_worker_is_slowed_down_not_dropped_and_the_agent_stays_responsive() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut flood = Watch::new(&client, "pm.default.flood.flood").await;
    let mut logs = Watch::new(&client, "pm.default.flood.log:out").await;
    // A tiny queue, so the flood overruns it; NATS is up, so the worker is read more slowly
    // (backpressure) and nothing is dropped (max_wait is generous: no stall on a busy CI box
    // lasts 10 s).
    let agent = TestAgent::start_with(&nats, "h", |s| {
        s.relay.buffer = 64;
        s.relay.max_wait = Duration::from_secs(10);
    })
    .await;
    let mut s = spec("flood", "flood.py");
    s.env.insert("COUNT".into(), "20000".into());
    request(&client, "h", start(s)).await;
    logs.until("sent line", |s| {
        s.env.data == Some(serde_json::json!("sent 20000"))
    })
    .await;
    // The agent answers while (or right after) it relays the flood.
    let list = request(&client, "h", targeted("list", "flood")).await;
    assert_eq!(list.processes[0].meta.status, Status::Online);
    // Every message is either delivered or counted: wait until the two add up.
    let mut received = 0u64;
    let mut last_i = -1i64;
    loop {
        let list = request(&client, "h", targeted("list", "flood")).await;
        let dropped = list.processes[0].dropped;
        let stats = list.agent.unwrap();
        if stats.queued == 0 && received + dropped == 20000 {
            break;
        }
        // take what has arrived meanwhile (the next one awaited with a deadline)
        let first = flood.next_raw().await;
        for m in std::iter::once(first).chain(flood.ready_now()) {
            let env: flotilla::protocol::Envelope = serde_json::from_slice(&m.payload).unwrap();
            let i = env.data.unwrap()["i"].as_i64().unwrap();
            assert!(i > last_i, "order per worker is kept ({i} after {last_i})");
            last_i = i;
            received += 1;
        }
    }
    assert_eq!(received, 20000, "backpressure, not loss, while NATS is up");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_settings_reach_nats_and_a_refusal_is_final_and_clear() {
    let nats = NatsServer::start_with(None, &["--auth", "s3cret"]);
    let url = nats.url();
    let client = async_nats::ConnectOptions::with_token("s3cret".into())
        .connect(url.as_str())
        .await
        .unwrap();
    let mut online = Watch::new(&client, "pm._fleet.tok.host:event").await;
    let agent = TestAgent::spawn(&url, "tok", |s| s.nats.token = Some("s3cret".into()));
    online.next_raw().await;
    let list = request(&client, "tok", targeted("list", "all")).await;
    assert!(list.error.is_none());
    agent.stop().await.unwrap();

    let wrong = TestAgent::spawn(&url, "bad", |s| s.nats.token = Some("wrong".into()));
    let err = wrong.join().await.unwrap_err().to_string();
    assert!(err.contains(&url) && err.contains("refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_a_descendant_escaped_and_holds_stdout() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.esc.log:out").await;
    let agent = TestAgent::start(&nats, "h").await;
    request(&client, "h", start(spec("esc", "escapee.sh"))).await;
    let line = w
        .until("escapee pid", |s| {
            s.env
                .data
                .as_ref()
                .and_then(|d| d.as_str())
                .is_some_and(|l| l.starts_with("escapee "))
        })
        .await;
    let pid: i32 = line.env.data.unwrap().as_str().unwrap()[8..]
        .trim()
        .parse()
        .unwrap();
    // Out of the worker's group: if this test fails, its drop guard kills it by name.
    agent.also_kill(pid);
    let stopped = agent.stop().await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    stopped.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_sent_by_a_node_worker_is_acknowledged_and_its_message_relayed() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.hdl.>").await;
    let agent = TestAgent::start(&nats, "h").await;
    request(&client, "h", start(spec("hdl", "handle.js"))).await;
    let (mut with, mut after) = (false, false);
    w.until("both messages", |s| {
        with |= s.subject == "pm.default.hdl.with:handle";
        after |= s.subject == "pm.default.hdl.after:handle";
        with && after
    })
    .await;
    let list = request(&client, "h", targeted("list", "hdl")).await;
    assert_eq!(list.processes[0].ipc_errors, 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_arriving_during_a_delete_does_not_resurrect_the_process() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.stubborn.>").await;
    let agent = TestAgent::start(&nats, "h").await;
    let mut s = spec("stubborn", "stubborn.sh");
    s.kill_timeout = Duration::from_millis(300); // it ignores SIGINT: the delete takes 300 ms
    request(&client, "h", start(s)).await;
    w.until("started", |s| s.subject.ends_with("log:out")).await;
    let (del, rst) = tokio::join!(
        request(&client, "h", targeted("delete", "stubborn")),
        request(&client, "h", targeted("restart", "all")),
    );
    assert!(del.error.is_none(), "{del:?}");
    assert_eq!(del.changes[0].what, ChangeKind::Deleted);
    assert_eq!(
        rst.changes
            .iter()
            .map(|c| c.what.as_str())
            .collect::<Vec<_>>(),
        vec!["deleted"]
    );
    let list = request(&client, "h", targeted("list", "all")).await;
    assert!(list.processes.is_empty(), "{:?}", list.processes);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_with_a_handle_is_still_acknowledged() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.default.hdl.>").await;
    let agent = TestAgent::start_with(&nats, "h", |s| s.relay.max_message = Some(4096)).await;
    let mut s = spec("hdl", "handle.js");
    s.env.insert("PAD".into(), "100000".into());
    request(&client, "h", start(s)).await;
    // Node holds back every later send until the ACK: this one arriving proves it was sent.
    w.until("after:handle", |s| {
        s.subject == "pm.default.hdl.after:handle"
    })
    .await;
    let list = request(&client, "h", targeted("list", "hdl")).await;
    assert_eq!(list.processes[0].ipc_errors, 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_converges_to_its_assignment_in_kv_and_keeps_a_local_copy() {
    use flotilla::bus::store::Store;
    use flotilla::protocol::state::{AssignedApp, Assignment, BUCKET};
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut ev = Watch::new(&client, "pm.default.*.process:event").await;
    let agent = TestAgent::start(&nats, "conv").await;
    let store = Store::open(client.clone(), BUCKET).await.unwrap();
    let app = |ids: &[u32], running: bool| {
        let mut s = spec("api", "chatty.js");
        s.pm_ids = ids.to_vec();
        s.instances = Some(ids.len() as u32);
        AssignedApp {
            spec: s,
            running,
            stopped: Default::default(),
        }
    };
    let assign = |apps: Vec<AssignedApp>| {
        let a = Assignment {
            host: "conv".into(),
            apps,
        };
        move |_: Option<Assignment>| Ok(a.clone())
    };
    // assigned pm_ids 10 and 11: both start, with those ids
    store
        .update("assign.conv", assign(vec![app(&[10, 11], true)]))
        .await
        .unwrap();
    ev.all_online(&[10, 11]).await;
    let local = flotilla::agent::local::load(&agent.home.path().join("assignment.json"))
        .unwrap()
        .expect("a local copy");
    assert_eq!(local.apps[0].spec.pm_ids, vec![10, 11]);
    // scale down to 10: 11 is deleted
    store
        .update("assign.conv", assign(vec![app(&[10], true)]))
        .await
        .unwrap();
    ev.event(11, "delete").await;
    // mark stopped: 10 stops and stays in the table
    store
        .update("assign.conv", assign(vec![app(&[10], false)]))
        .await
        .unwrap();
    ev.event(10, "stop").await;
    let list = request(&client, "conv", targeted("list", "all")).await;
    assert_eq!(list.processes.len(), 1);
    assert_eq!(list.processes[0].meta.status, Status::Stopped);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_a_restarted_agent_runs_its_local_copy() {
    use flotilla::bus::store::Store;
    use flotilla::protocol::state::{AssignedApp, Assignment, BUCKET};
    let mut nats = NatsServer::start();
    let client = nats.client().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("up");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // An up-report from a worker: one line in the FIFO (an event, not a timer).
    let up = || async {
        let mut rx = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            WAIT,
            tokio::io::AsyncReadExt::read_to_string(&mut rx, &mut line),
        )
        .await
        .expect("the worker did not report")
        .unwrap();
        line
    };
    let agent = TestAgent::start(&nats, "local").await;
    let mut s = spec("up", "fifo_up.sh");
    s.env.insert("UP_FIFO".into(), fifo.display().to_string());
    s.pm_ids = vec![7];
    let a = Assignment {
        host: "local".into(),
        apps: vec![AssignedApp {
            spec: s,
            running: true,
            stopped: Default::default(),
        }],
    };
    let first = up();
    let store = Store::open(client.clone(), BUCKET).await.unwrap();
    store
        .update("assign.local", move |_: Option<Assignment>| Ok(a.clone()))
        .await
        .unwrap();
    assert_eq!(first.await, "up\n");
    let (res, home) = agent.stop_keep_home().await;
    res.unwrap();

    // NATS goes away; the agent restarts on the same home and runs its workers anyway.
    let url = nats.url();
    nats.kill();
    let again = up();
    let agent = TestAgent::spawn_in(home, &url, "local", |_| {});
    assert_eq!(again.await, "up\n");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_or_reload_whose_new_run_cannot_be_spawned_says_which() {
    use std::os::unix::fs::PermissionsExt;
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut w = Watch::new(&client, "pm.*.*.process:event").await;
    let agent = TestAgent::start(&nats, "h").await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("sleeper");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    let exec = |mode| std::fs::set_permissions(&script, std::fs::Permissions::from_mode(mode));
    exec(0o755).unwrap();
    for name in ["r", "l"] {
        let mut s = clean_env(AppSpec::new(name, &script));
        s.interpreter = Some("none".into());
        let r = request(&client, "h", start(s)).await;
        assert!(r.error.is_none(), "{r:?}");
    }
    w.event(0, "online").await;
    w.event(1, "online").await;
    // Its new run cannot be exec'd any more.
    exec(0o644).unwrap();
    for (verb, pm_id, kind) in [
        ("restart", 0, ChangeKind::NotRestarted),
        ("reload", 1, ChangeKind::NotReloaded),
    ] {
        let r = request(&client, "h", targeted(verb, &pm_id.to_string())).await;
        let e = r.error.as_ref().expect("a failed spawn is an error");
        assert_eq!(e.kind, ErrorKind::SpawnFailed, "{verb}: {e:?}");
        assert_eq!(r.changes.len(), 1, "{verb}: {r:?}");
        assert_eq!(r.changes[0].what, kind, "{verb}: {r:?}");
        assert_eq!(r.changes[0].detail, "spawn failed", "{verb}");
        w.event(pm_id, "spawn:error").await;
    }
    agent.stop().await.unwrap();
}
