//! The public event catalogue: what the outside world (webhooks, the live event stream)
//! is told about the event stream, in a shape of its own that is versioned apart from
//! the stored events.
//!
//! Invariants kept here:
//! - deny by default: an internal event that is not in [`CATALOGUE`] is never offered;
//!   a payload member is offered only if the shaping below names it;
//! - every public type needs one permission ([`Entry::needs`]): a subscriber whose role
//!   lacks it does not receive events of that type;
//! - contact fields pass through the role's field policy ([`Policy::field`]): a field
//!   the role may not read is absent, and so is a field whose value is gone (an erased
//!   contact's data decrypts to `null`; it is left out, so a later delivery about an
//!   erased contact carries no personal data at all);
//! - nothing else personal is offered: no consent proof, contact point, message content,
//!   AI arguments, reasons typed by people, IP addresses or user agents.
//!
//! The body of a public event is the same everywhere (the Standard Webhooks payload
//! convention): `{"type", "timestamp", "data"}`. `data` always holds `event_id`,
//! `position` (the event's global position), `entity_type`, `entity_id` and `actor`
//! (`kind`, `id`), then the members of its type (docs/webhooks.md, "Catalogue").

use serde_json::{json, Map, Value};

use crate::access::{FieldAccess, Permission, Policy, CONTACT_FIELDS};

/// The catalogue's version: a change that removes or renames a type or a member makes
/// a new version; adding either does not.
pub const VERSION: &str = "2026-12-06";

/// One internal event type offered under a public type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The stored event type, e.g. `ContactUpdated`.
    pub internal: &'static str,
    /// The public type, e.g. `contact.updated`.
    pub public: &'static str,
    /// What a subscriber's role must hold to receive it.
    pub needs: Permission,
    /// Part of the `security` stream (failed-login lockouts, 2FA, role and key changes,
    /// webhook auto-disable, the AI stop switch).
    pub security: bool,
}

const fn e(internal: &'static str, public: &'static str, needs: Permission) -> Entry {
    Entry {
        internal,
        public,
        needs,
        security: false,
    }
}

const fn s(internal: &'static str, public: &'static str) -> Entry {
    Entry {
        internal,
        public,
        needs: Permission::SecurityRead,
        security: true,
    }
}

use Permission::{AiAuditRead, ConsentRead, ContactsRead, MessagesRead};

/// Every internal event type that is offered, and as what.
pub const CATALOGUE: &[Entry] = &[
    e("ContactCreated", "contact.created", ContactsRead),
    e("ContactUpdated", "contact.updated", ContactsRead),
    e("ContactArchived", "contact.archived", ContactsRead),
    e("ProcessingRestricted", "contact.restricted", ContactsRead),
    e(
        "ProcessingRestrictionLifted",
        "contact.restriction_lifted",
        ContactsRead,
    ),
    e("ContactErased", "contact.erased", ContactsRead),
    e("ConsentRecorded", "consent.changed", ConsentRead),
    e("ConsentConfirmed", "consent.changed", ConsentRead),
    e("DoNotContactSet", "consent.changed", ConsentRead),
    e("DoNotContactLifted", "consent.changed", ConsentRead),
    e("SaleOrSharingOptedOut", "consent.changed", ConsentRead),
    e("SaleOrSharingOptOutLifted", "consent.changed", ConsentRead),
    e("MessageQueued", "message.queued", MessagesRead),
    e("MessageSent", "message.sent", MessagesRead),
    e("MessageBlocked", "message.blocked", MessagesRead),
    e("MessageBlockedAtDispatch", "message.blocked", MessagesRead),
    e("MessageFailed", "message.failed", MessagesRead),
    e("AiActionProposed", "ai_action.proposed", AiAuditRead),
    e(
        "AiActionApprovalRequested",
        "ai_action.approval_requested",
        AiAuditRead,
    ),
    e("AiActionAutoApproved", "ai_action.approved", AiAuditRead),
    e("AiActionApproved", "ai_action.approved", AiAuditRead),
    e("AiActionRejected", "ai_action.rejected", AiAuditRead),
    e("AiActionExpired", "ai_action.expired", AiAuditRead),
    e("AiActionExecuted", "ai_action.executed", AiAuditRead),
    e("AiActionFailed", "ai_action.failed", AiAuditRead),
    s("UserLockedOut", "user.locked_out"),
    s("TwoFactorEnabled", "user.two_factor_changed"),
    s("TwoFactorDisabled", "user.two_factor_changed"),
    s("TwoFactorReset", "user.two_factor_changed"),
    s("UserRoleChanged", "user.role_changed"),
    s("RoleDefined", "role.changed"),
    s("RoleChanged", "role.changed"),
    s("RoleRetired", "role.changed"),
    s("ApiKeyIssued", "api_key.issued"),
    s("ApiKeyRevoked", "api_key.revoked"),
    s("WebhookEndpointAutoDisabled", "webhook.disabled"),
    s("AiStopped", "ai.stopped"),
    s("AiResumed", "ai.resumed"),
];

