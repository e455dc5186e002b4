//! The service's settings, assembled from flags and environment by [`crate::cli`].

use std::net::SocketAddr;
use std::time::Duration;

use crm_infra::settings::{DatabaseSettings, KeySettings, NatsSettings};
use secrecy::SecretString;

#[derive(Clone, Debug)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub nats: NatsSettings,
    pub keys: KeySettings,
    pub http: HttpSettings,
    pub jwt: JwtSettings,
    pub mail: MailSettings,
    /// Run the relay inside `serve`.
    pub run_relay: bool,
    /// Run every projector inside `serve`.
    pub run_projectors: bool,
    /// Run the dispatcher inside `serve`.
    pub run_dispatcher: bool,
    /// How often `serve` sweeps AI actions (expiries, runs cut short).
    pub ai_sweep_interval: Duration,
    /// How often `serve` runs the retention sweep (`None`: never).
    pub retention_sweep_interval: Option<Duration>,
    /// Run the webhook delivery worker inside `serve`.
    pub run_deliverer: bool,
    pub webhooks: WebhookSettings,
    /// The live event stream (`GET /v1/events/stream`, docs/live.md).
    pub live: crm_infra::live::LiveSettings,
}

/// Outbound webhooks (docs/webhooks.md, "Settings").
#[derive(Clone, Debug, Default)]
pub struct WebhookSettings {
    /// Networks webhooks may reach although they are the service's own
    /// (`CRM_WEBHOOK_ALLOW_NETS`); none by default.
    pub allow_nets: crm_infra::webhooks::net::NetPolicy,
    pub delivery: crm_infra::webhooks::worker::DeliverySettings,
}

#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub bind: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: u64,
    /// Longest a query waits for a projection to reach a requested position.
    pub max_consistency_wait: Duration,
    /// Origins browsers may call the API from (`scheme://host[:port]`); none by default.
    pub cors_origins: Vec<String>,
    /// Origins the client portal (`/portal/…`) may be called from; its own list.
    pub portal_cors_origins: Vec<String>,
    pub rate_limits: crate::edge::ratelimit::RateLimitSettings,
    pub timeouts: HttpTimeouts,
}

/// How long the edge waits for a client, and for itself at shutdown (docs/operations.md).
#[derive(Clone, Copy, Debug)]
pub struct HttpTimeouts {
    /// Reading a request's head (request line and headers): a client slower than this
    /// has its connection closed (`CRM_HTTP_HEAD_TIMEOUT_MS`).
    pub head: Duration,
    /// Between two reads of a request body (`CRM_HTTP_BODY_READ_TIMEOUT_MS`): 408.
    pub body_read: Duration,
    /// Reading a whole request body (`CRM_HTTP_BODY_TIMEOUT_MS`): 408.
    pub body_total: Duration,
    /// After SIGTERM/SIGINT: how long requests in flight may still take before the
    /// connections left are closed and the process exits (`CRM_SHUTDOWN_GRACE_MS`).
    pub shutdown_grace: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            head: Duration::from_secs(10),
            body_read: Duration::from_secs(10),
            body_total: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// HS256 secret, at least 32 bytes.
    pub secret: SecretString,
    pub ttl: Duration,
    pub audience: String,
    pub issuer: String,
}

#[derive(Clone, Debug)]
pub struct MailSettings {
    /// Where outgoing mail is spooled (see [`crate::mail`]); `None`: kept in memory.
    pub spool_dir: Option<std::path::PathBuf>,
    /// The base URL links in mails point to (the front end), e.g. `https://crm.example.com`.
    pub link_base: String,
    /// `CRM_SMTP_URL`: outbound email of organisations without a carrier of their own
    /// goes through this relay (`smtp://`, `smtp+starttls://`, `smtps://`; it may hold a
    /// user and password, hence secret); unset: it is spooled.
    pub smtp_url: Option<SecretString>,
    /// `CRM_MAIL_FROM`: the sender of that email.
    pub from: String,
}

impl MailSettings {
    /// The carriers of organisations that configured none
    /// (`crm_infra::dispatch::carriers`).
    pub fn carrier_defaults(&self) -> crm_infra::dispatch::carriers::CarrierDefaults {
        use secrecy::ExposeSecret;
        crm_infra::dispatch::carriers::CarrierDefaults {
            smtp_url: self.smtp_url.as_ref().map(|u| u.expose_secret().to_owned()),
            mail_from: self.from.clone(),
            spool_dir: self.spool_dir.clone(),
        }
    }
}
