//! Consent commands on a contact's `consent` stream. Open double opt-in confirmations
//! are indexed by their token's SHA-256 in the same transaction, so the public
//! confirmation endpoint finds the contact from the token alone.

use crm_domain::consent::ledger::{ConsentCommand, ConsentError, ConsentEvent, ConsentLedger};
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::GenericClient;
use futures::FutureExt;
use uuid::Uuid;

use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor, Loaded};
use crate::store::event_store::StoreError;

/// Runs a consent command for `contact_id`.
pub async fn execute(
    executor: &Executor,
    org_id: Uuid,
    contact_id: Uuid,
    command: ConsentCommand,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CommandError<ConsentError>> {
    execute_returning(executor, org_id, contact_id, command, meta, None)
        .await
        .map(|(outcome, _)| outcome)
}

/// [`execute`], also returning the events written (what a receipt signs); `loaded` is
/// the contact's consent stream as the caller read it, if it did
/// ([`Executor::execute_returning`]).
pub async fn execute_returning(
    executor: &Executor,
    org_id: Uuid,
    contact_id: Uuid,
    command: ConsentCommand,
    meta: &EventMetadata,
    loaded: Option<Loaded<ConsentLedger>>,
) -> Result<(CommandOutcome, Vec<ConsentEvent>), CommandError<ConsentError>> {
    let confirm_token = match &command {
        ConsentCommand::Confirm { token_sha256, .. } => Some(token_sha256.clone()),
        _ => None,
    };
    let id = contact_id.to_string();
    if !matches!(
        command,
        ConsentCommand::RequestConfirmation { .. } | ConsentCommand::Confirm { .. }
    ) {
        return executor
            .execute_returning::<ConsentLedger>(org_id, &id, command, meta, None, None, loaded)
            .await;
    }
    let index_tokens = effect(move |tx, events: &[ConsentEvent]| {
        let confirm_token = confirm_token.clone();
        async move {
            let db = |e: tokio_postgres::Error| CommandError::Store(StoreError::from(e));
            for e in events {
                match e {
                    ConsentEvent::ConfirmationRequested {
                        token_sha256,
                        expires_at,
                        ..
                    } => {
                        tx.execute(
                            "INSERT INTO consent_confirmations \
                             (token_sha256, org_id, contact_id, expires_at) VALUES ($1, $2, $3, $4)",
                            &[token_sha256, &org_id, &contact_id, expires_at],
                        )
                        .await
                        .map_err(db)?;
                    }
                    // Single use: the row goes with the confirmation.
                    ConsentEvent::ConsentConfirmed { .. } => {
                        tx.execute(
                            "DELETE FROM consent_confirmations WHERE token_sha256 = $1",
                            &[&confirm_token],
                        )
                        .await
                        .map_err(db)?;
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        .boxed()
    });
    executor
        .execute_returning::<ConsentLedger>(
            org_id,
            &id,
            command,
            meta,
            None,
            Some(&index_tokens),
            loaded,
        )
        .await
}

/// The organisation and contact of an open confirmation (unexpired), by its token's
/// SHA-256.
pub async fn find_confirmation(
    client: &impl GenericClient,
    token_sha256: &str,
) -> Result<Option<(Uuid, Uuid)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT org_id, contact_id FROM consent_confirmations \
             WHERE token_sha256 = $1 AND expires_at > now()",
            &[&token_sha256],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Deletes confirmations that expired more than a day ago.
pub async fn purge_expired(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM consent_confirmations WHERE expires_at < now() - interval '1 day'",
            &[],
        )
        .await
}
