//! Field-level permissions: the one place every output of contact data passes through.
//!
//! Single reads, lists, as-of reads, history and anything added later call
//! [`contact`] or [`contact_event`] on what they are about to send; a field the caller's
//! role hides is removed (absent from the JSON, not null). Writes go through
//! [`check_writes`], filters through [`check_filters`]: a filter on a hidden field would
//! reveal it by what it matches. The activity log carries no field values (who did
//! what to which record, never the data) and needs no redaction.

use crm_domain::access::{Permission, Policy};
use serde_json::Value;

use crate::error::ApiError;

/// Removes the fields `policy` hides from a contact's JSON.
pub fn contact(policy: &Policy, json: &mut Value) {
    if let Value::Object(m) = json {
        policy.redact_fields(m);
    }
}

/// Redacts one event of a contact's history: the fields it set (`profile`, `set`), the
/// names of fields it cleared, and the actor's IP address and user agent unless the
/// caller may view consent proof.
pub fn contact_event(policy: &Policy, data: &mut Value, metadata: &mut Value) {
    if let Value::Object(m) = data {
        for section in ["profile", "set"] {
            if let Some(Value::Object(fields)) = m.get_mut(section) {
                policy.redact_fields(fields);
            }
        }
        if let Some(Value::Array(names)) = m.get_mut("cleared") {
            names.retain(|n| {
                n.as_str()
                    .is_some_and(|n| policy.first_hidden([n]).is_none())
            });
        }
        if policy.first_hidden(["custom"]).is_some() {
            m.remove("cleared_custom");
        }
    }
    if !policy.allows(Permission::ConsentProofView) {
        if let Value::Object(m) = metadata {
            m.remove("ip");
            m.remove("user_agent");
        }
    }
}

/// Whether `policy` may read a contact point (an address or number) of `channel`: it
/// is the value of that channel's contact field (e-mail, phone or address).
pub fn sees_contact_point(policy: &Policy, channel: crm_domain::consent::Channel) -> bool {
    policy.first_hidden([channel.contact_field()]).is_none()
}

/// 403 naming the first field in `names` the caller may not write.
pub fn check_writes<'a>(
    policy: &Policy,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), ApiError> {
    match policy.first_unwritable(names) {
        None => Ok(()),
        Some(field) => Err(ApiError::Forbidden {
            code: "field_forbidden",
            message: format!("your role may not write the field `{field}`"),
        }),
    }
}

/// 403 naming the first field in `names` the caller may not see (and so not filter on).
pub fn check_filters<'a>(
    policy: &Policy,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), ApiError> {
    match policy.first_hidden(names) {
        None => Ok(()),
        Some(field) => Err(ApiError::Forbidden {
            code: "field_forbidden",
            message: format!("your role may not see the field `{field}`, so not filter on it"),
        }),
    }
}
