//! The drainer: moves the events committed in the heads onto the users' channels, on one node at a time.
//!
//! Why it is built this way:
//! - **The bucket's own stream is the outbox's order.** Every head write is a message of the KV stream,
//!   so following `h.>` from the acknowledged position (`drained`) meets every head that changed since,
//!   in commit order. With one value kept per key, a head written twice meanwhile is met once, at its
//!   latest value, which still holds every event not yet cleared: nothing is skipped, and one user's
//!   events keep their order (they are listed in version order in one head).
//! - **Clear, then advance.** After the [`Inbox`](super::super::Inbox) publisher has published a batch,
//!   the published events are removed from their heads (conditional writes, retried on a conflict) and
//!   only then is `drained` moved past them. A crash in between leaves events in heads past `drained`,
//!   which the next holder meets again; events cleared are gone, so nothing is published twice by that
//!   path. Within a session, a head met again before its clear is read back (an echo of the write made
//!   before the clear) is recognised by the version already handed out.
//! - **A taken lease is suspect.** The lease (`<stem>-lease`, key `drain`, values expire after
//!   [`LEASE`]) is renewed at every call; a node that had to *create* it does not know what the previous
//!   holder published without clearing, so every event met at or below the stream's end at takeover is
//!   first looked up in the log by its id. As with Redis, a live holder losing the lease mid-batch needs
//!   a stall longer than [`LEASE`]; clients drop a copy anyway (they ignore versions they have).
//! - **The published position is the drainer's cursor**: a node that does not drain waits (bounded) until
//!   it has passed the last head this node committed, so an answer is followed by its event in the log.
//!   It is exact when a batch reads up to the stream's end (the normal case); a batch cut at [`BATCH`]
//!   heads may report a head whose newer write is still ahead, for a moment.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;

use super::head::{event_id, Head};
use super::{storage, Committed, NatsInbox, Read, ATTEMPTS, SWEEP_BATCH};
use crate::engine::nats::codec::untoken;
use crate::inbox::{InboxError, PendingEvent};

/// How long the outbox lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(5);
/// How long `pending` waits for news before answering empty.
const IDLE_WAIT: Duration = Duration::from_millis(900);
/// Most heads read into one batch.
const BATCH: usize = 1024;
const LEASE_KEY: &str = "drain";
const DRAINED_KEY: &str = "drained";

/// What the drainer knows; reset whenever the lease changes hands.
#[derive(Default)]
pub(super) struct Drain {
    watch: Option<kv::Watch>,
    /// The KV position read up to.
    cursor: u64,
    /// Per user: the highest version handed out, and the position from which its heads no longer hold
    /// it (the clear), once known.
    sent: HashMap<String, (i64, Option<u64>)>,
    /// The batch handed to the publisher and not yet acknowledged: its end and its users' versions.
    handed: Option<(u64, HashMap<String, i64>)>,
    /// Events met at or below this position are looked up in the log first.
    suspect_until: u64,
}

/// When each user's inbox next has something for the sweeper, as the drainer met the heads (apart from
/// [`Drain`], whose lock is held while the drainer waits for news).
#[derive(Default)]
pub(super) struct Due {
    at: HashMap<String, i64>,
    /// The due times must be read from every head (after taking the lease).
    scan: bool,
}

enum Lease {
    Held,
    Taken,
    Other,
}

