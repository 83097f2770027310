//! Web Push for users who are not connected: a notification created while nobody reads the user's inbox
//! channel (on any node of the cluster) goes to each of their browsers' push subscriptions (RFC 8030),
//! encrypted for that browser (RFC 8291, aes128gcm) and signed with the server's VAPID key (RFC 8292).
//!
//! Why it is built this way:
//! - **Pushes come from the inbox's outbox, and are recorded before it forgets them.** The outbox is
//!   durable and committed with the notification; the inbox's publisher hands each published batch to
//!   [`Push::record`] before it clears the batch, and `record` writes one pending push per subscription
//!   of each notified user into the push store ([`PushStore::record`]). A crash before that leaves the
//!   batch in the outbox, so the next run records it again (idempotent by event id and endpoint); a crash
//!   after it leaves the pending pushes in the store, which the workers take up again after the restart.
//!   `notify` itself does nothing more than before: no push work happens on its path.
//! - **The pending pushes are the queue, bounded by `inbox.push.queue`.** Beyond it a push is dropped
//!   and counted (`herald_inbox_push_dropped_total{reason="full"}`): the publisher never waits for push,
//!   as live events must not queue behind push services. A push store that fails three times running
//!   drops that batch's pushes (`reason="store"`) for the same reason; the notifications themselves are
//!   in the inbox and their events published.
//! - **A worker claims a pending push for a lease, sends it once, and then deletes it or puts it back.**
//!   A retry after 429/5xx is the pending push made due again later (after `Retry-After` or a doubling
//!   delay), not a sleeping worker, so a backoff survives a restart and holds no worker. On Redis the
//!   claim is one script, so of two nodes exactly one takes a push; a node that dies with a push claimed
//!   leaves it to be taken again when the lease ends. The one window for a duplicate is a crash after a
//!   push service accepted a push and before it was deleted; the payload carries the item id for a
//!   service worker to drop a copy.
//! - **Connected means an exact subscriber of the user's inbox channel, anywhere.** This node's registry
//!   answers first; on a cluster the other nodes' subscribers are marked in the engine's presence
//!   ([`Hub::share_subscribers`]), read once per push. When that read fails the push is sent (counted in
//!   `herald_inbox_push_presence_unknown_total`): a notification shown twice is better than one missed.
//!   A catch-all subscription (the console's tail) is not the user.
//! - **A subscription the push service calls gone (404, 410) is removed**; 429 and 5xx are retried a
//!   bounded number of times; other refusals are counted and dropped, as retrying cannot change them.
//! - **Subscriptions and pending pushes are a seam of their own** ([`PushStore`]), so the inbox store's
//!   trait is unchanged and another engine keeps them: SQLite on one node, Redis on a cluster ([`redis`],
//!   which also shares the VAPID key between the nodes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};

use super::{InboxStore, Item, NewItem, PendingEvent};
use crate::config::PushConfig;
use crate::engine::BoxFuture;
use crate::hub::Hub;

pub mod nats;
pub mod redis;
pub mod sqlite;
pub mod vapid;

pub use nats::NatsPushStore;
pub use redis::RedisPushStore;
pub use sqlite::SqlitePushStore;
pub use vapid::Vapid;

/// The longest endpoint URL kept (push services' are around 200-500 bytes).
pub const MAX_ENDPOINT_LEN: usize = 2048;
/// A push payload's plaintext: push services take 4096 bytes of encrypted body, of which the aes128gcm
/// header (86 bytes with the key id), the tag and the padding delimiter take 103.
pub const MAX_PAYLOAD: usize = 3072;
/// The longest `Retry-After` honoured: a push service asking for more gets the push dropped, so a worker
/// is never parked for long on one message.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{1}")]
    Invalid(&'static str, String),
    #[error("push subscription storage failed: {0}")]
    Storage(String),
    #[error("VAPID key: {0}")]
    Key(String),
}

impl From<rusqlite::Error> for PushError {
    fn from(e: rusqlite::Error) -> Self {
        PushError::Storage(e.to_string())
    }
}

