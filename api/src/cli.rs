//! The `crm` command line: `serve`, `relay`, `project`, `rebuild`, `migrate`, `admin`,
//! `audit`, `receipts`. Every setting is a flag or an environment variable.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use crm_domain::metadata::EventMetadata;
use crm_domain::user::{Grantor, Role, RoleRef};
use crm_domain::values::{Email, Name};
use crm_infra::access::accounts;
use crm_infra::feed::rebuild;
use crm_infra::settings::{DatabaseSettings, KeySettings, NatsSettings};
use crm_infra::store::verify;
use crm_infra::{db, read_models};
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngCore;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{HttpSettings, JwtSettings, Settings};
use crate::startup::{self, Application, Background};

#[derive(Parser, Debug)]
#[command(
    name = "crm",
    version,
    about = "Event-sourced compliance core for CRMs"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// PostgreSQL URL (an owner of the schema; the service acts as --db-app-role).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/crm"
    )]
    pub database_url: String,
    /// Role every pooled connection switches to; empty to stay as the URL's user.
    #[arg(
        long,
        env = "CRM_DB_APP_ROLE",
        global = true,
        default_value = "crm_app"
    )]
    pub db_app_role: String,
    #[arg(long, env = "CRM_DB_POOL_SIZE", global = true, default_value_t = 48)]
    pub db_pool_size: usize,
    #[arg(
        long,
        env = "NATS_URL",
        global = true,
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    #[arg(
        long,
        env = "CRM_NATS_STREAM",
        global = true,
        default_value = "CRM_EVENTS"
    )]
    pub nats_stream: String,
    #[arg(
        long,
        env = "CRM_NATS_SUBJECT_PREFIX",
        global = true,
        default_value = "crm.evt"
    )]
    pub nats_subject_prefix: String,
    /// Key-encryption key: 32 bytes, base64.
    #[arg(long, env = "CRM_KEK", hide_env_values = true, global = true)]
    pub kek: Option<String>,
    #[arg(long, env = "CRM_KEK_ID", global = true, default_value = "kek-1")]
    pub kek_id: String,
    /// HS256 secret for JWTs (at least 32 bytes).
    #[arg(long, env = "CRM_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    #[arg(long, env = "CRM_JWT_TTL_SECS", global = true, default_value_t = 3600)]
    pub jwt_ttl_secs: u64,
    #[arg(
        long,
        env = "CRM_BIND",
        global = true,
        default_value = "127.0.0.1:8080"
    )]
    pub bind: SocketAddr,
    #[arg(long, env = "CRM_MAX_BODY_BYTES", global = true, default_value_t = 64 * 1024)]
    pub max_body_bytes: u64,
    #[arg(
        long,
        env = "CRM_MAX_CONSISTENCY_WAIT_MS",
        global = true,
        default_value_t = 5000
    )]
    pub max_consistency_wait_ms: u64,
    /// Origins allowed to call the API from a browser, comma-separated
    /// (`https://app.example.com,https://admin.example.com`); none by default.
    #[arg(long, env = "CRM_CORS_ORIGINS", global = true, value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Origins allowed to call the client portal (`/portal/…`) from a browser; a list of
    /// its own, none by default.
    #[arg(
        long,
        env = "CRM_PORTAL_CORS_ORIGINS",
        global = true,
        value_delimiter = ','
    )]
    pub portal_cors_origins: Vec<String>,
    /// Directory outgoing mail (magic links, password resets) is spooled to as .eml
    /// files for a mail transfer agent; unset: mail is not delivered.
    #[arg(long, env = "CRM_MAIL_SPOOL_DIR", global = true)]
    pub mail_spool_dir: Option<std::path::PathBuf>,
    /// SMTP relay for outbound email of organisations without a carrier of their own
    /// (`smtp://host:port`, `smtp+starttls://user:password@host`, `smtps://…`); unset:
    /// such email is spooled to CRM_MAIL_SPOOL_DIR.
    #[arg(long, env = "CRM_SMTP_URL", global = true, hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender address of outbound email sent through CRM_SMTP_URL or the spool.
    #[arg(
        long,
        env = "CRM_MAIL_FROM",
        global = true,
        default_value = "crm@localhost"
    )]
    pub mail_from: String,
    /// Base URL of the front end that links in mails point to.
    #[arg(
        long,
        env = "CRM_PUBLIC_URL",
        global = true,
        default_value = "http://127.0.0.1:8080"
    )]
    pub public_url: String,
    /// Longest a client may take to send a request's head, in ms (then: connection closed).
    #[arg(
        long,
        env = "CRM_HTTP_HEAD_TIMEOUT_MS",
        global = true,
        default_value_t = 10_000
    )]
    pub http_head_timeout_ms: u64,
    /// Longest pause between two reads of a request body, in ms (then: 408).
    #[arg(
        long,
        env = "CRM_HTTP_BODY_READ_TIMEOUT_MS",
        global = true,
        default_value_t = 10_000
    )]
    pub http_body_read_timeout_ms: u64,
    /// Longest a client may take to send a whole request body, in ms (then: 408).
    #[arg(
        long,
        env = "CRM_HTTP_BODY_TIMEOUT_MS",
        global = true,
        default_value_t = 30_000
    )]
    pub http_body_timeout_ms: u64,
    /// After SIGTERM: how long requests in flight may still take, in ms, before the
    /// connections left are closed and the process exits.
    #[arg(
        long,
        env = "CRM_SHUTDOWN_GRACE_MS",
        global = true,
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u64,
    /// How often `serve` sweeps AI actions, in ms: records the expiry of pending ones past
    /// their time, runs approved ones whose run was cut short (docs/ai.md).
    #[arg(
        long,
        env = "CRM_AI_SWEEP_INTERVAL_MS",
        global = true,
        default_value_t = 10_000
    )]
    pub ai_sweep_interval_ms: u64,
    /// How often `serve` runs the retention sweep, in seconds (docs/rights.md); 0: never.
    #[arg(
        long,
        env = "CRM_RETENTION_SWEEP_SECS",
        global = true,
        default_value_t = 3_600
    )]
    pub retention_sweep_secs: u64,
    /// Networks webhooks may reach although they belong to the service's own (loopback,
    /// private, link-local…): comma-separated CIDRs or addresses (docs/webhooks.md).
    #[arg(
        long,
        env = "CRM_WEBHOOK_ALLOW_NETS",
        global = true,
        default_value = ""
    )]
    pub webhook_allow_nets: String,
    /// Timeout of one webhook attempt, in seconds.
    #[arg(
        long,
        env = "CRM_WEBHOOK_TIMEOUT_SECS",
        global = true,
        default_value_t = 10
    )]
    pub webhook_timeout_secs: u64,
    /// Webhook attempts in flight per delivery worker.
    #[arg(
        long,
        env = "CRM_WEBHOOK_CONCURRENCY",
        global = true,
        default_value_t = 64
    )]
    pub webhook_concurrency: usize,
    /// Failed attempts in a row that disable an endpoint (with the next setting).
    #[arg(
        long,
        env = "CRM_WEBHOOK_DISABLE_AFTER_FAILURES",
        global = true,
        default_value_t = 50
    )]
    pub webhook_disable_after_failures: u32,
    /// ...when the first of them is at least this many seconds old (5 days).
    #[arg(
        long,
        env = "CRM_WEBHOOK_DISABLE_AFTER_SECS",
        global = true,
        default_value_t = 432_000
    )]
    pub webhook_disable_after_secs: u64,
    /// Days the webhook delivery log is kept.
    #[arg(
        long,
        env = "CRM_WEBHOOK_LOG_DAYS",
        global = true,
        default_value_t = 30
    )]
    pub webhook_log_days: u32,
    /// Live event stream: recent events kept in memory for resumes (docs/live.md).
    #[arg(
        long,
        env = "CRM_LIVE_RING_EVENTS",
        global = true,
        default_value_t = 10_000
    )]
    pub live_ring_events: usize,
    /// Live event stream: events a connection may have waiting before it is cut off.
    #[arg(
        long,
        env = "CRM_LIVE_BUFFER_EVENTS",
        global = true,
        default_value_t = 1_024
    )]
    pub live_buffer_events: usize,
    /// Live event stream: seconds between heartbeats (comment lines) of an idle stream.
    #[arg(
        long,
        env = "CRM_LIVE_HEARTBEAT_SECS",
        global = true,
        default_value_t = 15
    )]
    pub live_heartbeat_secs: u64,
    /// Live event stream: seconds the hub keeps reading the feed after the last
    /// following stream closed (0: stop at once).
    #[arg(long, env = "CRM_LIVE_IDLE_SECS", global = true, default_value_t = 60)]
    pub live_idle_secs: u64,
    /// Live event stream: open streams per organisation in this process.
    #[arg(
        long,
        env = "CRM_LIVE_MAX_PER_ORG",
        global = true,
        default_value_t = 100
    )]
    pub live_max_per_org: usize,
    /// Requests per second per client IP on the API (0: no limit).
    #[arg(long, env = "CRM_RATE_LIMIT_API", global = true, default_value_t = 30)]
    pub rate_limit_api: u32,
    /// Requests per second per client IP on /v1/auth/... (0: no limit).
    #[arg(long, env = "CRM_RATE_LIMIT_AUTH", global = true, default_value_t = 5)]
    pub rate_limit_auth: u32,
    /// Failed logins per account per hour before its logins are refused (0: no limit).
    #[arg(
        long,
        env = "CRM_FAILED_LOGINS_PER_HOUR",
        global = true,
        default_value_t = 100
    )]
    pub failed_logins_per_hour: u32,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API (and, unless disabled, the relay and every projector).
    Serve {
        #[arg(long, env = "CRM_NO_RELAY")]
        no_relay: bool,
        #[arg(long, env = "CRM_NO_PROJECTORS")]
        no_projectors: bool,
        #[arg(long, env = "CRM_NO_DISPATCHER")]
        no_dispatcher: bool,
        #[arg(long, env = "CRM_NO_DELIVERER")]
        no_deliverer: bool,
    },
    /// Run only the webhook delivery worker (docs/webhooks.md).
    Deliver,
    /// Run only the dispatcher: sends queued messages through their carriers.
    Dispatch,
    /// Run only the relay (Postgres → JetStream).
    Relay,
    /// Run only the projector of one read model (`contacts`, `activity`).
    Project { name: String },
    /// Rebuild a read model from the event store and swap it in.
    Rebuild { name: String },
    /// Apply database migrations.
    Migrate,
    /// Print the OpenAPI 3.1 document (what `/openapi.json` serves) to stdout.
    Openapi,
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Audit commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Retention: erase the contacts past their retention period.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Consent receipt commands.
    Receipts {
        #[command(subcommand)]
        command: ReceiptsCommand,
    },
    /// Consent operations.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConsentCommand {
    /// Import consent changes from a CSV (header row) or JSON-lines file: each valid
    /// row becomes an event with source `import`; prints the report (bad rows by line).
    Import {
        #[arg(long)]
        org: Uuid,
        /// The file; `.jsonl`/`.ndjson` is read as JSON lines, anything else as CSV.
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create an organisation; prints its id.
    CreateOrg {
        #[arg(long)]
        name: String,
    },
    /// Create a staff user. The password comes from CRM_NEW_PASSWORD or is generated
    /// and printed once.
    CreateUser {
        #[arg(long)]
        org: Uuid,
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "Owner")]
        name: String,
        #[arg(long, default_value = "owner")]
        role: String,
    },
    /// On an empty store: create a first organisation and owner, print the login.
    Bootstrap {
        #[arg(long, default_value = "Example Org")]
        org_name: String,
        #[arg(long, default_value = "owner@example.com")]
        email: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk every stream's hash chain; exit status 1 if any link is broken.
    Verify {
        #[arg(long)]
        org: Option<Uuid>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RetentionCommand {
    /// One pass of the retention sweep (as `serve` runs it): erases, through the
    /// erasure's own path, every contact past its period, leaves those under a legal
    /// hold; prints what it did.
    Sweep {
        /// The sweep's clock (RFC 3339; default now).
        #[arg(long)]
        now: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReceiptsCommand {
    /// Retire the receipt signing key and make a new one; prints its kid. The retired
    /// key stays in the JWKS, so the receipts it signed still verify.
    RotateKey,
}

impl Common {
    pub fn database(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: SecretString::from(self.database_url.clone()),
            app_role: self.db_app_role.clone(),
            pool_size: self.db_pool_size,
        }
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        let kek = self
            .kek
            .clone()
            .context("CRM_KEK is not set: 32 random bytes, base64 (scripts/run makes one)")?;
        let jwt = self
            .jwt_secret
            .clone()
            .context("CRM_JWT_SECRET is not set (scripts/run makes one)")?;
        Ok(Settings {
            database: self.database(),
            nats: NatsSettings {
                url: self.nats_url.clone(),
                stream: self.nats_stream.clone(),
                subject_prefix: self.nats_subject_prefix.clone(),
            },
            keys: KeySettings {
                kek_id: self.kek_id.clone(),
                kek: SecretString::from(kek),
            },
            http: HttpSettings {
                bind: self.bind,
                max_body_bytes: self.max_body_bytes,
                max_consistency_wait: Duration::from_millis(self.max_consistency_wait_ms),
                cors_origins: crate::edge::cors::parse_origins(&self.cors_origins)
                    .map_err(|e| anyhow::anyhow!(e))?,
                portal_cors_origins: crate::edge::cors::parse_origins(&self.portal_cors_origins)
                    .map_err(|e| anyhow::anyhow!(e))?,
                rate_limits: crate::edge::ratelimit::RateLimitSettings {
                    api_per_sec: self.rate_limit_api,
                    auth_per_sec: self.rate_limit_auth,
                    failed_logins_per_hour: self.failed_logins_per_hour,
                },
                timeouts: crate::config::HttpTimeouts {
                    head: Duration::from_millis(self.http_head_timeout_ms),
                    body_read: Duration::from_millis(self.http_body_read_timeout_ms),
                    body_total: Duration::from_millis(self.http_body_timeout_ms),
                    shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
                },
            },
            jwt: JwtSettings {
                secret: SecretString::from(jwt),
                ttl: Duration::from_secs(self.jwt_ttl_secs),
                audience: "crm-api".into(),
                issuer: "crm".into(),
            },
            mail: crate::config::MailSettings {
                spool_dir: self.mail_spool_dir.clone(),
                link_base: self.public_url.trim_end_matches('/').to_owned(),
                smtp_url: self.smtp_url.clone().map(SecretString::from),
                from: self.mail_from.clone(),
            },
            run_relay: true,
            run_projectors: true,
            run_dispatcher: true,
            ai_sweep_interval: Duration::from_millis(self.ai_sweep_interval_ms.max(100)),
            retention_sweep_interval: (self.retention_sweep_secs > 0)
                .then(|| Duration::from_secs(self.retention_sweep_secs)),
            run_deliverer: true,
            webhooks: crate::config::WebhookSettings {
                allow_nets: crm_infra::webhooks::net::NetPolicy::parse(&self.webhook_allow_nets)
                    .map_err(|e| anyhow::anyhow!("CRM_WEBHOOK_ALLOW_NETS: {e}"))?,
                delivery: crm_infra::webhooks::worker::DeliverySettings {
                    attempt_timeout: Duration::from_secs(self.webhook_timeout_secs.clamp(1, 300)),
                    concurrency: self.webhook_concurrency.clamp(1, 1024),
                    disable_after_failures: self.webhook_disable_after_failures.max(1),
                    disable_after: Duration::from_secs(self.webhook_disable_after_secs),
                    log_days: self.webhook_log_days.max(1),
                    ..Default::default()
                },
            },
            live: crm_infra::live::LiveSettings {
                ring_events: self.live_ring_events.max(1),
                buffer_events: self.live_buffer_events.max(1),
                heartbeat: Duration::from_secs(self.live_heartbeat_secs.max(1)),
                max_per_org: self.live_max_per_org,
                idle_stop: Duration::from_secs(self.live_idle_secs),
                ..Default::default()
            },
        })
    }
}

/// A random password: 24 characters of base64url.
fn generate_password() -> String {
    let mut bytes = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn run_workers(workers: Vec<Background>, shutdown: impl Future<Output = ()>) {
    let token = CancellationToken::new();
    let handle = tokio::spawn(startup::run_background(workers, token.clone()));
    shutdown.await;
    token.cancel();
    let _ = handle.await;
}

pub async fn run(
    cli: Cli,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Migrate => {
            let n = db::migrate(&common.database()).await?;
            println!("migrations applied: {n}");
        }
        Command::Openapi => println!("{}", crate::openapi::json()),
        Command::Serve {
            no_relay,
            no_projectors,
            no_dispatcher,
            no_deliverer,
        } => {
            let mut settings = common.settings()?;
            settings.run_relay = !no_relay;
            settings.run_projectors = !no_projectors;
            settings.run_dispatcher = !no_dispatcher;
            settings.run_deliverer = !no_deliverer;
            let app = Application::build(settings).await?;
            tracing::info!(addr = %app.local_addr(), "listening");
            app.run_until_stopped(shutdown).await;
        }
        Command::Relay => {
            let state = startup::connect(&common.settings()?).await?;
            run_workers(
                vec![Background::Relay(Box::new(startup::relay(&state)?))],
                shutdown,
            )
            .await;
        }
        Command::Deliver => {
            let state = startup::connect(&common.settings()?).await?;
            run_workers(
                vec![
                    Background::Deliverer(Box::new(startup::deliverer(&state)?)),
                    startup::key_listener(&state)?,
                ],
                shutdown,
            )
            .await;
        }
        Command::Dispatch => {
            let state = startup::connect(&common.settings()?).await?;
            run_workers(
                vec![
                    Background::Dispatcher(Box::new(startup::dispatcher(&state))),
                    startup::key_listener(&state)?,
                ],
                shutdown,
            )
            .await;
        }
        Command::Project { name } => {
            let projection =
                read_models::by_name(&name).with_context(|| unknown_projection(&name))?;
            let state = startup::connect(&common.settings()?).await?;
            run_workers(
                vec![
                    Background::Projector(Box::new(startup::projector(&state, projection))),
                    startup::key_listener(&state)?,
                ],
                shutdown,
            )
            .await;
        }
        Command::Rebuild { name } => {
            let projection =
                read_models::by_name(&name).with_context(|| unknown_projection(&name))?;
            let settings = common.settings()?;
            let admin = db::admin_pool(&settings.database)?;
            let crypto = std::sync::Arc::new(crm_infra::crypto::Crypto::new(&settings.keys)?);
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} rebuild {msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(name.clone());
            let report = rebuild::rebuild(
                &admin,
                &crypto,
                projection,
                &settings.database.app_role,
                |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
            )
            .await?;
            bar.finish();
            // The process's peak memory (Linux), which scripts/bench --scale follows as
            // the store grows.
            let peak = peak_rss_mib().map_or_else(String::new, |m| format!(", peak RSS {m} MiB"));
            println!(
                "rebuilt {name}: {} events in {:.2}s ({:.0} events/s){peak}",
                report.events,
                report.seconds,
                report.events as f64 / report.seconds.max(1e-9)
            );
        }
        Command::Admin { command } => admin(common, command).await?,
        Command::Audit {
            command: AuditCommand::Verify { org },
        } => {
            let admin = db::admin_pool(&common.database())?;
            let client = admin.get().await?;
            let report = verify::verify_chains(&client, org).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok() {
                bail!("{} broken link(s) in the hash chains", report.breaks.len());
            }
        }
        Command::Consent {
            command: ConsentCommand::Import { org, file },
        } => {
            use crm_infra::consent::import::{self as imports, Format};
            let data = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let format = match file.extension().and_then(|e| e.to_str()) {
                Some("jsonl" | "ndjson") => Format::JsonLines,
                _ => Format::Csv,
            };
            let rows = imports::read(format, &data)?;
            let settings = common.settings()?;
            let pool = db::app_pool(&settings.database)?;
            let crypto = std::sync::Arc::new(crm_infra::crypto::Crypto::new(&settings.keys)?);
            let executor = crm_infra::commands::executor::Executor::new(pool, crypto);
            let bar = ProgressBar::new(rows.len() as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} import [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
                )
                .expect("a valid template"),
            );
            let meta = EventMetadata::system(org, "import");
            let progress_bar = bar.clone();
            let report = imports::run(&executor, org, Uuid::now_v7(), rows, &meta, &move |done| {
                progress_bar.set_position(done as u64)
            })
            .await?;
            bar.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!(
                "import {}: {} of {} rows recorded, {} refused",
                report.import_id,
                report.recorded,
                report.rows,
                report.errors.len()
            );
        }
        Command::Retention {
            command: RetentionCommand::Sweep { now },
        } => {
            let state = startup::connect(&common.settings()?).await?;
            let now = now.unwrap_or_else(chrono::Utc::now);
            let swept = crm_infra::rights::retention::sweep(&state.executor, now, 1_000).await?;
            for (org, contact) in &swept.erased {
                println!("erased org={org} contact={contact}");
            }
            for (org, contact) in &swept.on_hold {
                println!("on_hold org={org} contact={contact}");
            }
            eprintln!(
                "retention sweep at {now}: {} erased, {} left under a legal hold",
                swept.erased.len(),
                swept.on_hold.len()
            );
        }
        Command::Receipts {
            command: ReceiptsCommand::RotateKey,
        } => {
            let settings = common.settings()?;
            let pool = db::app_pool(&settings.database)?;
            let crypto = std::sync::Arc::new(crm_infra::crypto::Crypto::new(&settings.keys)?);
            let kid = crm_infra::receipts::ReceiptSigner::new(pool, crypto)
                .rotate()
                .await?;
            println!("kid={kid}");
        }
    }
    Ok(())
}

fn unknown_projection(name: &str) -> String {
    let names: Vec<_> = read_models::all().iter().map(|p| p.name()).collect();
    format!("unknown projection `{name}`; known: {}", names.join(", "))
}

async fn admin(common: Common, command: AdminCommand) -> anyhow::Result<()> {
    let settings = common.settings()?;
    let state = startup::connect(&settings).await?;
    match command {
        AdminCommand::CreateOrg { name } => {
            let name = Name::parse(&name).map_err(|e| anyhow::anyhow!("--name {e}"))?;
            let org = accounts::create_organization(&state.executor, name).await?;
            println!("org_id={org}");
        }
        AdminCommand::CreateUser {
            org,
            email,
            name,
            role,
        } => {
            let email = Email::parse(&email).map_err(|e| anyhow::anyhow!("--email {e}"))?;
            let name = Name::parse(&name).map_err(|e| anyhow::anyhow!("--name {e}"))?;
            let role = RoleRef::parse(&role).with_context(|| {
                format!("--role `{role}` is neither a built-in role nor a custom role id")
            })?;
            let (password, generated) = match std::env::var("CRM_NEW_PASSWORD") {
                Ok(p) => (p, false),
                Err(_) => (generate_password(), true),
            };
            crate::auth::check_password_policy(&password)
                .map_err(|e| anyhow::anyhow!("password {e}"))?;
            let hash = crate::auth::hash_password(&password)?;
            let meta = EventMetadata::system(org, "operator");
            let new_user = accounts::NewUser {
                org_id: org,
                email: email.clone(),
                display_name: name,
                role,
                password_hash: hash,
            };
            let user = accounts::create_user(
                &state.executor,
                &state.pool,
                new_user,
                Grantor::operator(),
                &meta,
            )
            .await?;
            println!("user_id={user}");
            println!("email={email}");
            if generated {
                println!("password={password}");
            }
        }
        AdminCommand::Bootstrap { org_name, email } => {
            let client = state.pool.get().await?;
            if !accounts::store_is_empty(&client).await? {
                println!("already bootstrapped");
                return Ok(());
            }
            let name = Name::parse(&org_name).map_err(|e| anyhow::anyhow!("--org-name {e}"))?;
            let email = Email::parse(&email).map_err(|e| anyhow::anyhow!("--email {e}"))?;
            let org = accounts::create_organization(&state.executor, name).await?;
            let password = generate_password();
            let hash = crate::auth::hash_password(&password)?;
            let meta = EventMetadata::system(org, "bootstrap");
            let owner = accounts::NewUser {
                org_id: org,
                email: email.clone(),
                display_name: Name::parse("Owner").expect("static name"),
                role: RoleRef::Builtin(Role::Owner),
                password_hash: hash,
            };
            accounts::create_user(
                &state.executor,
                &state.pool,
                owner,
                Grantor::operator(),
                &meta,
            )
            .await?;
            println!("org_id={org}");
            println!("email={email}");
            println!("password={password}");
        }
    }
    Ok(())
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), in MiB; `None`
/// where there is no such file.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.div_ceil(1024))
}
