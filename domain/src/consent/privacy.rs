//! An organisation's privacy settings and its registry of purposes: one stream per
//! organisation (type `privacy`, id the organisation's id). Every change says who,
//! when (the event's metadata) and why (its `reason`).
//!
//! A new organisation gets [`PrivacySettings::defaults`] recorded as its first event
//! (`PrivacyDefaultsRecorded`): GDPR mode, double opt-in for marketing, UTC, and the
//! purposes `marketing` (consent), `service` (contract: transactional messages) and
//! `research` (consent). An organisation from before this stream existed has the same
//! defaults, recorded by its first change.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use super::gate::Settings;
use super::{Channel, LawfulBasis, PrivacyMode, Purpose, PurposeKey};
use crate::PersonalData;
use uuid::Uuid;

/// A purpose as the registry holds it: what the gate needs, and how people read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurposeDefinition {
    #[serde(flatten)]
    pub purpose: Purpose,
    pub name: String,
    pub description: String,
}

/// The organisation's privacy settings and purposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacySettings {
    pub mode: PrivacyMode,
    pub double_opt_in_for_marketing: bool,
    /// For contacts without a time zone of their own (quiet hours).
    pub time_zone: Tz,
    pub purposes: Vec<PurposeDefinition>,
    /// How many days a contact is kept after its last change, unless it has a period
    /// of its own; then the retention sweep erases it (`None`: kept until erased).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    /// How the preference center looks: the organisation's colour and logo.
    #[serde(default, skip_serializing_if = "Branding::is_empty")]
    pub branding: Branding,
}

/// The organisation's look on the pages its contacts see (the preference center).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branding {
    /// `#rrggbb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<String>,
    /// A `data:image/png|jpeg|webp;base64,…` URL of at most [`MAX_LOGO_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo: Option<String>,
}

/// The largest logo kept.
pub const MAX_LOGO_BYTES: usize = 64 * 1024;

impl Branding {
    pub fn is_empty(&self) -> bool {
        self.colour.is_none() && self.logo.is_none()
    }

    /// Why `self` cannot be kept, if it cannot: (field, message).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if let Some(c) = &self.colour {
            let ok = c.len() == 7
                && c.starts_with('#')
                && c[1..].chars().all(|ch| ch.is_ascii_hexdigit());
            if !ok {
                return Some(("colour", "must be #rrggbb"));
            }
        }
        if let Some(l) = &self.logo {
            let ok = [
                "data:image/png;base64,",
                "data:image/jpeg;base64,",
                "data:image/webp;base64,",
            ]
            .iter()
            .any(|p| l.starts_with(p))
                && l.len() <= MAX_LOGO_BYTES
                && l.split_once(',').is_some_and(|(_, b)| {
                    b.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
                });
            if !ok {
                return Some((
                    "logo",
                    "must be a data:image/png, jpeg or webp;base64 URL of at most 64 KiB",
                ));
            }
        }
        None
    }
}

/// The key of the purpose every organisation has without registering it: the answers
/// to a contact's own request about its rights (the link that confirms an erasure it
/// asked for). Its basis is a legal obligation; no consent record can be kept for it
/// (it is not in the registry the consent routes check), so opting out of everything
/// does not stop the reply to the request just made, while the suppression list and
/// Do Not Contact still do.
pub const DATA_SUBJECT_REQUEST: &str = "data_subject_request";

/// The built-in purpose of [`DATA_SUBJECT_REQUEST`]: e-mail only, never sold.
pub fn data_subject_request() -> Purpose {
    Purpose {
        key: key(DATA_SUBJECT_REQUEST),
        default_basis: LawfulBasis::LegalObligation,
        channels: vec![Channel::Email],
        retired: false,
        sells_or_shares: false,
        allowed_when_restricted: true,
    }
}

/// The longest retention period: a hundred years.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

fn key(s: &str) -> PurposeKey {
    PurposeKey::parse(s).expect("a built-in purpose key is valid")
}