impl From<PushError> for crate::error::ApiError {
    fn from(e: PushError) -> Self {
        use crate::error::ApiError;
        use axum::http::StatusCode;
        match &e {
            PushError::Invalid(code, _) => ApiError::bad_request(code, e.to_string()),
            PushError::Storage(_) | PushError::Key(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "push_unavailable",
                e.to_string(),
            ),
        }
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> PushError {
    PushError::Invalid(code, message.into())
}

/// A browser's `PushSubscription.toJSON()`, as the page posts it.
#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionInput {
    pub endpoint: String,
    pub keys: SubscriptionKeys,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionKeys {
    pub p256dh: String,
    pub auth: String,
}

/// A stored subscription: one device of one user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subscription {
    pub endpoint: String,
    /// The browser's P-256 public key, base64url as the browser gave it.
    #[serde(skip)]
    pub p256dh: String,
    #[serde(skip)]
    pub auth: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// A notification to push to a user, as the publisher hands it over: recorded once per subscription.
#[derive(Debug, Clone)]
pub struct PushJob {
    /// The inbox event's id: unique per user and change, so recording a batch again records nothing new.
    pub key: String,
    pub user: String,
    pub category: String,
    /// The push's plaintext ([`Payload::encode`]).
    pub payload: Vec<u8>,
}

/// One pending push to one subscription, claimed by a worker.
#[derive(Debug, Clone)]
pub struct Due {
    /// The store's name for it, for [`PushStore::finish`] and [`PushStore::retry`].
    pub id: String,
    pub key: String,
    pub endpoint: String,
    pub user: String,
    pub category: String,
    pub payload: Vec<u8>,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What [`PushStore::record`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Pending pushes written (one per job and subscription not recorded before).
    pub recorded: usize,
    /// Pushes not written because the store held its maximum.
    pub dropped: usize,
}

/// Where subscriptions and the pending pushes are kept. An endpoint belongs to one user at a time:
/// registering it again (another user signed in on that browser) moves it.
///
/// The pending pushes are the push queue, and must survive the process: a store shared by several nodes
/// must let exactly one of them claim a given push at a time (one atomic step per claim), and measure
/// due times on one clock (the store's own, where it has one).
pub trait PushStore: Send + Sync + 'static {
    /// Keeps `sub` for `user`, and removes their oldest ones beyond `max`.
    fn add(
        &self,
        user: String,
        sub: Subscription,
        max: usize,
    ) -> BoxFuture<'_, Result<(), PushError>>;
    /// Removes `user`'s subscription with this endpoint; false when they had none.
    fn remove(&self, user: String, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>>;
    /// Removes a subscription whoever holds it (the push service said it is gone).
    fn remove_endpoint(&self, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>>;
    /// `user`'s subscriptions, oldest first.
    fn list(&self, user: String) -> BoxFuture<'_, Result<Vec<Subscription>, PushError>>;
    /// Which of `users` hold at least one subscription: lets the publisher build payloads only for them
    /// (most notified users have no browser subscribed). One round trip for the whole list.
    fn subscribed(&self, users: Vec<String>) -> BoxFuture<'_, Result<HashSet<String>, PushError>>;
    /// Durably records, for each job, one pending push per subscription its user holds now, due now.
    /// A (job key, endpoint) recorded before (still pending) is not recorded again; with `max` pushes
    /// pending, the rest are dropped and counted in the result. Atomic per call.
    fn record(&self, jobs: Vec<PushJob>, max: usize) -> BoxFuture<'_, Result<Recorded, PushError>>;
    /// Takes up to `limit` pushes that are due, oldest due first, and makes them due again only after
    /// `lease` (so a claimer that dies leaves them to another); no two claims get the same push while
    /// its lease runs.
    fn claim(&self, limit: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Due>, PushError>>;
    /// Forgets a claimed push: sent, gone, muted, or given up.
    fn finish(&self, id: String) -> BoxFuture<'_, Result<(), PushError>>;
    /// Makes a claimed push due again `after` from now, having been tried `attempts` times (nothing if
    /// it was finished meanwhile).
    fn retry(
        &self,
        id: String,
        after: Duration,
        attempts: u32,
    ) -> BoxFuture<'_, Result<(), PushError>>;
    /// How long until the next pending push is due (zero when one is due now); `None` when none is
    /// pending.
    fn next_due(&self) -> BoxFuture<'_, Result<Option<Duration>, PushError>>;
    /// How many pushes are pending, claimed ones included.
    fn pending(&self) -> BoxFuture<'_, Result<u64, PushError>>;
}

fn b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let t = s.trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(t))
}

/// Whether `host` (a URI's host, IPv6 in brackets) is this machine.
fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `host` is an IP address no public push service has (private, link-local, loopback,
/// unspecified): an endpoint there would make Herald post into its own network.
fn is_internal_ip(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    match h.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => false,
    }
}

/// Checks a browser's subscription: an https endpoint (http on loopback only when
/// `allow_insecure` is set, for a local mock), a P-256 point and a 16-byte auth secret.
pub fn validate(input: SubscriptionInput, allow_insecure: bool) -> Result<Subscription, PushError> {
    let endpoint = input.endpoint.trim().to_string();
    if endpoint.is_empty() || endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(invalid(
            "invalid_endpoint",
            format!("an endpoint must have 1 to {MAX_ENDPOINT_LEN} bytes"),
        ));
    }
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        invalid(
            "invalid_endpoint",
            format!("the endpoint is not a URL: {e}"),
        )
    })?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(invalid("invalid_endpoint", "the endpoint has no host"));
    }
    match uri.scheme_str() {
        Some("https") if !is_internal_ip(host) || (allow_insecure && is_loopback(host)) => {}
        Some("https") => {
            return Err(invalid(
                "invalid_endpoint",
                format!("the endpoint's host {host} is an internal address, not a push service"),
            ))
        }
        Some("http") if allow_insecure && is_loopback(host) => {}
        _ => {
            return Err(invalid(
                "invalid_endpoint",
                "the endpoint must be an https URL of a push service",
            ))
        }
    }
    let key = b64(&input.keys.p256dh)
        .ok()
        .filter(|k| k.len() == 65 && k[0] == 4)
        .and_then(|k| web_push_native::p256::PublicKey::from_sec1_bytes(&k).ok());
    if key.is_none() {
        return Err(invalid(
            "invalid_key",
            "keys.p256dh must be an uncompressed P-256 point (65 bytes, base64url)",
        ));
    }
    if b64(&input.keys.auth).map(|a| a.len()) != Ok(16) {
        return Err(invalid(
            "invalid_key",
            "keys.auth must be 16 bytes, base64url",
        ));
    }
    Ok(Subscription {
        endpoint,
        p256dh: input.keys.p256dh.trim_end_matches('=').to_string(),
        auth: input.keys.auth.trim_end_matches('=').to_string(),
        created_at: super::now_ms(),
    })
}

