//! The command line: `flotilla <verb>`, pm2's verbs over the controller's API, plus the roles
//! (`agent`, `controller`, `daemon`). With no NATS URL configured the verbs use the local stack
//! of `$FLOTILLA_HOME`, starting it when none runs (as `pm2` starts its daemon).

pub mod client;
pub mod ctl;
pub mod ecosystem;
pub mod events;
pub mod progress;
pub mod style;
pub mod verbs;

use crate::config::{Settings, Sources};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// pm2 for fleets, on NATS.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
pub struct Cli {
    /// Settings file (default: $FLOTILLA_HOME/flotilla.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NATS server URL (nats.url); unset: the local stack of $FLOTILLA_HOME.
    #[arg(long, global = true, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Home directory (home).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start an app: a script, an ecosystem file (TOML, YAML, JSON, ecosystem.config.js), or
    /// the name or id of a stopped app.
    Start(Box<StartArgs>),
    /// Stop processes (kept in the list; `restart` starts them again).
    Stop(TargetArgs),
    /// Restart processes (all at once).
    Restart(TargetArgs),
    /// Rolling restart: one instance at a time, the next once the new one is online (ready).
    Reload(ReloadArgs),
    /// Stop and remove processes.
    #[command(visible_alias = "del")]
    Delete(TargetArgs),
    /// Set an app's number of instances across the fleet (`N`, `+N` or `-N`).
    Scale(ScaleArgs),
    /// List every process of the fleet.
    #[command(visible_aliases = ["list", "l", "ps", "status"])]
    Ls(ReadArgs),
    /// Everything about the processes of a target.
    #[command(visible_aliases = ["desc", "show"])]
    Describe(DescribeArgs),
    /// Recent log lines of a target (from the agents' log files), then, with --follow, live ones.
    Logs(LogsArgs),
    /// Print every event on the bus (pm.> by default), one JSON envelope per line.
    Events(EventsArgs),
    /// Deliver a JSON value to each targeted worker's process.on('message').
    Send(SendArgs),
    /// Send a signal to each targeted worker (pm2 sendSignal).
    #[command(visible_alias = "sendSignal")]
    Signal(SignalArgs),
    /// Where this CLI points: NATS URL, home, version, controllers and agents answering.
    Info(ReadArgs),
    /// A live view of CPU, memory, restarts and status, refreshed every second.
    Monit(MonitArgs),
    /// Run the node agent: supervise this host's workers and relay them to NATS.
    Agent(AgentArgs),
    /// Run a controller: desired state in KV, placement, the API on pmctl.api.*.
    Controller,
    /// Send one raw control request to an agent (pmctl.agent.<host>.<verb>) and print the reply.
    Ctl(CtlArgs),
    /// Run the local stack in the foreground: nats-server, an agent and a controller (the CLI
    /// starts it in the background when no NATS URL is set).
    Daemon(DaemonArgs),
    /// Stop the local stack: its workers, the daemon and nats-server (desired state is kept).
    Kill,
}

/// `flotilla daemon`
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Descriptor to write one line to once the stack answers (for the CLI that starts it).
    #[arg(long, hide = true, value_name = "FD")]
    pub ready_fd: Option<i32>,
    /// Settings resolved by the CLI that starts the stack (JSON), used instead of the usual sources.
    #[arg(long, hide = true, value_name = "FILE")]
    pub settings_file: Option<PathBuf>,
}

