//! The feed: every node's view of what the whole cluster publishes, exactly once and in seq order.
//!
//! Redis pub/sub delivers at most once: a message published while a node's subscription is down, or
//! dropped because the node fell too far behind (Redis closes such a subscriber), is gone. So pub/sub is
//! only the fast path; the log is the truth. The feed remembers the last seq it delivered (`pos`) and:
//! - delivers a publication with seq `pos + 1` as it comes, skips one at or below `pos` (already filled);
//! - on a publication further ahead, first reads the gap from the log (every script with a smaller seq has
//!   finished by then: scripts run one at a time and take their seq as they run);
//! - polls the counter every [`POLL`] and fills from the log what pub/sub has not brought by the next
//!   poll (a quiet channel after a lost message);
//! - after a reconnection, subscribes first, then fills everything after `pos`, so nothing falls between.
//!
//! A seq missing from the log is either a hole (a script failed after taking its seq: nothing to deliver)
//! or a record removed by retention before this node read it, which this node's subscribers have missed.
//! Removals raise `pruned_max`, so a missing seq at or below it may have been removed: the feed then sends
//! [`FeedEvent::Lost`] (subscribers reconnect and resume from the log, where retention decides what they
//! get) before delivering anything after it. A changed epoch (Redis lost its data) is a loss too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::codec::{self, Message};
use super::{Shared, FEED_DOWN, FEED_UP};
use crate::engine::{Feed, FeedEvent};
use crate::log::{LogError, Record};

/// Events queued for the hub before the feed waits for it (Redis then buffers, and drops this node's
/// subscription if it falls too far behind, which the feed recovers from the log).
const QUEUE: usize = 4096;
/// Records read from the log per round trip when filling a gap.
const FILL_PAGE: usize = 1000;
/// How often the counter is checked for publications pub/sub did not bring.
const POLL: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why a feed session ended.
enum End {
    /// The hub is gone or the engine is closing: stop for good.
    Stop,
    /// Redis is unreachable or the subscription dropped: reconnect.
    Redis(String),
}

impl From<LogError> for End {
    fn from(e: LogError) -> End {
        End::Redis(e.to_string())
    }
}

pub(super) fn start(shared: Arc<Shared>, after: u64) -> Feed {
    let (tx, rx) = mpsc::channel(QUEUE);
    let epoch = shared.epoch.read().clone();
    shared.seen.fetch_max(after, Ordering::AcqRel);
    shared.feed_state.store(FEED_DOWN, Ordering::Release);
    let task = FeedTask {
        shared,
        tx,
        pos: after,
        epoch,
    };
    tokio::spawn(task.run());
    rx
}

struct FeedTask {
    shared: Arc<Shared>,
    tx: mpsc::Sender<FeedEvent>,
    /// The last seq delivered to the hub.
    pos: u64,
    /// The epoch the delivered positions belong to.
    epoch: String,
}