/// The catalogue entry of an internal event type.
pub fn entry(internal: &str) -> Option<&'static Entry> {
    CATALOGUE.iter().find(|e| e.internal == internal)
}

/// The public types, each once, in catalogue order, with what each needs.
pub fn public_types() -> Vec<(&'static str, Permission, bool)> {
    let mut out: Vec<(&'static str, Permission, bool)> = Vec::new();
    for e in CATALOGUE {
        if !out.iter().any(|(t, _, _)| *t == e.public) {
            out.push((e.public, e.needs, e.security));
        }
    }
    out
}

/// The entry of a public type (the first internal type offered under it).
pub fn public_entry(public: &str) -> Option<&'static Entry> {
    CATALOGUE.iter().find(|e| e.public == public)
}

/// The stored event a public event is made from, as the feed carries it (personal
/// members decrypted; `null` where the key was destroyed).
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub event_id: uuid::Uuid,
    pub position: i64,
    pub event_type: &'a str,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    /// The payload as stored: `{"<EventType>": {…}}`.
    pub payload: &'a Value,
    /// RFC 3339, when the event was recorded ([`timestamp`]).
    pub timestamp: &'a str,
    pub actor_kind: &'a str,
    pub actor_id: &'a str,
}

/// A body's `timestamp`: when the event was recorded, RFC 3339 in UTC with
/// microseconds (what the store keeps), the same in webhooks and the live stream.
pub fn timestamp(recorded_at: &chrono::DateTime<chrono::Utc>) -> String {
    recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A public event, shaped for one role.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicEvent {
    pub public_type: &'static str,
    pub security: bool,
    /// `{"type", "timestamp", "data"}`.
    pub body: Value,
}

/// The public event `source` becomes for a subscriber holding `policy`; `None` when the
/// event is not offered, or not to this role.
pub fn shape(source: &Source<'_>, policy: &Policy) -> Option<PublicEvent> {
    let entry = entry(source.event_type)?;
    if !policy.allows(entry.needs) {
        return None;
    }
    let inner = source
        .payload
        .get(source.event_type)
        .unwrap_or(source.payload);
    let mut data = Map::new();
    data.insert("event_id".into(), json!(source.event_id));
    data.insert("position".into(), json!(source.position));
    data.insert("entity_type".into(), json!(source.aggregate_type));
    data.insert("entity_id".into(), json!(source.aggregate_id));
    data.insert(
        "actor".into(),
        json!({"kind": source.actor_kind, "id": source.actor_id}),
    );
    let copy = |data: &mut Map<String, Value>, names: &[&str]| {
        for name in names {
            if let Some(v) = inner.get(*name).filter(|v| !v.is_null()) {
                data.insert((*name).to_owned(), v.clone());
            }
        }
    };
    match entry.public {
        "contact.created" | "contact.updated" => {
            data.insert("contact_id".into(), json!(source.aggregate_id));
            let section = if entry.public == "contact.created" {
                "profile"
            } else {
                "set"
            };
            data.insert(
                "fields".into(),
                Value::Object(visible_fields(inner.get(section), policy)),
            );
            if entry.public == "contact.updated" {
                let cleared: Vec<Value> = inner
                    .get("cleared")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|n| n.as_str().is_some_and(|n| readable(policy, n)))
                    .cloned()
                    .collect();
                data.insert("cleared".into(), Value::Array(cleared));
            }
        }
        "contact.archived" | "contact.restricted" | "contact.restriction_lifted" => {
            data.insert("contact_id".into(), json!(source.aggregate_id));
        }
        "contact.erased" => {
            data.insert("contact_id".into(), json!(source.aggregate_id));
            copy(&mut data, &["request_id", "source"]);
        }
        "consent.changed" => {
            let change = match source.event_type {
                "ConsentRecorded" => "recorded",
                "ConsentConfirmed" => "confirmed",
                "DoNotContactSet" => "do_not_contact_set",
                "DoNotContactLifted" => "do_not_contact_lifted",
                "SaleOrSharingOptedOut" => "sale_or_sharing_opted_out",
                _ => "sale_or_sharing_opt_out_lifted",
            };
            data.insert("change".into(), json!(change));
            copy(
                &mut data,
                &[
                    "contact_id",
                    "channel",
                    "purpose",
                    "status",
                    "global_privacy_control",
                ],
            );
        }
        "message.queued" | "message.sent" | "message.blocked" | "message.failed" => {
            data.insert("message_id".into(), json!(source.aggregate_id));
            copy(&mut data, &["contact_id", "channel", "purpose", "attempt"]);
            if let Some(reason) = inner.pointer("/decision/reason").filter(|v| !v.is_null()) {
                data.insert("reason".into(), reason.clone());
            }
            if source.event_type == "MessageSent" {
                copy(&mut data, &["carrier"]);
            }
        }
        t if t.starts_with("ai_action.") => {
            data.insert("action_id".into(), json!(source.aggregate_id));
            copy(
                &mut data,
                &[
                    "agent_id",
                    "risk",
                    "rule",
                    "expires_at",
                    "because",
                    "by",
                    "event_ids",
                    "reason",
                ],
            );
            if let Some(request) = inner.get("request") {
                for (from, to) in [("/kind", "kind"), ("/contacts", "contacts")] {
                    if let Some(v) = request.pointer(from) {
                        data.insert(to.into(), v.clone());
                    }
                }
            }
            if let Some(initiator) = inner.get("initiator") {
                data.insert("initiator".into(), initiator.clone());
            }
        }
        "user.role_changed" => {
            data.insert("user_id".into(), json!(source.aggregate_id));
            copy(&mut data, &["from", "to"]);
        }
        "user.two_factor_changed" => {
            data.insert("user_id".into(), json!(source.aggregate_id));
            let change = match source.event_type {
                "TwoFactorEnabled" => "enabled",
                "TwoFactorDisabled" => "disabled",
                _ => "reset",
            };
            data.insert("change".into(), json!(change));
        }
        "user.locked_out" => {
            data.insert("user_id".into(), json!(source.aggregate_id));
            copy(&mut data, &["until"]);
        }
        "role.changed" => {
            data.insert("role_id".into(), json!(source.aggregate_id));
            let change = match source.event_type {
                "RoleDefined" => "defined",
                "RoleChanged" => "changed",
                _ => "retired",
            };
            data.insert("change".into(), json!(change));
        }
        "api_key.issued" | "api_key.revoked" => {
            data.insert("api_key_id".into(), json!(source.aggregate_id));
            copy(&mut data, &["kind", "role"]);
        }
        "webhook.disabled" => {
            data.insert("endpoint_id".into(), json!(source.aggregate_id));
            copy(&mut data, &["consecutive_failures"]);
        }
        "ai.stopped" | "ai.resumed" => {}
        _ => {}
    }
    Some(PublicEvent {
        public_type: entry.public,
        security: entry.security,
        body: json!({
            "type": entry.public,
            "timestamp": source.timestamp,
            "data": Value::Object(data),
        }),
    })
}

