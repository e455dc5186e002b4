//! Contact commands and queries.

use std::collections::BTreeMap;

use cqrs_es::Aggregate;
use crm_domain::contact::{
    Contact, ContactChanges, ContactCommand, ContactEvent, ContactField, ContactProfile,
};
use crm_domain::values::{
    Address, CountryCode, CustomFieldKey, CustomFieldValue, Email, InvalidValue, Line, Name, Phone,
    Text, TimeZone,
};
use crm_infra::read_models::contacts::{self as contacts_rm, ContactFilter};
use crm_infra::store::decode::decode;
use crm_infra::store::event_store::{self, StreamId};
use crm_infra::store::snapshots;
use crm_projections::contacts::ContactView;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::schemas::{CustomFieldChanges, CustomFields, Outcome, Time};
use super::{consistency, parse_limit, Authed};
use crate::auth::visibility;
use crate::edge::extract::{Id, Json, Query};
use crate::edge::reply::{Created, Ok200, Shaped};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;
use crm_domain::access::Permission;

/// Absent → `None` (with `#[serde(default)]`); `null` is refused; a value → `Some(v)`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Absent → `None`; `null` → `Some(None)`; a value → `Some(Some(v))`.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A postal address: every part optional, at least one present.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Address)]
pub(crate) struct AddressInput {
    #[schema(value_type = String, required = false, max_length = 300, pattern = "@line")]
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    line1: Option<String>,
    #[schema(value_type = String, required = false, max_length = 300, pattern = "@line")]
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    line2: Option<String>,
    #[schema(value_type = String, required = false, max_length = 300, pattern = "@line")]
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    city: Option<String>,
    #[schema(value_type = String, required = false, max_length = 300, pattern = "@line")]
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    region: Option<String>,
    #[schema(value_type = String, required = false, max_length = 20, pattern = "@line")]
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    postal_code: Option<String>,
    /// ISO 3166-1 alpha-2, e.g. `DE`.
    #[schema(value_type = String, required = false, pattern = "@country")]
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    country: Option<String>,
}

/// The body of `POST /v1/contacts` and `PATCH /v1/contacts/{id}`. In a PATCH, a field
/// set to `null` is cleared and an absent field is left alone.
/// The body of `POST /v1/contacts`: at least one field.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    example = json!({"given_name": "Ada", "family_name": "Lovelace", "email": "ada@example.com", "company": "Analytical Engines Ltd", "custom": {"tier": "gold"}})
)]
pub(crate) struct NewContactInput {
    // Parsed like a change (a `null` is refused by name), documented without null.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, max_length = 200, pattern = "@line")]
    given_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, max_length = 200, pattern = "@line")]
    family_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, max_length = 254, pattern = "@email")]
    email: Option<Option<String>>,
    /// E.164: `+`, then 8 to 15 digits, the first not 0.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, pattern = "@phone")]
    phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = AddressInput, required = false)]
    address: Option<Option<AddressInput>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, max_length = 300, pattern = "@line")]
    company: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, max_length = 300, pattern = "@line")]
    title: Option<Option<String>>,
    /// IANA time zone (`Europe/Berlin`): quiet hours for sms and phone.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, max_length = 64, pattern = "@line")]
    time_zone: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = CustomFields, required = false)]
    custom: Option<BTreeMap<String, Value>>,
    /// Refused by name: a create has no version to expect.
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(ignore)]
    expected_version: Option<i64>,
}

impl From<NewContactInput> for ContactInput {
    fn from(i: NewContactInput) -> Self {
        Self {
            given_name: i.given_name,
            family_name: i.family_name,
            email: i.email,
            phone: i.phone,
            address: i.address,
            company: i.company,
            title: i.title,
            time_zone: i.time_zone,
            custom: i.custom,
            expected_version: i.expected_version,
        }
    }
}

