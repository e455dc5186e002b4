//! The default without a carrier: every message, whatever its channel, becomes one
//! RFC 5322 file in the spool directory (`CRM_MAIL_SPOOL_DIR`) for the operator's mail
//! transfer agent or SMS gateway to pick up, as `api/src/mail.rs` does for the service's
//! own mail: written under a temporary name, then renamed, so a reader never sees half
//! a file. The file is named by the idempotency key (`{key}.eml`; `{key}.sms.txt` and
//! `{key}.whatsapp.txt` for the other channels), so a retry overwrites rather than
//! duplicates.

use std::path::{Path, PathBuf};

use crm_domain::consent::Channel;

use super::{Carrier, CarrierError, Delivered, Outbound};

/// Writes messages into one directory.
pub struct SpoolCarrier {
    dir: PathBuf,
    from: String,
}

impl SpoolCarrier {
    pub fn new(dir: PathBuf, from: String) -> Self {
        Self { dir, from }
    }

    /// The file a message with this key and channel is written to.
    pub fn path_of(&self, idempotency_key: &str, channel: Channel) -> PathBuf {
        self.dir.join(file_name(idempotency_key, channel))
    }
}

/// The key with anything but letters, digits, `-`, `_` and `.` replaced (and no
/// leading dot), so that it cannot leave the directory.
fn file_name(key: &str, channel: Channel) -> String {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = safe.trim_start_matches('.');
    match channel {
        Channel::Email => format!("{safe}.eml"),
        other => format!("{safe}.{}.txt", other.name()),
    }
}

/// A header value on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

/// The message as an RFC 5322 text.
fn render(from: &str, msg: &Outbound) -> String {
    let domain = from
        .rsplit_once('@')
        .map_or("localhost", |(_, d)| d.trim_end_matches('>'));
    let mut text = format!(
        "From: {}\r\nTo: {}\r\nMessage-ID: <{}@{}>\r\nDate: {}\r\nX-CRM-Channel: {}\r\n",
        one_line(from),
        one_line(&msg.to),
        one_line(&msg.idempotency_key),
        one_line(domain),
        chrono::Utc::now().to_rfc2822(),
        msg.channel.name(),
    );
    if let Some(subject) = &msg.subject {
        text.push_str(&format!("Subject: {}\r\n", one_line(subject)));
    }
    if let (Channel::Email, Some(url)) = (msg.channel, &msg.unsubscribe_url) {
        text.push_str(&format!(
            "List-Unsubscribe: <{}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            one_line(url)
        ));
    }
    text.push_str("Content-Type: text/plain; charset=utf-8\r\n\r\n");
    text.push_str(&msg.body.replace("\r\n", "\n").replace('\n', "\r\n"));
    text.push_str("\r\n");
    text
}

fn write(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::now_v7()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(name))
}

#[async_trait::async_trait]
impl Carrier for SpoolCarrier {
    async fn send(&self, msg: &Outbound) -> Result<Delivered, CarrierError> {
        if matches!(msg.channel, Channel::Phone | Channel::Postal) {
            return Err(CarrierError::permanent(format!(
                "no carrier configured for {}",
                msg.channel.name()
            )));
        }
        let name = file_name(&msg.idempotency_key, msg.channel);
        let text = render(&self.from, msg);
        let dir = self.dir.clone();
        let written = {
            let name = name.clone();
            tokio::task::spawn_blocking(move || write(&dir, &name, &text)).await
        };
        match written {
            Ok(Ok(())) => Ok(Delivered {
                carrier: "spool".into(),
                carrier_message_id: Some(name),
            }),
            // A full disk or a missing mount may pass: retry.
            Ok(Err(e)) => Err(CarrierError::retryable(format!("spool: {}", e.kind()))),
            Err(_) => Err(CarrierError::retryable("spool: the writer stopped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(key: &str, channel: Channel) -> Outbound {
        Outbound {
            idempotency_key: key.into(),
            channel,
            to: "ada@example.com".into(),
            subject: Some("Hi\r\nBcc: x@y".into()),
            body: "line 1\nline 2".into(),
            unsubscribe_url: Some("https://crm.example.com/u/1".into()),
        }
    }

    #[test]
    fn a_key_cannot_leave_the_directory() {
        assert_eq!(
            file_name("../../etc/passwd", Channel::Email),
            "_.._etc_passwd.eml"
        );
        assert_eq!(file_name("abc-1", Channel::Sms), "abc-1.sms.txt");
    }

    #[tokio::test]
    async fn a_retry_overwrites_the_same_file() {
        let dir = std::env::temp_dir().join(format!("crm-spool-{}", uuid::Uuid::now_v7()));
        let spool = SpoolCarrier::new(dir.clone(), "crm@example.com".into());
        for _ in 0..2 {
            let d = spool.send(&outbound("k1", Channel::Email)).await.unwrap();
            assert_eq!(d.carrier, "spool");
        }
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(spool.path_of("k1", Channel::Email)).unwrap();
        assert!(text.contains("Message-ID: <k1@example.com>\r\n"), "{text}");
        assert!(text.contains("Subject: Hi  Bcc: x@y\r\n"), "{text}");
        assert!(text.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"));
        assert!(text.ends_with("\r\n\r\nline 1\r\nline 2\r\n"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn phone_has_no_spool() {
        let spool = SpoolCarrier::new(std::env::temp_dir(), "crm@example.com".into());
        let e = spool
            .send(&outbound("k", Channel::Phone))
            .await
            .unwrap_err();
        assert!(!e.retryable);
    }
}
