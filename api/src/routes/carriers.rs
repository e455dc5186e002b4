//! `/v1/organization/carriers`: how the organisation sends email (SMTP) and SMS and
//! WhatsApp (a Twilio-shaped API). Configure one per channel, list them (a secret's
//! last four characters only: the secret is never answered), remove one (its messages
//! go to the service's defaults again). The channel is a body member: path ids are
//! UUIDs only (the edge parses every `{…}` segment as one).

use crm_domain::carrier::{CarrierError, CarrierSettings};
use crm_domain::consent::Channel;
use crm_infra::commands::executor::CommandError;
use crm_infra::dispatch::carriers::credentials::{self, CarrierAdminError};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::schemas::Outcome;
use super::Authed;
use crate::edge::extract::Json;
use crate::edge::reply::Ok200;
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// A channel a carrier can be configured for.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only: bodies carry the name as a string
pub(crate) enum CarrierChannel {
    Email,
    Sms,
    Whatsapp,
}

/// What sends: `smtp` (email) or `twilio` (sms, whatsapp).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only
pub(crate) enum CarrierKind {
    Smtp,
    Twilio,
}

/// A carrier's settings; which members a kind takes is in their descriptions.
#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsDoc {
    /// smtp: `smtp://host:port` (plain), `smtp+starttls://…` or `smtps://…`, with
    /// `user@` when it logs in (the password goes in `secret`).
    #[schema(max_length = 2048, pattern = "@line")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    /// smtp: the sender's address; twilio: the sending number (E.164).
    #[schema(max_length = 320, pattern = "@line")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    /// twilio: `https://api.twilio.com` or a compatible service.
    #[schema(max_length = 2048, pattern = "@line")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_url: Option<String>,
    /// twilio: the account SID.
    #[schema(max_length = 64, pattern = "@line")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account_sid: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"channel": "sms", "kind": "twilio", "settings": {"base_url": "https://api.twilio.com", "account_sid": "AC0123456789abcdef", "from": "+15005550006"}, "secret": "the-auth-token"}))]
pub(crate) struct ConfigureInput {
    #[schema(value_type = CarrierChannel)]
    channel: String,
    #[schema(value_type = CarrierKind)]
    kind: String,
    settings: SettingsDoc,
    /// The SMTP password or the Twilio auth token: stored sealed, never answered.
    #[schema(max_length = 4096)]
    secret: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"channel": "email"}))]
pub(crate) struct RemoveInput {
    #[schema(value_type = CarrierChannel)]
    channel: String,
}

/// A configured carrier (never its secret).
#[derive(Serialize, ToSchema)]
pub(crate) struct CarrierItem {
    #[schema(value_type = CarrierChannel)]
    channel: String,
    #[schema(value_type = CarrierKind)]
    kind: String,
    settings: SettingsDoc,
    /// The secret's last four characters (null: no secret, or one shorter than eight).
    secret_last4: Option<String>,
    has_secret: bool,
    configured_at: chrono::DateTime<chrono::Utc>,
}

/// The organisation's carriers; a channel not listed uses the service's defaults.
#[derive(Serialize, ToSchema)]
pub(crate) struct CarrierList {
    items: Vec<CarrierItem>,
}

fn channel_of(name: &str, errors: &mut Vec<FieldError>) -> Option<Channel> {
    let channel = Channel::parse(name).filter(|c| !matches!(c, Channel::Phone | Channel::Postal));
    if channel.is_none() {
        errors.push(FieldError::new(
            "channel",
            "must be one of email, sms, whatsapp",
        ));
    }
    channel
}

/// The settings of `kind`, every missing or foreign member named.
fn settings_of(
    kind: &str,
    s: SettingsDoc,
    errors: &mut Vec<FieldError>,
) -> Option<CarrierSettings> {
    let mut take = |name: &'static str, value: Option<String>| {
        if value.is_none() {
            errors.push(FieldError::new(
                format!("settings.{name}"),
                format!("is required for {kind}"),
            ));
        }
        value.unwrap_or_default()
    };
    let (settings, foreign) = match kind {
        "smtp" => (
            CarrierSettings::Smtp {
                url: take("url", s.url),
                from: take("from", s.from),
            },
            vec![("base_url", s.base_url), ("account_sid", s.account_sid)],
        ),
        "twilio" => (
            CarrierSettings::Twilio {
                base_url: take("base_url", s.base_url),
                account_sid: take("account_sid", s.account_sid),
                from: take("from", s.from),
            },
            vec![("url", s.url)],
        ),
        _ => {
            errors.push(FieldError::new("kind", "must be smtp or twilio"));
            return None;
        }
    };
    for (name, value) in foreign {
        if value.is_some() {
            errors.push(FieldError::new(
                format!("settings.{name}"),
                format!("is not a setting of {kind}"),
            ));
        }
    }
    Some(settings)
}

