//! The notification centre: a durable inbox per user, with exact counts and live events on every device.
//!
//! Why it is built this way:
//! - **Counts are rows, changed in the same commit as the items.** Badges that drift come from counts
//!   cached apart from the data; here every change computes what the item contributed before and after and
//!   applies the difference to the per-category counts inside the transaction that changes the item. A
//!   start-up check (in the background on SQLite) compares them with the items and repairs (and
//!   reports) any difference.
//! - **Events are written in the same commit too** (an outbox table), then published on the user's own
//!   channel (`<namespace>:#<user>`) through [`Hub::publish`], with an id of their own. A crash between the
//!   commit and the publish leaves the event in the outbox, and the next start publishes it (unless the log
//!   already has its id). So an event exists for every committed change, exactly once, in the user's order.
//! - **Every event carries the inbox's version** (a per-user counter bumped by each change) and the new
//!   counts. A page is read at a version and at a log position taken just before the read: a client that
//!   subscribes from that position and ignores events at or below the page's version misses nothing and
//!   applies nothing twice.
//! - **The store is a seam** ([`InboxStore`]): SQLite on one node ([`sqlite`]), Redis for a cluster on
//!   the Redis engine ([`redis`]: one node at a time drains the shared outbox), NATS JetStream for a
//!   cluster on the NATS engine ([`nats`]: a head entry per user, committed conditionally on its revision).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::config::InboxConfig;
use crate::engine::BoxFuture;
use crate::hub::{Hub, NewPublication};

pub mod api;
pub mod browser;
pub mod nats;
pub mod push;
pub mod redis;
pub mod sqlite;

pub use nats::NatsInbox;
pub use redis::RedisInbox;
pub use sqlite::SqliteInbox;

/// Longest user id: it is part of a channel name (255 bytes at most) and of event ids.
pub const MAX_USER_LEN: usize = 128;
pub const MAX_CATEGORY_LEN: usize = 64;
pub const MAX_TITLE_LEN: usize = 512;
pub const MAX_BODY_LEN: usize = 4096;
pub const MAX_URL_LEN: usize = 2048;
pub const MAX_ACTIONS: usize = 4;
pub const MAX_ACTION_ID_LEN: usize = 64;
pub const MAX_ACTION_LABEL_LEN: usize = 128;
/// `data`, serialized.
pub const MAX_DATA_LEN: usize = 4096;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Most items one list page returns.
pub const MAX_PAGE: usize = 200;
/// An `updated` event lists at most this many items; a larger change is a `bulk` event (the filter and
/// the new counts), so that an event stays far below the message size limit.
pub const MAX_EVENT_ITEMS: usize = 200;

/// How a store built on optimistic concurrency (Redis, NATS) retries a change that met a concurrent
/// change of the same inbox: the change is read, computed and committed again, after a short jittered,
/// growing wait, at most `attempts` times; then the caller gets a 503 to retry.
pub(crate) struct Contention {
    pub attempts: u32,
    /// The wait's unit: attempt `n` waits up to `(n + 1) * 256 * step`.
    pub step: Duration,
}

impl Contention {
    /// Waits before the attempt after `attempt` (jittered, so racing writers spread out).
    pub async fn back_off(&self, attempt: u32) {
        let r = u32::from(uuid::Uuid::new_v4().as_bytes()[0]);
        tokio::time::sleep(self.step * ((attempt.min(20) + 1) * (r + 1))).await;
    }

    /// The error once every attempt met a concurrent change.
    pub fn exhausted(&self, what: &str) -> InboxError {
        InboxError::Storage(format!(
            "{what}: the inbox kept changing under {} attempts; try again",
            self.attempts
        ))
    }

    /// Runs `attempt` until it commits (`Some`), backing off after each `None` (a concurrent change won).
    pub async fn run<T, F>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, InboxError>
    where
        F: std::future::Future<Output = Result<Option<T>, InboxError>>,
    {
        for n in 0..self.attempts {
            if let Some(done) = attempt().await? {
                return Ok(done);
            }
            self.back_off(n).await;
        }
        Err(self.exhausted(what))
    }
}

