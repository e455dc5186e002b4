//! The carrier aggregate: how one organisation sends on one channel (email through an
//! SMTP relay, SMS and WhatsApp through a Twilio-shaped HTTP API), one stream per
//! (organisation, channel), id = the channel's name (`email`, `sms`, `whatsapp`).
//!
//! Invariants kept here:
//! - a carrier kind serves only the channels it can reach (SMTP: email; Twilio: SMS and
//!   WhatsApp); phone and postal have no carrier;
//! - the secret (SMTP password, Twilio auth token) never appears in an event: events
//!   carry the non-secret settings and the secret's last four characters only (the
//!   sealed secret lives beside the store, written in the same transaction);
//! - every use of the secret is on the record: [`CarrierEvent::CarrierSecretDecrypted`]
//!   with its purpose, appended before the secret is used.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::consent::Channel;
use crate::PersonalData;

/// What sends, and its non-secret settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CarrierSettings {
    /// An SMTP relay: `url` is `smtp://`, `smtp+starttls://` or `smtps://` host and port,
    /// with the user name if it logs in (never the password: that is the secret).
    Smtp { url: String, from: String },
    /// A Twilio-shaped Messages API: the secret is the auth token.
    Twilio {
        base_url: String,
        account_sid: String,
        from: String,
    },
}