/// `flotilla start`
#[derive(Debug, Args, Default)]
pub struct StartArgs {
    /// The script, an ecosystem file, or the name/id of a stopped app.
    pub script: String,
    /// App name (default: the script's name without extension).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// Instances: a number, `max` or 0 (one per CPU), or -N (CPUs minus N).
    #[arg(long, short = 'i', allow_hyphen_values = true, value_name = "N|max")]
    pub instances: Option<String>,
    /// Namespace (default `default`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Run only on this host (repeatable).
    #[arg(long = "host", value_name = "H")]
    pub hosts: Vec<String>,
    /// Run only on hosts with this label (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// `K=V` sets an environment variable; `NAME` selects the ecosystem file's `env_NAME`.
    #[arg(long = "env", value_name = "K=V|PROFILE")]
    pub env: Vec<String>,
    /// Working directory (default: the script's folder).
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Interpreter (`node`, `python3`, ..., `none` to exec the script itself).
    #[arg(long)]
    pub interpreter: Option<String>,
    /// Bind this address once and hand it to every instance (systemd LISTEN_FDS, fds from 3):
    /// tcp://HOST:PORT, tcp://:PORT or unix:///path (repeatable).
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Online only once the worker sends 'ready' (or listen_timeout passes).
    #[arg(long)]
    pub wait_ready: bool,
    /// Restart a worker whose memory exceeds this (200M, 1G).
    #[arg(long, value_name = "SIZE")]
    pub max_memory_restart: Option<String>,
    /// Do not restart workers that exit.
    #[arg(long)]
    pub no_autorestart: bool,
    /// Unstable restarts before `errored` (default 16).
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// A run shorter than this is unstable (default 1s).
    #[arg(long, value_parser = crate::protocol::duration::parse)]
    pub min_uptime: Option<Duration>,
    /// Delay before an automatic restart.
    #[arg(long, value_parser = crate::protocol::duration::parse)]
    pub restart_delay: Option<Duration>,
    /// Exponential backoff base for automatic restarts.
    #[arg(long, value_parser = crate::protocol::duration::parse)]
    pub exp_backoff_restart_delay: Option<Duration>,
    /// Grace between the stop signal and SIGKILL (default 1600ms).
    #[arg(long, value_parser = crate::protocol::duration::parse)]
    pub kill_timeout: Option<Duration>,
    /// With --wait-ready: how long to wait for 'ready' (default 3s); also how long a reload
    /// waits for a Node cluster worker to listen.
    #[arg(long, value_parser = crate::protocol::duration::parse)]
    pub listen_timeout: Option<Duration>,
    /// Stop by sending the 'shutdown' message instead of the kill signal (pm2's option).
    #[arg(long)]
    pub shutdown_with_message: bool,
    /// Restart on a cron schedule ('0 3 * * *'; 6 fields: seconds first).
    #[arg(long, value_name = "EXPR")]
    pub cron_restart: Option<String>,
    /// Restart when files in the working directory change (dot-files and node_modules aside).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: a glob of paths whose changes do not count (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub ignore_watch: Vec<String>,
    /// Apply these options to the app when it already runs (restarting it), as pm2 `-f`.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
    /// Arguments for the script.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// A target: name, `ns/name`, id or `all`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// `all`, a pm_id, an app name or `ns/name`.
    pub target: String,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla reload`
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// `all`, a pm_id, an app name or `ns/name`.
    pub target: String,
    /// Instances reloaded at a time (pm2 `--parallel`); never all of an app at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: u32,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla scale`
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The app: a name or `ns/name`.
    pub app: String,
    /// The new total (`4`), or a change (`+2`, `-1`).
    #[arg(allow_hyphen_values = true)]
    pub instances: String,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reads with `--json`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla describe`
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// `all`, a pm_id, an app name or `ns/name`.
    pub target: String,
    /// JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla logs`
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// `all` (default), a pm_id, an app name or `ns/name`.
    #[arg(default_value = "all")]
    pub target: String,
    /// Lines per log file.
    #[arg(long, default_value_t = 15)]
    pub lines: u32,
    /// Then print new lines as they come (the live log:out / log:err subjects) until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// JSON: the tails as one array (with --follow, then one envelope per line).
    #[arg(long)]
    pub json: bool,
}

/// `flotilla send`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// `all`, a pm_id, an app name or `ns/name`.
    pub target: String,
    /// The JSON value to deliver, e.g. '{"topic":"reload-config"}'.
    pub json_message: String,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla signal`
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// SIGUSR2, USR2, HUP, 12, ...
    pub signal: String,
    /// `all`, a pm_id, an app name or `ns/name`.
    pub target: String,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla monit`
#[derive(Debug, Args)]
pub struct MonitArgs {
    /// Refresh period.
    #[arg(long, default_value = "1s", value_parser = crate::protocol::duration::parse)]
    pub interval: Duration,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long, hide = true)]
    pub frames: Option<u64>,
    /// One JSON array of processes per refresh instead of the screen.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla ctl`
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The agent's host id.
    pub host: String,
    /// start, stop, restart, reload, delete, send, signal, list or logs.
    pub verb: String,
    /// The request body as JSON (a request_id is added when absent), e.g. '{"target":"api"}'.
    #[arg(default_value = "{}")]
    pub body: String,
    /// How long to wait for the reply.
    #[arg(long, default_value = "10s", value_parser = crate::protocol::duration::parse)]
    pub timeout: std::time::Duration,
}

/// `flotilla agent`
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This host's id (host_id; default: the hostname).
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Host labels, k=v (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
}

/// `flotilla events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Subject filter, e.g. 'pm.default.api.>' or 'pm.*.*.process:event' (default: pm.>).
    pub filter: Option<String>,
    /// Print the subject before each message.
    #[arg(long)]
    pub subjects: bool,
}

impl Cli {
    /// Settings from defaults, file, environment and these flags.
    pub fn settings(
        &self,
        extra: Vec<(String, String)>,
    ) -> Result<Settings, crate::config::ConfigError> {
        let mut flags = extra;
        if let Some(u) = &self.nats_url {
            flags.push(("nats.url".into(), u.clone()));
        }
        if let Some(h) = &self.home {
            flags.push(("home".into(), h.display().to_string()));
        }
        Settings::load(&Sources::from_process(self.config.clone(), flags))
    }
}
