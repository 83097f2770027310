//! The hub: channels, subscriptions, ordered durable publish and fan-out. No HTTP and no wire format here;
//! transports adapt it to the wire.
//!
//! Ordering and durability come from one place, the *sequencer* task. Every publish becomes a job on its
//! queue; the sequencer takes whatever jobs are waiting (group commit), appends them to the [`Log`] in one
//! transaction, and only then fans them out, in log order, and acknowledges them. So:
//! - an acknowledged publication is in the log (nothing acknowledged is ever lost);
//! - every subscriber sees publications in `seq` order;
//! - `dispatched` (the last fanned-out seq) is updated under the registry lock, which gives a subscriber that
//!   resumes an exact boundary: everything up to `registered_at` comes from the log, everything after from its
//!   outbox, with no gap and no duplicate.
//!
//! Each subscriber has a bounded outbox. Fan-out never waits: when an outbox is full the subscriber is
//! disconnected (its outbox is closed, and the connection is killed if the transport registered a kill
//! switch) and will resume from the log when it reconnects.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::access::{Identity, ReadFilter};
use crate::engine::{Engine, Feed, FeedEvent};
use crate::frame::Publication;
use crate::log::{LogError, Record};
use crate::presence::{LocalPresence, PresenceStore};
use crate::queue;
use crate::topic::Selector;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("too many connections (limit {0}); retry later or on another node")]
    TooManyConnections(usize),
    #[error("too many topics in one subscription: {given} given, at most {max} allowed")]
    TooManyTopics { given: usize, max: usize },
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    #[error("invalid id: {0}")]
    InvalidId(String),
    #[error("a publication needs at least one topic")]
    NoTopic,
    #[error("the hub is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Why a subscriber was disconnected by the hub; the label of `herald_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    SlowConsumer,
    TokenExpired,
    Shutdown,
    Server,
    /// A cluster engine lost publications for this node.
    EngineLost,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 5] = [
        DisconnectReason::SlowConsumer,
        DisconnectReason::TokenExpired,
        DisconnectReason::Shutdown,
        DisconnectReason::Server,
        DisconnectReason::EngineLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::Server => "server",
            DisconnectReason::EngineLost => "engine_lost",
        }
    }
}

/// How a client is connected; connections are counted per transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A Mercure SSE stream.
    Sse,
    /// A Centrifugo-protocol WebSocket.
    #[serde(rename = "websocket")]
    WebSocket,
}

/// What a connection is, where from and since when, for listings (the console). One small allocation per
/// connection, shared by its [`ConnectionGuard`], its subscriptions' specs and its registration by user;
/// nothing else of the connection grows for it.
#[derive(Debug)]
pub struct ConnMeta {
    counts: Arc<ConnCounts>,
    /// When the connection was counted (Unix milliseconds).
    pub opened_ms: i64,
    /// The peer's IP, IPv4 as IPv4-mapped IPv6: 17 bytes where an `Option<SocketAddr>` takes 32.
    ip: Option<Ipv6Addr>,
    port: u16,
    pub transport: Transport,
}

impl ConnMeta {
    /// The peer's address, when the server knew it (requests served by [`crate::Server`]).
    pub fn remote(&self) -> Option<SocketAddr> {
        let ip = self.ip?;
        let ip = match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

/// Open connections, in total and per transport: plain atomics, so they can be read back ([`Hub::stats`]).
#[derive(Debug, Default)]
struct ConnCounts {
    total: AtomicUsize,
    sse: AtomicUsize,
    websocket: AtomicUsize,
    /// Notified when the last connection ends (shutdown waits for it).
    none_left: tokio::sync::Notify,
}

impl ConnCounts {
    fn of(&self, t: Transport) -> &AtomicUsize {
        match t {
            Transport::Sse => &self.sse,
            Transport::WebSocket => &self.websocket,
        }
    }
}

/// Counters of what the hub did since it started, readable at any time (the `metrics` crate's counters
/// cannot be read back).
#[derive(Debug, Default)]
struct Counters {
    publications: AtomicU64,
    deliveries: AtomicU64,
    /// Indexed like [`DisconnectReason::ALL`].
    disconnects: [AtomicU64; 5],
}

/// A snapshot of the hub's state and counters, see [`Hub::stats`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HubStats {
    pub connections: usize,
    pub sse_connections: usize,
    pub websocket_connections: usize,
    pub subscriptions: usize,
    /// Channels (exact topics) with at least one subscriber.
    pub channels: usize,
    /// Publications committed since start.
    pub publications: u64,
    /// Publications queued to subscribers since start.
    pub deliveries: u64,
    /// Subscribers the hub disconnected since start, by reason.
    pub disconnects: BTreeMap<&'static str, u64>,
    /// The position of the last publication dispatched.
    pub last_seq: u64,
    pub uptime_ms: u64,
}

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Publications a subscriber may have queued before it is disconnected as too slow.
    pub outbox_capacity: usize,
    pub max_connections: usize,
    pub max_topics_per_subscription: usize,
    pub max_message_size: usize,
    /// Most publications committed in one transaction.
    pub max_batch: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            outbox_capacity: 1000,
            max_connections: 10_000,
            max_topics_per_subscription: 64,
            max_message_size: 64 * 1024,
            max_batch: 512,
        }
    }
}

/// What a publisher hands the hub.
#[derive(Debug, Clone, Default)]
pub struct NewPublication {
    /// Event id; when absent the log generates `#<epoch>-<seq>`. Must not start with `#` nor contain a line
    /// break.
    pub id: Option<String>,
    pub topics: Vec<String>,
    pub data: Bytes,
    pub private: bool,
    pub event_type: Option<String>,
    pub retry: Option<u64>,
    /// Publisher's `ClientInfo` as JSON, for client publications.
    pub info: Option<String>,
    /// Centrifugo publication tags.
    pub tags: BTreeMap<String, String>,
    /// Deliver to live subscribers without appending to the log (Centrifugo's `skip_history`): no
    /// position, no id, nothing to resume; it still takes its place in the publication order.
    pub skip_history: bool,
}

/// Who a client is, as presence and join/leave report it (Centrifugo `ClientInfo`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientInfo {
    pub client: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<serde_json::Value>,
}

/// What a subscription's outbox carries. `sub` says which subscription of the connection it is for.
#[derive(Debug, Clone)]
pub enum Delivery {
    Pub {
        sub: u64,
        publication: Arc<Publication>,
    },
    Join {
        sub: u64,
        channel: Arc<str>,
        info: Arc<ClientInfo>,
    },
    Leave {
        sub: u64,
        channel: Arc<str>,
        info: Arc<ClientInfo>,
    },
}

