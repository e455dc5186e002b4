//! `GET /v1/events/stream`: the organisation's public events as Server-Sent Events, as
//! they reach the feed, shaped by the caller's own policy (docs/live.md). The hub that
//! feeds every connection of the process is `crm_infra::live`.
//!
//! A connection, as a state machine polled by the HTTP body: an optional catch-up from
//! the store (a resume older than the ring), then the ring's events after the resume
//! point, then the live tail, with a heartbeat comment while idle. It ends with a
//! `cutoff` event when its buffer overflowed (a slow client), when the server shuts
//! down, when the store cannot be read or when the caller's access no longer allows
//! it; the event names the last id delivered so the client resumes exactly there.
//!
//! The caller's access is checked again whenever it may have changed: at the first
//! event, before the next event after this process heard of an access change in the
//! organisation ([`crm_infra::access::cache::AccessCache::changes`]), and at least
//! every [`RECHECK`]. A revoked key, a deactivated user, a logout or an
//! expired token ends the stream (`unauthorized`); a role that no longer reads what the
//! stream asked for ends it (`forbidden`); a role that reads less narrows the types
//! and fields from the next event on.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crm_domain::access::{Permission, Policy};
use crm_domain::public_events;
use crm_infra::live::event::LiveEvent;
use crm_infra::live::{catch_up, CutReason, Hub, Join, Permit, Subscription};
use crm_infra::store::event_store::CommitKey;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
use utoipa::openapi::Required;
use utoipa::{IntoParams, ToSchema};
use warp::Reply;

use crate::edge::context::RequestContext;
use crate::edge::extract::{Credential, Query};
use crate::edge::reply::{RawAs, RawDoc};
use crate::edge::route::{Call, FromCall, OpDoc};
use crate::error::{ApiError, FieldError};
use crate::routes::Authed;
use crate::state::AppState;

/// The longest a stream goes on without checking its caller's access again (a change
/// this process heard of is checked before the next event; this bounds what it did not
/// hear of, and a token's expiry). The access cache's own bound.
const RECHECK: std::time::Duration = crm_infra::access::cache::TTL;

/// The permissions of the default stream: a caller needs at least one.
const READ_PERMISSIONS: [Permission; 4] = [
    Permission::ContactsRead,
    Permission::ConsentRead,
    Permission::MessagesRead,
    Permission::AiAuditRead,
];

/// Which stream: the organisation's business events, or its security events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StreamName {
    /// Contacts, consent, messages, AI actions (each type needs its read permission).
    #[default]
    Default,
    /// Lockouts, 2FA, role and API key changes, webhook auto-disable, the AI stop
    /// switch (needs `security.read`).
    Security,
}

/// `GET /v1/events/stream` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamQuery {
    /// Comma-separated public event types (e.g. `contact.created,consent.changed`);
    /// default: every type of the stream the caller may read.
    #[param(pattern = "^[a-z_]+\\.[a-z_]+(,[a-z_]+\\.[a-z_]+)*$")]
    types: Option<String>,
    /// Only events of this entity type (`contact`, `consent`, `message`, `ai_action`,
    /// `user`, `role`, `api_key`, …): the `data.entity_type` of the events.
    #[param(pattern = "^[a-z][a-z_]{0,63}$")]
    entity_type: Option<String>,
    /// Only events of this entity (`data.entity_id`; a contact's id matches its
    /// `contact` and `consent` events).
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,200}$")]
    entity_id: Option<String>,
    /// `default` or `security`.
    #[param(inline)]
    stream: Option<StreamName>,
    /// Resume strictly after the event with this id (a global position of the
    /// organisation's; 0: from the first event). `Last-Event-ID` wins when both are sent.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// `false`: send the stored events after the resume point (from the first event
    /// without one), then end the stream with a `caught_up` event. Default `true`.
    follow: Option<bool>,
}

/// The `Last-Event-ID` header of a reconnecting client.
pub(crate) struct LastEventId(Option<String>);

impl FromCall for LastEventId {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        Ok(Self(call.ctx.last_event_id.clone()))
    }
    fn document(doc: &mut OpDoc) {
        let schema = utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9]{1,18}$"))
            .build();
        doc.parameters.push(
            ParameterBuilder::new()
                .name("Last-Event-ID")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "The id of the last event received: the stream resumes strictly after it \
                     (an event of the caller's organisation; 400 otherwise)",
                ))
                .schema(Some(schema))
                .build(),
        );
    }
}

