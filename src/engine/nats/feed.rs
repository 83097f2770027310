//! The feed: every publication after the hub's position exactly once and in seq order, plus what the
//! core subjects carry (publications kept out of history, joins and leaves, control messages).
//!
//! Publications come from an ephemeral pull consumer on the log stream, started at the next expected seq.
//! Each message carries its stream seq and its consumer seq, which gives two checks:
//! - a consumer seq that skips means a message was delivered but never arrived (the connection dropped
//!   mid-batch): the consumer is recreated from the next expected seq, which fills the gap (a *gap*);
//! - a stream seq beyond the next expected one means messages were removed before this node delivered
//!   them (every message of the stream is a publication, so there is no other reason): subscribers may
//!   have missed them, so the hub is told ([`FeedEvent::Lost`]) and disconnects them to resume from the
//!   log (a *loss*).
//!
//! After a reconnection the consumer is recreated from the next expected seq; if the stream was
//! recreated meanwhile (another creation time) the history is another one: the epoch changes and the
//! hub is told it lost publications.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{codec, storage, within, Shared};
use crate::engine::{Feed, FeedEvent};
use crate::log::LogError;

/// Events waiting for the hub before the feed waits for it.
const FEED_CAPACITY: usize = 4096;
/// Messages asked for in one pull.
const PULL_BATCH: usize = 512;
/// How long one pull waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server proves an idle pull is alive this often; two missed and the stream reports an error. (Not
/// with async-nats 0.46's one-shot `Batch`, which answers a heartbeat with `Pending` and no wake-up and so
/// stalled the feed until its own timer: the feed uses the continuous `stream()`.)
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

pub(crate) fn start(shared: Arc<Shared>, after: u64) -> Feed {
    let (tx, rx) = mpsc::channel(FEED_CAPACITY);
    tokio::spawn(core_subjects(shared.clone(), tx.clone()));
    tokio::spawn(publications(shared, after, tx));
    rx
}

/// Why a consumer is recreated.
enum Restart {
    /// The connection came back, or the pull failed: resume from the next expected seq.
    Resume(String),
    /// The hub is gone: stop.
    Closed,
}

async fn publications(shared: Arc<Shared>, after: u64, tx: mpsc::Sender<FeedEvent>) {
    let mut next = after + 1;
    let mut attempt = 0usize;
    let mut connections = shared.connections.subscribe();
    loop {
        if shared.stop.is_cancelled() || tx.is_closed() {
            return;
        }
        let why = match follow(&shared, &mut next, &tx, &mut connections).await {
            Ok(Restart::Closed) => return,
            Ok(Restart::Resume(why)) => {
                attempt = 0;
                why
            }
            Err(e) => {
                attempt += 1;
                e.to_string()
            }
        };
        tracing::debug!(why, next, "nats feed: resuming");
        let delay = super::backoff(attempt);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Follows the stream from `next` until something requires a new consumer.
async fn follow(
    shared: &Shared,
    next: &mut u64,
    tx: &mpsc::Sender<FeedEvent>,
    connections: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<Restart, LogError> {
    shared.connected()?;
    connections.borrow_and_update();
    let info = within(
        shared.op_timeout,
        "stream info",
        super::ensure_stream(&shared.js, &shared.names, shared.stream_max_age),
    )
    .await?;
    let created = info.created.unix_timestamp_nanos();
    let recreated = {
        let mut known = shared.created.lock();
        let changed = *known != created;
        *known = created;
        changed
    } || info.state.last_sequence + 1 < *next;
    if recreated {
        let epoch = codec::epoch_of(created);
        tracing::warn!(
            epoch,
            "nats: the log stream was recreated; its history is lost"
        );
        *shared.epoch.write() = epoch;
        *next = info.state.first_sequence.max(1);
        lost(tx, "the log stream was recreated".into()).await?;
    }
    let stream = shared.stream_handle().await?;
    let consumer = within(
        shared.op_timeout,
        "feed consumer",
        stream.create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: *next,
            },
            filter_subject: shared.names.stream_subjects(),
            ack_policy: AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        }),
    )
    .await?;
    let name = consumer.cached_info().name.clone();
    let result = drain(shared, &consumer, next, tx, connections).await;
    tokio::spawn(async move {
        let _ = stream.delete_consumer(&name).await;
    });
    result
}