impl NatsInbox {
    async fn take_lease(&self) -> Result<Lease, InboxError> {
        let value = Bytes::from(self.node.clone());
        let entry = self
            .within("read the outbox lease", self.lease.entry(LEASE_KEY))
            .await?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put && e.value == self.node.as_bytes() => {
                match tokio::time::timeout(
                    self.op_timeout,
                    self.lease.update(LEASE_KEY, value, e.revision),
                )
                .await
                {
                    Ok(Ok(_)) => Lease::Held,
                    _ => Lease::Other,
                }
            }
            Some(e) if e.operation == kv::Operation::Put => Lease::Other,
            _ => match tokio::time::timeout(self.op_timeout, self.lease.create(LEASE_KEY, value))
                .await
            {
                Ok(Ok(_)) => Lease::Taken,
                _ => Lease::Other,
            },
        })
    }

    /// The position the drainer has published up to.
    pub(super) async fn drained(&self) -> Result<u64, InboxError> {
        let v = self
            .within("read the outbox position", self.kv.get(DRAINED_KEY))
            .await?;
        Ok(v.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
            .unwrap_or(0))
    }

    async fn wait(&self, d: Duration) {
        let shutdown = self.hub.shutdown_token();
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = shutdown.cancelled() => {}
        }
    }

    pub(super) async fn drain_events(&self, limit: usize) -> Result<Vec<PendingEvent>, InboxError> {
        let started = Instant::now();
        for _ in 0..10_000 {
            if self.hub.shutdown_token().is_cancelled() {
                return Ok(Vec::new());
            }
            let lease = self.take_lease().await?;
            let mut d = self.drain.lock().await;
            match lease {
                Lease::Other => {
                    self.holding.store(false, Ordering::Release);
                    if d.watch.is_some() || d.handed.is_some() {
                        *d = Drain::default();
                    }
                    drop(d);
                    // Another node publishes: wait (bounded) until it has passed what this node committed.
                    let top = self.top.load(Ordering::Acquire);
                    if top == 0
                        || self.drained().await? as i64 >= top
                        || started.elapsed() >= IDLE_WAIT
                    {
                        return Ok(Vec::new());
                    }
                    self.wait(Duration::from_millis(20)).await;
                    continue;
                }
                Lease::Taken => {
                    let end = self
                        .within("read the inbox stream", self.kv.stream.get_info())
                        .await?
                        .state
                        .last_sequence;
                    *d = Drain {
                        suspect_until: end,
                        ..Default::default()
                    };
                    self.due.lock().scan = true;
                    tracing::debug!(node = %self.node, "inbox: this node took the outbox lease");
                }
                Lease::Held => {}
            }
            self.holding.store(true, Ordering::Release);
            if let Some((upto, _)) = d.handed.take() {
                // Not acknowledged: publishing failed. Read again from the acknowledged position, checking
                // the log for what did get published.
                d.watch = None;
                d.sent.clear();
                d.suspect_until = d.suspect_until.max(upto);
            }
            match self.read_batch(&mut d, limit, started).await {
                Ok(Some(events)) => return Ok(events),
                Ok(None) if started.elapsed() >= IDLE_WAIT => return Ok(Vec::new()),
                Ok(None) => continue,
                Err(e) => {
                    // Start over from the acknowledged position next time.
                    d.watch = None;
                    d.handed = None;
                    d.sent.clear();
                    d.suspect_until = d.suspect_until.max(d.cursor);
                    return Err(e);
                }
            }
        }
        Ok(Vec::new())
    }

    /// Reads the heads changed since the cursor; `None` when there was nothing to publish.
    async fn read_batch(
        &self,
        d: &mut Drain,
        limit: usize,
        started: Instant,
    ) -> Result<Option<Vec<PendingEvent>>, InboxError> {
        if d.watch.is_none() {
            let from = self.drained().await?;
            d.cursor = from;
            d.watch = Some(
                self.within(
                    "follow the inbox heads",
                    self.kv.watch_from_revision("h.>", from + 1),
                )
                .await?,
            );
        }
        let Some(watch) = d.watch.as_mut() else {
            return Ok(None);
        };
        let left = IDLE_WAIT
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        let mut entries = Vec::new();
        match tokio::time::timeout(left, watch.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err(storage("the watch of the inbox heads ended")),
            Ok(Some(Err(e))) => return Err(storage(format!("watching the inbox heads: {e}"))),
            Ok(Some(Ok(e))) => entries.push(e),
        }
        let cap = BATCH.min(limit.max(1) * 4);
        while entries.len() < cap && entries.last().is_some_and(|e| e.delta > 0) {
            match tokio::time::timeout(self.op_timeout, watch.next()).await {
                Ok(Some(Ok(e))) => entries.push(e),
                Ok(Some(Err(e))) => return Err(storage(format!("watching the inbox heads: {e}"))),
                Ok(None) => return Err(storage("the watch of the inbox heads ended")),
                Err(_) => break,
            }
        }
        let max_age = self.limits.max_age.as_millis() as i64;
        let mut events = Vec::new();
        let mut users: HashMap<String, i64> = HashMap::new();
        for e in entries {
            d.cursor = d.cursor.max(e.revision);
            if e.operation != kv::Operation::Put {
                continue;
            }
            let Some(user) = e.key.strip_prefix("h.").and_then(untoken) else {
                continue;
            };
            let head = match Head::decode(&e.value) {
                Ok(h) => h,
                Err(err) => {
                    tracing::error!(user, error = %err, "inbox: a head cannot be read; its events wait");
                    continue;
                }
            };
            match head.due(max_age) {
                Some(t) => self.due.lock().at.insert(user.clone(), t),
                None => self.due.lock().at.remove(&user),
            };
            let from = d.sent.get(&user).map_or(i64::MIN, |s| s.0);
            let Some(top) = head
                .outbox
                .iter()
                .map(|ev| ev.v)
                .max()
                .filter(|v| *v > from)
            else {
                continue;
            };
            for ev in head.outbox.iter().filter(|ev| ev.v > from) {
                events.push(PendingEvent {
                    seq: e.revision as i64,
                    user: user.clone(),
                    event_id: event_id(&self.epoch, ev.v, &user),
                    payload: ev.p.clone(),
                    in_log: false,
                });
            }
            d.sent.insert(user.clone(), (top, None));
            users.insert(user, top);
        }
        let cursor = d.cursor;
        d.sent
            .retain(|_, (_, cleared)| cleared.is_none_or(|c| c > cursor));
        if !events.is_empty() && events[0].seq as u64 <= d.suspect_until {
            events = self.mark_published(events, d.suspect_until).await?;
        }
        d.handed = Some((cursor, users));
        if events.is_empty() {
            self.acknowledge(d).await?;
            return Ok(None);
        }
        Ok(Some(events))
    }

    /// Marks the events (met at or below `until`) that the log already has: not published again, but
    /// still handed over, so what follows publication (Web Push) is not skipped for them.
    async fn mark_published(
        &self,
        events: Vec<PendingEvent>,
        until: u64,
    ) -> Result<Vec<PendingEvent>, InboxError> {
        let mut keep = Vec::with_capacity(events.len());
        let mut gone = 0usize;
        for mut e in events {
            if e.seq as u64 <= until {
                match self.hub.find_id(e.event_id.clone()).await {
                    Ok(Some(_)) => {
                        gone += 1;
                        e.in_log = true;
                    }
                    Ok(None) => {}
                    Err(err) => return Err(storage(format!("cannot look an event up: {err}"))),
                }
            }
            keep.push(e);
        }
        if gone > 0 {
            tracing::info!(
                events = gone,
                "inbox: events already published by the previous outbox holder are not published again"
            );
        }
        Ok(keep)
    }

    /// After the handed batch is published: clears its events from their heads, then records the
    /// position. On a failure the batch stays handed, so the next call reads it again, suspect.
    pub(super) async fn acknowledge(&self, d: &mut Drain) -> Result<(), InboxError> {
        let Some((upto, users)) = d.handed.take() else {
            return Ok(());
        };
        let futures = users
            .iter()
            .map(|(u, v)| async move { (u.clone(), *v, self.clear(u, *v).await) })
            .collect();
        let results = super::all(futures, 32).await;
        let mut failed = None;
        for (u, v, r) in results {
            match r {
                Ok(at) => {
                    if let Some(s) = d.sent.get_mut(&u).filter(|s| s.0 == v) {
                        s.1 = Some(at);
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            d.handed = Some((upto, users));
            return Err(e);
        }
        let put = self.kv.put(DRAINED_KEY, Bytes::from(upto.to_string()));
        if let Err(e) = self.within("record the outbox position", put).await {
            d.handed = Some((upto, HashMap::new()));
            return Err(e);
        }
        Ok(())
    }

    /// Removes `user`'s events up to version `v` from the head; returns the position from which the head
    /// no longer holds them.
    async fn clear(&self, user: &str, v: i64) -> Result<u64, InboxError> {
        for attempt in 0..ATTEMPTS {
            let Read { mut head, rev } = self.read(user).await?;
            let before = head.outbox.len();
            head.outbox.retain(|e| e.v > v);
            if head.outbox.len() == before {
                return Ok(rev);
            }
            match self.commit(user, &head, rev).await? {
                Committed::At(seq) => return Ok(seq),
                Committed::Conflict => super::CONTENTION.back_off(attempt).await,
            }
        }
        Err(super::CONTENTION.exhausted("clear published events"))
    }

    /// Users whose inbox has something due at `now` (read from every head once after taking the lease).
    pub(super) async fn due_users(&self, now: i64) -> Result<Vec<String>, InboxError> {
        let max_age = self.limits.max_age.as_millis() as i64;
        if self.due.lock().scan {
            let heads = self.scan(true).await?;
            let mut due = self.due.lock();
            for (u, h, _) in heads {
                if let Some(t) = h.and_then(|h| h.due(max_age)) {
                    due.at.insert(u, t);
                }
            }
            due.scan = false;
        }
        let due = self.due.lock();
        let mut users: Vec<String> = due
            .at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(u, _)| u.clone())
            .collect();
        users.sort_unstable();
        users.truncate(SWEEP_BATCH);
        Ok(users)
    }

    pub(super) fn set_due(&self, user: &str, head: &Head) {
        let max_age = self.limits.max_age.as_millis() as i64;
        let mut due = self.due.lock();
        match head.due(max_age) {
            Some(t) => due.at.insert(user.to_string(), t),
            None => due.at.remove(user),
        };
    }
}
