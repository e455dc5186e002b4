//! Outgoing mail (magic links, password resets). The service does not speak SMTP: it
//! writes each message as an RFC 5322 file into a spool directory
//! (`CRM_MAIL_SPOOL_DIR`) that the operator's mail transfer agent delivers from
//! (write to a temporary name, then rename, so a reader never sees half a file).
//! Without a spool directory, messages are kept in memory (tests read them there) and a
//! warning says that no mail leaves the service. Message bodies are never logged.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
}

#[derive(Clone)]
pub enum Mailer {
    Spool(PathBuf),
    Memory(Arc<Mutex<Vec<Mail>>>),
}

impl Mailer {
    pub fn new(spool_dir: Option<PathBuf>) -> Self {
        match spool_dir {
            Some(dir) => Self::Spool(dir),
            None => {
                tracing::warn!(
                    "CRM_MAIL_SPOOL_DIR is not set: magic links and password resets are not delivered"
                );
                Self::Memory(Arc::default())
            }
        }
    }

    /// Hands a message over, in the background: the caller's response time does not
    /// depend on it (so a response does not tell whether a mail was sent).
    pub fn send(&self, mail: Mail) {
        match self {
            Self::Memory(sent) => {
                if let Ok(mut s) = sent.lock() {
                    s.push(mail);
                }
            }
            Self::Spool(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = spool(&dir, &mail) {
                        tracing::error!(error = %e, "mail not spooled");
                    }
                });
            }
        }
    }

    /// Messages kept in memory (none when spooling).
    pub fn sent(&self) -> Vec<Mail> {
        match self {
            Self::Memory(sent) => sent.lock().map(|s| s.clone()).unwrap_or_default(),
            Self::Spool(_) => Vec::new(),
        }
    }
}

fn spool(dir: &std::path::Path, mail: &Mail) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let id = uuid::Uuid::now_v7();
    let text = format!(
        "To: {}\r\nSubject: {}\r\nMessage-ID: <{id}@crm>\r\nDate: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n",
        mail.to,
        mail.subject,
        chrono::Utc::now().to_rfc2822(),
        mail.body
    );
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(format!("{id}.eml")))
}
