//! Presence shared by every node, kept in Redis with an expiry.
//!
//! Each node keeps its own entries in memory (a [`LocalPresence`]) and is the only one that writes them:
//! `add` and `remove` change the memory copy at once and queue the Redis write for one background task, so
//! connection code never waits on Redis. The same task refreshes all of this node's entries every third of
//! the TTL; a node that dies stops refreshing, and its clients drop out of `list` once the TTL has passed.
//! Expiry is measured on Redis's clock, so the nodes' clocks do not matter.
//!
//! Join and leave messages go through the same task, after the presence write they belong to: a node that
//! hears a join finds the client in `list`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{codec, Shared};
use crate::engine::BoxFuture;
use crate::hub::ClientInfo;
use crate::log::LogError;
use crate::presence::{LocalPresence, PresenceStore};

/// Writes queued before new ones are dropped (and counted): a Redis that stalls must not grow memory.
const QUEUE: usize = 16 * 1024;
/// Writes sent in one round trip.
const BATCH: usize = 256;

pub(super) enum Op {
    Add(String, Arc<ClientInfo>),
    Remove(String, String),
    /// A feed message (join or leave) to publish.
    Publish(Vec<u8>),
    /// Remove this node's entries from Redis and stop.
    Close(oneshot::Sender<()>),
}

pub struct RedisPresence {
    shared: Arc<Shared>,
    local: Arc<LocalPresence>,
    ops: mpsc::Sender<Op>,
}

impl RedisPresence {
    pub(super) fn start(shared: Arc<Shared>, ttl: Duration) -> Arc<RedisPresence> {
        let (ops, rx) = mpsc::channel(QUEUE);
        let local = Arc::new(LocalPresence::default());
        tokio::spawn(writer(shared.clone(), local.clone(), rx, ttl));
        Arc::new(RedisPresence { shared, local, ops })
    }

    /// Queues a write; never waits. A full queue drops it: presence repairs itself at the next refresh,
    /// a join or leave message is lost (they are best effort, as in Centrifugo).
    pub(super) fn queue(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            metrics::counter!("herald_engine_presence_dropped_total").increment(1);
        }
    }

    /// Removes this node's entries from Redis (bounded by `wait`) and stops the writer.
    pub(super) async fn close(&self, wait: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Close(tx)).await.is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }
}

impl PresenceStore for RedisPresence {
    fn add(&self, channel: &str, info: Arc<ClientInfo>) {
        self.local.add(channel, info.clone());
        self.queue(Op::Add(channel.to_string(), info));
    }

    fn remove(&self, channel: &str, client: &str) -> Option<Arc<ClientInfo>> {
        let info = self.local.remove(channel, client)?;
        self.queue(Op::Remove(channel.to_string(), client.to_string()));
        Some(info)
    }

    fn list(&self, channel: &str) -> BoxFuture<'_, Result<Vec<ClientInfo>, LogError>> {
        let channel = channel.to_string();
        Box::pin(async move {
            let shared = &self.shared;
            let mut inv = shared.scripts.presence_list.prepare_invoke();
            inv.arg(&shared.prefix).arg(&channel);
            let mut conn = shared.conn.clone();
            let v: ::redis::Value = shared.call(inv.invoke_async(&mut conn)).await?;
            let mut out: Vec<ClientInfo> = codec::array(v)?
                .into_iter()
                .filter_map(codec::text)
                .filter_map(|j| serde_json::from_str(&j).ok())
                .collect();
            out.sort_by(|a, b| a.client.cmp(&b.client));
            Ok(out)
        })
    }
}

