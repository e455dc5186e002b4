//! Roles (`/v1/roles`): the ten built-in ones and the organisation's custom roles,
//! defined, changed and retired by command. The organisation's modules
//! (`/v1/organization/modules`) are here too: both say what the organisation's
//! people may reach.

use std::collections::{BTreeMap, BTreeSet};

use crm_domain::access::{FieldAccess, Module, Permission, Policy, CONTACT_FIELDS};
use crm_domain::organization::OrganizationCommand;
use crm_domain::role::RoleCommand;
use crm_domain::values::Name;
use crm_infra::access::accounts;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::schemas::{
    ContactFieldName, Created as CreatedId, FieldPolicy, ModuleName, Outcome, PermissionName, Time,
};
use super::{query_error, Authed};
use crate::edge::extract::{Id, Json, Query};
use crate::edge::reply::{Created, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// What a role allows.
#[derive(Serialize, ToSchema)]
pub(crate) struct PolicyDoc {
    /// Permissions as `module.action`.
    permissions: Vec<String>,
    /// Per contact field: `read` or `write` (absent: hidden).
    #[schema(value_type = BTreeMap<String, String>)]
    fields: Value,
}

/// A built-in or custom role.
#[derive(Serialize, ToSchema)]
pub(crate) struct RoleItem {
    /// A built-in role's name or a custom role's id.
    id: String,
    name: String,
    builtin: bool,
    /// Custom roles only.
    #[serde(skip_serializing_if = "Option::is_none")]
    retired: Option<bool>,
    policy: PolicyDoc,
}

/// The organisation's roles.
#[derive(Serialize, ToSchema)]
pub(crate) struct RoleList {
    items: Vec<RoleItem>,
}

/// `GET /v1/audit/field-access` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FieldAccessQuery {
    /// A contact field.
    #[param(value_type = ContactFieldName, inline)]
    field: String,
    /// The moment (default: now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    at: Option<Time>,
}

