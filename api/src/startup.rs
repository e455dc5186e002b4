//! Process wiring: build the application, run it until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use crm_infra::access::cache::AccessCache;
use crm_infra::commands::executor::Executor;
use crm_infra::crypto::Crypto;
use crm_infra::dispatch::carriers::Carriers;
use crm_infra::dispatch::worker::{Dispatcher, UnsubscribeLinks};
use crm_infra::feed::bus::Bus;
use crm_infra::feed::projector::{Projection, ProjectorWorker};
use crm_infra::feed::relay::Relay;
use crm_infra::webhooks::endpoints::EndpointRow;
use crm_infra::webhooks::net::WebhookClient;
use crm_infra::webhooks::worker::{Clock, Deliverer, DisabledNotice, SystemClock};
use crm_infra::{db, read_models};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;
use crate::config::Settings;
use crate::state::AppState;

/// A built, bound application: the API, and the relay and projectors it runs in-process.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    background: Vec<Background>,
}

/// A worker that runs beside the API.
pub enum Background {
    Relay(Box<Relay>),
    Projector(Box<ProjectorWorker>),
    Dispatcher(Box<Dispatcher>),
    Deliverer(Box<crm_infra::webhooks::worker::Deliverer>),
    /// Forgets cached data keys when another process destroys some (an erasure).
    KeyListener(Arc<Crypto>, Box<tokio_postgres::Config>),
}

/// The listener that keeps this process's cached data keys in step with erasures
/// elsewhere: every process that decrypts (projectors, the dispatcher) runs one.
pub fn key_listener(state: &AppState) -> anyhow::Result<Background> {
    Ok(Background::KeyListener(
        state.crypto.clone(),
        Box::new(db::app_config(&state.settings.database)?),
    ))
}

/// Connections and services every process of the service needs.
pub async fn connect(settings: &Settings) -> anyhow::Result<AppState> {
    let pool = db::app_pool(&settings.database).context("database settings")?;
    let _probe = pool
        .get()
        .await
        .context("cannot connect to PostgreSQL (is DATABASE_URL right, and `crm migrate` done?)")?;
    let crypto = Arc::new(Crypto::new(&settings.keys).context("CRM_KEK")?);
    let bus = Bus::connect(&settings.nats).await?;
    let tokens = Arc::new(Tokens::new(&settings.jwt).map_err(anyhow::Error::msg)?);
    // Compute the dummy bcrypt hash now, so that the first login for an unknown email
    // does not take longer than one for a known email.
    tokio::task::spawn_blocking(crate::auth::dummy_hash).await?;
    let rate_limits = crate::edge::ratelimit::RateLimits::new(settings.http.rate_limits);
    let access_cache = AccessCache::new();
    let carriers = Arc::new(Carriers::new(
        pool.clone(),
        crypto.clone(),
        settings.mail.carrier_defaults(),
    ));
    Ok(AppState::new(crate::state::Services {
        executor: Executor::new(pool.clone(), crypto.clone())
            .with_hook(access_cache.clone())
            .with_hook(carriers.commit_hook()),
        carriers,
        access_cache,
        receipts: crm_infra::receipts::ReceiptSigner::new(pool.clone(), crypto.clone()),
        gate: crm_infra::consent::state::GateReader::spawn(pool.clone(), crypto.clone()),
        live: crm_infra::live::Hub::new(settings.live, bus.clone(), pool.clone(), crypto.clone()),
        pool,
        crypto,
        bus,
        tokens,
        rate_limits,
        mailer: crate::mail::Mailer::new(settings.mail.spool_dir.clone()),
        settings: Arc::new(settings.clone()),
    }))
}

pub fn relay(state: &AppState) -> anyhow::Result<Relay> {
    Ok(Relay {
        name: "main".into(),
        pg: db::app_config(&state.settings.database)?,
        pool: state.pool.clone(),
        bus: state.bus.clone(),
        local_wake: Some(state.executor.appended()),
    })
}