fn doc_of(settings: CarrierSettings) -> SettingsDoc {
    match settings {
        CarrierSettings::Smtp { url, from } => SettingsDoc {
            url: Some(url),
            from: Some(from),
            ..SettingsDoc::default()
        },
        CarrierSettings::Twilio {
            base_url,
            account_sid,
            from,
        } => SettingsDoc {
            base_url: Some(base_url),
            account_sid: Some(account_sid),
            from: Some(from),
            ..SettingsDoc::default()
        },
    }
}

/// A carrier command's failure as an answer. (Kept beside the handlers: the domain's
/// carrier errors are answered only here.)
fn answer(e: CarrierAdminError) -> ApiError {
    match e {
        CarrierAdminError::Command(CommandError::Domain(e @ CarrierError::WrongChannel { .. })) => {
            ApiError::Validation(vec![FieldError::new("kind", e.to_string())])
        }
        CarrierAdminError::Command(CommandError::Domain(CarrierError::NotConfigured(_))) => {
            ApiError::NotFound("no carrier is configured for this channel")
        }
        CarrierAdminError::Command(CommandError::Domain(e @ CarrierError::OtherChannel { .. })) => {
            ApiError::internal(e)
        }
        CarrierAdminError::Command(
            CommandError::Conflict | CommandError::VersionMismatch { .. },
        ) => ApiError::Conflict(
            "another command changed this carrier first; reload and retry".into(),
        ),
        CarrierAdminError::Command(CommandError::Store(e)) => e.into(),
        CarrierAdminError::Db(e) => e.into(),
        CarrierAdminError::Pool(e) => e.into(),
        other @ (CarrierAdminError::Seal | CarrierAdminError::Corrupt(_)) => {
            ApiError::internal(other)
        }
    }
}

/// Sets (or replaces) the carrier of a channel.
pub(crate) async fn configure(
    s: AppState,
    a: Authed,
    Json(input): Json<ConfigureInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let channel = channel_of(&input.channel, &mut errors);
    let settings = settings_of(&input.kind, input.settings, &mut errors);
    if let (Some(channel), Some(settings)) = (channel, &settings) {
        if !settings.serves(channel) {
            errors.push(FieldError::new(
                "kind",
                format!(
                    "a {} carrier cannot send on the {} channel",
                    settings.kind(),
                    channel.name()
                ),
            ));
        }
    }
    if let (Some(settings), true) = (&settings, errors.is_empty()) {
        errors.extend(
            credentials::check(settings, input.secret.as_deref())
                .into_iter()
                .map(|(field, message)| FieldError::new(field, message)),
        );
    }
    let (Some(channel), Some(settings), true) = (channel, settings, errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    let o = credentials::configure(
        &s.executor,
        a.caller.org_id,
        channel,
        settings,
        input.secret.map(SecretString::from),
        &a.metadata(),
    )
    .await
    .map_err(answer)?;
    Ok(super::outcome(&o))
}

/// The organisation's carriers.
pub(crate) async fn list(s: AppState, a: Authed) -> Result<Ok200<CarrierList>, ApiError> {
    let items = credentials::list(&s.pool, a.caller.org_id)
        .await
        .map_err(answer)?
        .into_iter()
        .map(|c| CarrierItem {
            channel: c.channel.name().to_owned(),
            kind: c.settings.kind().to_owned(),
            settings: doc_of(c.settings),
            secret_last4: c.secret_last4,
            has_secret: c.has_secret,
            configured_at: c.configured_at,
        })
        .collect();
    Ok(Ok200(CarrierList { items }))
}

/// Removes the carrier of a channel and its secret.
pub(crate) async fn remove(
    s: AppState,
    a: Authed,
    Json(input): Json<RemoveInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let Some(channel) = channel_of(&input.channel, &mut errors) else {
        return Err(ApiError::Validation(errors));
    };
    let o = credentials::remove(&s.executor, a.caller.org_id, channel, &a.metadata())
        .await
        .map_err(answer)?;
    Ok(super::outcome(&o))
}