/// The answer: an endless `text/event-stream`.
pub(crate) struct EventStreamDoc;

impl RawDoc for EventStreamDoc {
    fn document(doc: &mut OpDoc) {
        doc.success(
            200,
            "Server-Sent Events: `id` = the event's position, `event` = its public type, \
             `data` = `{type, timestamp, data}` shaped for the caller; comment heartbeats; \
             a final `cutoff` event (`{reason, last_event_id}`) when the server ends the \
             stream, or `caught_up` with `follow=false` (docs/live.md)",
            Some((
                "text/event-stream",
                // One Server-Sent Event (OpenAPI 3.2's reading of an event stream's
                // schema: each event, with its fields, is an instance).
                utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object({
                    use utoipa::openapi::schema::{ObjectBuilder, Type};
                    let text = |d: &str| {
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .description(Some(d))
                            .build()
                    };
                    ObjectBuilder::new()
                        .schema_type(Type::Object)
                        .property(
                            "event",
                            text("The public type, or `cutoff`, `caught_up`"),
                        )
                        .property(
                            "data",
                            text("JSON: `{type, timestamp, data}`, or the final event's `{reason, last_event_id}`"),
                        )
                        .property("id", text("The event's global position"))
                        .property(
                            "retry",
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .description(Some("Milliseconds to wait before reconnecting"))
                                .build(),
                        )
                        .build()
                })),
            )),
        );
    }
}

fn query_error(field: &'static str, message: String) -> ApiError {
    ApiError::bad_request(
        "invalid_query",
        format!("query parameter `{field}`: {message}"),
    )
    .with_fields(vec![FieldError::new(field, message)])
}

/// Which events a connection sends.
struct Filter {
    security: bool,
    /// The public types the caller may read (its permissions, its modules), narrowed
    /// by `types`.
    types: HashSet<&'static str>,
    entity_type: Option<String>,
    entity_id: Option<String>,
}

impl Filter {
    fn passes(&self, e: &LiveEvent) -> bool {
        e.entry.security == self.security
            && self.types.contains(e.entry.public)
            && self
                .entity_type
                .as_deref()
                .is_none_or(|t| t == e.aggregate_type())
            && self
                .entity_id
                .as_deref()
                .is_none_or(|i| i == e.aggregate_id())
    }
}

/// The filter a request asks for, or why it may not have it.
fn filter(a: &Authed, q: &StreamQuery) -> Result<Filter, ApiError> {
    let security = q.stream.unwrap_or_default() == StreamName::Security;
    if security {
        a.require(Permission::SecurityRead)?;
    } else if !READ_PERMISSIONS.iter().any(|p| a.require(*p).is_ok()) {
        // The first refusal names what is missing (a module, the permission, 2FA).
        a.require(Permission::ContactsRead)?;
    }
    let readable: HashSet<&'static str> = public_events::public_types()
        .into_iter()
        .filter(|(_, needs, sec)| *sec == security && a.require(*needs).is_ok())
        .map(|(t, _, _)| t)
        .collect();
    let types = match &q.types {
        None => readable,
        Some(list) => {
            let mut chosen = HashSet::new();
            for name in list.split(',') {
                let Some(entry) = public_events::public_entry(name) else {
                    return Err(query_error(
                        "types",
                        format!("`{name}` is not a public event type (docs/live.md lists them)"),
                    ));
                };
                if entry.security != security {
                    let other = if entry.security {
                        "security"
                    } else {
                        "default"
                    };
                    return Err(query_error(
                        "types",
                        format!("`{name}` is an event of the {other} stream (`stream={other}`)"),
                    ));
                }
                if !readable.contains(entry.public) {
                    a.require(entry.needs)?;
                }
                chosen.insert(entry.public);
            }
            chosen
        }
    };
    if let Some(t) = &q.entity_type {
        let ok = t.len() <= 64
            && t.starts_with(|c: char| c.is_ascii_lowercase())
            && t.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if !ok {
            return Err(query_error(
                "entity_type",
                "must be 1-64 characters of a-z and _, starting with a letter".into(),
            ));
        }
    }
    if let Some(i) = &q.entity_id {
        let ok = !i.is_empty()
            && i.len() <= 200
            && i.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
        if !ok {
            return Err(query_error(
                "entity_id",
                "must be 1-200 characters of A-Z, a-z, 0-9 and _ . : -".into(),
            ));
        }
    }
    Ok(Filter {
        security,
        types,
        entity_type: q.entity_type.clone(),
        entity_id: q.entity_id.clone(),
    })
}

