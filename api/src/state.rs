//! Shared state of the API's handlers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_infra::access::cache::AccessCache;
use crm_infra::commands::executor::Executor;
use crm_infra::crypto::Crypto;
use crm_infra::feed::bus::Bus;
use crm_infra::feed::projector;
use deadpool_postgres::Pool;

use crate::auth::Tokens;
use crate::config::Settings;
use crate::error::ApiError;

/// Cheap to clone (one `Arc`): warp filters clone it for every request.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

pub struct Services {
    pub pool: Pool,
    pub executor: Executor,
    /// Who may do what, cached; emptied by the executor's post-commit hook.
    pub access_cache: Arc<AccessCache>,
    pub crypto: Arc<Crypto>,
    pub bus: Bus,
    pub tokens: Arc<Tokens>,
    pub settings: Arc<Settings>,
    pub rate_limits: crate::edge::ratelimit::RateLimits,
    pub mailer: crate::mail::Mailer,
    /// The carriers messages leave through (cached; see `crm_infra::dispatch`).
    pub carriers: Arc<crm_infra::dispatch::carriers::Carriers>,
    /// Signs consent receipts; publishes their keys (`/.well-known/jwks.json`).
    pub receipts: crm_infra::receipts::ReceiptSigner,
    /// The send gate's one read path (concurrent loads share a round trip).
    pub gate: crm_infra::consent::state::GateReader,
    /// The live event stream's hub (one consumer, fanned out to every SSE client).
    pub live: Arc<crm_infra::live::Hub>,
}

impl AppState {
    /// Read-your-writes: waits (bounded) until `projection` has applied the event at
    /// `position`, or says how far behind it is.
    pub async fn await_projection(
        &self,
        projection: &'static str,
        position: Option<i64>,
        wait: Option<Duration>,
    ) -> Result<(), ApiError> {
        let Some(position) = position else {
            return Ok(());
        };
        let max = self.settings.http.max_consistency_wait;
        let deadline = Instant::now() + wait.unwrap_or(max).min(max);
        let client = self.pool.get().await?;
        loop {
            match projector::progress(&client, projection, position).await? {
                None => {
                    return Err(ApiError::bad_request(
                        "unknown_position",
                        format!("no event has position {position}"),
                    ))
                }
                Some((true, _)) => return Ok(()),
                Some((false, behind)) => {
                    if Instant::now() >= deadline {
                        return Err(ApiError::NotCaughtUp {
                            projection,
                            position,
                            behind,
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