/// Who could read a field at a moment.
#[derive(Serialize, ToSchema)]
pub(crate) struct FieldReaders {
    field: String,
    at: chrono::DateTime<chrono::Utc>,
    readers: Vec<FieldReader>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct FieldReader {
    /// `user` or `api_key`.
    kind: String,
    id: String,
    role: String,
    /// `read` or `write`.
    access: String,
}

fn text_of<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A custom role: its name, permissions (`module.action`) and per-field access
/// (`hidden`, `read` or `write`). In a PATCH, absent members stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Field sales", "permissions": ["contacts.read", "contacts.update"], "fields": {"email": "read", "phone": "write"}}))]
pub(crate) struct RoleDefinition {
    #[schema(value_type = Option<String>, max_length = 200, pattern = "@line")]
    name: Option<String>,
    #[schema(value_type = Option<Vec<PermissionName>>)]
    permissions: Option<Vec<String>>,
    #[schema(value_type = Option<FieldPolicy>)]
    fields: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    expected_version: Option<i64>,
}

/// A new custom role: its name, permissions (`module.action`) and per-field access.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Field sales", "permissions": ["contacts.read", "contacts.update"], "fields": {"email": "read", "phone": "write"}}))]
pub(crate) struct NewRoleInput {
    #[schema(value_type = String, max_length = 200, pattern = "@line")]
    name: Option<String>,
    #[schema(value_type = Option<Vec<PermissionName>>)]
    permissions: Option<Vec<String>>,
    #[schema(value_type = Option<FieldPolicy>)]
    fields: Option<BTreeMap<String, String>>,
    /// Refused by name: a new role has no version to expect.
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(ignore)]
    expected_version: Option<i64>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModulesInput {
    /// Every module that should be active (the others are switched off).
    #[schema(value_type = Vec<ModuleName>)]
    modules: Vec<String>,
}

fn parse_policy(
    errors: &mut Vec<FieldError>,
    permissions: Vec<String>,
    fields: BTreeMap<String, String>,
) -> Policy {
    let mut policy = Policy::default();
    for p in permissions {
        match Permission::parse(&p) {
            Some(p) => {
                policy.permissions.insert(p);
            }
            None => errors.push(FieldError::new(
                format!("permissions.{p}"),
                "is not a permission",
            )),
        }
    }
    for (f, access) in fields {
        if !CONTACT_FIELDS.contains(&f.as_str()) {
            errors.push(FieldError::new(
                format!("fields.{f}"),
                format!("is not a contact field ({})", CONTACT_FIELDS.join(", ")),
            ));
            continue;
        }
        let access = match access.as_str() {
            "hidden" => FieldAccess::Hidden,
            "read" => FieldAccess::Read,
            "write" => FieldAccess::Write,
            _ => {
                errors.push(FieldError::new(
                    format!("fields.{f}"),
                    "must be hidden, read or write",
                ));
                continue;
            }
        };
        if access != FieldAccess::Hidden {
            policy.fields.insert(f, access);
        }
    }
    policy
}

fn policy_json(p: &Policy) -> PolicyDoc {
    PolicyDoc {
        permissions: serde_json::from_value(
            serde_json::to_value(&p.permissions).unwrap_or_default(),
        )
        .unwrap_or_default(),
        fields: serde_json::to_value(&p.fields).unwrap_or_default(),
    }
}

pub(crate) async fn list(s: AppState, a: Authed) -> Result<Ok200<RoleList>, ApiError> {
    let client = s.pool.get().await?;
    let mut items: Vec<RoleItem> = accounts::builtin_roles()
        .map(|(r, p)| RoleItem {
            id: r.name().to_owned(),
            name: r.name().to_owned(),
            builtin: true,
            retired: None,
            policy: policy_json(&p),
        })
        .collect();
    for r in accounts::list_roles(&client, a.caller.org_id).await? {
        items.push(RoleItem {
            id: r.role_id.to_string(),
            name: r.name.to_string(),
            builtin: false,
            retired: Some(r.retired),
            policy: policy_json(&r.policy),
        });
    }
    Ok(Ok200(RoleList { items }))
}

pub(crate) async fn define(
    s: AppState,
    a: Authed,
    Json(input): Json<NewRoleInput>,
) -> Result<Created<CreatedId>, ApiError> {
    let mut errors = Vec::new();
    let name = match input.name.as_deref().map(Name::parse) {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            errors.push(FieldError::new("name", e.0));
            None
        }
        None => {
            errors.push(FieldError::new("name", "is required"));
            None
        }
    };
    if input.expected_version.is_some() {
        errors.push(FieldError::new(
            "expected_version",
            "only allowed when changing",
        ));
    }
    let policy = parse_policy(
        &mut errors,
        input.permissions.unwrap_or_default(),
        input.fields.unwrap_or_default(),
    );
    let (Some(name), true) = (name, errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    let role_id = Uuid::now_v7();
    accounts::role_command(
        &s.executor,
        a.caller.org_id,
        role_id,
        RoleCommand::Define {
            role_id,
            org_id: a.caller.org_id,
            name,
            policy,
            by: a.access.grantor(),
        },
        &a.metadata(),
        Some(0),
    )
    .await?;
    Ok(Created {
        body: CreatedId { id: role_id },
        location: format!("/v1/roles/{role_id}"),
    })
}

pub(crate) async fn change(
    s: AppState,
    a: Authed,
    Id(role_id): Id,
    Json(input): Json<RoleDefinition>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let name = match input.name.as_deref().map(Name::parse) {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            errors.push(FieldError::new("name", e.0));
            None
        }
        None => None,
    };
    let policy = (input.permissions.is_some() || input.fields.is_some()).then(|| {
        parse_policy(
            &mut errors,
            input.permissions.unwrap_or_default(),
            input.fields.unwrap_or_default(),
        )
    });
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let o = accounts::role_command(
        &s.executor,
        a.caller.org_id,
        role_id,
        RoleCommand::Change {
            name,
            policy,
            by: a.access.grantor(),
        },
        &a.metadata(),
        input.expected_version,
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn retire(
    s: AppState,
    a: Authed,
    Id(role_id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    let o = accounts::role_command(
        &s.executor,
        a.caller.org_id,
        role_id,
        RoleCommand::Retire,
        &a.metadata(),
        None,
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn set_modules(
    s: AppState,
    a: Authed,
    Json(input): Json<ModulesInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut modules = BTreeSet::new();
    let mut errors = Vec::new();
    for m in input.modules {
        match Module::parse(&m) {
            Some(m) => {
                modules.insert(m);
            }
            None => errors.push(FieldError::new(
                format!("modules.{m}"),
                format!(
                    "is not a module ({})",
                    Module::ALL.map(Module::name).join(", ")
                ),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let o = accounts::organization_command(
        &s.executor,
        a.caller.org_id,
        OrganizationCommand::SetModules { modules },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TwoFactorInput {
    required: bool,
}

/// Whether the organisation's Owners and Admins must use 2FA.
pub(crate) async fn set_two_factor(
    s: AppState,
    a: Authed,
    Json(input): Json<TwoFactorInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let o = accounts::organization_command(
        &s.executor,
        a.caller.org_id,
        OrganizationCommand::RequireTwoFactor {
            required: input.required,
        },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

/// Who could read a contact field at a moment (default: now), from the events.
pub(crate) async fn field_access(
    s: AppState,
    a: Authed,
    Query(q): Query<FieldAccessQuery>,
) -> Result<Ok200<FieldReaders>, ApiError> {
    let field = q.field;
    if !CONTACT_FIELDS.contains(&field.as_str()) {
        return Err(query_error(
            "field",
            &format!("must be one of {}", CONTACT_FIELDS.join(", ")),
        ));
    }
    let at = q.at.map_or_else(chrono::Utc::now, |t| t.0);
    let client = s.pool.get().await?;
    let holders =
        crm_infra::access::history::field_readers(&client, a.caller.org_id, &field, at).await?;
    let readers = holders
        .iter()
        .map(|h| FieldReader {
            kind: h.kind.to_owned(),
            id: h.id.clone(),
            role: text_of(&h.role),
            access: text_of(&h.access),
        })
        .collect();
    Ok(Ok200(FieldReaders { field, at, readers }))
}