/// The body of `PATCH /v1/contacts/{id}`: a field set to `null` is cleared, an absent
/// field is left alone; at least one field.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    example = json!({"title": "Countess", "company": null, "expected_version": 3})
)]
pub(crate) struct ContactInput {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 200, pattern = "@line")]
    given_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 200, pattern = "@line")]
    family_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 254, pattern = "@email")]
    email: Option<Option<String>>,
    /// E.164: `+`, then 8 to 15 digits, the first not 0.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, pattern = "@phone")]
    phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<AddressInput>)]
    address: Option<Option<AddressInput>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 300, pattern = "@line")]
    company: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 300, pattern = "@line")]
    title: Option<Option<String>>,
    /// IANA time zone (`Europe/Berlin`): quiet hours for sms and phone.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 64, pattern = "@line")]
    time_zone: Option<Option<String>>,
    #[serde(default)]
    #[schema(value_type = CustomFieldChanges, required = false)]
    custom: Option<BTreeMap<String, Value>>,
    /// Optimistic concurrency: the version the client last saw (409 when stale).
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    pub(crate) expected_version: Option<i64>,
}

/// A contact, with the fields the caller's role may read (the others are absent).
#[derive(Serialize, ToSchema)]
#[schema(as = Contact)]
#[allow(dead_code)] // documents the JSON that `view_json` builds
pub(crate) struct ContactDoc {
    id: Uuid,
    version: i64,
    archived: bool,
    given_name: Option<String>,
    family_name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    address: Option<AddressInput>,
    company: Option<String>,
    title: Option<String>,
    /// IANA time zone.
    time_zone: Option<String>,
    /// Custom fields (absent when the role hides them).
    #[schema(value_type = Option<Object>)]
    custom: Option<BTreeMap<String, Value>>,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Only on `?as_of=` reads: the time asked for.
    as_of: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether a legal hold is in place (erasure is refused while it is).
    legal_hold: Option<bool>,
    /// Whether the contact's processing is restricted (GDPR Art. 18; the send gate
    /// refuses every purpose not allowed under restriction until it is lifted).
    processing_restricted: Option<bool>,
    /// The contact's own retention period in days; null: the organisation's.
    retention_days: Option<u32>,
    /// When the contact was erased: its fields are gone for good (null: not erased).
    erased_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A page of contacts, by id.
#[derive(Serialize, ToSchema)]
pub(crate) struct ContactPage {
    #[schema(value_type = Vec<ContactDoc>)]
    items: Vec<Shaped<ContactDoc>>,
    /// Pass as `after` for the next page; null on the last.
    next_after: Option<Uuid>,
}

/// A page of a contact's events, oldest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct History {
    id: Uuid,
    events: Vec<HistoryEvent>,
    /// Pass as `after` for the next page (the last event's `sequence`); null on the
    /// last page.
    next_after: Option<i64>,
}

/// `GET /v1/contacts/{id}/history` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Events after this sequence (`next_after` of the previous page; default 0, the
    /// first event on).
    #[param(minimum = 0)]
    after: Option<i64>,
}

/// One event of a contact's stream, decrypted and redacted for the caller.
#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryEvent {
    event_id: Uuid,
    sequence: i64,
    position: i64,
    /// e.g. `ContactCreated`, `ContactUpdated`, `ContactArchived`.
    #[serde(rename = "type")]
    event_type: String,
    version: String,
    recorded_at: chrono::DateTime<chrono::Utc>,
    /// The event's members, those the caller's role hides removed.
    #[schema(value_type = Object)]
    data: Value,
    /// Who, from where, in which request (personal members redacted like `data`).
    #[schema(value_type = Object)]
    metadata: Value,
    /// Hex SHA-256 of the stored event, chained per stream.
    hash: String,
}

/// `GET /v1/contacts` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// The last id of the previous page (`next_after`).
    after: Option<Uuid>,
    /// Exact email address (needs read access to `email`).
    #[param(pattern = "@no_nul")]
    email: Option<String>,
    /// Exact company (needs read access to `company`).
    #[param(pattern = "@no_nul")]
    company: Option<String>,
    /// Substring of name, email or company, case-insensitive.
    #[param(pattern = "@no_nul")]
    q: Option<String>,
    /// `false` (default), `true` or `any`.
    #[param(inline)]
    archived: Option<ArchivedFilter>,
    /// Only contacts changed at or after this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    updated_since: Option<Time>,
    /// Wait (bounded) until the read model has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ArchivedFilter {
    True,
    False,
    Any,
}

