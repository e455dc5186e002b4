//! `/v1/api-keys`: issue (the key is in the response, once), list, revoke.

use std::collections::BTreeSet;

use crm_domain::access::{Permission, RoleRef};
use crm_domain::api_key::ApiKeyCommand;
use crm_domain::values::Name;
use crm_infra::access::api_keys as keys;
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueInput {
    name: String,
    role: String,
    /// Narrows the role to these of its permissions.
    permissions: Option<Vec<String>>,
    expires_at: Option<String>,
}

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let issue = warp::path!("v1" / "api-keys")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ApiKeysManage))
        .and(body(16 * 1024))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(issue(s, a, ct, b).await, &rid)
            },
        );
    let list = warp::path!("v1" / "api-keys")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::ApiKeysManage))
        .and_then(|s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(list(s, a).await, &rid)
        });
    let revoke = warp::path!("v1" / "api-keys" / String / "revoke")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state, Permission::ApiKeysManage))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(revoke(s, a, id).await, &rid)
        });
    issue.or(list).unify().or(revoke).unify().boxed()
}

async fn issue(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let input: IssueInput = parse_json(&body)?;
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
        .map(|v| super::parse_time("expires_at", v))
    {
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => {
            errors.push(FieldError::new("expires_at", "must be an RFC 3339 time"));
            None
        }
        None => None,
    };
    let (Some(name), Some(role), true) = (name, role, errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    let grant = super::users::grant_of(&s, &a, role).await?;
    let key = crate::api_keys::generate();
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
        },
        &a.metadata(),
    )
    .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "id": key_id,
            "key": key.secret,
            "last4": key.last4,
            "role": role,
            "expires_at": expires_at,
            "note": "the key is shown this once; only its digest is stored",
        }),
        &a.ctx.request_id,
    ))
}

async fn list(s: AppState, a: Authed) -> Result<Response, ApiError> {
    let client = s.pool.get().await?;
    let items: Vec<Value> = keys::list(&client, a.caller.org_id)
        .await?
        .into_iter()
        .map(|k| {
            json!({
                "id": k.key_id, "name": k.name, "last4": k.last4, "role": k.role,
                "permissions": k.only, "expires_at": k.expires_at, "revoked_at": k.revoked_at,
                "last_used_at": k.last_used_at, "created_at": k.created_at,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "items": items }),
        &a.ctx.request_id,
    ))
}

async fn revoke(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let key_id = super::parse_uuid(&id, "API key")?;
    let o = keys::revoke(&s.executor, a.caller.org_id, key_id, &a.metadata()).await?;
    Ok(super::outcome(&o, &a.ctx.request_id))
}
