//! The flag mapping's tests: every `start` flag, on a made-up machine.

use super::*;
use crate::protocol::app::MAX_INSTANCES;
use crate::protocol::error::ErrorKind;
use std::time::Duration;

/// A file system where `/srv/link.js` is a link to `/opt/real/app.js`, and nothing whose
/// path mentions `missing` exists.
fn fake_canonical(p: &Path) -> io::Result<PathBuf> {
    if p.to_string_lossy().contains("missing") {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
    }
    if p == Path::new("/srv/link.js") {
        return Ok(PathBuf::from("/opt/real/app.js"));
    }
    Ok(p.to_path_buf())
}

fn here() -> Here {
    Here {
        dir: PathBuf::from("/srv"),
        cpus: 4,
        canonical: fake_canonical,
    }
}

fn args(script: &str) -> StartArgs {
    StartArgs {
        script: script.into(),
        ..Default::default()
    }
}

fn spec(a: &StartArgs) -> AppSpec {
    script_spec(a, &[], &here()).unwrap()
}

fn err(a: &StartArgs) -> String {
    script_spec(a, &[], &here()).unwrap_err().to_string()
}

#[test]
fn a_bare_script_gets_pm2_defaults_named_after_it() {
    let mut expected = AppSpec::new("api", "/srv/api.js");
    expected.cwd = Some(PathBuf::from("/srv"));
    assert_eq!(spec(&args("api.js")), expected);
}

#[test]
fn names_come_from_the_script_unless_given() {
    assert_eq!(spec(&args("worker.server.js")).name, "worker-server");
    assert_eq!(spec(&args("/usr/bin/my app")).name, "my-app");
    assert_eq!(spec(&args("/")).name, "app");
    let mut a = args("api.js");
    a.name = Some("web".into());
    assert_eq!(spec(&a).name, "web");
    a.namespace = Some("prod".into());
    assert_eq!(spec(&a).namespace, "prod");
}

#[test]
fn the_script_and_cwd_resolve_from_here() {
    // A link resolves; the default cwd is the real script's folder.
    let s = spec(&args("link.js"));
    assert_eq!(s.script, PathBuf::from("/opt/real/app.js"));
    assert_eq!(s.cwd, Some(PathBuf::from("/opt/real")));
    // A script that cannot be resolved is kept as joined (the agent says it is missing).
    assert_eq!(
        spec(&args("missing.js")).script,
        PathBuf::from("/srv/missing.js")
    );
    let mut a = args("/elsewhere/app.js");
    a.cwd = Some("data".into());
    let s = spec(&a);
    assert_eq!(s.script, PathBuf::from("/elsewhere/app.js"));
    assert_eq!(s.cwd, Some(PathBuf::from("/srv/data")));
    a.cwd = Some("/var/lib/app".into());
    assert_eq!(spec(&a).cwd, Some(PathBuf::from("/var/lib/app")));
    a.cwd = Some("missing-dir".into());
    assert_eq!(err(&a), "--cwd missing-dir: no such directory");
}

#[test]
fn instances_follow_pm2() {
    let with = |i: &str| {
        let mut a = args("api.js");
        a.instances = Some(i.into());
        script_spec(&a, &[], &here()).map(|s| s.instances)
    };
    assert_eq!(spec(&args("api.js")).instances, None);
    assert_eq!(with("3").unwrap(), Some(3));
    assert_eq!(with("max").unwrap(), Some(4));
    assert_eq!(with("0").unwrap(), Some(4));
    assert_eq!(with("-1").unwrap(), Some(3));
    assert_eq!(with("-9").unwrap(), Some(1));
    let e = with("two").unwrap_err().to_string();
    assert!(e.starts_with("-i two: write a number"), "{e}");
}

#[test]
fn durations_and_restart_flags_override_the_defaults() {
    let mut a = args("api.js");
    a.min_uptime = Some(Duration::from_secs(5));
    a.restart_delay = Some(Duration::from_millis(250));
    a.exp_backoff_restart_delay = Some(Duration::from_millis(100));
    a.kill_timeout = Some(Duration::from_secs(10));
    a.listen_timeout = Some(Duration::from_secs(8));
    a.max_restarts = Some(3);
    a.no_autorestart = true;
    a.max_memory_restart = Some("200M".into());
    let s = spec(&a);
    assert_eq!(s.min_uptime, Duration::from_secs(5));
    assert_eq!(s.restart_delay, Duration::from_millis(250));
    assert_eq!(
        s.exp_backoff_restart_delay,
        Some(Duration::from_millis(100))
    );
    assert_eq!(s.kill_timeout, Duration::from_secs(10));
    assert_eq!(s.listen_timeout, Duration::from_secs(8));
    assert_eq!(s.max_restarts, 3);
    assert!(!s.autorestart);
    assert_eq!(s.max_memory_restart, Some(200 * 1024 * 1024));
    a.max_memory_restart = Some("lots".into());
    assert!(err(&a).starts_with("--max-memory-restart lots: write a size"));
}