/// Where a request resumes: the position it names (`Last-Event-ID` first, else
/// `after`), if any.
fn resume_position(last: &LastEventId, q: &StreamQuery) -> Result<Option<i64>, ApiError> {
    if let Some(raw) = &last.0 {
        // As documented: 1 to 18 digits (so always an i64), nothing else.
        let digits = !raw.is_empty() && raw.len() <= 18 && raw.chars().all(|c| c.is_ascii_digit());
        return match raw.parse::<i64>() {
            Ok(p) if digits => Ok(Some(p)),
            _ => Err(ApiError::bad_request(
                "invalid_last_event_id",
                "`Last-Event-ID` must be the id of an event this stream sent (a position: digits)",
            )
            .with_fields(vec![FieldError::new(
                "Last-Event-ID",
                "must be an event id (digits)",
            )])),
        };
    }
    match q.after {
        Some(p) if p < 0 => Err(query_error("after", "must be 0 or more".into())),
        other => Ok(other),
    }
}

/// `GET /v1/events/stream`.
pub(crate) async fn stream(
    s: AppState,
    a: Authed,
    Query(q): Query<StreamQuery>,
    last: LastEventId,
    credential: Credential,
) -> Result<RawAs<EventStreamDoc>, ApiError> {
    let filter = filter(&a, &q)?;
    let org = a.caller.org_id;
    let follow = q.follow.unwrap_or(true);
    let from_header = last.0.is_some();
    let resume = match resume_position(&last, &q)? {
        None if !follow => Some(CommitKey::default()),
        None => None,
        Some(position) => {
            let client = s.pool.get().await?;
            match catch_up::resume_key(&client, org, position).await? {
                Some(key) => Some(key),
                None if from_header => {
                    return Err(ApiError::bad_request(
                        "invalid_last_event_id",
                        format!("no event of your organisation has id {position}"),
                    )
                    .with_fields(vec![FieldError::new(
                        "Last-Event-ID",
                        "names no event of your organisation",
                    )]))
                }
                None => {
                    return Err(ApiError::bad_request(
                        "unknown_position",
                        format!("no event of your organisation has position {position}"),
                    )
                    .with_fields(vec![FieldError::new(
                        "after",
                        "names no event of your organisation",
                    )]))
                }
            }
        }
    };
    let hub = s.live.clone();
    let Some(permit) = hub.admit(org, follow) else {
        return Err(ApiError::TooManyStreams {
            limit: hub.settings.max_per_org,
        });
    };
    // A new client takes what commits from now on. With the hub's consumer running,
    // that is its live tail; else (nobody followed the feed for a while, and this
    // stream just started it) from the store's horizon, read until the ring covers it.
    let resume = match resume {
        None if follow && !hub.is_running() => {
            let client = s.pool.get().await?;
            Some(catch_up::horizon(&client).await?)
        }
        resume => resume,
    };
    let heartbeat = hub.settings.heartbeat;
    let conn = Conn {
        closing: hub.closing(),
        hub,
        org,
        policy: Arc::new(a.access.policy.clone()),
        access: AccessCheck {
            ctx: a.ctx.clone(),
            state: s,
            credential,
            query: q,
            // The access was loaded before this handler ran, at an epoch not known
            // here: the first event (or heartbeat) checks it again.
            seen: None,
            at: Instant::now(),
        },
        filter,
        follow,
        _permit: permit,
        phase: Phase::Start,
        cursor: resume,
        last_sent: None,
        pending: VecDeque::new(),
        store_read_started: None,
        heartbeat: tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat),
    };
    let body = futures::stream::unfold(conn, |mut c| async move {
        let chunk = c.next_chunk().await?;
        Some((Ok::<_, std::io::Error>(chunk), c))
    });
    let mut response =
        warp::reply::stream(SyncBody(std::sync::Mutex::new(Box::pin(body)))).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache, no-store"),
        // Proxies (nginx) must not buffer the stream.
        ("x-accel-buffering", "no"),
    ] {
        headers.insert(name, warp::http::HeaderValue::from_static(value));
    }
    Ok(RawAs::new(response))
}

