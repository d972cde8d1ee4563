//! `flotilla start`: a script, an ecosystem file, or (as in pm2) the name or id of a stopped
//! app. The flags become a [`StartPlan`] ([`super::spec`]), checked before anything is asked;
//! each app is then asked for in turn and waited for until online ([`super::online`]).

use super::online::{self, OnlineWait, START_WITHIN};
use super::spec::{self, EnvFlags, Here, StartPlan};
use super::targeted::SETTLE_WITHIN;
use super::{conclude, ls_all, plural, print_json};
use crate::cli::client::Client;
use crate::cli::progress::Line;
use crate::cli::style::{self, OutputStyle};
use crate::cli::{StartArgs, ecosystem};
use crate::config::Settings;
use crate::protocol::api::ApiRequest;
use crate::protocol::control::TargetRequest;
use crate::protocol::envelope::now_ms;
use crate::protocol::error::ErrorKind;
use crate::protocol::reply::ProcessInfo;
use crate::protocol::{AppKey, Target, TargetVerb};
use anyhow::bail;
use std::collections::BTreeSet;
use std::path::Path;

/// `flotilla start`
pub async fn start(settings: &Settings, a: &StartArgs) -> anyhow::Result<()> {
    spec::check_flags(a)?;
    let here = Here::detect()?;
    let env = EnvFlags::parse(&a.env)?;
    let labels = spec::labels(&a.labels)?;
    let path = here.script_path(a);
    let from_ecosystem = spec::is_ecosystem(Path::new(&a.script));
    let apps = if from_ecosystem {
        let eco = ecosystem::load(&path, env.profile.as_deref(), here.cpus)?;
        for w in &eco.warnings {
            eprintln!("warning: {w}");
        }
        spec::ecosystem_specs(eco.apps, &env.vars)
    } else {
        let vars = env.for_script()?;
        if !path.exists() {
            return start_again(settings, a, &here).await;
        }
        vec![spec::script_spec(a, vars, &here)?]
    };
    let plan = StartPlan::new(a, apps, labels, from_ecosystem);
    if let Err(mut e) = plan.validate() {
        if from_ecosystem {
            // Which file, and (in the message) which app.
            e.message = format!("{}: {}", a.script, e.message);
        }
        return Err(e.into());
    }
    let client = Client::connect(settings).await?;
    if client.local {
        for spec in &plan.apps {
            if !spec.script.exists() {
                bail!(
                    "the script {} of app '{}' does not exist",
                    spec.script.display(),
                    spec.name
                );
            }
        }
    }
    let mut progress = Line::new();
    let mut all_ids: BTreeSet<u32> = BTreeSet::new();
    let mut failures = vec![];
    for spec in &plan.apps {
        let app = AppKey::new(&spec.namespace, &spec.name)?;
        let n = spec.instances.unwrap_or(1);
        progress.say(&format!("starting {app} ({n} instance{})", plural(n)));
        // Subscribed before asking: every `online` is seen.
        let mut events = client.watch(client.subjects.process_event(&app)).await?;
        let reply = client.api(plan.request(spec.clone()), START_WITHIN).await?;
        let mut wait = OnlineWait::started(&app.to_string(), &reply);
        if let Err(e) = online::wait_on(&mut events, &mut wait, &mut progress).await {
            failures.push(e.to_string());
        }
        all_ids.extend(wait.ids());
    }
    progress.done();
    let ls = ls_all(&client).await?;
    if a.json {
        let mine: Vec<&ProcessInfo> = ls
            .processes
            .iter()
            .filter(|p| all_ids.contains(&p.meta.pm_id))
            .collect();
        print_json(&mine)?;
    } else {
        print!(
            "{}",
            style::process_table(&ls.processes, &OutputStyle::detect(), now_ms())
        );
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// pm2's `start <name|id>`: the argument is no file, so it may name an app to start again
/// (restarted, then waited for as a new one is). Refused as a missing file when nothing matches.
async fn start_again(settings: &Settings, a: &StartArgs, here: &Here) -> anyhow::Result<()> {
    if let Ok(t) = Target::parse(&a.script) {
        let client = Client::connect(settings).await?;
        // Subscribed before asking: every `online` is seen.
        let mut events = client.watch(client.all_process_events()).await?;
        let req = ApiRequest::Targeted(TargetVerb::Restart, TargetRequest::new(t.clone()));
        match client.api(req, SETTLE_WITHIN).await {
            Ok(reply) => {
                let mut progress = Line::new();
                let mut wait = OnlineWait::restarted(&t.to_string(), &reply);
                let waited = online::wait_on(&mut events, &mut wait, &mut progress).await;
                return conclude(&client, "start", reply, a.json, &mut progress, waited).await;
            }
            Err(e) if e.refused() == Some(ErrorKind::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    bail!(
        "{} does not exist (from {}): give the path of a script, an ecosystem file, or the name of an app",
        a.script,
        here.dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusError;
    use crate::protocol::ControlError;

    /// Settings for a NATS nobody runs: a start that gets as far as connecting fails there.
    fn nowhere() -> Settings {
        let mut s = Settings::default();
        s.nats.url = Some("nats://127.0.0.1:1".into());
        s
    }

    async fn start_err(a: StartArgs) -> anyhow::Error {
        start(&nowhere(), &a).await.unwrap_err()
    }

    fn refusal(e: &anyhow::Error) -> Option<ErrorKind> {
        e.downcast_ref::<ControlError>().map(|c| c.kind)
    }

    #[tokio::test]
    async fn what_the_controller_would_refuse_fails_before_any_connection() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("app.js");
        std::fs::write(&script, "").unwrap();
        let args = |f: fn(&mut StartArgs)| {
            let mut a = StartArgs {
                script: script.display().to_string(),
                ..Default::default()
            };
            f(&mut a);
            a
        };
        let e = start_err(args(|a| a.instances = Some("99999".into()))).await;
        assert_eq!(refusal(&e), Some(ErrorKind::InvalidValue), "{e}");
        let e = start_err(args(|a| a.namespace = Some("a b".into()))).await;
        assert_eq!(refusal(&e), Some(ErrorKind::InvalidName), "{e}");
        // An ecosystem file is checked whole: its first app does not start when the second is bad.
        let eco = dir.path().join("ecosystem.json");
        let apps = r#"{"apps": [{"name": "a", "script": "app.js"},
            {"name": "b", "script": "app.js", "kill_signal": "SIGNOPE"}]}"#;
        std::fs::write(&eco, apps).unwrap();
        let e = start_err(StartArgs {
            script: eco.display().to_string(),
            ..Default::default()
        })
        .await;
        assert_eq!(refusal(&e), Some(ErrorKind::InvalidValue), "{e}");
        // Valid input does get as far as connecting.
        let e = start_err(args(|a| a.instances = Some("2".into()))).await;
        assert!(
            matches!(
                e.downcast_ref::<BusError>(),
                Some(BusError::Unreachable { .. })
            ),
            "{e}"
        );
    }
}
