//! The inbox on NATS JetStream: every node of a cluster on the NATS engine sees the same inboxes, with the
//! same guarantees as the SQLite and Redis stores (items, states, order, cursors, counts and events).
//!
//! Why it is built this way (nats-server 2.9: one message is the unit of atomicity, there is no batch):
//! - **One head entry per user commits a change whole.** The KV bucket `<stem>` (file storage, one value
//!   per key) holds `h.<user token>`: the items' states, the counts, the version, the preferences and the
//!   events not yet published ([`head`]). A change reads the head, computes the new one and writes it
//!   with the revision it read as the expected last sequence of its subject: the server refuses the write
//!   if anything committed meanwhile, and the change is computed again (optimistic concurrency, at most
//!   [`ATTEMPTS`] attempts with jittered back-off, then 503 `inbox_unavailable`). So counts are exact in the
//!   same commit as the change, and an event exists exactly when its change does.
//! - **Bodies are written before the head, in a stream of their own.** What never changes (title, body,
//!   actions, data) is one message of `<stem>-bodies` (subject `<prefix>.inbox.body.<user token>`), and
//!   the item's id *is* that message's stream sequence: unique, and, because a head commit is refused
//!   whenever the inbox changed after it was read, a committed id is always above every id committed
//!   before it in that inbox (ids follow commit order per user, so "mark read up to N" is exact).
//!   A body whose head commit failed is deleted at once; one orphaned by a crash between the two writes
//!   is never read (no head names it) and goes with the stream's age limit (`inbox.max_age` + 1 day).
//! - **The outbox is in the head; the KV stream is its log.** Each head write is a message of the bucket's
//!   stream, so the drainer ([`outbox`]) follows the stream from the position it acknowledged and
//!   publishes the events of each head it sees, then removes them from the head (another conditional
//!   write). One node drains at a time, under a lease in `<stem>-lease` (a memory bucket whose values
//!   expire after [`outbox::LEASE`]); a node that takes the lease over checks each event id in the log
//!   before publishing, so an event the previous holder published is not published twice.
//! - **A notify to many users is one commit per user**, pipelined: a failure part way leaves the users
//!   before it notified, and answers 503; a retry with the same idempotency key completes the rest and
//!   creates nothing twice (the Redis store commits all users at once; 2.9 cannot).
//!
//! Durability is JetStream's (file storage; a change is acknowledged once the server stored its head).
//! Layout under the stem (`inbox.prefix`, or `<engine.prefix>-inbox`): bucket `<stem>` keys `h.<token>`,
//! `epoch`, `drained`; bucket `<stem>-lease` key `drain`; stream `<stem>-bodies`.

mod head;
mod outbox;

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use async_nats::ConnectOptions;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;

use super::sqlite::StoreLimits;
use super::{
    Archived, Changed, Counts, Delivered, InboxError, InboxStore, Item, ListQuery, NewItem,
    NotifyResult, Page, Patch, PendingEvent, Preferences, StartupCheck, Stats, Status, Target,
    MAX_PAGE,
};
use crate::engine::nats::codec::{token, untoken};
use crate::engine::BoxFuture;
use crate::hub::Hub;
use head::{Body, Content, Head, State};

/// Attempts of one change against concurrent changes of the same inbox.
const ATTEMPTS: u32 = 100;
/// Retries of a change that met a concurrent one (see `Contention`).
const CONTENTION: super::Contention = super::Contention {
    attempts: ATTEMPTS,
    step: Duration::from_micros(8),
};
/// Writes sent before their acknowledgements are awaited (the client bounds what is in flight).
const PIPELINE: usize = 256;
/// Reads of heads or bodies in flight at once for one request.
const READS: usize = 64;
/// Most users one sweep handles.
const SWEEP_BATCH: usize = 1000;
/// Room kept under the server's `max_payload` for the message's headers.
const HEADROOM: usize = 4096;

/// How to reach NATS and what to keep there.
#[derive(Debug, Clone)]
pub struct NatsInboxOptions {
    pub url: String,
    /// The name every stream, bucket and subject of the inbox starts with (letters, digits, `-`, `_`).
    pub stem: String,
    /// The engine's prefix (the bodies' subjects live under it, beside the engine's own).
    pub prefix: String,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub limits: StoreLimits,
}

