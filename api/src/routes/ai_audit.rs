//! Reading AI actions from their read model (docs/ai.md): the AI audit log
//! (`GET /v1/ai/audit`) and the approval queue (`GET /v1/ai/approvals`, with a readable
//! diff of what each pending action would change).
//!
//! The personal members of an entry (arguments, summaries, reasons) are stored sealed
//! under the action's data key and opened here for the reader; once that key is
//! shredded (the contact erased) they read as null. Contact fields the reader's role
//! may not read are left out of the arguments and the diff, as everywhere else.

use chrono::{DateTime, Utc};
use crm_domain::access::{FieldAccess, Policy};
use crm_infra::crypto::{Crypto, DataKey};
use crm_infra::read_models::ai_audit::{self as audit_rm, AiAuditFilter};
use crm_projections::ai_audit::{AiAuditEntry, AiAuditStep};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ai::AiActionKind;
use super::schemas::Time;
use super::{consistency, parse_limit, Authed};
use crate::edge::extract::Query;
use crate::edge::reply::Ok200;
use crate::error::ApiError;
use crate::state::AppState;

/// Risk levels of the policy.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AiRiskLevel {
    Low,
    Medium,
    High,
}

/// Where an action stands.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AiActionState {
    PendingApproval,
    Approved,
    Rejected,
    Expired,
    Executed,
    Failed,
}

/// `GET /v1/ai/audit` parameters; every filter is exact but the time window.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AiAuditQuery {
    /// The proposer: an agent's key id (or a user's id).
    agent_id: Option<Uuid>,
    risk: Option<AiRiskLevel>,
    status: Option<AiActionState>,
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<AiActionKind>,
    /// Actions touching this contact.
    contact_id: Option<Uuid>,
    /// Actions proposed at or after this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    since: Option<Time>,
    /// Actions proposed before this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    until: Option<Time>,
    /// Actions before this one (`next_before` of the previous page).
    before: Option<Uuid>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Wait (bounded) until the audit log has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

/// Who caused a step or proposed an action.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiPrincipal {
    /// `ai_agent`, `user`, `api_key` or `system`.
    kind: String,
    id: String,
}

impl AiPrincipal {
    fn parse(by: &str) -> Self {
        let (kind, id) = by.split_once(':').unwrap_or(("unknown", by));
        Self {
            kind: kind.to_owned(),
            id: id.to_owned(),
        }
    }
}

/// One step of an action's approval chain and life.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiAuditStepDoc {
    event_id: Uuid,
    /// `proposed`, `auto_approved`, `approval_requested`, `approved`, `rejected`,
    /// `edited`, `expired`, `held`, `executed` or `failed`.
    step: String,
    at: DateTime<Utc>,
    by: AiPrincipal,
    /// The person who decided (approved, rejected, edited).
    #[serde(skip_serializing_if = "Option::is_none")]
    decided_by: Option<Uuid>,
    /// The digest the step names (proposed, approved, edited).
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments_sha256: Option<String>,
    /// The policy rule in force after the step (proposed, auto-approved, edited).
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    /// Why it waits (approval requested): `risk`, `oversight`, `stop_switch` or
    /// `edited`.
    #[serde(skip_serializing_if = "Option::is_none")]
    because: Option<String>,
    /// The reason a person gave, or a refusal's message (null once erased).
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<Value>,
}

