//! A per-process cache of [`Access`] (what a user may do), so that a request does not
//! pay a database round trip to learn it. Correctness comes first:
//!
//! - Every command that changes access state runs through [`execute_access_change`]:
//!   after the command's effect has written the access tables, the same transaction
//!   sends `NOTIFY crm_access, '<org id>'`. PostgreSQL delivers it when, and only if,
//!   that transaction commits, so no process hears of a change that rolled back, and
//!   no crash can land a change without its notification. Every process LISTENs and
//!   forgets that organisation's entries when a notification arrives (all of them if
//!   its listening connection drops).
//! - The cache is also the executor's post-commit hook ([`CommitHook`]): the process
//!   that ran a command on one of the [`ACCESS_AGGREGATES`] forgets the organisation's
//!   entries right after the commit, before it answers, so the process that handled a
//!   logout or a role change never serves the old access (it does not wait for its own
//!   notification to come back).
//! - Caching is only on while the listener is connected; a load that raced an
//!   invalidation is not stored (an epoch counter); entries expire after [`TTL`] anyway.
//!
//! Another process may serve an old entry for as long as a notification takes to
//! arrive (milliseconds).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use crm_domain::api_key::ApiKey;
use crm_domain::metadata::EventMetadata;
use crm_domain::organization::Organization;
use crm_domain::portal::PortalAccount;
use crm_domain::role::CustomRole;
use crm_domain::user::User;
use crm_domain::PersonalData;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::access::accounts::Access;
use crate::commands::executor::{self, CommandError, CommandOutcome, Effect, Executor};
use crate::commands::hooks::{CommitHook, Committed};
use crate::db::Heard;
use crate::store::event_store::StoreError;

pub const ACCESS_CHANNEL: &str = "crm_access";
/// The aggregates whose commands change access state: every command on them runs
/// through [`execute_access_change`], and a commit on them empties this process's
/// entries of the organisation.
pub const ACCESS_AGGREGATES: [&str; 5] = [
    Organization::TYPE,
    User::TYPE,
    CustomRole::TYPE,
    ApiKey::TYPE,
    PortalAccount::TYPE,
];
/// The longest an entry is used.
pub const TTL: Duration = Duration::from_secs(10);

/// (user, organisation) → the access and when it was loaded.
type Entries = HashMap<(Uuid, Uuid), (Arc<Access>, Instant)>;

#[derive(Default)]
pub struct AccessCache {
    entries: Mutex<Entries>,
    epoch: AtomicU64,
    live: AtomicBool,
    /// How often everything was forgotten ([`Self::invalidate`]).
    resets: AtomicU64,
    /// How often each organisation's entries were forgotten (an access change there).
    org_changes: Mutex<HashMap<Uuid, u64>>,
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

    /// A number that changes whenever this process hears of an access change in
    /// `org_id` (or forgets everything): what a long-lived holder of an access (a live
    /// stream) compares to know it must check it again. Other organisations' changes
    /// leave it alone. It takes a lock: a frequent caller reads it only once
    /// [`Self::epoch`] (any change anywhere, one atomic load) moved.
    pub fn changes(&self, org_id: Uuid) -> u64 {
        let own = self
            .org_changes
            .lock()
            .map_or(0, |m| m.get(&org_id).copied().unwrap_or(0));
        // Both only grow: any change of either changes the sum.
        self.resets.load(Ordering::Acquire).wrapping_add(own)
    }

    /// Forgets everything.
    pub fn invalidate(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            // The count first, then the epoch: who sees the new epoch sees the count.
            self.resets.fetch_add(1, Ordering::AcqRel);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            entries.clear();
        }
    }

    /// Forgets one organisation's entries (an access change there). The epoch moves on
    /// for every organisation: a load racing with any change is not stored, which is
    /// merely conservative.
    pub fn invalidate_org(&self, org_id: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            // The count first, then the epoch: who sees the new epoch sees the count.
            if let Ok(mut changes) = self.org_changes.lock() {
                *changes.entry(org_id).or_default() += 1;
            }
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
        let me = self.clone();
        let on = Arc::new(move |heard: Heard<'_>| match heard {
            Heard::Live(live) => me.set_live(live),
            Heard::Notification { payload, .. } => match payload.parse::<Uuid>() {
                Ok(org_id) => me.invalidate_org(org_id),
                Err(_) => me.invalidate(),
            },
        });
        crate::db::listen(pg, &[ACCESS_CHANNEL], "access cache", on, shutdown).await;
        self.set_live(false);
    }
}

impl CommitHook for AccessCache {
    /// Right after the commit, before the executor returns: this process never serves
    /// the access a command of its own changed.
    fn committed(&self, commit: &Committed<'_>) {
        if ACCESS_AGGREGATES.contains(&commit.aggregate_type) {
            self.invalidate_org(commit.org_id);
        }
    }
}

/// Runs a command that changes access state: [`Executor::execute_with`], whose
/// transaction, after `effect` has written the access tables, also sends
/// `NOTIFY crm_access, '<org id>'` (delivered with the commit, never without it).
pub(super) async fn execute_access_change<A>(
    executor: &Executor,
    org_id: Uuid,
    id: &str,
    command: A::Command,
    metadata: &EventMetadata,
    expected_version: Option<i64>,
    effect: Effect<'_, A::Event, A::Error>,
) -> Result<CommandOutcome, CommandError<A::Error>>
where
    A: Aggregate<Services = ()>,
    A::Event: PersonalData,
    A::Error: 'static,
{
    debug_assert!(
        ACCESS_AGGREGATES.contains(&A::TYPE),
        "{} changes access but is not in ACCESS_AGGREGATES",
        A::TYPE
    );
    let and_notify = executor::effect(move |tx, events: &[A::Event]| {
        let changed = effect(tx, events);
        async move {
            changed.await?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&ACCESS_CHANNEL, &org_id.to_string()],
            )
            .await
            .map_err(|e| CommandError::from(StoreError::from(e)))?;
            Ok(())
        }
        .boxed()
    });
    executor
        .execute_with::<A>(org_id, id, command, metadata, expected_version, &and_notify)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_organisations_change_count_moves_with_its_own_changes_and_resets_only() {
        let cache = AccessCache::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let start = cache.changes(a);
        cache.invalidate_org(b);
        assert_eq!(cache.changes(a), start, "another organisation's change");
        cache.invalidate_org(a);
        let (after_own, b_before) = (cache.changes(a), cache.changes(b));
        assert_ne!(after_own, start);
        cache.invalidate();
        assert_ne!(cache.changes(a), after_own, "everything forgotten");
        assert_ne!(
            cache.changes(b),
            b_before,
            "a reset moves every organisation's count"
        );
    }
}
