//! The CLI's connection: NATS (the configured URL, else the local stack, started when needed)
//! and requests to the controller's API, with errors that say what to do next.

use crate::bus;
use crate::config::Settings;
use crate::protocol::Subjects;
use crate::protocol::control::Reply;
use anyhow::Context;
use serde::Serialize;
use std::time::Duration;

/// How long the CLI waits for the controller to answer at all.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected CLI.
pub struct Client {
    /// The NATS connection.
    pub nats: async_nats::Client,
    /// Subject builder.
    pub subjects: Subjects,
    /// The URL in use.
    pub url: String,
    /// True when it is the local stack.
    pub local: bool,
}

impl Client {
    /// Subscribes to `subject` and makes sure the server has the subscription before anything
    /// is asked: every later message is seen.
    pub async fn watch(&self, subject: String) -> anyhow::Result<async_nats::Subscriber> {
        let sub = self
            .nats
            .subscribe(subject)
            .await
            .context("cannot watch the app's events")?;
        self.nats
            .flush()
            .await
            .context("NATS did not take the subscription")?;
        Ok(sub)
    }

    /// The subject of every app's lifecycle events.
    pub fn all_process_events(&self) -> String {
        format!("{}.*.*.process:event", self.subjects.prefix())
    }

    /// Connects to the configured NATS, or to the local stack (starting it when none runs).
    pub async fn connect(settings: &Settings) -> anyhow::Result<Client> {
        let mut settings = settings.clone();
        let local = settings.nats.url.is_none();
        if local {
            let exe = std::env::current_exe()
                .context("cannot find this program's own path to start the local stack")?;
            let mut progress = super::progress::Line::new();
            let info =
                crate::stack::ensure(&settings, &exe, &mut |m: &str| progress.say(m)).await?;
            progress.done();
            settings.nats.url = Some(info.url);
        }
        let subjects = Subjects::new(&settings.subject_prefix)?;
        let nats = bus::connect_once(&settings, "flotilla-cli").await?;
        Ok(Client {
            nats,
            subjects,
            url: settings.nats_url().to_string(),
            local,
        })
    }

    /// One API request; `within` bounds the whole operation (a reload takes a while). An error
    /// reply becomes an `Err` with the controller's message.
    pub async fn api<T: Serialize>(
        &self,
        verb: &str,
        body: &T,
        within: Duration,
    ) -> anyhow::Result<Reply> {
        let reply = self.api_reply(verb, body, within).await?;
        if let Some(e) = &reply.error {
            anyhow::bail!("{}", e.message);
        }
        Ok(reply)
    }

    /// Same, but an error reply is returned as it is (the caller shows what did happen).
    pub async fn api_reply<T: Serialize>(
        &self,
        verb: &str,
        body: &T,
        within: Duration,
    ) -> anyhow::Result<Reply> {
        let subject = self.subjects.api(verb);
        let payload = serde_json::to_vec(body).context("encoding the request")?;
        let asked = tokio::time::timeout(within, self.nats.request(subject, payload.into())).await;
        let msg = match asked {
            Err(_) => anyhow::bail!(
                "no controller answered within {} s on {}: is the fleet running? `flotilla info` tells more",
                within.as_secs(),
                self.url
            ),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => anyhow::bail!(
                "no controller is listening on {}: is the fleet running (`flotilla controller`)? `flotilla info` tells more",
                self.url
            ),
            Ok(Err(e)) => {
                anyhow::bail!("the request to the controller on {} failed: {e}", self.url)
            }
            Ok(Ok(m)) => m,
        };
        serde_json::from_slice::<Reply>(&msg.payload)
            .context("the controller's reply cannot be read (a different version?)")
    }
}
