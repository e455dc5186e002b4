//! Logging: `CRM_LOG` (or `RUST_LOG`) filters, `CRM_LOG_FORMAT=json` for JSON lines.
//! Request bodies, tokens, passwords and personal data are never logged.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = std::env::var("CRM_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,tokio_postgres=warn,async_nats=warn".to_owned());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_target(false);
    let _ = if std::env::var("CRM_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
