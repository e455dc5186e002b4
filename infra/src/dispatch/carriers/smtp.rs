//! Email through an SMTP relay (lettre, tokio, rustls).
//!
//! URL forms: `smtp://host[:25]` (plain: a local relay or sink), `smtp+starttls://host[:587]`
//! (STARTTLS required), `smtps://host[:465]` (TLS from the start); `user[:password]@` may
//! precede the host (the password may instead come from the organisation's sealed
//! secret). Every message carries `Message-ID: <{idempotency key}@{from domain}>`, the
//! same on every attempt, which is what a de-duplicating relay keys on, and, when it has
//! an unsubscribe URL, `List-Unsubscribe: <url>` with
//! `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058).
//!
//! Errors: no connection, a timeout, TLS, or a 4xx reply → retryable; a 5xx reply or a
//! message that cannot be built (a bad address) → permanent.

use std::str::FromStr;
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Carrier, CarrierError, Delivered, Outbound};

/// Longest a connection, a command or a reply may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How an SMTP URL secures its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    StartTls,
    Tls,
}

/// An SMTP URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpUrl {
    pub security: Security,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl SmtpUrl {
    /// Parses `smtp://`, `smtp+starttls://` or `smtps://` URLs. The error names what is
    /// wrong, never the password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("is not a URL ({e})"))?;
        let (security, default_port) = match url.scheme() {
            "smtp" => (Security::Plain, 25),
            "smtp+starttls" => (Security::StartTls, 587),
            "smtps" => (Security::Tls, 465),
            _ => return Err("must start with smtp://, smtp+starttls:// or smtps://".into()),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("names no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !(url.path().is_empty() || url.path() == "/") || url.query().is_some() {
            return Err("must be scheme://[user[:password]@]host[:port] only".into());
        }
        let decode =
            |s: &str| percent_decode(s).ok_or("has a badly percent-encoded user or password");
        let user = match url.username() {
            "" => None,
            u => Some(decode(u)?),
        };
        let password = url.password().map(decode).transpose()?;
        Ok(Self {
            security,
            host,
            port: url.port().unwrap_or(default_port),
            user,
            password,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Sends email through one SMTP relay.
pub struct SmtpCarrier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The domain of `from`: the right-hand side of every Message-ID.
    domain: String,
}

impl SmtpCarrier {
    /// `password`, when given, is used instead of one in the URL (an organisation's
    /// decrypted secret). Errors are permanent: the configuration is wrong.
    pub fn from_url(url: &str, from: &str, password: Option<&str>) -> Result<Self, CarrierError> {
        let url =
            SmtpUrl::parse(url).map_err(|e| CarrierError::permanent(format!("smtp url {e}")))?;
        let from = Mailbox::from_str(from)
            .map_err(|_| CarrierError::permanent("the sender (from) is not an email address"))?;
        let tls = |e: lettre::transport::smtp::Error| {
            CarrierError::permanent(format!("smtp TLS set-up failed: {e}"))
        };
        let builder = match url.security {
            Security::Plain => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&url.host),
            Security::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&url.host).map_err(tls)?
            }
            Security::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&url.host).map_err(tls)?,
        };
        let mut builder = builder.port(url.port).timeout(Some(TIMEOUT));
        let password = password.map(str::to_owned).or(url.password);
        if let Some(user) = url.user {
            builder = builder.credentials(Credentials::new(user, password.unwrap_or_default()));
        }
        Ok(Self {
            transport: builder.build(),
            domain: from.email.domain().to_owned(),
            from,
        })
    }

    /// `<{key}@{from domain}>`: the same for every attempt of a message.
    pub fn message_id(&self, idempotency_key: &str) -> String {
        format!("<{idempotency_key}@{}>", self.domain)
    }

    /// The message as it goes on the wire.
    pub fn build(&self, msg: &Outbound) -> Result<Message, CarrierError> {
        let to = Mailbox::from_str(&msg.to)
            .map_err(|_| CarrierError::permanent("the recipient is not an email address"))?;
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(msg.subject.clone().unwrap_or_default())
            .message_id(Some(self.message_id(&msg.idempotency_key)));
        if let Some(url) = &msg.unsubscribe_url {
            if url.contains(['\r', '\n', '<', '>']) {
                return Err(CarrierError::permanent("the unsubscribe URL is malformed"));
            }
            builder = builder
                .raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe"),
                    format!("<{url}>"),
                ))
                .raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                    "List-Unsubscribe=One-Click".into(),
                ));
        }
        builder
            .header(ContentType::TEXT_PLAIN)
            .body(msg.body.clone())
            .map_err(|e| CarrierError::permanent(format!("the email cannot be built: {e}")))
    }
}

/// Retryable unless the relay answered with a permanent (5xx) reply.
fn classify(e: &lettre::transport::smtp::Error) -> CarrierError {
    let message = match e.status() {
        Some(code) => format!("smtp relay replied {code}"),
        None if e.is_timeout() => "smtp relay timed out".to_owned(),
        None => format!("smtp: {e}"),
    };
    if e.is_permanent() {
        CarrierError::permanent(message)
    } else {
        CarrierError::retryable(message)
    }
}

#[async_trait::async_trait]
impl Carrier for SmtpCarrier {
    async fn send(&self, msg: &Outbound) -> Result<Delivered, CarrierError> {
        if msg.channel != crm_domain::consent::Channel::Email {
            return Err(CarrierError::permanent("the smtp carrier sends email only"));
        }
        let message = self.build(msg)?;
        self.transport
            .send(message)
            .await
            .map_err(|e| classify(&e))?;
        Ok(Delivered {
            carrier: "smtp".into(),
            carrier_message_id: Some(self.message_id(&msg.idempotency_key)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let u = SmtpUrl::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!(
            (u.security, u.host.as_str(), u.port, u.user),
            (Security::Plain, "127.0.0.1", 2525, None)
        );
        let u = SmtpUrl::parse("smtp+starttls://bob%40x:p%3Ass@mx.example.com").unwrap();
        assert_eq!(
            (u.security, u.port, u.user.as_deref(), u.password.as_deref()),
            (Security::StartTls, 587, Some("bob@x"), Some("p:ss"))
        );
        assert_eq!(SmtpUrl::parse("smtps://mx.example.com").unwrap().port, 465);
        for bad in [
            "http://mx.example.com",
            "smtp://",
            "smtp://mx/path",
            "nonsense",
        ] {
            assert!(SmtpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_parse_error_never_shows_the_password() {
        let e = SmtpUrl::parse("smtp://u:hunter2@mx.example.com/x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
