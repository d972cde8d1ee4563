//! The CLI's connection: NATS (the configured URL, else the local stack, started when needed)
//! and requests to the controller's API, with errors that say what to do next.

use crate::bus;
use crate::config::Settings;
use crate::protocol::Subjects;
use crate::protocol::api::ApiRequest;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::Reply;
use anyhow::Context;
use std::time::Duration;

/// How long the CLI waits for the controller to answer at all.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected CLI.
pub struct Client {
    /// The connection, for subscriptions the verbs make themselves (`logs --follow`).
    pub nats: async_nats::Client,
    /// Subjects under the configured prefix.
    pub subjects: Subjects,
    /// The NATS URL connected to (shown in errors and by `monit`).
    pub url: String,
    /// True when it is the local stack of `$FLOTILLA_HOME` (scripts are on this machine).
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
        self.subjects.all_process_events()
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
    /// reply becomes [`ApiError::Refused`], with the controller's kind and message.
    pub async fn api(
        &self,
        req: impl Into<ApiRequest>,
        within: Duration,
    ) -> Result<Reply, ApiError> {
        let mut reply = self.api_reply(req, within).await?;
        match reply.error.take() {
            Some(e) => Err(ApiError::Refused(e)),
            None => Ok(reply),
        }
    }

    /// Same, but an error reply is returned as it is (the caller shows what did happen).
    pub async fn api_reply(
        &self,
        req: impl Into<ApiRequest>,
        within: Duration,
    ) -> Result<Reply, ApiError> {
        let req = req.into();
        let subject = self.subjects.api(req.verb());
        let asked =
            tokio::time::timeout(within, self.nats.request(subject, req.to_body().into())).await;
        let url = self.url.clone();
        let msg = match asked {
            Err(_) => {
                return Err(ApiError::Timeout {
                    secs: within.as_secs(),
                    url,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ApiError::NoController { url });
            }
            Ok(Err(e)) => return Err(ApiError::Failed { url, error: e }),
            Ok(Ok(m)) => m,
        };
        serde_json::from_slice::<Reply>(&msg.payload).map_err(ApiError::Unreadable)
    }
}

/// Why an API request got no reply the CLI can use. Callers match on the variant (and a
/// refusal's [`ErrorKind`]), never on the text.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The controller answered with an error.
    #[error("{}", .0.message)]
    Refused(ControlError),
    /// Nobody answered in time.
    #[error(
        "no controller answered within {secs} s on {url}: is the fleet running? `flotilla info` tells more"
    )]
    Timeout {
        /// How long the CLI waited.
        secs: u64,
        /// The NATS URL in use.
        url: String,
    },
    /// No controller subscribes to the API.
    #[error(
        "no controller is listening on {url}: is the fleet running (`flotilla controller`)? `flotilla info` tells more"
    )]
    NoController {
        /// The NATS URL in use.
        url: String,
    },
    /// The request itself failed.
    #[error("the request to the controller on {url} failed: {error}")]
    Failed {
        /// The NATS URL in use.
        url: String,
        /// What NATS said.
        error: async_nats::RequestError,
    },
    /// The reply is not one this CLI can read.
    #[error("the controller's reply cannot be read (a different version?): {0}")]
    Unreadable(serde_json::Error),
}

impl ApiError {
    /// The controller's error kind, for a refusal.
    pub fn refused(&self) -> Option<ErrorKind> {
        match self {
            ApiError::Refused(e) => Some(e.kind),
            _ => None,
        }
    }
}