fn readable(policy: &Policy, field: &str) -> bool {
    CONTACT_FIELDS.contains(&field) && policy.field(field) != FieldAccess::Hidden
}

/// The members of a profile section the policy lets the role read, without the ones
/// whose value is gone; nothing that is not a contact field.
fn visible_fields(section: Option<&Value>, policy: &Policy) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(Value::Object(fields)) = section {
        for (name, value) in fields {
            if readable(policy, name) && !value.is_null() {
                out.insert(name.clone(), value.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{builtin_policy, Role};

    #[test]
    fn the_timestamp_keeps_the_stores_microseconds_in_utc() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-06T11:00:00.123456+01:00")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(timestamp(&at), "2026-12-06T10:00:00.123456Z");
    }

    fn source<'a>(event_type: &'a str, payload: &'a Value) -> Source<'a> {
        Source {
            event_id: uuid::Uuid::nil(),
            position: 42,
            event_type,
            aggregate_type: "contact",
            aggregate_id: "c-1",
            payload,
            timestamp: "2026-12-06T00:00:00Z",
            actor_kind: "user",
            actor_id: "u-1",
        }
    }

    #[test]
    fn every_public_type_is_offered_under_one_permission() {
        for (public, needs, _) in public_types() {
            assert!(
                CATALOGUE
                    .iter()
                    .filter(|e| e.public == public)
                    .all(|e| e.needs == needs),
                "{public}"
            );
            assert!(public.contains('.'), "{public}");
        }
        assert!(entry("ContactUpdated").is_some());
        assert!(entry("ConsentRecordedTypo").is_none());
    }

    #[test]
    fn an_event_outside_the_catalogue_is_not_offered() {
        let payload = json!({"PasswordChanged": {}});
        let admin = builtin_policy(Role::Admin);
        assert!(shape(&source("PasswordChanged", &payload), &admin).is_none());
    }

    #[test]
    fn contact_fields_pass_through_the_roles_field_policy() {
        let payload = json!({"ContactCreated": {"contact_id": "c-1", "org_id": "o",
            "profile": {"given_name": "Ada", "email": "ada@example.com", "phone": "+4912345678",
                        "custom": {"tier": "gold"}, "secret_member": "x"}}});
        let admin = shape(
            &source("ContactCreated", &payload),
            &builtin_policy(Role::Admin),
        )
        .unwrap();
        let fields = &admin.body["data"]["fields"];
        assert_eq!(fields["email"], "ada@example.com");
        assert_eq!(fields["custom"]["tier"], "gold");
        assert!(
            fields.get("secret_member").is_none(),
            "only contact fields pass"
        );
        assert_eq!(admin.body["type"], "contact.created");
        assert_eq!(admin.body["data"]["position"], 42);

        // A Partner's role hides some fields: they are absent, not null.
        let partner = builtin_policy(Role::Partner);
        let shaped = shape(&source("ContactCreated", &payload), &partner).unwrap();
        for name in CONTACT_FIELDS {
            if partner.field(name) == FieldAccess::Hidden {
                assert!(shaped.body["data"]["fields"].get(name).is_none(), "{name}");
            }
        }
        // A role without contacts.read gets nothing.
        assert!(shape(
            &source("ContactCreated", &payload),
            &builtin_policy(Role::Board)
        )
        .is_none());
    }

    #[test]
    fn an_erased_contacts_event_carries_no_personal_data() {
        // The key is destroyed: the personal section decrypts to null.
        let payload = json!({"ContactUpdated": {"set": null, "cleared": ["title"]}});
        let shaped = shape(
            &source("ContactUpdated", &payload),
            &builtin_policy(Role::Admin),
        )
        .unwrap();
        assert_eq!(shaped.body["data"]["fields"], json!({}));
    }

    #[test]
    fn consent_and_messages_leave_proof_points_and_content_out() {
        let consent = json!({"ConsentRecorded": {"contact_id": "c-1", "channel": "email",
            "purpose": "newsletter", "status": "granted",
            "proof": {"ip": "203.0.113.9"}, "point": {"value": "ada@example.com"}}});
        let shaped = shape(
            &source("ConsentRecorded", &consent),
            &builtin_policy(Role::Admin),
        )
        .unwrap();
        let text = shaped.body.to_string();
        assert!(!text.contains("203.0.113.9") && !text.contains("ada@example.com"));
        assert_eq!(shaped.body["data"]["change"], "recorded");
        assert_eq!(shaped.body["data"]["status"], "granted");

        let blocked = json!({"MessageBlocked": {"message_id": "m", "contact_id": "c-1",
            "channel": "email", "purpose": "newsletter",
            "decision": {"allowed": false, "reason": "no_consent", "relied_on": []},
            "content": {"to": "ada@example.com", "subject": "Hi", "body": "secret"}}});
        let shaped = shape(
            &source("MessageBlocked", &blocked),
            &builtin_policy(Role::Admin),
        )
        .unwrap();
        assert_eq!(shaped.public_type, "message.blocked");
        assert_eq!(shaped.body["data"]["reason"], "no_consent");
        assert!(!shaped.body.to_string().contains("ada@example.com"));
        assert!(!shaped.body.to_string().contains("secret"));
    }

    #[test]
    fn security_events_need_security_read() {
        let payload = json!({"ApiKeyRevoked": {}});
        assert!(shape(
            &source("ApiKeyRevoked", &payload),
            &builtin_policy(Role::Director)
        )
        .is_none());
        let shaped = shape(
            &source("ApiKeyRevoked", &payload),
            &builtin_policy(Role::Admin),
        )
        .unwrap();
        assert!(shaped.security);
        assert_eq!(shaped.public_type, "api_key.revoked");
    }
}
