//! SMS and WhatsApp through an HTTP API shaped like Twilio's Messages API, so a real
//! account works by configuration alone:
//! `POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`, form-encoded
//! `To`, `From`, `Body` (WhatsApp: both numbers prefixed `whatsapp:`), HTTP Basic auth
//! `account_sid:auth_token`, and the message's key in `I-Twilio-Idempotency-Token` and
//! `Idempotency-Key` on every attempt.
//!
//! Answers: 2xx → delivered, with the JSON `sid`; 429, 5xx, no answer or a timeout
//! (10 s) → retryable; any other 4xx → permanent.

use std::time::Duration;

use crm_domain::consent::Channel;
use secrecy::{ExposeSecret, SecretString};

use super::{Carrier, CarrierError, Delivered, Outbound};

/// Longest one request may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends SMS or WhatsApp messages through one account.
pub struct TwilioCarrier {
    client: reqwest::Client,
    endpoint: String,
    account_sid: String,
    auth_token: SecretString,
    from: String,
}

impl TwilioCarrier {
    /// `base_url` is `https://api.twilio.com` for the real service.
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: SecretString,
        from: &str,
    ) -> Result<Self, CarrierError> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(CarrierError::permanent(
                "the twilio base URL must start with http:// or https://",
            ));
        }
        if account_sid.is_empty() || !account_sid.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(CarrierError::permanent(
                "the twilio account sid must be letters and digits",
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .build()
            .map_err(|e| CarrierError::permanent(format!("http client: {}", e.without_url())))?;
        Ok(Self {
            client,
            endpoint: format!(
                "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
                base_url.trim_end_matches('/')
            ),
            account_sid: account_sid.to_owned(),
            auth_token,
            from: from.to_owned(),
        })
    }
}

/// `whatsapp:+…` for WhatsApp, the number itself for SMS.
fn address(channel: Channel, number: &str) -> String {
    match channel {
        Channel::Whatsapp if !number.starts_with("whatsapp:") => format!("whatsapp:{number}"),
        _ => number.to_owned(),
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    sid: Option<String>,
    /// Twilio's error code (on a 4xx).
    code: Option<i64>,
}

#[async_trait::async_trait]
impl Carrier for TwilioCarrier {
    async fn send(&self, msg: &Outbound) -> Result<Delivered, CarrierError> {
        if !matches!(msg.channel, Channel::Sms | Channel::Whatsapp) {
            return Err(CarrierError::permanent(
                "the twilio carrier sends sms and whatsapp only",
            ));
        }
        let form = [
            ("To", address(msg.channel, &msg.to)),
            ("From", address(msg.channel, &self.from)),
            ("Body", msg.body.clone()),
        ];
        let response = self
            .client
            .post(&self.endpoint)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose_secret()))
            .header("I-Twilio-Idempotency-Token", &msg.idempotency_key)
            .header("Idempotency-Key", &msg.idempotency_key)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    e.without_url().to_string()
                };
                CarrierError::retryable(format!("twilio: {what}"))
            })?;
        let status = response.status();
        // The body is read for the sid or error code only; never echoed (it may hold
        // the message text).
        let answer: Option<Answer> = response.json().await.ok();
        if status.is_success() {
            return Ok(Delivered {
                carrier: "twilio".into(),
                carrier_message_id: answer.and_then(|a| a.sid),
            });
        }
        let code = answer
            .and_then(|a| a.code)
            .map(|c| format!(" (code {c})"))
            .unwrap_or_default();
        let message = format!("twilio answered {}{code}", status.as_u16());
        if status.as_u16() == 429 || status.is_server_error() {
            Err(CarrierError::retryable(message))
        } else {
            Err(CarrierError::permanent(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whatsapp_numbers_are_prefixed_once() {
        assert_eq!(address(Channel::Sms, "+4915112345678"), "+4915112345678");
        assert_eq!(
            address(Channel::Whatsapp, "+4915112345678"),
            "whatsapp:+4915112345678"
        );
        assert_eq!(
            address(Channel::Whatsapp, "whatsapp:+4915112345678"),
            "whatsapp:+4915112345678"
        );
    }

    #[test]
    fn a_bad_base_url_or_sid_is_refused() {
        let token = || SecretString::from("t".to_owned());
        assert!(TwilioCarrier::new("ftp://x", "AC1", token(), "+1").is_err());
        assert!(TwilioCarrier::new("https://x", "AC/../1", token(), "+1").is_err());
    }
}
