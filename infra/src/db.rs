//! Connection pool and migrations.

use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod};
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;

use crate::settings::DatabaseSettings;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    Config(String),
    #[error("could not build the connection pool: {0}")]
    Pool(String),
    #[error("database: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Checkout(#[from] deadpool_postgres::PoolError),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// Parses the configured URL.
pub fn pg_config(settings: &DatabaseSettings) -> Result<tokio_postgres::Config, DbError> {
    settings
        .url
        .expose_secret()
        .parse::<tokio_postgres::Config>()
        .map_err(|e| DbError::Config(e.to_string()))
}

/// The service's pool: every connection acts as the application role and never idles
/// inside a transaction for long (that would hold back the relay's visibility horizon).
pub fn app_pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    build_pool(app_config(settings)?, settings.pool_size)
}

/// Connection settings of the application role (for dedicated connections).
pub fn app_config(settings: &DatabaseSettings) -> Result<tokio_postgres::Config, DbError> {
    let mut cfg = pg_config(settings)?;
    let mut options = String::from("-c idle_in_transaction_session_timeout=30000");
    if !settings.app_role.is_empty() {
        options.push_str(&format!(" -c role={}", settings.app_role));
    }
    cfg.options(&options);
    if cfg.get_application_name().is_none() {
        cfg.application_name("crm");
    }
    Ok(cfg)
}

/// A pool with the configured identity, for operator work (migrations, rebuilds).
pub fn admin_pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    let mut cfg = pg_config(settings)?;
    cfg.application_name("crm-admin");
    // A rebuild holds up to four at once (scan, and three writers taking turns).
    build_pool(cfg, 6)
}

fn build_pool(cfg: tokio_postgres::Config, size: usize) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        // The most recently used connection first: a burst that once opened every
        // connection (say 32 requests at once, all missing the access cache) must not
        // leave the steady load spread round-robin over all of them. Spread, each
        // backend is woken for a sliver of the work, with cold caches and its own copy
        // of every prepared plan: ~15 % more PostgreSQL CPU per command at 1,000/s
        // (docs/benchmarks.md); LIFO keeps the work on the few it needs.
        .queue_mode(QueueMode::Lifo)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Applies the SQL migrations in `migrations/`; returns how many were applied now.
pub async fn migrate(settings: &DatabaseSettings) -> Result<usize, DbError> {
    let cfg = pg_config(settings)?;
    let (mut client, connection) = cfg.connect(NoTls).await?;
    let conn = tokio::spawn(connection);
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await?;
    drop(client);
    let _ = conn.await;
    Ok(report.applied_migrations().len())
}

/// A database error for logs: PostgreSQL's SQLSTATE and message when the server sent
/// one (tokio-postgres alone only says "db error"), never its DETAIL, which can quote
/// the values involved (personal data).
/// Whether `e` means the database is away (the connection is gone or refused, the
/// server is shutting down, starting up or out of connections) rather than that the
/// statement was wrong: a reason to answer 503 and retry, not 500.
pub fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 57P01-03: admin/crash shutdown, cannot connect now;
        // 53300: too many connections.
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    // No server answer at all: an I/O error on the socket, or a timeout.
    std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
        || e.to_string().contains("timed out")
}

pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// What a [`listen`] loop tells its owner.
#[derive(Debug, Clone, Copy)]
pub enum Heard<'a> {
    /// The listening connection is up (`true`: every notification from now on will be
    /// heard) or lost (`false`: some may be missed until it is back).
    Live(bool),
    /// `NOTIFY channel, 'payload'` was committed somewhere.
    Notification { channel: &'a str, payload: &'a str },
}

/// LISTENs on `channels` until `shutdown`, reconnecting a second after each loss, and
/// tells `on` what it hears; `what` names the listener in the log. For caches that
/// other processes' commits invalidate: a cache trusts its entries only while live.
pub async fn listen(
    pg: tokio_postgres::Config,
    channels: &'static [&'static str],
    what: &'static str,
    on: std::sync::Arc<dyn Fn(Heard<'_>) + Send + Sync>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(e) = listen_session(&pg, channels, on.clone(), &shutdown).await {
            tracing::warn!(listener = what, error = %describe(&e), "listener lost; cache off");
        }
        on(Heard::Live(false));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    on(Heard::Live(false));
}

async fn listen_session(
    pg: &tokio_postgres::Config,
    channels: &[&str],
    on: std::sync::Arc<dyn Fn(Heard<'_>) + Send + Sync>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    use futures::StreamExt;
    let (client, mut connection) = pg.connect(NoTls).await?;
    let (lost_tx, lost) = tokio::sync::oneshot::channel::<()>();
    let heard = on.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    heard(Heard::Notification {
                        channel: n.channel(),
                        payload: n.payload(),
                    });
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        heard(Heard::Live(false));
        let _ = lost_tx.send(());
    });
    let sql: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    client.batch_execute(&sql).await?;
    on(Heard::Live(true));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = lost => {}
    }
    driver.abort();
    Ok(())
}