pub struct NatsInbox {
    client: async_nats::Client,
    js: jetstream::Context,
    kv: kv::Store,
    lease: kv::Store,
    bodies: stream::Stream,
    bucket: String,
    body_subject: String,
    url: String,
    op_timeout: Duration,
    limits: StoreLimits,
    epoch: String,
    /// This process, for the lease.
    node: String,
    hub: Hub,
    /// The largest head this store writes (the server's `max_payload` less headers).
    max_head: usize,
    /// The highest KV position this node committed at: a node that does not drain waits for the drainer
    /// to have passed it.
    top: AtomicI64,
    /// Whether this node held the outbox lease at its last try (only the holder sweeps).
    holding: AtomicBool,
    drain: tokio::sync::Mutex<outbox::Drain>,
    due: parking_lot::Mutex<outbox::Due>,
    /// What the check of every inbox at open found (it ends before the store is returned).
    startup_check: StartupCheck,
}

pub(super) fn storage(e: impl std::fmt::Display) -> InboxError {
    InboxError::Storage(format!("nats: {e}"))
}

/// A stem usable in stream, bucket and subject names.
pub fn check_stem(stem: &str) -> Result<(), InboxError> {
    let ok = !stem.is_empty()
        && stem.len() <= 48
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(storage(format!(
            "{stem:?} cannot name NATS buckets and streams: use 1 to 48 letters, digits, '-' or '_'"
        )))
    }
}

fn head_key(user: &str) -> String {
    format!("h.{}", token(user))
}

/// A head read with the revision to commit against (0: there is none yet).
struct Read {
    head: Head,
    rev: u64,
}

/// What a commit attempt came to.
enum Committed {
    /// The KV position of the new head.
    At(u64),
    /// The inbox changed since it was read.
    Conflict,
}

