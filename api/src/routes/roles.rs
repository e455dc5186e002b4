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
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

use super::{allowed, body, require_json, with_state, Authed};
use crate::error::{finish, json_response, parse_json, ApiError, FieldError};
use crate::state::AppState;

const BODY_LIMIT: u64 = 16 * 1024;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleDefinition {
    name: Option<String>,
    permissions: Option<Vec<String>>,
    fields: Option<BTreeMap<String, String>>,
    expected_version: Option<i64>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModulesInput {
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

fn policy_json(p: &Policy) -> Value {
    json!({ "permissions": p.permissions, "fields": p.fields })
}

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let list = warp::path!("v1" / "roles")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::RolesRead))
        .and_then(|s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(list(s, a).await, &rid)
        });
    let define = warp::path!("v1" / "roles")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::RolesManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(define(s, a, ct, b).await, &rid)
            },
        );
    let change = warp::path!("v1" / "roles" / String)
        .and(warp::patch())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::RolesManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |id: String, s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(change(s, a, id, ct, b).await, &rid)
            },
        );
    let retire = warp::path!("v1" / "roles" / String / "retire")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::RolesManage))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(retire(s, a, id).await, &rid)
        });
    let modules = warp::path!("v1" / "organization" / "modules")
        .and(warp::put())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::OrganizationManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(set_modules(s, a, ct, b).await, &rid)
            },
        );
    let two_factor = warp::path!("v1" / "organization" / "two-factor")
        .and(warp::put())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::OrganizationManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(require_two_factor(s, a, ct, b).await, &rid)
            },
        );
    let field_access = warp::path!("v1" / "audit" / "field-access")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::RolesRead))
        .and(super::raw_query())
        .and_then(|s: AppState, a: Authed, q: String| async move {
            let rid = a.ctx.request_id.clone();
            finish(field_access(s, a, q).await, &rid)
        });
    list.or(define)
        .unify()
        .or(two_factor)
        .unify()
        .or(field_access)
        .unify()
        .or(change)
        .unify()
        .or(retire)
        .unify()
        .or(modules)
        .unify()
        .boxed()
}

async fn list(s: AppState, a: Authed) -> Result<Response, ApiError> {
    let client = s.pool.get().await?;
    let mut items: Vec<Value> = accounts::builtin_roles()
        .map(|(r, p)| json!({ "id": r.name(), "name": r.name(), "builtin": true, "policy": policy_json(&p) }))
        .collect();
    for r in accounts::list_roles(&client, a.caller.org_id).await? {
        items.push(json!({
            "id": r.role_id,
            "name": r.name,
            "builtin": false,
            "retired": r.retired,
            "policy": policy_json(&r.policy),
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({ "items": items }),
        &a.ctx.request_id,
    ))
}

fn parse_role_id(raw: &str) -> Result<Uuid, ApiError> {
    super::parse_uuid(raw, "custom role")
}

async fn define(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let input: RoleDefinition = parse_json(&body)?;
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
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "id": role_id }),
        &a.ctx.request_id,
    ))
}

async fn change(
    s: AppState,
    a: Authed,
    id: String,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let role_id = parse_role_id(&id)?;
    require_json(ct.as_deref())?;
    let input: RoleDefinition = parse_json(&body)?;
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
    Ok(super::outcome(&o, &a.ctx.request_id))
}

async fn retire(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let role_id = parse_role_id(&id)?;
    let o = accounts::role_command(
        &s.executor,
        a.caller.org_id,
        role_id,
        RoleCommand::Retire,
        &a.metadata(),
        None,
    )
    .await?;
    Ok(super::outcome(&o, &a.ctx.request_id))
}

async fn set_modules(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let input: ModulesInput = parse_json(&body)?;
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
    Ok(super::outcome(&o, &a.ctx.request_id))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TwoFactorInput {
    required: bool,
}

/// Whether the organisation's Owners and Admins must use 2FA.
async fn require_two_factor(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let input: TwoFactorInput = parse_json(&body)?;
    let o = accounts::organization_command(
        &s.executor,
        a.caller.org_id,
        OrganizationCommand::RequireTwoFactor {
            required: input.required,
        },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o, &a.ctx.request_id))
}

/// Who could read a contact field at a moment (default: now), from the events.
async fn field_access(s: AppState, a: Authed, raw: String) -> Result<Response, ApiError> {
    let q = super::parse_query(&raw, &["field", "at"])?;
    let field = q
        .get("field")
        .filter(|f| CONTACT_FIELDS.contains(&f.as_str()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("`field` must be one of {}", CONTACT_FIELDS.join(", ")),
            )
        })?;
    let at = match q.get("at") {
        Some(v) => super::parse_time("at", v)?,
        None => chrono::Utc::now(),
    };
    let client = s.pool.get().await?;
    let holders =
        crm_infra::access::history::field_readers(&client, a.caller.org_id, field, at).await?;
    let items: Vec<Value> = holders
        .iter()
        .map(|h| json!({ "kind": h.kind, "id": h.id, "role": h.role, "access": h.access }))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "field": field, "at": at, "readers": items }),
        &a.ctx.request_id,
    ))
}
