//! The API's entry: a request on `pmctl.api.<verb>` decoded into an [`ApiRequest`] and run by
//! its verb; an error becomes the reply's error.

use super::verbs::{reads, scale, start, targeted};
use super::{CTL, Ctx};
use crate::bus::serve;
use crate::protocol::api::ApiRequest;
use crate::protocol::reply::Reply;

/// Runs one request.
pub(crate) async fn dispatch(ctx: &Ctx, verb: &str, body: &[u8]) -> Reply {
    let req = match ApiRequest::parse(verb, body) {
        Ok(req) => req,
        // The id, when the body has one, so the caller can match the error to its request.
        Err(e) => return Reply::err(serve::request_id(body), CTL, e),
    };
    let id = req.request_id();
    let res = match req {
        ApiRequest::Start(r) => start::start(ctx, *r).await,
        ApiRequest::Scale(r) => scale::scale(ctx, r).await,
        ApiRequest::Targeted(verb, r) => targeted::targeted(ctx, verb, r).await,
        ApiRequest::Ls(r) => Ok(reads::ls(ctx, r).await),
        ApiRequest::Send(r) => reads::send(ctx, r).await,
        ApiRequest::Signal(r) => reads::signal(ctx, r).await,
        ApiRequest::Logs(r) => reads::logs(ctx, r).await,
        ApiRequest::Info(_) => Ok(reads::info(ctx, id)),
    };
    res.unwrap_or_else(|e| Reply::err(id, CTL, e))
}