/// An event's kind and payload, as every store writes it.
pub(crate) type EventBody = (&'static str, serde_json::Map<String, serde_json::Value>);

/// The event of a change that set `patch` on `changed` (their new states): `updated` listing each item's
/// state, or past `MAX_EVENT_ITEMS` a `bulk` event that names the change instead (target, what was set,
/// how many), so an event stays small. One shape for every store.
pub(crate) fn updated_event(changed: &[Item], target: &Target, patch: &Patch) -> EventBody {
    let mut payload = serde_json::Map::new();
    if changed.len() <= MAX_EVENT_ITEMS {
        let states: Vec<_> = changed.iter().map(Item::state).collect();
        payload.insert("items".into(), serde_json::json!(states));
        ("updated", payload)
    } else {
        payload.insert("target".into(), serde_json::json!(target));
        payload.insert("set".into(), serde_json::json!(patch));
        payload.insert("changed".into(), serde_json::json!(changed.len()));
        ("bulk", payload)
    }
}

/// The event of a removal of the items `ids`: `removed` listing them, or past `MAX_EVENT_ITEMS` a `bulk`
/// event naming the target and how many went.
pub(crate) fn removed_event(ids: &[i64], target: &Target) -> EventBody {
    let mut payload = serde_json::Map::new();
    if ids.len() <= MAX_EVENT_ITEMS {
        payload.insert("ids".into(), serde_json::json!(ids));
        ("removed", payload)
    } else {
        payload.insert("target".into(), serde_json::json!(target));
        payload.insert("removed".into(), serde_json::json!(ids.len()));
        ("bulk", payload)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("{1}")]
    Invalid(&'static str, String),
    #[error("{0}")]
    NotFound(String),
    #[error("too many changes: retry after {0:?}")]
    RateLimited(Duration),
    #[error("inbox storage failed: {0}")]
    Storage(String),
    #[error("the inbox is closed")]
    Closed,
}

impl From<rusqlite::Error> for InboxError {
    fn from(e: rusqlite::Error) -> Self {
        InboxError::Storage(e.to_string())
    }
}

impl From<InboxError> for crate::error::ApiError {
    fn from(e: InboxError) -> Self {
        use crate::error::ApiError;
        use axum::http::StatusCode;
        match &e {
            InboxError::Invalid(code, _) => ApiError::bad_request(code, e.to_string()),
            InboxError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "item_not_found", e.to_string())
            }
            InboxError::RateLimited(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string())
            }
            InboxError::Storage(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "inbox_unavailable",
                e.to_string(),
            ),
            InboxError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
        }
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> InboxError {
    InboxError::Invalid(code, message.into())
}

/// A user id that may own an inbox: it becomes the `#` list of a channel, where a comma would name a
/// second user who could then read the inbox.
pub fn check_user(user: &str) -> Result<(), InboxError> {
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return Err(invalid(
            "invalid_user",
            format!("a user id must have 1 to {MAX_USER_LEN} bytes"),
        ));
    }
    if user.contains(',') || user.chars().any(char::is_control) {
        return Err(invalid(
            "invalid_user",
            format!("user id {user:?} contains a comma or a control character"),
        ));
    }
    Ok(())
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), InboxError> {
    if value.len() > max {
        return Err(invalid(
            "field_too_long",
            format!("{field} has {} bytes, at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

fn check_category(c: &str) -> Result<(), InboxError> {
    if c.is_empty() || c.chars().any(char::is_control) {
        return Err(invalid(
            "invalid_category",
            "a category must be non-empty text without control characters",
        ));
    }
    check_len("category", c, MAX_CATEGORY_LEN)
}

/// A button on a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemAction {
    pub id: String,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What a backend sends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewItem {
    pub category: Option<String>,
    pub title: String,
    pub body: String,
    pub avatar: Option<String>,
    pub action_url: Option<String>,
    pub actions: Vec<ItemAction>,
    pub data: Option<serde_json::Value>,
    /// When the item removes itself (Unix milliseconds).
    pub expires_at: Option<i64>,
}

pub const DEFAULT_CATEGORY: &str = "general";

impl NewItem {
    pub fn category(&self) -> &str {
        self.category.as_deref().unwrap_or(DEFAULT_CATEGORY)
    }

    /// Checks every field against its limit.
    /// The item as a store keeps it once created with `id` at `now`: every state unset.
    pub fn stored(&self, id: i64, now: i64) -> Item {
        Item {
            id,
            category: self.category().to_string(),
            title: self.title.clone(),
            body: self.body.clone(),
            avatar: self.avatar.clone(),
            action_url: self.action_url.clone(),
            actions: self.actions.clone(),
            data: self.data.clone(),
            created_at: now,
            expires_at: self.expires_at,
            read_at: None,
            seen_at: None,
            archived_at: None,
            snoozed_until: None,
            action: None,
        }
    }

    pub fn validate(&self) -> Result<(), InboxError> {
        check_category(self.category())?;
        if self.title.trim().is_empty() {
            return Err(invalid("missing_title", "title is required"));
        }
        check_len("title", &self.title, MAX_TITLE_LEN)?;
        check_len("body", &self.body, MAX_BODY_LEN)?;
        for (name, v) in [("avatar", &self.avatar), ("action_url", &self.action_url)] {
            if let Some(v) = v {
                check_len(name, v, MAX_URL_LEN)?;
            }
        }
        if self.actions.len() > MAX_ACTIONS {
            return Err(invalid(
                "too_many_actions",
                format!("{} actions, at most {MAX_ACTIONS}", self.actions.len()),
            ));
        }
        for (i, a) in self.actions.iter().enumerate() {
            if a.id.is_empty() || a.label.is_empty() {
                return Err(invalid(
                    "invalid_action",
                    "an action needs an id and a label",
                ));
            }
            check_len("actions[].id", &a.id, MAX_ACTION_ID_LEN)?;
            check_len("actions[].label", &a.label, MAX_ACTION_LABEL_LEN)?;
            if let Some(u) = &a.url {
                check_len("actions[].url", u, MAX_URL_LEN)?;
            }
            if self.actions[..i].iter().any(|b| b.id == a.id) {
                return Err(invalid(
                    "invalid_action",
                    format!("two actions have the id {:?}", a.id),
                ));
            }
        }
        if let Some(d) = &self.data {
            let n = d.to_string().len();
            if n > MAX_DATA_LEN {
                return Err(invalid(
                    "field_too_long",
                    format!("data has {n} bytes serialized, at most {MAX_DATA_LEN} allowed"),
                ));
            }
        }
        Ok(())
    }
}

/// A stored notification. Times are Unix milliseconds; a state is the time it was set, `None` when not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: i64,
    pub category: String,
    pub title: String,
    pub body: String,
    pub avatar: Option<String>,
    pub action_url: Option<String>,
    pub actions: Vec<ItemAction>,
    pub data: Option<serde_json::Value>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub read_at: Option<i64>,
    pub seen_at: Option<i64>,
    pub archived_at: Option<i64>,
    pub snoozed_until: Option<i64>,
    /// The id of the action the user took.
    pub action: Option<String>,
}

/// An item's states, as an `updated` event carries them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemState {
    pub id: i64,
    pub read_at: Option<i64>,
    pub seen_at: Option<i64>,
    pub archived_at: Option<i64>,
    pub snoozed_until: Option<i64>,
    pub action: Option<String>,
}

impl Item {
    pub fn state(&self) -> ItemState {
        ItemState {
            id: self.id,
            read_at: self.read_at,
            seen_at: self.seen_at,
            archived_at: self.archived_at,
            snoozed_until: self.snoozed_until,
            action: self.action.clone(),
        }
    }
}

/// Counts of one category, or of a whole inbox. Unread and unseen count items that are neither archived
/// nor snoozed: what a badge shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub total: i64,
    pub unread: i64,
    pub unseen: i64,
    pub archived: i64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally, sign: i64) {
        self.total += sign * o.total;
        self.unread += sign * o.unread;
        self.unseen += sign * o.unseen;
        self.archived += sign * o.archived;
    }
    pub fn is_zero(&self) -> bool {
        *self == Tally::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(flatten)]
    pub all: Tally,
    pub categories: BTreeMap<String, Tally>,
}

impl Counts {
    pub fn from_categories(categories: BTreeMap<String, Tally>) -> Counts {
        let mut all = Tally::default();
        for t in categories.values() {
            all.add(t, 1);
        }
        Counts { all, categories }
    }
}

/// Which items a list returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    All,
    Unread,
    Read,
    Unseen,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Archived {
    /// Items not archived (the default view).
    #[default]
    False,
    True,
    All,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ListQuery {
    pub status: Status,
    pub archived: Archived,
    pub category: Option<String>,
    /// Include snoozed items (hidden by default until they wake).
    pub snoozed: bool,
    /// Items with an id below this (the previous page's `next_cursor`).
    pub cursor: Option<i64>,
    pub limit: Option<usize>,
}

/// A page of an inbox, read in one snapshot with its counts and version.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub items: Vec<Item>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<i64>,
    pub counts: Counts,
    pub version: i64,
}

/// A change of states. `None` leaves a state alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Patch {
    pub read: Option<bool>,
    pub seen: Option<bool>,
    pub archived: Option<bool>,
    /// Snooze until this time (Unix ms), or `0` to wake now.
    pub snoozed_until: Option<i64>,
    /// Take the action with this id (also marks the item read and seen).
    pub action: Option<String>,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        *self == Patch::default()
    }

    /// Whether this patch can apply to `target` at `now`, checked before any store reads: a snooze must
    /// end in the future (or be 0, to wake), and an action is taken on items named by id. One rule for
    /// every store, as for `apply`.
    pub fn check(&self, target: &Target, now: i64) -> Result<(), InboxError> {
        if let Some(t) = self.snoozed_until {
            if t != 0 && t <= now {
                return Err(invalid(
                    "invalid_snooze",
                    "snoozed_until must be in the future (or 0 to wake the item)",
                ));
            }
        }
        if self.action.is_some() && !matches!(target, Target::Ids(_)) {
            return Err(invalid(
                "invalid_change",
                "an action is taken on items named by id",
            ));
        }
        Ok(())
    }

    /// `item` with this patch applied at `now`: the one rule every store applies, so a change means the
    /// same whichever store keeps the inbox. Setting a state keeps its first time; an action marks the
    /// item read and seen too.
    pub fn apply(&self, item: &Item, now: i64) -> Result<Item, InboxError> {
        let set = |cur: Option<i64>, want: Option<bool>| match want {
            Some(true) => cur.or(Some(now)),
            Some(false) => None,
            None => cur,
        };
        let mut new = item.clone();
        if let Some(a) = &self.action {
            if !item.actions.iter().any(|x| &x.id == a) {
                return Err(invalid(
                    "unknown_action",
                    format!("item {} has no action {a:?}", item.id),
                ));
            }
            new.action = Some(a.clone());
            new.read_at = new.read_at.or(Some(now));
            new.seen_at = new.seen_at.or(Some(now));
        }
        new.read_at = set(new.read_at, self.read);
        new.seen_at = set(new.seen_at, self.seen);
        new.archived_at = set(new.archived_at, self.archived);
        match self.snoozed_until {
            Some(0) => new.snoozed_until = None,
            Some(t) => new.snoozed_until = Some(t),
            None => {}
        }
        Ok(new)
    }
}