/// `GET /v1/contacts/{id}` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct GetQuery {
    /// The contact as it was at this time, from its events (needs `contacts.history`).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    as_of: Option<Time>,
    /// Wait (bounded) until the read model has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

struct Parsed {
    set: ContactProfile,
    cleared: Vec<ContactField>,
    cleared_custom: Vec<CustomFieldKey>,
}

fn field<T>(
    errors: &mut Vec<FieldError>,
    name: &str,
    input: Option<Option<String>>,
    parse: impl Fn(&str) -> Result<T, InvalidValue>,
    cleared: &mut Vec<ContactField>,
) -> Option<T> {
    match input {
        None => None,
        Some(None) => {
            if let Some(f) = ContactField::parse(name) {
                cleared.push(f);
            }
            None
        }
        Some(Some(v)) => match parse(&v) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(FieldError::new(name, e.0));
                None
            }
        },
    }
}

fn parse_address(errors: &mut Vec<FieldError>, a: AddressInput) -> Option<Address> {
    fn part<T>(
        errors: &mut Vec<FieldError>,
        name: &str,
        v: Option<String>,
        p: impl Fn(&str) -> Result<T, InvalidValue>,
    ) -> Option<T> {
        v.and_then(|v| {
            p(&v)
                .map_err(|e| errors.push(FieldError::new(format!("address.{name}"), e.0)))
                .ok()
        })
    }
    let errors_before = errors.len();
    let addr = Address {
        line1: part(errors, "line1", a.line1, Line::parse),
        line2: part(errors, "line2", a.line2, Line::parse),
        city: part(errors, "city", a.city, Line::parse),
        region: part(errors, "region", a.region, Line::parse),
        postal_code: part(errors, "postal_code", a.postal_code, Text::<20>::parse),
        country: part(errors, "country", a.country, CountryCode::parse),
    };
    if addr == Address::default() && errors.len() == errors_before {
        errors.push(FieldError::new("address", "needs at least one part"));
        return None;
    }
    Some(addr)
}

fn parse_input(input: ContactInput) -> Result<Parsed, ApiError> {
    let mut errors = Vec::new();
    let mut cleared = Vec::new();
    let mut cleared_custom = Vec::new();
    let mut set = ContactProfile {
        given_name: field(
            &mut errors,
            "given_name",
            input.given_name,
            Name::parse,
            &mut cleared,
        ),
        family_name: field(
            &mut errors,
            "family_name",
            input.family_name,
            Name::parse,
            &mut cleared,
        ),
        email: field(
            &mut errors,
            "email",
            input.email,
            Email::parse,
            &mut cleared,
        ),
        phone: field(
            &mut errors,
            "phone",
            input.phone,
            Phone::parse,
            &mut cleared,
        ),
        company: field(
            &mut errors,
            "company",
            input.company,
            Line::parse,
            &mut cleared,
        ),
        title: field(&mut errors, "title", input.title, Line::parse, &mut cleared),
        time_zone: field(
            &mut errors,
            "time_zone",
            input.time_zone,
            TimeZone::parse,
            &mut cleared,
        ),
        ..Default::default()
    };
    match input.address {
        None => {}
        Some(None) => cleared.push(ContactField::Address),
        Some(Some(a)) => set.address = parse_address(&mut errors, a),
    }
    if let Some(custom) = input.custom {
        if custom.len() > 100 {
            errors.push(FieldError::new("custom", "at most 100 custom fields"));
        }
        for (k, v) in custom {
            let key = match CustomFieldKey::parse(&k) {
                Ok(key) => key,
                Err(e) => {
                    errors.push(FieldError::new(format!("custom.{k}"), e.0));
                    continue;
                }
            };
            if v.is_null() {
                cleared_custom.push(key);
                continue;
            }
            match CustomFieldValue::parse(&v) {
                Ok(val) => {
                    set.custom.insert(key, val);
                }
                Err(e) => errors.push(FieldError::new(format!("custom.{k}"), e.0)),
            }
        }
    }
    if errors.is_empty() {
        Ok(Parsed {
            set,
            cleared,
            cleared_custom,
        })
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// The JSON of a contact: its fields side by side with id, version and state.
fn contact_json(id: Uuid, version: i64, profile: &ContactProfile, archived: bool) -> Value {
    let mut v = serde_json::to_value(profile).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), json!(id));
        m.insert("version".into(), json!(version));
        m.insert("archived".into(), json!(archived));
        m.entry("custom").or_insert_with(|| json!({}));
    }
    v
}

