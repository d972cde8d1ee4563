//! `flotilla`: the one binary (agent, controller, CLI).

use clap::Parser;
use flotilla::cli::{Cli, Command};
use flotilla::protocol::TargetVerb;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Roles log their work; client verbs only speak up about trouble.
    let quiet = !matches!(
        cli.command,
        Command::Agent(_) | Command::Controller | Command::Daemon(_)
    );
    init_tracing(if quiet { "warn" } else { "info" });
    if quiet {
        // A client verb piped into `head` ends quietly when the pipe closes, as Unix tools do,
        // instead of panicking on the write (Rust ignores SIGPIPE). The roles keep ignoring it:
        // a closed socket must never kill the agent.
        // SAFETY: setting a signal's disposition to the default, before any thread exists.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) applies; wait forever here.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use flotilla::cli::verbs;
    let settings = || cli.settings(vec![]);
    match &cli.command {
        Command::Agent(a) => {
            let mut extra = vec![];
            if let Some(h) = &a.host_id {
                extra.push(("host_id".into(), h.clone()));
            }
            if !a.labels.is_empty() {
                extra.push(("labels".into(), a.labels.join(",")));
            }
            let settings = cli.settings(extra)?;
            flotilla::agent::run(settings, shutdown_signal()).await?;
            Ok(())
        }
        Command::Controller => {
            flotilla::controller::run(settings()?, shutdown_signal()).await?;
            Ok(())
        }
        Command::Ctl(c) => {
            let reply = flotilla::cli::ctl::run(&settings()?, c).await?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
            if let Some(e) = reply.error {
                anyhow::bail!("{e}");
            }
            Ok(())
        }
        Command::Daemon(d) => {
            let settings = match &d.settings_file {
                Some(f) => flotilla::stack::load_settings_file(f)?,
                None => cli.settings(vec![])?,
            };
            flotilla::stack::daemon(settings, d.ready_fd, shutdown_signal()).await?;
            Ok(())
        }
        Command::Kill => {
            let settings = cli.settings(vec![])?;
            if let Some(url) = settings.nats.url {
                return Err(flotilla::stack::StackError::KillInFleet { url }.into());
            }
            let home = &settings.home;
            match flotilla::stack::kill(home, &mut |line| eprintln!("{line}")).await? {
                Some(info) => println!(
                    "stopped the local stack in {} (daemon pid {}{})",
                    flotilla::stack::pretty(home),
                    info.pid,
                    if info.nats_pid != 0 {
                        format!(", nats-server pid {}", info.nats_pid)
                    } else {
                        String::new()
                    }
                ),
                None => println!("no local stack runs in {}", flotilla::stack::pretty(home)),
            }
            Ok(())
        }
        Command::Events(e) => {
            let mut s = settings()?;
            let client = flotilla::cli::client::Client::connect(&s).await?;
            s.nats.url = Some(client.url.clone());
            flotilla::cli::events::run(&s, e, shutdown_signal()).await?;
            Ok(())
        }
        Command::Start(a) => verbs::start(&settings()?, a).await,
        Command::Stop(a) => verbs::targeted(&settings()?, TargetVerb::Stop, a).await,
        Command::Restart(a) => verbs::targeted(&settings()?, TargetVerb::Restart, a).await,
        Command::Reload(a) => verbs::reload(&settings()?, a).await,
        Command::Delete(a) => verbs::targeted(&settings()?, TargetVerb::Delete, a).await,
        Command::Scale(a) => verbs::scale(&settings()?, a).await,
        Command::Ls(a) => verbs::ls(&settings()?, a).await,
        Command::Describe(a) => verbs::describe(&settings()?, a).await,
        Command::Logs(a) => verbs::logs(&settings()?, a, shutdown_signal()).await,
        Command::Send(a) => verbs::send(&settings()?, a).await,
        Command::Signal(a) => verbs::signal(&settings()?, a).await,
        Command::Info(a) => verbs::info(&settings()?, a).await,
        Command::Monit(a) => verbs::monit(&settings()?, a, shutdown_signal()).await,
    }
}