/// Which items a change applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// These items; any id not in the inbox fails the whole change with 404.
    Ids(Vec<i64>),
    /// Every item with an id up to `upto` (a position a client has seen), optionally of one category:
    /// "mark all read" that leaves newer items alone.
    UpTo {
        upto: i64,
        #[serde(default)]
        category: Option<String>,
    },
}

/// The result of a change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Changed {
    /// Items that changed (0 when the change repeated the current state: no event then).
    pub changed: usize,
    pub counts: Counts,
    pub version: i64,
    /// The outbox position of the change's event, if it made one (the publisher's progress is compared
    /// with it).
    #[serde(skip)]
    pub event: Option<i64>,
}

/// What `notify` did for one user.
#[derive(Debug, Clone, Serialize)]
pub struct Delivered {
    pub user: String,
    /// The item's id; for a repeated idempotency key, the id of the item it made the first time.
    pub id: Option<i64>,
    /// `created`, `duplicate` (the key was used before) or `muted` (the user turned the category off).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NotifyResult {
    pub delivered: Vec<Delivered>,
    #[serde(skip)]
    pub event: Option<i64>,
}

/// What a notification to an audience did, in numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudienceResult {
    pub created: u64,
    pub duplicate: u64,
    pub muted: u64,
}

/// A user's choices per category and channel (`inbox`, `push`); a category not listed is on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Preferences {
    pub categories: BTreeMap<String, BTreeMap<String, bool>>,
}

