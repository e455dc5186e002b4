//! The hub: one JetStream consumer per process, a ring of recent catalogue events, and
//! the subscribers of each organisation with their bounded buffers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::crypto::Crypto;
use crate::feed::bus::{self, Bus};
use crate::live::event::LiveEvent;
use crate::live::LiveSettings;
use crate::live::LIVE_METRICS as METRICS;
use crate::store::event_store::{CommitKey, RawEvent};

/// Why a subscription ended (what the client is told in its final `cutoff` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// Its buffer was full: it read slower than events arrived.
    SlowConsumer,
    /// The hub's consumer failed and started again: what it missed is in the store.
    Restarted,
    /// The server is shutting down.
    Shutdown,
}

impl CutReason {
    pub fn code(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow_consumer",
            Self::Restarted => "feed_restarted",
            Self::Shutdown => "server_shutdown",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::SlowConsumer => 1,
            Self::Restarted => 2,
            Self::Shutdown => 3,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::SlowConsumer),
            2 => Some(Self::Restarted),
            3 => Some(Self::Shutdown),
            _ => None,
        }
    }
}

/// What the ring is known to hold, besides its own events.
#[derive(Debug, Clone, Copy)]
enum Floor {
    /// No consumer yet (or it failed): the ring proves nothing.
    NotRunning,
    /// Everything published after this moment (the consumer's start) reached the ring.
    Since(Instant),
    /// Everything after this commit key (the last event evicted) is in the ring.
    After(CommitKey),
}

struct Sub {
    id: u64,
    tx: mpsc::Sender<Arc<LiveEvent>>,
    cut: Arc<AtomicU8>,
}

struct State {
    ring: VecDeque<Arc<LiveEvent>>,
    floor: Floor,
    /// The last commit key received (a republished duplicate is dropped).
    last: CommitKey,
    subs: HashMap<Uuid, Vec<Sub>>,
    open: HashMap<Uuid, usize>,
    /// Open streams that follow the feed (`follow=true`): while there are none, for
    /// [`LiveSettings::idle_stop`], the hub reads nothing.
    following: usize,
    /// Since when no stream follows (`None` while one does).
    idle_since: Option<Instant>,
    next_id: u64,
    stopped: bool,
}

/// The live stream's hub (see the module docs of [`crate::live`]).
pub struct Hub {
    state: Mutex<State>,
    pub settings: LiveSettings,
    pub crypto: Arc<Crypto>,
    pub pool: deadpool_postgres::Pool,
    bus: Bus,
    closing: CancellationToken,
    /// Told when a stream that follows the feed opens (the consumer is wanted).
    demand: Notify,
    /// Told when the consumer starts (streams waiting for the live tail try again).
    started: Notify,
}

/// One open stream counted against its organisation's limit; released when dropped.
pub struct Permit {
    hub: Weak<Hub>,
    org: Uuid,
    follows: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            let mut st = hub.lock();
            if let Some(n) = st.open.get_mut(&self.org) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.open.remove(&self.org);
                }
            }
            if self.follows {
                st.following = st.following.saturating_sub(1);
                if st.following == 0 {
                    st.idle_since = Some(Instant::now());
                }
            }
        }
        METRICS.connections.dec();
    }
}

/// A connection's place in the fan-out; removed when dropped.
pub struct Subscription {
    hub: Weak<Hub>,
    org: Uuid,
    id: u64,
    rx: mpsc::Receiver<Arc<LiveEvent>>,
    cut: Arc<AtomicU8>,
}

impl Subscription {
    /// The next event, or why the subscription ended.
    pub async fn next(&mut self) -> Result<Arc<LiveEvent>, CutReason> {
        match self.rx.recv().await {
            Some(e) => Ok(e),
            None => {
                Err(CutReason::from_u8(self.cut.load(Ordering::Acquire))
                    .unwrap_or(CutReason::Shutdown))
            }
        }
    }
}

impl Subscription {
    /// An event already waiting, if any (without waiting).
    pub fn try_next(&mut self) -> Option<Arc<LiveEvent>> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            let mut st = hub.lock();
            if let Some(subs) = st.subs.get_mut(&self.org) {
                subs.retain(|s| s.id != self.id);
                if subs.is_empty() {
                    st.subs.remove(&self.org);
                }
            }
        }
    }
}

