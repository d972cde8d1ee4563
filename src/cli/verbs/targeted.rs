//! The verbs on running processes: `stop`, `restart`, `reload` and `delete` a target, and `scale`
//! an app. A restart waits until what it restarted is online, as `start` does; a reload says how
//! many instances are back as it rolls.

use super::online::{self, OnlineWait, START_WITHIN};
use super::{conclude, plural, target};
use crate::cli::client::{ApiError, Client};
use crate::cli::progress::Line;
use crate::cli::{ReloadArgs, ScaleArgs, TargetArgs};
use crate::config::Settings;
use crate::protocol::api::{ApiRequest, ScaleRequest};
use crate::protocol::control::TargetRequest;
use crate::protocol::reply::Reply;
use crate::protocol::{Envelope, ProcessEvent, Target, TargetVerb};
use anyhow::bail;
use futures::StreamExt;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// How long stop, restart and delete may take (graceful stops included).
pub const SETTLE_WITHIN: Duration = Duration::from_secs(120);
/// How long a rolling reload may take.
const RELOAD_WITHIN: Duration = Duration::from_secs(900);

/// `flotilla stop|restart|delete`
pub async fn targeted(settings: &Settings, verb: TargetVerb, a: &TargetArgs) -> anyhow::Result<()> {
    run(settings, verb, &a.target, a.json, 1).await
}

/// `flotilla reload`: rolling, `--parallel` instances at a time.
pub async fn reload(settings: &Settings, a: &ReloadArgs) -> anyhow::Result<()> {
    run(settings, TargetVerb::Reload, &a.target, a.json, a.parallel).await
}

async fn run(
    settings: &Settings,
    verb: TargetVerb,
    target_arg: &str,
    json: bool,
    parallel: u32,
) -> anyhow::Result<()> {
    let t = target(target_arg)?;
    let client = Client::connect(settings).await?;
    let mut r = TargetRequest::new(t.clone());
    r.parallel = parallel.max(1);
    let req = ApiRequest::Targeted(verb, r);
    let mut progress = Line::new();
    progress.say(&format!("{verb} {t}"));
    let (reply, waited) = match verb {
        TargetVerb::Restart => {
            // Instances whose new run is still launching (a Node cluster worker booting, or
            // waiting for 'ready') are shown once online, as `start` does.
            let mut events = client.watch(client.all_process_events()).await?;
            let reply = client.api_reply(req, SETTLE_WITHIN).await?;
            let mut wait = OnlineWait::restarted(&t.to_string(), &reply);
            let waited = online::wait_on(&mut events, &mut wait, &mut progress).await;
            (reply, waited)
        }
        TargetVerb::Reload => {
            let mut events = client.watch(client.all_process_events()).await?;
            let call = client.api_reply(req, RELOAD_WITHIN);
            let reply = with_reload_progress(call, &mut events, &t, &mut progress).await?;
            (reply, Ok(()))
        }
        TargetVerb::Stop | TargetVerb::Delete => {
            (client.api_reply(req, SETTLE_WITHIN).await?, Ok(()))
        }
    };
    conclude(&client, verb.as_str(), reply, json, &mut progress, waited).await
}

/// Awaits `call` (a reload of `t`), saying on `progress` how many instances are back online.
async fn with_reload_progress(
    call: impl Future<Output = Result<Reply, ApiError>>,
    events: &mut async_nats::Subscriber,
    t: &Target,
    progress: &mut Line,
) -> Result<Reply, ApiError> {
    tokio::pin!(call);
    let mut back = 0;
    loop {
        tokio::select! {
            r = &mut call => return r,
            Some(m) = events.next() => {
                if let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload)
                    && back_online(t, &env)
                {
                    back += 1;
                    progress.say(&format!("reload {t}: {back} instance{} back online", plural(back)));
                }
            }
        }
    }
}

/// True when `env` says an instance of `t` is online.
fn back_online(t: &Target, env: &Envelope) -> bool {
    t.matches(&env.process)
        && env
            .event
            .as_ref()
            .is_some_and(|e| e.event == ProcessEvent::Online)
}

/// `scale`'s count: a new total (`4`), or a change (`+2`, `-1`) as `(0, Some(change))`.
fn scale_count(s: &str) -> Option<(u32, Option<i64>)> {
    let s = s.trim();
    Some(if let Some(d) = s.strip_prefix('+') {
        (0, Some(d.parse::<i64>().ok()?))
    } else if let Some(d) = s.strip_prefix('-') {
        (0, Some(-d.parse::<i64>().ok()?))
    } else {
        (s.parse::<u32>().ok()?, None)
    })
}

/// `flotilla scale`
pub async fn scale(settings: &Settings, a: &ScaleArgs) -> anyhow::Result<()> {
    let app = target(&a.app)?;
    if matches!(app, Target::All | Target::Id(_)) {
        bail!("scale wants an app name (or ns/name), not '{}'", a.app);
    }
    let Some((instances, change)) = scale_count(&a.instances) else {
        bail!(
            "scale {} {}: write a number (4), or a change (+2, -1)",
            a.app,
            a.instances
        );
    };
    let client = Client::connect(settings).await?;
    let mut progress = Line::new();
    progress.say(&format!("scaling {app} to {}", a.instances.trim()));
    let r = ScaleRequest {
        request_id: Uuid::new_v4(),
        app,
        instances,
        change,
    };
    let reply = client.api_reply(r, START_WITHIN).await?;
    conclude(&client, "scale", reply, a.json, &mut progress, Ok(())).await
}

#[cfg(test)]
mod tests {
    use super::super::fixtures;
    use super::*;
    use crate::protocol::Status;

    #[test]
    fn scale_takes_a_total_or_a_change() {
        assert_eq!(scale_count("4"), Some((4, None)));
        assert_eq!(scale_count(" 0 "), Some((0, None)));
        assert_eq!(scale_count("+2"), Some((0, Some(2))));
        assert_eq!(scale_count("-1"), Some((0, Some(-1))));
        for bad in ["lots", "", "+", "-x", "2.5", "4x"] {
            assert_eq!(scale_count(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_reload_counts_online_events_of_its_target() {
        let env = |name: &str, ev: Option<ProcessEvent>| {
            fixtures::event(fixtures::meta(3, name, Status::Online), ev, None)
        };
        let api = Target::parse("api").unwrap();
        assert!(back_online(&api, &env("api", Some(ProcessEvent::Online))));
        assert!(back_online(
            &Target::All,
            &env("web", Some(ProcessEvent::Online))
        ));
        assert!(!back_online(&api, &env("web", Some(ProcessEvent::Online))));
        assert!(!back_online(&api, &env("api", Some(ProcessEvent::Reload))));
        assert!(!back_online(&api, &env("api", None)));
    }
}