pub const PREFERENCE_CHANNELS: &[&str] = &["inbox", "push"];

impl Preferences {
    pub fn allows(&self, category: &str, channel: &str) -> bool {
        self.categories
            .get(category)
            .and_then(|c| c.get(channel))
            .copied()
            .unwrap_or(true)
    }

    pub fn validate(&self) -> Result<(), InboxError> {
        if self.categories.len() > 100 {
            return Err(invalid("too_many_categories", "at most 100 categories"));
        }
        for (c, channels) in &self.categories {
            check_category(c)?;
            if let Some(bad) = channels
                .keys()
                .find(|k| !PREFERENCE_CHANNELS.contains(&k.as_str()))
            {
                return Err(invalid(
                    "invalid_channel",
                    format!("unknown channel {bad:?}; channels are {PREFERENCE_CHANNELS:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// A committed event waiting to be published.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub seq: i64,
    pub user: String,
    pub event_id: String,
    pub payload: String,
    /// The store found it in the log already (a drainer that died before clearing it): not published
    /// again, but still handed over, so what follows publication (Web Push) is not skipped.
    pub in_log: bool,
}

/// Figures for `inbox_stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub users: i64,
    pub items: i64,
    pub pending_events: i64,
    /// Differences between the stored counts and a recount of the items (0 unless something is wrong).
    pub count_mismatches: i64,
    /// The check of every inbox's counts that this node ran when it opened the store.
    pub startup_check: StartupCheck,
}

/// The start-up check: every inbox recounted from its items, and counts that differ rewritten. On SQLite
/// it runs in the background while Herald serves (so `finished` may be false for a while on a large
/// file); on Redis and NATS it ends before the node serves.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartupCheck {
    /// Every inbox has been checked (none left that the check has not reached).
    pub finished: bool,
    /// Inboxes checked so far.
    pub users_checked: i64,
    /// (user, category) counts found different from the items and rewritten.
    pub repaired: i64,
    /// How long the whole check took, once finished.
    pub duration_ms: Option<u64>,
    /// Why the check stopped before the end (the inboxes it had not reached are unchecked).
    pub error: Option<String>,
}

/// Where inboxes are kept. Every change commits its items, counts and event together.
pub trait InboxStore: Send + Sync + 'static {
    fn notify(
        &self,
        users: Vec<String>,
        item: NewItem,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'_, Result<NotifyResult, InboxError>>;
    fn list(&self, user: String, q: ListQuery) -> BoxFuture<'_, Result<Page, InboxError>>;
    /// Users that have an inbox, sorted, after `after`, at most `limit` (for audiences).
    fn users(&self, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, InboxError>>;
    fn counts(&self, user: String) -> BoxFuture<'_, Result<(Counts, i64), InboxError>>;
    fn get(&self, user: String, id: i64) -> BoxFuture<'_, Result<Item, InboxError>>;
    fn update(
        &self,
        user: String,
        target: Target,
        patch: Patch,
    ) -> BoxFuture<'_, Result<Changed, InboxError>>;
    fn remove(&self, user: String, target: Target) -> BoxFuture<'_, Result<Changed, InboxError>>;
    fn preferences(&self, user: String) -> BoxFuture<'_, Result<Preferences, InboxError>>;
    fn set_preferences(
        &self,
        user: String,
        prefs: Preferences,
    ) -> BoxFuture<'_, Result<Changed, InboxError>>;
    /// Wakes snoozed items whose time has come and removes expired ones, as changes with events.
    fn sweep(&self, now_ms: i64) -> BoxFuture<'_, Result<Option<i64>, InboxError>>;
    /// Committed events not yet published, oldest first.
    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PendingEvent>, InboxError>>;
    /// Forgets published events up to `seq`.
    fn published(&self, upto: i64) -> BoxFuture<'_, Result<(), InboxError>>;
    /// The outbox position up to which events are published by whichever node publishes them (a cluster
    /// store, where one node drains the shared outbox); `None` when only this node's publisher does.
    fn published_upto(&self) -> BoxFuture<'_, Result<Option<i64>, InboxError>> {
        Box::pin(async { Ok(None) })
    }
    /// Compares the counts with the items and, with `repair`, rewrites the ones that differ; returns how
    /// many differed.
    fn recount(&self, repair: bool) -> BoxFuture<'_, Result<i64, InboxError>>;
    fn stats(&self) -> BoxFuture<'_, Result<Stats, InboxError>>;
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Per-user token buckets for the browser API's changes.
struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: parking_lot::Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    fn check(&self, user: &str) -> Result<(), InboxError> {
        let now = Instant::now();
        let mut b = self.buckets.lock();
        if b.len() > 100_000 {
            // Full buckets carry no information: forget them rather than grow without bound.
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = b.entry(user.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / self.rate;
            Err(InboxError::RateLimited(Duration::from_secs_f64(wait)))
        }
    }
}

/// The inbox service: a store, the publisher of its events, the limits. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<InboxInner>,
}

struct InboxInner {
    store: Arc<dyn InboxStore>,
    hub: Hub,
    config: InboxConfig,
    /// Wakes the publisher after a commit that made events.
    wake: Notify,
    /// The outbox position published up to.
    published: watch::Sender<i64>,
    limiter: RateLimiter,
    /// Web Push, when `inbox.push.enabled` (attached after the start).
    push: std::sync::OnceLock<push::Push>,
}

/// How long a request waits for its change's event to be in the log before answering anyway (the event
/// still follows: it is committed in the outbox).
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

impl Inbox {
    /// Starts the service on `store`: publishes what an earlier run left in the outbox, then every new
    /// event, and sweeps snoozes and expiries every second. Needs a tokio runtime. With
    /// `config.push.enabled` nothing is published until [`Inbox::attach_push`] (so pushes of what the
    /// outbox holds are not skipped): attach it right after the start.
    pub fn start(store: Arc<dyn InboxStore>, hub: Hub, config: InboxConfig) -> Inbox {
        let rate = f64::from(config.user_rate);
        let inner = Arc::new(InboxInner {
            store,
            hub,
            config,
            wake: Notify::new(),
            published: watch::channel(0).0,
            limiter: RateLimiter {
                rate,
                burst: rate * 2.0,
                buckets: Default::default(),
            },
            push: std::sync::OnceLock::new(),
        });
        tokio::spawn(publisher(inner.clone()));
        tokio::spawn(sweeper(inner.clone()));
        Inbox { inner }
    }

    pub fn store(&self) -> &Arc<dyn InboxStore> {
        &self.inner.store
    }

    pub fn config(&self) -> &InboxConfig {
        &self.inner.config
    }

    /// Sends the notifications published from now on (those an earlier run left in the outbox included)
    /// to users who are not connected. Once: a second call is ignored.
    pub fn attach_push(&self, push: push::Push) {
        let _ = self.inner.push.set(push);
        self.inner.wake.notify_one();
    }

    pub fn push(&self) -> Option<&push::Push> {
        self.inner.push.get()
    }

    /// The channel a user's inbox events are published on.
    pub fn channel(&self, user: &str) -> String {
        format!("{}:#{user}", self.inner.config.namespace)
    }

    /// Whether `topic` is an inbox channel: only the inbox publishes there (an event forged by a publisher
    /// with a broad grant would corrupt every device's view, whose order rests on the versions).
    pub fn owns(&self, topic: &str) -> bool {
        crate::channel::namespace_of(topic) == self.inner.config.namespace
    }

    /// Counts a change of `user` against the per-user rate.
    pub fn limit(&self, user: &str) -> Result<(), InboxError> {
        self.inner.limiter.check(user)
    }

    /// Waits (boundedly) until the event at outbox position `seq` is published, so that an answer to a
    /// change is followed by nothing the client could miss by reading the log right after it.
    pub async fn settle(&self, seq: Option<i64>) {
        let Some(seq) = seq else { return };
        self.inner.wake.notify_one();
        let mut rx = self.inner.published.subscribe();
        let _ = tokio::time::timeout(PUBLISH_WAIT, rx.wait_for(|p| *p >= seq)).await;
    }

    pub async fn notify(
        &self,
        users: Vec<String>,
        item: NewItem,
        idempotency_key: Option<String>,
    ) -> Result<NotifyResult, InboxError> {
        if users.is_empty() {
            return Err(invalid("missing_users", "users is required"));
        }
        if users.len() > self.inner.config.max_users {
            return Err(invalid(
                "too_many_users",
                format!(
                    "{} users in one notify, at most {} (inbox.max_users)",
                    users.len(),
                    self.inner.config.max_users
                ),
            ));
        }
        for u in &users {
            check_user(u)?;
        }
        item.validate()?;
        if let Some(k) = &idempotency_key {
            if k.is_empty() {
                return Err(invalid(
                    "invalid_idempotency_key",
                    "idempotency_key is empty",
                ));
            }
            check_len("idempotency_key", k, MAX_IDEMPOTENCY_KEY_LEN)?;
        }
        let r = self
            .inner
            .store
            .notify(users, item, idempotency_key)
            .await?;
        self.settle(r.event).await;
        Ok(r)
    }

    /// Notifies every user that has an inbox (has received a notification or set preferences), in
    /// commits of `inbox.max_users` users each. With an idempotency key a retry after a failure part way
    /// completes the rest and creates nothing twice.
    pub async fn notify_all(
        &self,
        item: NewItem,
        idempotency_key: Option<String>,
    ) -> Result<AudienceResult, InboxError> {
        item.validate()?;
        if let Some(k) = &idempotency_key {
            check_len("idempotency_key", k, MAX_IDEMPOTENCY_KEY_LEN)?;
        }
        let mut out = AudienceResult::default();
        let mut after = String::new();
        let mut last = None;
        loop {
            let users = self
                .inner
                .store
                .users(after.clone(), self.inner.config.max_users)
                .await?;
            let Some(next) = users.last().cloned() else {
                break;
            };
            let r = self
                .inner
                .store
                .notify(users, item.clone(), idempotency_key.clone())
                .await?;
            for d in &r.delivered {
                match d.outcome {
                    "created" => out.created += 1,
                    "duplicate" => out.duplicate += 1,
                    _ => out.muted += 1,
                }
            }
            last = r.event.or(last);
            after = next;
        }
        self.settle(last).await;
        Ok(out)
    }

    pub async fn update(
        &self,
        user: &str,
        target: Target,
        patch: Patch,
    ) -> Result<Changed, InboxError> {
        check_user(user)?;
        self.check_target(&target)?;
        if patch.is_empty() {
            return Err(invalid("empty_change", "the change sets nothing"));
        }
        if let Some(a) = &patch.action {
            check_len("action", a, MAX_ACTION_ID_LEN)?;
        }
        let r = self
            .inner
            .store
            .update(user.to_string(), target, patch)
            .await?;
        self.settle(r.event).await;
        Ok(r)
    }

    pub async fn remove(&self, user: &str, target: Target) -> Result<Changed, InboxError> {
        check_user(user)?;
        self.check_target(&target)?;
        let r = self.inner.store.remove(user.to_string(), target).await?;
        self.settle(r.event).await;
        Ok(r)
    }

    pub async fn set_preferences(
        &self,
        user: &str,
        prefs: Preferences,
    ) -> Result<Changed, InboxError> {
        check_user(user)?;
        prefs.validate()?;
        let r = self
            .inner
            .store
            .set_preferences(user.to_string(), prefs)
            .await?;
        self.settle(r.event).await;
        Ok(r)
    }

    fn check_target(&self, t: &Target) -> Result<(), InboxError> {
        match t {
            Target::Ids(ids) if ids.is_empty() => Err(invalid("missing_ids", "ids is empty")),
            Target::Ids(ids) if ids.len() > self.inner.config.max_ids => Err(invalid(
                "too_many_ids",
                format!(
                    "{} ids in one change, at most {} (inbox.max_ids)",
                    ids.len(),
                    self.inner.config.max_ids
                ),
            )),
            Target::UpTo {
                category: Some(c), ..
            } => check_category(c),
            _ => Ok(()),
        }
    }

    /// The log position to subscribe from for a page read right after this call: the last dispatched
    /// seq, as a WebSocket offset and as an SSE id.
    pub fn position(&self) -> Position {
        let offset = self.inner.hub.stats().last_seq;
        let epoch = self.inner.hub.epoch();
        Position {
            last_event_id: if offset == 0 {
                "earliest".into()
            } else {
                crate::log::generated_id(&epoch, offset)
            },
            offset,
            epoch,
        }
    }
}

/// Where a client subscribes from after reading a page.
#[derive(Debug, Clone, Serialize)]
pub struct Position {
    /// The Centrifugo protocol's recovery offset and epoch.
    pub offset: u64,
    pub epoch: String,
    /// The Mercure `Last-Event-ID`.
    pub last_event_id: String,
}

/// Events the publisher takes from the outbox at once. Each round costs an outbox read and a write to
/// clear it, so a notify to 100 000 users took about 200 rounds at 512.
const PUBLISH_BATCH: usize = 4096;

/// Publishes committed events in outbox order. Events of different users go out concurrently, each
/// user's in order. After a failure (or at start-up, for what an earlier run left) an event is first looked
/// up in the log by its id, so none is published twice.
async fn publisher(inner: Arc<InboxInner>) {
    let shutdown = inner.hub.shutdown_token();
    let mut suspect = true;
    let mut backoff = Duration::from_millis(100);
    // With push configured, what an earlier run left in the outbox must not go out before push can
    // record it (it is attached just after the start).
    while inner.config.push.enabled && inner.push.get().is_none() {
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = shutdown.cancelled() => return,
        }
    }
    loop {
        let batch = match inner.store.pending(PUBLISH_BATCH).await {
            Ok(b) => b,
            Err(InboxError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "inbox: cannot read the event outbox");
                Vec::new()
            }
        };
        if batch.is_empty() {
            // Another node may have published this node's events (a cluster store).
            if let Ok(Some(upto)) = inner.store.published_upto().await {
                inner.published.send_if_modified(|p| {
                    let newer = upto > *p;
                    if newer {
                        *p = upto;
                    }
                    newer
                });
            }
            tokio::select! {
                () = inner.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
            continue;
        }
        let upto = batch.last().map_or(0, |e| e.seq);
        let mut by_user: HashMap<&str, Vec<&PendingEvent>> = HashMap::new();
        for e in &batch {
            by_user.entry(e.user.as_str()).or_default().push(e);
        }
        let results = futures_util::future::join_all(
            by_user
                .into_values()
                .map(|events| publish_in_order(&inner, events, suspect)),
        )
        .await;
        let failed = results.iter().find_map(|r| r.as_ref().err());
        if let Some(e) = failed {
            if shutdown.is_cancelled() {
                return;
            }
            tracing::warn!(error = %e, "inbox: publishing events failed; retrying");
            suspect = true;
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        suspect = false;
        backoff = Duration::from_millis(100);
        // The events are in the log: the changes waiting for them may answer now. Clearing them from the
        // outbox is a write behind whatever changes wait for the writer; should it fail, the next round
        // finds them again and, suspect, looks each up in the log instead of publishing it twice.
        inner.published.send_replace(upto);
        // Web Push takes its work from the outbox: recorded before the outbox forgets the batch.
        if let Some(push) = inner.push.get() {
            push.record(&batch).await;
        }
        if let Err(e) = inner.store.published(upto).await {
            tracing::warn!(error = %e, "inbox: cannot clear published events");
            suspect = true;
        }
    }
}

async fn publish_in_order(
    inner: &InboxInner,
    events: Vec<&PendingEvent>,
    suspect: bool,
) -> Result<(), crate::hub::HubError> {
    for e in events {
        if e.in_log || (suspect && inner.hub.find_id(e.event_id.clone()).await?.is_some()) {
            continue;
        }
        inner
            .hub
            .publish(NewPublication {
                id: Some(e.event_id.clone()),
                topics: vec![format!("{}:#{}", inner.config.namespace, e.user)],
                data: bytes::Bytes::from(e.payload.clone()),
                private: true,
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

async fn sweeper(inner: Arc<InboxInner>) {
    let shutdown = inner.hub.shutdown_token();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match inner.store.sweep(now_ms()).await {
            Ok(Some(_)) => inner.wake.notify_one(),
            Ok(None) => {}
            Err(InboxError::Closed) => return,
            Err(e) => tracing::warn!(error = %e, "inbox: sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<(), InboxError>) -> Option<&'static str> {
        match r {
            Err(InboxError::Invalid(code, _)) => Some(code),
            Err(e) => panic!("not a validation error: {e}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn a_patch_is_checked_the_same_for_every_store() {
        let now = 1_000_000;
        let ids = Target::Ids(vec![1]);
        let all = Target::UpTo {
            upto: 10,
            category: None,
        };
        let snooze = |t| Patch {
            snoozed_until: Some(t),
            ..Patch::default()
        };
        assert_eq!(code(snooze(now + 1).check(&ids, now)), None);
        assert_eq!(code(snooze(0).check(&ids, now)), None, "0 wakes the item");
        assert_eq!(code(snooze(now).check(&ids, now)), Some("invalid_snooze"));
        let act = Patch {
            action: Some("accept".into()),
            ..Patch::default()
        };
        assert_eq!(code(act.check(&ids, now)), None);
        assert_eq!(code(act.check(&all, now)), Some("invalid_change"));
        let read = Patch {
            read: Some(true),
            ..Patch::default()
        };
        assert_eq!(code(read.check(&all, now)), None);
    }
}
