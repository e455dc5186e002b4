//! An organisation's carrier per channel, and its secret.
//!
//! The carrier is an event-sourced stream (`crm_domain::carrier`, stream type
//! `carrier`, id = the channel's name). Its events carry the non-secret settings and
//! the secret's last four characters only. The non-secret settings are kept in
//! `carrier_secrets`; the secret itself (an SMTP password, a Twilio auth token) is in
//! the vault ([`crate::vault`]: `vault_secrets`, record type `carrier`, record id = the
//! channel, field `secret`, [`secret_ref`]), sealed with AES-256-GCM under the KEK and
//! bound to that row. Both are written by the transaction that appends
//! `CarrierConfigured` (an effect of [`Executor::execute_with`]); `CarrierRemoved`
//! deletes both in its transaction. Both tables have row-level security by
//! organisation: every statement here runs in a transaction that names it.
//!
//! Every decryption is on record: [`resolve`] appends `CarrierSecretDecrypted` (with
//! the system principal `dispatch`) and reads the sealed secret in that event's
//! transaction, at the stream version it loaded (a change racing it is a conflict,
//! retried), and only then decrypts.
//!
//! Secrets sealed before the vault (migration V14) stay in
//! `carrier_secrets.sealed_secret`, bound to `carrier|{org}|{channel}`
//! ([`legacy_aad`]): SQL cannot re-bind them without the KEK. [`resolve`] reads such a
//! legacy secret where the vault has none (its decryption recorded the same way), and
//! the next [`configure`] of the channel writes the vault and clears the legacy column.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use crm_domain::carrier::{
    Carrier as CarrierStream, CarrierCommand, CarrierError as DomainError, CarrierEvent,
    CarrierSettings,
};
use crm_domain::consent::Channel;
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::{Pool, Transaction};
use futures::FutureExt;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::smtp::{SmtpCarrier, SmtpUrl};
use super::twilio::TwilioCarrier;
use super::{Carrier, CarrierError};
use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;
use crate::vault::{self, SecretRef, Stored};

pub use crate::vault::last4;

/// Why configuring, removing or listing a carrier failed.
#[derive(Debug, thiserror::Error)]
pub enum CarrierAdminError {
    #[error(transparent)]
    Command(#[from] CommandError<DomainError>),
    #[error("the secret could not be sealed")]
    Seal,
    #[error("a stored carrier is unreadable: {0}")]
    Corrupt(String),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Where the secret of a channel's carrier lives in the vault.
pub fn secret_ref(org_id: Uuid, channel: Channel) -> SecretRef {
    SecretRef::new(org_id, "carrier", channel.name(), "secret")
}

/// The associated data a channel's secret was sealed with before the vault (V14):
/// only for reading `carrier_secrets.sealed_secret`, never for sealing.
pub fn legacy_aad(org_id: Uuid, channel: Channel) -> String {
    format!("carrier|{org_id}|{}", channel.name())
}

/// What is wrong with these settings and secret, by field (`settings.url`, `secret`…);
/// empty when an adapter can be built from them.
pub fn check(settings: &CarrierSettings, secret: Option<&str>) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    match settings {
        CarrierSettings::Smtp { url, from } => {
            match SmtpUrl::parse(url) {
                Ok(u) if u.password.is_some() => errors.push((
                    "settings.url",
                    "must not hold the password: send it as secret".to_owned(),
                )),
                Ok(u) if u.user.is_none() && secret.is_some() => errors.push((
                    "settings.url",
                    "names no user to log in with the secret (smtp://user@host)".to_owned(),
                )),
                Ok(_) => {}
                Err(e) => errors.push(("settings.url", e)),
            }
            if from.parse::<lettre::message::Mailbox>().is_err() {
                errors.push(("settings.from", "must be an email address".to_owned()));
            }
        }
        CarrierSettings::Twilio {
            base_url,
            account_sid,
            from,
        } => {
            let parsed = url::Url::parse(base_url);
            if !matches!(&parsed, Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() && u.query().is_none())
            {
                errors.push(("settings.base_url", "must be an http(s) URL".to_owned()));
            }
            if account_sid.is_empty()
                || account_sid.len() > 64
                || !account_sid.chars().all(|c| c.is_ascii_alphanumeric())
            {
                errors.push((
                    "settings.account_sid",
                    "must be 1 to 64 letters and digits".to_owned(),
                ));
            }
            let number = from.strip_prefix("whatsapp:").unwrap_or(from);
            let digits = number.strip_prefix('+').unwrap_or("");
            if !(8..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
                errors.push((
                    "settings.from",
                    "must be an E.164 number (+ and 8 to 15 digits)".to_owned(),
                ));
            }
            if secret.is_none_or(str::is_empty) {
                errors.push(("secret", "the auth token is required".to_owned()));
            }
        }
    }
    if secret.is_some_and(|s| s.is_empty() || s.len() > 4096 || s.contains('\0')) {
        errors.push(("secret", "must be 1 to 4096 bytes without NUL".to_owned()));
    }
    errors
}

/// The adapter for these settings, with the decrypted secret.
pub fn build(
    settings: &CarrierSettings,
    secret: Option<SecretString>,
) -> Result<Arc<dyn Carrier>, CarrierError> {
    match settings {
        CarrierSettings::Smtp { url, from } => Ok(Arc::new(SmtpCarrier::from_url(
            url,
            from,
            secret.as_ref().map(|s| s.expose_secret()),
        )?)),
        CarrierSettings::Twilio {
            base_url,
            account_sid,
            from,
        } => {
            let token = secret
                .ok_or_else(|| CarrierError::permanent("the twilio carrier has no auth token"))?;
            Ok(Arc::new(TwilioCarrier::new(
                base_url,
                account_sid,
                token,
                from,
            )?))
        }
    }
}

fn db(e: tokio_postgres::Error) -> CommandError<DomainError> {
    CommandError::Store(StoreError::from(e))
}

/// Names the organisation for the rest of the transaction (row-level security).
async fn name_org(tx: &Transaction<'_>, org_id: Uuid) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT set_config('crm.org_id', $1, true)",
        &[&org_id.to_string()],
    )
    .await
    .map(|_| ())
}

