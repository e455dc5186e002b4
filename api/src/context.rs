//! What every request carries into the events it causes: request id, client address,
//! user agent, correlation and causation ids.

use std::net::SocketAddr;

use warp::Filter;

#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
}

/// An id supplied by a client is kept only if short and plain; otherwise a new one.
fn clean_id(v: Option<String>) -> Option<String> {
    v.filter(|s| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    })
}

pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Extracts the request context; never rejects.
pub fn request_context(
) -> impl Filter<Extract = (RequestContext,), Error = std::convert::Infallible> + Clone {
    warp::addr::remote()
        .and(warp::header::optional::<String>("user-agent"))
        .and(warp::header::optional::<String>("x-request-id"))
        .and(warp::header::optional::<String>("x-correlation-id"))
        .and(warp::header::optional::<String>("x-causation-id"))
        .map(
            |addr: Option<SocketAddr>, ua: Option<String>, rid, cid, caus| {
                let request_id = clean_id(rid).unwrap_or_else(new_request_id);
                RequestContext {
                    correlation_id: clean_id(cid).or_else(|| Some(request_id.clone())),
                    causation_id: clean_id(caus),
                    request_id,
                    ip: addr.map(|a| a.ip().to_string()),
                    user_agent: ua.map(|u| u.chars().take(512).collect()),
                }
            },
        )
        .or(warp::any().map(|| RequestContext {
            request_id: new_request_id(),
            ip: None,
            user_agent: None,
            correlation_id: None,
            causation_id: None,
        }))
        .unify()
}
