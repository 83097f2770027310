//! Presence shared by every node: the KV bucket `<prefix>-presence`, key `<channel>.<client>` (tokens),
//! value the client's `ClientInfo`, every entry expiring after `engine.presence_ttl` unless its node
//! writes it again. Each node keeps its own entries in memory and rewrites them a few times per TTL (and
//! all at once after a reconnection, in case NATS lost them), so a node that dies, even by `kill -9`,
//! takes its clients out of presence within one TTL.
//!
//! `add` and `remove` never wait: they queue the write for one background task, which sends what is
//! queued pipelined, in order. Joins and leaves for the feeds go through the same queue.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, Names};
use super::{storage, within, Shared};
use crate::engine::BoxFuture;
use crate::hub::ClientInfo;
use crate::log::LogError;
use crate::presence::{LocalPresence, PresenceStore};

/// Writes queued before new ones are dropped (and counted); the periodic rewrite repairs lost puts.
const QUEUE: usize = 65_536;
/// Writes sent in one pipelined round.
const ROUND: usize = 256;
/// Most clients listed for one channel.
const MAX_LIST: u64 = 100_000;

enum Op {
    Put(String, Bytes),
    Delete(String),
    Announce(Bytes),
    Flush(oneshot::Sender<()>),
}

pub struct NatsPresence {
    shared: Arc<Shared>,
    local: Arc<LocalPresence>,
    ops: mpsc::Sender<Op>,
    bucket: String,
    /// This process, in every entry it writes: `list` takes this node's clients from memory (exact, even
    /// before a write reached NATS) and only the other nodes' from the bucket.
    node: Arc<str>,
}

/// A presence entry as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    node: String,
    info: ClientInfo,
}

impl NatsPresence {
    pub(crate) fn start(shared: Arc<Shared>, ttl: Duration) -> Arc<NatsPresence> {
        let (ops, rx) = mpsc::channel(QUEUE);
        let local = Arc::new(LocalPresence::default());
        let bucket = shared.names.presence.clone();
        let node: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        tokio::spawn(writer(shared.clone(), local.clone(), rx, ttl, node.clone()));
        Arc::new(NatsPresence {
            shared,
            local,
            ops,
            bucket,
            node,
        })
    }

    fn queue(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            metrics::counter!("herald_engine_presence_dropped_total").increment(1);
        }
    }

    pub(crate) fn announce(&self, channel: &str, info: &ClientInfo, joined: bool) {
        let msg = codec::Announce {
            channel: channel.to_string(),
            info: info.clone(),
            joined,
        };
        match serde_json::to_vec(&msg) {
            Ok(body) => self.queue(Op::Announce(body.into())),
            Err(e) => tracing::warn!(error = %e, "cannot encode a join/leave"),
        }
    }

    /// Waits (bounded) until what is queued now has been sent.
    pub(crate) async fn flush(&self, limit: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}

fn entry(node: &str, info: &ClientInfo) -> Option<Bytes> {
    serde_json::to_vec(&Stored {
        node: node.to_string(),
        info: info.clone(),
    })
    .ok()
    .map(Bytes::from)
}

impl PresenceStore for NatsPresence {
    fn add(&self, channel: &str, info: Arc<ClientInfo>) {
        if let Some(v) = entry(&self.node, &info) {
            self.queue(Op::Put(Names::presence_key(channel, &info.client), v));
        }
        self.local.add(channel, info);
    }

    fn remove(&self, channel: &str, client: &str) -> Option<Arc<ClientInfo>> {
        let info = self.local.remove(channel, client)?;
        self.queue(Op::Delete(Names::presence_key(channel, client)));
        Some(info)
    }