/// The body stream, `Sync` as warp asks: only the connection's task polls it, so the
/// lock is never contended (its futures hold database clients, which are not `Sync`).
struct SyncBody(std::sync::Mutex<BodyStream>);

type BodyStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

impl futures::Stream for SyncBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.get_mut().0.get_mut() {
            Ok(inner) => inner.as_mut().poll_next(cx),
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

/// What a live connection woke up for.
enum Woke {
    Closing,
    Heartbeat,
    Events,
    Cut(CutReason),
}

enum Phase {
    /// Nothing sent yet (the `retry` line comes first).
    Start,
    /// Reading the store until the hub's ring covers the rest.
    CatchUp,
    Live(Subscription),
    Ended,
}

/// What a stream needs to check its caller's access again.
struct AccessCheck {
    state: AppState,
    credential: Credential,
    ctx: RequestContext,
    query: StreamQuery,
    /// The access cache's epoch (any change) and count of the organisation's access
    /// changes when the access in use was last checked (`None`: never).
    seen: Option<(u64, u64)>,
    at: Instant,
}

/// Why a stream's caller may no longer receive it.
enum Denied {
    /// The credential no longer authenticates (revoked, deactivated, logged out,
    /// expired).
    Unauthorized,
    /// It does, but its permissions no longer allow the stream as asked.
    Forbidden,
    /// The check could not be made (the database is away): deny by default.
    Unavailable,
}

impl Denied {
    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
        }
    }
}

/// One open stream.
struct Conn {
    hub: Arc<Hub>,
    org: uuid::Uuid,
    /// Shapes each event for the caller (its field policy), and `filter` (its readable
    /// types): both as of the last access check.
    policy: Arc<Policy>,
    access: AccessCheck,
    filter: Filter,
    follow: bool,
    _permit: Permit,
    phase: Phase,
    /// Everything up to here (commit order) was delivered or skipped; `None`: a new
    /// client that takes live events only.
    cursor: Option<CommitKey>,
    /// The id of the last event sent (what a cutoff names for the resume).
    last_sent: Option<i64>,
    pending: VecDeque<Arc<LiveEvent>>,
    store_read_started: Option<Instant>,
    heartbeat: tokio::time::Interval,
    closing: CancellationToken,
}

