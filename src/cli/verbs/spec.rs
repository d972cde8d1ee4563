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
mod tests;
