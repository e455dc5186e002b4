//! Contact commands and queries.

use std::collections::BTreeMap;

use cqrs_es::Aggregate;
use crm_domain::contact::{
    Contact, ContactChanges, ContactCommand, ContactEvent, ContactField, ContactProfile,
};
use crm_domain::values::{
    Address, CountryCode, CustomFieldKey, CustomFieldValue, Email, InvalidValue, Line, Name, Phone,
    Text,
};
use crm_infra::commands::executor::CommandOutcome;
use crm_infra::read_models::contacts::{self as contacts_rm, ContactFilter};
use crm_infra::store::decode::decode;
use crm_infra::store::event_store::{self, StreamId};
use crm_projections::contacts::ContactView;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

use super::{
    allowed, body, consistency, parse_limit, parse_query, parse_time, raw_query, require_json,
    with_state, Authed,
};
use crate::error::{finish, json_response, parse_json, ApiError, FieldError};
use crate::state::AppState;
use crate::visibility;
use crm_domain::access::Permission;

/// Absent → `None`; `null` → `Some(None)`; a value → `Some(Some(v))`.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddressInput {
    line1: Option<String>,
    line2: Option<String>,
    city: Option<String>,
    region: Option<String>,
    postal_code: Option<String>,
    country: Option<String>,
}

/// The body of `POST /v1/contacts` and `PATCH /v1/contacts/{id}`. In a PATCH, a field
/// set to `null` is cleared and an absent field is left alone.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContactInput {
    #[serde(default, deserialize_with = "nullable")]
    given_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    family_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    email: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    address: Option<Option<AddressInput>>,
    #[serde(default, deserialize_with = "nullable")]
    company: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    title: Option<Option<String>>,
    #[serde(default)]
    custom: Option<BTreeMap<String, Value>>,
    /// Optimistic concurrency for updates: the version the client last saw.
    #[serde(default)]
    expected_version: Option<i64>,
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

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    super::parse_uuid(raw, "contact")
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
        ("custom", !p.custom.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
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

fn outcome_json(o: &CommandOutcome) -> Value {
    json!({ "id": o.id, "version": o.version, "positions": o.positions })
}

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let limit = state.settings.http.max_body_bytes;
    let create = warp::path!("v1" / "contacts")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ContactsCreate))
        .and(body(limit))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(create(s, a, ct, b).await, &rid)
            },
        );
    let update = warp::path!("v1" / "contacts" / String)
        .and(warp::patch())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ContactsUpdate))
        .and(body(limit))
        .and_then(
            |id: String, s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(update(s, a, id, ct, b).await, &rid)
            },
        );
    let archive = warp::path!("v1" / "contacts" / String / "archive")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ContactsArchive))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(archive(s, a, id).await, &rid)
        });
    let history = warp::path!("v1" / "contacts" / String / "history")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ContactsHistory))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(history(s, a, id).await, &rid)
        });
    let get_one = warp::path!("v1" / "contacts" / String)
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ContactsRead))
        .and(raw_query())
        .and_then(|id: String, s: AppState, a: Authed, q: String| async move {
            let rid = a.ctx.request_id.clone();
            finish(get_one(s, a, id, q).await, &rid)
        });
    let list = warp::path!("v1" / "contacts")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state, Permission::ContactsRead))
        .and(raw_query())
        .and_then(|s: AppState, a: Authed, q: String| async move {
            let rid = a.ctx.request_id.clone();
            finish(list(s, a, q).await, &rid)
        });
    create
        .or(update)
        .unify()
        .or(archive)
        .unify()
        .or(history)
        .unify()
        .or(get_one)
        .unify()
        .or(list)
        .unify()
        .boxed()
}

async fn create(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let input: ContactInput = parse_json(&body)?;
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
    let mut resp = json_response(
        StatusCode::CREATED,
        &outcome_json(&outcome),
        &a.ctx.request_id,
    );
    if let Ok(v) = format!("/v1/contacts/{id}").parse() {
        resp.headers_mut().insert("location", v);
    }
    Ok(resp)
}

async fn update(
    s: AppState,
    a: Authed,
    id: String,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    require_json(ct.as_deref())?;
    let input: ContactInput = parse_json(&body)?;
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
        &a,
        &changes.set,
        &changes.cleared,
        !changes.cleared_custom.is_empty(),
    )?;
    let outcome = s
        .executor
        .execute::<Contact>(
            a.caller.org_id,
            &id.to_string(),
            ContactCommand::Update { changes },
            &a.metadata(),
            expected,
        )
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &outcome_json(&outcome),
        &a.ctx.request_id,
    ))
}

async fn archive(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
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
    Ok(json_response(
        StatusCode::OK,
        &outcome_json(&outcome),
        &a.ctx.request_id,
    ))
}

