//! NATS JetStream: connection, the events stream and its subjects.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::settings::NatsSettings;
use crate::store::event_store::RawEvent;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {name}: {message}")]
    Stream { name: String, message: String },
}

/// A JetStream context with its events stream ensured.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub stream: stream::Stream,
    pub settings: NatsSettings,
}

impl Bus {
    /// Connects and creates the events stream when missing: file storage, subjects
    /// `<prefix>.>`, and a duplicate window so a re-published event is dropped.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("crm")
            .connect(settings.url.as_str())
            .await
            .map_err(|source| BusError::Connect {
                url: settings.url.clone(),
                source,
            })?;
        let jetstream = jetstream::new(client.clone());
        let stream = jetstream
            .get_or_create_stream(stream::Config {
                name: settings.stream.clone(),
                subjects: vec![settings.all_subjects()],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Stream {
                name: settings.stream.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            client,
            jetstream,
            stream,
            settings: settings.clone(),
        })
    }

    /// Whether the server answers.
    pub async fn ping(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), self.client.flush())
            .await
            .is_ok_and(|r| r.is_ok())
            && self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Most events one message carries: a commit of more events on one stream is published
/// as several messages.
pub const MAX_EVENTS_PER_MESSAGE: usize = 64;
/// Most bytes of payload and metadata a group of events gathers in one message (far
/// below nats-server's 1 MB `max_payload`); an event larger than this travels alone,
/// as every event did before groups.
pub const MAX_GROUP_BYTES: usize = 256 * 1024;

/// What an event adds to a message, near enough: its payload and metadata, and room
/// for the envelope.
fn weight(e: &RawEvent) -> usize {
    e.payload.get().len() + e.metadata.get().len() + 512
}

/// The body of a feed message: one event as a JSON object, or a run of events
/// ([`message_runs`]) as a JSON array of them. A run takes one publish, one stored
/// message, one delivery and one ack instead of one each: a commit's events of one
/// stream, or the events one request wrote to several streams in one unit (an AI
/// action run at once: its steps and the contact changes it made, one message).
pub fn message_body(events: &[RawEvent]) -> Result<Vec<u8>, serde_json::Error> {
    match events {
        [one] => serde_json::to_vec(one),
        many => serde_json::to_vec(many),
    }
}

/// The events of a feed message ([`message_body`]): an object (one event, and every
/// message of a relay from before groups) or an array of them.
pub fn events_of(body: &[u8]) -> Result<Vec<RawEvent>, serde_json::Error> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(body),
        _ => serde_json::from_slice(body).map(|one| vec![one]),
    }
}

/// Aggregate types whose events travel only in messages of their own stream, under
/// its own subject: a consumer selects them by subject (the dispatcher,
/// `<prefix>.*.message.*`), so they never join a run of several streams.
pub const OWN_SUBJECT_TYPES: &[&str] =
    &[<crm_domain::message::Message as cqrs_es::Aggregate>::TYPE];

/// The request that wrote an event (its metadata's `request_id`), if it names one;
/// borrowed from the metadata's text unless it holds an escape.
fn request_of(e: &RawEvent) -> Option<Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Request<'a> {
        #[serde(default, borrow)]
        request_id: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<Request>(e.metadata.get())
        .ok()
        .and_then(|r| r.request_id)
}

/// An event's request, read from its metadata once, when first needed.
type LazyRequest<'a> = OnceCell<Option<Cow<'a, str>>>;

/// Whether `e` may join the message of `p`, the event before it (see [`message_runs`]).
fn joins<'a>(
    (p, p_request): (&'a RawEvent, &LazyRequest<'a>),
    (e, e_request): (&'a RawEvent, &LazyRequest<'a>),
) -> bool {
    if p.tx_id != e.tx_id || p.org_id != e.org_id {
        return false;
    }
    if p.aggregate_type == e.aggregate_type && p.aggregate_id == e.aggregate_id {
        return true;
    }
    let own = |t: &str| OWN_SUBJECT_TYPES.contains(&t);
    if own(&p.aggregate_type) || own(&e.aggregate_type) {
        return false;
    }
    let mine = e_request.get_or_init(|| request_of(e));
    mine.is_some() && mine == p_request.get_or_init(|| request_of(p))
}

/// The lengths of the runs of `events` (in commit order) that go in one message each,
/// at most [`MAX_EVENTS_PER_MESSAGE`] and [`MAX_GROUP_BYTES`]: consecutive events of
/// one commit (transaction) and one organisation that are either of one stream, or of
/// one request (a unit: an AI action's steps and the contacts' changes it ran),
/// except that events of [`OWN_SUBJECT_TYPES`] join only runs of their own stream. A
/// message's subject is its first event's stream's.
pub fn message_runs(events: &[RawEvent]) -> Vec<usize> {
    let mut runs: Vec<usize> = Vec::new();
    let mut bytes = 0;
    let mut prev: Option<(&RawEvent, LazyRequest)> = None;
    for e in events {
        let request = LazyRequest::new();
        let same = prev
            .as_ref()
            .is_some_and(|(p, p_request)| joins((p, p_request), (e, &request)));
        let w = weight(e);
        match runs.last_mut() {
            Some(n) if same && *n < MAX_EVENTS_PER_MESSAGE && bytes + w <= MAX_GROUP_BYTES => {
                *n += 1;
                bytes += w;
            }
            _ => {
                runs.push(1);
                bytes = w;
            }
        }
        prev = Some((e, request));
    }
    runs
}

