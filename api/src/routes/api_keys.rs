//! `/v1/api-keys`: issue (the key is in the response, once), list, revoke. A key of
//! kind `agent` is an AI agent's credential: the agent is then the principal of what
//! it does, and can never do more than the user who registered it can at that moment.

use std::collections::BTreeSet;

use crm_domain::access::{Permission, RoleRef};
use crm_domain::api_key::ApiKeyCommand;
use crm_domain::values::Name;
use crm_infra::access::api_keys as keys;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::schemas::{Outcome, PermissionName, RoleName};
use super::Authed;
use crate::edge::extract::{Id, Json};
use crate::edge::reply::{Created, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// Whose credential a key is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum KeyKind {
    /// An integration's (a server acting as itself).
    #[default]
    Integration,
    /// An AI agent's, registered by the user issuing it: the agent acts as principal
    /// kind `ai_agent`, within that user's rights at every request.
    Agent,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "nightly export", "role": "viewer", "permissions": ["contacts.read"], "expires_at": "2027-01-01T00:00:00Z"}))]
pub(crate) struct IssueInput {
    /// `integration` (the default) or `agent`. Only a signed-in user registers an
    /// agent (not another key).
    #[serde(default)]
    kind: KeyKind,
    #[schema(max_length = 200, pattern = "@line")]
    name: String,
    /// A built-in role's name or a custom role's id.
    #[schema(value_type = RoleName)]
    role: String,
    /// Narrows the role to these of its permissions.
    #[schema(value_type = Option<Vec<PermissionName>>)]
    permissions: Option<Vec<String>>,
    /// RFC 3339; in the future.
    #[schema(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    expires_at: Option<String>,
}

/// A new key: its secret is in this answer only.
#[derive(Serialize, ToSchema)]
pub(crate) struct IssuedKey {
    id: Uuid,
    /// `ck_live_…`: shown this once.
    key: String,
    last4: String,
    role: String,
    kind: KeyKind,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    note: String,
}

/// An API key (never its secret).
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyItem {
    id: Uuid,
    name: String,
    last4: String,
    role: String,
    /// The permissions it is narrowed to (null: all of its role's).
    permissions: Option<Vec<String>>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    created_at: chrono::DateTime<chrono::Utc>,
    kind: KeyKind,
    /// An agent's key: the user who registered the agent.
    registered_by: Option<Uuid>,
}

/// The organisation's API keys.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyList {
    items: Vec<KeyItem>,
}

pub(crate) async fn issue(
    s: AppState,
    a: Authed,
    Json(input): Json<IssueInput>,
) -> Result<Created<IssuedKey>, ApiError> {
    let mut errors = Vec::new();
    let name = Name::parse(&input.name)
        .map_err(|e| errors.push(FieldError::new("name", e.0)))
        .ok();
    let role = RoleRef::parse(&input.role);
    if role.is_none() {
        errors.push(FieldError::new(
            "role",
            "must be a built-in role or a custom role's id",
        ));
    }
    let only = input.permissions.map(|ps| {
        ps.iter()
            .filter_map(|p| {
                let parsed = Permission::parse(p);
                if parsed.is_none() {
                    errors.push(FieldError::new(
                        format!("permissions.{p}"),
                        "is not a permission",
                    ));
                }
                parsed
            })
            .collect::<BTreeSet<_>>()
    });
    let expires_at = match input
        .expires_at
        .as_deref()
        .map(chrono::DateTime::parse_from_rfc3339)
    {
        Some(Ok(t)) => Some(t.with_timezone(&chrono::Utc)),
        Some(Err(_)) => {
            errors.push(FieldError::new("expires_at", "must be an RFC 3339 time"));
            None
        }
        None => None,
    };
    let (Some(name), Some(role), true) = (name, role, errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    let agent_of = match input.kind {
        KeyKind::Integration => None,
        KeyKind::Agent => {
            a.require_user()?;
            Some(a.caller.user_id)
        }
    };
    let grant = super::users::grant_of(&s, &a, role).await?;
    let key = crate::auth::api_keys::generate();
    let key_id = Uuid::now_v7();
    keys::issue(
        &s.executor,
        a.caller.org_id,
        key_id,
        key.digest,
        ApiKeyCommand::Issue {
            key_id,
            org_id: a.caller.org_id,
            name,
            grant,
            only,
            last4: key.last4.clone(),
            expires_at,
            by: a.access.grantor(),
            agent_of,
        },
        &a.metadata(),
    )
    .await?;
    Ok(Created {
        body: IssuedKey {
            id: key_id,
            key: key.secret,
            last4: key.last4,
            role: role.to_string(),
            kind: input.kind,
            expires_at,
            note: "the key is shown this once; only its digest is stored".into(),
        },
        location: format!("/v1/api-keys/{key_id}"),
    })
}

pub(crate) async fn list(s: AppState, a: Authed) -> Result<Ok200<KeyList>, ApiError> {
    let client = s.pool.get().await?;
    let items = keys::list(&client, a.caller.org_id)
        .await?
        .into_iter()
        .map(|k| KeyItem {
            id: k.key_id,
            name: k.name,
            last4: k.last4,
            role: k.role,
            permissions: k.only,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            last_used_at: k.last_used_at,
            created_at: k.created_at,
            kind: if k.kind == "agent" {
                KeyKind::Agent
            } else {
                KeyKind::Integration
            },
            registered_by: k.registered_by,
        })
        .collect();
    Ok(Ok200(KeyList { items }))
}

pub(crate) async fn revoke(
    s: AppState,
    a: Authed,
    Id(key_id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    let o = keys::revoke(&s.executor, a.caller.org_id, key_id, &a.metadata()).await?;
    Ok(super::outcome(&o))
}