/// One per client connection, shared by all its subscriptions: where deliveries go, and how the hub ends
/// the connection when it cannot keep up.
#[derive(Clone)]
pub struct Outbox {
    /// Closed when the hub disconnects this client (slow consumer, shutdown): the receiver sees the end.
    tx: queue::Sender<Delivery>,
    /// Cancelled to kill the TCP connection when the transport is not being polled (a client that stopped
    /// reading an SSE stream). WebSocket tasks own their socket and need none.
    kill: Option<CancellationToken>,
}

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeSpec {
    pub selectors: Vec<Selector>,
    /// What this subscriber may read, decided by `access` (channel rules, private updates). The hub applies
    /// it to every publication it fans out; transports apply it to every record they read from the log.
    pub filter: ReadFilter,
    /// Stable identifier of the subscriber (an IRI), shared by all its subscriptions.
    pub subscriber: String,
    /// Opaque data attached by the token (`mercure.payload`), shown in subscription listings. Boxed: rare,
    /// and a `Value` would take 32 bytes of every subscription.
    pub payload: Option<Box<serde_json::Value>>,
    /// Receive join/leave deliveries for the (exact) channels subscribed.
    pub join_leave: bool,
    /// The connection this subscription belongs to (see [`ConnectionGuard::meta`]), for listings.
    pub conn: Option<Arc<ConnMeta>>,
    /// An operator watching (the console's tail): delivered to like any subscription, but not a reader of
    /// the channel. It is kept with the wildcard subscriptions whatever its selectors, so it is not
    /// counted as a channel's subscriber, does not make a user look connected (an inbox push is not
    /// skipped for it), and is marked in listings so the faces leave it out.
    pub observer: bool,
}

/// A live subscriber as the registry and the fan-out see it.
struct Sub {
    id: u64,
    spec: Arc<SubscribeSpec>,
    outbox: Outbox,
    /// Dedupe within one fan-out: a subscriber reachable through several topics gets a publication once.
    /// Counted in fan-outs, not seqs: a publication kept out of history has no seq.
    last_fanout: AtomicU64,
}

impl SubscribeSpec {
    /// A spec with only selectors, read as `who` with no channel rules (see [`ReadFilter::without_rules`]).
    pub fn new(selectors: Vec<Selector>, who: Arc<Identity>, subscriber: String) -> SubscribeSpec {
        SubscribeSpec {
            selectors,
            filter: ReadFilter::without_rules(who),
            subscriber,
            payload: None,
            join_leave: false,
            conn: None,
            observer: false,
        }
    }

    /// Whether this subscriber should receive `r`: selected, and readable by it. Used by the fan-out and by
    /// history replays alike, so live and history cannot disagree.
    pub fn wants(&self, r: &Record) -> bool {
        self.filter.admits(&self.selectors, r)
    }
}

#[derive(Default)]
struct Registry {
    /// Subscribers all of whose selectors are exact strings, indexed by those strings.
    exact: HashMap<Box<str>, HashMap<u64, Arc<Sub>>>,
    /// Subscribers with at least one `*` or template selector: checked on every publication.
    wild: HashMap<u64, Arc<Sub>>,
    all: HashMap<u64, Arc<Sub>>,
    /// Set by [`Hub::share_subscribers`]: which exact channels this node marks in the cluster's presence.
    shared: Option<SharedSubscribers>,
}

/// This node's mark in the cluster's presence store for each channel under `prefix` that has an exact
/// subscriber here. Kept by the registry itself, under its write lock, so a mark follows the first
/// subscriber in and the last one out in the order they happened, whichever path removed them.
struct SharedSubscribers {
    prefix: Box<str>,
    presence: Arc<dyn PresenceStore>,
    node: Arc<ClientInfo>,
}

impl SharedSubscribers {
    fn covers(&self, channel: &str) -> bool {
        channel.starts_with(&*self.prefix)
    }
}

/// The presence channel that holds the marks of the nodes with an exact subscriber of `channel`: a
/// reserved name, out of reach of both faces, and apart from the channel's own (client) presence.
fn subscribers_channel(channel: &str) -> String {
    format!("$subscribers:{channel}")
}

impl Registry {
    fn insert(&mut self, sub: Arc<Sub>) {
        let exact: Option<Vec<&str>> = match sub.spec.observer {
            true => None,
            false => sub.spec.selectors.iter().map(Selector::exact).collect(),
        };
        match exact {
            Some(topics) => {
                for t in topics {
                    let set = self.exact.entry(t.into()).or_default();
                    set.insert(sub.id, sub.clone());
                    if let Some(sh) = self.shared.as_ref().filter(|sh| sh.covers(t)) {
                        if set.len() == 1 {
                            sh.presence.add(&subscribers_channel(t), sh.node.clone());
                        }
                    }
                }
            }
            None => {
                self.wild.insert(sub.id, sub.clone());
            }
        }
        self.all.insert(sub.id, sub);
    }

    fn remove(&mut self, id: u64) -> Option<Arc<Sub>> {
        let sub = self.all.remove(&id)?;
        if self.wild.remove(&id).is_none() {
            for sel in &sub.spec.selectors {
                if let Some(t) = sel.exact() {
                    if let Some(set) = self.exact.get_mut(t) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.exact.remove(t);
                            if let Some(sh) = self.shared.as_ref().filter(|sh| sh.covers(t)) {
                                sh.presence.remove(&subscribers_channel(t), &sh.node.client);
                            }
                        }
                    }
                }
            }
        }
        Some(sub)
    }
}

struct Job {
    record: Record,
    skip_history: bool,
    ack: oneshot::Sender<Result<Arc<Publication>, HubError>>,
}

struct Inner {
    engine: Arc<dyn Engine>,
    opts: HubOptions,
    registry: RwLock<Registry>,
    dispatched: AtomicU64,
    /// Fan-outs so far: the dedupe mark of each.
    fanouts: AtomicU64,
    last_id: Mutex<Option<String>>,
    connections: Arc<ConnCounts>,
    counters: Counters,
    started: std::time::Instant,
    next_id: AtomicU64,
    shutdown: CancellationToken,
    sequencer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The engine has a feed: publications are dispatched from it, not after the append.
    clustered: bool,
    /// Who is in which channel: in memory for one node, the engine's store for a cluster.
    presence: Arc<dyn PresenceStore>,
    /// Where control messages for live connections are handed over (see [`Hub::on_control`]).
    control_sink: OnceLock<ControlSink>,
}