/// What a push carries: enough for the service worker to show the notification and open it.
#[derive(Debug, Clone, Serialize)]
pub struct Payload {
    /// Always `"inbox"`: tells a service worker that handles other pushes what this is.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: i64,
    pub category: String,
    pub title: String,
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Payload {
    /// The payload of a stored item (as the outbox's `created` event carries it).
    pub fn of(item: &Item) -> Payload {
        Payload {
            kind: "inbox",
            id: item.id,
            category: item.category.clone(),
            title: item.title.clone(),
            body: item.body.clone(),
            action_url: item.action_url.clone(),
            avatar: item.avatar.clone(),
            data: item.data.clone(),
        }
    }

    pub fn new(id: i64, item: &NewItem) -> Payload {
        Payload {
            kind: "inbox",
            id,
            category: item.category().to_string(),
            title: item.title.clone(),
            body: item.body.clone(),
            action_url: item.action_url.clone(),
            avatar: item.avatar.clone(),
            data: item.data.clone(),
        }
    }

    /// The JSON sent, within [`MAX_PAYLOAD`]: `data` goes first, then the body is shortened (the page
    /// reads the whole item from the inbox when it opens).
    pub fn encode(mut self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&self).unwrap_or_default();
        if out.len() <= MAX_PAYLOAD {
            return out;
        }
        self.data = None;
        self.avatar = None;
        for _ in 0..64 {
            out = serde_json::to_vec(&self).unwrap_or_default();
            if out.len() <= MAX_PAYLOAD || self.body.is_empty() {
                break;
            }
            let over = out.len() - MAX_PAYLOAD;
            let mut cut = self.body.len().saturating_sub(over + 3);
            while !self.body.is_char_boundary(cut) {
                cut -= 1;
            }
            self.body.truncate(cut);
            self.body.push('…');
        }
        if out.len() > MAX_PAYLOAD {
            // Only a title near its own limit and a long category or URL get here.
            self.action_url = None;
            let mut cut = self.title.len().min(MAX_PAYLOAD / 2);
            while !self.title.is_char_boundary(cut) {
                cut -= 1;
            }
            self.title.truncate(cut);
            out = serde_json::to_vec(&self).unwrap_or_default();
        }
        out
    }
}

/// The push service: the recorder, the dispatcher and its workers, the VAPID key, the subscriptions. Cheap to clone.
#[derive(Clone)]
pub struct Push {
    inner: Arc<PushInner>,
}

struct PushInner {
    store: Arc<dyn PushStore>,
    inbox: Arc<dyn InboxStore>,
    hub: Hub,
    namespace: String,
    config: PushConfig,
    vapid: Vapid,
    client: reqwest::Client,
    /// Wakes the dispatcher after pushes were recorded.
    wake: Notify,
}

/// Attempts at recording a batch's pushes before they are dropped.
const RECORD_ATTEMPTS: u32 = 3;
/// How often an idle dispatcher looks for pushes due (another node may have recorded them).
const POLL: Duration = Duration::from_secs(1);

/// The part of an outbox event the push needs.
#[derive(Deserialize)]
struct CreatedEvent {
    #[serde(rename = "type")]
    kind: String,
    item: Option<Item>,
}