    fn list(&self, channel: &str) -> BoxFuture<'_, Result<Vec<ClientInfo>, LogError>> {
        let filter = Names::kv_subject(&self.bucket, &format!("{}.*", codec::token(channel)));
        let channel = channel.to_string();
        Box::pin(async move {
            let shared = &self.shared;
            let _permit = shared.reads.acquire().await.map_err(|_| LogError::Closed)?;
            let stream = within(
                shared.op_timeout,
                "presence bucket",
                shared.js.get_stream_no_info(format!("KV_{}", self.bucket)),
            )
            .await?;
            let consumer = within(
                shared.op_timeout,
                "presence consumer",
                stream.create_consumer(pull::Config {
                    deliver_policy: DeliverPolicy::LastPerSubject,
                    filter_subject: filter,
                    ack_policy: AckPolicy::None,
                    memory_storage: true,
                    num_replicas: 1,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                }),
            )
            .await?;
            let name = consumer.cached_info().name.clone();
            let mut pending = consumer.cached_info().num_pending.min(MAX_LIST);
            let mut out = self.local.snapshot(&channel);
            let read = async {
                while pending > 0 {
                    let mut batch = within(
                        shared.op_timeout,
                        "presence fetch",
                        consumer
                            .fetch()
                            .max_messages(pending.min(256) as usize)
                            .messages(),
                    )
                    .await?;
                    let mut got = 0u64;
                    while let Some(m) = within(shared.op_timeout, "presence fetch", async {
                        Ok::<_, LogError>(batch.next().await)
                    })
                    .await?
                    {
                        let m = m.map_err(storage)?;
                        got += 1;
                        let deleted = m
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("KV-Operation"))
                            .is_some_and(|op| op.as_str() != "PUT");
                        if !deleted {
                            match serde_json::from_slice::<Stored>(&m.payload) {
                                Ok(s) if *s.node != *self.node => out.push(s.info),
                                _ => {}
                            }
                        }
                    }
                    if got == 0 {
                        break;
                    }
                    pending = pending.saturating_sub(got);
                }
                Ok::<_, LogError>(())
            };
            let result = read.await;
            tokio::spawn(async move {
                let _ = stream.delete_consumer(&name).await;
            });
            result?;
            out.sort_by(|a, b| a.client.cmp(&b.client));
            out.dedup_by(|a, b| a.client == b.client);
            Ok(out)
        })
    }
}

/// Sends queued writes in order, pipelined a round at a time, and rewrites this node's entries every
/// third of the TTL and after every reconnection.
async fn writer(
    shared: Arc<Shared>,
    local: Arc<LocalPresence>,
    mut rx: mpsc::Receiver<Op>,
    ttl: Duration,
    node: Arc<str>,
) {
    let bucket = shared.names.presence.clone();
    let mut refresh = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connections = shared.connections.subscribe();
    let mut round: Vec<Op> = Vec::with_capacity(ROUND);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut round, ROUND) => {
                if n == 0 { return; }
            }
            _ = refresh.tick() => {
                round.extend(snapshot(&local, &node));
            }
            changed = connections.changed() => {
                if changed.is_err() { return; }
                round.extend(snapshot(&local, &node));
            }
            _ = shared.stop.cancelled() => return,
        }
        send(&shared, &bucket, std::mem::take(&mut round)).await;
    }
}

fn snapshot(local: &LocalPresence, node: &str) -> Vec<Op> {
    local
        .all()
        .into_iter()
        .filter_map(|(channel, info)| {
            entry(node, &info).map(|v| Op::Put(Names::presence_key(&channel, &info.client), v))
        })
        .collect()
}

async fn send(shared: &Shared, bucket: &str, ops: Vec<Op>) {
    if shared.connected().is_err() {
        // Nothing reaches NATS now; the rewrite after the reconnection restores this node's entries
        // (leaves are sent again as deletes only while queued: an entry whose delete is lost expires).
        for op in ops {
            if let Op::Flush(done) = op {
                let _ = done.send(());
            }
        }
        return;
    }
    let mut acks = Vec::new();
    let mut flushes = Vec::new();
    for op in ops {
        let sent = match op {
            Op::Put(key, value) => shared
                .js
                .publish(Names::kv_subject(bucket, &key), value)
                .await
                .map(Some),
            Op::Delete(key) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("KV-Operation", "DEL");
                shared
                    .js
                    .publish_with_headers(Names::kv_subject(bucket, &key), headers, Bytes::new())
                    .await
                    .map(Some)
            }
            Op::Announce(body) => {
                let _ = shared
                    .client
                    .publish(shared.names.announce.clone(), body)
                    .await;
                Ok(None)
            }
            Op::Flush(done) => {
                flushes.push(done);
                Ok(None)
            }
        };
        match sent {
            Ok(Some(ack)) => acks.push(ack),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "presence write not sent"),
        }
    }
    for ack in acks {
        if let Err(e) = within(shared.op_timeout, "presence write", ack.into_future()).await {
            tracing::debug!(error = %e, "presence write not acknowledged");
        }
    }
    for done in flushes {
        let _ = done.send(());
    }
}