impl PrivacySettings {
    /// What every organisation starts with.
    pub fn defaults() -> Self {
        let all = Channel::ALL.to_vec();
        Self {
            mode: PrivacyMode::Gdpr,
            double_opt_in_for_marketing: true,
            time_zone: Tz::UTC,
            purposes: vec![
                PurposeDefinition {
                    purpose: Purpose {
                        key: key("marketing"),
                        default_basis: LawfulBasis::Consent,
                        channels: all.clone(),
                        retired: false,
                        sells_or_shares: false,
                        allowed_when_restricted: false,
                    },
                    name: "Marketing".into(),
                    description: "Newsletters, offers and announcements".into(),
                },
                PurposeDefinition {
                    purpose: Purpose {
                        key: key("service"),
                        default_basis: LawfulBasis::Contract,
                        channels: all.clone(),
                        retired: false,
                        sells_or_shares: false,
                        allowed_when_restricted: false,
                    },
                    name: "Service".into(),
                    description: "Transactional messages: confirmations, receipts, account notices"
                        .into(),
                },
                PurposeDefinition {
                    purpose: Purpose {
                        key: key("research"),
                        default_basis: LawfulBasis::Consent,
                        channels: vec![Channel::Email, Channel::Phone],
                        retired: false,
                        sells_or_shares: false,
                        allowed_when_restricted: false,
                    },
                    name: "Research".into(),
                    description: "Surveys and user research".into(),
                },
            ],
            retention_days: None,
            branding: Branding::default(),
        }
    }

    /// What the send gate reads.
    pub fn gate_settings(&self) -> Settings {
        let mut purposes: Vec<Purpose> = self.purposes.iter().map(|p| p.purpose.clone()).collect();
        purposes.push(data_subject_request());
        Settings {
            mode: self.mode,
            purposes,
            time_zone: self.time_zone,
        }
    }

