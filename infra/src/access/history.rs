//! "Who could see this field on that day?", answered from the events alone: the
//! organisation's user, custom role, API key and organisation events up to a moment,
//! folded into who held which role then, with the built-in policies of this version.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use crm_domain::access::{builtin_policy, FieldAccess, Module, Permission, Policy, RoleRef};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

/// Someone who could read a field at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// `user` or `api_key`.
    pub kind: &'static str,
    pub id: String,
    pub role: RoleRef,
    pub access: FieldAccess,
}

struct KeyState {
    role: RoleRef,
    only: Option<BTreeSet<Permission>>,
    expires: Option<DateTime<Utc>>,
    live: bool,
}

#[derive(Default)]
struct State {
    users: BTreeMap<String, (RoleRef, bool)>,
    roles: BTreeMap<Uuid, (Policy, bool)>,
    keys: BTreeMap<String, KeyState>,
    modules: BTreeSet<Module>,
}

fn role_of(v: &Value) -> Option<RoleRef> {
    v.as_str().and_then(RoleRef::parse)
}

impl State {
    fn apply(&mut self, aggregate_type: &str, id: &str, payload: &Value) {
        let Some((name, body)) = payload.as_object().and_then(|o| o.iter().next()) else {
            return;
        };
        match (aggregate_type, name.as_str()) {
            ("user", "UserRegistered") => {
                if let Some(r) = role_of(&body["role"]) {
                    self.users.insert(id.to_owned(), (r, true));
                }
            }
            ("user", "UserRoleChanged") => {
                if let (Some(r), Some(u)) = (role_of(&body["to"]), self.users.get_mut(id)) {
                    u.0 = r;
                }
            }
            ("user", "UserDeactivated") => {
                if let Some(u) = self.users.get_mut(id) {
                    u.1 = false;
                }
            }
            ("user", "UserReactivated") => {
                if let Some(u) = self.users.get_mut(id) {
                    u.1 = true;
                }
            }
            ("role", "RoleDefined" | "RoleChanged") => {
                if let (Ok(rid), Ok(p)) = (
                    Uuid::parse_str(id),
                    serde_json::from_value::<Policy>(body["policy"].clone()),
                ) {
                    self.roles.insert(rid, (p, true));
                }
            }
            ("role", "RoleRetired") => {
                if let Some(r) = Uuid::parse_str(id)
                    .ok()
                    .and_then(|i| self.roles.get_mut(&i))
                {
                    r.1 = false;
                }
            }
            ("api_key", "ApiKeyIssued") => {
                if let Some(r) = role_of(&body["role"]) {
                    let only = serde_json::from_value(body["only"].clone()).ok().flatten();
                    let expires = serde_json::from_value(body["expires_at"].clone())
                        .ok()
                        .flatten();
                    let key = KeyState {
                        role: r,
                        only,
                        expires,
                        live: true,
                    };
                    self.keys.insert(id.to_owned(), key);
                }
            }
            ("api_key", "ApiKeyRevoked") => {
                if let Some(k) = self.keys.get_mut(id) {
                    k.live = false;
                }
            }
            ("organization", "OrganizationCreated") => {
                self.modules = Module::DEFAULT.into_iter().collect();
            }
            ("organization", "ModulesChanged") => {
                if let Ok(m) = serde_json::from_value(body["modules"].clone()) {
                    self.modules = m;
                }
            }
            _ => {}
        }
    }

    fn policy(&self, role: RoleRef) -> Option<Policy> {
        match role {
            RoleRef::Builtin(r) => Some(builtin_policy(r)),
            RoleRef::Custom(id) => self
                .roles
                .get(&id)
                .filter(|(_, live)| *live)
                .map(|(p, _)| p.clone()),
        }
    }
}

/// Everyone of `org_id` who could read contacts' `field` at `at`: active users and live
/// API keys whose role held `contacts.read` and did not hide the field, with the
/// contacts module on.
pub async fn field_readers(
    client: &impl GenericClient,
    org_id: Uuid,
    field: &str,
    at: DateTime<Utc>,
) -> Result<Vec<Holder>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT aggregate_type, aggregate_id, payload FROM events \
             WHERE org_id = $1 AND aggregate_type IN ('user', 'role', 'api_key', 'organization') \
               AND recorded_at <= $2 \
             ORDER BY global_position",
            &[&org_id, &at],
        )
        .await?;
    let mut state = State::default();
    for r in &rows {
        state.apply(r.get(0), r.get(1), &r.get::<_, Value>(2));
    }
    if !state.modules.contains(&Module::Contacts) {
        return Ok(Vec::new());
    }
    let can_read = |policy: &Policy| {
        (policy.allows(Permission::ContactsRead) && policy.field(field) != FieldAccess::Hidden)
            .then(|| policy.field(field))
    };
    let mut out = Vec::new();
    for (id, (role, active)) in &state.users {
        if let Some(access) = active
            .then(|| state.policy(*role))
            .flatten()
            .and_then(|p| can_read(&p))
        {
            out.push(Holder {
                kind: "user",
                id: id.clone(),
                role: *role,
                access,
            });
        }
    }
    for (id, key) in &state.keys {
        if !key.live || key.expires.is_some_and(|e| e <= at) {
            continue;
        }
        let role = &key.role;
        let Some(mut policy) = state.policy(*role) else {
            continue;
        };
        if let Some(only) = &key.only {
            policy.permissions = policy.permissions.intersection(only).copied().collect();
        }
        if let Some(access) = can_read(&policy) {
            out.push(Holder {
                kind: "api_key",
                id: id.clone(),
                role: *role,
                access,
            });
        }
    }
    Ok(out)
}