/// Sets (or replaces) the carrier of `channel`; `secret` is sealed into the vault (or
/// the vault's secret of the channel deleted, without one) by the same transaction as
/// `CarrierConfigured`, which also clears a legacy secret. Check the input with
/// [`check`] first.
pub async fn configure(
    executor: &Executor,
    org_id: Uuid,
    channel: Channel,
    settings: CarrierSettings,
    secret: Option<SecretString>,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CarrierAdminError> {
    let at = secret_ref(org_id, channel);
    let sealed = secret
        .as_ref()
        .map(|s| vault::seal(executor.crypto(), &at, s))
        .transpose()
        .map_err(|_| CarrierAdminError::Seal)?;
    let last4 = sealed.as_ref().and_then(|s| s.last4.clone());
    let kek_id = executor.crypto().kek_id().to_owned();
    let write = effect(move |tx, events: &[CarrierEvent]| {
        let (at, sealed, kek_id) = (at.clone(), sealed.clone(), kek_id.clone());
        async move {
            for event in events {
                if let CarrierEvent::CarrierConfigured {
                    settings,
                    secret_last4,
                    ..
                } = event
                {
                    let json = serde_json::to_value(settings)
                        .map_err(|e| CommandError::Store(StoreError::Corrupt(0, e.to_string())))?;
                    name_org(tx, org_id).await.map_err(db)?;
                    tx.execute(
                        "INSERT INTO carrier_secrets \
                           (org_id, channel, kind, settings, sealed_secret, secret_last4, kek_id) \
                         VALUES ($1, $2, $3, $4, NULL, $5, $6) \
                         ON CONFLICT (org_id, channel) DO UPDATE SET kind = EXCLUDED.kind, \
                           settings = EXCLUDED.settings, sealed_secret = NULL, \
                           secret_last4 = EXCLUDED.secret_last4, kek_id = EXCLUDED.kek_id, \
                           configured_at = now()",
                        &[
                            &org_id,
                            &channel.name(),
                            &settings.kind(),
                            &json,
                            secret_last4,
                            &kek_id,
                        ],
                    )
                    .await
                    .map_err(db)?;
                    match &sealed {
                        Some(sealed) => vault::put(tx, &at, sealed).await,
                        None => vault::delete(tx, &at).await,
                    }
                    .map_err(db)?;
                }
            }
            Ok(())
        }
        .boxed()
    });
    Ok(executor
        .execute_with::<CarrierStream>(
            org_id,
            channel.name(),
            CarrierCommand::Configure {
                channel,
                settings,
                secret_last4: last4,
            },
            meta,
            None,
            &write,
        )
        .await?)
}

/// Removes the carrier of `channel` (its messages go to the defaults again) and its
/// sealed secret (the vault's, and a legacy one), in one transaction.
pub async fn remove(
    executor: &Executor,
    org_id: Uuid,
    channel: Channel,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CarrierAdminError> {
    let at = secret_ref(org_id, channel);
    let delete = effect(move |tx, events: &[CarrierEvent]| {
        let at = at.clone();
        async move {
            if !events.is_empty() {
                name_org(tx, org_id).await.map_err(db)?;
                tx.execute(
                    "DELETE FROM carrier_secrets WHERE org_id = $1 AND channel = $2",
                    &[&org_id, &channel.name()],
                )
                .await
                .map_err(db)?;
                vault::delete(tx, &at).await.map_err(db)?;
            }
            Ok(())
        }
        .boxed()
    });
    Ok(executor
        .execute_with::<CarrierStream>(
            org_id,
            channel.name(),
            CarrierCommand::Remove { channel },
            meta,
            None,
            &delete,
        )
        .await?)
}

/// A configured carrier as listed: never its secret, only the secret's last four.
#[derive(Debug, Clone)]
pub struct CarrierRow {
    pub channel: Channel,
    pub settings: CarrierSettings,
    pub secret_last4: Option<String>,
    pub has_secret: bool,
    pub configured_at: DateTime<Utc>,
}

/// The organisation's carriers, by channel.
pub async fn list(pool: &Pool, org_id: Uuid) -> Result<Vec<CarrierRow>, CarrierAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let rows = tx
        .query(
            "SELECT c.channel, c.settings, c.secret_last4, \
               c.sealed_secret IS NOT NULL OR v.org_id IS NOT NULL, c.configured_at \
             FROM carrier_secrets c LEFT JOIN vault_secrets v ON v.org_id = c.org_id \
               AND v.record_type = 'carrier' AND v.record_id = c.channel AND v.field = 'secret' \
             WHERE c.org_id = $1 ORDER BY c.channel",
            &[&org_id],
        )
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|r| {
            let channel: String = r.get(0);
            Ok(CarrierRow {
                channel: Channel::parse(&channel)
                    .ok_or_else(|| CarrierAdminError::Corrupt(channel.clone()))?,
                settings: serde_json::from_value(r.get(1))
                    .map_err(|e| CarrierAdminError::Corrupt(e.to_string()))?,
                secret_last4: r.get(2),
                has_secret: r.get(3),
                configured_at: r.get(4),
            })
        })
        .collect()
}