/// One AI action in the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiAuditItem {
    id: Uuid,
    #[serde(rename = "type")]
    kind: String,
    #[schema(value_type = AiActionState)]
    status: String,
    #[schema(value_type = AiRiskLevel)]
    risk: String,
    /// The id of the policy rule that set the risk (docs/ai.md).
    rule: String,
    proposed_by: AiPrincipal,
    /// `user` or `autonomous`.
    initiated_by: String,
    on_behalf_of: Option<Uuid>,
    /// Provider, model, version, prompt version, token counts (OpenTelemetry GenAI
    /// names in docs/ai.md).
    #[schema(value_type = Object)]
    model: Value,
    /// The contacts the action touches.
    contacts: Vec<Uuid>,
    arguments_sha256: String,
    /// The command's body in force (null once erased; contact fields the reader may not
    /// read are left out).
    #[schema(value_type = Option<Object>)]
    arguments: Option<Value>,
    /// What the agent acted on (null once erased or when not given).
    input_summary: Option<String>,
    /// Why it proposed the action (null once erased or when not given).
    reasoning_summary: Option<String>,
    /// The approval chain and every other step, in order.
    steps: Vec<AiAuditStepDoc>,
    /// The events the command produced (or its refusal's, e.g. a blocked message):
    /// each names the action as its causation id.
    result_events: Vec<Uuid>,
    /// Why execution failed: the send gate's reason code, or the refusal's.
    failure_reason: Option<String>,
    /// When a pending action expires.
    expires_at: Option<DateTime<Utc>>,
    proposed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The log position of the action's last step.
    position: i64,
}

/// A page of the AI audit log, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiAuditPage {
    items: Vec<AiAuditItem>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<Uuid>,
}

/// Opens the sealed members of entries with each action's data key.
struct Opener<'a> {
    crypto: &'a Crypto,
    org: Uuid,
}

impl Opener<'_> {
    /// Reads the keys of a page's actions in one query (cached for [`Self::key`]).
    async fn prefetch(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        entries: &[AiAuditEntry],
    ) -> Result<(), ApiError> {
        let ids: Vec<String> = entries.iter().map(|e| e.action_id.to_string()).collect();
        let subjects: Vec<(Uuid, &str)> = ids.iter().map(|i| (self.org, i.as_str())).collect();
        self.crypto
            .prefetch_keys(client, &subjects)
            .await
            .map_err(|e| crm_infra::store::event_store::StoreError::from(e).into())
    }

    async fn key(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        action: Uuid,
    ) -> Result<Option<DataKey>, ApiError> {
        self.crypto
            .key_for_reading(client, &self.org, &action.to_string())
            .await
            .map_err(|e| crm_infra::store::event_store::StoreError::from(e).into())
    }

    /// The clear value of a sealed member (`field` as the store names it, e.g.
    /// `content.arguments`); null when the key is gone. A value stored in clear (never
    /// sealed: nothing to encrypt) is returned as it is.
    fn open(&self, key: Option<&DataKey>, action: Uuid, field: &str, value: &Value) -> Value {
        match value.as_str() {
            Some(s) if s.starts_with(crm_infra::crypto::fields::ENCRYPTED_PREFIX) => {
                Crypto::decrypt_value(key, &self.org, &action.to_string(), field, value)
                    .unwrap_or(Value::Null)
            }
            _ => value.clone(),
        }
    }
}

/// The arguments with the contact fields the reader may not read left out.
fn visible_arguments(kind: &str, mut arguments: Value, policy: &Policy) -> Value {
    if kind == "update_contact" {
        if let Some(map) = arguments.as_object_mut() {
            policy.redact_fields(map);
        }
    }
    arguments
}

