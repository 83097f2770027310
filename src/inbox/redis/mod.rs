//! The inbox on Redis: every node of a cluster on the Redis engine sees the same inboxes, with the same
//! guarantees as the SQLite store (same items, states, ordering, cursors, counts and events).
//!
//! Why it is built this way:
//! - **A change is computed from a snapshot and committed by one script, only if nothing changed
//!   meanwhile.** A snapshot script reads what the change needs (the targeted items, the inbox's version,
//!   its counts) atomically; the change (new states, the count differences, the event) is computed here,
//!   in the same code shape as the SQLite store; the `COMMIT` script then checks that every inbox it read
//!   still has the version it read and, in the same atomic step, writes the items, adds the differences to
//!   the counts, bumps the version and appends the event. Every change of an inbox bumps its version, so
//!   an unchanged version means the snapshot is still exact; otherwise the change is computed again
//!   (optimistic concurrency, bounded attempts with jittered back-off). So counts can never drift from
//!   the items, whichever nodes change an inbox at once, and a crash cannot separate an item from its
//!   counts or its event: Redis runs a script whole or not at all.
//! - **Item ids follow commit order per user.** Ids come from one counter (`INCRBY` in the snapshot); an id
//!   reserved before another change of the same user committed is never used, because that change moved
//!   the version and the commit is refused. So "mark read up to id N" never skips an older item that
//!   commits later.
//! - **Events: an outbox stream, drained by one node at a time.** The commit appends the event (with the
//!   counts as they are after the change, computed inside the script) to `P:outbox`. The [`Inbox`]
//!   publisher of every node calls [`InboxStore::pending`], but only the holder of a lease in Redis
//!   (`P:drain`, renewed on every call, [`LEASE`] long) gets events: one drainer publishes them through
//!   [`Hub::publish`], in outbox order, and acknowledges them (`published`, which trims the stream and
//!   records the position in `P:drained`). A node that does not hold the lease waits (bounded) until the
//!   holder has published what is committed, and reports that position ([`InboxStore::published_upto`]),
//!   so a request answered on any node is still followed by its event being in the log.
//!   Exactly once: a crash of the holder between publishing and acknowledging leaves events in the
//!   outbox; the next holder (the lease expired, so it *took* the lease rather than renewing it) first
//!   looks each event id up in the log and marks those already there, which are then not published
//!   again (but still handed over and cleared, so Web Push records what the dead holder may not have).
//!   Because the lease is renewed at
//!   every batch, batches are small ([`BATCH`]) and a batch normally takes milliseconds, a live holder
//!   losing its lease mid-batch needs a stall of more than [`LEASE`]; only then could an event be published
//!   twice, and clients, which ignore events at or below the version they hold, would drop the copy.
//!   Order per user is kept because one node publishes at a time, in outbox (= commit) order.
//! - **Where the time goes.** Lists walk the user's ids newest first and filter in the script (at most
//!   `inbox.max_items` per inbox); the start-up recount reads every item once per node start.
//!
//! Durability is Redis's: a change is acknowledged once its script ran, so it survives a Herald crash
//! always, and a Redis restart only with AOF or RDB persistence (the store warns at start-up when Redis
//! has neither).
//!
//! [`Inbox`]: super::Inbox

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::ConnectionManager;
use ::redis::{RedisError, Value};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::sqlite::StoreLimits;
use super::{
    Archived, Changed, Counts, Delivered, InboxError, InboxStore, Item, ItemAction, ListQuery,
    NewItem, NotifyResult, Page, Patch, PendingEvent, Preferences, StartupCheck, Stats, Status,
    Tally, Target, MAX_PAGE,
};
use crate::engine::BoxFuture;
use crate::hub::Hub;

mod scripts;
use scripts::Scripts;

/// How long the outbox lease lasts without renewal (the holder renews it at every batch and at least
/// every second while idle). A dead holder's events wait this long for another node.
pub const LEASE: Duration = Duration::from_secs(5);
/// Most events handed to the publisher at once (small, so a batch is far shorter than the lease).
pub const BATCH: usize = 64;
/// Attempts of one change against concurrent changes of the same inboxes.
const ATTEMPTS: u32 = 200;
/// Retries of a change that met a concurrent one (see `Contention`).
const CONTENTION: super::Contention = super::Contention {
    attempts: ATTEMPTS,
    step: Duration::from_micros(4),
};
/// How long `pending` waits for news (a commit, a drained batch) before answering empty.
const IDLE_WAIT: Duration = Duration::from_millis(900);
/// Most items one sweep handles per kind.
const SWEEP_BATCH: usize = 1000;

/// How to reach Redis and what to keep there.
#[derive(Debug, Clone)]
pub struct RedisInboxOptions {
    pub url: String,
    /// Every key starts with `<prefix>:`.
    pub prefix: String,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub limits: StoreLimits,
}

pub struct RedisInbox {
    conn: ConnectionManager,
    prefix: String,
    url: String,
    op_timeout: Duration,
    scripts: Scripts,
    limits: StoreLimits,
    epoch: String,
    /// This process, for the leases.
    node: String,
    hub: Hub,
    /// This node took the outbox lease over: events may have been published by the previous holder,
    /// so each is looked up in the log until a batch of ours has been acknowledged.
    suspect: AtomicBool,
    /// Counts the messages on `P:wake`.
    wake: watch::Sender<u64>,
    /// What the check of every inbox at open found (it ends before the store is returned).
    startup_check: StartupCheck,
}