impl NatsInbox {
    /// Connects (within `connect_timeout`), creates or adopts the bucket, lease bucket and bodies stream,
    /// makes sure the inbox has an epoch, and recounts every inbox (logging any repair).
    pub async fn open(o: NatsInboxOptions, hub: Hub) -> Result<NatsInbox, InboxError> {
        check_stem(&o.stem)?;
        let url = o.url.clone();
        let options = ConnectOptions::new()
            .name("herald-inbox")
            .connection_timeout(o.connect_timeout)
            .request_timeout(Some(o.op_timeout))
            .max_reconnects(None)
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(crate::engine::nats::backoff);
        let client = tokio::time::timeout(o.connect_timeout, options.connect(url.as_str()))
            .await
            .map_err(|_| {
                storage(format!(
                    "cannot reach NATS at {url} within {:?} (engine.connect_timeout)",
                    o.connect_timeout
                ))
            })?
            .map_err(|e| storage(format!("cannot reach NATS at {url}: {e}")))?;
        let max_payload = client.server_info().max_payload;
        let js = jetstream::ContextBuilder::new()
            .timeout(o.op_timeout)
            .build(client.clone());
        let ensure = |name: String, age: Duration, st| {
            let js = js.clone();
            async move {
                crate::engine::nats::ensure_kv(&js, &name, age, st)
                    .await
                    .map_err(|e| storage(format!("bucket {name}: {e}")))
            }
        };
        let setup = async {
            let kv = ensure(o.stem.clone(), Duration::ZERO, stream::StorageType::File).await?;
            let lease = ensure(
                format!("{}-lease", o.stem),
                outbox::LEASE,
                stream::StorageType::Memory,
            )
            .await?;
            let body_subjects = format!("{}.inbox.body.>", o.prefix);
            let bodies = js
                .get_or_create_stream(stream::Config {
                    name: format!("{}-bodies", o.stem),
                    description: Some("Herald inbox item bodies (id = sequence)".into()),
                    subjects: vec![body_subjects],
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    discard: stream::DiscardPolicy::Old,
                    max_age: o.limits.max_age + Duration::from_secs(86_400),
                    allow_direct: true,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| storage(format!("stream {}-bodies: {e}", o.stem)))?;
            let fresh = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            if kv.create("epoch", Bytes::from(fresh)).await.is_err() {
                // Another node made it first (or an earlier run): adopt it.
            }
            let epoch = kv
                .get("epoch")
                .await
                .map_err(storage)?
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
                .ok_or_else(|| storage("the inbox bucket did not keep its epoch"))?;
            Ok::<_, InboxError>((kv, lease, bodies, epoch))
        };
        let (kv, lease, bodies, epoch) =
            tokio::time::timeout(o.connect_timeout.max(o.op_timeout) * 2, setup)
                .await
                .map_err(|_| storage("setting up the inbox's buckets took too long"))??;
        let mut store = NatsInbox {
            bucket: o.stem.clone(),
            client,
            body_subject: format!("{}.inbox.body", o.prefix),
            js,
            kv,
            lease,
            bodies,
            url: url.clone(),
            op_timeout: o.op_timeout,
            limits: o.limits,
            epoch,
            node: uuid::Uuid::new_v4().simple().to_string(),
            hub,
            max_head: max_payload.saturating_sub(HEADROOM).max(64 * 1024),
            top: AtomicI64::new(0),
            holding: AtomicBool::new(false),
            drain: tokio::sync::Mutex::new(outbox::Drain::default()),
            due: parking_lot::Mutex::new(outbox::Due::default()),
            startup_check: StartupCheck::default(),
        };
        let started = std::time::Instant::now();
        let (repaired, users, _, _) = store.recount_all(true).await?;
        store.startup_check = StartupCheck {
            finished: true,
            users_checked: users,
            repaired,
            duration_ms: Some(started.elapsed().as_millis() as u64),
            error: None,
        };
        if repaired > 0 {
            tracing::warn!(
                repaired,
                bucket = %store.bucket,
                "inbox: counts differed from the items and were repaired"
            );
        } else {
            tracing::info!(
                url = %store.url,
                bucket = %store.bucket,
                epoch = %store.epoch,
                "inbox on NATS: counts checked against the items"
            );
        }
        Ok(store)
    }

    async fn within<T, E: std::fmt::Display>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, InboxError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(|e| storage(format!("{what}: {e}"))),
            Err(_) => Err(storage(format!(
                "{what}: NATS at {} did not answer within {:?} (engine.op_timeout)",
                self.url, self.op_timeout
            ))),
        }
    }

    async fn read(&self, user: &str) -> Result<Read, InboxError> {
        let entry = self
            .within("read a head", self.kv.entry(head_key(user)))
            .await?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Read {
                head: Head::decode(&e.value)?,
                rev: e.revision,
            }),
            Some(e) => Ok(Read {
                head: Head::default(),
                rev: e.revision,
            }),
            None => Ok(Read {
                head: Head::default(),
                rev: 0,
            }),
        }
    }

    /// Sends a head write conditional on `rev`; the acknowledgement is awaited by [`Self::settle`].
    async fn send_head(
        &self,
        user: &str,
        head: &Head,
        rev: u64,
    ) -> Result<jetstream::context::PublishAckFuture, InboxError> {
        let bytes = head.encode()?;
        if bytes.len() > self.max_head {
            return Err(InboxError::Storage(format!(
                "the inbox of {user} would take {} bytes, over the {} NATS accepts in one message \
                 ({} events wait to be published)",
                bytes.len(),
                self.max_head,
                head.outbox.len()
            )));
        }
        let subject = format!("$KV.{}.{}", self.bucket, head_key(user));
        let msg = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(bytes))
            .expected_last_subject_sequence(rev);
        self.within("write a head", self.js.send_publish(subject, msg))
            .await
    }

    async fn settle(
        &self,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<Committed, InboxError> {
        match tokio::time::timeout(self.op_timeout, ack.into_future()).await {
            Ok(Ok(a)) => {
                self.top.fetch_max(a.sequence as i64, Ordering::AcqRel);
                Ok(Committed::At(a.sequence))
            }
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Ok(Committed::Conflict)
            }
            Ok(Err(e)) => Err(storage(format!("write a head: {e}"))),
            Err(_) => Err(storage(format!(
                "write a head: no acknowledgement within {:?} (engine.op_timeout); the change may \
                 or may not have been made",
                self.op_timeout
            ))),
        }
    }

    async fn commit(&self, user: &str, head: &Head, rev: u64) -> Result<Committed, InboxError> {
        let ack = self.send_head(user, head, rev).await?;
        self.settle(ack).await
    }

    async fn body(&self, user: &str, id: i64) -> Result<Option<Content>, InboxError> {
        let Ok(seq) = u64::try_from(id) else {
            return Ok(None);
        };
        match tokio::time::timeout(self.op_timeout, self.bodies.direct_get(seq)).await {
            Ok(Ok(m)) => {
                let b: Body = serde_json::from_slice(&m.payload).map_err(storage)?;
                Ok((b.u == user).then_some(b.c))
            }
            Ok(Err(e))
                if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound
                    || e.kind() == jetstream::stream::DirectGetErrorKind::InvalidSubject =>
            {
                Ok(None)
            }
            Ok(Err(e)) => Err(storage(format!("read an item body: {e}"))),
            Err(_) => Err(storage("read an item body: no answer in time")),
        }
    }

    /// The items at `states`, with their bodies (read concurrently). A body that is gone (which only the
    /// bodies stream's age limit could do, a day after the sweeper removes the item) reads as empty text.
    async fn items(&self, user: &str, states: &[State]) -> Result<Vec<Item>, InboxError> {
        let futures = states.iter().map(|s| self.body(user, s.id)).collect();
        let bodies = all(futures, READS)
            .await
            .into_iter()
            .collect::<Result<Vec<Option<Content>>, InboxError>>()?;
        Ok(states
            .iter()
            .zip(bodies)
            .map(|(s, b)| {
                if b.is_none() {
                    tracing::warn!(user, id = s.id, "inbox: an item's body is missing");
                }
                s.item(b)
            })
            .collect())
    }

    /// Forgets bodies of items no head names any more; a failure leaves them to the age limit.
    async fn drop_bodies(&self, ids: Vec<i64>) {
        let futures = ids
            .into_iter()
            .map(|id| {
                let seq = u64::try_from(id).unwrap_or(0);
                tokio::time::timeout(self.op_timeout, self.bodies.delete_message(seq))
            })
            .collect();
        let results = all(futures, READS).await;
        let failed = results.iter().filter(|r| !matches!(r, Ok(Ok(_)))).count();
        if failed > 0 {
            tracing::debug!(
                failed,
                "inbox: item bodies not deleted; the stream's age limit removes them"
            );
        }
    }

    /// The states `target` names in `head`; an id not there is NotFound unless `ignore_missing`.
    fn targeted(
        head: &Head,
        target: &Target,
        ignore_missing: bool,
    ) -> Result<Vec<usize>, InboxError> {
        match target {
            Target::Ids(ids) => {
                let mut ids = ids.clone();
                ids.sort_unstable();
                ids.dedup();
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    match head.position(id) {
                        Some(p) => out.push(p),
                        None if ignore_missing => {}
                        None => {
                            return Err(InboxError::NotFound(format!("no item {id} in this inbox")))
                        }
                    }
                }
                Ok(out)
            }
            Target::UpTo { upto, category } => Ok(head
                .items
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.id <= *upto && category.as_ref().is_none_or(|c| &s.category == c)
                })
                .map(|(i, _)| i)
                .collect()),
        }
    }

    async fn try_change(
        &self,
        user: &str,
        target: &Target,
        patch: &Patch,
        now: i64,
        keep: &(dyn Fn(&Item) -> bool + Sync),
        ignore_missing: bool,
    ) -> Result<Option<Changed>, InboxError> {
        let Read { mut head, rev } = self.read(user).await?;
        let at = Self::targeted(&head, target, ignore_missing)?;
        // Only an action needs the items' content (it must be one of the item's actions).
        let olds: Vec<Item> = if patch.action.is_some() {
            let states: Vec<State> = at.iter().map(|&i| head.items[i].clone()).collect();
            self.items(user, &states).await?
        } else {
            at.iter().map(|&i| head.items[i].item(None)).collect()
        };
        let mut changed = Vec::new();
        for (&i, old) in at.iter().zip(&olds) {
            if !keep(old) {
                continue;
            }
            let new = patch.apply(old, now)?;
            if &new == old {
                continue;
            }
            let before = head.items[i].tally();
            head.items[i].set_states(&new);
            let after = head.items[i].tally();
            head.add(&new.category, &before, -1);
            head.add(&new.category, &after, 1);
            changed.push(new);
        }
        if changed.is_empty() {
            return Ok(Some(Changed {
                changed: 0,
                counts: head.counts(),
                version: head.version,
                event: None,
            }));
        }
        let (kind, payload) = super::updated_event(&changed, target, patch);
        head.push_event(&self.epoch, user, kind, payload)?;
        match self.commit(user, &head, rev).await? {
            Committed::At(seq) => Ok(Some(Changed {
                changed: changed.len(),
                counts: head.counts(),
                version: head.version,
                event: Some(seq as i64),
            })),
            Committed::Conflict => Ok(None),
        }
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
        let Read { mut head, rev } = self.read(user).await?;
        let at = Self::targeted(&head, target, ignore_missing)?;
        let gone: HashSet<usize> = at
            .into_iter()
            .filter(|&i| keep(&head.items[i].item(None)))
            .collect();
        if gone.is_empty() {
            return Ok(Some(Changed {
                changed: 0,
                counts: head.counts(),
                version: head.version,
                event: None,
            }));
        }
        let mut ids = Vec::with_capacity(gone.len());
        let mut kept = Vec::with_capacity(head.items.len() - gone.len());
        for (i, s) in std::mem::take(&mut head.items).into_iter().enumerate() {
            if gone.contains(&i) {
                head.add(&s.category, &s.tally(), -1);
                ids.push(s.id);
            } else {
                kept.push(s);
            }
        }
        head.items = kept;
        let (kind, payload) = super::removed_event(&ids, target);
        head.push_event(&self.epoch, user, kind, payload)?;
        match self.commit(user, &head, rev).await? {
            Committed::At(seq) => {
                let n = ids.len();
                self.drop_bodies(ids).await;
                Ok(Some(Changed {
                    changed: n,
                    counts: head.counts(),
                    version: head.version,
                    event: Some(seq as i64),
                }))
            }
            Committed::Conflict => Ok(None),
        }
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

    /// Writes one body per user (pipelined); their sequences are the new items' ids.
    async fn write_bodies(
        &self,
        users: &[&String],
        content: &Content,
    ) -> Result<Vec<i64>, InboxError> {
        let mut ids = Vec::with_capacity(users.len());
        for chunk in users.chunks(PIPELINE) {
            let mut acks = Vec::with_capacity(chunk.len());
            for u in chunk {
                let body = serde_json::to_vec(&Body {
                    u: (*u).clone(),
                    c: content.clone(),
                })
                .map_err(storage)?;
                let subject = format!("{}.{}", self.body_subject, token(u));
                acks.push(
                    self.within("write an item body", self.js.publish(subject, body.into()))
                        .await?,
                );
            }
            for ack in acks {
                let a = self.within("write an item body", ack.into_future()).await?;
                ids.push(a.sequence as i64);
            }
        }
        Ok(ids)
    }

    /// One round of a notify for `users`: those whose head changed meanwhile are returned to try again.
    async fn notify_round(
        &self,
        users: &[&String],
        item: &NewItem,
        key: Option<&str>,
        out: &mut HashMap<String, (Option<i64>, &'static str)>,
        last: &mut Option<i64>,
    ) -> Result<Vec<String>, InboxError> {
        let now = super::now_ms();
        let futures = users.iter().map(|u| self.read(u)).collect();
        let reads = all(futures, READS)
            .await
            .into_iter()
            .collect::<Result<Vec<Read>, InboxError>>()?;
        let mut writing: Vec<(&String, Read)> = Vec::new();
        for (u, r) in users.iter().zip(reads) {
            if !r.head.prefs.allows(item.category(), "inbox") {
                out.insert((*u).clone(), (None, "muted"));
            } else if let Some(id) = key.and_then(|k| r.head.has_key(k)) {
                out.insert((*u).clone(), (Some(id), "duplicate"));
            } else {
                writing.push((u, r));
            }
        }
        if writing.is_empty() {
            return Ok(Vec::new());
        }
        let targets: Vec<&String> = writing.iter().map(|(u, _)| *u).collect();
        let ids = self.write_bodies(&targets, &Content::of(item)).await?;
        let mut retry = Vec::new();
        let mut orphans = Vec::new();
        let mut dropped = Vec::new();
        let mut pending = writing.into_iter().zip(ids).collect::<Vec<_>>();
        while !pending.is_empty() {
            let rest = pending.split_off(pending.len().min(PIPELINE));
            let mut acks = Vec::with_capacity(pending.len());
            for ((u, Read { mut head, rev }), id) in pending {
                let state = State::new(id, item, now, key);
                head.add(&state.category, &state.tally(), 1);
                let stored = item.stored(id, now);
                head.items.push(state);
                let mut removed = Vec::new();
                let max = self.limits.max_items.max(1);
                if head.items.len() > max {
                    let over = head.items.len() - max;
                    let old: Vec<State> = head.items.drain(..over).collect();
                    for s in old {
                        head.add(&s.category, &s.tally(), -1);
                        removed.push(s.id);
                    }
                }
                let mut payload = serde_json::Map::new();
                payload.insert("item".into(), json!(stored));
                if !removed.is_empty() {
                    payload.insert("removed".into(), json!(removed));
                }
                head.push_event(&self.epoch, u, "created", payload)?;
                acks.push((u, id, removed, self.send_head(u, &head, rev).await));
            }
            for (u, id, removed, ack) in acks {
                let r = match ack {
                    Ok(ack) => self.settle(ack).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(Committed::At(seq)) => {
                        out.insert(u.clone(), (Some(id), "created"));
                        *last = Some(last.map_or(seq as i64, |l: i64| l.max(seq as i64)));
                        dropped.extend(removed);
                    }
                    Ok(Committed::Conflict) => {
                        orphans.push(id);
                        retry.push(u.clone());
                    }
                    Err(e) => {
                        orphans.push(id);
                        self.drop_bodies(orphans).await;
                        return Err(e);
                    }
                }
            }
            pending = rest;
        }
        orphans.extend(dropped);
        self.drop_bodies(orphans).await;
        Ok(retry)
    }

    /// Every head (the last value of each `h.` key), with its user; `values` false reads keys only. The
    /// scan only reads, so one that failed (a consumer that timed out or was reset under load) is run again,
    /// a few times, before an audience notify or a recount fails for it.
    async fn scan(&self, values: bool) -> Result<Vec<(String, Option<Head>, u64)>, InboxError> {
        const SCANS: u32 = 3;
        let mut tried = 1;
        loop {
            match self.scan_once(values).await {
                Err(InboxError::Storage(e)) if tried < SCANS => {
                    tracing::warn!(error = %e, attempt = tried, "inbox: scanning the inboxes failed; again");
                    tried += 1;
                }
                r => return r,
            }
        }
    }

    async fn scan_once(
        &self,
        values: bool,
    ) -> Result<Vec<(String, Option<Head>, u64)>, InboxError> {
        let consumer = self
            .within(
                "scan the inboxes",
                self.kv
                    .stream
                    .create_consumer(jetstream::consumer::push::OrderedConfig {
                        deliver_subject: self.js_client_inbox(),
                        filter_subject: format!("$KV.{}.h.>", self.bucket),
                        headers_only: !values,
                        deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                        replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                        ..Default::default()
                    }),
            )
            .await?;
        let expected = consumer.cached_info().num_pending;
        let mut out = Vec::with_capacity(expected as usize);
        if expected == 0 {
            return Ok(out);
        }
        let mut messages = self.within("scan the inboxes", consumer.messages()).await?;
        let prefix = format!("$KV.{}.h.", self.bucket);
        for _ in 0..expected.saturating_add(16) {
            let m = self
                .within("scan the inboxes", async {
                    messages
                        .next()
                        .await
                        .ok_or_else(|| "the scan ended".to_string())?
                        .map_err(|e| e.to_string())
                })
                .await?;
            let info = m.info().map_err(storage)?;
            let (seq, left) = (info.stream_sequence, info.pending);
            let user = m
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(untoken)
                .ok_or_else(|| storage(format!("unexpected key {}", m.subject)))?;
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some();
            if !deleted {
                let head = if values {
                    Some(Head::decode(&m.payload)?)
                } else {
                    None
                };
                out.push((user, head, seq));
            }
            if left == 0 {
                break;
            }
        }
        Ok(out)
    }

    fn js_client_inbox(&self) -> String {
        self.client.new_inbox()
    }

    /// Recounts every inbox: (categories whose counts differed, users with items, items, pending events).
    async fn recount_all(&self, repair: bool) -> Result<(i64, i64, i64, i64), InboxError> {
        let (mut differ, mut users, mut items, mut events) = (0, 0, 0, 0);
        for (user, head, _) in self.scan(true).await? {
            let Some(head) = head else { continue };
            let d = head.mismatches();
            differ += d;
            users += i64::from(!head.items.is_empty());
            items += head.items.len() as i64;
            events += head.outbox.len() as i64;
            if d > 0 && repair {
                for _ in 0..ATTEMPTS {
                    let Read { mut head, rev } = self.read(&user).await?;
                    head.counts = head.recount();
                    if let Committed::At(_) = self.commit(&user, &head, rev).await? {
                        break;
                    }
                }
            }
        }
        Ok((differ, users, items, events))
    }

    /// Applies what is due in `user`'s inbox at `now`; returns the last event's position.
    async fn sweep_user(&self, user: &str, now: i64) -> Result<Option<i64>, InboxError> {
        let head = self.read(user).await?.head;
        let oldest = now.saturating_sub(self.limits.max_age.as_millis() as i64);
        let woke: Vec<i64> = head
            .items
            .iter()
            .filter(|s| s.snoozed.is_some_and(|t| t <= now))
            .map(|s| s.id)
            .collect();
        let gone: Vec<i64> = head
            .items
            .iter()
            .filter(|s| s.expires.is_some_and(|t| t <= now) || s.created < oldest)
            .map(|s| s.id)
            .collect();
        let mut last = None;
        if !woke.is_empty() {
            let wake = Patch {
                snoozed_until: Some(0),
                ..Default::default()
            };
            let due = move |i: &Item| i.snoozed_until.is_some_and(|t| t <= now);
            let c = self
                .change(user, &Target::Ids(woke), &wake, now, &due, true)
                .await?;
            last = c.event.or(last);
        }
        if !gone.is_empty() {
            let due =
                move |i: &Item| i.expires_at.is_some_and(|t| t <= now) || i.created_at < oldest;
            let c = self
                .remove_where(user, &Target::Ids(gone), &due, true)
                .await?;
            last = c.event.or(last);
        }
        Ok(last)
    }
}

/// Runs `futures`, at most `n` at a time, and gives their outputs in order.
pub(crate) async fn all<F: std::future::Future>(futures: Vec<F>, n: usize) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futures.len());
    let mut it = futures.into_iter();
    loop {
        let chunk: Vec<F> = it.by_ref().take(n.max(1)).collect();
        if chunk.is_empty() {
            return out;
        }
        out.extend(futures_util::future::join_all(chunk).await);
    }
}

