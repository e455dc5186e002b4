//! Organisations and staff users: their commands go through the event store; login
//! credentials sit beside it in `credentials`, mutable and erasable.

use crm_domain::metadata::EventMetadata;
use crm_domain::organization::{Organization, OrganizationCommand, OrganizationError};
use crm_domain::user::{Person, Role, User, UserCommand, UserError};
use crm_domain::values::{Email, Name};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::commands::{CommandError, Executor};
use crate::event_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("organisation not found")]
    NoSuchOrganization,
    #[error(transparent)]
    Organization(#[from] CommandError<OrganizationError>),
    #[error(transparent)]
    User(#[from] CommandError<UserError>),
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
}

pub async fn create_organization(executor: &Executor, name: Name) -> Result<Uuid, AccountError> {
    let org_id = Uuid::now_v7();
    let meta = EventMetadata::system(org_id, "operator");
    executor
        .execute::<Organization>(
            org_id,
            &org_id.to_string(),
            OrganizationCommand::Create { org_id, name },
            &meta,
            Some(0),
        )
        .await?;
    Ok(org_id)
}

pub async fn organization_exists(
    executor: &Executor,
    pool: &Pool,
    org_id: Uuid,
) -> Result<bool, AccountError> {
    let client = pool.get().await?;
    let loaded = executor
        .load::<Organization>(&client, org_id, &org_id.to_string())
        .await?;
    Ok(loaded.aggregate.id.is_some())
}

/// A staff user to register; the password is already hashed.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub org_id: Uuid,
    pub email: Email,
    pub display_name: Name,
    pub role: Role,
    pub password_hash: String,
}

/// Registers a staff user.
pub async fn create_user(
    executor: &Executor,
    pool: &Pool,
    user: NewUser,
    meta: &EventMetadata,
) -> Result<Uuid, AccountError> {
    let NewUser {
        org_id,
        email,
        display_name,
        role,
        password_hash,
    } = user;
    if !organization_exists(executor, pool, org_id).await? {
        return Err(AccountError::NoSuchOrganization);
    }
    let user_id = Uuid::now_v7();
    let client = pool.get().await?;
    // Reserve the email first; the unique index makes two registrations race safely.
    client
        .execute(
            "INSERT INTO credentials (user_id, org_id, email_lower, password_hash) VALUES ($1, $2, $3, $4)",
            &[&user_id, &org_id, &email.as_str().to_lowercase(), &password_hash],
        )
        .await
        .map_err(|e| {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                AccountError::EmailTaken
            } else {
                AccountError::Db(e)
            }
        })?;
    let result = executor
        .execute::<User>(
            org_id,
            &user_id.to_string(),
            UserCommand::Register {
                user_id,
                org_id,
                person: Person {
                    email,
                    display_name,
                },
                role,
            },
            meta,
            Some(0),
        )
        .await;
    if let Err(e) = result {
        client
            .execute("DELETE FROM credentials WHERE user_id = $1", &[&user_id])
            .await?;
        return Err(e.into());
    }
    Ok(user_id)
}

/// The login stored for an email address, if any.
pub async fn find_credential(
    client: &impl GenericClient,
    email: &str,
) -> Result<Option<Credential>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT user_id, org_id, password_hash, active FROM credentials WHERE email_lower = $1",
            &[&email.trim().to_lowercase()],
        )
        .await?;
    Ok(row.map(|r| Credential {
        user_id: r.get(0),
        org_id: r.get(1),
        password_hash: r.get(2),
        active: r.get(3),
    }))
}

/// Whether the store holds no event at all (a fresh installation).
pub async fn store_is_empty(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM events)", &[])
        .await?
        .get(0))
}