    pub fn purpose(&self, key: &PurposeKey) -> Option<&PurposeDefinition> {
        self.purposes.iter().find(|p| &p.purpose.key == key)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PrivacyCommand {
    /// Records the defaults (a new organisation).
    Initialize,
    Configure {
        mode: PrivacyMode,
        double_opt_in_for_marketing: bool,
        time_zone: Tz,
        reason: String,
    },
    /// Defines a purpose, or changes one (its key stays).
    DefinePurpose {
        definition: PurposeDefinition,
        reason: String,
    },
    RetirePurpose {
        key: PurposeKey,
        reason: String,
    },
    /// Sets (or, with `None`, removes) the organisation's retention period.
    SetRetention {
        days: Option<u32>,
        reason: String,
    },
    /// Sets how the preference center looks.
    SetBranding {
        branding: Branding,
        reason: String,
    },
    /// Records what a retention sweep did in the organisation.
    RecordRetentionSweep {
        erased: Vec<Uuid>,
        on_hold: Vec<Uuid>,
        now: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PrivacyEvent {
    PrivacyDefaultsRecorded {
        settings: PrivacySettings,
    },
    PrivacySettingsChanged {
        mode: PrivacyMode,
        double_opt_in_for_marketing: bool,
        time_zone: Tz,
        reason: String,
    },
    PurposeDefined {
        definition: PurposeDefinition,
        reason: String,
    },
    PurposeRetired {
        key: PurposeKey,
        reason: String,
    },
    RetentionSet {
        days: Option<u32>,
        reason: String,
    },
    BrandingSet {
        branding: Branding,
        reason: String,
    },
    /// A retention sweep erased these contacts (each through the erasure's own path,
    /// its tombstone naming source `retention`) and left these, due but under a legal
    /// hold, in place; `now` is the sweep's clock.
    RetentionSwept {
        erased: Vec<Uuid>,
        on_hold: Vec<Uuid>,
        now: DateTime<Utc>,
    },
}

impl DomainEvent for PrivacyEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PrivacyDefaultsRecorded { .. } => "PrivacyDefaultsRecorded",
            Self::PrivacySettingsChanged { .. } => "PrivacySettingsChanged",
            Self::PurposeDefined { .. } => "PurposeDefined",
            Self::PurposeRetired { .. } => "PurposeRetired",
            Self::RetentionSet { .. } => "RetentionSet",
            Self::BrandingSet { .. } => "BrandingSet",
            Self::RetentionSwept { .. } => "RetentionSwept",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for PrivacyEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivacyError {
    #[error("no purpose `{0}` in this organisation's registry")]
    UnknownPurpose(String),
    #[error("purpose `{0}` is retired: its history is kept and its key cannot be reused")]
    Retired(String),
    #[error("a purpose needs at least one channel")]
    NoChannel,
    #[error("a retention period is 1 to 36,500 days")]
    BadRetention,
    #[error("{0}: {1}")]
    BadBranding(&'static str, &'static str),
}

/// The stream's state: the settings once recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Privacy {
    pub settings: Option<PrivacySettings>,
}

impl Privacy {
    /// The settings in force (the defaults until any are recorded).
    pub fn current(&self) -> PrivacySettings {
        self.settings
            .clone()
            .unwrap_or_else(PrivacySettings::defaults)
    }
}

impl Aggregate for Privacy {
    const TYPE: &'static str = "privacy";
    type Command = PrivacyCommand;
    type Event = PrivacyEvent;
    type Error = PrivacyError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PrivacyCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PrivacyError> {
        let current = self.current();
        let mut events = Vec::new();
        if self.settings.is_none() {
            events.push(PrivacyEvent::PrivacyDefaultsRecorded {
                settings: current.clone(),
            });
        }
        match command {
            PrivacyCommand::Initialize => {}
            PrivacyCommand::Configure {
                mode,
                double_opt_in_for_marketing,
                time_zone,
                reason,
            } => {
                let same = current.mode == mode
                    && current.double_opt_in_for_marketing == double_opt_in_for_marketing
                    && current.time_zone == time_zone;
                if !same {
                    events.push(PrivacyEvent::PrivacySettingsChanged {
                        mode,
                        double_opt_in_for_marketing,
                        time_zone,
                        reason,
                    });
                }
            }
            PrivacyCommand::DefinePurpose {
                mut definition,
                reason,
            } => {
                if definition.purpose.channels.is_empty() {
                    return Err(PrivacyError::NoChannel);
                }
                definition.purpose.channels.sort();
                definition.purpose.channels.dedup();
                definition.purpose.retired = false;
                match current.purpose(&definition.purpose.key) {
                    Some(p) if p.purpose.retired => {
                        return Err(PrivacyError::Retired(definition.purpose.key.to_string()))
                    }
                    Some(p) if *p == definition => {}
                    _ => events.push(PrivacyEvent::PurposeDefined { definition, reason }),
                }
            }
            PrivacyCommand::SetRetention { days, reason } => {
                if days.is_some_and(|d| !(1..=MAX_RETENTION_DAYS).contains(&d)) {
                    return Err(PrivacyError::BadRetention);
                }
                if current.retention_days != days {
                    events.push(PrivacyEvent::RetentionSet { days, reason });
                }
            }
            PrivacyCommand::SetBranding { branding, reason } => {
                if let Some((field, why)) = branding.problem() {
                    return Err(PrivacyError::BadBranding(field, why));
                }
                if current.branding != branding {
                    events.push(PrivacyEvent::BrandingSet { branding, reason });
                }
            }
            PrivacyCommand::RecordRetentionSweep {
                erased,
                on_hold,
                now,
            } => events.push(PrivacyEvent::RetentionSwept {
                erased,
                on_hold,
                now,
            }),
            PrivacyCommand::RetirePurpose { key, reason } => match current.purpose(&key) {
                None => return Err(PrivacyError::UnknownPurpose(key.to_string())),
                Some(p) if p.purpose.retired => {}
                Some(_) => events.push(PrivacyEvent::PurposeRetired { key, reason }),
            },
        }
        for e in events {
            sink.write(e, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: PrivacyEvent) {
        if let PrivacyEvent::PrivacyDefaultsRecorded { settings } = event {
            self.settings = Some(settings);
            return;
        }
        let s = self.settings.get_or_insert_with(PrivacySettings::defaults);
        match event {
            PrivacyEvent::PrivacyDefaultsRecorded { .. } => {}
            PrivacyEvent::PrivacySettingsChanged {
                mode,
                double_opt_in_for_marketing,
                time_zone,
                ..
            } => {
                s.mode = mode;
                s.double_opt_in_for_marketing = double_opt_in_for_marketing;
                s.time_zone = time_zone;
            }
            PrivacyEvent::PurposeDefined { definition, .. } => {
                match s
                    .purposes
                    .iter_mut()
                    .find(|p| p.purpose.key == definition.purpose.key)
                {
                    Some(p) => *p = definition,
                    None => s.purposes.push(definition),
                }
            }
            PrivacyEvent::PurposeRetired { key, .. } => {
                if let Some(p) = s.purposes.iter_mut().find(|p| p.purpose.key == key) {
                    p.purpose.retired = true;
                }
            }
            PrivacyEvent::RetentionSet { days, .. } => s.retention_days = days,
            PrivacyEvent::BrandingSet { branding, .. } => s.branding = branding,
            PrivacyEvent::RetentionSwept { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<Privacy>;

    #[test]
    fn the_first_change_records_the_defaults_first() {
        let defaults = PrivacySettings::defaults();
        Given::with(())
            .given_no_previous_events()
            .when(PrivacyCommand::Configure {
                mode: PrivacyMode::Ccpa,
                double_opt_in_for_marketing: false,
                time_zone: Tz::America__Los_Angeles,
                reason: "US launch".into(),
            })
            .then_expect_events(vec![
                PrivacyEvent::PrivacyDefaultsRecorded { settings: defaults },
                PrivacyEvent::PrivacySettingsChanged {
                    mode: PrivacyMode::Ccpa,
                    double_opt_in_for_marketing: false,
                    time_zone: Tz::America__Los_Angeles,
                    reason: "US launch".into(),
                },
            ]);
    }

    #[test]
    fn retiring_keeps_the_purpose_and_refuses_its_redefinition() {
        let defaults = PrivacySettings::defaults();
        let research = defaults.purposes[2].clone();
        Given::with(())
            .given(vec![PrivacyEvent::PrivacyDefaultsRecorded {
                settings: defaults.clone(),
            }])
            .when(PrivacyCommand::RetirePurpose {
                key: key("research"),
                reason: "study over".into(),
            })
            .then_expect_events(vec![PrivacyEvent::PurposeRetired {
                key: key("research"),
                reason: "study over".into(),
            }]);
        Given::with(())
            .given(vec![
                PrivacyEvent::PrivacyDefaultsRecorded { settings: defaults },
                PrivacyEvent::PurposeRetired {
                    key: key("research"),
                    reason: "study over".into(),
                },
            ])
            .when(PrivacyCommand::DefinePurpose {
                definition: research,
                reason: "again".into(),
            })
            .then_expect_error(PrivacyError::Retired("research".into()));
    }

    #[test]
    fn unknown_purposes_cannot_be_retired_and_purposes_need_a_channel() {
        Given::with(())
            .given_no_previous_events()
            .when(PrivacyCommand::RetirePurpose {
                key: key("nope"),
                reason: String::new(),
            })
            .then_expect_error(PrivacyError::UnknownPurpose("nope".into()));
        let mut def = PrivacySettings::defaults().purposes[0].clone();
        def.purpose.channels.clear();
        Given::with(())
            .given_no_previous_events()
            .when(PrivacyCommand::DefinePurpose {
                definition: def,
                reason: String::new(),
            })
            .then_expect_error(PrivacyError::NoChannel);
    }

    #[test]
    fn defaults_cover_marketing_service_and_research() {
        let s = PrivacySettings::defaults().gate_settings();
        let keys: Vec<&str> = s.purposes.iter().map(|p| p.key.as_str()).collect();
        // The registry's three, and the built-in one the gate always knows.
        assert_eq!(
            keys,
            ["marketing", "service", "research", DATA_SUBJECT_REQUEST]
        );
        assert_eq!(s.mode, PrivacyMode::Gdpr);
        let registry = PrivacySettings::defaults();
        assert!(registry.purpose(&key(DATA_SUBJECT_REQUEST)).is_none());
    }
}