async fn get_one(s: AppState, a: Authed, id: String, raw: String) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let q = parse_query(&raw, &["as_of", "min_position", "wait_ms"])?;
    if let Some(as_of) = q.get("as_of") {
        // Reading the past is reading history.
        a.require(Permission::ContactsHistory)?;
        let as_of = parse_time("as_of", as_of)?;
        return as_of_read(s, a, id, as_of).await;
    }
    let (pos, wait) = consistency(&q)?;
    s.await_projection("contacts", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let view = contacts_rm::get(&tx, a.caller.org_id, id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    let mut body = view_json(&view);
    visibility::contact(&a.access.policy, &mut body);
    Ok(json_response(StatusCode::OK, &body, &a.ctx.request_id))
}

/// The contact as it was at `as_of`, rebuilt from its events.
async fn as_of_read(
    s: AppState,
    a: Authed,
    id: Uuid,
    as_of: chrono::DateTime<chrono::Utc>,
) -> Result<Response, ApiError> {
    let client = s.pool.get().await?;
    let sid = id.to_string();
    let stream = StreamId {
        org_id: a.caller.org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &sid,
    };
    let events = event_store::read_stream(&client, &stream, 0, Some(as_of)).await?;
    if events.is_empty() {
        return Err(ApiError::NotFound("contact not found at that time"));
    }
    let mut contact = Contact::default();
    let mut version = 0;
    let mut updated_at = None;
    for stored in events {
        version = stored.sequence;
        updated_at = Some(stored.recorded_at);
        let decoded = decode(s.executor.crypto(), &client, stored).await?;
        contact.apply(decoded.typed::<ContactEvent>()?);
    }
    let mut body = contact_json(id, version, &contact.profile, contact.archived);
    body["as_of"] = json!(as_of);
    body["updated_at"] = json!(updated_at);
    visibility::contact(&a.access.policy, &mut body);
    Ok(json_response(StatusCode::OK, &body, &a.ctx.request_id))
}

async fn history(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let client = s.pool.get().await?;
    let sid = id.to_string();
    let stream = StreamId {
        org_id: a.caller.org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &sid,
    };
    let events = event_store::read_stream(&client, &stream, 0, None).await?;
    if events.is_empty() {
        return Err(ApiError::NotFound("contact not found"));
    }
    let mut items = Vec::with_capacity(events.len());
    for stored in events {
        let d = decode(s.executor.crypto(), &client, stored).await?;
        let mut data = d
            .payload
            .as_object()
            .and_then(|o| o.values().next().cloned())
            .unwrap_or(Value::Null);
        let mut metadata = serde_json::to_value(&d.metadata).unwrap_or(Value::Null);
        visibility::contact_event(&a.access.policy, &mut data, &mut metadata);
        items.push(json!({
            "event_id": d.stored.event_id,
            "sequence": d.stored.sequence,
            "position": d.stored.global_position,
            "type": d.stored.event_type,
            "version": d.stored.event_version,
            "recorded_at": d.stored.recorded_at,
            "data": data,
            "metadata": metadata,
            "hash": d.stored.hash,
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({ "id": id, "events": items }),
        &a.ctx.request_id,
    ))
}

async fn list(s: AppState, a: Authed, raw: String) -> Result<Response, ApiError> {
    let q = parse_query(
        &raw,
        &[
            "limit",
            "after",
            "email",
            "company",
            "q",
            "archived",
            "updated_since",
            "min_position",
            "wait_ms",
        ],
    )?;
    let (pos, wait) = consistency(&q)?;
    let limit = parse_limit(&q)?;
    let policy = &a.access.policy;
    for (param, fields) in [
        ("email", &["email"][..]),
        ("company", &["company"][..]),
        ("q", &["given_name", "family_name", "email", "company"][..]),
    ] {
        if q.contains_key(param) {
            visibility::check_filters(policy, fields.iter().copied())?;
        }
    }
    let archived = match q.get("archived").map(String::as_str) {
        None | Some("false") => Some(false),
        Some("true") => Some(true),
        Some("any") => None,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`archived` must be true, false or any",
            ))
        }
    };
    let filter = ContactFilter {
        email: q.get("email").cloned(),
        company: q.get("company").cloned(),
        q: q.get("q").cloned().filter(|v| !v.is_empty()),
        archived,
        updated_since: q
            .get("updated_since")
            .map(|v| parse_time("updated_since", v))
            .transpose()?,
        after: q
            .get("after")
            .map(|v| {
                Uuid::parse_str(v).map_err(|_| {
                    ApiError::bad_request("invalid_query", "`after` must be a contact id")
                })
            })
            .transpose()?,
        limit,
    };
    s.await_projection("contacts", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let views = contacts_rm::list(&tx, a.caller.org_id, &filter).await?;
    let next = (views.len() as i64 == limit)
        .then(|| views.last().map(|v| v.id))
        .flatten();
    let items: Vec<Value> = views
        .iter()
        .map(|v| {
            let mut json = view_json(v);
            visibility::contact(policy, &mut json);
            json
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "items": items, "next_after": next }),
        &a.ctx.request_id,
    ))
}