/// The dispatcher: sends queued messages, with one-click unsubscribe links signed by
/// this process's token key.
pub fn dispatcher(state: &AppState) -> Dispatcher {
    let s = state.clone();
    let base = state.settings.mail.link_base.clone();
    let links: UnsubscribeLinks =
        Arc::new(move |org_id, contact_id, channel, purpose, message_id| {
            let link = crate::auth::UnsubscribeLink {
                org_id,
                contact_id,
                channel,
                purpose: purpose.clone(),
                message_id,
            };
            let token = s.tokens.issue_unsubscribe(&link).ok()?;
            Some(format!("{base}/v1/public/unsubscribe?token={token}"))
        });
    Dispatcher {
        executor: state.executor.clone(),
        gate: state.gate.clone(),
        bus: state.bus.clone(),
        carriers: state.carriers.clone(),
        links,
        ack_wait: Dispatcher::DEFAULT_ACK_WAIT,
    }
}

/// The webhook delivery worker, with the system clock; an endpoint it disables is
/// mailed to its organisation's Owners and Admins.
pub fn deliverer(state: &AppState) -> anyhow::Result<Deliverer> {
    deliverer_with_clock(state, Arc::new(SystemClock))
}

pub fn deliverer_with_clock(state: &AppState, clock: Arc<dyn Clock>) -> anyhow::Result<Deliverer> {
    let settings = &state.settings.webhooks;
    let client = WebhookClient::new(
        settings.allow_nets.clone(),
        settings.delivery.attempt_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    let s = state.clone();
    let notice: DisabledNotice = Arc::new(move |row| {
        let s = s.clone();
        Box::pin(async move {
            if let Err(e) = mail_admins_disabled(&s, &row).await {
                tracing::warn!(error = %e, "the admins were not told of a disabled webhook endpoint");
            }
        })
    });
    Ok(Deliverer::new(
        state.executor.clone(),
        state.bus.clone(),
        client,
        settings.delivery.clone(),
        clock,
        Some(notice),
    ))
}

/// Mails every active Owner and Admin of the endpoint's organisation that it was
/// disabled, and how to turn it on again.
async fn mail_admins_disabled(state: &AppState, row: &EndpointRow) -> anyhow::Result<()> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT email_lower FROM credentials \
             WHERE org_id = $1 AND active AND role IN ('owner', 'admin')",
            &[&row.org_id],
        )
        .await?;
    for r in rows {
        state.mailer.send(crate::mail::Mail {
            to: r.get(0),
            subject: "A webhook endpoint was disabled".into(),
            body: format!(
                "The webhook endpoint {id} ({url}) failed {n} times in a row since {since} and \
                 was disabled. Nothing more is sent to it; what it misses is kept.\n\n\
                 When the receiver works again: POST /v1/webhooks/{id}/enable, then \
                 POST /v1/webhooks/{id}/replay with {{\"since\": \"<time>\"}} to send what \
                 it missed. Its delivery log: GET /v1/webhooks/{id}/messages.\n",
                id = row.id,
                url = row.url,
                n = row.consecutive_failures,
                since = row
                    .failing_since
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
            ),
        });
    }
    Ok(())
}

pub fn projector(state: &AppState, projection: Arc<dyn Projection>) -> ProjectorWorker {
    projectors(state, vec![projection])
}

/// One worker for several projections: one consumer and one transaction per batch.
pub fn projectors(state: &AppState, projections: Vec<Arc<dyn Projection>>) -> ProjectorWorker {
    ProjectorWorker::new(
        state.pool.clone(),
        state.crypto.clone(),
        state.bus.clone(),
        projections,
    )
}