fn as_text(v: Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn step_doc(
    opener: &Opener<'_>,
    key: Option<&DataKey>,
    action: Uuid,
    s: AiAuditStep,
) -> AiAuditStepDoc {
    AiAuditStepDoc {
        event_id: s.event_id,
        step: s.step,
        at: s.at,
        by: AiPrincipal::parse(&s.by),
        decided_by: s.decided_by,
        arguments_sha256: s.arguments_sha256,
        rule: s.rule,
        because: s.because,
        note: s.note.map(|n| opener.open(key, action, "note.text", &n)),
    }
}

/// An entry as the reader may see it (its sealed members opened with `key`).
fn item(
    opener: &Opener<'_>,
    key: Option<&DataKey>,
    e: AiAuditEntry,
    policy: &Policy,
) -> AiAuditItem {
    let id = e.action_id;
    let member = |name: &str| {
        e.content
            .get(name)
            .filter(|v| !v.is_null())
            .map(|v| opener.open(key, id, &format!("content.{name}"), v))
    };
    let arguments = member("arguments")
        .filter(|v| !v.is_null())
        .map(|v| visible_arguments(&e.kind, v, policy));
    let input_summary = member("input_summary").and_then(as_text);
    let reasoning_summary = member("reasoning_summary").and_then(as_text);
    AiAuditItem {
        id,
        proposed_by: AiPrincipal {
            kind: e.proposer_kind,
            id: e.agent_id.to_string(),
        },
        kind: e.kind,
        status: e.status,
        risk: e.risk,
        rule: e.rule,
        initiated_by: e.initiated_by,
        on_behalf_of: e.on_behalf_of,
        model: e.model,
        contacts: e.contacts,
        arguments_sha256: e.arguments_sha256,
        arguments,
        input_summary,
        reasoning_summary,
        steps: e
            .steps
            .into_iter()
            .map(|s| step_doc(opener, key, id, s))
            .collect(),
        result_events: e.result_events,
        failure_reason: e.failure_reason,
        expires_at: e.expires_at,
        proposed_at: e.proposed_at,
        updated_at: e.updated_at,
        position: e.last_position,
    }
}

pub(crate) async fn audit(
    s: AppState,
    a: Authed,
    Query(q): Query<AiAuditQuery>,
) -> Result<Ok200<AiAuditPage>, ApiError> {
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    let limit = parse_limit(q.limit)?;
    let filter = AiAuditFilter {
        agent_id: q.agent_id,
        risk: q.risk.map(|r| super::schemas::wire_name(&r)),
        status: q.status.map(|r| super::schemas::wire_name(&r)),
        kind: q.kind.map(|r| super::schemas::wire_name(&r)),
        contact_id: q.contact_id,
        since: q.since.map(|t| t.0),
        until: q.until.map(|t| t.0),
        before: q.before,
        limit,
    };
    s.await_projection("ai_audit", pos, wait).await?;
    let org = a.caller.org_id;
    let mut client = s.pool.get().await?;
    let entries = {
        let tx = crm_infra::read_models::org_scope(&mut client, org).await?;
        let entries = audit_rm::list(&tx, org, &filter).await?;
        tx.commit().await?;
        entries
    };
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.action_id))
        .flatten();
    let opener = Opener {
        crypto: s.executor.crypto(),
        org,
    };
    opener.prefetch(&client, &entries).await?;
    let mut items = Vec::with_capacity(entries.len());
    for e in entries {
        let key = opener.key(&client, e.action_id).await?;
        items.push(item(&opener, key.as_ref(), e, &a.access.policy));
    }
    Ok(Ok200(AiAuditPage { items, next_before }))
}

/// Every action touching `contact`, newest first, as a reader with `policy` sees it;
/// the contacts it names are cut to `contact` alone (the others are not its data).
impl AiAuditItem {
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }
}

pub(crate) async fn touching(
    s: &AppState,
    org: Uuid,
    contact: Uuid,
    policy: &Policy,
) -> Result<Vec<AiAuditItem>, ApiError> {
    let mut client = s.pool.get().await?;
    let opener = Opener {
        crypto: s.executor.crypto(),
        org,
    };
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let filter = AiAuditFilter {
            agent_id: None,
            risk: None,
            status: None,
            kind: None,
            contact_id: Some(contact),
            since: None,
            until: None,
            before,
            limit: 500,
        };
        let entries = {
            let tx = crm_infra::read_models::org_scope(&mut client, org).await?;
            let entries = audit_rm::list(&tx, org, &filter).await?;
            tx.commit().await?;
            entries
        };
        let full = entries.len() == 500;
        before = entries.last().map(|e| e.action_id);
        opener.prefetch(&client, &entries).await?;
        for e in entries {
            let key = opener.key(&client, e.action_id).await?;
            let mut i = item(&opener, key.as_ref(), e, policy);
            i.contacts = vec![contact];
            out.push(i);
        }
        if !full {
            return Ok(out);
        }
    }
}

// ---- GET /v1/ai/approvals --------------------------------------------------------------

/// `GET /v1/ai/approvals` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AiApprovalsQuery {
    /// Actions before this one (`next_before` of the previous page).
    before: Option<Uuid>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Wait (bounded) until the queue has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