pub(crate) fn view_json(v: &ContactView) -> Value {
    let mut out = contact_json(v.id, v.version, &v.profile, v.archived);
    out["created_at"] = json!(v.created_at);
    out["updated_at"] = json!(v.updated_at);
    out["legal_hold"] = json!(v.legal_hold);
    out["processing_restricted"] = json!(v.processing_restricted);
    out["retention_days"] = json!(v.retention_days);
    out["erased_at"] = json!(v.erased_at);
    out
}

/// The names of the fields a profile sets (`custom` for any custom field).
fn set_names(p: &ContactProfile) -> impl Iterator<Item = &'static str> + '_ {
    [
        ("given_name", p.given_name.is_some()),
        ("family_name", p.family_name.is_some()),
        ("email", p.email.is_some()),
        ("phone", p.phone.is_some()),
        ("address", p.address.is_some()),
        ("company", p.company.is_some()),
        ("title", p.title.is_some()),
        ("time_zone", p.time_zone.is_some()),
        ("custom", !p.custom.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
}

/// What a change (as `PATCH /v1/contacts/{id}` takes it) would touch, validated as
/// that route validates it: the standard fields it sets or clears, and whether it sets
/// or clears a custom field. For the risk policy of AI actions.
pub(crate) fn fields_touched(input: ContactInput) -> Result<(Vec<ContactField>, bool), ApiError> {
    let parsed = parse_input(input)?;
    let mut fields: Vec<ContactField> = set_names(&parsed.set)
        .filter_map(|n| ContactField::ALL.into_iter().find(|f| f.name() == n))
        .chain(parsed.cleared.iter().copied())
        .collect();
    fields.sort();
    fields.dedup();
    let custom = !parsed.set.custom.is_empty() || !parsed.cleared_custom.is_empty();
    if fields.is_empty() && !custom {
        return Err(ApiError::Validation(vec![FieldError::new(
            "arguments",
            "names no field to change",
        )]));
    }
    Ok((fields, custom))
}

/// 403 naming the first field the caller may not write: among those `set` sets,
/// `cleared` clears, and `custom` when custom fields are cleared.
fn check_writes(
    a: &Authed,
    set: &ContactProfile,
    cleared: &[ContactField],
    clears_custom: bool,
) -> Result<(), ApiError> {
    let names = set_names(set)
        .chain(cleared.iter().map(|f| f.name()))
        .chain(clears_custom.then_some("custom"));
    visibility::check_writes(&a.access.policy, names)
}

pub(crate) async fn create(
    s: AppState,
    a: Authed,
    Json(input): Json<NewContactInput>,
) -> Result<Created<Outcome>, ApiError> {
    let input = ContactInput::from(input);
    if input.expected_version.is_some() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "expected_version",
            "only allowed when updating",
        )]));
    }
    let parsed = parse_input(input)?;
    if !parsed.cleared.is_empty() || !parsed.cleared_custom.is_empty() {
        let mut fields: Vec<FieldError> = parsed
            .cleared
            .iter()
            .map(|f| FieldError::new(f.name(), "must not be null"))
            .collect();
        fields.extend(
            parsed
                .cleared_custom
                .iter()
                .map(|k| FieldError::new(format!("custom.{}", k.as_str()), "must not be null")),
        );
        return Err(ApiError::Validation(fields));
    }
    check_writes(&a, &parsed.set, &[], false)?;
    let id = Uuid::now_v7();
    let command = ContactCommand::Create {
        contact_id: id,
        org_id: a.caller.org_id,
        profile: parsed.set,
    };
    let outcome = s
        .executor
        .execute::<Contact>(
            a.caller.org_id,
            &id.to_string(),
            command,
            &a.metadata(),
            Some(0),
        )
        .await?;
    Ok(Created {
        body: Outcome::from(&outcome),
        location: format!("/v1/contacts/{id}"),
    })
}