impl Push {
    /// Starts `config.workers` senders. Needs a tokio runtime.
    pub fn start(
        store: Arc<dyn PushStore>,
        inbox: Arc<dyn InboxStore>,
        hub: Hub,
        namespace: String,
        config: PushConfig,
        vapid: Vapid,
    ) -> Result<Push, PushError> {
        describe_metrics();
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PushError::Key(format!("cannot build the HTTP client: {e}")))?;
        hub.share_subscribers(&format!("{namespace}:"));
        let inner = Arc::new(PushInner {
            store,
            inbox,
            hub,
            namespace,
            vapid,
            client,
            wake: Notify::new(),
            config,
        });
        tokio::spawn(dispatcher(inner.clone()));
        Ok(Push { inner })
    }

    /// The VAPID public key, base64url: the page's `applicationServerKey`.
    pub fn public_key(&self) -> &str {
        self.inner.vapid.public_key()
    }

    pub fn config(&self) -> &PushConfig {
        &self.inner.config
    }

    pub async fn subscribe(
        &self,
        user: &str,
        input: SubscriptionInput,
    ) -> Result<Subscription, PushError> {
        let sub = validate(input, self.inner.config.allow_insecure_endpoints)?;
        self.inner
            .store
            .add(
                user.to_string(),
                sub.clone(),
                self.inner.config.max_subscriptions,
            )
            .await?;
        Ok(sub)
    }

    pub async fn unsubscribe(&self, user: &str, endpoint: &str) -> Result<bool, PushError> {
        self.inner
            .store
            .remove(user.to_string(), endpoint.to_string())
            .await
    }

    pub async fn subscriptions(&self, user: &str) -> Result<Vec<Subscription>, PushError> {
        self.inner.store.list(user.to_string()).await
    }

    /// Records the pushes of a batch of published inbox events before the outbox forgets them: one
    /// pending push per subscription of each user who got a notification and is not connected to this
    /// node (the cluster is asked when the push is sent). Never fails: after [`RECORD_ATTEMPTS`] failures
    /// of the push store the batch's pushes are dropped and counted, so the inbox's events never wait
    /// for push.
    pub async fn record(&self, events: &[PendingEvent]) {
        let inner = &self.inner;
        // A `created` event names its type as a JSON key and value; inside a string the quotes would be
        // escaped, so this finds only the event's own type and spares parsing every other event.
        let created: Vec<&PendingEvent> = events
            .iter()
            .filter(|e| e.payload.contains(r#""type":"created""#))
            .filter(|e| {
                let here = inner.hub.has_exact_subscriber(&self.channel(&e.user));
                if here {
                    metrics::counter!("herald_inbox_push_skipped_total", "reason" => "connected")
                        .increment(1);
                }
                !here
            })
            .collect();
        if created.is_empty() {
            return;
        }
        let users: Vec<String> = created
            .iter()
            .map(|e| e.user.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let Some(subscribed) = self.persist(|| inner.store.subscribed(users.clone())).await else {
            metrics::counter!("herald_inbox_push_dropped_total", "reason" => "store")
                .increment(created.len() as u64);
            return;
        };
        let jobs: Vec<PushJob> = created
            .into_iter()
            .filter(|e| subscribed.contains(&e.user))
            .filter_map(|e| {
                let ev: CreatedEvent = serde_json::from_str(&e.payload).ok()?;
                let item = ev.item.filter(|_| ev.kind == "created")?;
                Some(PushJob {
                    key: e.event_id.clone(),
                    user: e.user.clone(),
                    category: item.category.clone(),
                    payload: Payload::of(&item).encode(),
                })
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let n = jobs.len();
        let max = inner.config.queue;
        match self.persist(|| inner.store.record(jobs.clone(), max)).await {
            Some(r) => {
                if r.dropped > 0 {
                    metrics::counter!("herald_inbox_push_dropped_total", "reason" => "full")
                        .increment(r.dropped as u64);
                    tracing::warn!(
                        dropped = r.dropped,
                        max,
                        "inbox push: the pending pushes are at inbox.push.queue; pushes dropped"
                    );
                }
                if r.recorded > 0 {
                    inner.wake.notify_one();
                }
            }
            None => {
                metrics::counter!("herald_inbox_push_dropped_total", "reason" => "store")
                    .increment(n as u64);
            }
        }
    }

    /// `op` until it succeeds, at most [`RECORD_ATTEMPTS`] times; `None` (logged) when it never did.
    async fn persist<T, F>(&self, op: impl Fn() -> F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, PushError>>,
    {
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=RECORD_ATTEMPTS {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) if attempt == RECORD_ATTEMPTS => {
                    tracing::error!(error = %e, "inbox push: cannot record pushes; this batch's pushes are dropped");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbox push: cannot record pushes; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        None
    }

    fn channel(&self, user: &str) -> String {
        format!("{}:#{user}", self.inner.namespace)
    }
}

/// Gives `inbox` Web Push when `inbox.push.enabled` (see [`open`]).
pub fn attach(
    inbox: &super::Inbox,
    hub: &Hub,
    config: &crate::config::Config,
) -> Result<(), crate::config::ConfigError> {
    if config.inbox.push.enabled {
        inbox.attach_push(open(hub, config, inbox.store().clone())?);
    }
    Ok(())
}

/// Opens the subscriptions and the VAPID key where the config says and starts the workers; a failure is
/// a start-up error that names the file.
pub fn open(
    hub: &Hub,
    config: &crate::config::Config,
    inbox: Arc<dyn InboxStore>,
) -> Result<Push, crate::config::ConfigError> {
    use crate::config::ConfigError;
    let key_path = config.vapid_key_path();
    let vapid = Vapid::load_or_create(&key_path).map_err(|e| {
        ConfigError::Invalid(format!(
            "inbox.push.vapid_key ({}): {e}",
            key_path.display()
        ))
    })?;
    let path = config.push_path();
    let store = SqlitePushStore::open(&path).map_err(|e| {
        ConfigError::Invalid(format!(
            "cannot open the push subscriptions at {}: {e}",
            path.display()
        ))
    })?;
    start_configured(hub, config, inbox, Arc::new(store), vapid)
}

/// Like [`attach`], on the Redis engine: subscriptions in the engine's Redis and the cluster's one VAPID
/// key (see [`redis`]).
pub async fn attach_redis(
    inbox: &super::Inbox,
    hub: &Hub,
    config: &crate::config::Config,
) -> Result<(), crate::config::ConfigError> {
    use crate::config::ConfigError;
    if !config.inbox.push.enabled {
        return Ok(());
    }
    let store = RedisPushStore::connect(
        &config.engine.url,
        &config.inbox_prefix(),
        config.engine.connect_timeout,
        config.engine.op_timeout,
    )
    .await
    .map_err(|e| ConfigError::Invalid(format!("cannot open the push subscriptions: {e}")))?;
    if let Some(path) = &config.inbox.push.path {
        tracing::warn!(
            path = %path.display(),
            "inbox.push.path is not used on the Redis engine: the subscriptions are in Redis"
        );
    }
    let key_path = config.vapid_key_path();
    let vapid = vapid::shared_vapid(&store, &key_path)
        .await
        .map_err(|e| match e {
            PushError::Key(_) => ConfigError::Invalid(format!("inbox.push.vapid_key: {e}")),
            _ => ConfigError::Invalid(format!(
                "cannot read the cluster's VAPID key ({}) from Redis: {e}",
                store.vapid_key_name()
            )),
        })?;
    let push = start_configured(hub, config, inbox.store().clone(), Arc::new(store), vapid)?;
    inbox.attach_push(push);
    Ok(())
}

/// Like [`attach`], on the NATS engine: subscriptions in a JetStream bucket and the cluster's one VAPID key
/// (see [`nats`]).
pub async fn attach_nats(
    inbox: &super::Inbox,
    hub: &Hub,
    config: &crate::config::Config,
) -> Result<(), crate::config::ConfigError> {
    use crate::config::ConfigError;
    if !config.inbox.push.enabled {
        return Ok(());
    }
    let store = NatsPushStore::connect(
        &config.engine.url,
        &config.inbox_stem(),
        config.engine.connect_timeout,
        config.engine.op_timeout,
    )
    .await
    .map_err(|e| ConfigError::Invalid(format!("cannot open the push subscriptions: {e}")))?;
    let key_path = config.vapid_key_path();
    let vapid = vapid::shared_vapid(&store, &key_path)
        .await
        .map_err(|e| match e {
            PushError::Key(_) => ConfigError::Invalid(format!("inbox.push.vapid_key: {e}")),
            _ => ConfigError::Invalid(format!(
                "cannot read the cluster's VAPID key ({}) from NATS: {e}",
                store.vapid_key_name()
            )),
        })?;
    let push = start_configured(hub, config, inbox.store().clone(), Arc::new(store), vapid)?;
    inbox.attach_push(push);
    Ok(())
}

fn start_configured(
    hub: &Hub,
    config: &crate::config::Config,
    inbox: Arc<dyn InboxStore>,
    store: Arc<dyn PushStore>,
    vapid: Vapid,
) -> Result<Push, crate::config::ConfigError> {
    Push::start(
        store,
        inbox,
        hub.clone(),
        config.inbox.namespace.clone(),
        config.inbox.push.clone(),
        vapid,
    )
    .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))
}

fn describe_metrics() {
    // The recorder must exist before descriptions are given, or they are lost.
    let _ = crate::metrics::handle();
    metrics::describe_counter!(
        "herald_inbox_push_sent_total",
        "Pushes a push service accepted"
    );
    metrics::describe_counter!(
        "herald_inbox_push_failed_total",
        "Pushes refused by a push service or still failing after inbox.push.retries"
    );
    metrics::describe_counter!(
        "herald_inbox_push_removed_total",
        "Subscriptions removed because their push service answered 404 or 410"
    );
    metrics::describe_counter!(
        "herald_inbox_push_dropped_total",
        "Pushes not recorded: reason=full (inbox.push.queue pushes pending) or store (the push store kept failing)"
    );
    metrics::describe_counter!(
        "herald_inbox_push_skipped_total",
        "Pushes not sent: reason=connected (the user reads the inbox live, on any node), muted (preferences) or unsubscribed"
    );
    metrics::describe_counter!(
        "herald_inbox_push_presence_unknown_total",
        "Pushes sent although the cluster could not say whether the user is connected elsewhere"
    );
    metrics::describe_gauge!(
        "herald_inbox_push_pending",
        "Pushes recorded and not yet sent or given up (the whole cluster's on Redis), read when the workers are idle"
    );
}

/// How long a claimed push is held before another claim may take it: longer than an attempt can take
/// (a presence read, a preferences read, the request), so only a dead or stalled claimer loses it.
fn lease(config: &PushConfig) -> Duration {
    config.timeout * 2 + Duration::from_secs(30)
}

/// Claims due pushes while a worker is free and hands each to a task of its own; otherwise sleeps until
/// the next push is due, a batch is recorded, or [`POLL`] passes.
async fn dispatcher(inner: Arc<PushInner>) {
    let shutdown = inner.hub.shutdown_token();
    let slots = Arc::new(Semaphore::new(inner.config.workers));
    let lease = lease(&inner.config);
    let mut failing = false;
    loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let wait = match inner.store.claim(permits.len(), lease).await {
            Ok(due) if !due.is_empty() => {
                failing = false;
                for (d, permit) in due.into_iter().zip(permits) {
                    let inner = inner.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = attempt(&inner, d) => {}
                            () = shutdown.cancelled() => {}
                        }
                        drop(permit);
                    });
                }
                continue;
            }
            Ok(_) => {
                failing = false;
                drop(permits);
                if let Ok(n) = inner.store.pending().await {
                    metrics::gauge!("herald_inbox_push_pending").set(n as f64);
                }
                match inner.store.next_due().await {
                    Ok(Some(d)) => d.min(POLL),
                    _ => POLL,
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "inbox push: cannot claim pending pushes; retrying");
                }
                failing = true;
                drop(permits);
                POLL
            }
        };
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// How one attempt at a claimed push ended.
enum Next {
    /// Forget it (sent, gone, muted, connected, given up).
    Done,
    /// Try again after this long.
    Retry(Duration),
}

/// One attempt at one claimed push; then it is finished or put back for a retry.
async fn attempt(inner: &PushInner, due: Due) {
    let next = try_once(inner, &due).await;
    let id = due.id.clone();
    let r = match next {
        Next::Done => inner.store.finish(id).await,
        Next::Retry(after) => inner.store.retry(id, after, due.attempts + 1).await,
    };
    if let Err(e) = r {
        // The claim runs out and the push is tried again: a repeat at worst, never a loss.
        tracing::warn!(error = %e, "inbox push: cannot update a pending push");
    }
}

/// What to do after a failure that may pass: retry after `pause` while attempts are left and the pause
/// is not beyond [`MAX_RETRY_WAIT`] (a push that late is worse than none), else give up.
fn retry_or_give_up(inner: &PushInner, due: &Due, pause: Duration, origin: &str) -> Next {
    if due.attempts >= inner.config.retries {
        tracing::warn!(origin, "inbox push: failed after retries");
    } else if pause > MAX_RETRY_WAIT {
        tracing::warn!(
            origin,
            ?pause,
            "inbox push: Retry-After too long; push dropped"
        );
    } else {
        return Next::Retry(pause);
    }
    metrics::counter!("herald_inbox_push_failed_total").increment(1);
    Next::Done
}

async fn try_once(inner: &PushInner, due: &Due) -> Next {
    let channel = format!("{}:#{}", inner.namespace, due.user);
    match inner.hub.subscribed_anywhere(&channel).await {
        Ok(true) => {
            metrics::counter!("herald_inbox_push_skipped_total", "reason" => "connected")
                .increment(1);
            return Next::Done;
        }
        Ok(false) => {}
        Err(e) => {
            // Unknown is pushed: a notification shown twice beats one never shown.
            tracing::debug!(error = %e, "inbox push: cannot ask the cluster who is connected; pushing");
            metrics::counter!("herald_inbox_push_presence_unknown_total").increment(1);
        }
    }
    let backoff = inner.config.retry_delay * 2u32.saturating_pow(due.attempts.min(16));
    let backoff = backoff.min(MAX_RETRY_WAIT);
    match inner.inbox.preferences(due.user.clone()).await {
        Ok(p) if !p.allows(&due.category, "push") => {
            metrics::counter!("herald_inbox_push_skipped_total", "reason" => "muted").increment(1);
            return Next::Done;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, user = due.user, "inbox push: cannot read preferences");
            return retry_or_give_up(inner, due, backoff, "");
        }
    }
    let sub = match inner.store.list(due.user.clone()).await {
        Ok(subs) => subs.into_iter().find(|s| s.endpoint == due.endpoint),
        Err(e) => {
            tracing::warn!(error = %e, user = due.user, "inbox push: cannot read subscriptions");
            return retry_or_give_up(inner, due, backoff, "");
        }
    };
    let Some(sub) = sub else {
        // Unsubscribed (or moved to another user) since the push was recorded.
        metrics::counter!("herald_inbox_push_skipped_total", "reason" => "unsubscribed")
            .increment(1);
        return Next::Done;
    };
    let origin = origin(&sub.endpoint);
    match send(inner, &sub, &due.payload).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match status {
                200..=299 => {
                    metrics::counter!("herald_inbox_push_sent_total").increment(1);
                    Next::Done
                }
                404 | 410 => {
                    if let Err(e) = inner.store.remove_endpoint(sub.endpoint.clone()).await {
                        tracing::warn!(error = %e, "inbox push: cannot remove a gone subscription");
                    }
                    metrics::counter!("herald_inbox_push_removed_total").increment(1);
                    tracing::debug!(origin, status, "inbox push: subscription gone, removed");
                    Next::Done
                }
                429 | 500..=599 => {
                    let pause = retry_after(resp.headers()).unwrap_or(backoff);
                    retry_or_give_up(inner, due, pause, &origin)
                }
                _ => {
                    let body = resp.text().await.unwrap_or_default();
                    let body: String = body.chars().take(200).collect();
                    tracing::warn!(
                        origin,
                        status,
                        body,
                        "inbox push: refused by the push service"
                    );
                    metrics::counter!("herald_inbox_push_failed_total").increment(1);
                    Next::Done
                }
            }
        }
        Err(e) => {
            tracing::debug!(origin, error = %e, "inbox push: request failed");
            retry_or_give_up(inner, due, backoff, &origin)
        }
    }
}