/// One change an action would make: a contact field (`custom.<key>` for a custom
/// field) from its current value to the proposed one (from null for a bulk update:
/// the value now differs per contact), a member of a message to be sent
/// (`message.<member>`), of a consent change (`consent.<member>`), of a role change
/// (`user.role`), or the Do Not Contact mark (`do_not_contact`, with its reason).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiChange {
    field: String,
    /// The value now (null: none).
    #[schema(value_type = Option<Object>)]
    from: Value,
    /// The value the action would set (null: cleared).
    #[schema(value_type = Option<Object>)]
    to: Value,
}

/// A pending action with what an approver needs to decide it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiApprovalItem {
    /// The action as the audit log shows it.
    action: AiAuditItem,
    /// What would change, field by field (contact fields the approver may not read are
    /// left out; `hidden_fields` names how many).
    changes: Vec<AiChange>,
    /// Changes to fields the approver's role may not read.
    hidden_fields: usize,
    /// Whether the caller may decide it (not when it was proposed on their behalf).
    can_decide: bool,
}

/// The approval queue, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiApprovalPage {
    items: Vec<AiApprovalItem>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<Uuid>,
}

/// What `arguments` (an `update_contact` body) would change on `current` (the
/// contact's profile now, as JSON), field by field, and how many changes touch fields
/// the reader may not read.
fn contact_changes(arguments: &Value, current: &Value, policy: &Policy) -> (Vec<AiChange>, usize) {
    let mut changes = Vec::new();
    let mut hidden = 0;
    let Some(set) = arguments.as_object() else {
        return (changes, hidden);
    };
    for (name, to) in set {
        if name == "custom" {
            if policy.field("custom") == FieldAccess::Hidden {
                hidden += to.as_object().map_or(1, |m| m.len());
                continue;
            }
            for (key, value) in to.as_object().into_iter().flatten() {
                let from = current["custom"].get(key).cloned().unwrap_or(Value::Null);
                if &from != value {
                    changes.push(AiChange {
                        field: format!("custom.{key}"),
                        from,
                        to: value.clone(),
                    });
                }
            }
            continue;
        }
        if policy.field(name) == FieldAccess::Hidden {
            hidden += 1;
            continue;
        }
        let from = current.get(name).cloned().unwrap_or(Value::Null);
        if &from != to {
            changes.push(AiChange {
                field: name.clone(),
                from,
                to: to.clone(),
            });
        }
    }
    (changes, hidden)
}

/// Something new (a message, a consent change, a role), member by member, each named
/// `{prefix}.{member}`, from null.
fn new_members(prefix: &str, arguments: &Value) -> Vec<AiChange> {
    arguments
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, to)| AiChange {
            field: format!("{prefix}.{name}"),
            from: Value::Null,
            to: to.clone(),
        })
        .collect()
}

/// A Do Not Contact mark set (`to` true) or lifted, with the reason given.
fn do_not_contact(set: bool, arguments: &Value) -> Vec<AiChange> {
    let mut changes = vec![AiChange {
        field: "do_not_contact".into(),
        from: Value::Bool(!set),
        to: Value::Bool(set),
    }];
    changes.extend(new_members("do_not_contact", arguments));
    changes
}

