//! What every request carries into the events it causes: request id, client address,
//! user agent, correlation and causation ids. Built once per request by the dispatcher
//! ([`super::dispatch`]), before anything can fail, so every answer carries the id.

use std::net::SocketAddr;

use warp::http::HeaderMap;

#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// `Sec-GPC: 1`: the browser's Global Privacy Control signal (an opt-out of sale
    /// and sharing, honoured wherever a request identifies a contact).
    pub global_privacy_control: bool,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// `Last-Event-ID`: where a reconnecting event-stream client left off (read only
    /// by `GET /v1/events/stream`; at most 64 characters kept, so it can be named).
    pub last_event_id: Option<String>,
}

/// An id supplied by a client is kept only if short and plain; otherwise a new one.
fn clean_id(v: Option<&str>) -> Option<String> {
    v.filter(|s| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    })
    .map(str::to_owned)
}

pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A header's value as text, if it is visible ASCII (what HTTP allows; anything else
/// is treated as absent rather than stored).
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A user agent as it is stored in event metadata: at most 512 characters, control
/// characters (which PostgreSQL text or logs could not hold cleanly) removed.
fn clean_user_agent(ua: &str) -> Option<String> {
    let cleaned: String = ua.chars().filter(|c| !c.is_control()).take(512).collect();
    (!cleaned.is_empty()).then_some(cleaned)
}

impl RequestContext {
    /// From the request's headers and peer address; never fails.
    pub fn from_request(headers: &HeaderMap, addr: Option<SocketAddr>) -> Self {
        let request_id = clean_id(header(headers, "x-request-id")).unwrap_or_else(new_request_id);
        RequestContext {
            correlation_id: clean_id(header(headers, "x-correlation-id"))
                .or_else(|| Some(request_id.clone())),
            causation_id: clean_id(header(headers, "x-causation-id")),
            request_id,
            ip: addr.map(|a| a.ip().to_string()),
            user_agent: header(headers, "user-agent").and_then(clean_user_agent),
            global_privacy_control: header(headers, "sec-gpc").is_some_and(|v| v.trim() == "1"),
            last_event_id: headers.get("last-event-id").map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(64)
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_plain() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(RequestContext::from_request(&h, None).request_id, "abc-123");
        h.insert("x-request-id", "a b".parse().unwrap());
        assert_ne!(RequestContext::from_request(&h, None).request_id, "a b");
    }

    #[test]
    fn user_agents_lose_control_characters() {
        assert_eq!(clean_user_agent("curl/8\t1").as_deref(), Some("curl/81"));
        assert_eq!(clean_user_agent("\t"), None);
    }
}
