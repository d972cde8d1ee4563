//! `flotilla start`'s flags as what it asks for: the pure mapping from [`StartArgs`] to the
//! [`AppSpec`]s and placement of a [`StartPlan`]. What the mapping needs from the machine (the
//! directory the CLI runs in, the CPU count, how paths resolve) comes in a [`Here`], so every
//! decision is unit-tested below.

use crate::cli::{StartArgs, ecosystem};
use crate::protocol::api::ApiStartRequest;
use crate::protocol::error::ControlError;
use crate::protocol::listen::ListenAddr;
use crate::protocol::schedule::{CronRestart, Watch};
use crate::protocol::{AppSpec, names};
use anyhow::{Context, anyhow, bail};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// What the mapping needs from the machine, handed in so it stays pure.
#[derive(Debug, Clone)]
pub struct Here {
    /// The directory the CLI runs in: a relative script or `--cwd` starts from it.
    pub dir: PathBuf,
    /// CPUs here, for `-i max`, `-i 0` and `-i -N`.
    pub cpus: u32,
    /// Makes a path absolute and real, failing when it does not exist (`fs::canonicalize`).
    pub canonical: fn(&Path) -> io::Result<PathBuf>,
}

impl Here {
    /// This machine: the current directory, its CPUs and its file system.
    pub fn detect() -> anyhow::Result<Here> {
        Ok(Here {
            dir: std::env::current_dir().context("cannot read the current directory")?,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            canonical: |p| std::fs::canonicalize(p),
        })
    }

    /// Where the script argument points (not resolved: it may name an app instead).
    pub fn script_path(&self, a: &StartArgs) -> PathBuf {
        self.dir.join(&a.script)
    }
}

/// Checks the flags every `start` refuses when malformed, whatever it starts (a script, an
/// ecosystem file or a stopped app): `--listen` and `--cron-restart`.
pub fn check_flags(a: &StartArgs) -> anyhow::Result<()> {
    for l in &a.listen {
        ListenAddr::parse(l).map_err(|e| anyhow!("{}", e.message))?;
    }
    if let Some(c) = &a.cron_restart {
        CronRestart::parse(c).map_err(|e| anyhow!("--cron-restart: {}", e.message))?;
    }
    Ok(())
}

/// What the `--env` flags say: `K=V` variables, and at most one `NAME`, which selects an
/// ecosystem file's `env_NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvFlags {
    /// The variables, in the order given (a later one wins).
    pub vars: Vec<(String, String)>,
    /// The ecosystem profile.
    pub profile: Option<String>,
}

impl EnvFlags {
    /// Sorts `--env` values into variables and a profile.
    pub fn parse(env: &[String]) -> anyhow::Result<EnvFlags> {
        let mut out = EnvFlags::default();
        for e in env {
            match e.split_once('=') {
                Some(("", _)) => {
                    bail!("--env {e}: the variable needs a name (--env NAME=value)")
                }
                Some((k, v)) => out.vars.push((k.to_string(), v.to_string())),
                None => match &out.profile {
                    Some(first) => {
                        bail!("--env {first} and --env {e}: choose one env_<profile>")
                    }
                    None => out.profile = Some(e.clone()),
                },
            }
        }
        Ok(out)
    }

    /// The variables, for a script (which has no profiles to select).
    pub fn for_script(&self) -> anyhow::Result<&[(String, String)]> {
        if let Some(p) = &self.profile {
            bail!(
                "--env {p} selects env_{p} of an ecosystem file; to set a variable write --env {p}=value"
            );
        }
        Ok(&self.vars)
    }
}

/// `--label K=V` (repeatable) as a map.
pub fn labels(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    crate::config::parse_labels(&flags.join(","))
        .map_err(|e| anyhow!("--label: {e} (write --label zone=eu)"))
}

/// Is `p` an ecosystem file (by its name)?
pub fn is_ecosystem(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    [
        ".toml",
        ".yaml",
        ".yml",
        ".json",
        ".config.js",
        ".config.cjs",
        ".config.mjs",
    ]
    .iter()
    .any(|e| name.ends_with(e))
}