/// The `Nats-Msg-Id` of a message of `events` (JetStream's duplicate window drops a
/// message published again under the same id): the event's id for one, the first and
/// the last for a group. A relay that restarts and cuts a commit otherwise (a read that
/// ended inside it) publishes its events again under other ids: they are delivered
/// again, and every consumer takes an event it has applied as a duplicate.
pub fn message_id(events: &[RawEvent]) -> String {
    match events {
        [] => String::new(),
        [one] => one.event_id.to_string(),
        [first, .., last] => format!("{}..{}", first.event_id, last.event_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use uuid::Uuid;

    fn event(tx_id: i64, position: i64, stream: &str) -> RawEvent {
        RawEvent {
            global_position: position,
            tx_id,
            event_id: Uuid::now_v7(),
            org_id: Uuid::nil(),
            aggregate_type: "ai_action".into(),
            aggregate_id: stream.into(),
            sequence: position,
            event_type: "AiActionProposed".into(),
            event_version: "1".into(),
            payload: RawValue::from_string(r#"{"a":[1,"x"]}"#.into()).unwrap(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
            recorded_at: chrono::Utc::now(),
            prev_hash: None,
            hash: "00".into(),
        }
    }

    #[test]
    fn a_commits_events_of_one_stream_share_a_message_and_others_do_not() {
        let events = vec![
            event(1, 1, "a"),
            event(1, 2, "a"),
            event(1, 3, "b"),
            event(1, 4, "a"),
            event(2, 5, "a"),
            event(2, 6, "a"),
        ];
        assert_eq!(message_runs(&events), vec![2, 1, 1, 2]);
        let long: Vec<RawEvent> = (1..=MAX_EVENTS_PER_MESSAGE as i64 + 1)
            .map(|p| event(7, p, "a"))
            .collect();
        assert_eq!(message_runs(&long), vec![MAX_EVENTS_PER_MESSAGE, 1]);
        assert!(message_runs(&[]).is_empty());
        // Large events: as many as fit in the byte budget share a message; one larger
        // than the budget travels alone.
        let big = |p: i64, len: usize| {
            let mut e = event(9, p, "a");
            e.payload = RawValue::from_string(format!("\"{}\"", "x".repeat(len))).unwrap();
            e
        };
        let third = MAX_GROUP_BYTES / 3;
        let large = vec![
            big(1, third),
            big(2, third),
            big(3, third),
            big(4, MAX_GROUP_BYTES),
            big(5, 10),
        ];
        assert_eq!(message_runs(&large), vec![2, 1, 1, 1]);
    }

    #[test]
    fn a_units_streams_share_a_message_but_other_requests_and_messages_do_not() {
        let by = |mut e: RawEvent, ty: &str, request: Option<&str>| {
            e.aggregate_type = ty.into();
            e.metadata = RawValue::from_string(match request {
                Some(r) => format!(r#"{{"ip":null,"request_id":"{r}"}}"#),
                None => r#"{"request_id":null}"#.into(),
            })
            .unwrap();
            e
        };
        // An AI action run at once (one request: its steps and the contact's change),
        // then another request's change of the same contact in the same commit.
        let unit = vec![
            by(event(1, 1, "act"), "ai_action", Some("r1")),
            by(event(1, 2, "act"), "ai_action", Some("r1")),
            by(event(1, 3, "c"), "contact", Some("r1")),
            by(event(1, 4, "act"), "ai_action", Some("r1")),
            by(event(1, 5, "c"), "contact", Some("r2")),
            // No request named: streams are not joined.
            by(event(1, 6, "d"), "contact", None),
            by(event(1, 7, "e"), "contact", None),
            // A message stream travels under its own subject, even in its request's unit.
            by(event(1, 8, "c"), "contact", Some("r3")),
            by(event(1, 9, "m"), "message", Some("r3")),
            by(event(1, 10, "m"), "message", Some("r3")),
            by(event(1, 11, "c"), "contact", Some("r3")),
            // The same request in another commit, or another organisation: apart.
            by(event(2, 12, "c"), "contact", Some("r3")),
        ];
        let mut other_org = by(event(2, 13, "d"), "contact", Some("r3"));
        other_org.org_id = Uuid::now_v7();
        let mut all = unit;
        all.push(other_org);
        assert_eq!(message_runs(&all), vec![4, 1, 1, 1, 1, 2, 1, 1, 1]);

        // A request id is compared as text, escaped in the metadata or not.
        let escaped = vec![
            by(event(3, 14, "act"), "ai_action", Some(r"r\u0034")),
            by(event(3, 15, "c"), "contact", Some("r4")),
            by(event(3, 16, "d"), "contact", Some(r"r\u0035")),
        ];
        assert_eq!(message_runs(&escaped), vec![2, 1]);
    }

    fn json(events: &[RawEvent]) -> String {
        serde_json::to_string(events).unwrap()
    }

    #[test]
    fn a_message_reads_back_as_its_events_whether_one_or_a_group() {
        let one = vec![event(1, 1, "a")];
        let body = message_body(&one).unwrap();
        assert_eq!(body.first(), Some(&b'{'), "one event stays an object");
        assert_eq!(json(&events_of(&body).unwrap()), json(&one));
        assert_eq!(message_id(&one), one[0].event_id.to_string());

        let group = vec![event(1, 1, "a"), event(1, 2, "a"), event(1, 3, "a")];
        let body = message_body(&group).unwrap();
        assert_eq!(json(&events_of(&body).unwrap()), json(&group));
        assert_eq!(
            message_id(&group),
            format!("{}..{}", group[0].event_id, group[2].event_id)
        );
        assert!(events_of(b"not json").is_err());
        assert!(events_of(b"[{\"x\":1}]").is_err());
    }
}