pub(crate) async fn update(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ContactInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let (command, expected) = update_command(&a, input)?;
    let outcome = s
        .executor
        .execute::<Contact>(
            a.caller.org_id,
            &id.to_string(),
            command,
            &a.metadata(),
            expected,
        )
        .await?;
    Ok(super::outcome(&outcome))
}

/// What `PATCH /v1/contacts/{id}` with `input` asks of the contact as caller `a`: the
/// command and the version it expects, or the route's refusal (bad input, a field `a`
/// may not write).
pub(crate) fn update_command(
    a: &Authed,
    input: ContactInput,
) -> Result<(ContactCommand, Option<i64>), ApiError> {
    let expected = input.expected_version;
    if expected.is_some_and(|v| v < 1) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "expected_version",
            "must be 1 or more",
        )]));
    }
    let parsed = parse_input(input)?;
    let changes = ContactChanges {
        set: parsed.set,
        cleared: parsed.cleared,
        cleared_custom: parsed.cleared_custom,
    };
    if changes.is_empty() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "body",
            "names no field to change",
        )]));
    }
    check_writes(
        a,
        &changes.set,
        &changes.cleared,
        !changes.cleared_custom.is_empty(),
    )?;
    Ok((ContactCommand::Update { changes }, expected))
}

pub(crate) async fn archive(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    let outcome = s
        .executor
        .execute::<Contact>(
            a.caller.org_id,
            &id.to_string(),
            ContactCommand::Archive,
            &a.metadata(),
            None,
        )
        .await?;
    Ok(super::outcome(&outcome))
}

pub(crate) async fn get_one(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Query(q): Query<GetQuery>,
) -> Result<Ok200<Shaped<ContactDoc>>, ApiError> {
    // Checked also when `as_of` makes them moot: a bad parameter is refused, never
    // ignored.
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    if let Some(Time(as_of)) = q.as_of {
        // Reading the past is reading history.
        a.require(Permission::ContactsHistory)?;
        return as_of_read(s, a, id, as_of).await;
    }
    s.await_projection("contacts", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let view = contacts_rm::get(&tx, a.caller.org_id, id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    let mut body = view_json(&view);
    visibility::contact(&a.access.policy, &mut body);
    Ok(Ok200(Shaped::new(body)))
}

/// The contact as it was at `as_of`: from the latest snapshot whose last event was
/// recorded by then (if any), and the stream's events after it up to `as_of`. A stream
/// is recorded in sequence order, so this is exactly the replay of every event recorded
/// at or before `as_of`.
async fn as_of_read(
    s: AppState,
    a: Authed,
    id: Uuid,
    as_of: chrono::DateTime<chrono::Utc>,
) -> Result<Ok200<Shaped<ContactDoc>>, ApiError> {
    let client = s.pool.get().await?;
    let sid = id.to_string();
    let stream = StreamId {
        org_id: a.caller.org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &sid,
    };
    let (mut contact, mut version, mut updated_at) = match snapshots::load_at_or_before::<Contact>(
        s.executor.crypto(),
        &client,
        &stream,
        Some(as_of),
    )
    .await?
    {
        Some(snap) => (snap.aggregate, snap.head.version, Some(snap.recorded_at)),
        None => (Contact::default(), 0, None),
    };
    for stored in event_store::read_stream(&client, &stream, version, Some(as_of)).await? {
        version = stored.sequence;
        updated_at = Some(stored.recorded_at);
        let decoded = decode(s.executor.crypto(), &client, stored).await?;
        contact.apply(decoded.typed::<ContactEvent>()?);
    }
    if version == 0 {
        return Err(ApiError::NotFound("contact not found at that time"));
    }
    let mut body = contact_json(id, version, &contact.profile, contact.archived);
    body["as_of"] = json!(as_of);
    body["updated_at"] = json!(updated_at);
    body["legal_hold"] = json!(contact.legal_hold);
    body["processing_restricted"] = json!(contact.restricted && !contact.erased);
    body["retention_days"] = json!(contact.retention_days.filter(|_| !contact.erased));
    // The tombstone is a stream's last event.
    body["erased_at"] = json!(contact.erased.then_some(updated_at).flatten());
    visibility::contact(&a.access.policy, &mut body);
    Ok(Ok200(Shaped::new(body)))
}

pub(crate) async fn history(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Query(q): Query<HistoryQuery>,
) -> Result<Ok200<History>, ApiError> {
    let limit = parse_limit(q.limit)?;
    let after = match q.after {
        None => 0,
        Some(n) if n >= 0 => n,
        Some(_) => return Err(super::query_error("after", "must be 0 or more")),
    };
    let client = s.pool.get().await?;
    let sid = id.to_string();
    let stream = StreamId {
        org_id: a.caller.org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &sid,
    };
    let events = event_store::read_stream_page(&client, &stream, after, limit).await?;
    // An empty page is the end of an existing stream, or no contact at all (here, or in
    // another organisation: the same 404).
    if events.is_empty() && (after == 0 || !event_store::stream_exists(&client, &stream).await?) {
        return Err(ApiError::NotFound("contact not found"));
    }
    let next_after = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.sequence))
        .flatten();
    let mut items = Vec::with_capacity(events.len());
    for stored in events {
        let d = decode(s.executor.crypto(), &client, stored).await?;
        items.push(history_event(d, &a.access.policy));
    }
    Ok(Ok200(History {
        id,
        events: items,
        next_after,
    }))
}