/// Runs background workers until `shutdown`, then waits for them to finish.
pub async fn run_background(workers: Vec<Background>, shutdown: CancellationToken) {
    let mut handles = Vec::new();
    for w in workers {
        let token = shutdown.clone();
        handles.push(tokio::spawn(async move {
            match w {
                Background::Relay(r) => r.run(token).await,
                Background::Projector(p) => p.run(token).await,
                Background::Dispatcher(d) => d.run(token).await,
                Background::Deliverer(d) => d.run(token).await,
                Background::KeyListener(crypto, pg) => crypto.listen(*pg, token).await,
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let state = connect(&settings).await?;
        let mut background = Vec::new();
        if settings.run_relay {
            background.push(Background::Relay(Box::new(relay(&state)?)));
        }
        if settings.run_projectors {
            background.push(Background::Projector(Box::new(projectors(
                &state,
                read_models::all(),
            ))));
        }
        if settings.run_dispatcher {
            background.push(Background::Dispatcher(Box::new(dispatcher(&state))));
        }
        if settings.run_deliverer {
            background.push(Background::Deliverer(Box::new(deliverer(&state)?)));
        }
        let listener = TcpListener::bind(settings.http.bind)
            .await
            .with_context(|| format!("cannot listen on {}", settings.http.bind))?;
        Ok(Self {
            listener,
            state,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves; then stops accepting, finishes in-flight
    /// requests and stops the workers (each finishes its current batch).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let token = CancellationToken::new();
        let workers = tokio::spawn(run_background(self.background, token.clone()));
        // Every minute: the limiters forget idle clients (their memory stays bounded),
        // and mailed tokens and double opt-in confirmations expired a day ago are
        // deleted.
        let (limits, pool, forget_token) = (
            self.state.rate_limits.clone(),
            self.state.pool.clone(),
            token.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = forget_token.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {
                        limits.forget_idle();
                        if let Ok(client) = pool.get().await {
                            if let Err(e) = crm_infra::access::auth_tokens::purge(&client).await {
                                tracing::warn!(error = %crm_infra::db::describe(&e), "expired link tokens not purged");
                            }
                            if let Err(e) = crm_infra::consent::ledger::purge_expired(&client).await {
                                tracing::warn!(error = %crm_infra::db::describe(&e), "expired consent confirmations not purged");
                            }
                        }
                    }
                }
            }
        });
        // AI actions: expiries nobody asked about are recorded, runs cut short finished.
        let (sweep_state, sweep_token) = (self.state.clone(), token.clone());
        let every = self.state.settings.ai_sweep_interval;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sweep_token.cancelled() => break,
                    _ = tokio::time::sleep(every) => {
                        match crate::routes::ai::sweep(&sweep_state).await {
                            Ok(swept) if swept != Default::default() => {
                                tracing::info!(expired = swept.expired, run = swept.run, "AI actions swept");
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "AI sweep failed; retried at the next"),
                        }
                    }
                }
            }
        });
        // Retention: contacts past their period are erased (docs/rights.md).
        if let Some(every) = self.state.settings.retention_sweep_interval {
            let (state, token) = (self.state.clone(), token.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(every) => {
                            let now = chrono::Utc::now();
                            match crm_infra::rights::retention::sweep(&state.executor, now, 1_000).await {
                                Ok(s) if !s.erased.is_empty() => tracing::info!(
                                    erased = s.erased.len(),
                                    on_hold = s.on_hold.len(),
                                    "retention sweep"
                                ),
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "retention sweep failed; retried at the next"),
                            }
                        }
                    }
                }
            });
        }
        // Who may do what is cached while its invalidations can be heard.
        match db::app_config(&self.state.settings.database) {
            Ok(pg) => {
                let cache = self.state.access_cache.clone();
                tokio::spawn(cache.listen(pg.clone(), token.clone()));
                // And data keys while erasures elsewhere can be heard.
                tokio::spawn(self.state.crypto.clone().listen(pg, token.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "no access cache: database settings"),
        }
        // The live event stream's one consumer; its streams end when it stops.
        tokio::spawn(self.state.live.clone().run(token.clone()));
        let routes = crate::routes::routes(self.state.clone());
        let server_token = token.clone();
        let server = crate::edge::server::serve(
            self.listener,
            routes,
            crate::mcp::Endpoint::new(self.state.clone()),
            self.state.settings.http.timeouts,
            async move { server_token.cancelled().await },
        );
        tokio::pin!(server);
        tokio::select! {
            _ = &mut server => {},
            _ = shutdown => {
                token.cancel();
                server.await;
            }
        }
        token.cancel();
        let _ = workers.await;
    }
}