impl Conn {
    /// The next bytes of the stream; `None` when it has ended.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if matches!(self.phase, Phase::Ended) {
                return None;
            }
            if matches!(self.phase, Phase::Start) {
                self.phase = Phase::CatchUp;
                return Some(Bytes::from_static(b": connected\nretry: 3000\n\n"));
            }
            while let Some(e) = self.pending.pop_front() {
                if self.cursor.is_some_and(|k| e.key <= k) {
                    continue; // already delivered (or skipped) from the store or the ring
                }
                if let Err(denied) = self.check_access().await {
                    // Not sent: the client resumes after the last event it got.
                    return Some(self.end("cutoff", denied.code()));
                }
                self.cursor = Some(e.key);
                if !self.filter.passes(&e) {
                    continue;
                }
                if let Some(frame) = e
                    .frame(&self.policy, &self.hub.crypto, &self.hub.pool)
                    .await
                {
                    self.last_sent = Some(e.position());
                    return Some(frame);
                }
            }
            if self.closing.is_cancelled() {
                return Some(self.end("cutoff", CutReason::Shutdown.code()));
            }
            if matches!(self.phase, Phase::CatchUp) {
                if let Some(chunk) = self.catch_up().await {
                    return Some(chunk);
                }
                continue;
            }
            let Phase::Live(sub) = &mut self.phase else {
                continue;
            };
            let woke = tokio::select! {
                _ = self.closing.cancelled() => Woke::Closing,
                _ = self.heartbeat.tick() => Woke::Heartbeat,
                next = sub.next() => match next {
                    Ok(e) => {
                        self.pending.push_back(e);
                        // A batch that arrived together goes out together.
                        while self.pending.len() < 64 {
                            match sub.try_next() {
                                Some(e) => self.pending.push_back(e),
                                None => break,
                            }
                        }
                        Woke::Events
                    }
                    Err(reason) => Woke::Cut(reason),
                },
            };
            match woke {
                Woke::Closing => return Some(self.end("cutoff", CutReason::Shutdown.code())),
                Woke::Heartbeat => {
                    // An idle stream, too, ends once its caller may no longer have it.
                    if let Err(denied) = self.check_access().await {
                        return Some(self.end("cutoff", denied.code()));
                    }
                    return Some(Bytes::from_static(b": heartbeat\n\n"));
                }
                Woke::Events => self.heartbeat.reset(),
                Woke::Cut(reason) => return Some(self.end("cutoff", reason.code())),
            }
        }
    }

    /// One step of the catch-up: joins the live tail when the ring covers the rest,
    /// else reads a page of the store into `pending`. Answers a chunk to send when the
    /// stream ends or idles here.
    async fn catch_up(&mut self) -> Option<Bytes> {
        if self.follow {
            match self
                .hub
                .join(self.org, self.cursor, self.store_read_started)
            {
                Join::Live {
                    replay,
                    subscription,
                } => {
                    self.pending.extend(replay);
                    self.phase = Phase::Live(subscription);
                    self.heartbeat.reset();
                    return None;
                }
                Join::ReadStore => {}
            }
        }
        let after = self.cursor.unwrap_or_default();
        let started = Instant::now();
        let page_size = self.hub.settings.catch_up_page;
        let page = async {
            let client = self.hub.pool.get().await.map_err(|e| e.to_string())?;
            catch_up::page(&client, self.org, after, page_size)
                .await
                .map_err(|e| e.to_string())
        };
        let page = tokio::select! {
            _ = self.closing.cancelled() => {
                return Some(self.end("cutoff", CutReason::Shutdown.code()));
            }
            page = page => page,
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "live stream: the store could not be read; stream ended");
                return Some(self.end("cutoff", "unavailable"));
            }
        };
        self.store_read_started = Some(started);
        let short = (page.len() as i64) < page_size;
        self.pending.extend(page.into_iter().map(Arc::new));
        if short && !self.follow {
            // Sent after what this page holds: `pending` drains first.
            self.pending
                .is_empty()
                .then(|| self.end("caught_up", "caught_up"))
        } else if short && !self.hub.is_running() {
            // No feed to join yet (the consumer is starting, or NATS is away): poll
            // the store meanwhile, and try again as soon as the consumer runs.
            let hub = self.hub.clone();
            tokio::select! {
                _ = self.closing.cancelled() => {}
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(b": heartbeat\n\n")),
                _ = hub.running() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
            None
        } else {
            None
        }
    }

    /// Checks the caller's access again if it may have changed (see the module's
    /// documentation), and takes the policy and readable types it has now.
    async fn check_access(&mut self) -> Result<(), Denied> {
        let c = &mut self.access;
        let cache = &c.state.access_cache;
        // Per event: one atomic load while nothing changed anywhere; the organisation's
        // own count (a lock) only once something did.
        let epoch = cache.epoch();
        let fresh = c.at.elapsed() < RECHECK;
        if fresh && c.seen.is_some_and(|(e, _)| e == epoch) {
            return Ok(());
        }
        let own = cache.changes(self.org);
        if fresh && c.seen.is_some_and(|(_, o)| o == own) {
            c.seen = Some((epoch, own));
            return Ok(());
        }
        let authed = match super::authenticate(&c.state, Some(c.credential.header()), &c.ctx).await
        {
            Ok(a) if a.caller.org_id == self.org => a,
            Ok(_) | Err(ApiError::Unauthorized(_)) => return Err(Denied::Unauthorized),
            Err(e) => {
                tracing::warn!(error = %e, "live stream: the caller's access could not be checked; stream ended");
                return Err(Denied::Unavailable);
            }
        };
        let filter = filter(&authed, &c.query).map_err(|_| Denied::Forbidden)?;
        (c.seen, c.at) = (Some((epoch, own)), Instant::now());
        self.filter = filter;
        self.policy = Arc::new(authed.access.policy.clone());
        Ok(())
    }

    /// The stream's last event: `cutoff` (`{reason, last_event_id}`) or `caught_up`.
    fn end(&mut self, event: &str, reason: &str) -> Bytes {
        self.phase = Phase::Ended;
        let data = if event == "caught_up" {
            json!({"last_event_id": self.last_sent})
        } else {
            json!({"reason": reason, "last_event_id": self.last_sent})
        };
        Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
    }
}