/// One event of a contact's streams, decrypted (a personal member whose key was
/// destroyed reads null) and redacted for a reader with `policy`.
pub(crate) fn history_event(
    d: crm_infra::store::decode::DecodedEvent,
    policy: &crm_domain::access::Policy,
) -> HistoryEvent {
    let mut data = d
        .payload
        .as_object()
        .and_then(|o| o.values().next().cloned())
        .unwrap_or(Value::Null);
    let mut metadata = serde_json::to_value(&d.metadata).unwrap_or(Value::Null);
    visibility::contact_event(policy, &mut data, &mut metadata);
    HistoryEvent {
        event_id: d.stored.event_id,
        sequence: d.stored.sequence,
        position: d.stored.global_position,
        event_type: d.stored.event_type,
        version: d.stored.event_version,
        recorded_at: d.stored.recorded_at,
        data,
        metadata,
        hash: d.stored.hash,
    }
}

pub(crate) async fn list(
    s: AppState,
    a: Authed,
    Query(q): Query<ListQuery>,
) -> Result<Ok200<ContactPage>, ApiError> {
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    let limit = parse_limit(q.limit)?;
    let policy = &a.access.policy;
    for (given, fields) in [
        (q.email.is_some(), &["email"][..]),
        (q.company.is_some(), &["company"][..]),
        (
            q.q.is_some(),
            &["given_name", "family_name", "email", "company"][..],
        ),
    ] {
        if given {
            visibility::check_filters(policy, fields.iter().copied())?;
        }
    }
    let archived = match q.archived {
        None | Some(ArchivedFilter::False) => Some(false),
        Some(ArchivedFilter::True) => Some(true),
        Some(ArchivedFilter::Any) => None,
    };
    let filter = ContactFilter {
        email: q.email,
        company: q.company,
        q: q.q.filter(|v| !v.is_empty()),
        archived,
        updated_since: q.updated_since.map(|t| t.0),
        after: q.after,
        limit,
        updated_since_cap: None,
    };
    s.await_projection("contacts", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let views = contacts_rm::list(&tx, a.caller.org_id, &filter).await?;
    let next = (views.len() as i64 == limit)
        .then(|| views.last().map(|v| v.id))
        .flatten();
    let items = views
        .iter()
        .map(|v| {
            let mut json = view_json(v);
            visibility::contact(policy, &mut json);
            Shaped::new(json)
        })
        .collect();
    Ok(Ok200(ContactPage {
        items,
        next_after: next,
    }))
}
