//! Typed settings. Secrets are wrapped so they never print.

use secrecy::SecretString;

/// How to reach PostgreSQL.
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// A connection URL; the service switches to `app_role` on every pooled connection.
    pub url: SecretString,
    /// The role the service acts as (no UPDATE/DELETE on events). Empty: stay as is.
    pub app_role: String,
    pub pool_size: usize,
}

/// How to reach NATS JetStream and which stream and subjects to use.
#[derive(Clone, Debug)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
}

impl NatsSettings {
    /// `crm.evt.<org>.<aggregate_type>.<aggregate_id>`
    pub fn subject(&self, org_id: &uuid::Uuid, aggregate_type: &str, aggregate_id: &str) -> String {
        format!(
            "{}.{org_id}.{aggregate_type}.{aggregate_id}",
            self.subject_prefix
        )
    }
    pub fn all_subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }
}

/// The key-encryption key that wraps every data key.
#[derive(Clone, Debug)]
pub struct KeySettings {
    pub kek_id: String,
    /// 32 bytes, base64 in the configuration.
    pub kek: SecretString,
}
