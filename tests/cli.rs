//! The pm2-style verbs, driving the real binary against a real fleet (nats-server, controller
//! and agents); `--json` is asserted structurally, human output against snapshots with the
//! volatile fields (pids, uptimes, figures) filled in.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;

fn by_status<'a>(procs: &'a [Value], status: &str) -> Vec<&'a Value> {
    procs.iter().filter(|p| p["status"] == status).collect()
}

/// pids, uptimes, CPU and memory change from run to run, and column widths with them: cells
/// are trimmed, volatile ones replaced by `…`, border lines reduced to their corners.
fn redact(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        if line.starts_with('│') {
            let cells: Vec<String> = line
                .trim_matches('│')
                .split('│')
                .enumerate()
                .map(|(i, c)| {
                    let t = c.trim();
                    // columns: id name namespace host mode pid uptime ↺ status cpu mem
                    if matches!(i, 5 | 6 | 9 | 10) && !t.chars().all(char::is_alphabetic) {
                        "…".to_string()
                    } else {
                        t.to_string()
                    }
                })
                .collect();
            out.push_str(&format!("│ {} │", cells.join(" │ ")));
        } else {
            let t: String = line.chars().filter(|c| *c != '─').collect();
            out.push_str(&t);
        }
        out.push('\n');
    }
    out
}

/// `cmd`'s exit status and output, like `Command::output` but under a deadline: past `within`
/// the command is killed (`kill_on_drop`) and the test fails naming it. Unlike
/// `Command::output` it leaves `cmd`'s stdout and stderr as set: pipe them to capture them.
async fn output_within(cmd: std::process::Command, within: Duration) -> std::process::Output {
    let what = format!("{cmd:?}");
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish in {within:?}: killed"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// [`output_within`] for code that cannot await (a `Drop`, a plain function called from a
/// test's runtime): on a thread of its own with a runtime of its own. `Err` holds the panic.
fn output_within_blocking(
    cmd: std::process::Command,
    within: Duration,
) -> std::thread::Result<std::process::Output> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(output_within(cmd, within))
    })
    .join()
}

