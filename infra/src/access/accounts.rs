//! Organisations, staff users and custom roles: their commands go through the event
//! store; the current state an authorisation needs (a user's role, whether active, its
//! token generation; an organisation's modules; custom roles' policies) is written by
//! the same transaction that appends the events (an effect of
//! [`Executor::execute_with`], through [`execute_access_change`]), so it is
//! never ahead of or behind them. Login credentials sit beside the store in
//! `credentials`, mutable and erasable.

use std::collections::BTreeSet;

use crm_domain::access::{builtin_policy, Module, Policy, Role, RoleRef};
use crm_domain::metadata::EventMetadata;
use crm_domain::organization::{
    Organization, OrganizationCommand, OrganizationError, OrganizationEvent,
};
use crm_domain::role::{CustomRole, RoleCommand, RoleError, RoleEvent};
use crm_domain::user::{Grant, Grantor, Person, User, UserCommand, UserError, UserEvent};
use crm_domain::values::{Email, Name};
use deadpool_postgres::{GenericClient, Pool, Transaction};
use futures::FutureExt;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::access::cache::execute_access_change;
use crate::commands::executor::{CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("organisation not found")]
    NoSuchOrganization,
    #[error(transparent)]
    Organization(#[from] CommandError<OrganizationError>),
    #[error(transparent)]
    User(#[from] CommandError<UserError>),
    #[error(transparent)]
    Role(#[from] CommandError<RoleError>),
    #[error(transparent)]
    ApiKey(#[from] CommandError<crm_domain::api_key::ApiKeyError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// A staff login as stored.
#[derive(Debug, Clone)]
pub struct Credential {
    pub user_id: Uuid,
    pub org_id: Uuid,
    pub password_hash: String,
    pub active: bool,
    pub token_generation: i32,
    pub totp_enabled: bool,
    /// Lower-cased: the key failed logins are counted under.
    pub email: String,
}

/// What a staff user may do right now: read for every request.
#[derive(Debug, Clone)]
pub struct Access {
    pub user_id: Uuid,
    pub org_id: Uuid,
    pub role: RoleRef,
    pub policy: Policy,
    pub modules: BTreeSet<Module>,
    pub token_generation: i32,
    /// The organisation requires 2FA of this user's role and the user has not set it up:
    /// only their own account's routes are open.
    pub two_factor_pending: bool,
    /// An AI agent's key: the user who registered the agent (the policy above is
    /// already capped by that user's).
    pub agent_of: Option<Uuid>,
}

impl Access {
    /// What this user may grant to others.
    pub fn grantor(&self) -> Grantor {
        Grantor {
            is_owner: self.role.is_owner(),
            policy: self.policy.clone(),
        }
    }
}

fn db<E: std::error::Error>(e: tokio_postgres::Error) -> CommandError<E> {
    CommandError::Store(StoreError::from(e))
}

pub(crate) fn parse_modules(names: Vec<String>) -> BTreeSet<Module> {
    names.iter().filter_map(|m| Module::parse(m)).collect()
}

/// The access of an active user of `org_id`, or `None` (unknown, deactivated, or
/// holding a custom role that no longer exists: deny by default).
pub async fn load_access(
    client: &impl GenericClient,
    user_id: Uuid,
    org_id: Uuid,
) -> Result<Option<Access>, tokio_postgres::Error> {
    // Runs for every request: a cached prepared statement (no parse and plan each time).
    let statement = client
        .prepare_cached(
            "SELECT c.role, c.token_generation, o.modules, r.policy, r.retired, \
                    o.two_factor_required AND c.role IN ('owner', 'admin') AND NOT c.totp_enabled \
             FROM credentials c JOIN organizations o ON o.org_id = c.org_id \
             LEFT JOIN roles r ON r.role_id = c.custom_role AND r.org_id = c.org_id \
             WHERE c.user_id = $1 AND c.org_id = $2 AND c.active",
        )
        .await?;
    let row = client.query_opt(&statement, &[&user_id, &org_id]).await?;
    let Some(row) = row else { return Ok(None) };
    let role: String = row.get(0);
    let Some(role) = RoleRef::parse(&role) else {
        return Ok(None);
    };
    let Some(policy) = resolve_policy(role, row.get(3), row.get(4)) else {
        return Ok(None);
    };
    Ok(Some(Access {
        user_id,
        org_id,
        role,
        policy,
        modules: parse_modules(row.get(2)),
        token_generation: row.get(1),
        agent_of: None,
        two_factor_pending: row.get(5),
    }))
}

/// The policy of `role`, given the `roles` row joined for a custom role (its policy
/// and whether retired). `None`: a custom role that is missing, retired or unreadable
/// grants nothing (deny by default).
pub(crate) fn resolve_policy(
    role: RoleRef,
    custom_policy: Option<serde_json::Value>,
    retired: Option<bool>,
) -> Option<Policy> {
    match role {
        RoleRef::Builtin(r) => Some(builtin_policy(r)),
        RoleRef::Custom(_) => match (custom_policy, retired) {
            (Some(p), Some(false)) => serde_json::from_value(p).ok(),
            _ => None,
        },
    }
}

/// What a role grants in `org_id`: a built-in's policy, or a live custom role's.
pub async fn policy_of(
    client: &impl GenericClient,
    org_id: Uuid,
    role: RoleRef,
) -> Result<Option<Policy>, tokio_postgres::Error> {
    match role {
        RoleRef::Builtin(r) => Ok(Some(builtin_policy(r))),
        RoleRef::Custom(id) => {
            let row = client
                .query_opt(
                    "SELECT policy FROM roles WHERE role_id = $1 AND org_id = $2 AND NOT retired",
                    &[&id, &org_id],
                )
                .await?;
            Ok(row.and_then(|r| serde_json::from_value(r.get(0)).ok()))
        }
    }
}

// ---- organisations ----------------------------------------------------------------

fn org_effect(
    org_id: Uuid,
) -> impl for<'t> Fn(
    &'t Transaction<'t>,
    &'t [OrganizationEvent],
) -> futures::future::BoxFuture<'t, Result<(), CommandError<OrganizationError>>>
       + Send
       + Sync {
    move |tx, events| {
        async move {
            for event in events {
                match event {
                    OrganizationEvent::OrganizationCreated { .. } => {
                        let modules: Vec<&str> = Module::DEFAULT.iter().map(|m| m.name()).collect();
                        tx.execute(
                            "INSERT INTO organizations (org_id, modules) VALUES ($1, $2)",
                            &[&org_id, &modules],
                        )
                        .await
                        .map_err(db)?;
                    }
                    OrganizationEvent::ModulesChanged { modules } => {
                        let names: Vec<&str> = modules.iter().map(|m| m.name()).collect();
                        tx.execute(
                            "UPDATE organizations SET modules = $2 WHERE org_id = $1",
                            &[&org_id, &names],
                        )
                        .await
                        .map_err(db)?;
                    }
                    OrganizationEvent::TwoFactorRequirementChanged { required } => {
                        tx.execute(
                            "UPDATE organizations SET two_factor_required = $2 WHERE org_id = $1",
                            &[&org_id, required],
                        )
                        .await
                        .map_err(db)?;
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}

pub async fn create_organization(executor: &Executor, name: Name) -> Result<Uuid, AccountError> {
    let org_id = Uuid::now_v7();
    let meta = EventMetadata::system(org_id, "operator");
    execute_access_change::<Organization>(
        executor,
        org_id,
        &org_id.to_string(),
        OrganizationCommand::Create { org_id, name },
        &meta,
        Some(0),
        &org_effect(org_id),
    )
    .await?;
    crate::consent::privacy::initialize(executor, org_id).await?;
    Ok(org_id)
}

/// Runs an organisation command (modules, 2FA requirement).
pub async fn organization_command(
    executor: &Executor,
    org_id: Uuid,
    command: OrganizationCommand,
    meta: &EventMetadata,
) -> Result<CommandOutcome, AccountError> {
    Ok(execute_access_change::<Organization>(
        executor,
        org_id,
        &org_id.to_string(),
        command,
        meta,
        None,
        &org_effect(org_id),
    )
    .await?)
}

pub async fn organization_exists(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM organizations WHERE org_id = $1", &[&org_id])
        .await?
        .is_some())
}

// ---- users ------------------------------------------------------------------------

/// A staff user to register; the password is already hashed.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub org_id: Uuid,
    pub email: Email,
    pub display_name: Name,
    pub role: RoleRef,
    pub password_hash: String,
}

fn custom_id(role: RoleRef) -> Option<Uuid> {
    match role {
        RoleRef::Custom(id) => Some(id),
        RoleRef::Builtin(_) => None,
    }
}

/// Every change to who holds which role in an organisation takes this lock first, so
/// that "is anyone else still an Owner?" is answered under one writer at a time.
async fn lock_organization(
    tx: &Transaction<'_>,
    org_id: Uuid,
) -> Result<(), CommandError<UserError>> {
    tx.query_opt(
        "SELECT 1 FROM organizations WHERE org_id = $1 FOR UPDATE",
        &[&org_id],
    )
    .await
    .map_err(db)?;
    Ok(())
}

async fn check_an_owner_remains(
    tx: &Transaction<'_>,
    org_id: Uuid,
) -> Result<(), CommandError<UserError>> {
    let owners: i64 = tx
        .query_one(
            "SELECT count(*) FROM credentials WHERE org_id = $1 AND role = 'owner' AND active",
            &[&org_id],
        )
        .await
        .map_err(db)?
        .get(0);
    if owners == 0 {
        return Err(CommandError::Domain(UserError::LastOwner));
    }
    Ok(())
}

/// Registers a staff user: the `UserRegistered` event and the login in one commit.
pub async fn create_user(
    executor: &Executor,
    pool: &Pool,
    user: NewUser,
    by: Grantor,
    meta: &EventMetadata,
) -> Result<Uuid, AccountError> {
    let NewUser {
        org_id,
        email,
        display_name,
        role,
        password_hash,
    } = user;
    let client = pool.get().await?;
    if !organization_exists(&client, org_id).await? {
        return Err(AccountError::NoSuchOrganization);
    }
    let policy = policy_of(&client, org_id, role)
        .await?
        .ok_or(CommandError::Domain(UserError::UnknownRole))?;
    drop(client);
    let user_id = Uuid::now_v7();
    let email_lower = email.as_str().to_lowercase();
    let effect = crate::commands::executor::effect(move |tx, _: &[UserEvent]| {
        let (email_lower, password_hash) = (email_lower.clone(), password_hash.clone());
        async move {
            lock_organization(tx, org_id).await?;
            tx.execute(
                "INSERT INTO credentials (user_id, org_id, email_lower, password_hash, role, custom_role) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&user_id, &org_id, &email_lower, &password_hash, &role.to_string(), &custom_id(role)],
            )
            .await
            .map_err(|e| {
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    CommandError::Domain(UserError::EmailTaken)
                } else {
                    db(e)
                }
            })?;
            Ok(())
        }
        .boxed()
    });
    execute_access_change::<User>(
        executor,
        org_id,
        &user_id.to_string(),
        UserCommand::Register {
            user_id,
            org_id,
            person: Person {
                email,
                display_name,
            },
            grant: Grant { role, policy },
            by,
        },
        meta,
        Some(0),
        &effect,
    )
    .await?;
    Ok(user_id)
}

/// The token generation a user's login row has after the appending transaction, as its
/// own statements left it (read with `RETURNING`, so nothing is read after the commit).
type Generation = std::sync::Arc<std::sync::atomic::AtomicI32>;

/// Applies a user's events to its login row, and refuses what would leave the
/// organisation without an active Owner. The row's token generation ends up in
/// `generation`.
fn user_effect(
    org_id: Uuid,
    user_id: Uuid,
    generation: Generation,
) -> impl for<'t> Fn(
    &'t Transaction<'t>,
    &'t [UserEvent],
) -> futures::future::BoxFuture<'t, Result<(), CommandError<UserError>>>
       + Send
       + Sync {
    move |tx, events| {
        let generation = generation.clone();
        async move {
            lock_organization(tx, org_id).await?;
            for event in events {
                let (sql, role): (&str, Option<RoleRef>) = match event {
                    UserEvent::UserRoleChanged { to, .. } => (
                        "UPDATE credentials SET role = $2, custom_role = $3, updated_at = now() WHERE user_id = $1",
                        Some(*to),
                    ),
                    UserEvent::UserDeactivated {} => (
                        "UPDATE credentials SET active = false, token_generation = token_generation + 1, updated_at = now() WHERE user_id = $1",
                        None,
                    ),
                    UserEvent::UserReactivated {} => (
                        "UPDATE credentials SET active = true, updated_at = now() WHERE user_id = $1",
                        None,
                    ),
                    UserEvent::TwoFactorEnabled {} => (
                        "UPDATE credentials SET totp_enabled = true, token_generation = token_generation + 1, updated_at = now() WHERE user_id = $1",
                        None,
                    ),
                    UserEvent::PasswordChanged {} | UserEvent::UserSignedOut {} => (
                        "UPDATE credentials SET token_generation = token_generation + 1, updated_at = now() WHERE user_id = $1",
                        None,
                    ),
                    UserEvent::TwoFactorDisabled {} | UserEvent::TwoFactorReset {} => {
                        if matches!(event, UserEvent::TwoFactorDisabled {})
                            && two_factor_required_of(tx, user_id).await.map_err(db)?
                        {
                            return Err(CommandError::Domain(UserError::TwoFactorRequired));
                        }
                        // The seed and the backup codes go; the last accepted step
                        // stays. Every session ends.
                        (
                            "UPDATE credentials SET totp_enabled = false, totp_secret = NULL, backup_codes = '{}', \
                             token_generation = token_generation + 1, updated_at = now() WHERE user_id = $1",
                            None,
                        )
                    }
                    UserEvent::UserRegistered { .. } | UserEvent::UserLockedOut { .. } => continue,
                };
                let sql = format!("{sql} RETURNING token_generation");
                let row = match role {
                    Some(r) => tx
                        .query_opt(&sql, &[&user_id, &r.to_string(), &custom_id(r)])
                        .await
                        .map_err(db)?,
                    None => tx.query_opt(&sql, &[&user_id]).await.map_err(db)?,
                };
                if let Some(row) = row {
                    generation.store(row.get(0), std::sync::atomic::Ordering::Release);
                }
            }
            check_an_owner_remains(tx, org_id).await
        }
        .boxed()
    }
}

/// Whether the user's organisation requires 2FA of the user's role (Owners and Admins,
/// when switched on). `user_effect` asks under the organisation's lock; a route may ask
/// first, to refuse before anything is spent.
pub async fn two_factor_required_of(
    client: &impl GenericClient,
    user_id: Uuid,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT o.two_factor_required AND c.role IN ('owner', 'admin') \
             FROM credentials c JOIN organizations o USING (org_id) WHERE c.user_id = $1",
            &[&user_id],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// A change to an existing user of `org_id` (role, deactivation, sign-out, 2FA off).
pub async fn user_command(
    executor: &Executor,
    org_id: Uuid,
    user_id: Uuid,
    command: UserCommand,
    meta: &EventMetadata,
) -> Result<CommandOutcome, AccountError> {
    let effect = user_effect(org_id, user_id, Generation::default());
    Ok(execute_access_change::<User>(
        executor,
        org_id,
        &user_id.to_string(),
        command,
        meta,
        None,
        &effect,
    )
    .await?)
}

/// Changes a user's password: the new hash, the `PasswordChanged` event and the end
/// of every token issued before, in one commit. Returns the new token generation.
/// Puts a failed-login lockout of `user_id` on the record (`UserLockedOut`, a security
/// event): the lockout itself is the edge's, in memory.
pub async fn record_lockout(
    executor: &Executor,
    org_id: Uuid,
    user_id: Uuid,
    until: chrono::DateTime<chrono::Utc>,
    meta: &EventMetadata,
) -> Result<(), CommandError<UserError>> {
    executor
        .execute::<User>(
            org_id,
            &user_id.to_string(),
            UserCommand::RecordLockout { until },
            meta,
            None,
        )
        .await
        .map(|_| ())
}

pub async fn change_password(
    executor: &Executor,
    org_id: Uuid,
    user_id: Uuid,
    password_hash: String,
    meta: &EventMetadata,
) -> Result<i32, AccountError> {
    let generation = Generation::default();
    let inner = user_effect(org_id, user_id, generation.clone());
    let effect = crate::commands::executor::effect(move |tx, events: &[UserEvent]| {
        let hash = password_hash.clone();
        let applied = inner(tx, events);
        async move {
            applied.await?;
            tx.execute(
                "UPDATE credentials SET password_hash = $2 WHERE user_id = $1",
                &[&user_id, &hash],
            )
            .await
            .map_err(db)?;
            Ok(())
        }
        .boxed()
    });
    execute_access_change::<User>(
        executor,
        org_id,
        &user_id.to_string(),
        UserCommand::ChangePassword,
        meta,
        None,
        &effect,
    )
    .await?;
    Ok(generation.load(std::sync::atomic::Ordering::Acquire))
}

const CREDENTIAL: &str = "SELECT user_id, org_id, password_hash, active, token_generation, \
     totp_enabled, email_lower FROM credentials";

fn credential(r: &tokio_postgres::Row) -> Credential {
    Credential {
        user_id: r.get(0),
        org_id: r.get(1),
        password_hash: r.get(2),
        active: r.get(3),
        token_generation: r.get(4),
        totp_enabled: r.get(5),
        email: r.get(6),
    }
}

/// The login stored for an email address, if any.
pub async fn find_credential(
    client: &impl GenericClient,
    email: &str,
) -> Result<Option<Credential>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("{CREDENTIAL} WHERE email_lower = $1"),
            &[&email.trim().to_lowercase()],
        )
        .await?;
    Ok(row.as_ref().map(credential))
}

/// The login of a user, by id.
pub async fn credential_of(
    client: &impl GenericClient,
    user_id: Uuid,
) -> Result<Option<Credential>, tokio_postgres::Error> {
    let row = client
        .query_opt(&format!("{CREDENTIAL} WHERE user_id = $1"), &[&user_id])
        .await?;
    Ok(row.as_ref().map(credential))
}

/// A user as listed to staff (no personal data beyond what the caller's org holds).
#[derive(Debug, Clone)]
pub struct UserRow {
    pub user_id: Uuid,
    pub email: String,
    pub role: String,
    pub active: bool,
}

fn user_row(r: &tokio_postgres::Row) -> UserRow {
    UserRow {
        user_id: r.get(0),
        email: r.get(1),
        role: r.get(2),
        active: r.get(3),
    }
}

const USER_ROW: &str = "SELECT user_id, email_lower, role, active FROM credentials";

/// One user of an organisation.
pub async fn get_user(
    client: &impl GenericClient,
    org_id: Uuid,
    user_id: Uuid,
) -> Result<Option<UserRow>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!("{USER_ROW} WHERE org_id = $1 AND user_id = $2"),
            &[&org_id, &user_id],
        )
        .await?
        .as_ref()
        .map(user_row))
}

