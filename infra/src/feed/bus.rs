//! NATS JetStream: connection, the events stream and its subjects.

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

/// The body of a feed message: one event as a JSON object, or the events one commit
/// wrote to one stream, in order, as a JSON array of them. Grouping a commit's events
/// per stream keeps the subject the stream's own, so a consumer's subject filter means
/// what it meant with one event per message; it takes one publish, one stored message,
/// one delivery and one ack per group instead of one each (an AI action run at once:
/// its proposed and auto-approved steps are one message; the contact's change and the
/// executed step that follow it one each, as messages keep commit order).
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

/// The lengths of the runs of `events` (in commit order) that go in one message each:
/// consecutive events of one commit (transaction) and one stream, at most
/// [`MAX_EVENTS_PER_MESSAGE`] and [`MAX_GROUP_BYTES`].
pub fn message_runs(events: &[RawEvent]) -> Vec<usize> {
    let mut runs: Vec<usize> = Vec::new();
    let mut bytes = 0;
    let mut prev: Option<&RawEvent> = None;
    for e in events {
        let same = prev.is_some_and(|p| {
            p.tx_id == e.tx_id
                && p.org_id == e.org_id
                && p.aggregate_type == e.aggregate_type
                && p.aggregate_id == e.aggregate_id
        });
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
        prev = Some(e);
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
