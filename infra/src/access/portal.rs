//! Client portal accounts: granted and revoked by command on the contact's portal
//! stream; the login row (`portal_accounts`) is written in the same transaction.

use crm_domain::metadata::EventMetadata;
use crm_domain::portal::{PortalAccount, PortalCommand, PortalError, PortalEvent};
use deadpool_postgres::GenericClient;
use futures::FutureExt;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::access::cache::execute_access_change;
use crate::commands::executor::{CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;

fn db(e: tokio_postgres::Error) -> CommandError<PortalError> {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        CommandError::Domain(PortalError::EmailTaken)
    } else {
        CommandError::Store(StoreError::from(e))
    }
}

/// Runs a portal command for `contact_id` of `org_id`. A new password's hash, if any,
/// is stored with its `PortalPasswordSet` event.
pub async fn command(
    executor: &Executor,
    org_id: Uuid,
    contact_id: Uuid,
    command: PortalCommand,
    password_hash: Option<String>,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CommandError<PortalError>> {
    let effect = crate::commands::executor::effect(move |tx, events: &[PortalEvent]| {
        let hash = password_hash.clone();
        async move {
            for event in events {
                match event {
                    PortalEvent::PortalAccessGranted { login, .. } => {
                        tx.execute(
                            "INSERT INTO portal_accounts (contact_id, org_id, email_lower) VALUES ($1, $2, $3) \
                             ON CONFLICT (contact_id) DO UPDATE SET email_lower = EXCLUDED.email_lower, active = true",
                            &[&contact_id, &org_id, &login.email.as_str().to_lowercase()],
                        )
                        .await
                        .map_err(db)?;
                    }
                    PortalEvent::PortalAccessRevoked {} => {
                        tx.execute(
                            "UPDATE portal_accounts SET active = false, token_generation = token_generation + 1 WHERE contact_id = $1",
                            &[&contact_id],
                        )
                        .await
                        .map_err(db)?;
                    }
                    PortalEvent::PortalPasswordSet {} => {
                        tx.execute(
                            "UPDATE portal_accounts SET password_hash = $2, token_generation = token_generation + 1 WHERE contact_id = $1",
                            &[&contact_id, &hash],
                        )
                        .await
                        .map_err(db)?;
                    }
                    PortalEvent::PortalSignedOut {} => {
                        tx.execute(
                            "UPDATE portal_accounts SET token_generation = token_generation + 1 WHERE contact_id = $1",
                            &[&contact_id],
                        )
                        .await
                        .map_err(db)?;
                    }
                }
            }
            Ok(())
        }
        .boxed()
    });
    execute_access_change::<PortalAccount>(
        executor,
        org_id,
        &contact_id.to_string(),
        command,
        meta,
        None,
        &effect,
    )
    .await
}

/// A portal login as stored.
#[derive(Debug, Clone)]
pub struct PortalCredential {
    pub contact_id: Uuid,
    pub org_id: Uuid,
    pub password_hash: Option<String>,
    pub token_generation: i32,
    /// The organisation has the portal module switched on.
    pub portal_on: bool,
}

const SELECT: &str = "SELECT p.contact_id, p.org_id, p.password_hash, p.token_generation, \
     'portal' = ANY(o.modules) FROM portal_accounts p JOIN organizations o ON o.org_id = p.org_id";

fn row_to(r: &tokio_postgres::Row) -> PortalCredential {
    PortalCredential {
        contact_id: r.get(0),
        org_id: r.get(1),
        password_hash: r.get(2),
        token_generation: r.get(3),
        portal_on: r.get(4),
    }
}

/// The active portal login of `email` in `org_id`.
pub async fn find(
    client: &impl GenericClient,
    org_id: Uuid,
    email: &str,
) -> Result<Option<PortalCredential>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!("{SELECT} WHERE p.org_id = $1 AND p.email_lower = $2 AND p.active"),
            &[&org_id, &email.trim().to_lowercase()],
        )
        .await?
        .as_ref()
        .map(row_to))
}

/// The active portal login of a contact.
pub async fn by_contact(
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<Option<PortalCredential>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!("{SELECT} WHERE p.org_id = $1 AND p.contact_id = $2 AND p.active"),
            &[&org_id, &contact_id],
        )
        .await?
        .as_ref()
        .map(row_to))
}