/// The users of an organisation, oldest first.
pub async fn list_users(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<Vec<UserRow>, tokio_postgres::Error> {
    Ok(client
        .query(
            &format!("{USER_ROW} WHERE org_id = $1 ORDER BY user_id"),
            &[&org_id],
        )
        .await?
        .iter()
        .map(user_row)
        .collect())
}

/// Whether the store holds no event at all (a fresh installation).
pub async fn store_is_empty(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM events)", &[])
        .await?
        .get(0))
}

// ---- custom roles -----------------------------------------------------------------

/// A custom role as stored.
#[derive(Debug, Clone)]
pub struct RoleRow {
    pub role_id: Uuid,
    pub name: String,
    pub policy: Policy,
    pub retired: bool,
}

fn role_effect(
    org_id: Uuid,
    role_id: Uuid,
) -> impl for<'t> Fn(
    &'t Transaction<'t>,
    &'t [RoleEvent],
) -> futures::future::BoxFuture<'t, Result<(), CommandError<RoleError>>>
       + Send
       + Sync {
    move |tx, events| {
        async move {
            tx.query_opt(
                "SELECT 1 FROM organizations WHERE org_id = $1 FOR UPDATE",
                &[&org_id],
            )
            .await
            .map_err(db)?;
            for event in events {
                match event {
                    RoleEvent::RoleDefined { name, policy, .. }
                    | RoleEvent::RoleChanged { name, policy } => {
                        let policy = serde_json::to_value(policy)
                            .map_err(|e| CommandError::Store(StoreError::Corrupt(0, e.to_string())))?;
                        tx.execute(
                            "INSERT INTO roles (role_id, org_id, name, policy) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (role_id) DO UPDATE SET name = EXCLUDED.name, policy = EXCLUDED.policy",
                            &[&role_id, &org_id, &name.as_str(), &policy],
                        )
                        .await
                        .map_err(db)?;
                    }
                    RoleEvent::RoleRetired {} => {
                        let holders: i64 = tx
                            .query_one(
                                "SELECT (SELECT count(*) FROM credentials WHERE custom_role = $1 AND active) \
                                      + (SELECT count(*) FROM api_keys WHERE custom_role = $1 AND revoked_at IS NULL)",
                                &[&role_id],
                            )
                            .await
                            .map_err(db)?
                            .get(0);
                        if holders > 0 {
                            return Err(CommandError::Domain(RoleError::InUse(holders)));
                        }
                        tx.execute("UPDATE roles SET retired = true WHERE role_id = $1", &[&role_id])
                            .await
                            .map_err(db)?;
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}

/// Runs a command on a custom role of `org_id`.
pub async fn role_command(
    executor: &Executor,
    org_id: Uuid,
    role_id: Uuid,
    command: RoleCommand,
    meta: &EventMetadata,
    expected_version: Option<i64>,
) -> Result<CommandOutcome, AccountError> {
    let effect = role_effect(org_id, role_id);
    Ok(execute_access_change::<CustomRole>(
        executor,
        org_id,
        &role_id.to_string(),
        command,
        meta,
        expected_version,
        &effect,
    )
    .await?)
}

/// The custom roles of an organisation.
pub async fn list_roles(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<Vec<RoleRow>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT role_id, name, policy, retired FROM roles WHERE org_id = $1 ORDER BY role_id",
            &[&org_id],
        )
        .await?
        .iter()
        .map(|r| RoleRow {
            role_id: r.get(0),
            name: r.get(1),
            policy: serde_json::from_value(r.get(2)).unwrap_or_default(),
            retired: r.get(3),
        })
        .collect())
}

/// The built-in roles, for listing next to the custom ones.
pub fn builtin_roles() -> impl Iterator<Item = (Role, Policy)> {
    Role::ALL.into_iter().map(|r| (r, builtin_policy(r)))
}

// ---- two-factor authentication ----------------------------------------------------

/// A user's TOTP state, the seed decrypted.
pub struct TotpState {
    pub secret: Option<Vec<u8>>,
    pub enabled: bool,
}

const TOTP_FIELD: &str = "totp_secret";

/// Reads a user's TOTP seed (opened with the user's data key) and state.
pub async fn totp_state(
    crypto: &crate::crypto::Crypto,
    client: &impl GenericClient,
    org_id: Uuid,
    user_id: Uuid,
) -> Result<Option<TotpState>, AccountError> {
    let Some(row) = client
        .query_opt(
            "SELECT totp_secret, totp_enabled FROM credentials \
             WHERE user_id = $1 AND org_id = $2",
            &[&user_id, &org_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let sealed: Option<Vec<u8>> = row.get(0);
    let subject = user_id.to_string();
    let secret = match sealed {
        None => None,
        Some(sealed) => {
            let key = crypto
                .key_for_reading(client, &org_id, &subject)
                .await
                .map_err(StoreError::from)?;
            key.and_then(|k| {
                crate::crypto::Crypto::open_bytes(&k, &org_id, &subject, TOTP_FIELD, &sealed)
            })
        }
    };
    Ok(Some(TotpState {
        secret,
        enabled: row.get(1),
    }))
}

/// Stores a new, not yet enabled TOTP seed, sealed under the user's data key. Refused
/// (false) when 2FA is already on.
pub async fn store_pending_totp(
    crypto: &crate::crypto::Crypto,
    client: &impl GenericClient,
    org_id: Uuid,
    user_id: Uuid,
    secret: &[u8],
) -> Result<bool, AccountError> {
    let subject = user_id.to_string();
    let key = crypto
        .key_for_writing(client, &org_id, &subject, &[])
        .await
        .map_err(StoreError::from)?;
    let sealed = crate::crypto::Crypto::seal_bytes(&key, &org_id, &subject, TOTP_FIELD, secret)
        .map_err(StoreError::from)?;
    Ok(client
        .execute(
            "UPDATE credentials SET totp_secret = $3 WHERE user_id = $1 AND org_id = $2 AND NOT totp_enabled",
            &[&user_id, &org_id, &sealed],
        )
        .await?
        == 1)
}

/// Turns 2FA on (the `TwoFactorEnabled` event, the backup code digests, and the end
/// of every earlier token, in one commit), recording `step` as used.
pub async fn enable_two_factor(
    executor: &Executor,
    org_id: Uuid,
    user_id: Uuid,
    step: i64,
    backup_digests: Vec<Vec<u8>>,
    meta: &EventMetadata,
) -> Result<i32, AccountError> {
    let generation = Generation::default();
    let inner = user_effect(org_id, user_id, generation.clone());
    let effect = crate::commands::executor::effect(move |tx, events: &[UserEvent]| {
        let digests = backup_digests.clone();
        let applied = inner(tx, events);
        async move {
            applied.await?;
            tx.execute(
                "UPDATE credentials SET backup_codes = $2, totp_last_step = $3 WHERE user_id = $1",
                &[&user_id, &digests, &step],
            )
            .await
            .map_err(db)?;
            Ok(())
        }
        .boxed()
    });
    execute_access_change::<User>(
        executor,
        org_id,
        &user_id.to_string(),
        UserCommand::EnableTwoFactor,
        meta,
        None,
        &effect,
    )
    .await?;
    Ok(generation.load(std::sync::atomic::Ordering::Acquire))
}

/// Turns the user's own 2FA off (`TwoFactorDisabled`: the seed and backup codes go,
/// every earlier token ends; refused where the organisation requires it). Returns the
/// new token generation.
pub async fn disable_two_factor(
    executor: &Executor,
    org_id: Uuid,
    user_id: Uuid,
    meta: &EventMetadata,
) -> Result<i32, AccountError> {
    let generation = Generation::default();
    let effect = user_effect(org_id, user_id, generation.clone());
    execute_access_change::<User>(
        executor,
        org_id,
        &user_id.to_string(),
        UserCommand::DisableTwoFactor,
        meta,
        None,
        &effect,
    )
    .await?;
    Ok(generation.load(std::sync::atomic::Ordering::Acquire))
}

/// Accepts a TOTP time step for a user once: true if `step` is later than every step
/// accepted before (a code, or an earlier one, cannot be used again).
pub async fn consume_totp_step(
    client: &impl GenericClient,
    user_id: Uuid,
    step: i64,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .execute(
            "UPDATE credentials SET totp_last_step = $2 WHERE user_id = $1 AND totp_enabled AND totp_last_step < $2",
            &[&user_id, &step],
        )
        .await?
        == 1)
}

/// Uses up a backup code (by its digest): true once, false ever after.
pub async fn consume_backup_code(
    client: &impl GenericClient,
    user_id: Uuid,
    digest: &[u8],
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .execute(
            "UPDATE credentials SET backup_codes = array_remove(backup_codes, $2) \
             WHERE user_id = $1 AND totp_enabled AND $2 = ANY(backup_codes)",
            &[&user_id, &digest],
        )
        .await?
        == 1)
}