async fn drain(
    shared: &Shared,
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    next: &mut u64,
    tx: &mpsc::Sender<FeedEvent>,
    connections: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<Restart, LogError> {
    // The consumer seq of the last message taken.
    let mut delivered = 0u64;
    // One continuous stream of pulls: async-nats keeps the next pull requested before the current one
    // runs out and counts what each has left, so a busy feed never waits on a pull's expiry, and missed
    // heartbeats come out as errors (a dead connection) instead of stalls.
    let mut messages = within(
        shared.op_timeout,
        "pull",
        consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages(),
    )
    .await?;
    loop {
        let m = tokio::select! {
            m = messages.next() => m,
            changed = connections.changed() => {
                if changed.is_err() { return Ok(Restart::Closed); }
                return Ok(Restart::Resume("reconnected".into()));
            }
            _ = shared.stop.cancelled() => return Ok(Restart::Closed),
        };
        let Some(m) = m else {
            return Ok(Restart::Resume("the pull stream ended".into()));
        };
        let m = m.map_err(storage)?;
        let info = m.info().map_err(storage)?;
        let (seq, cseq) = (info.stream_sequence, info.consumer_sequence);
        if cseq != delivered + 1 {
            metrics::counter!("herald_engine_feed_gaps_total").increment(1);
            return Ok(Restart::Resume(format!(
                "consumer sequence {cseq} after {delivered}: refilling from {next}"
            )));
        }
        delivered = cseq;
        if seq < *next {
            continue; // already delivered (cannot happen with a fresh consumer; cheap to keep)
        }
        if seq > *next {
            lost(
                tx,
                format!(
                    "publications {next}..{} were removed before this node delivered them",
                    seq - 1
                ),
            )
            .await?;
        }
        *next = seq + 1;
        let record = match codec::decode(seq, &m.payload, &shared.epoch()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "nats feed: skipping a message that is not a record");
                continue;
            }
        };
        if tx.send(FeedEvent::Publication(record)).await.is_err() {
            return Ok(Restart::Closed);
        }
    }
}

async fn lost(tx: &mpsc::Sender<FeedEvent>, why: String) -> Result<(), LogError> {
    tracing::warn!(why, "nats feed: publications lost for this node");
    metrics::counter!("herald_engine_feed_lost_total").increment(1);
    tx.send(FeedEvent::Lost(why))
        .await
        .map_err(|_| LogError::Closed)
}

/// Publications kept out of history, joins and leaves, control messages: core subjects, delivered as
/// they come (the client subscribes again by itself after a reconnection; what was sent meanwhile is not
/// kept anywhere, by design).
async fn core_subjects(shared: Arc<Shared>, tx: mpsc::Sender<FeedEvent>) {
    let names = &shared.names;
    let subscribe = async {
        Ok::<_, async_nats::SubscribeError>((
            shared.client.subscribe(names.broadcast.clone()).await?,
            shared.client.subscribe(names.announce.clone()).await?,
            shared.client.subscribe(names.control.clone()).await?,
        ))
    };
    let (mut broadcast, mut announce, mut control) = match subscribe.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "nats: cannot subscribe to the core subjects");
            return;
        }
    };
    loop {
        let event = tokio::select! {
            Some(m) = broadcast.next() => match codec::decode(0, &m.payload, "") {
                Ok(mut r) => {
                    r.seq = 0;
                    r.id.clear();
                    Some(FeedEvent::Publication(r))
                }
                Err(e) => { tracing::warn!(error = %e, "nats: bad broadcast"); None }
            },
            Some(m) = announce.next() => match serde_json::from_slice::<codec::Announce>(&m.payload) {
                Ok(a) => Some(FeedEvent::Presence { channel: a.channel, info: a.info, joined: a.joined }),
                Err(e) => { tracing::warn!(error = %e, "nats: bad join/leave"); None }
            },
            Some(m) = control.next() => match serde_json::from_slice::<codec::Control>(&m.payload) {
                Ok(c) => c.payload().map(|payload| FeedEvent::Control { user: c.user, client: c.client, payload }),
                Err(e) => { tracing::warn!(error = %e, "nats: bad control message"); None }
            },
            _ = shared.stop.cancelled() => return,
            else => return,
        };
        if let Some(event) = event {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}