impl FeedTask {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut was_up = true;
        loop {
            let (end, connected) = self.session().await;
            self.shared.feed_state.store(FEED_DOWN, Ordering::Release);
            metrics::gauge!("herald_engine_connected").set(0.0);
            let why = match end {
                End::Stop => return,
                End::Redis(why) => why,
            };
            if connected {
                backoff = MIN_BACKOFF;
            }
            if connected || was_up {
                tracing::warn!(url = %self.shared.url, error = %why, "lost the Redis feed; reconnecting");
            }
            was_up = connected;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shared.shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            metrics::counter!("herald_engine_reconnects_total").increment(1);
        }
    }

    /// One subscription, from connecting to losing it; says whether it got as far as live delivery.
    async fn session(&mut self) -> (End, bool) {
        let shared = self.shared.clone();
        let connect = async {
            let mut pubsub =
                tokio::time::timeout(shared.connect_timeout, shared.client.get_async_pubsub())
                    .await
                    .map_err(|_| End::Redis("connecting timed out".into()))?
                    .map_err(|e| End::Redis(e.to_string()))?;
            tokio::time::timeout(shared.op_timeout, pubsub.subscribe(shared.key("feed")))
                .await
                .map_err(|_| End::Redis("subscribing timed out".into()))?
                .map_err(|e| End::Redis(e.to_string()))?;
            Ok::<_, End>(pubsub.into_on_message())
        };
        let mut messages = tokio::select! {
            r = connect => match r {
                Ok(m) => m,
                Err(e) => return (e, false),
            },
            _ = shared.shutdown.cancelled() => return (End::Stop, false),
        };
        // Subscribed: whatever is published from now on arrives; fill what came before.
        if let Err(e) = self.catch_up().await {
            return (e, false);
        }
        shared.feed_state.store(FEED_UP, Ordering::Release);
        metrics::gauge!("herald_engine_connected").set(1.0);
        tracing::info!(url = %shared.url, epoch = %self.epoch, after = self.pos, "Redis feed connected");
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The counter seen at the previous poll: what pub/sub should have brought by now.
        let mut due: Option<u64> = None;
        let mut active = false;
        loop {
            let step = tokio::select! {
                _ = shared.shutdown.cancelled() => Err(End::Stop),
                m = messages.next() => match m {
                    Some(m) => {
                        active = true;
                        self.on_message(m.get_payload_bytes()).await
                    }
                    None => Err(End::Redis("the subscription connection closed".into())),
                },
                _ = poll.tick() => self.poll(&mut due, std::mem::take(&mut active)).await,
            };
            if let Err(e) = step {
                return (e, true);
            }
        }
    }

    /// Checks the connection and the epoch, and fills what a quiet pub/sub has not brought since the last
    /// poll. While messages flow, a lost one shows as a jump in seq and is filled then; filling here too
    /// would only race them.
    async fn poll(&mut self, due: &mut Option<u64>, active: bool) -> Result<(), End> {
        let (epoch, counter) = self.shared.counter().await?;
        if epoch.as_deref() != Some(self.epoch.as_str()) {
            *due = None;
            return self.catch_up().await;
        }
        if let Some(target) = due.take() {
            if target > self.pos && !active {
                self.fill(target).await?;
            }
        }
        *due = (counter > self.pos).then_some(counter);
        Ok(())
    }

    /// Checks the epoch (making a new one if Redis lost its data), then fills up to the counter.
    async fn catch_up(&mut self) -> Result<(), End> {
        self.shared.load_scripts().await?;
        let floor = self.pos.max(self.shared.seen.load(Ordering::Acquire));
        let (epoch, counter) = self.shared.ensure_epoch(floor).await?;
        if epoch != self.epoch {
            let why = format!(
                "the history epoch changed from {} to {epoch}: Redis lost its data",
                self.epoch
            );
            self.epoch = epoch;
            self.lost(why).await?;
        }
        if counter > self.pos {
            self.fill(counter).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, payload: &[u8]) -> Result<(), End> {
        let message = match codec::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable feed message");
                return Ok(());
            }
        };
        match message {
            Message::Publication { record, .. } if record.seq == 0 => {
                self.send(FeedEvent::Publication(record)).await
            }
            Message::Publication { epoch, record } => {
                if epoch != self.epoch {
                    self.catch_up().await?;
                }
                if record.seq <= self.pos {
                    return Ok(());
                }
                if record.seq > self.pos + 1 {
                    self.fill(record.seq - 1).await?;
                }
                self.deliver(record).await
            }
            Message::Presence {
                channel,
                info,
                joined,
            } => {
                self.send(FeedEvent::Presence {
                    channel,
                    info,
                    joined,
                })
                .await
            }
            Message::Control {
                user,
                client,
                payload,
            } => {
                self.send(FeedEvent::Control {
                    user,
                    client,
                    payload,
                })
                .await
            }
        }
    }

    /// Delivers every stored record with `pos < seq <= upto` from the log, reporting a loss first when a
    /// missing seq may have been removed by retention.
    async fn fill(&mut self, upto: u64) -> Result<(), End> {
        let mut delivered = 0u64;
        let mut lost = false;
        let mut guard = 0usize;
        while self.pos < upto {
            guard += 1;
            if guard > 1_000_000 {
                return Err(End::Redis("a gap too long to fill".into()));
            }
            let (records, pruned_max) = self.shared.read_log(self.pos, upto, FILL_PAGE).await?;
            let page_end = match records.last() {
                Some(r) if records.len() >= FILL_PAGE => r.seq,
                _ => upto,
            };
            let mut expect = self.pos + 1;
            for r in records {
                if r.seq > expect && expect <= pruned_max && !lost {
                    lost = true;
                    self.lost(format!(
                        "publications {expect}..{} were removed before this node read them",
                        r.seq - 1
                    ))
                    .await?;
                }
                expect = r.seq + 1;
                delivered += 1;
                self.deliver(r).await?;
            }
            if page_end >= expect && expect <= pruned_max && !lost {
                lost = true;
                self.lost(format!(
                    "publications {expect}..{page_end} were removed before this node read them"
                ))
                .await?;
            }
            self.pos = self.pos.max(page_end);
            self.shared.seen.fetch_max(self.pos, Ordering::AcqRel);
        }
        if delivered > 0 {
            metrics::counter!("herald_engine_feed_gaps_total").increment(1);
            tracing::debug!(delivered, upto, "feed gap filled from the log");
        }
        Ok(())
    }

    async fn deliver(&mut self, r: Record) -> Result<(), End> {
        self.pos = r.seq;
        self.shared.seen.fetch_max(r.seq, Ordering::AcqRel);
        self.send(FeedEvent::Publication(r)).await
    }

    async fn lost(&mut self, why: String) -> Result<(), End> {
        metrics::counter!("herald_engine_feed_lost_total").increment(1);
        self.send(FeedEvent::Lost(why)).await
    }

    async fn send(&self, ev: FeedEvent) -> Result<(), End> {
        self.tx.send(ev).await.map_err(|_| End::Stop)
    }
}