/// The background writer: queued writes in order, in batches, and the periodic refresh.
async fn writer(
    shared: Arc<Shared>,
    local: Arc<LocalPresence>,
    mut rx: mpsc::Receiver<Op>,
    ttl: Duration,
) {
    let ttl = ttl.max(Duration::from_millis(300));
    let mut refresh = tokio::time::interval(ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            op = rx.recv() => match op {
                Some(op) => batch.push(op),
                None => return,
            },
            _ = refresh.tick() => {
                let all = local.all().into_iter().map(|(c, i)| Op::Add(c, i)).collect();
                for chunk in chunks(all) {
                    note(&mut failing, write(&shared, chunk, ttl).await);
                }
                continue;
            }
            _ = shared.shutdown.cancelled() => return,
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let close = batch.iter().position(|op| matches!(op, Op::Close(_)));
        if let Some(at) = close {
            let rest = batch.split_off(at);
            note(&mut failing, write(&shared, batch, ttl).await);
            let gone = local
                .all()
                .into_iter()
                .map(|(c, i)| Op::Remove(c, i.client.clone()))
                .collect();
            for chunk in chunks(gone) {
                let _ = write(&shared, chunk, ttl).await;
            }
            for op in rest {
                if let Op::Close(done) = op {
                    let _ = done.send(());
                }
            }
            return;
        }
        note(&mut failing, write(&shared, batch, ttl).await);
    }
}

/// `ops` in batches of at most [`BATCH`], in order.
fn chunks(mut ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    while !ops.is_empty() {
        let tail = ops.split_off(BATCH.min(ops.len()));
        out.push(std::mem::replace(&mut ops, tail));
    }
    out
}

/// Logs the first failure of a run of them, and the recovery.
fn note(failing: &mut bool, result: Result<(), LogError>) {
    match result {
        Ok(()) if *failing => {
            *failing = false;
            tracing::info!("presence writes to Redis work again");
        }
        Ok(()) => {}
        Err(e) if !*failing => {
            *failing = true;
            tracing::warn!(error = %e, "presence write to Redis failed; entries are written again at the next refresh");
        }
        Err(_) => {}
    }
}

/// One round trip for a batch of writes, in order.
async fn write(shared: &Shared, ops: Vec<Op>, ttl: Duration) -> Result<(), LogError> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut pipe = ::redis::pipe();
    let ttl_ms = ttl.as_millis() as u64;
    let mut adds: Vec<Vec<u8>> = Vec::new();
    let flush_adds = |pipe: &mut ::redis::Pipeline, adds: &mut Vec<Vec<u8>>| {
        if adds.is_empty() {
            return;
        }
        pipe.cmd("EVALSHA")
            .arg(shared.scripts.presence_add.get_hash())
            .arg(0)
            .arg(&shared.prefix)
            .arg(ttl_ms)
            .arg(std::mem::take(adds))
            .ignore();
    };
    for op in ops {
        match op {
            Op::Add(channel, info) => {
                let Ok(json) = serde_json::to_vec(&*info) else {
                    continue;
                };
                adds.push(channel.into_bytes());
                adds.push(info.client.clone().into_bytes());
                adds.push(json);
            }
            Op::Remove(channel, client) => {
                flush_adds(&mut pipe, &mut adds);
                pipe.cmd("ZREM")
                    .arg(format!("{}pz:{channel}", shared.prefix))
                    .arg(&client)
                    .ignore();
                pipe.cmd("HDEL")
                    .arg(format!("{}ph:{channel}", shared.prefix))
                    .arg(&client)
                    .ignore();
            }
            Op::Publish(message) => {
                flush_adds(&mut pipe, &mut adds);
                pipe.cmd("PUBLISH")
                    .arg(shared.key("feed"))
                    .arg(message)
                    .ignore();
            }
            Op::Close(_) => {}
        }
    }
    flush_adds(&mut pipe, &mut adds);
    if pipe.is_empty() {
        return Ok(());
    }
    // The scripts are loaded whenever the feed (re)connects, so NOSCRIPT here is a rare race; retrying
    // the whole batch then may repeat a join or leave message, never lose a presence entry.
    shared.pipeline(&pipe, true).await.map(|_| ())
}