/// Cheap to clone; all clones share one hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    jobs: mpsc::Sender<Job>,
}

/// Returned by [`Hub::subscribe`]; unregisters on drop. Its publications with `seq > registered_at` arrive
/// in order in the connection's outbox, tagged with `id`.
pub struct Subscription {
    pub id: u64,
    /// Every publication with `seq <= registered_at` was dispatched before this subscription existed and
    /// must be read from the log.
    pub registered_at: u64,
    pub spec: Arc<SubscribeSpec>,
    inner: Arc<Inner>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.inner.registry.write().remove(self.id).is_some() {
            metrics::gauge!("herald_subscriptions").decrement(1.0);
        }
    }
}

/// A control message handler, see [`Hub::on_control`].
type ControlSink = Box<dyn Fn(&str, Option<&str>, &[u8]) + Send + Sync>;

/// A client's presence in a channel; dropping it is the leave. See [`Hub::join`].
pub struct PresenceGuard {
    inner: Arc<Inner>,
    /// Shared with the connection's own record of the subscription: no copy per guard.
    channel: Arc<str>,
    info: Arc<ClientInfo>,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        if let Some(info) = self.inner.presence.remove(&self.channel, &self.info.client) {
            announce(&self.inner, &self.channel, info, false);
        }
    }
}

/// Held by a transport for the life of one client connection; counts towards `max_connections`, and
/// in its transport's count.
pub struct ConnectionGuard {
    meta: Arc<ConnMeta>,
}

impl ConnectionGuard {
    /// What the connection is, to attach to its subscriptions and registrations.
    pub fn meta(&self) -> &Arc<ConnMeta> {
        &self.meta
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let counts = &self.meta.counts;
        counts
            .of(self.meta.transport)
            .fetch_sub(1, Ordering::AcqRel);
        if counts.total.fetch_sub(1, Ordering::AcqRel) == 1 {
            counts.none_left.notify_waiters();
        }
        metrics::gauge!("herald_connections").decrement(1.0);
    }
}

/// A subscription as listed by the subscriptions API.
#[derive(Debug, Clone)]
pub struct SubscriptionInfo {
    pub id: u64,
    pub subscriber: String,
    pub selectors: Vec<String>,
    pub payload: Option<serde_json::Value>,
    /// The subscriber's connection, when its transport said (see [`SubscribeSpec::conn`]).
    pub conn: Option<Arc<ConnMeta>>,
    /// An operator's tail (see [`SubscribeSpec::observer`]): not listed to clients.
    pub observer: bool,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Hub {
    /// Creates the hub on `engine` and starts its sequencer (and, for a cluster engine, the task that
    /// dispatches the engine's feed). Async because the hub must know where the log ends before it serves
    /// anyone: that position is the registration boundary of the first subscriptions.
    pub async fn new(engine: Arc<dyn Engine>, opts: HubOptions) -> Result<Hub, HubError> {
        let (jobs, rx) = mpsc::channel(opts.max_batch.max(1) * 4);
        let last = engine.last().await?;
        let feed = engine.feed(last.as_ref().map(|r| r.seq).unwrap_or(0));
        let engine_presence = engine.presence();
        let inner = Arc::new(Inner {
            dispatched: AtomicU64::new(last.as_ref().map(|r| r.seq).unwrap_or(0)),
            fanouts: AtomicU64::new(0),
            last_id: Mutex::new(last.map(|r| r.id)),
            engine,
            opts,
            registry: RwLock::new(Registry::default()),
            connections: Arc::new(ConnCounts::default()),
            counters: Counters::default(),
            started: std::time::Instant::now(),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            sequencer: Mutex::new(None),
            clustered: feed.is_some(),
            presence: engine_presence.unwrap_or_else(|| Arc::new(LocalPresence::default())),
            control_sink: OnceLock::new(),
        });
        let handle = tokio::spawn(sequencer(inner.clone(), rx));
        *inner.sequencer.lock() = Some(handle);
        if let Some(feed) = feed {
            tokio::spawn(dispatch_feed(inner.clone(), feed));
        }
        Ok(Hub { inner, jobs })
    }

    pub fn options(&self) -> &HubOptions {
        &self.inner.opts
    }

    /// The engine publications are stored in.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.inner.engine
    }

    /// The history's incarnation (the WebSocket epoch; part of generated SSE ids).
    pub fn epoch(&self) -> String {
        self.inner.engine.epoch()
    }

    /// Whether the hub can take publications now: not shutting down, its sequencer alive, the engine
    /// accepting writes.
    pub async fn ready(&self) -> Result<(), HubError> {
        if self.is_shutting_down() {
            return Err(HubError::ShuttingDown);
        }
        let alive = self
            .inner
            .sequencer
            .lock()
            .as_ref()
            .is_some_and(|h| !h.is_finished());
        if !alive {
            return Err(HubError::Log(LogError::Storage(
                "the sequencer has stopped".into(),
            )));
        }
        Ok(self.inner.engine.health().await?)
    }

    /// Cancelled when shutdown starts; transports end their streams on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Validates, appends to the log, fans out, and returns once the publication is durable.
    pub async fn publish(&self, p: NewPublication) -> Result<Arc<Publication>, HubError> {
        if self.is_shutting_down() {
            return Err(HubError::ShuttingDown);
        }
        if p.topics.is_empty() || p.topics.iter().any(String::is_empty) {
            return Err(HubError::NoTopic);
        }
        let max = self.inner.opts.max_message_size;
        // Reserved channels are written by Herald only (documents), which applies limits of its own
        // (`yjs.max_update_size`; a compacted snapshot may be as large as a document).
        if p.data.len() > max && !p.topics.iter().all(|t| crate::access::is_reserved(t)) {
            return Err(HubError::MessageTooLarge {
                size: p.data.len(),
                max,
            });
        }
        // And whatever the channel, no more than the engine stores in one record (NATS: its
        // `max_payload`): refused here, alone, rather than failing the batch it would join.
        if let Some(max) = self.engine().max_record_data() {
            if p.data.len() > max {
                return Err(HubError::MessageTooLarge {
                    size: p.data.len(),
                    max,
                });
            }
        }
        let id = match p.id {
            Some(id) if id.starts_with('#') => {
                return Err(HubError::InvalidId("an id must not start with '#'".into()))
            }
            Some(id) if id.contains(['\r', '\n']) || id.is_empty() => {
                return Err(HubError::InvalidId(
                    "an id must be non-empty and contain no line break".into(),
                ))
            }
            Some(id) => id,
            // The log names it after its position (see `log::generated_id`).
            None => String::new(),
        };
        if p.event_type
            .as_deref()
            .is_some_and(|t| t.contains(['\r', '\n']))
        {
            return Err(HubError::InvalidId(
                "type must not contain a line break".into(),
            ));
        }
        let record = Record {
            seq: 0,
            id,
            topics: p.topics,
            data: p.data,
            private: p.private,
            event_type: p.event_type,
            retry: p.retry,
            time_ms: now_ms(),
            info: p.info,
            tags: p.tags,
        };
        let (ack, done) = oneshot::channel();
        self.jobs
            .send(Job {
                record,
                skip_history: p.skip_history,
                ack,
            })
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        done.await.map_err(|_| HubError::ShuttingDown)?
    }

