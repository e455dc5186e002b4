//! Privacy settings: commands on an organisation's `privacy` stream, and the row the
//! send gate reads.

use cqrs_es::Aggregate;
use crm_domain::consent::privacy::{
    Privacy, PrivacyCommand, PrivacyError, PrivacyEvent, PrivacySettings,
};
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::GenericClient;
use futures::FutureExt;
use uuid::Uuid;

use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;

/// The settings row of an organisation (`$1`) and whether its suppression list has any
/// entry: one statement, read by [`settings_of`].
pub(crate) const SETTINGS: &str =
    "SELECT (SELECT settings FROM privacy_settings WHERE org_id = $1), \
     EXISTS (SELECT 1 FROM suppression_list WHERE org_id = $1)";

/// The settings (the defaults when the organisation has no row) and whether there are
/// suppressions, from a row of [`SETTINGS`].
pub(crate) fn settings_of(
    row: &tokio_postgres::Row,
) -> Result<(PrivacySettings, bool), StoreError> {
    let settings = match row.get::<_, Option<serde_json::Value>>(0) {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| StoreError::Corrupt(0, format!("privacy settings: {e}")))?,
        None => PrivacySettings::defaults(),
    };
    Ok((settings, row.get(1)))
}

/// The settings in force for `org_id`: its row, or the defaults.
pub async fn load(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<PrivacySettings, StoreError> {
    Ok(load_with_suppressions(client, org_id).await?.0)
}

/// The settings in force for `org_id`, and whether its suppression list has any entry
/// (when it has none, no contact point needs looking up there).
pub async fn load_with_suppressions(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<(PrivacySettings, bool), StoreError> {
    let stmt = client.prepare_cached(SETTINGS).await?;
    settings_of(&client.query_one(&stmt, &[&org_id]).await?)
}

/// Runs a privacy command; the settings row follows its events in the same commit.
pub async fn execute(
    executor: &Executor,
    org_id: Uuid,
    command: PrivacyCommand,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CommandError<PrivacyError>> {
    let keep_row = effect(move |tx, events: &[PrivacyEvent]| {
        async move {
            let db = |e: tokio_postgres::Error| CommandError::Store(StoreError::from(e));
            let row = tx
                .query_opt(
                    "SELECT settings FROM privacy_settings WHERE org_id = $1 FOR UPDATE",
                    &[&org_id],
                )
                .await
                .map_err(db)?;
            let mut privacy =
                Privacy {
                    settings: match row {
                        Some(r) => Some(serde_json::from_value(r.get(0)).map_err(|e| {
                            CommandError::Store(StoreError::Corrupt(0, e.to_string()))
                        })?),
                        None => None,
                    },
                };
            for e in events {
                privacy.apply(e.clone());
            }
            let settings = serde_json::to_value(privacy.current())
                .map_err(|e| CommandError::Store(StoreError::Corrupt(0, e.to_string())))?;
            tx.execute(
                "INSERT INTO privacy_settings (org_id, settings, version) VALUES ($1, $2, 1) \
                 ON CONFLICT (org_id) DO UPDATE SET settings = $2, \
                 version = privacy_settings.version + 1",
                &[&org_id, &settings],
            )
            .await
            .map_err(db)?;
            Ok(())
        }
        .boxed()
    });
    executor
        .execute_with::<Privacy>(org_id, &org_id.to_string(), command, meta, None, &keep_row)
        .await
}

/// Records a new organisation's defaults as its first privacy event.
pub async fn initialize(executor: &Executor, org_id: Uuid) -> Result<(), StoreError> {
    let meta = EventMetadata::system(org_id, "operator");
    match execute(executor, org_id, PrivacyCommand::Initialize, &meta).await {
        Ok(_) => Ok(()),
        Err(CommandError::Store(e)) => Err(e),
        Err(CommandError::Conflict | CommandError::VersionMismatch { .. }) => Ok(()),
        Err(CommandError::Domain(e)) => Err(StoreError::Corrupt(0, e.to_string())),
    }
}
