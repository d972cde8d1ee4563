//! The command line: `flotilla <verb>`. The pm2-style verbs arrive with the controller; this
//! module has the roles and `events`.

use crate::config::{Settings, Sources};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// pm2 for fleets, on NATS.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
pub struct Cli {
    /// Settings file (default: $FLOTILLA_HOME/flotilla.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NATS server URL (nats.url).
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
    /// Run the node agent: supervise this host's workers and relay them to NATS.
    Agent(AgentArgs),
    /// Run a controller: desired state in KV, placement, the API on pmctl.api.* (in progress).
    Controller,
    /// Print every event on the bus (pm.> by default), one JSON envelope per line.
    Events(EventsArgs),
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

/// `flotilla ctl`
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The agent's host id.
    pub host: String,
    /// start, stop, restart, delete, send, signal or list.
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
pub mod ctl;
pub mod ecosystem;
pub mod events;