/// The app `flotilla start <script> [flags]` describes. The script resolves from `here.dir`
/// (kept as given when it cannot be resolved); `--cwd` too (an error when it does not exist),
/// and defaults to the script's folder.
pub fn script_spec(
    a: &StartArgs,
    vars: &[(String, String)],
    here: &Here,
) -> anyhow::Result<AppSpec> {
    let path = here.script_path(a);
    let script = (here.canonical)(&path).unwrap_or(path);
    let name = match &a.name {
        Some(n) => n.clone(),
        None => script
            .file_stem()
            .and_then(|s| s.to_str())
            .map(names::sanitise_host_id)
            .unwrap_or_else(|| "app".into()),
    };
    let mut spec = AppSpec::new(&name, &script);
    if let Some(i) = &a.instances {
        spec.instances = Some(ecosystem::parse_instances(i, here.cpus).ok_or_else(|| {
            anyhow!("-i {i}: write a number, max (one per CPU), 0 (the same) or -N (CPUs minus N)")
        })?);
    }
    if let Some(ns) = &a.namespace {
        spec.namespace = ns.clone();
    }
    spec.cwd = match &a.cwd {
        Some(d) => Some(
            (here.canonical)(&here.dir.join(d))
                .map_err(|e| anyhow!("--cwd {}: {e}", d.display()))?,
        ),
        None => script.parent().map(Path::to_path_buf),
    };
    spec.interpreter = a.interpreter.clone();
    spec.args = a.args.clone();
    spec.wait_ready = a.wait_ready;
    spec.autorestart = !a.no_autorestart;
    if let Some(m) = &a.max_memory_restart {
        spec.max_memory_restart = Some(ecosystem::parse_bytes(m).ok_or_else(|| {
            anyhow!("--max-memory-restart {m}: write a size such as 200M, 1G or 512K")
        })?);
    }
    if let Some(n) = a.max_restarts {
        spec.max_restarts = n;
    }
    if let Some(d) = a.min_uptime {
        spec.min_uptime = d;
    }
    if let Some(d) = a.restart_delay {
        spec.restart_delay = d;
    }
    spec.exp_backoff_restart_delay = a.exp_backoff_restart_delay;
    if let Some(d) = a.kill_timeout {
        spec.kill_timeout = d;
    }
    if let Some(d) = a.listen_timeout {
        spec.listen_timeout = d;
    }
    spec.shutdown_with_message = a.shutdown_with_message;
    spec.cron_restart = a.cron_restart.clone();
    spec.listen = a.listen.clone();
    if a.watch {
        spec.watch = Watch::Cwd;
    }
    spec.ignore_watch = a.ignore_watch.clone();
    spec.env.extend(vars.iter().cloned());
    Ok(spec)
}

/// The apps of an ecosystem file, with the `--env K=V` variables added to each.
pub fn ecosystem_specs(mut apps: Vec<AppSpec>, vars: &[(String, String)]) -> Vec<AppSpec> {
    for spec in &mut apps {
        spec.env.extend(vars.iter().cloned());
    }
    apps
}

/// What one `start` asks the controller: the apps, and where they may run.
#[derive(Debug, Clone)]
pub struct StartPlan {
    /// The apps, each started with one request.
    pub apps: Vec<AppSpec>,
    /// `--host`: only these hosts; empty means any live host.
    pub hosts: Vec<String>,
    /// `--label`: only hosts with these labels.
    pub labels: BTreeMap<String, String>,
    /// Apply the specs to apps that already run: `-f`, and always for an ecosystem file (pm2).
    pub force: bool,
}

impl StartPlan {
    /// The plan for `apps`, with the placement flags of `a`.
    pub fn new(
        a: &StartArgs,
        apps: Vec<AppSpec>,
        labels: BTreeMap<String, String>,
        from_ecosystem: bool,
    ) -> StartPlan {
        StartPlan {
            apps,
            hosts: a.hosts.clone(),
            labels,
            force: a.force || from_ecosystem,
        }
    }

    /// Refuses what the controller would refuse (names, instance counts, kill signals, cron
    /// patterns, listen addresses), in its words, before anything is asked.
    pub fn validate(&self) -> Result<(), ControlError> {
        self.apps.iter().try_for_each(AppSpec::validate)
    }

    /// The request that starts `app`.
    pub fn request(&self, app: AppSpec) -> ApiStartRequest {
        ApiStartRequest {
            request_id: Uuid::new_v4(),
            app,
            hosts: self.hosts.clone(),
            labels: self.labels.clone(),
            force: self.force,
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn labels_and_hosts_place_the_apps() {
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
        assert_eq!(r.hosts, ["web-1"]);
        assert_eq!(r.labels, l);
        assert!(!r.force);
        assert_ne!(r.request_id, plan.request(plan.apps[0].clone()).request_id);
    }

    #[test]
    fn force_comes_from_the_flag_or_an_ecosystem_file() {
        let mut a = args("api.js");
        assert!(!StartPlan::new(&a, vec![], BTreeMap::new(), false).force);
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
        for f in [
            "eco.toml",
            "a.yaml",
            "a.yml",
            "a.json",
            "ecosystem.config.js",
            "x.config.cjs",
            "x.config.mjs",
        ] {
            assert!(is_ecosystem(Path::new(f)), "{f}");
        }
        for f in ["app.js", "server.mjs", "toml", "run.py", ""] {
            assert!(!is_ecosystem(Path::new(f)), "{f}");
        }
    }
}