/// Why a consumer session ended without failing.
enum Ended {
    Stop,
    /// Nobody followed the feed for `idle_stop`.
    Idle,
}

/// The answer to [`Hub::join`].
pub enum Join {
    /// Subscribed: first `replay` (the ring's events after the resume key), then the
    /// subscription.
    Live {
        replay: Vec<Arc<LiveEvent>>,
        subscription: Subscription,
    },
    /// The ring does not prove it holds everything after the key: read the store
    /// (starting the read after noting the time) and ask again.
    ReadStore,
}

impl Hub {
    pub fn new(
        settings: LiveSettings,
        bus: Bus,
        pool: deadpool_postgres::Pool,
        crypto: Arc<Crypto>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                ring: VecDeque::new(),
                floor: Floor::NotRunning,
                last: CommitKey::default(),
                subs: HashMap::new(),
                open: HashMap::new(),
                following: 0,
                idle_since: Some(Instant::now()),
                next_id: 0,
                stopped: false,
            }),
            settings,
            crypto,
            pool,
            bus,
            closing: CancellationToken::new(),
            demand: Notify::new(),
            started: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("live hub lock")
    }

    /// Cancelled when the hub stops (the server is shutting down): streams end.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Counts a new stream of `org`; `None` when the organisation has its
    /// `max_per_org` open already. A stream that `follows` the feed starts the hub's
    /// consumer if it is not running (see [`Hub::run`]).
    pub fn admit(self: &Arc<Self>, org: Uuid, follows: bool) -> Option<Permit> {
        let mut st = self.lock();
        let n = st.open.entry(org).or_default();
        if *n >= self.settings.max_per_org {
            return None;
        }
        *n += 1;
        if follows {
            st.following += 1;
            st.idle_since = None;
            self.demand.notify_one();
        }
        METRICS.connections.inc();
        Some(Permit {
            hub: Arc::downgrade(self),
            org,
            follows,
        })
    }

    /// Resolves when the consumer has (re)started, or at once if it runs.
    pub async fn running(&self) {
        let started = self.started.notified();
        tokio::pin!(started);
        started.as_mut().enable();
        if self.is_running() {
            return;
        }
        started.await;
    }

    /// Subscribes a connection of `org` that has delivered everything up to `after`
    /// (`None`: a new client, live events only). `store_read_started`: when the
    /// connection's last store read began, if it made one.
    pub fn join(
        self: &Arc<Self>,
        org: Uuid,
        after: Option<CommitKey>,
        store_read_started: Option<Instant>,
    ) -> Join {
        let mut st = self.lock();
        let replay = match after {
            None => Vec::new(),
            Some(key) => {
                let covered = st.ring.front().is_some_and(|e| key >= e.key)
                    || match st.floor {
                        Floor::NotRunning => false,
                        Floor::After(floor) => key >= floor,
                        Floor::Since(t) => store_read_started.is_some_and(|r| r > t),
                    };
                if !covered || st.stopped {
                    return Join::ReadStore;
                }
                st.ring
                    .iter()
                    .filter(|e| e.org_id == org && e.key > key)
                    .cloned()
                    .collect()
            }
        };
        let (tx, rx) = mpsc::channel(self.settings.buffer_events.max(1));
        let cut = Arc::new(AtomicU8::new(0));
        st.next_id += 1;
        let id = st.next_id;
        if st.stopped {
            cut.store(CutReason::Shutdown.to_u8(), Ordering::Release);
            drop(tx);
        } else {
            st.subs.entry(org).or_default().push(Sub {
                id,
                tx,
                cut: cut.clone(),
            });
        }
        Join::Live {
            replay,
            subscription: Subscription {
                hub: Arc::downgrade(self),
                org,
                id,
                rx,
                cut,
            },
        }
    }

    /// Whether the consumer is running (a resume can join the live tail).
    pub fn is_running(&self) -> bool {
        !matches!(self.lock().floor, Floor::NotRunning)
    }

    /// Ends every subscription with `reason` (each drains what it has, then is told).
    fn cut_all(st: &mut State, reason: CutReason) {
        for (_, subs) in st.subs.drain() {
            for s in subs {
                s.cut.store(reason.to_u8(), Ordering::Release);
            }
        }
    }

    /// Takes one event from the feed: into the ring, then to each subscriber of its
    /// organisation without waiting (a full buffer cuts that subscriber off).
    fn ingest(&self, raw: RawEvent) {
        let mut st = self.lock();
        let key = raw.commit_key();
        if key <= st.last {
            return; // a republished event JetStream's window did not drop
        }
        st.last = key;
        let Some(event) = LiveEvent::new(raw) else {
            return;
        };
        let event = Arc::new(event);
        st.ring.push_back(event.clone());
        while st.ring.len() > self.settings.ring_events.max(1) {
            if let Some(old) = st.ring.pop_front() {
                st.floor = Floor::After(old.key);
            }
        }
        let org = event.org_id;
        let mut emptied = false;
        if let Some(subs) = st.subs.get_mut(&org) {
            subs.retain(|s| match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.cut
                        .store(CutReason::SlowConsumer.to_u8(), Ordering::Release);
                    METRICS.cutoffs.inc();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            emptied = subs.is_empty();
        }
        if emptied {
            st.subs.remove(&org);
        }
    }

    /// Consumes the events stream while any stream follows it, until `stop`; then ends
    /// every stream. With nobody following for [`LiveSettings::idle_stop`] the consumer
    /// is dropped (a process without live clients pays nothing per event) and the ring
    /// emptied; the next following stream starts it again, and reads the store until
    /// the ring covers it (as any resume older than the ring does).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            // Wait for a following stream.
            let wanted = self.demand.notified();
            tokio::pin!(wanted);
            wanted.as_mut().enable();
            if self.lock().following == 0 {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = wanted => {}
                }
                continue;
            }
            match self.session(&stop).await {
                Ok(Ended::Stop) => break,
                Ok(Ended::Idle) => {
                    failures = 0;
                    METRICS.consuming.set(0);
                    tracing::info!("live hub: no stream follows the feed; consumer stopped");
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "live hub: feed consumer ended; restarting");
                    {
                        let mut st = self.lock();
                        st.floor = Floor::NotRunning;
                        st.ring.clear();
                        Self::cut_all(&mut st, CutReason::Restarted);
                    }
                    METRICS.consuming.set(0);
                    let wait = Duration::from_millis(200 * u64::from(failures.min(10)));
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let mut st = self.lock();
        st.stopped = true;
        st.floor = Floor::NotRunning;
        Self::cut_all(&mut st, CutReason::Shutdown);
        drop(st);
        METRICS.consuming.set(0);
        self.closing.cancel();
        self.started.notify_waiters();
        tracing::info!("live hub stopped");
    }

    /// If no stream has followed the feed for `idle_stop`: marks the hub as not
    /// running and empties the ring, in the same critical section as the check, so a
    /// stream admitted meanwhile either keeps the consumer running or finds the hub
    /// not running (and reads the store); `true` then.
    fn stop_if_idle(&self) -> bool {
        let mut st = self.lock();
        let idle = st.following == 0
            && st
                .idle_since
                .is_some_and(|t| t.elapsed() >= self.settings.idle_stop);
        if idle {
            st.floor = Floor::NotRunning;
            st.ring.clear();
        }
        idle
    }

    async fn session(&self, stop: &CancellationToken) -> Result<Ended, String> {
        let stream = self
            .bus
            .jetstream
            .get_stream(&self.bus.settings.stream)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                name: None,
                deliver_policy: DeliverPolicy::New,
                description: Some("crm live event stream".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        {
            // Everything published from now on reaches the ring (DeliverPolicy::New).
            let mut st = self.lock();
            st.ring.clear();
            st.floor = Floor::Since(Instant::now());
        }
        METRICS.consuming.set(1);
        self.started.notify_waiters();
        tracing::info!("live hub: consuming the feed");
        let every = self
            .settings
            .idle_stop
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut idle_check = tokio::time::interval(every);
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Ok(Ended::Stop),
                _ = idle_check.tick() => {
                    if self.stop_if_idle() {
                        return Ok(Ended::Idle);
                    }
                    continue;
                }
                m = messages.next() => m,
            };
            let Some(msg) = msg else {
                return Err("the ordered consumer ended".into());
            };
            let msg = msg.map_err(|e| e.to_string())?;
            match bus::events_of(&msg.payload) {
                Ok(group) => group.into_iter().for_each(|raw| self.ingest(raw)),
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "live hub: unreadable feed message skipped")
                }
            }
        }
    }
}