fn storage(e: impl std::fmt::Display) -> InboxError {
    InboxError::Storage(e.to_string())
}

/// `url` with the password (if any) replaced, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => format!("{}***@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// `s` with the characters `SCAN MATCH` gives a meaning escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn array(v: Value) -> Result<Vec<Value>, InboxError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(storage(format!("unexpected reply from Redis: {other:?}"))),
    }
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn int(v: Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(i),
        Value::Nil => Some(0),
        v => text(v)?.parse().ok(),
    }
}

/// A flat `field, value, ...` reply as a map.
fn hash(v: Value) -> Result<HashMap<String, String>, InboxError> {
    let mut out = HashMap::new();
    let mut it = array(v)?.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (text(k), text(v)) {
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// A counts hash (`t:<category>` ...) as counts.
fn counts_of(v: Value) -> Result<Counts, InboxError> {
    let mut categories: BTreeMap<String, Tally> = BTreeMap::new();
    for (k, v) in hash(v)? {
        let (Some(kind), Some(c)) = (k.get(..1), k.get(2..)) else {
            continue;
        };
        let n: i64 = v.parse().unwrap_or(0);
        let t = categories.entry(c.to_string()).or_default();
        match kind {
            "t" => t.total = n,
            "r" => t.unread = n,
            "s" => t.unseen = n,
            "a" => t.archived = n,
            _ => {}
        }
    }
    Ok(Counts::from_categories(categories))
}

/// What an item holds that never changes, stored as one JSON field.
#[derive(Serialize, Deserialize)]
struct Content {
    title: String,
    body: String,
    avatar: Option<String>,
    action_url: Option<String>,
    actions: Vec<ItemAction>,
    data: Option<serde_json::Value>,
}

/// An item reply (`{id, field, value, ...}`): its id, and its owner and item unless it does not exist.
fn item_of(v: Value) -> Result<(i64, Option<(String, Item)>), InboxError> {
    let mut parts = array(v)?.into_iter();
    let id = parts
        .next()
        .and_then(int)
        .ok_or_else(|| storage("an inbox item reply without an id"))?;
    let rest: Vec<Value> = parts.collect();
    if rest.is_empty() {
        return Ok((id, None));
    }
    let f = hash(Value::Array(rest))?;
    let (Some(user), Some(category), Some(content)) = (f.get("u"), f.get("c"), f.get("d")) else {
        return Ok((id, None));
    };
    let content: Content = serde_json::from_str(content).map_err(storage)?;
    let num = |k: &str| f.get(k).and_then(|s| s.parse::<i64>().ok());
    let item = Item {
        id,
        category: category.clone(),
        title: content.title,
        body: content.body,
        avatar: content.avatar,
        action_url: content.action_url,
        actions: content.actions,
        data: content.data,
        created_at: num("t").unwrap_or(0),
        expires_at: num("e"),
        read_at: num("r"),
        seen_at: num("s"),
        archived_at: num("a"),
        snoozed_until: num("z"),
        action: f.get("x").cloned(),
    };
    Ok((id, Some((user.clone(), item))))
}

/// What an item adds to its category's counts.
fn contribution(i: &Item) -> Tally {
    let active = i.archived_at.is_none() && i.snoozed_until.is_none();
    Tally {
        total: 1,
        unread: i64::from(active && i.read_at.is_none()),
        unseen: i64::from(active && i.seen_at.is_none()),
        archived: i64::from(i.archived_at.is_some()),
    }
}

fn opt(v: Option<i64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_default()
}

/// A change being built: the versions it was computed from and the operations of the `COMMIT` script.
struct Commit {
    checks: Vec<(String, i64)>,
    /// Whose counts the script returns.
    ret: String,
    ops: Vec<Vec<u8>>,
    /// Count differences per (user, category) not yet written as operations.
    deltas: BTreeMap<(String, String), Tally>,
    events: usize,
}

impl Commit {
    fn new(ret: &str) -> Commit {
        Commit {
            checks: Vec::new(),
            ret: ret.to_string(),
            ops: Vec::new(),
            deltas: BTreeMap::new(),
            events: 0,
        }
    }

    fn check(&mut self, user: &str, version: i64) {
        self.checks.push((user.to_string(), version));
    }

    fn op(&mut self, parts: &[&str]) {
        self.ops.extend(parts.iter().map(|p| p.as_bytes().to_vec()));
    }

    fn delta(&mut self, user: &str, category: &str, d: &Tally, sign: i64) {
        self.deltas
            .entry((user.to_string(), category.to_string()))
            .or_default()
            .add(d, sign);
    }

    fn set_states(&mut self, i: &Item) {
        self.op(&[
            "S",
            &i.id.to_string(),
            &opt(i.read_at),
            &opt(i.seen_at),
            &opt(i.archived_at),
            &opt(i.snoozed_until),
            i.action.as_deref().unwrap_or(""),
        ]);
    }

    fn remove(&mut self, user: &str, i: &Item) {
        self.op(&["D", user, &i.id.to_string()]);
        self.delta(user, &i.category, &contribution(i), -1);
    }

    /// Writes `user`'s count differences, its new version and its event (`payload` gets `type` and
    /// `version` here, `counts` in the script).
    fn event(
        &mut self,
        epoch: &str,
        user: &str,
        version: i64,
        kind: &str,
        mut payload: serde_json::Map<String, serde_json::Value>,
    ) {
        let mine: Vec<(String, String)> = self
            .deltas
            .keys()
            .filter(|(u, _)| u == user)
            .cloned()
            .collect();
        for k in mine {
            if let Some(d) = self.deltas.remove(&k) {
                if !d.is_zero() {
                    self.op(&[
                        "C",
                        user,
                        &k.1,
                        &d.total.to_string(),
                        &d.unread.to_string(),
                        &d.unseen.to_string(),
                        &d.archived.to_string(),
                    ]);
                }
            }
        }
        self.op(&["V", user, &version.to_string()]);
        payload.insert("type".into(), json!(kind));
        payload.insert("version".into(), json!(version));
        let mut head = serde_json::Value::Object(payload).to_string();
        head.pop(); // the closing brace: the script adds the counts and closes it
        let event_id = format!("inbox-{epoch}-{version}-{user}");
        self.op(&["E", user, &event_id, &head]);
        self.events += 1;
    }
}

/// A snapshot of the items a change targets.
struct Snapshot {
    version: i64,
    counts: Counts,
    items: Vec<Item>,
}

impl RedisInbox {
    /// Connects (within `connect_timeout`), makes sure the inbox has an epoch, warns when Redis keeps
    /// nothing on disk, recounts every inbox (logging any repair), and listens for other nodes' commits.
    /// `hub` publishes the events (its log is where an event already published is found).
    pub async fn open(o: RedisInboxOptions, hub: Hub) -> Result<RedisInbox, InboxError> {
        let url = redact(&o.url);
        let client = ::redis::Client::open(o.url.as_str())
            .map_err(|e| storage(format!("{url:?} is not a Redis URL: {e}")))?;
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(o.connect_timeout.min(o.op_timeout)))
            .set_response_timeout(Some(o.op_timeout))
            .set_number_of_retries(4)
            .set_max_delay(Duration::from_secs(1));
        let conn = tokio::time::timeout(
            o.connect_timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| {
            storage(format!(
                "cannot reach Redis at {url} within {:?} (engine.connect_timeout)",
                o.connect_timeout
            ))
        })?
        .map_err(|e| storage(format!("cannot reach Redis at {url}: {e}")))?;
        let (wake, _) = watch::channel(0u64);
        let mut store = RedisInbox {
            conn,
            prefix: o.prefix.clone(),
            url,
            op_timeout: o.op_timeout,
            scripts: Scripts::new(),
            limits: o.limits,
            epoch: String::new(),
            node: uuid::Uuid::new_v4().simple().to_string(),
            hub,
            suspect: AtomicBool::new(true),
            wake,
            startup_check: StartupCheck::default(),
        };
        let fresh = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let mut pipe = ::redis::pipe();
        pipe.cmd("SET")
            .arg(store.key("epoch"))
            .arg(&fresh)
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(store.key("epoch"));
        let v: Value = store
            .call(pipe.query_async(&mut store.conn.clone()))
            .await?;
        store.epoch = array(v)?
            .into_iter()
            .next()
            .and_then(text)
            .ok_or_else(|| storage("Redis did not keep the inbox epoch"))?;
        store.warn_without_persistence().await;
        let started = std::time::Instant::now();
        let repaired = store.recount_all(true).await?;
        store.startup_check = StartupCheck {
            finished: true,
            users_checked: repaired.1,
            repaired: repaired.0,
            duration_ms: Some(started.elapsed().as_millis() as u64),
            error: None,
        };
        if repaired.0 > 0 {
            tracing::warn!(
                repaired = repaired.0,
                prefix = %store.prefix,
                "inbox: counts differed from the items and were repaired"
            );
        } else {
            tracing::info!(
                url = %store.url,
                prefix = %store.prefix,
                epoch = %store.epoch,
                "inbox on Redis: counts checked against the items"
            );
        }
        tokio::spawn(listen(
            client,
            store.key("wake"),
            store.wake.clone(),
            store.hub.shutdown_token(),
            o.connect_timeout,
        ));
        Ok(store)
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    fn error(&self, e: RedisError) -> InboxError {
        InboxError::Storage(format!("Redis at {}: {e}", self.url))
    }

    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, InboxError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(InboxError::Storage(format!(
                "Redis at {} did not answer within {:?} (engine.op_timeout)",
                self.url, self.op_timeout
            ))),
        }
    }

    /// Runs a script; the Redis error is given back as is (the caller tells a conflict from a failure).
    async fn invoke(
        &self,
        script: &::redis::Script,
        args: &[Vec<u8>],
    ) -> Result<Result<Value, RedisError>, InboxError> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.prefix.as_bytes());
        for a in args {
            inv.arg(&a[..]);
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.op_timeout, inv.invoke_async::<Value>(&mut conn)).await {
            Ok(r) => Ok(r),
            Err(_) => Err(InboxError::Storage(format!(
                "Redis at {} did not answer within {:?} (engine.op_timeout)",
                self.url, self.op_timeout
            ))),
        }
    }

    async fn eval(&self, script: &::redis::Script, args: &[Vec<u8>]) -> Result<Value, InboxError> {
        self.invoke(script, args).await?.map_err(|e| self.error(e))
    }

    async fn query(&self, cmd: &::redis::Cmd) -> Result<Value, InboxError> {
        let mut conn = self.conn.clone();
        self.call(cmd.query_async(&mut conn)).await
    }

    /// Logs a warning when Redis has neither AOF nor RDB snapshots: the inboxes would not outlive it.
    async fn warn_without_persistence(&self) {
        let get = |name: &str| ::redis::cmd("CONFIG").arg("GET").arg(name).to_owned();
        let value = |v: Result<Value, InboxError>| -> Option<String> {
            array(v.ok()?).ok()?.into_iter().nth(1).and_then(text)
        };
        let aof = value(self.query(&get("appendonly")).await);
        let save = value(self.query(&get("save")).await);
        match (aof.as_deref(), save.as_deref()) {
            (Some("no"), Some(s)) if s.trim().is_empty() => tracing::warn!(
                url = %self.url,
                "inbox: Redis keeps nothing on disk (appendonly no, no save rules): every inbox is lost \
                 when Redis restarts. Turn on AOF (appendonly yes) or RDB snapshots for a durable inbox"
            ),
            (Some(_), Some(_)) => {}
            _ => tracing::info!(
                url = %self.url,
                "inbox: cannot read Redis's persistence settings (CONFIG GET refused); make sure it \
                 has AOF or RDB, or the inboxes are lost when Redis restarts"
            ),
        }
    }

    /// Runs `COMMIT`; `None` when an inbox changed since its snapshot.
    async fn commit(&self, c: Commit) -> Result<Option<(Option<i64>, Counts)>, InboxError> {
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(3 + c.checks.len() * 2 + c.ops.len());
        args.push(c.checks.len().to_string().into_bytes());
        for (u, v) in &c.checks {
            args.push(u.as_bytes().to_vec());
            args.push(v.to_string().into_bytes());
        }
        args.push(c.ret.as_bytes().to_vec());
        args.extend(c.ops);
        match self.invoke(&self.scripts.commit, &args).await? {
            Ok(v) => {
                let mut parts = array(v)?.into_iter();
                let seq = parts.next().and_then(int).unwrap_or(0);
                let counts = counts_of(parts.next().unwrap_or(Value::Nil))?;
                Ok(Some(((seq > 0).then_some(seq), counts)))
            }
            Err(e) if e.code() == Some("HERALD_CONFLICT") => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    async fn snapshot(
        &self,
        user: &str,
        target: &Target,
        ignore_missing: bool,
    ) -> Result<Snapshot, InboxError> {
        let mut args: Vec<Vec<u8>> = vec![user.as_bytes().to_vec()];
        match target {
            Target::Ids(ids) => {
                let mut ids = ids.clone();
                ids.sort_unstable();
                ids.dedup();
                args.push(b"i".to_vec());
                args.extend(ids.iter().map(|i| i.to_string().into_bytes()));
            }
            Target::UpTo { upto, category } => {
                args.push(b"u".to_vec());
                args.push(upto.to_string().into_bytes());
                args.push(category.clone().unwrap_or_default().into_bytes());
            }
        }
        let mut parts = array(self.eval(&self.scripts.snap_target, &args).await?)?.into_iter();
        let version = parts.next().and_then(int).unwrap_or(0);
        let counts = counts_of(parts.next().unwrap_or(Value::Nil))?;
        let mut items = Vec::new();
        for p in parts {
            match item_of(p)? {
                (_, Some((_, item))) => items.push(item),
                (id, None) if !ignore_missing => {
                    return Err(InboxError::NotFound(format!("no item {id} in this inbox")))
                }
                (_, None) => {}
            }
        }
        Ok(Snapshot {
            version,
            counts,
            items,
        })
    }

    /// One attempt of a change of states; `keep` picks which snapshot items it applies to.
    async fn try_change(
        &self,
        user: &str,
        target: &Target,
        patch: &Patch,
        now: i64,
        keep: &(dyn Fn(&Item) -> bool + Sync),
        ignore_missing: bool,
    ) -> Result<Option<Changed>, InboxError> {
        let snap = self.snapshot(user, target, ignore_missing).await?;
        let mut c = Commit::new(user);
        c.check(user, snap.version);
        let mut changed = Vec::new();
        for old in snap.items.into_iter().filter(|i| keep(i)) {
            let new = patch.apply(&old, now)?;
            if new == old {
                continue;
            }
            c.set_states(&new);
            c.delta(user, &new.category, &contribution(&new), 1);
            c.delta(user, &old.category, &contribution(&old), -1);
            changed.push(new);
        }
        if changed.is_empty() {
            return Ok(Some(Changed {
                changed: 0,
                counts: snap.counts,
                version: snap.version,
                event: None,
            }));
        }
        let (kind, payload) = super::updated_event(&changed, target, patch);
        let version = snap.version + 1;
        c.event(&self.epoch, user, version, kind, payload);
        Ok(self.commit(c).await?.map(|(event, counts)| Changed {
            changed: changed.len(),
            counts,
            version,
            event,
        }))
    }

    async fn change(
        &self,
        user: &str,
        target: &Target,
        patch: &Patch,
        now: i64,
        keep: &(dyn Fn(&Item) -> bool + Sync),
        ignore_missing: bool,
    ) -> Result<Changed, InboxError> {
        CONTENTION
            .run("change", || {
                self.try_change(user, target, patch, now, keep, ignore_missing)
            })
            .await
    }

    async fn try_remove(
        &self,
        user: &str,
        target: &Target,
        keep: &(dyn Fn(&Item) -> bool + Sync),
        ignore_missing: bool,
    ) -> Result<Option<Changed>, InboxError> {
        let snap = self.snapshot(user, target, ignore_missing).await?;
        let items: Vec<Item> = snap.items.into_iter().filter(|i| keep(i)).collect();
        if items.is_empty() {
            return Ok(Some(Changed {
                changed: 0,
                counts: snap.counts,
                version: snap.version,
                event: None,
            }));
        }
        let mut c = Commit::new(user);
        c.check(user, snap.version);
        for it in &items {
            c.remove(user, it);
        }
        let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
        let (kind, payload) = super::removed_event(&ids, target);
        let version = snap.version + 1;
        c.event(&self.epoch, user, version, kind, payload);
        Ok(self.commit(c).await?.map(|(event, counts)| Changed {
            changed: items.len(),
            counts,
            version,
            event,
        }))
    }

    async fn remove_where(
        &self,
        user: &str,
        target: &Target,
        keep: &(dyn Fn(&Item) -> bool + Sync),
        ignore_missing: bool,
    ) -> Result<Changed, InboxError> {
        CONTENTION
            .run("remove", || {
                self.try_remove(user, target, keep, ignore_missing)
            })
            .await
    }

    async fn try_notify(
        &self,
        users: &[String],
        item: &NewItem,
        key: Option<&str>,
        now: i64,
    ) -> Result<Option<NotifyResult>, InboxError> {
        let mut args: Vec<Vec<u8>> = vec![
            self.limits.max_items.to_string().into_bytes(),
            key.unwrap_or("").as_bytes().to_vec(),
        ];
        args.extend(users.iter().map(|u| u.as_bytes().to_vec()));
        let mut parts = array(self.eval(&self.scripts.snap_notify, &args).await?)?.into_iter();
        let first = parts
            .next()
            .and_then(int)
            .ok_or_else(|| storage("unexpected reply to the notify snapshot"))?;
        let content = serde_json::to_string(&Content {
            title: item.title.clone(),
            body: item.body.clone(),
            avatar: item.avatar.clone(),
            action_url: item.action_url.clone(),
            actions: item.actions.clone(),
            data: item.data.clone(),
        })
        .map_err(storage)?;
        let mut c = Commit::new("");
        let mut out = NotifyResult::default();
        for ((n, user), snap) in users.iter().enumerate().zip(parts) {
            let mut s = array(snap)?.into_iter();
            let version = s.next().and_then(int).unwrap_or(0);
            let prefs = s.next().and_then(text).unwrap_or_default();
            let dup = s.next().and_then(text).and_then(|t| t.parse::<i64>().ok());
            let oldest = array(s.next().unwrap_or(Value::Nil))?;
            c.check(user, version);
            let prefs: Preferences = if prefs.is_empty() {
                Preferences::default()
            } else {
                serde_json::from_str(&prefs).unwrap_or_default()
            };
            if !prefs.allows(item.category(), "inbox") {
                out.delivered.push(Delivered {
                    user: user.clone(),
                    id: None,
                    outcome: "muted",
                });
                continue;
            }
            if let Some(id) = dup {
                out.delivered.push(Delivered {
                    user: user.clone(),
                    id: Some(id),
                    outcome: "duplicate",
                });
                continue;
            }
            let id = first + n as i64;
            let stored = item.stored(id, now);
            c.op(&[
                "I",
                &id.to_string(),
                user,
                &stored.category,
                &content,
                &now.to_string(),
                &opt(item.expires_at),
                key.unwrap_or(""),
            ]);
            c.delta(user, &stored.category, &contribution(&stored), 1);
            let mut removed = Vec::new();
            for o in oldest {
                if let (_, Some((_, old))) = item_of(o)? {
                    c.remove(user, &old);
                    removed.push(old.id);
                }
            }
            let mut payload = serde_json::Map::new();
            payload.insert("item".into(), json!(stored));
            if !removed.is_empty() {
                payload.insert("removed".into(), json!(removed));
            }
            c.event(&self.epoch, user, version + 1, "created", payload);
            out.delivered.push(Delivered {
                user: user.clone(),
                id: Some(id),
                outcome: "created",
            });
        }
        if c.events == 0 {
            return Ok(Some(out));
        }
        Ok(self.commit(c).await?.map(|(event, _)| {
            out.event = event;
            out
        }))
    }

    /// The inbox's version, preferences and counts.
    async fn inbox(&self, user: &str) -> Result<(i64, Preferences, Counts), InboxError> {
        let mut parts = array(
            self.eval(&self.scripts.inbox, &[user.as_bytes().to_vec()])
                .await?,
        )?
        .into_iter();
        let version = parts.next().and_then(int).unwrap_or(0);
        let prefs = parts.next().and_then(text).unwrap_or_default();
        let prefs = if prefs.is_empty() {
            Preferences::default()
        } else {
            serde_json::from_str(&prefs).unwrap_or_default()
        };
        let counts = counts_of(parts.next().unwrap_or(Value::Nil))?;
        Ok((version, prefs, counts))
    }

    /// Every user with stored counts or an inbox (a count left for a user without items is found too).
    async fn all_users(&self) -> Result<Vec<String>, InboxError> {
        let mut users: HashSet<String> = HashSet::new();
        let mut after = String::new();
        for _ in 0..1_000_000 {
            let page = self.users_after(&after, 1000).await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            users.extend(page);
            after = last;
        }
        let head = self.key("n:");
        let pattern = format!("{}*", glob_escape(&head));
        let mut cursor = 0u64;
        for _ in 0..1_000_000 {
            let cmd = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let mut parts = array(self.query(&cmd).await?)?.into_iter();
            cursor = parts
                .next()
                .and_then(int)
                .and_then(|c| u64::try_from(c).ok())
                .unwrap_or(0);
            for k in array(parts.next().unwrap_or(Value::Nil))?
                .into_iter()
                .filter_map(text)
            {
                if let Some(u) = k.strip_prefix(&head) {
                    users.insert(u.to_string());
                }
            }
            if cursor == 0 {
                break;
            }
        }
        let mut users: Vec<String> = users.into_iter().collect();
        users.sort();
        Ok(users)
    }

    async fn users_after(&self, after: &str, limit: usize) -> Result<Vec<String>, InboxError> {
        let start = if after.is_empty() {
            "-".to_string()
        } else {
            format!("({after}")
        };
        let cmd = ::redis::cmd("ZRANGEBYLEX")
            .arg(self.key("users"))
            .arg(start)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .to_owned();
        Ok(array(self.query(&cmd).await?)?
            .into_iter()
            .filter_map(text)
            .collect())
    }

    /// Recounts every inbox: (categories whose counts differed, users with items, items).
    async fn recount_all(&self, repair: bool) -> Result<(i64, i64, i64), InboxError> {
        let flag: &[u8] = if repair { b"1" } else { b"0" };
        let (mut differ, mut users, mut items) = (0, 0, 0);
        for u in self.all_users().await? {
            let v = self
                .eval(&self.scripts.recount, &[u.into_bytes(), flag.to_vec()])
                .await?;
            let mut parts = array(v)?.into_iter();
            differ += parts.next().and_then(int).unwrap_or(0);
            let n = parts.next().and_then(int).unwrap_or(0);
            items += n;
            users += i64::from(n > 0);
        }
        Ok((differ, users, items))
    }

    /// Items due for the sweeper, by user: `mode` `s` (snoozes over) or `x` (expired or too old).
    async fn due(
        &self,
        mode: &str,
        now: i64,
        cutoff: i64,
    ) -> Result<BTreeMap<String, Vec<i64>>, InboxError> {
        let v = self
            .eval(
                &self.scripts.due,
                &[
                    mode.as_bytes().to_vec(),
                    now.to_string().into_bytes(),
                    cutoff.to_string().into_bytes(),
                    SWEEP_BATCH.to_string().into_bytes(),
                ],
            )
            .await?;
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut it = array(v)?.into_iter();
        while let (Some(id), Some(user)) = (it.next(), it.next()) {
            if let (Some(id), Some(user)) = (int(id), text(user)) {
                out.entry(user).or_default().push(id);
            }
        }
        Ok(out)
    }

    /// Waits until the next message on `P:wake`, `max`, or the hub's shutdown.
    async fn wait_wake(&self, rx: &mut watch::Receiver<u64>, max: Duration) {
        let shutdown = self.hub.shutdown_token();
        tokio::select! {
            _ = tokio::time::timeout(max, rx.changed()) => {}
            () = shutdown.cancelled() => {}
        }
    }

    async fn progress(&self) -> Result<(i64, i64), InboxError> {
        let mut parts = array(self.eval(&self.scripts.progress, &[]).await?)?.into_iter();
        let done = parts.next().and_then(int).unwrap_or(0);
        let top = parts.next().and_then(int).unwrap_or(0);
        Ok((done, top))
    }

    async fn drain(&self, limit: usize) -> Result<Vec<PendingEvent>, InboxError> {
        let started = Instant::now();
        let mut rx = self.wake.subscribe();
        rx.borrow_and_update();
        let args = [
            self.node.as_bytes().to_vec(),
            LEASE.as_millis().to_string().into_bytes(),
            limit.clamp(1, BATCH).to_string().into_bytes(),
        ];
        for _ in 0..1000 {
            if self.hub.shutdown_token().is_cancelled() {
                return Ok(Vec::new());
            }
            let mut parts = array(self.eval(&self.scripts.drain, &args).await?)?.into_iter();
            let state = parts.next().and_then(text).unwrap_or_default();
            if state == "other" {
                // Another node publishes: wait (bounded) until it has published what is committed now.
                let done = parts.next().and_then(int).unwrap_or(0);
                let top = parts.next().and_then(int).unwrap_or(0);
                if done >= top {
                    return Ok(Vec::new());
                }
                let left = IDLE_WAIT.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Ok(Vec::new());
                }
                self.wait_wake(&mut rx, left.min(Duration::from_millis(100)))
                    .await;
                continue;
            }
            if state == "taken" {
                // Whatever the previous holder was doing is unknown: check the log first.
                self.suspect.store(true, Ordering::Release);
                tracing::debug!(node = %self.node, "inbox: this node took the outbox lease");
            }
            let mut events = Vec::new();
            for e in array(parts.next().unwrap_or(Value::Nil))? {
                let mut entry = array(e)?.into_iter();
                let id = entry.next().and_then(text).unwrap_or_default();
                let f = hash(entry.next().unwrap_or(Value::Nil))?;
                let seq: i64 = id
                    .split('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| storage(format!("bad outbox entry id {id:?}")))?;
                let (Some(user), Some(event_id), Some(payload)) =
                    (f.get("u"), f.get("i"), f.get("p"))
                else {
                    continue;
                };
                events.push(PendingEvent {
                    seq,
                    user: user.clone(),
                    event_id: event_id.clone(),
                    payload: payload.clone(),
                    in_log: false,
                });
            }
            if events.is_empty() {
                let left = IDLE_WAIT.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Ok(events);
                }
                self.wait_wake(&mut rx, left).await;
                continue;
            }
            if self.suspect.load(Ordering::Acquire) {
                return self.drop_published(events).await;
            }
            return Ok(events);
        }
        Ok(Vec::new())
    }

    /// After taking the outbox over: marks the events the previous holder had already published
    /// (found in the log by their ids), so they are not published again. They are still handed over (and
    /// cleared with the batch by `published`), as the previous holder may have died before doing what
    /// follows publication (recording their Web Push).
    async fn drop_published(
        &self,
        mut events: Vec<PendingEvent>,
    ) -> Result<Vec<PendingEvent>, InboxError> {
        let mut found = 0;
        for e in &mut events {
            match self.hub.find_id(e.event_id.clone()).await {
                Ok(Some(_)) => {
                    e.in_log = true;
                    found += 1;
                }
                Ok(None) => {}
                Err(err) => return Err(storage(format!("cannot look an event up: {err}"))),
            }
        }
        if found > 0 {
            tracing::info!(
                events = found,
                "inbox: events already published by the previous outbox holder are not published again"
            );
        }
        Ok(events)
    }
}