fn all_items(_: &Item) -> bool {
    true
}

/// Whether `s` belongs on a page of `q` (the same filters as the other stores).
fn listed(s: &State, q: &ListQuery) -> bool {
    let status = match q.status {
        Status::All => true,
        Status::Unread => s.read.is_none(),
        Status::Read => s.read.is_some(),
        Status::Unseen => s.seen.is_none(),
    };
    let archived = match q.archived {
        Archived::False => s.archived.is_none(),
        Archived::True => s.archived.is_some(),
        Archived::All => true,
    };
    status
        && archived
        && (q.snoozed || s.snoozed.is_none())
        && q.category.as_ref().is_none_or(|c| &s.category == c)
        && q.cursor.is_none_or(|c| s.id < c)
}

impl InboxStore for NatsInbox {
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
            let mut out = HashMap::new();
            let mut last = None;
            let mut todo: Vec<String> = users.clone();
            for attempt in 0..ATTEMPTS {
                let refs: Vec<&String> = todo.iter().collect();
                let retry = self
                    .notify_round(
                        &refs,
                        &item,
                        idempotency_key.as_deref(),
                        &mut out,
                        &mut last,
                    )
                    .await?;
                if retry.is_empty() {
                    let delivered = users
                        .into_iter()
                        .map(|u| {
                            let (id, outcome) = out.get(&u).copied().unwrap_or((None, "muted"));
                            Delivered {
                                user: u,
                                id,
                                outcome,
                            }
                        })
                        .collect();
                    return Ok(NotifyResult {
                        delivered,
                        event: last,
                    });
                }
                todo = retry;
                CONTENTION.back_off(attempt).await;
            }
            Err(CONTENTION.exhausted("notify"))
        })
    }

    fn list(&self, user: String, q: ListQuery) -> BoxFuture<'_, Result<Page, InboxError>> {
        Box::pin(async move {
            let limit = q.limit.unwrap_or(50).clamp(1, MAX_PAGE);
            let head = self.read(&user).await?.head;
            let mut picked: Vec<State> = head
                .items
                .iter()
                .rev()
                .filter(|s| listed(s, &q))
                .take(limit + 1)
                .cloned()
                .collect();
            let next_cursor = if picked.len() > limit {
                picked.truncate(limit);
                picked.last().map(|s| s.id)
            } else {
                None
            };
            let items = self.items(&user, &picked).await?;
            Ok(Page {
                items,
                next_cursor,
                counts: head.counts(),
                version: head.version,
            })
        })
    }

    fn users(&self, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, InboxError>> {
        Box::pin(async move {
            let mut users: Vec<String> = self
                .scan(false)
                .await?
                .into_iter()
                .map(|(u, _, _)| u)
                .filter(|u| u.as_str() > after.as_str())
                .collect();
            users.sort_unstable();
            users.truncate(limit);
            Ok(users)
        })
    }

    fn counts(&self, user: String) -> BoxFuture<'_, Result<(Counts, i64), InboxError>> {
        Box::pin(async move {
            let head = self.read(&user).await?.head;
            Ok((head.counts(), head.version))
        })
    }

    fn get(&self, user: String, id: i64) -> BoxFuture<'_, Result<Item, InboxError>> {
        Box::pin(async move {
            let head = self.read(&user).await?.head;
            let s = head
                .position(id)
                .map(|p| head.items[p].clone())
                .ok_or_else(|| InboxError::NotFound(format!("no item {id} in this inbox")))?;
            let mut items = self.items(&user, &[s]).await?;
            items
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
        Box::pin(async move { Ok(self.read(&user).await?.head.prefs) })
    }

    fn set_preferences(
        &self,
        user: String,
        prefs: Preferences,
    ) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(async move {
            for attempt in 0..ATTEMPTS {
                let Read { mut head, rev } = self.read(&user).await?;
                if head.prefs == prefs {
                    return Ok(Changed {
                        changed: 0,
                        counts: head.counts(),
                        version: head.version,
                        event: None,
                    });
                }
                head.prefs = prefs.clone();
                let mut payload = serde_json::Map::new();
                payload.insert("preferences".into(), json!(prefs));
                head.push_event(&self.epoch, &user, "preferences", payload)?;
                if let Committed::At(seq) = self.commit(&user, &head, rev).await? {
                    return Ok(Changed {
                        changed: 1,
                        counts: head.counts(),
                        version: head.version,
                        event: Some(seq as i64),
                    });
                }
                CONTENTION.back_off(attempt).await;
            }
            Err(CONTENTION.exhausted("preferences"))
        })
    }

    fn sweep(&self, now_ms: i64) -> BoxFuture<'_, Result<Option<i64>, InboxError>> {
        Box::pin(async move {
            // The drainer sweeps: it sees every head change, so it knows what falls due when.
            if !self.holding.load(Ordering::Acquire) {
                return Ok(None);
            }
            let due = self.due_users(now_ms).await?;
            let mut last = None;
            for user in due {
                last = self.sweep_user(&user, now_ms).await?.or(last);
                let head = self.read(&user).await?.head;
                self.set_due(&user, &head);
            }
            Ok(last)
        })
    }

    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PendingEvent>, InboxError>> {
        Box::pin(self.drain_events(limit))
    }

    fn published(&self, _upto: i64) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async move {
            let mut d = self.drain.lock().await;
            self.acknowledge(&mut d).await
        })
    }

    fn published_upto(&self) -> BoxFuture<'_, Result<Option<i64>, InboxError>> {
        Box::pin(async move { Ok(Some(self.drained().await? as i64)) })
    }

    fn recount(&self, repair: bool) -> BoxFuture<'_, Result<i64, InboxError>> {
        Box::pin(async move { Ok(self.recount_all(repair).await?.0) })
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, InboxError>> {
        Box::pin(async move {
            let (count_mismatches, users, items, pending_events) = self.recount_all(false).await?;
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