impl CarrierSettings {
    /// `smtp` or `twilio`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Smtp { .. } => "smtp",
            Self::Twilio { .. } => "twilio",
        }
    }

    /// Whether this kind of carrier can reach `channel`.
    pub fn serves(&self, channel: Channel) -> bool {
        match self {
            Self::Smtp { .. } => channel == Channel::Email,
            Self::Twilio { .. } => matches!(channel, Channel::Sms | Channel::Whatsapp),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CarrierCommand {
    /// Sets (or replaces) the carrier of `channel`.
    Configure {
        channel: Channel,
        settings: CarrierSettings,
        /// The last four characters of the secret, if it has one.
        secret_last4: Option<String>,
    },
    Remove {
        channel: Channel,
    },
    /// The secret is about to be decrypted, for `purpose` (e.g. `dispatch`).
    RecordDecryption {
        channel: Channel,
        purpose: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CarrierEvent {
    CarrierConfigured {
        channel: Channel,
        settings: CarrierSettings,
        secret_last4: Option<String>,
    },
    CarrierRemoved {
        channel: Channel,
    },
    CarrierSecretDecrypted {
        channel: Channel,
        purpose: String,
    },
}

impl DomainEvent for CarrierEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CarrierConfigured { .. } => "CarrierConfigured",
            Self::CarrierRemoved { .. } => "CarrierRemoved",
            Self::CarrierSecretDecrypted { .. } => "CarrierSecretDecrypted",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for CarrierEvent {
    /// Settings of an organisation's carrier: nothing about a person.
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarrierError {
    #[error("a {kind} carrier cannot send on the {channel} channel")]
    WrongChannel {
        kind: &'static str,
        channel: &'static str,
    },
    #[error("no carrier is configured for the {0} channel")]
    NotConfigured(&'static str),
    #[error("this stream is the {stream} channel's, not {channel}")]
    OtherChannel {
        stream: &'static str,
        channel: &'static str,
    },
}

/// One organisation's carrier for one channel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Carrier {
    pub channel: Option<Channel>,
    pub settings: Option<CarrierSettings>,
    pub secret_last4: Option<String>,
}

impl Carrier {
    /// A stream holds one channel: the first event fixes it.
    fn check_channel(&self, channel: Channel) -> Result<(), CarrierError> {
        match self.channel {
            Some(stream) if stream != channel => Err(CarrierError::OtherChannel {
                stream: stream.name(),
                channel: channel.name(),
            }),
            _ => Ok(()),
        }
    }
}

impl Aggregate for Carrier {
    const TYPE: &'static str = "carrier";
    type Command = CarrierCommand;
    type Event = CarrierEvent;
    type Error = CarrierError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CarrierCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CarrierError> {
        match command {
            CarrierCommand::Configure {
                channel,
                settings,
                secret_last4,
            } => {
                self.check_channel(channel)?;
                if !settings.serves(channel) {
                    return Err(CarrierError::WrongChannel {
                        kind: settings.kind(),
                        channel: channel.name(),
                    });
                }
                sink.write(
                    CarrierEvent::CarrierConfigured {
                        channel,
                        settings,
                        secret_last4,
                    },
                    self,
                )
                .await;
            }
            CarrierCommand::Remove { channel } => {
                self.check_channel(channel)?;
                if self.settings.is_none() {
                    return Err(CarrierError::NotConfigured(channel.name()));
                }
                sink.write(CarrierEvent::CarrierRemoved { channel }, self)
                    .await;
            }
            CarrierCommand::RecordDecryption { channel, purpose } => {
                self.check_channel(channel)?;
                if self.settings.is_none() {
                    return Err(CarrierError::NotConfigured(channel.name()));
                }
                sink.write(
                    CarrierEvent::CarrierSecretDecrypted { channel, purpose },
                    self,
                )
                .await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: CarrierEvent) {
        match event {
            CarrierEvent::CarrierConfigured {
                channel,
                settings,
                secret_last4,
            } => {
                self.channel = Some(channel);
                self.settings = Some(settings);
                self.secret_last4 = secret_last4;
            }
            CarrierEvent::CarrierRemoved { channel } => {
                self.channel = Some(channel);
                self.settings = None;
                self.secret_last4 = None;
            }
            CarrierEvent::CarrierSecretDecrypted { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn smtp() -> CarrierSettings {
        CarrierSettings::Smtp {
            url: "smtp+starttls://mx.example.com:587".into(),
            from: "crm@example.com".into(),
        }
    }

    fn twilio() -> CarrierSettings {
        CarrierSettings::Twilio {
            base_url: "https://api.twilio.com".into(),
            account_sid: "AC123".into(),
            from: "+15005550006".into(),
        }
    }

    fn configured(channel: Channel, settings: CarrierSettings) -> CarrierEvent {
        CarrierEvent::CarrierConfigured {
            channel,
            settings,
            secret_last4: Some("wxyz".into()),
        }
    }

    #[test]
    fn configure_email_over_smtp() {
        TestFramework::<Carrier>::with(())
            .given_no_previous_events()
            .when(CarrierCommand::Configure {
                channel: Channel::Email,
                settings: smtp(),
                secret_last4: Some("wxyz".into()),
            })
            .then_expect_events(vec![configured(Channel::Email, smtp())]);
    }

    #[test]
    fn reconfigure_replaces_the_carrier() {
        TestFramework::<Carrier>::with(())
            .given(vec![configured(Channel::Sms, twilio())])
            .when(CarrierCommand::Configure {
                channel: Channel::Sms,
                settings: twilio(),
                secret_last4: Some("wxyz".into()),
            })
            .then_expect_events(vec![configured(Channel::Sms, twilio())]);
    }

    #[test]
    fn a_kind_serves_only_its_channels() {
        for (channel, settings) in [
            (Channel::Sms, smtp()),
            (Channel::Email, twilio()),
            (Channel::Phone, twilio()),
            (Channel::Postal, smtp()),
        ] {
            TestFramework::<Carrier>::with(())
                .given_no_previous_events()
                .when(CarrierCommand::Configure {
                    channel,
                    settings: settings.clone(),
                    secret_last4: None,
                })
                .then_expect_error(CarrierError::WrongChannel {
                    kind: settings.kind(),
                    channel: channel.name(),
                });
        }
    }

    #[test]
    fn a_stream_holds_one_channel() {
        TestFramework::<Carrier>::with(())
            .given(vec![configured(Channel::Sms, twilio())])
            .when(CarrierCommand::Remove {
                channel: Channel::Whatsapp,
            })
            .then_expect_error(CarrierError::OtherChannel {
                stream: "sms",
                channel: "whatsapp",
            });
    }

    #[test]
    fn remove_a_configured_carrier_only() {
        TestFramework::<Carrier>::with(())
            .given(vec![configured(Channel::Email, smtp())])
            .when(CarrierCommand::Remove {
                channel: Channel::Email,
            })
            .then_expect_events(vec![CarrierEvent::CarrierRemoved {
                channel: Channel::Email,
            }]);
        TestFramework::<Carrier>::with(())
            .given(vec![
                configured(Channel::Email, smtp()),
                CarrierEvent::CarrierRemoved {
                    channel: Channel::Email,
                },
            ])
            .when(CarrierCommand::Remove {
                channel: Channel::Email,
            })
            .then_expect_error(CarrierError::NotConfigured("email"));
    }

    #[test]
    fn decryption_is_recorded_for_a_configured_carrier_only() {
        TestFramework::<Carrier>::with(())
            .given(vec![configured(Channel::Whatsapp, twilio())])
            .when(CarrierCommand::RecordDecryption {
                channel: Channel::Whatsapp,
                purpose: "dispatch".into(),
            })
            .then_expect_events(vec![CarrierEvent::CarrierSecretDecrypted {
                channel: Channel::Whatsapp,
                purpose: "dispatch".into(),
            }]);
        TestFramework::<Carrier>::with(())
            .given_no_previous_events()
            .when(CarrierCommand::RecordDecryption {
                channel: Channel::Sms,
                purpose: "dispatch".into(),
            })
            .then_expect_error(CarrierError::NotConfigured("sms"));
    }
}
