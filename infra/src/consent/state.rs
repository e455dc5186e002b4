//! The one read path of consent state for decisions: a contact's `consent` stream
//! folded with the id of every event (`crm_domain::consent::ledger::fold`), its time
//! zone and contact points from its `contact` stream, the suppression list, and the
//! organisation's settings. Read from the store, not a read model: a decision is exact
//! at its moment, whatever a projection's lag.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::consent::gate::{self, ConsentState, Decision, Request};
use crm_domain::consent::ledger::{fold, ConsentEvent, ConsentLedger};
use crm_domain::consent::privacy::PrivacySettings;
use crm_domain::consent::Channel;
use crm_domain::contact::{Contact, ContactEvent, ContactProfile};
use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::normalize_point;
use crate::commands::executor::Executor;
use crate::store::decode::decode;
use crate::store::event_store::{self, StoreError, StreamId};

/// A contact's consent, folded from its events recorded up to `as_of` (all of them
/// when `None`).
pub async fn consent_state(
    executor: &Executor,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
    as_of: Option<DateTime<Utc>>,
) -> Result<ConsentState, StoreError> {
    let id = contact_id.to_string();
    let stream = StreamId {
        org_id,
        aggregate_type: ConsentLedger::TYPE,
        aggregate_id: &id,
    };
    let mut state = ConsentState::default();
    for stored in event_store::read_stream(client, &stream, 0, as_of).await? {
        let event_id = stored.event_id;
        let decoded = decode(executor.crypto(), client, stored).await?;
        fold(&mut state, event_id, &decoded.typed::<ConsentEvent>()?);
    }
    Ok(state)
}

/// Whether the contact exists in `org_id` (archived ones included).
pub async fn contact_exists(
    executor: &Executor,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<bool, StoreError> {
    let id = contact_id.to_string();
    let stream = StreamId {
        org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &id,
    };
    // The contact's data key, which its consent events share, is fetched beside (and
    // cached): the consent append that usually follows then takes the group-commit
    // fast path instead of finding the key taken and falling back to a transaction.
    let (exists, _key) = futures::try_join!(event_store::stream_exists(client, &stream), async {
        executor
            .crypto()
            .key_for_reading(client, &org_id, &id)
            .await
            .map_err(StoreError::from)
    },)?;
    Ok(exists)
}

/// Where `channel` reaches the contact: its e-mail address, its phone number, or its
/// postal address on one line.
pub fn contact_point(p: &ContactProfile, channel: Channel) -> Option<String> {
    match channel {
        Channel::Email => p.email.as_ref().map(|e| e.to_string()),
        Channel::Sms | Channel::Whatsapp | Channel::Phone => {
            p.phone.as_ref().map(|n| n.as_str().to_owned())
        }
        Channel::Postal => p.address.as_ref().map(|a| {
            [
                a.line1.as_ref().map(|v| v.to_string()),
                a.line2.as_ref().map(|v| v.to_string()),
                a.postal_code.as_ref().map(|v| v.to_string()),
                a.city.as_ref().map(|v| v.to_string()),
                a.region.as_ref().map(|v| v.to_string()),
                a.country.as_ref().map(|v| v.as_str().to_owned()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        }),
    }
}

/// SHA-256 (hex) of a contact point as the suppression list keys it.
pub fn point_sha256(channel: Channel, point: &str) -> String {
    hex::encode(Sha256::digest(normalize_point(channel, point).as_bytes()))
}

/// The event that put `point` on the organisation's suppression list for `channel`.
pub async fn suppressed_by(
    client: &impl GenericClient,
    org_id: Uuid,
    channel: Channel,
    point: &str,
) -> Result<Option<Uuid>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT event_id FROM suppression_list \
             WHERE org_id = $1 AND channel = $2 AND point_sha256 = $3",
        )
        .await?;
    let row = client
        .query_opt(
            &stmt,
            &[&org_id, &channel.name(), &point_sha256(channel, point)],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Everything one decision rests on.
pub struct GateInput {
    pub contact: Contact,
    pub state: ConsentState,
    pub settings: PrivacySettings,
    /// Whether the organisation's suppression list has any entry at all.
    pub suppressions: bool,
}

/// Loads what the gate needs to decide for `contact_id` now; `None` when there is no
/// such contact in `org_id`.
pub async fn load(
    executor: &Executor,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<Option<GateInput>, StoreError> {
    // The contact's two streams in one statement, the settings beside it (pipelined).
    let id = contact_id.to_string();
    let (events, (settings, suppressions)) = futures::try_join!(
        event_store::read_sibling_streams(
            client,
            org_id,
            &[Contact::TYPE, ConsentLedger::TYPE],
            &id
        ),
        super::privacy::load_with_suppressions(client, org_id),
    )?;
    let mut contact = Contact::default();
    let mut state = ConsentState::default();
    for stored in events {
        let (event_id, is_contact) = (stored.event_id, stored.aggregate_type == Contact::TYPE);
        let decoded = decode(executor.crypto(), client, stored).await?;
        if is_contact {
            contact.apply(decoded.typed::<ContactEvent>()?);
        } else {
            fold(&mut state, event_id, &decoded.typed::<ConsentEvent>()?);
        }
    }
    if !contact.exists() {
        return Ok(None);
    }
    state.time_zone = contact.profile.time_zone.map(|tz| tz.0);
    Ok(Some(GateInput {
        contact,
        state,
        settings,
        suppressions,
    }))
}

impl GateInput {
    /// The gate's decision for `request` at `now` (the suppression list looked up for
    /// the request's contact point).
    pub async fn decide(
        &mut self,
        client: &impl GenericClient,
        org_id: Uuid,
        request: &Request,
        now: DateTime<Utc>,
    ) -> Result<Decision, StoreError> {
        self.state.suppressed_by = if self.suppressions {
            suppressed_by(client, org_id, request.channel, &request.contact_point).await?
        } else {
            None
        };
        Ok(gate::decide(
            &self.state,
            &self.settings.gate_settings(),
            request,
            now,
        ))
    }
}