async fn send(
    inner: &PushInner,
    sub: &Subscription,
    payload: &[u8],
) -> Result<reqwest::Response, String> {
    let key = b64(&sub.p256dh)
        .ok()
        .and_then(|k| web_push_native::p256::PublicKey::from_sec1_bytes(&k).ok())
        .ok_or("stored p256dh is not a P-256 point")?;
    let auth = b64(&sub.auth)
        .ok()
        .filter(|a| a.len() == 16)
        .ok_or("stored auth is not 16 bytes")?;
    let auth: [u8; 16] = auth.try_into().map_err(|_| "stored auth is not 16 bytes")?;
    let auth = web_push_native::Auth::from(auth);
    let body =
        web_push_native::encrypt(payload.to_vec(), &key, &auth).map_err(|e| e.to_string())?;
    let authorization = inner
        .vapid
        .authorization(&origin(&sub.endpoint), &inner.config.subject)
        .map_err(|e| e.to_string())?;
    inner
        .client
        .post(&sub.endpoint)
        .header("TTL", inner.config.ttl.as_secs().to_string())
        .header("Urgency", inner.config.urgency.as_str())
        .header(http::header::CONTENT_ENCODING, "aes128gcm")
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::AUTHORIZATION, authorization)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())
}

/// The endpoint's origin (`scheme://host[:port]`): the VAPID audience.
pub fn origin(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(u) => match (u.scheme_str(), u.authority()) {
            (Some(s), Some(a)) => {
                let a = a.as_str().rsplit('@').next().unwrap_or_default();
                format!("{s}://{a}")
            }
            _ => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(h: &http::HeaderMap) -> Option<Duration> {
    let v = h.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Signed VAPID tokens by audience, reused until an hour before they expire (signing is cheap, but a
/// burst to one push service needs one token, not thousands).
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: parking_lot::Mutex<HashMap<String, (String, Instant)>>,
}

impl TokenCache {
    pub(crate) fn get_or(
        &self,
        aud: &str,
        make: impl FnOnce() -> Result<(String, Instant), PushError>,
    ) -> Result<String, PushError> {
        let now = Instant::now();
        let mut t = self.tokens.lock();
        if let Some((tok, until)) = t.get(aud) {
            if *until > now {
                return Ok(tok.clone());
            }
        }
        if t.len() > 1000 {
            t.retain(|_, (_, until)| *until > now);
        }
        let (tok, until) = make()?;
        t.insert(aud.to_string(), (tok.clone(), until));
        Ok(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(endpoint: &str) -> SubscriptionInput {
        let secret = web_push_native::p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;
        let p = secret.public_key().to_encoded_point(false);
        SubscriptionInput {
            endpoint: endpoint.into(),
            keys: SubscriptionKeys {
                p256dh: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(p.as_bytes()),
                auth: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([1u8; 16]),
            },
        }
    }

    #[test]
    fn endpoints_are_https_push_services() {
        assert!(validate(input("https://fcm.googleapis.com/fcm/send/abc"), false).is_ok());
        for bad in [
            "http://push.example.com/x",
            "http://127.0.0.1:8090/notify/x",
            "https://10.0.0.1/x",
            "https://127.0.0.1/x",
            "https://[::1]/x",
            "ftp://push.example.com/x",
            "not a url",
            "",
        ] {
            let e = validate(input(bad), false).unwrap_err();
            assert!(
                matches!(e, PushError::Invalid("invalid_endpoint", _)),
                "{bad}: {e:?}"
            );
        }
        // The test flag lets loopback http through, and only loopback.
        assert!(validate(input("http://127.0.0.1:8090/notify/x"), true).is_ok());
        assert!(validate(input("http://localhost:8090/notify/x"), true).is_ok());
        assert!(validate(input("http://push.example.com/x"), true).is_err());
        assert!(validate(input("https://10.0.0.1/x"), true).is_err());
    }

    #[test]
    fn keys_are_checked() {
        let mut i = input("https://push.example.com/x");
        i.keys.auth = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([1u8; 15]);
        assert!(matches!(
            validate(i, false),
            Err(PushError::Invalid("invalid_key", _))
        ));
        let mut i = input("https://push.example.com/x");
        i.keys.p256dh = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([4u8; 65]);
        assert!(matches!(
            validate(i, false),
            Err(PushError::Invalid("invalid_key", _))
        ));
    }

    #[test]
    fn payload_fits_a_push() {
        let item = NewItem {
            title: "t".into(),
            body: "é".repeat(4000),
            data: Some(serde_json::json!({"k": "v".repeat(3000)})),
            ..Default::default()
        };
        let out = Payload::new(1, &item).encode();
        assert!(out.len() <= MAX_PAYLOAD, "{}", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["title"], "t");
        assert!(v["data"].is_null());
        assert!(v["body"].as_str().unwrap().ends_with('…'));
    }

    #[test]
    fn origins_and_retry_after() {
        assert_eq!(
            origin("https://fcm.googleapis.com/fcm/send/abc"),
            "https://fcm.googleapis.com"
        );
        assert_eq!(
            origin("http://localhost:8090/notify/x"),
            "http://localhost:8090"
        );
        let mut h = http::HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        h.insert(
            http::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
    }

    /// RFC 8291 Appendix A: the user agent's keys and the message the application server made for it.
    /// Decrypting it exercises the same key derivation (ECDH, the `WebPush: info` HKDF, the aes128gcm
    /// content encoding) that [`web_push_native::encrypt`] uses; the round trip below checks our side.
    #[test]
    fn rfc8291_appendix_a_vector() {
        let d = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let ua_private = d("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94");
        let ua_public = d("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4");
        let auth = d("BTBZMqHH6r4Tts7J_aSIgg");
        let message = d("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN");
        let secret = web_push_native::p256::SecretKey::from_slice(&ua_private).unwrap();
        use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;
        assert_eq!(
            secret.public_key().to_encoded_point(false).as_bytes(),
            &ua_public[..]
        );
        let auth = web_push_native::Auth::from(<[u8; 16]>::try_from(&auth[..]).unwrap());
        let plain = web_push_native::decrypt(message.clone(), &secret, &auth).unwrap();
        assert_eq!(plain, b"When I grow up, I want to be a watermelon");

        // A changed byte of the ciphertext or a wrong auth secret must not decrypt.
        let mut broken = message;
        let n = broken.len();
        broken[n - 1] ^= 1;
        assert!(web_push_native::decrypt(broken, &secret, &auth).is_err());

        // What we send to this user agent decrypts with its key to what we sent.
        let payload = Payload::new(
            9,
            &NewItem {
                title: "Hello".into(),
                body: "world".into(),
                ..Default::default()
            },
        )
        .encode();
        let sealed =
            web_push_native::encrypt(payload.clone(), &secret.public_key(), &auth).unwrap();
        assert_ne!(sealed, payload);
        assert_eq!(
            web_push_native::decrypt(sealed, &secret, &auth).unwrap(),
            payload
        );
    }
}