/// Bumps `wake` at every message on `channel`, reconnecting after a loss, until `shutdown`.
async fn listen(
    client: ::redis::Client,
    channel: String,
    wake: watch::Sender<u64>,
    shutdown: tokio_util::sync::CancellationToken,
    connect_timeout: Duration,
) {
    loop {
        let session = async {
            let mut ps = tokio::time::timeout(connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| "connecting timed out".to_string())?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(connect_timeout, ps.subscribe(&channel))
                .await
                .map_err(|_| "subscribing timed out".to_string())?
                .map_err(|e| e.to_string())?;
            // Something may have been committed while this node was not listening.
            wake.send_modify(|n| *n += 1);
            let mut messages = ps.into_on_message();
            while messages.next().await.is_some() {
                wake.send_modify(|n| *n += 1);
            }
            Err::<(), String>("the subscription ended".into())
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = session => if let Err(e) = r {
                tracing::debug!(error = %e, "inbox: wake-up channel lost; reconnecting");
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn list_args(user: &str, q: &ListQuery, limit: usize) -> Vec<Vec<u8>> {
    let status = match q.status {
        Status::All => "a",
        Status::Unread => "u",
        Status::Read => "r",
        Status::Unseen => "n",
    };
    let archived = match q.archived {
        Archived::False => "f",
        Archived::True => "t",
        Archived::All => "a",
    };
    vec![
        user.as_bytes().to_vec(),
        opt(q.cursor).into_bytes(),
        limit.to_string().into_bytes(),
        status.as_bytes().to_vec(),
        archived.as_bytes().to_vec(),
        q.category.clone().unwrap_or_default().into_bytes(),
        if q.snoozed {
            b"1".to_vec()
        } else {
            b"0".to_vec()
        },
    ]
}

fn all_items(_: &Item) -> bool {
    true
}

impl InboxStore for RedisInbox {
    fn notify(
        &self,
        users: Vec<String>,
        item: NewItem,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'_, Result<NotifyResult, InboxError>> {
        Box::pin(async move {
            let mut seen = HashSet::new();
            let users: Vec<String> = users
                .into_iter()
                .filter(|u| seen.insert(u.clone()))
                .collect();
            for attempt in 0..ATTEMPTS {
                let now = super::now_ms();
                if let Some(r) = self
                    .try_notify(&users, &item, idempotency_key.as_deref(), now)
                    .await?
                {
                    return Ok(r);
                }
                CONTENTION.back_off(attempt).await;
            }
            Err(CONTENTION.exhausted("notify"))
        })
    }

    fn list(&self, user: String, q: ListQuery) -> BoxFuture<'_, Result<Page, InboxError>> {
        Box::pin(async move {
            let limit = q.limit.unwrap_or(50).clamp(1, MAX_PAGE);
            let v = self
                .eval(&self.scripts.list, &list_args(&user, &q, limit))
                .await?;
            let mut parts = array(v)?.into_iter();
            let version = parts.next().and_then(int).unwrap_or(0);
            let counts = counts_of(parts.next().unwrap_or(Value::Nil))?;
            let mut items = Vec::new();
            for p in parts {
                if let (_, Some((_, item))) = item_of(p)? {
                    items.push(item);
                }
            }
            let next_cursor = if items.len() > limit {
                items.truncate(limit);
                items.last().map(|i| i.id)
            } else {
                None
            };
            Ok(Page {
                items,
                next_cursor,
                counts,
                version,
            })
        })
    }

    fn users(&self, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, InboxError>> {
        Box::pin(async move { self.users_after(&after, limit).await })
    }

    fn counts(&self, user: String) -> BoxFuture<'_, Result<(Counts, i64), InboxError>> {
        Box::pin(async move {
            let (version, _, counts) = self.inbox(&user).await?;
            Ok((counts, version))
        })
    }

    fn get(&self, user: String, id: i64) -> BoxFuture<'_, Result<Item, InboxError>> {
        Box::pin(async move {
            let mut snap = self.snapshot(&user, &Target::Ids(vec![id]), false).await?;
            snap.items
                .pop()
                .ok_or_else(|| InboxError::NotFound(format!("no item {id} in this inbox")))
        })
    }

    fn update(
        &self,
        user: String,
        target: Target,
        patch: Patch,
    ) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(async move {
            let now = super::now_ms();
            patch.check(&target, now)?;
            self.change(&user, &target, &patch, now, &all_items, false)
                .await
        })
    }

    fn remove(&self, user: String, target: Target) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(async move { self.remove_where(&user, &target, &all_items, false).await })
    }

    fn preferences(&self, user: String) -> BoxFuture<'_, Result<Preferences, InboxError>> {
        Box::pin(async move { Ok(self.inbox(&user).await?.1) })
    }

    fn set_preferences(
        &self,
        user: String,
        prefs: Preferences,
    ) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(async move {
            let text = serde_json::to_string(&prefs).map_err(storage)?;
            for attempt in 0..ATTEMPTS {
                let (version, current, counts) = self.inbox(&user).await?;
                if current == prefs {
                    return Ok(Changed {
                        changed: 0,
                        counts,
                        version,
                        event: None,
                    });
                }
                let mut c = Commit::new(&user);
                c.check(&user, version);
                c.op(&["F", &user, &text]);
                let mut payload = serde_json::Map::new();
                payload.insert("preferences".into(), json!(prefs));
                c.event(&self.epoch, &user, version + 1, "preferences", payload);
                if let Some((event, counts)) = self.commit(c).await? {
                    return Ok(Changed {
                        changed: 1,
                        counts,
                        version: version + 1,
                        event,
                    });
                }
                CONTENTION.back_off(attempt).await;
            }
            Err(CONTENTION.exhausted("preferences"))
        })
    }

    fn sweep(&self, now_ms: i64) -> BoxFuture<'_, Result<Option<i64>, InboxError>> {
        Box::pin(async move {
            // One node sweeps at a time (another would find the same items and change nothing).
            let lease = ::redis::cmd("SET")
                .arg(self.key("sweep"))
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(900)
                .to_owned();
            if matches!(self.query(&lease).await?, Value::Nil) {
                return Ok(None);
            }
            let mut last = None;
            let wake = Patch {
                snoozed_until: Some(0),
                ..Default::default()
            };
            let woke = move |i: &Item| i.snoozed_until.is_some_and(|t| t <= now_ms);
            for (user, ids) in self.due("s", now_ms, 0).await? {
                let c = self
                    .change(&user, &Target::Ids(ids), &wake, now_ms, &woke, true)
                    .await?;
                last = c.event.or(last);
            }
            let oldest = now_ms.saturating_sub(self.limits.max_age.as_millis() as i64);
            let gone =
                move |i: &Item| i.expires_at.is_some_and(|t| t <= now_ms) || i.created_at < oldest;
            for (user, ids) in self.due("x", now_ms, oldest).await? {
                let c = self
                    .remove_where(&user, &Target::Ids(ids), &gone, true)
                    .await?;
                last = c.event.or(last);
            }
            Ok(last)
        })
    }

    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PendingEvent>, InboxError>> {
        Box::pin(self.drain(limit))
    }

    fn published(&self, upto: i64) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async move {
            self.eval(&self.scripts.published, &[upto.to_string().into_bytes()])
                .await?;
            // What this node handed out was published by it: the log needs no more look-ups.
            self.suspect.store(false, Ordering::Release);
            Ok(())
        })
    }

    fn published_upto(&self) -> BoxFuture<'_, Result<Option<i64>, InboxError>> {
        Box::pin(async move { Ok(Some(self.progress().await?.0)) })
    }

    fn recount(&self, repair: bool) -> BoxFuture<'_, Result<i64, InboxError>> {
        Box::pin(async move { Ok(self.recount_all(repair).await?.0) })
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, InboxError>> {
        Box::pin(async move {
            let (count_mismatches, users, items) = self.recount_all(false).await?;
            let xlen = ::redis::cmd("XLEN").arg(self.key("outbox")).to_owned();
            let pending_events = int(self.query(&xlen).await?).unwrap_or(0);
            Ok(Stats {
                users,
                items,
                pending_events,
                count_mismatches,
                startup_check: self.startup_check.clone(),
            })
        })
    }
}