#[test]
fn pid_alive_counts_a_zombie_as_exited() {
    let mut child = std::process::Command::new("sh")
        .args(["-c", "read _"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    assert!(pid_alive(pid), "a live child runs");
    // Let it exit, and wait for that on a pidfd without reaping it: it is now a zombie.
    drop(child.stdin.take());
    // SAFETY: pidfd_open takes a pid and flags; the child is not reaped, so the pid is its.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: the syscall just returned this descriptor to us.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call; fd stays open until the end of the test.
    let n = unsafe { libc::poll(&mut poll, 1, 15_000) };
    assert_eq!(
        n,
        1,
        "the child exits within 15 s ({})",
        std::io::Error::last_os_error()
    );
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(),
        "the zombie is still there to be seen"
    );
    assert!(!pid_alive(pid), "a zombie counts as exited");
    child.wait().unwrap();
    assert!(!pid_alive(pid), "a reaped child is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_ls_stop_restart_reload_scale_delete_on_one_host() {
    let fleet = Fleet::start(&["web-1"]).await;
    let script = fixture("chatty.js");
    let script = script.to_str().unwrap();
    let (ok, out, err) = fleet
        .cli(&["start", script, "-i", "4", "--name", "api"])
        .await;
    assert!(ok, "start failed: {err}");
    assert!(out.contains("online"), "{out}");
    insta::assert_snapshot!("start_table", redact(&out));

    let procs = fleet.ls().await;
    assert_eq!(procs.len(), 4, "{procs:?}");
    assert_eq!(by_status(&procs, "online").len(), 4);
    let mut instances: Vec<u64> = procs
        .iter()
        .map(|p| p["instance"].as_u64().unwrap())
        .collect();
    instances.sort();
    assert_eq!(instances, vec![0, 1, 2, 3]);
    for p in &procs {
        for field in [
            "pm_id",
            "name",
            "namespace",
            "host",
            "pid",
            "instance",
            "exec_mode",
            "status",
            "restart_time",
            "pm_uptime",
            "app_id",
            "cpu",
            "memory",
        ] {
            assert!(p.get(field).is_some(), "{field} missing from {p}");
        }
        assert_eq!(p["exec_mode"], "cluster");
        assert_eq!(p["host"], "web-1");
        assert!(p["pid"].as_u64().unwrap() > 0);
        assert!(p["memory"].as_u64().unwrap() > 0, "memory read from /proc");
    }

    // A second start of a running app is refused, and nothing running is disturbed.
    let (ok, _, err) = fleet
        .cli(&["start", script, "-i", "4", "--name", "api"])
        .await;
    assert!(!ok);
    assert!(
        err.contains("already runs") && err.contains("restart api"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let pids: Vec<u64> = fleet
        .ls()
        .await
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    let same: Vec<u64> = procs.iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids, same);

    // stop one instance, then the app
    let (ok, out, err) = fleet.cli(&["stop", "0"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("stopped"), "{out}");
    let procs = fleet.ls().await;
    assert_eq!(by_status(&procs, "stopped").len(), 1);
    let (ok, _, err) = fleet.cli(&["stop", "api"]).await;
    assert!(ok, "{err}");
    assert_eq!(by_status(&fleet.ls().await, "stopped").len(), 4);

    // restart brings all back, each restarted once (the agent's convergence to "running again"
    // and the controller's request must not both restart it)
    let (ok, _, err) = fleet.cli(&["restart", "api"]).await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    assert_eq!(by_status(&procs, "online").len(), 4, "{procs:?}");
    for p in &procs {
        assert_eq!(p["restart_time"], 1, "{p}");
    }

    // reload: one at a time, each comes back online with a new pid and one more restart
    let before: Vec<(u64, u64)> = procs
        .iter()
        .map(|p| {
            (
                p["pid"].as_u64().unwrap(),
                p["restart_time"].as_u64().unwrap(),
            )
        })
        .collect();
    let (ok, out, err) = fleet
        .cli(&["reload", "api", "--json", "--parallel", "2"])
        .await;
    assert!(ok, "{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    let words: Vec<(&str, &str)> = reply["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["what"].as_str().unwrap(), c["detail"].as_str().unwrap()))
        .collect();
    // chatty.js listens on nothing: pm2's reload is then a restart, and the reply says so.
    assert_eq!(
        words,
        vec![("reloaded", "a restart: it shares no listening socket"); 4]
    );
    let after = fleet.ls().await;
    assert_eq!(by_status(&after, "online").len(), 4);
    for (p, (pid, restarts)) in after.iter().zip(before) {
        assert_ne!(p["pid"].as_u64().unwrap(), pid);
        assert_eq!(p["restart_time"].as_u64().unwrap(), restarts + 1);
    }

    // scale down, then up (relative), keeping fleet-wide instance numbers
    let (ok, _, err) = fleet.cli(&["scale", "api", "2"]).await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    assert_eq!(procs.len(), 2, "{procs:?}");
    let (ok, _, err) = fleet.cli(&["scale", "api", "+1"]).await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    assert_eq!(procs.len(), 3);
    let mut instances: Vec<u64> = procs
        .iter()
        .map(|p| p["instance"].as_u64().unwrap())
        .collect();
    instances.sort();
    assert_eq!(instances, vec![0, 1, 2]);

    // describe
    let (ok, out, err) = fleet.cli(&["describe", "api", "--json"]).await;
    assert!(ok, "{err}");
    let d: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(d.len(), 3);
    assert!(d[0]["out_log"].as_str().unwrap().ends_with(".log"));
    let (ok, out, _) = fleet.cli(&["describe", "api"]).await;
    assert!(ok);
    assert!(
        out.contains("script path") && out.contains("chatty.js"),
        "{out}"
    );

    // logs: the recent lines of each file
    let (ok, out, err) = fleet.cli(&["logs", "api", "--lines", "5"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("hello from instance"), "{out}");
    assert!(out.contains("a line on stderr"), "{out}");
    let (ok, out, _) = fleet.cli(&["logs", "api", "--json"]).await;
    assert!(ok);
    let tails: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(tails.len(), 6, "out and err of 3 processes");

    // send and signal
    let (ok, out, err) = fleet.cli(&["send", "api", r#"{"topic":"hi"}"#]).await;
    assert!(ok, "{err}");
    assert_eq!(out.matches("sent").count(), 3, "{out}");
    let (ok, out, err) = fleet.cli(&["signal", "SIGUSR2", "api"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("sent SIGUSR2"), "{out}");

    // delete empties the fleet
    let (ok, _, err) = fleet.cli(&["delete", "all"]).await;
    assert!(ok, "{err}");
    assert!(fleet.ls().await.is_empty());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let fleet = Fleet::start(&["web-1"]).await;
    let script = fixture("chatty.js");
    let script = script.to_str().unwrap();
    let (ok, _, err) = fleet.cli(&["start", script, "--name", "ok"]).await;
    assert!(ok, "{err}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["start", script, "--name", "a.b"], "'.'"),
        (vec!["start", "/nope/missing.js"], "does not exist"),
        (vec!["stop", "ghost"], "no app or process matches 'ghost'"),
        (vec!["restart", "a.b"], "is not a target"),
        (vec!["send", "ok", "{not json"], "not valid JSON"),
        (vec!["signal", "SIGFOO", "ok"], "unknown signal 'SIGFOO'"),
        (vec!["scale", "ok", "lots"], "write a number"),
        (vec!["scale", "ok", "0"], "would delete it"),
        (vec!["start", script, "-i", "two"], "-i two"),
        (
            vec!["start", script, "--env", "prod"],
            "selects env_prod of an ecosystem file",
        ),
        (
            vec!["start", script, "--listen", "tcp://127.0.0.1"],
            "tcp://HOST:PORT",
        ),
        (
            vec!["start", script, "--cron-restart", "every day"],
            "not a cron pattern",
        ),
    ];
    for (args, want) in cases {
        let (ok, out, err) = fleet.cli(&args).await;
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Nothing running was disturbed.
    let procs = fleet.ls().await;
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0]["status"], "online");
    // -i max is one per CPU
    let (ok, _, err) = fleet
        .cli(&["start", script, "--name", "max", "-i", "max"])
        .await;
    assert!(ok, "{err}");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let n = fleet
        .ls()
        .await
        .iter()
        .filter(|p| p["name"] == "max")
        .count();
    assert_eq!(n, cpus);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_controller_and_no_nats_say_what_to_do() {
    let nats = NatsServer::start();
    let home = tempfile::tempdir().unwrap();
    let url = nats.url();
    let (ok, _, err) = run_cli(home.path(), &["--nats-url", &url, "ls"]).await;
    assert!(!ok);
    assert!(
        err.contains("no controller") && err.contains("flotilla info"),
        "{err}"
    );
    let (ok, _, err) = run_cli(home.path(), &["--nats-url", "nats://127.0.0.1:1", "ls"]).await;
    assert!(!ok);
    assert!(
        err.contains("cannot reach NATS at nats://127.0.0.1:1"),
        "{err}"
    );
    let (ok, out, _) = run_cli(home.path(), &["--nats-url", &url, "info", "--json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["nats_reachable"], true);
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("no controller answered")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecosystem_files_start_apps_and_apply_changes_to_running_ones() {
    let fleet = Fleet::start(&["web-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("chatty.js"), dir.path().join("chatty.js")).unwrap();
    let eco = dir.path().join("ecosystem.toml");
    std::fs::write(
        &eco,
        "[[apps]]\nname = \"web\"\nscript = \"chatty.js\"\ninstances = 2\n[apps.env]\nCOUNT = \"1\"\n[apps.env_prod]\nCOUNT = \"2\"\n",
    )
    .unwrap();
    let eco_s = eco.to_str().unwrap();
    let (ok, _, err) = fleet.cli(&["start", eco_s]).await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    assert_eq!(by_status(&procs, "online").len(), 2);
    let pids: Vec<u64> = procs.iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    // Starting the same file again with a profile applies the change (a restart), not a refusal.
    let (ok, _, err) = fleet.cli(&["start", eco_s, "--env", "prod"]).await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    assert_eq!(by_status(&procs, "online").len(), 2);
    for p in &procs {
        assert!(
            !pids.contains(&p["pid"].as_u64().unwrap()),
            "restarted with the new env"
        );
    }
    // Fewer instances in the file: the surplus goes, and start does not wait for it.
    std::fs::write(
        &eco,
        "[[apps]]\nname = \"web\"\nscript = \"chatty.js\"\ninstances = 1\n",
    )
    .unwrap();
    let (ok, _, err) = fleet.cli(&["start", eco_s]).await;
    assert!(ok, "{err}");
    assert_eq!(by_status(&fleet.ls().await, "online").len(), 1);
    // A script started again with -f and no -i keeps its count; so does a stopped app.
    let script = dir.path().join("chatty.js");
    let script = script.to_str().unwrap();
    let (ok, _, err) = fleet
        .cli(&["start", script, "--name", "solo", "-i", "3"])
        .await;
    assert!(ok, "{err}");
    let (ok, _, err) = fleet.cli(&["start", script, "--name", "solo", "-f"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = fleet.cli(&["stop", "solo"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = fleet.cli(&["start", script, "--name", "solo"]).await;
    assert!(ok, "a stopped app starts again: {err}");
    let solo: Vec<Value> = fleet
        .ls()
        .await
        .into_iter()
        .filter(|p| p["name"] == "solo")
        .collect();
    assert_eq!(by_status(&solo, "online").len(), 3, "{solo:?}");
    // A broken file: file, line and column.
    std::fs::write(&eco, "[[apps]\nname = 1\n").unwrap();
    let (ok, _, err) = fleet.cli(&["start", eco_s]).await;
    assert!(!ok);
    assert!(err.contains("ecosystem.toml:1:"), "{err}");
    fleet.stop().await;
}

/// Stops a test's local stack even when the test fails.
struct StackGuard(std::path::PathBuf);

impl Drop for StackGuard {
    fn drop(&mut self) {
        let mut kill = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
        for k in flotilla_vars() {
            kill.env_remove(k);
        }
        kill.env("FLOTILLA_HOME", &self.0)
            .arg("kill")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // Under a deadline; a hang fails the test, unless it is failing already.
        if let Err(hung) = output_within_blocking(kill, Duration::from_secs(60))
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(hung);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_laptop_start_just_works_and_apps_come_back_after_kill() {
    let home = tempfile::tempdir().unwrap();
    // Any free port for the stack's nats-server, not 4222 (another stack, or a developer's
    // own server, may hold it).
    std::fs::write(
        home.path().join("flotilla.toml"),
        "[nats]\nlocal_port = 0\n",
    )
    .unwrap();
    let _guard = StackGuard(home.path().to_path_buf());
    let script = fixture("chatty.js");
    // No NATS URL: the first verb starts the local stack, then the app.
    let (ok, out, err) = run_cli(
        home.path(),
        &[
            "start",
            script.to_str().unwrap(),
            "-i",
            "2",
            "--name",
            "api",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.matches("online").count(), 2, "{out}");
    let (ok, out, _) = run_cli(home.path(), &["ls", "--json"]).await;
    assert!(ok);
    let procs: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(by_status(&procs, "online").len(), 2);
    let (ok, out, err) = run_cli(home.path(), &["info", "--json"]).await;
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["local_stack"], true);
    assert_eq!(info["controllers"].as_array().unwrap().len(), 1);
    assert_eq!(info["hosts"].as_array().unwrap().len(), 1);
    // kill stops workers, daemon and nats-server; the desired state stays in the home.
    let (ok, out, err) = run_cli(home.path(), &["kill"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("stopped the local stack"), "{out}");
    for p in &procs {
        let pid = p["pid"].as_i64().unwrap() as i32;
        assert!(await_pid_exit(pid, WAIT).await, "worker {pid} stopped");
    }
    let (ok, out, _) = run_cli(home.path(), &["info", "--json"]).await;
    assert!(ok);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert!(
        info["problem"]
            .as_str()
            .unwrap()
            .contains("no local stack runs")
    );
    // The next verb starts the stack again, and the apps come back on their own (pm2 resurrect).
    let (ok, out, err) = run_cli(home.path(), &["ls", "--json"]).await;
    assert!(ok, "{err}");
    let procs: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(procs.len(), 2, "{procs:?}");
    assert!(procs.iter().all(|p| p["name"] == "api"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_monit_and_an_agent_that_does_not_answer() {
    let mut fleet = Fleet::start(&["h1", "h2"]).await;
    let app = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster-app.js");
    let (ok, _, err) = fleet
        .cli(&["start", app.to_str().unwrap(), "-i", "2", "--name", "demo"])
        .await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    let hosts: std::collections::BTreeSet<&str> =
        procs.iter().map(|p| p["host"].as_str().unwrap()).collect();
    assert_eq!(hosts.len(), 2, "one instance per host: {procs:?}");

    // logs --follow: the recent lines, then a live one caused by a message.
    let url = fleet.nats.url();
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
    for k in flotilla_vars() {
        follow.env_remove(k);
    }
    let mut follow = follow
        .env("FLOTILLA_HOME", fleet.cli_home.path())
        .env("NO_COLOR", "1")
        .args([
            "--nats-url",
            &url,
            "logs",
            "demo",
            "--follow",
            "--lines",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut next = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("logs still runs")
    };
    // The tails end with an empty line after the last block (2 processes × out and err).
    let mut blocks = 0;
    while blocks < 4 {
        if next().await.contains("last ") {
            blocks += 1;
        }
    }
    let (ok, _, err) = fleet.cli(&["send", "demo", r#"{"ping":42}"#]).await;
    assert!(ok, "{err}");
    // One overall deadline: the app's other lines keep coming, so a per-line one never ends.
    within(
        "the worker's answer to the message in `logs --follow`",
        async {
            loop {
                let l = next().await;
                if l.contains(r#"got {"ping":42}"#) {
                    assert!(l.contains("|demo"), "{l}");
                    break;
                }
            }
        },
    )
    .await;
    drop(follow);

    // monit --json: one array per refresh.
    let (ok, out, err) = fleet
        .cli(&["monit", "--json", "--frames", "2", "--interval", "100ms"])
        .await;
    assert!(ok, "{err}");
    let frames: Vec<Vec<Value>> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|f| f.len() == 2));

    // An agent that goes away: ls shows the rest and says who did not answer; a stop is saved
    // for it and says so.
    let h2 = fleet.agents.pop().unwrap();
    h2.stop().await.unwrap();
    let (ok, out, err) = fleet.cli(&["ls"]).await;
    assert!(!ok);
    assert!(err.contains("h2") && err.contains("as last seen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(out.contains("h1"), "{out}");
    // Its process is still listed, as last seen (no live figures).
    let (_, out, _) = fleet.cli(&["ls", "--json"]).await;
    let procs: Vec<Value> = serde_json::from_str(&out).unwrap();
    let on_h2: Vec<&Value> = procs.iter().filter(|p| p["host"] == "h2").collect();
    assert_eq!(on_h2.len(), 1, "{procs:?}");
    assert_eq!(on_h2[0]["memory"], 0);
    let (ok, _, err) = fleet.cli(&["stop", "demo"]).await;
    assert!(!ok);
    assert!(err.contains("h2") && err.contains("converges"), "{err}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_restart_and_watch_restart_the_app() {
    let fleet = Fleet::start(&["web-1"]).await;
    let client = fleet.nats.client().await;
    let mut events = Watch::new(&client, "pm.default.*.process:event").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("chatty.js"), dir.path().join("chatty.js")).unwrap();
    let script = dir.path().join("chatty.js");
    let script = script.to_str().unwrap();

    // Every second (six fields: seconds first).
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            script,
            "--name",
            "tick",
            "--cron-restart",
            "* * * * * *",
        ])
        .await;
    assert!(ok, "{err}");
    let r = events
        .until("a cron restart", |s| {
            s.env.process.name == "tick"
                && s.env.event.as_ref().is_some_and(|e| {
                    e.event.as_str() == "restart"
                        && e.reason
                            .as_deref()
                            .is_some_and(|r| r.contains("cron_restart"))
                })
        })
        .await;
    let pm_id = r.env.process.pm_id;
    events
        .until("online again", |s| {
            s.env.process.pm_id == pm_id
                && s.env.process.restart_time >= 1
                && event_name(s) == Some("online")
        })
        .await;
    let (ok, _, err) = fleet.cli(&["delete", "tick"]).await;
    assert!(ok, "{err}");

    // --watch: a change in the app's folder restarts it; one in an ignored place does not
    // (checked by the order of events: the ignored write comes first).
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            script,
            "--name",
            "w",
            "--watch",
            "--ignore-watch",
            "*.tmp",
        ])
        .await;
    assert!(ok, "{err}");
    std::fs::write(dir.path().join("scratch.tmp"), "ignored").unwrap();
    std::fs::create_dir_all(dir.path().join("node_modules")).unwrap();
    std::fs::write(dir.path().join("node_modules/x.js"), "ignored").unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let r = events
        .until("a watch restart", |s| {
            s.env.process.name == "w"
                && s.env
                    .event
                    .as_ref()
                    .is_some_and(|e| e.event.as_str() == "restart")
        })
        .await;
    let why = r.env.event.unwrap().reason.unwrap();
    assert!(why.contains("config.json"), "{why}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_share_the_api_and_both_show_in_info() {
    let fleet = Fleet::start(&["web-1"]).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut s = flotilla::config::Settings::default();
    s.nats.url = Some(fleet.nats.url());
    let second = tokio::spawn(flotilla::controller::run_ready(
        s,
        async move {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    ready_rx.await.unwrap();
    // Each request is carried out once: with both answering, the second would refuse the
    // first's start ("already runs") half of the time.
    let script = fixture("chatty.js");
    for i in 0..4 {
        let name = format!("app{i}");
        let (ok, _, err) = fleet
            .cli(&["start", script.to_str().unwrap(), "--name", &name])
            .await;
        assert!(ok, "{name}: {err}");
    }
    assert_eq!(by_status(&fleet.ls().await, "online").len(), 4);
    let (ok, out, err) = fleet.cli(&["info", "--json"]).await;
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["controllers"].as_array().unwrap().len(), 2, "{info}");
    let _ = stop_tx.send(());
    second.await.unwrap().unwrap();
    fleet.stop().await;
}

/// Asks a TCP server for its one-line answer.
async fn ask_tcp(port: u16) -> String {
    tokio::time::timeout(WAIT, exchange(port, b""))
        .await
        .expect("an answer in time")
        .expect("the socket accepts and answers")
}

/// One HTTP GET, the whole answer.
async fn ask_tcp_http(port: u16) -> String {
    tokio::time::timeout(WAIT, try_http(port))
        .await
        .expect("an answer in time")
        .expect("the socket accepts and answers")
}

/// One HTTP GET; errors are returned (refused, reset), not panics.
async fn try_http(port: u16) -> std::io::Result<String> {
    exchange(port, b"GET / HTTP/1.0\r\n\r\n").await
}

/// Connects, sends `send`, reads until the server closes.
async fn exchange(port: u16, send: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    c.write_all(send).await?;
    let mut out = String::new();
    c.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_hands_one_socket_to_every_instance_in_any_language() {
    let fleet = Fleet::start(&["web-1"]).await;
    let port = free_port();
    let addr = format!("tcp://127.0.0.1:{port}");
    // Python, systemd style; --wait-ready proves the channel works where it moved to (fd 4).
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            fixture("listen.py").to_str().unwrap(),
            "--name",
            "py",
            "-i",
            "2",
            "--listen",
            &addr,
            "--wait-ready",
        ])
        .await;
    assert!(ok, "{err}");
    // Both instances accept on the one socket: ask until both have answered (the kernel picks
    // the worker; 400 requests all to one of two would be a bug, not bad luck).
    let mut pm_ids = std::collections::BTreeSet::new();
    for _ in 0..400 {
        if pm_ids.len() == 2 {
            break;
        }
        let who: Value = serde_json::from_str(ask_tcp(port).await.trim()).unwrap();
        assert_eq!(
            who["pid"], who["listen_pid"],
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(who["listen_fds"], 1);
        assert_eq!(who["names"], format!("tcp-{port}"));
        assert_eq!(who["channel"], 4);
        pm_ids.insert(who["pm_id"].as_str().unwrap().to_string());
    }
    assert_eq!(pm_ids.len(), 2, "both instances answered: {pm_ids:?}");
    // The socket outlives its workers: a restart never closes it, so nothing is refused.
    let (ok, _, err) = fleet.cli(&["restart", "py"]).await;
    assert!(ok, "{err}");
    let who: Value = serde_json::from_str(ask_tcp(port).await.trim()).unwrap();
    assert_eq!(who["pid"], who["listen_pid"]);
    // Another app cannot take the address from another process (here: the test's own bind).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            fixture("listen.py").to_str().unwrap(),
            "--name",
            "clash",
            "--listen",
            &format!("tcp://127.0.0.1:{taken_port}"),
        ])
        .await;
    assert!(!ok);
    assert!(err.contains("another process listens there"), "{err}");
    // Node: listen({fd: 3}) on its own socket.
    let node_port = free_port();
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            fixture("listen.js").to_str().unwrap(),
            "--name",
            "node",
            "-i",
            "2",
            "--listen",
            &format!("tcp://127.0.0.1:{node_port}"),
            "--wait-ready",
        ])
        .await;
    assert!(ok, "{err}");
    let got = ask_tcp_http(node_port).await;
    assert!(got.contains("node "), "{got}");
    // Deleting the app closes its socket: that socket (by inode) listens no more, and unless
    // a parallel test has since taken the freed port, connections are refused.
    let inode = listening_inode(port).expect("the port listens");
    let (ok, _, err) = fleet.cli(&["delete", "py"]).await;
    assert!(ok, "{err}");
    let now = listening_inode(port);
    assert_ne!(now, Some(inode), "the app's socket still listens");
    if now.is_none() {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
    drop(taken);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_node_servers_share_one_port_in_cluster_mode() {
    let fleet = Fleet::start(&["web-1"]).await;
    let client = fleet.nats.client().await;
    let port = free_port();
    let env = format!("PORT={port}");
    let script = fixture("cluster_server.js");
    let script = script.to_str().unwrap();
    // Without the agent answering Node's queryServer, three of four would die of EADDRINUSE.
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            script,
            "--name",
            "web",
            "-i",
            "4",
            "--env",
            &env,
            "--wait-ready",
        ])
        .await;
    assert!(ok, "{err}");
    let procs = fleet.ls().await;
    assert_eq!(by_status(&procs, "online").len(), 4, "{procs:?}");
    assert!(procs.iter().all(|p| p["restart_time"] == 0), "{procs:?}");
    // Distinct workers answer on the one port: ask until several have (at most 400 requests).
    let mut seen = std::collections::BTreeSet::new();
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..400 {
        if pids.len() >= 3 {
            break;
        }
        let got = ask_tcp_http(port).await;
        let body = got.lines().last().unwrap_or_default().to_string();
        let mut words = body.split(' ');
        seen.insert(words.next().unwrap_or_default().to_string());
        pids.insert(words.next().unwrap_or_default().to_string());
    }
    assert!(pids.len() >= 3, "several workers answered: {pids:?}");
    assert!(
        seen.iter()
            .all(|s| ["0", "1", "2", "3"].contains(&s.as_str())),
        "{seen:?}"
    );
    // The shared socket is non-blocking (for the worker's copy too: the flag is the socket's).
    // libuv accepts in every worker woken for a connection; on a blocking socket the losers
    // would block in accept(), their event loops stuck until the next connection.
    let inode = listening_inode(port).expect("the port listens");
    for p in by_status(&procs, "online") {
        let pid = p["pid"].as_u64().unwrap();
        assert!(
            socket_nonblocking(pid, inode),
            "worker {pid} got a blocking listening socket"
        );
    }
    // The port stays open across a restart of every instance.
    let (ok, _, err) = fleet.cli(&["restart", "web"]).await;
    assert!(ok, "{err}");
    assert!(ask_tcp_http(port).await.contains("200 OK"));
    // A stopped app holds no port (connections are refused, as under pm2); start binds again.
    // The port was free when picked, not reserved: the socket is checked by inode, and the
    // refusal only while nobody else (a parallel test) has taken the freed port.
    let inode = listening_inode(port).expect("the port listens");
    let (ok, _, err) = fleet.cli(&["stop", "web"]).await;
    assert!(ok, "{err}");
    let now = listening_inode(port);
    assert_ne!(now, Some(inode), "the stopped app's socket still listens");
    if now.is_none() {
        let refused = try_http(port).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{refused:?}"
        );
    }
    let (ok, _, err) = fleet.cli(&["start", "web", "--wait-ready"]).await;
    assert!(ok, "{err}");
    assert!(ask_tcp_http(port).await.contains("200 OK"));
    // A port someone else holds: the app sees Node's usual EADDRINUSE.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let mut errors = Watch::new(&client, "pm.default.clash.listen:error").await;
    let env = format!("PORT={taken_port}");
    let (ok, _, err) = fleet
        .cli(&["start", script, "--name", "clash", "-i", "2", "--env", &env])
        .await;
    let e = errors.until("EADDRINUSE in the app", |_| true).await;
    assert_eq!(e.env.data.unwrap()["code"], "EADDRINUSE");
    // The CLI says so: which instances, which port, where, and what to do.
    assert!(!ok, "a start whose workers cannot listen fails");
    let line = &err;
    assert!(
        line.contains("clash: pm_id")
            && line.contains("cannot listen")
            && line.contains(&format!(":{taken_port}"))
            && line.contains("on host web-1")
            && line.contains("another process listens there"),
        "{err}"
    );
    drop(taken);
    fleet.stop().await;
}

/// The inode of the TCP socket listening on `port` (from /proc/net/tcp and tcp6).
fn listening_inode(port: u16) -> Option<u64> {
    let want = format!(":{port:04X}");
    for table in ["/proc/net/tcp6", "/proc/net/tcp"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode (field 9)
            if f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A" {
                return f[9].parse().ok();
            }
        }
    }
    None
}

/// Whether process `pid` holds socket `inode` with O_NONBLOCK set (its fdinfo `flags`, octal).
fn socket_nonblocking(pid: u64, inode: u64) -> bool {
    let link = format!("socket:[{inode}]");
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == link) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
                .unwrap();
            return flags & libc::O_NONBLOCK as u64 != 0;
        }
    }
    panic!("process {pid} does not hold socket {inode}");
}

/// `flotilla start SCRIPT --name NAME EXTRA...`, which must succeed.
async fn start_ok(fleet: &Fleet, script: &std::path::Path, name: &str, extra: &[&str]) {
    let mut args = vec!["start", script.to_str().unwrap(), "--name", name];
    args.extend_from_slice(extra);
    let (ok, _, err) = fleet.cli(&args).await;
    assert!(ok, "{err}");
}

/// One request of a [`hammer`]: when it started, and what came of it (`Ok` = `200 OK`).
type Asked = (std::time::Instant, Result<(), String>);

/// A client asking over HTTP in a loop, one request at a time, until told to stop.
struct Hammer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Fires once the first request has been answered: the client is asking.
    first: tokio::sync::oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<Vec<Asked>>,
}

fn hammer(port: u16) -> Hammer {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (first_tx, first) = tokio::sync::oneshot::channel();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut first_tx = Some(first_tx);
            let mut asked: Vec<Asked> = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && asked.len() < 100_000 {
                let at = std::time::Instant::now();
                let got = match tokio::time::timeout(WAIT, try_http(port)).await {
                    Ok(Ok(body)) if body.contains("200 OK") => Ok(()),
                    other => Err(format!("{other:?}")),
                };
                if got.is_ok()
                    && let Some(tx) = first_tx.take()
                {
                    let _ = tx.send(());
                }
                asked.push((at, got));
            }
            asked
        }
    });
    Hammer { stop, first, task }
}

/// Requests that must have started while `flotilla reload` ran, for the run to show that
/// the reload was under load at all.
const MIN_DURING_RELOAD: usize = 5;

/// Reloads `name` while a client asks `port` in a loop, then checks that every request was
/// answered (none refused, none reset), and that the client really was asking during the
/// reload: at least [`MIN_DURING_RELOAD`] requests started between the moment `flotilla
/// reload` was launched and the moment it returned. `what` prefixes the failure messages.
async fn reload_under_load(fleet: &Fleet, port: u16, name: &str, what: &str) {
    let Hammer { stop, first, task } = hammer(port);
    tokio::time::timeout(WAIT, first)
        .await
        .unwrap_or_else(|_| panic!("{what}: no request answered before the reload"))
        .unwrap_or_else(|_| panic!("{what}: the client ended before its first answer"));
    let began = std::time::Instant::now();
    let (ok, _, err) = fleet.cli(&["reload", name]).await;
    let ended = std::time::Instant::now();
    assert!(ok, "{what}: {err}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let asked = task.await.unwrap();
    let failed: Vec<&String> = asked.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let during: Vec<&Asked> = asked
        .iter()
        .filter(|(at, _)| (began..=ended).contains(at))
        .collect();
    let during_failed = during.iter().filter(|(_, r)| r.is_err()).count();
    eprintln!(
        "{what}: {} requests, {} started during the reload ({:?})",
        asked.len(),
        during.len(),
        ended - began
    );
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed ({during_failed} of {} during the reload), e.g. {:?}",
        failed.len(),
        asked.len(),
        during.len(),
        failed.first()
    );
    assert!(
        during.len() >= MIN_DURING_RELOAD,
        "{what}: only {} of {} requests started during the reload ({:?}); it was not under load",
        during.len(),
        asked.len(),
        ended - began
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_no_connection() {
    let fleet = Fleet::start(&["web-1"]).await;
    let port = free_port();
    let script = fixture("cluster_server.js");
    for (name, n) in [("one", "1"), ("two", "2")] {
        let port = if name == "one" { port } else { free_port() };
        let env = format!("PORT={port}");
        let (ok, _, err) = fleet
            .cli(&[
                "start",
                script.to_str().unwrap(),
                "--name",
                name,
                "-i",
                n,
                "--env",
                &env,
                "--wait-ready",
            ])
            .await;
        assert!(ok, "{err}");
        // A client asks in a loop while the app reloads; every request must be answered.
        reload_under_load(&fleet, port, name, name).await;
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_the_new_worker_before_it_stops_the_old_one() {
    let fleet = Fleet::start(&["web-1"]).await;
    let client = fleet.nats.client().await;
    let port = free_port();
    let env = format!("PORT={port}");
    let script = fixture("cluster_server.js");
    let (ok, _, err) = fleet
        .cli(&[
            "start",
            script.to_str().unwrap(),
            "--name",
            "solo",
            "--env",
            &env,
            "--wait-ready",
        ])
        .await;
    assert!(ok, "{err}");
    let old = fleet.ls().await[0]["pid"].as_u64().unwrap();
    let mut seen = Watch::new(&client, "pm.default.solo.>").await;
    let (ok, out, err) = fleet.cli(&["reload", "solo", "--json"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("\"reloaded\""), "{out}");
    // The new run is ready (listening) before the old one stops; the old run's exit is its own
    // event, with its own pid.
    let mut ready_new = false;
    let exit = seen
        .until("the old run's exit", |s| {
            if event_name(s) == Some("ready") && s.env.process.pid as u64 != old {
                ready_new = true;
            }
            let gone = event_name(s) == Some("exit") && s.env.process.pid as u64 == old;
            if gone {
                assert!(
                    ready_new,
                    "the old run stopped before the new one was ready"
                );
            }
            gone
        })
        .await;
    // Told to disconnect, it closed its server and exited.
    let e = exit.env.event.unwrap();
    assert!(stopped_gracefully(&e), "{e:?}");
    assert!(
        await_pid_exit(old as i32, WAIT).await,
        "the old run is gone"
    );
    let procs = fleet.ls().await;
    assert_eq!(procs.len(), 1);
    assert_ne!(procs[0]["pid"].as_u64().unwrap(), old);
    assert_eq!(procs[0]["restart_time"], 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_cluster_worker_replaces_the_old_one_once_it_listens() {
    let fleet = Fleet::start(&["web-1"]).await;
    let client = fleet.nats.client().await;
    let port = free_port();
    let env = format!("PORT={port}");
    let script = fixture("slow_listen.js");
    let mut logs = Watch::new(&client, "pm.default.slow.log:out").await;
    start_ok(
        &fleet,
        &script,
        "slow",
        &[
            "-i",
            "1",
            "--env",
            &env,
            "--env",
            "LISTEN_DELAY=2000",
            "--listen-timeout",
            "20s",
        ],
    )
    .await;
    // Serving before the reload: it says so once it listens.
    logs.until("the first run listening", |s| {
        s.env
            .data
            .as_ref()
            .and_then(|d| d.as_str())
            .is_some_and(|l| l.starts_with("listening "))
    })
    .await;
    let old = ask_tcp_http(port).await;
    let old_pid: i32 = old.lines().last().unwrap().trim().parse().unwrap();
    let reload = tokio::spawn({
        let url = fleet.nats.url();
        let home = fleet.cli_home.path().to_path_buf();
        async move { run_cli(&home, &["--nats-url", &url, "reload", "slow"]).await }
    });
    // The new run has started but does not listen yet: the old one must still be serving.
    logs.until("the new run starting", |s| {
        s.env
            .data
            .as_ref()
            .and_then(|d| d.as_str())
            .is_some_and(|l| l.starts_with("starting ") && l != format!("starting {old_pid}"))
    })
    .await;
    assert!(
        pid_alive(old_pid),
        "the old run was stopped before the new one listened"
    );
    // The old run still serves, and its log line carries its own pid, not the new run's.
    let answer = ask_tcp_http(port).await;
    assert!(answer.ends_with(&format!("{old_pid}\n")), "{answer}");
    let served = logs
        .until("the old run's line", |s| {
            s.env.data.as_ref().and_then(|d| d.as_str())
                == Some(format!("served {old_pid}").as_str())
        })
        .await;
    assert_eq!(
        served.env.process.pid as i32, old_pid,
        "the old run's line names the new run"
    );
    let (ok, _, err) = reload.await.unwrap();
    assert!(ok, "{err}");
    assert!(await_pid_exit(old_pid, WAIT).await);
    assert!(ask_tcp_http(port).await.contains("200 OK"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_lets_a_cluster_worker_finish_its_requests_as_nodes_primary_does() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = Fleet::start(&["web-1"]).await;
    let client = fleet.nats.client().await;
    let port = free_port();
    let env = format!("PORT={port}");
    let script = fixture("drain_server.js");
    let mut seen = Watch::new(&client, "pm.default.drain.>").await;
    start_ok(
        &fleet,
        &script,
        "drain",
        &["-i", "1", "--env", &env, "--kill-timeout", "10s"],
    )
    .await;
    // Serving: a plain request is answered (the worker listens).
    let pid: u32 = loop {
        match try_http(port).await {
            Ok(body) if body.contains("200 OK") => {
                break body.lines().last().unwrap().trim().parse().unwrap();
            }
            _ => {
                seen.until("the worker listening", |s| {
                    event_name(s) == Some("listening")
                })
                .await;
            }
        }
    };
    // A request in flight, answered only once the server has closed.
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    seen.until("the slow request arrived", |s| {
        log_line(s).is_some_and(|l| l.starts_with("slow request "))
    })
    .await;
    let (ok, _, err) = fleet.cli(&["stop", "drain"]).await;
    assert!(ok, "{err}");
    let mut answer = String::new();
    let read = tokio::time::timeout(WAIT, c.read_to_string(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(_))) && answer.contains(&format!("finished after close {pid}")),
        "the request in flight was lost: {read:?} {answer:?}"
    );
    let exit = seen
        .until("its exit", |s| event_name(s) == Some("exit"))
        .await;
    let e = exit.env.event.unwrap();
    assert!(stopped_gracefully(&e), "{e:?}");
    fleet.stop().await;
}

/// The Node binaries the cluster tests run on: the system `node`, then those named in
/// CLUSTER_TEST_NODES (':'-separated; scripts/test fetches Node 22 and 24 and sets it), else
/// any under ~/.cache/flotilla/nodes. Each with its `--version`.
fn node_binaries() -> Vec<(String, String)> {
    let mut paths = vec!["node".to_string()];
    match std::env::var("CLUSTER_TEST_NODES") {
        Ok(list) => paths.extend(list.split(':').filter(|p| !p.is_empty()).map(String::from)),
        Err(_) => {
            let dir = std::path::Path::new(&std::env::var("HOME").unwrap_or_default())
                .join(".cache/flotilla/nodes");
            let mut found: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("bin/node"))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect();
            found.sort();
            paths.extend(found);
        }
    }
    let mut out: Vec<(String, String)> = vec![];
    for p in paths {
        let mut version = std::process::Command::new(&p);
        version
            .arg("--version")
            .stdout(std::process::Stdio::piped());
        let v =
            output_within_blocking(version, WAIT).unwrap_or_else(|e| std::panic::resume_unwind(e));
        let v = String::from_utf8_lossy(&v.stdout).trim().to_string();
        if !out.iter().any(|(seen, _)| *seen == v) {
            out.push((v, p));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_works_on_every_node_major_here() {
    let fleet = Fleet::start(&["web-1"]).await;
    let script = fixture("cluster_server.js");
    let nodes = node_binaries();
    eprintln!(
        "cluster mode on Node {:?}",
        nodes.iter().map(|(v, _)| v).collect::<Vec<_>>()
    );
    for (version, node) in &nodes {
        let major = version.trim_start_matches('v').split('.').next().unwrap();
        let name = format!("web{major}");
        let port = free_port();
        let env = format!("PORT={port}");
        let (ok, _, err) = fleet
            .cli(&[
                "start",
                script.to_str().unwrap(),
                "--name",
                &name,
                "-i",
                "2",
                "--interpreter",
                node,
                "--env",
                &env,
                "--wait-ready",
                // A loaded CI host can starve a worker past pm2's 1.6 s; SIGKILL is not the point.
                "--kill-timeout",
                "10s",
            ])
            .await;
        assert!(ok, "Node {version}: {err}");
        // Both workers listen on the one port (each sent 'ready' from its listen callback), and
        // it is this Node that answers.
        let procs: Vec<Value> = fleet
            .ls()
            .await
            .into_iter()
            .filter(|p| p["name"] == name.as_str())
            .collect();
        assert_eq!(
            by_status(&procs, "online").len(),
            2,
            "Node {version}: {procs:?}"
        );
        for _ in 0..10 {
            let got = ask_tcp_http(port).await;
            let body = got.lines().last().unwrap_or_default();
            assert!(body.ends_with(version.as_str()), "Node {version}: {got}");
        }
        // Reload under load: nothing refused, nothing reset.
        reload_under_load(&fleet, port, &name, &format!("Node {version}")).await;
        // Stopped the way Node's primary stops them: they close their servers and exit 0.
        let client = fleet.nats.client().await;
        let mut events = Watch::new(&client, &format!("pm.default.{name}.process:event")).await;
        // The runs being stopped (an old run of the reload may still be finishing beside them).
        let running: std::collections::BTreeSet<u64> = fleet
            .ls()
            .await
            .iter()
            .filter(|p| p["name"] == name.as_str())
            .map(|p| p["pid"].as_u64().unwrap())
            .collect();
        let (ok, _, err) = fleet.cli(&["stop", &name]).await;
        assert!(ok, "Node {version}: {err}");
        let mut exits = vec![];
        events
            .until("both exits", |s| {
                if event_name(s) == Some("exit") && running.contains(&(s.env.process.pid as u64)) {
                    exits.push((s.env.process.pid, s.env.event.clone().unwrap()));
                }
                exits.len() == 2
            })
            .await;
        assert!(
            exits.iter().all(|(_, e)| stopped_gracefully(e)),
            "Node {version}: {exits:?}"
        );
        let (ok, _, err) = fleet.cli(&["delete", &name]).await;
        assert!(ok, "Node {version}: {err}");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_run_never_says_ready_goes_on_after_listen_timeout() {
    let fleet = Fleet::start(&["web-1"]).await;
    let client = fleet.nats.client().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("no-ready");
    let script = fixture("ready_once.js");
    start_ok(
        &fleet,
        &script,
        "late",
        &[
            "-i",
            "1",
            "--env",
            &format!("PORT={port}"),
            "--env",
            &format!("NO_READY={}", marker.display()),
            "--wait-ready",
            "--listen-timeout",
            "500ms",
        ],
    )
    .await;
    let old = fleet.ls().await[0]["pid"].as_u64().unwrap();
    // From now on a new run never sends 'ready'.
    std::fs::write(&marker, "").unwrap();
    let mut events = Watch::new(&client, "pm.default.late.process:event").await;
    let (ok, out, err) = fleet.cli(&["reload", "late", "--json"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("\"reloaded\""), "{out}");
    // pm2's behaviour: online anyway after listen_timeout, with the reason; then the old run goes.
    let online = events
        .until("the new run online", |s| {
            event_name(s) == Some("online") && s.env.process.pid as u64 != old
        })
        .await;
    let reason = online.env.event.unwrap().reason.unwrap_or_default();
    assert!(reason.contains("listen_timeout (500 ms)"), "{reason}");
    assert!(
        await_pid_exit(old as i32, WAIT).await,
        "the old run is gone"
    );
    assert!(ask_tcp_http(port).await.contains("200 OK"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verb_piped_into_a_closed_pipe_ends_quietly() {
    let fleet = Fleet::start(&["web-1"]).await;
    let script = fixture("chatty.js");
    let (ok, _, err) = fleet
        .cli(&["start", script.to_str().unwrap(), "--name", "piped"])
        .await;
    assert!(ok, "{err}");
    // `flotilla ls | head -0`: the reading end is gone before anything is written.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
    for k in flotilla_vars() {
        cmd.env_remove(k);
    }
    cmd.env("FLOTILLA_HOME", fleet.cli_home.path())
        .args(["--nats-url", &fleet.nats.url(), "ls"])
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped());
    let out = output_within(cmd, Duration::from_secs(120)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{stderr}");
    fleet.stop().await;
}