pub(crate) async fn approvals(
    s: AppState,
    a: Authed,
    Query(q): Query<AiApprovalsQuery>,
) -> Result<Ok200<AiApprovalPage>, ApiError> {
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    let limit = parse_limit(q.limit)?;
    let filter = AiAuditFilter {
        status: Some("pending_approval".to_owned()),
        before: q.before,
        limit,
        ..AiAuditFilter::default()
    };
    s.await_projection("ai_audit", pos, wait).await?;
    let org = a.caller.org_id;
    let now = Utc::now();
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, org).await?;
    let entries = audit_rm::list(&tx, org, &filter).await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.action_id))
        .flatten();
    let opener = Opener {
        crypto: s.executor.crypto(),
        org,
    };
    let policy = &a.access.policy;
    // Past its time, an action can no longer be approved: the sweep records its expiry.
    let entries: Vec<AiAuditEntry> = entries
        .into_iter()
        .filter(|e| e.expires_at.is_none_or(|t| t > now))
        .collect();
    opener.prefetch(&tx, &entries).await?;
    // The contacts the updates would change, as they are now: one query for the page.
    let changed: Vec<Uuid> = entries
        .iter()
        .filter(|e| e.kind == "update_contact")
        .filter_map(|e| e.contacts.first().copied())
        .collect();
    let now_profiles: std::collections::HashMap<Uuid, Value> =
        crm_infra::read_models::contacts::get_many(&tx, org, &changed)
            .await?
            .into_iter()
            .map(|v| {
                (
                    v.id,
                    serde_json::to_value(&v.profile).unwrap_or(Value::Null),
                )
            })
            .collect();
    let mut items = Vec::with_capacity(entries.len());
    for e in entries {
        let key = opener.key(&tx, e.action_id).await?;
        let arguments = e
            .content
            .get("arguments")
            .map(|v| opener.open(key.as_ref(), e.action_id, "content.arguments", v))
            .unwrap_or(Value::Null);
        let (changes, hidden_fields) = match e.kind.as_str() {
            "update_contact" => {
                let current = e
                    .contacts
                    .first()
                    .and_then(|c| now_profiles.get(c))
                    .unwrap_or(&Value::Null);
                contact_changes(&arguments, current, policy)
            }
            // The same change to each contact: from what each has now is per contact.
            "bulk_update" => contact_changes(&arguments, &Value::Null, policy),
            "send_message" => (new_members("message", &arguments), 0),
            "change_consent" => (new_members("consent", &arguments), 0),
            "set_do_not_contact" => (do_not_contact(true, &arguments), 0),
            "lift_do_not_contact" => (do_not_contact(false, &arguments), 0),
            "change_permissions" => (new_members("user", &arguments), 0),
            // What would happen to the contact as a whole.
            "erase" => (
                vec![AiChange {
                    field: "contact".into(),
                    from: Value::from("held"),
                    to: Value::from("erased"),
                }],
                0,
            ),
            "export" => (
                vec![AiChange {
                    field: "contact".into(),
                    from: Value::Null,
                    to: Value::from("exported to the proposer"),
                }],
                0,
            ),
            _ => (vec![], 0),
        };
        let can_decide = e.on_behalf_of != Some(a.caller.user_id);
        items.push(AiApprovalItem {
            action: item(&opener, key.as_ref(), e, policy),
            changes,
            hidden_fields,
            can_decide,
        });
    }
    tx.commit().await?;
    Ok(Ok200(AiApprovalPage { items, next_before }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_domain::access::builtin_policy;
    use crm_domain::access::Role;
    use serde_json::json;

    #[test]
    fn a_diff_names_each_changed_field_from_its_value_now() {
        let policy = builtin_policy(Role::Owner);
        let (changes, hidden) = contact_changes(
            &json!({"company": "New Ltd", "email": "ada@example.com", "custom": {"tier": "gold"}}),
            &json!({"company": "Old Ltd", "email": "ada@example.com", "custom": {"tier": "silver"}}),
            &policy,
        );
        assert_eq!(hidden, 0);
        let fields: Vec<_> = changes
            .iter()
            .map(|c| (c.field.as_str(), c.from.clone(), c.to.clone()))
            .collect();
        // The unchanged e-mail is not a change.
        assert_eq!(
            fields,
            vec![
                ("company", json!("Old Ltd"), json!("New Ltd")),
                ("custom.tier", json!("silver"), json!("gold")),
            ]
        );
    }

    #[test]
    fn a_diff_leaves_out_fields_the_approver_may_not_read() {
        // The board reads no contact field.
        let policy = builtin_policy(Role::Board);
        let (changes, hidden) = contact_changes(
            &json!({"email": "new@example.com", "company": "X"}),
            &json!({"email": "old@example.com"}),
            &policy,
        );
        assert!(changes.iter().all(|c| c.field != "email"), "{changes:?}");
        assert!(hidden >= 1);
    }
}