#[test]
fn run_flags_are_copied() {
    let mut a = args("app.py");
    a.interpreter = Some("python3".into());
    a.args = vec!["--port".into(), "80".into()];
    a.wait_ready = true;
    a.shutdown_with_message = true;
    a.listen = vec!["tcp://:8080".into()];
    a.cron_restart = Some("0 3 * * *".into());
    let s = spec(&a);
    assert_eq!(s.interpreter.as_deref(), Some("python3"));
    assert_eq!(s.args, ["--port", "80"]);
    assert!(s.wait_ready && s.shutdown_with_message);
    assert_eq!(s.listen, ["tcp://:8080"]);
    assert_eq!(s.cron_restart.as_deref(), Some("0 3 * * *"));
    assert!(s.watch.is_off());
}

#[test]
fn watch_watches_the_working_directory() {
    let mut a = args("api.js");
    a.watch = true;
    a.ignore_watch = vec!["*.log".into()];
    let s = spec(&a);
    assert_eq!(s.watch, Watch::Cwd);
    assert_eq!(s.ignore_watch, ["*.log"]);
}

#[test]
fn env_flags_are_variables_or_one_profile() {
    let e = |v: &[&str]| EnvFlags::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let f = e(&["A=1", "prod", "B=x=y", "C="]).unwrap();
    assert_eq!(f.profile.as_deref(), Some("prod"));
    let vars = [("A", "1"), ("B", "x=y"), ("C", "")].map(|(k, v)| (k.into(), v.into()));
    assert_eq!(f.vars, vars);
    assert_eq!(
        e(&["prod", "dev"]).unwrap_err().to_string(),
        "--env prod and --env dev: choose one env_<profile>"
    );
    assert!(
        e(&["=1"])
            .unwrap_err()
            .to_string()
            .contains("the variable needs a name")
    );
    // A script has no profiles; its variables go into the spec, a later one winning.
    let msg = f.for_script().unwrap_err().to_string();
    assert!(msg.starts_with("--env prod selects env_prod of an ecosystem file"));
    let f = e(&["A=1", "A=2", "B=3"]).unwrap();
    let s = script_spec(&args("api.js"), f.for_script().unwrap(), &here()).unwrap();
    assert_eq!(s.env.get("A").map(String::as_str), Some("2"));
    assert_eq!(s.env.len(), 2);
    let apps = ecosystem_specs(vec![AppSpec::new("a", "/a.js")], &f.vars);
    assert_eq!(apps[0].env.get("B").map(String::as_str), Some("3"));
}

#[test]
fn malformed_listen_and_cron_flags_are_refused() {
    let mut a = args("api");
    a.listen = vec!["tcp://127.0.0.1".into()];
    assert!(
        check_flags(&a)
            .unwrap_err()
            .to_string()
            .contains("tcp://HOST:PORT")
    );
    let mut a = args("api");
    a.cron_restart = Some("every day".into());
    let e = check_flags(&a).unwrap_err().to_string();
    assert!(e.starts_with("--cron-restart: cron_restart 'every day' is not a cron pattern"));
    a.cron_restart = Some("0 3 * * *".into());
    a.listen = vec!["tcp://:80".into(), "unix:///run/a.sock".into()];
    check_flags(&a).unwrap();
}

#[test]
fn hosts_labels_and_force_place_the_apps() {
    let l = labels(&["zone=eu".into(), "disk=ssd".into()]).unwrap();
    assert_eq!(l.get("zone").map(String::as_str), Some("eu"));
    assert!(
        labels(&["zone".into()])
            .unwrap_err()
            .to_string()
            .starts_with("--label: ")
    );
    let mut a = args("api.js");
    a.hosts = vec!["web-1".into()];
    let plan = StartPlan::new(&a, vec![spec(&a)], l.clone(), false);
    let r = plan.request(plan.apps[0].clone());
    assert_eq!((r.hosts, r.labels, r.force), (a.hosts.clone(), l, false));
    // An ecosystem file applies its changes to running apps; -f does for a script.
    assert!(StartPlan::new(&a, vec![], BTreeMap::new(), true).force);
    a.force = true;
    assert!(StartPlan::new(&a, vec![], BTreeMap::new(), false).force);
}

#[test]
fn the_plan_is_refused_as_the_controller_would() {
    let plan = |s: AppSpec| StartPlan::new(&args("x"), vec![s], BTreeMap::new(), false);
    plan(spec(&args("api.js"))).validate().unwrap();
    let mut a = args("api.js");
    a.name = Some("a.b".into());
    let e = plan(spec(&a)).validate().unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidName);
    assert!(e.message.contains("'.'"), "{e}");
    a.name = None;
    a.instances = Some((MAX_INSTANCES + 1).to_string());
    let s = spec(&a);
    assert_eq!(
        plan(s.clone()).validate().unwrap_err(),
        s.validate().unwrap_err()
    );
}

#[test]
fn ecosystem_files_are_known_by_their_names() {
    let eco = [
        "e.toml",
        "a.yaml",
        "a.yml",
        "a.json",
        "ecosystem.config.js",
        "x.config.cjs",
    ];
    for f in eco.into_iter().chain(["x.config.mjs"]) {
        assert!(is_ecosystem(Path::new(f)), "{f}");
    }
    for f in ["app.js", "server.mjs", "toml", "run.py", ""] {
        assert!(!is_ecosystem(Path::new(f)), "{f}");
    }
}