/// What [`resolve`] found for an (organisation, channel).
pub enum Resolved {
    /// The organisation's own carrier, built from the carrier stream at `version`.
    Own {
        carrier: Arc<dyn Carrier>,
        version: i64,
    },
    /// None configured (the stream is at `version`): the process's defaults apply.
    NoneConfigured { version: i64 },
}

/// What the decryption's transaction found for a configured channel.
enum Found {
    /// The secret in the vault.
    Vault(Stored),
    /// A secret sealed before the vault, in `carrier_secrets` ([`legacy_aad`]).
    Legacy(Vec<u8>),
    /// The carrier has no secret (an SMTP relay without login).
    NoSecret,
}

/// How often a decryption racing a change of the carrier is tried again.
const ATTEMPTS: usize = 3;

/// The organisation's carrier for `channel`, with its secret decrypted after
/// `CarrierSecretDecrypted` is committed.
pub async fn resolve(
    executor: &Executor,
    pool: &Pool,
    crypto: &crate::crypto::Crypto,
    org_id: Uuid,
    channel: Channel,
) -> Result<Resolved, CarrierError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        CarrierError::retryable(format!("carrier configuration unavailable: {e}"))
    };
    let id = channel.name();
    for _ in 0..ATTEMPTS {
        let loaded = {
            let client = pool.get().await.map_err(|e| unavailable(&e))?;
            executor
                .load::<CarrierStream>(&client, org_id, id)
                .await
                .map_err(|e| unavailable(&e))?
        };
        let Some(settings) = loaded.aggregate.settings else {
            return Ok(Resolved::NoneConfigured {
                version: loaded.head.version,
            });
        };
        let slot: Arc<Mutex<Option<Found>>> = Arc::default();
        let at = secret_ref(org_id, channel);
        let read = {
            let (slot, at) = (slot.clone(), at.clone());
            effect(move |tx, _: &[CarrierEvent]| {
                let (slot, at) = (slot.clone(), at.clone());
                async move {
                    name_org(tx, org_id).await.map_err(db)?;
                    let row = tx
                        .query_opt(
                            "SELECT sealed_secret FROM carrier_secrets \
                             WHERE org_id = $1 AND channel = $2",
                            &[&org_id, &id],
                        )
                        .await
                        .map_err(db)?;
                    let Some(row) = row else { return Ok(()) };
                    let found = match vault::read_sealed(tx, &at).await.map_err(db)? {
                        Some(stored) => Found::Vault(stored),
                        None => match row.get::<_, Option<Vec<u8>>>(0) {
                            Some(legacy) => Found::Legacy(legacy),
                            None => Found::NoSecret,
                        },
                    };
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(found);
                    }
                    Ok(())
                }
                .boxed()
            })
        };
        let recorded = executor
            .execute_with::<CarrierStream>(
                org_id,
                id,
                CarrierCommand::RecordDecryption {
                    channel,
                    purpose: "dispatch".into(),
                },
                &EventMetadata::system(org_id, "dispatch"),
                Some(loaded.head.version),
                &read,
            )
            .await;
        let outcome = match recorded {
            Ok(outcome) => outcome,
            Err(CommandError::Conflict | CommandError::VersionMismatch { .. }) => continue,
            Err(e) => return Err(unavailable(&e)),
        };
        let found = slot.lock().ok().and_then(|mut s| s.take());
        let Some(found) = found else {
            return Err(CarrierError::retryable(
                "the carrier's stored settings are missing",
            ));
        };
        let unreadable = |e: &dyn std::fmt::Display| {
            CarrierError::permanent(format!("the carrier's secret cannot be decrypted: {e}"))
        };
        let secret = match found {
            Found::Vault(stored) => {
                Some(vault::open(crypto, &at, &stored).map_err(|e| unreadable(&e))?)
            }
            Found::Legacy(sealed) => {
                let plain = crypto
                    .unwrap_secret(&legacy_aad(org_id, channel), &sealed)
                    .map_err(|_| {
                        unreadable(&"sealed before the vault, for another row or under another KEK")
                    })?;
                Some(SecretString::from(String::from_utf8(plain).map_err(
                    |_| CarrierError::permanent("the carrier's secret is not text"),
                )?))
            }
            Found::NoSecret => None,
        };
        return Ok(Resolved::Own {
            carrier: build(&settings, secret)?,
            version: outcome.version,
        });
    }
    Err(CarrierError::retryable(
        "the carrier kept changing while it was loaded",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_four_only_of_a_long_enough_secret() {
        assert_eq!(last4("abcdefghij").as_deref(), Some("ghij"));
        assert_eq!(last4("short"), None);
    }

    #[test]
    fn settings_are_checked_by_field() {
        let smtp = |url: &str| CarrierSettings::Smtp {
            url: url.into(),
            from: "crm@example.com".into(),
        };
        assert!(check(&smtp("smtp://127.0.0.1:2525"), None).is_empty());
        assert!(check(
            &smtp("smtp+starttls://me@mx.example.com"),
            Some("pw-123456")
        )
        .is_empty());
        let fields =
            |e: Vec<(&'static str, String)>| e.into_iter().map(|(f, _)| f).collect::<Vec<_>>();
        assert_eq!(
            fields(check(&smtp("smtp://me:pw@mx"), None)),
            ["settings.url"]
        );
        assert_eq!(fields(check(&smtp("ftp://mx"), None)), ["settings.url"]);
        let twilio = CarrierSettings::Twilio {
            base_url: "nope".into(),
            account_sid: "AC/1".into(),
            from: "123".into(),
        };
        assert_eq!(
            fields(check(&twilio, None)),
            [
                "settings.base_url",
                "settings.account_sid",
                "settings.from",
                "secret"
            ]
        );
    }
}
