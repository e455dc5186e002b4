//! A per-process cache of [`Access`] (what a user may do), so that a request does not
//! pay a database round trip to learn it. Correctness comes first:
//!
//! - Every command that changes access state runs through `Executor::execute_with`,
//!   whose effects `NOTIFY crm_access, '<org id>'` in the same transaction; every process
//!   LISTENs and forgets that organisation's entries when a notification arrives (all
//!   of them if its listening connection drops). The executor also forgets them in its
//!   own process right after such a commit, before it answers, so the process that
//!   handled a logout or a role change never serves the old access.
//! - Caching is only on while the listener is connected; a load that raced an
//!   invalidation is not stored (an epoch counter); entries expire after [`TTL`] anyway.
//!
//! Another process may serve an old entry for as long as a notification takes to
//! arrive (milliseconds).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::access::accounts::Access;

pub const ACCESS_CHANNEL: &str = "crm_access";
/// The longest an entry is used.
pub const TTL: Duration = Duration::from_secs(10);

/// (user, organisation) → the access and when it was loaded.
type Entries = HashMap<(Uuid, Uuid), (Arc<Access>, Instant)>;

#[derive(Default)]
pub struct AccessCache {
    entries: Mutex<Entries>,
    epoch: AtomicU64,
    live: AtomicBool,
}

impl AccessCache {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn get(&self, user_id: Uuid, org_id: Uuid) -> Option<Arc<Access>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.lock().ok()?;
        entries
            .get(&(user_id, org_id))
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(a, _)| a.clone())
    }

    /// The epoch to hand to [`Self::put`] for a load that starts now.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Stores a loaded access, unless an invalidation happened since `epoch`.
    pub fn put(&self, access: &Arc<Access>, epoch: u64) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            // Checked under the lock that `invalidate` takes too.
            if self.epoch.load(Ordering::Acquire) == epoch {
                entries.insert(
                    (access.user_id, access.org_id),
                    (access.clone(), Instant::now()),
                );
            }
        }
    }

    /// Forgets everything.
    pub fn invalidate(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            entries.clear();
        }
    }

    /// Forgets one organisation's entries (an access change there). The epoch moves on
    /// for every organisation: a load racing with any change is not stored, which is
    /// merely conservative.
    pub fn invalidate_org(&self, org_id: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            entries.retain(|(_, org), _| *org != org_id);
        }
    }

    /// Turns caching on with no listener: only for tests of what the executor itself
    /// invalidates (in a service, entries would then never hear of other processes'
    /// changes).
    #[doc(hidden)]
    pub fn live_without_listener_for_tests(&self) {
        self.set_live(true);
    }

    fn set_live(&self, live: bool) {
        self.invalidate();
        self.live.store(live, Ordering::Release);
    }

    /// LISTENs for access changes until `shutdown`, reconnecting after errors; the cache
    /// is used only while this listens.
    pub async fn listen(self: Arc<Self>, pg: tokio_postgres::Config, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.clone().session(&pg, &shutdown).await {
                tracing::warn!(error = %crate::db::describe(&e), "access cache listener lost; caching off");
            }
            self.set_live(false);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        self.set_live(false);
    }

    async fn session(
        self: Arc<Self>,
        pg: &tokio_postgres::Config,
        shutdown: &CancellationToken,
    ) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = pg.connect(NoTls).await?;
        let (lost_tx, lost) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = messages.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(n)) => match n.payload().parse::<Uuid>() {
                        Ok(org_id) => me.invalidate_org(org_id),
                        Err(_) => me.invalidate(),
                    },
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            me.set_live(false);
            let _ = lost_tx.send(());
        });
        client
            .batch_execute(&format!("LISTEN {ACCESS_CHANNEL}"))
            .await?;
        self.set_live(true);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = lost => {}
        }
        driver.abort();
        Ok(())
    }
}