    /// Counts a client connection of `transport` from `remote` against `max_connections`.
    pub fn connect(
        &self,
        transport: Transport,
        remote: Option<SocketAddr>,
    ) -> Result<ConnectionGuard, HubError> {
        let max = self.inner.opts.max_connections;
        let counts = &self.inner.connections;
        if counts.total.fetch_add(1, Ordering::AcqRel) >= max {
            counts.total.fetch_sub(1, Ordering::AcqRel);
            return Err(HubError::TooManyConnections(max));
        }
        counts.of(transport).fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("herald_connections").increment(1.0);
        Ok(ConnectionGuard {
            meta: Arc::new(ConnMeta {
                counts: counts.clone(),
                opened_ms: now_ms(),
                ip: remote.map(|r| match r.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                }),
                port: remote.map_or(0, |r| r.port()),
                transport,
            }),
        })
    }

    pub fn connection_count(&self) -> usize {
        self.inner.connections.total.load(Ordering::Acquire)
    }

    /// The hub's state and counters now: plain atomic reads and the sizes of the registry's maps.
    pub fn stats(&self) -> HubStats {
        let c = &self.inner.connections;
        let (subscriptions, channels) = {
            let reg = self.inner.registry.read();
            (reg.all.len(), reg.exact.len())
        };
        let k = &self.inner.counters;
        HubStats {
            connections: c.total.load(Ordering::Relaxed),
            sse_connections: c.sse.load(Ordering::Relaxed),
            websocket_connections: c.websocket.load(Ordering::Relaxed),
            subscriptions,
            channels,
            publications: k.publications.load(Ordering::Relaxed),
            deliveries: k.deliveries.load(Ordering::Relaxed),
            disconnects: DisconnectReason::ALL
                .iter()
                .zip(&k.disconnects)
                .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
                .collect(),
            last_seq: self.inner.dispatched.load(Ordering::Relaxed),
            uptime_ms: self.inner.started.elapsed().as_millis() as u64,
        }
    }

    /// Counts a subscriber disconnected for `reason` (the hub counts its own; a transport that ends a
    /// stream for a reason of its own, such as an expired token, says so here).
    pub fn count_disconnect(&self, reason: DisconnectReason) {
        count_disconnect(&self.inner, reason);
    }

    /// Resolves when no client connection is left: at shutdown, the server waits for this so that every
    /// connection has written its goodbye (a WebSocket's close frame 3001, the end of an SSE stream) before
    /// the process exits.
    pub async fn connections_closed(&self) {
        loop {
            let notified = self.inner.connections.none_left.notified();
            if self.connection_count() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// A new outbox for one client connection, with its receiving end.
    pub fn outbox(&self, kill: Option<CancellationToken>) -> (Outbox, queue::Receiver<Delivery>) {
        let (tx, rx) = queue::channel(self.inner.opts.outbox_capacity.max(1));
        (Outbox { tx, kill }, rx)
    }

    /// An outbox of its own size, for a subscriber inside Herald that must not be cut off as soon as a
    /// client would be (a loaded Yjs document, which relays to all of its clients).
    pub fn outbox_with_capacity(&self, capacity: usize) -> (Outbox, queue::Receiver<Delivery>) {
        let (tx, rx) = queue::channel(capacity.max(1));
        (Outbox { tx, kill: None }, rx)
    }

    /// Registers a live subscription delivering into `outbox`.
    pub fn subscribe(
        &self,
        spec: SubscribeSpec,
        outbox: &Outbox,
    ) -> Result<Subscription, HubError> {
        if self.is_shutting_down() {
            return Err(HubError::ShuttingDown);
        }
        let max = self.inner.opts.max_topics_per_subscription;
        if spec.selectors.len() > max {
            return Err(HubError::TooManyTopics {
                given: spec.selectors.len(),
                max,
            });
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let spec = Arc::new(spec);
        let sub = Arc::new(Sub {
            id,
            spec: spec.clone(),
            outbox: outbox.clone(),
            last_fanout: AtomicU64::new(0),
        });
        let registered_at = {
            let mut reg = self.inner.registry.write();
            reg.insert(sub);
            self.inner.dispatched.load(Ordering::Acquire)
        };
        metrics::gauge!("herald_subscriptions").increment(1.0);
        Ok(Subscription {
            id,
            registered_at,
            spec,
            inner: self.inner.clone(),
        })
    }

    /// Disconnects one subscriber: it leaves the registry, its stream ends and, if it is not being read, its
    /// connection is killed.
    pub fn disconnect(&self, id: u64, reason: DisconnectReason) {
        let sub = self.inner.registry.write().remove(id);
        if let Some(sub) = sub {
            metrics::gauge!("herald_subscriptions").decrement(1.0);
            kill(&self.inner, &sub, reason);
        }
    }

    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let reg = self.inner.registry.read();
        let mut out: Vec<_> = reg
            .all
            .values()
            .map(|s| SubscriptionInfo {
                id: s.id,
                subscriber: s.spec.subscriber.clone(),
                selectors: s
                    .spec
                    .selectors
                    .iter()
                    .map(|x| x.as_str().to_string())
                    .collect(),
                payload: s.spec.payload.as_deref().cloned(),
                conn: s.spec.conn.clone(),
                observer: s.spec.observer,
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Adds a client to a channel's presence and delivers a join to the subscribers that asked for it (on
    /// every node, in a cluster). Presence lasts as long as the returned guard: dropping it is the leave,
    /// however the connection ends (a panic in its task included).
    pub fn join(&self, channel: Arc<str>, info: ClientInfo) -> PresenceGuard {
        let info = Arc::new(info);
        self.inner.presence.add(&channel, info.clone());
        announce(&self.inner, &channel, info.clone(), true);
        PresenceGuard {
            inner: self.inner.clone(),
            channel,
            info,
        }
    }

    /// The clients present in a channel (on every node, in a cluster).
    pub async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, HubError> {
        Ok(self.inner.presence.list(channel).await?)
    }

    /// Where control messages for live connections go (the Centrifugo face registers its connection
    /// registry): called on every node for a message sent with [`Hub::control`].
    pub fn on_control(&self, sink: impl Fn(&str, Option<&str>, &[u8]) + Send + Sync + 'static) {
        let _ = self.inner.control_sink.set(Box::new(sink));
    }

    /// Sends a control message to the live connections of `user` (or one `client`) wherever they are: on
    /// this node, or through the engine to every node of a cluster.
    pub async fn control(
        &self,
        user: &str,
        client: Option<&str>,
        payload: Bytes,
    ) -> Result<(), HubError> {
        if self.inner.clustered {
            self.inner
                .engine
                .control(user.to_string(), client.map(str::to_string), payload)
                .await?;
        } else if let Some(sink) = self.inner.control_sink.get() {
            sink(user, client, &payload);
        }
        Ok(())
    }

    /// Channels with at least one exact subscriber, with their subscriber counts.
    pub fn channels(&self) -> Vec<(String, usize)> {
        let reg = self.inner.registry.read();
        let mut v: Vec<(String, usize)> = reg
            .exact
            .iter()
            .map(|(k, m)| (k.to_string(), m.len()))
            .collect();
        v.sort();
        v
    }

    /// Whether `channel` has a subscriber of its own on this node (one whose selectors are exact names):
    /// a live reader of that very channel, which a catch-all `*` subscription is not.
    pub fn has_exact_subscriber(&self, channel: &str) -> bool {
        self.inner.registry.read().exact.contains_key(channel)
    }

    /// Makes [`Hub::subscribed_anywhere`] see the whole cluster for the channels starting with `prefix`
    /// (the inbox's namespace): this node marks each such channel that has an exact subscriber here in
    /// the engine's presence store, which every node reads. Presence is the store for it because it is
    /// already what a node's death must clean up (entries expire unless their node refreshes them) and
    /// its writes never wait. Only one prefix, set once; on one node (no cluster) it does nothing.
    pub fn share_subscribers(&self, prefix: &str) {
        if !self.inner.clustered {
            return;
        }
        let mut reg = self.inner.registry.write();
        if reg.shared.is_some() {
            return;
        }
        let sh = SharedSubscribers {
            prefix: prefix.into(),
            presence: self.inner.presence.clone(),
            node: Arc::new(ClientInfo {
                client: format!("node-{}", uuid::Uuid::new_v4().simple()),
                user: String::new(),
                conn_info: None,
                chan_info: None,
            }),
        };
        for t in reg.exact.keys().filter(|t| sh.covers(t)) {
            sh.presence.add(&subscribers_channel(t), sh.node.clone());
        }
        reg.shared = Some(sh);
    }

    /// Whether `channel` has an exact subscriber on this node or, for a channel under the prefix given
    /// to [`Hub::share_subscribers`], on any node of the cluster. Another node's subscriber is seen once
    /// its mark reached the presence store (its writes are in the background, normally milliseconds),
    /// and a dead node's marks count until their expiry (`engine.presence_ttl`). This node's own answer
    /// comes from its registry, never from its mark, which may lag. An error means the cluster's answer
    /// is unknown; the caller decides what that means.
    pub async fn subscribed_anywhere(&self, channel: &str) -> Result<bool, HubError> {
        let node = {
            let reg = self.inner.registry.read();
            if reg.exact.contains_key(channel) {
                return Ok(true);
            }
            match reg.shared.as_ref().filter(|sh| sh.covers(channel)) {
                Some(sh) => sh.node.client.clone(),
                None => return Ok(false),
            }
        };
        let marks = self
            .inner
            .presence
            .list(&subscribers_channel(channel))
            .await?;
        Ok(marks.iter().any(|m| m.client != node))
    }

    /// Id of the last publication dispatched, if any.
    pub fn last_event_id(&self) -> Option<String> {
        self.inner.last_id.lock().clone()
    }

    /// Log records with `after < seq <= upto`; only those with a topic in `topics` when given.
    pub async fn history(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        topics: Option<Vec<String>>,
    ) -> Result<Vec<Record>, HubError> {
        Ok(self
            .inner
            .engine
            .read_range(after, upto, limit, topics)
            .await?)
    }

    /// The seq of event id `id`, if it is still in the log.
    pub async fn find_id(&self, id: String) -> Result<Option<u64>, HubError> {
        Ok(self.inner.engine.find_id(id).await?)
    }

    /// Begins shutdown: new publishes and subscriptions are refused, streams are told to end, queued
    /// publications are committed and dispatched, and the log is flushed. Idempotent.
    pub async fn shutdown(&self) -> Result<(), HubError> {
        self.inner.shutdown.cancel();
        let subs: Vec<Arc<Sub>> = {
            let mut reg = self.inner.registry.write();
            let subs = reg.all.values().cloned().collect();
            *reg = Registry::default();
            subs
        };
        for s in &subs {
            metrics::gauge!("herald_subscriptions").decrement(1.0);
            s.outbox.tx.close();
            count_disconnect(&self.inner, DisconnectReason::Shutdown);
        }
        let handle = self.inner.sequencer.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
            self.inner.engine.close().await?;
        }
        Ok(())
    }
}

/// A join or leave: delivered on this node, or, in a cluster, sent through the engine to every node's feed
/// (this one's included), where [`notify`] delivers it.
fn announce(inner: &Inner, channel: &str, info: Arc<ClientInfo>, joined: bool) {
    if inner.clustered {
        inner.engine.announce(channel, &info, joined);
    } else {
        notify(inner, channel, info, joined);
    }
}

/// Delivers a join or leave to this node's subscribers of `channel` that asked for them.
fn notify(inner: &Inner, channel: &str, info: Arc<ClientInfo>, join: bool) {
    let channel: Arc<str> = channel.into();
    let mut slow = Vec::new();
    {
        let reg = inner.registry.read();
        for sub in reg
            .exact
            .get(&*channel)
            .into_iter()
            .flat_map(|m| m.values())
        {
            if !sub.spec.join_leave {
                continue;
            }
            let d = if join {
                Delivery::Join {
                    sub: sub.id,
                    channel: channel.clone(),
                    info: info.clone(),
                }
            } else {
                Delivery::Leave {
                    sub: sub.id,
                    channel: channel.clone(),
                    info: info.clone(),
                }
            };
            if let Err(queue::TrySendError::Full(_)) = sub.outbox.tx.try_send(d) {
                slow.push(sub.clone());
            }
        }
    }
    disconnect_slow(inner, slow);
}

fn kill(inner: &Inner, sub: &Sub, reason: DisconnectReason) {
    sub.outbox.tx.close();
    if let Some(k) = &sub.outbox.kill {
        k.cancel();
    }
    count_disconnect(inner, reason);
}

fn count_disconnect(inner: &Inner, reason: DisconnectReason) {
    let i = DisconnectReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(0);
    inner.counters.disconnects[i].fetch_add(1, Ordering::Relaxed);
    metrics::counter!("herald_disconnects_total", "reason" => reason.as_str()).increment(1);
}

async fn sequencer(inner: Arc<Inner>, mut rx: mpsc::Receiver<Job>) {
    let max = inner.opts.max_batch.max(1);
    let mut batch = Vec::with_capacity(max);
    loop {
        let draining = tokio::select! {
            job = rx.recv() => match job {
                Some(j) => { batch.push(j); false }
                None => break,
            },
            _ = inner.shutdown.cancelled() => true,
        };
        while batch.len() < max || draining {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_and_dispatch(&inner, std::mem::take(&mut batch)).await;
        }
        if draining {
            rx.close();
            while let Ok(j) = rx.try_recv() {
                batch.push(j);
            }
            if !batch.is_empty() {
                commit_and_dispatch(&inner, std::mem::take(&mut batch)).await;
            }
            break;
        }
    }
}

async fn commit_and_dispatch(inner: &Arc<Inner>, jobs: Vec<Job>) {
    let mut records = Vec::with_capacity(jobs.len());
    let mut acks = Vec::with_capacity(jobs.len());
    let mut durable_at = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.into_iter().enumerate() {
        if !j.skip_history {
            durable_at.push(i);
        }
        records.push(j.record);
        acks.push(j.ack);
    }
    // The durable ones go to the engine in one append (one commit); those kept out of history keep seq 0
    // and no id, but keep their place in the order.
    if !durable_at.is_empty() {
        let durable: Vec<Record> = durable_at
            .iter()
            .map(|&i| std::mem::take(&mut records[i]))
            .collect();
        match inner.engine.append(durable).await {
            Ok(durable) => {
                for (&i, r) in durable_at.iter().zip(durable) {
                    records[i] = r;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "log append failed; publications refused");
                let e = e.to_string();
                for ack in acks {
                    let _ = ack.send(Err(HubError::Log(LogError::Storage(e.clone()))));
                }
                return;
            }
        }
    }
    inner
        .counters
        .publications
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    metrics::counter!("herald_publications_total").increment(records.len() as u64);
    for (record, ack) in records.into_iter().zip(acks) {
        if !inner.clustered {
            let publication = Arc::new(Publication::new(record));
            dispatch(inner, &publication);
            let _ = ack.send(Ok(publication));
            continue;
        }
        // In a cluster every node, this one included, dispatches from the engine's feed.
        if record.seq == 0 {
            if let Err(e) = inner.engine.broadcast(record.clone()).await {
                let _ = ack.send(Err(HubError::Log(e)));
                continue;
            }
        }
        let _ = ack.send(Ok(Arc::new(Publication::new(record))));
    }
}

/// A cluster engine's feed, dispatched in order on this node. When the engine says publications were lost
/// for this node, every subscriber is disconnected: it reconnects and resumes from the log, instead of
/// silently missing what was lost.
async fn dispatch_feed(inner: Arc<Inner>, mut feed: Feed) {
    while let Some(event) = feed.recv().await {
        match event {
            FeedEvent::Publication(record) => {
                let publication = Arc::new(Publication::new(record));
                dispatch(&inner, &publication);
            }
            FeedEvent::Presence {
                channel,
                info,
                joined,
            } => notify(&inner, &channel, Arc::new(info), joined),
            FeedEvent::Control {
                user,
                client,
                payload,
            } => {
                if let Some(sink) = inner.control_sink.get() {
                    sink(&user, client.as_deref(), &payload);
                }
            }
            FeedEvent::Lost(why) => {
                tracing::warn!(
                    why,
                    "the engine lost publications for this node; subscribers reconnect"
                );
                let subs: Vec<Arc<Sub>> = {
                    let mut reg = inner.registry.write();
                    let subs = reg.all.values().cloned().collect();
                    *reg = Registry::default();
                    subs
                };
                for s in &subs {
                    metrics::gauge!("herald_subscriptions").decrement(1.0);
                    kill(&inner, s, DisconnectReason::EngineLost);
                }
                // The engine may have lost its data (a new epoch, positions starting over): the registration
                // boundary of the next subscriptions is where the log ends now, not where it ended before.
                match inner.engine.last().await {
                    Ok(last) => {
                        let _reg = inner.registry.write();
                        inner
                            .dispatched
                            .store(last.as_ref().map_or(0, |r| r.seq), Ordering::Release);
                        *inner.last_id.lock() = last.map(|r| r.id);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the log's end after a loss"),
                }
            }
        }
    }
}

/// Fan-out of one committed publication. Never blocks: a full outbox disconnects its subscriber.
fn dispatch(inner: &Inner, p: &Arc<Publication>) {
    let seq = p.record.seq;
    // Only the sequencer task dispatches, so rounds are distinct and increasing.
    let round = inner.fanouts.fetch_add(1, Ordering::Relaxed) + 1;
    let mut delivered = 0u64;
    let mut slow: Vec<Arc<Sub>> = Vec::new();
    {
        let reg = inner.registry.read();
        let mut offer = |sub: &Arc<Sub>| {
            if sub.last_fanout.swap(round, Ordering::Relaxed) == round || !sub.spec.wants(&p.record)
            {
                return;
            }
            match sub.outbox.tx.try_send(Delivery::Pub {
                sub: sub.id,
                publication: p.clone(),
            }) {
                Ok(()) => delivered += 1,
                Err(queue::TrySendError::Full(_)) => slow.push(sub.clone()),
                Err(queue::TrySendError::Closed(_)) => {}
            }
        };
        for t in &p.record.topics {
            if let Some(subs) = reg.exact.get(t.as_str()) {
                subs.values().for_each(&mut offer);
            }
        }
        reg.wild.values().for_each(&mut offer);
        if seq > 0 {
            inner.dispatched.store(seq, Ordering::Release);
        }
    }
    if seq > 0 {
        *inner.last_id.lock() = Some(p.record.id.clone());
    }
    inner
        .counters
        .deliveries
        .fetch_add(delivered, Ordering::Relaxed);
    metrics::counter!("herald_deliveries_total").increment(delivered);
    disconnect_slow(inner, slow);
}

fn disconnect_slow(inner: &Inner, slow: Vec<Arc<Sub>>) {
    if slow.is_empty() {
        return;
    }
    let mut reg = inner.registry.write();
    for s in &slow {
        if reg.remove(s.id).is_some() {
            metrics::gauge!("herald_subscriptions").decrement(1.0);
        }
    }
    drop(reg);
    for s in &slow {
        if !s.outbox.tx.is_closed() {
            tracing::info!(subscriber = %s.spec.subscriber, "outbox full: disconnecting slow subscriber");
            kill(inner, s, DisconnectReason::SlowConsumer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::LocalEngine;
    use crate::log::{MemoryLog, Retention};

    fn memory() -> Arc<dyn Engine> {
        Arc::new(LocalEngine::new(
            Arc::new(MemoryLog::new()),
            Retention::default(),
            std::time::Duration::from_secs(60),
        ))
    }

    async fn hub(outbox: usize) -> Hub {
        Hub::new(
            memory(),
            HubOptions {
                outbox_capacity: outbox,
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    fn spec(selectors: &[&str]) -> SubscribeSpec {
        SubscribeSpec::new(
            selectors.iter().map(|s| Selector::parse(s)).collect(),
            Identity::anonymous(),
            "urn:test".into(),
        )
    }

    struct Client {
        _sub: Subscription,
        outbox: Outbox,
        rx: queue::Receiver<Delivery>,
    }

    impl Client {
        async fn data(&mut self) -> String {
            match self.rx.recv().await.unwrap() {
                Delivery::Pub { publication, .. } => publication.record.data_text().into_owned(),
                other => panic!("expected a publication, got {other:?}"),
            }
        }
    }

    fn client(hub: &Hub, s: SubscribeSpec) -> Client {
        let (outbox, rx) = hub.outbox(None);
        Client {
            _sub: hub.subscribe(s, &outbox).unwrap(),
            outbox,
            rx,
        }
    }

    fn new(topics: &[&str], data: &str) -> NewPublication {
        NewPublication {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            data: data.to_string().into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn publish_reaches_matching_subscribers_once_in_order() {
        let hub = hub(16).await;
        let mut exact = client(&hub, spec(&["a", "b"]));
        let mut wild = client(&hub, spec(&["*"]));
        let mut other = client(&hub, spec(&["c"]));
        let p1 = hub.publish(new(&["a", "b"], "1")).await.unwrap();
        let p2 = hub.publish(new(&["b"], "2")).await.unwrap();
        assert!(p2.record.seq > p1.record.seq);
        assert_eq!(exact.data().await, "1");
        assert_eq!(exact.data().await, "2");
        assert!(
            exact.rx.try_recv().is_none(),
            "delivered once despite two matching topics"
        );
        assert_eq!(wild.data().await, "1");
        assert!(other.rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn private_needs_a_grant() {
        let hub = hub(16).await;
        let mut anon = client(&hub, spec(&["t"]));
        let mut granted = client(
            &hub,
            SubscribeSpec {
                filter: ReadFilter::without_rules(Arc::new(Identity {
                    grants: vec![Selector::parse("t")],
                    ..Default::default()
                })),
                ..spec(&["t"])
            },
        );
        hub.publish(NewPublication {
            private: true,
            ..new(&["t"], "secret")
        })
        .await
        .unwrap();
        hub.publish(new(&["t"], "public")).await.unwrap();
        assert_eq!(granted.data().await, "secret");
        assert_eq!(anon.data().await, "public");
    }

    #[tokio::test]
    async fn full_outbox_disconnects_only_the_slow_one() {
        let hub = hub(2).await;
        let slow = client(&hub, spec(&["t"]));
        let mut fast = client(&hub, spec(&["t"]));
        for i in 0..5 {
            hub.publish(new(&["t"], &i.to_string())).await.unwrap();
            assert_eq!(fast.data().await, i.to_string());
        }
        assert!(slow.outbox.tx.is_closed());
        assert!(!fast.outbox.tx.is_closed());
        assert_eq!(hub.subscriptions().len(), 1);
        let stats = hub.stats();
        assert_eq!(stats.publications, 5);
        assert_eq!(
            stats.deliveries,
            5 + 2,
            "the fast one got 5, the slow one 2 before it was full"
        );
        assert_eq!(stats.disconnects["slow_consumer"], 1);
        assert_eq!((stats.subscriptions, stats.channels), (1, 1));
    }

    #[tokio::test]
    async fn one_outbox_serves_several_subscriptions() {
        let hub = hub(16).await;
        let (outbox, mut rx) = hub.outbox(None);
        let a = hub.subscribe(spec(&["a"]), &outbox).unwrap();
        let b = hub.subscribe(spec(&["b"]), &outbox).unwrap();
        hub.publish(new(&["b"], "to b")).await.unwrap();
        hub.publish(new(&["a"], "to a")).await.unwrap();
        let ids: Vec<u64> = (0..2)
            .map(|_| match rx.try_recv().unwrap() {
                Delivery::Pub { sub, .. } => sub,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [b.id, a.id]);
    }

    #[tokio::test]
    async fn presence_and_join_leave() {
        let hub = hub(16).await;
        let (outbox, mut rx) = hub.outbox(None);
        let _s = hub
            .subscribe(
                SubscribeSpec {
                    join_leave: true,
                    ..spec(&["room"])
                },
                &outbox,
            )
            .unwrap();
        let info = ClientInfo {
            client: "c1".into(),
            user: "42".into(),
            conn_info: None,
            chan_info: None,
        };
        let present = hub.join("room".into(), info.clone());
        assert_eq!(hub.presence("room").await.unwrap(), vec![info.clone()]);
        assert!(matches!(rx.try_recv().unwrap(), Delivery::Join { info: i, .. } if *i == info));
        drop(present);
        assert!(hub.presence("room").await.unwrap().is_empty());
        assert!(matches!(rx.try_recv().unwrap(), Delivery::Leave { .. }));
        assert_eq!(hub.channels(), vec![("room".to_string(), 1)]);
    }

    /// A connection task that panics still leaves: its presence is a guard, dropped while unwinding.
    #[tokio::test]
    async fn a_panicking_task_leaves_its_presence() {
        let hub = hub(16).await;
        let info = ClientInfo {
            client: "c1".into(),
            user: "42".into(),
            conn_info: None,
            chan_info: None,
        };
        let h = hub.clone();
        let task = tokio::spawn(async move {
            let _present = h.join("room".into(), info);
            panic!("injected: the connection task panics");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(hub.presence("room").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn registration_boundary_splits_history_and_live() {
        let hub = hub(16).await;
        hub.publish(new(&["t"], "old")).await.unwrap();
        let mut c = client(&hub, spec(&["t"]));
        hub.publish(new(&["t"], "new")).await.unwrap();
        let hist = hub
            .history(0, c._sub.registered_at, 100, None)
            .await
            .unwrap();
        assert_eq!(hist.len(), 1);
        assert_eq!(hist[0].data, "old");
        assert_eq!(c.data().await, "new");
    }

    #[tokio::test]
    async fn connections_keep_their_peer_address_compactly() {
        let hub = hub(16).await;
        for peer in ["127.0.0.1:4242", "[::1]:80", "[2001:db8::7]:65535"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let c = hub.connect(Transport::WebSocket, Some(peer)).unwrap();
            assert_eq!(c.meta().remote(), Some(peer));
        }
        let c = hub.connect(Transport::Sse, None).unwrap();
        assert_eq!(c.meta().remote(), None);
        assert_eq!(hub.stats().sse_connections, 1);
        assert_eq!(hub.stats().websocket_connections, 0, "the guards dropped");
    }

    #[tokio::test]
    async fn limits_and_validation() {
        let hub = Hub::new(
            memory(),
            HubOptions {
                max_connections: 1,
                max_topics_per_subscription: 1,
                max_message_size: 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let peer: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let c = hub.connect(Transport::Sse, Some(peer)).unwrap();
        assert_eq!(c.meta().remote(), Some(peer));
        assert_eq!(hub.stats().sse_connections, 1);
        assert!(matches!(
            hub.connect(Transport::WebSocket, None),
            Err(HubError::TooManyConnections(1))
        ));
        let (outbox, _rx) = hub.outbox(None);
        assert!(matches!(
            hub.subscribe(spec(&["a", "b"]), &outbox),
            Err(HubError::TooManyTopics { .. })
        ));
        assert!(matches!(
            hub.publish(new(&["a"], "toolong")).await,
            Err(HubError::MessageTooLarge { .. })
        ));
        assert!(matches!(
            hub.publish(NewPublication {
                id: Some("#x".into()),
                ..new(&["a"], "")
            })
            .await,
            Err(HubError::InvalidId(_))
        ));
        assert!(matches!(
            hub.publish(new(&[], "")).await,
            Err(HubError::NoTopic)
        ));
    }

    /// An engine whose append panics: the sequencer dies with it.
    struct Panicking(Arc<dyn Engine>);

    impl Engine for Panicking {
        fn append(
            &self,
            _batch: Vec<Record>,
        ) -> crate::engine::BoxFuture<'_, Result<Vec<Record>, LogError>> {
            Box::pin(async { panic!("injected: append panics") })
        }
        fn read_range(
            &self,
            a: u64,
            u: u64,
            l: usize,
            t: Option<Vec<String>>,
        ) -> crate::engine::BoxFuture<'_, Result<Vec<Record>, LogError>> {
            self.0.read_range(a, u, l, t)
        }
        fn read_channel(
            &self,
            c: String,
            a: u64,
            u: u64,
            l: usize,
        ) -> crate::engine::BoxFuture<'_, Result<Vec<Record>, LogError>> {
            self.0.read_channel(c, a, u, l)
        }
        fn read_channel_back(
            &self,
            c: String,
            b: u64,
            l: usize,
        ) -> crate::engine::BoxFuture<'_, Result<Vec<Record>, LogError>> {
            self.0.read_channel_back(c, b, l)
        }
        fn find_id(
            &self,
            id: String,
        ) -> crate::engine::BoxFuture<'_, Result<Option<u64>, LogError>> {
            self.0.find_id(id)
        }
        fn last(&self) -> crate::engine::BoxFuture<'_, Result<Option<Record>, LogError>> {
            self.0.last()
        }
        fn channel_top(
            &self,
            c: String,
            u: u64,
        ) -> crate::engine::BoxFuture<'_, Result<Option<u64>, LogError>> {
            self.0.channel_top(c, u)
        }
        fn channel_pruned_upto(
            &self,
            c: String,
        ) -> crate::engine::BoxFuture<'_, Result<u64, LogError>> {
            self.0.channel_pruned_upto(c)
        }
        fn remove_channel(&self, c: String) -> crate::engine::BoxFuture<'_, Result<u64, LogError>> {
            self.0.remove_channel(c)
        }
        fn epoch(&self) -> String {
            self.0.epoch()
        }
        fn health(&self) -> crate::engine::BoxFuture<'_, Result<(), LogError>> {
            self.0.health()
        }
        fn close(&self) -> crate::engine::BoxFuture<'_, Result<(), LogError>> {
            self.0.close()
        }
    }

    /// A dead sequencer is reported (readiness fails) and publishes are refused, never left hanging.
    #[tokio::test]
    async fn a_dead_sequencer_makes_the_hub_unready() {
        let hub = Hub::new(Arc::new(Panicking(memory())), HubOptions::default())
            .await
            .unwrap();
        assert!(hub.ready().await.is_ok());
        assert!(hub.publish(new(&["t"], "x")).await.is_err());
        for _ in 0..500 {
            if hub.ready().await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let e = hub.ready().await.unwrap_err().to_string();
        assert!(e.contains("sequencer"), "{e}");
        assert!(hub.publish(new(&["t"], "y")).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_ends_subscriptions_and_refuses_publishes() {
        let hub = hub(16).await;
        let c = client(&hub, spec(&["t"]));
        hub.shutdown().await.unwrap();
        assert!(c.outbox.tx.is_closed());
        assert!(matches!(
            hub.publish(new(&["t"], "x")).await,
            Err(HubError::ShuttingDown)
        ));
    }
}
