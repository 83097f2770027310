//! The engine: where publications are stored and how they reach every node. The hub talks only to this
//! seam, so a single node on SQLite and a cluster on Redis or NATS are the same hub.
//!
//! The seam is shaped for a remote engine: every call is async, `append` returns the positions the engine
//! assigned (the engine, not the node, numbers publications, so a position means the same on every node),
//! reads are ranges, and a cluster engine hands each node a [`Feed`] of everything committed anywhere, in
//! position order. The local engine has no feed: its appends are dispatched by the hub right after they
//! commit, which is what made a single node fast and stays so.
//!
//! Positions are one global sequence (`seq`), strictly increasing and never reused; with the engine's
//! `epoch` they are the publication's identity on every transport (SSE id `#<epoch>-<seq>`, WebSocket
//! offset and epoch).

use std::future::Future;
use std::pin::Pin;

use crate::hub::ClientInfo;
use crate::log::{LogError, Record};

pub mod local;
pub mod nats;
pub mod redis;

pub use local::LocalEngine;
pub use nats::NatsEngine;

/// A boxed future: trait methods return these so the trait stays object-safe (`Arc<dyn Engine>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Engine: Send + Sync + 'static {
    /// Appends the batch in order, assigning each record its `seq` (and a generated id where it has none);
    /// returns them. `Ok` means acknowledged, to the degree this engine promises (docs/USAGE.md says what
    /// that is per engine).
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// The most `data` one record may carry on this engine, when the engine has a limit of its own (NATS:
    /// the server's `max_payload` less room for the record's envelope); `None`: no limit below Herald's own.
    /// The hub refuses a larger publication before it joins a batch, reserved channels (documents)
    /// included, so a batch shared by several publishers never fails for one of them.
    fn max_record_data(&self) -> Option<usize> {
        None
    }

    /// Sends a publication kept out of history (`seq == 0`) to every node's feed. Only called on a cluster
    /// engine; a local engine's hub dispatches it itself.
    fn broadcast(&self, record: Record) -> BoxFuture<'_, Result<(), LogError>> {
        let _ = record;
        Box::pin(async { Ok(()) })
    }

    /// A cluster-wide presence store, if the engine keeps one; `None`: the hub keeps presence in memory.
    fn presence(&self) -> Option<std::sync::Arc<dyn crate::presence::PresenceStore>> {
        None
    }

    /// Sends a join or leave to every node's feed (cluster engines; never waits).
    fn announce(&self, channel: &str, info: &ClientInfo, joined: bool) {
        let _ = (channel, info, joined);
    }

    /// Sends a control message for the connections of `user` (or one `client`) to every node's feed.
    fn control(
        &self,
        user: String,
        client: Option<String>,
        payload: bytes::Bytes,
    ) -> BoxFuture<'_, Result<(), LogError>> {
        let _ = (user, client, payload);
        Box::pin(async { Ok(()) })
    }

    /// The feed of what every node committed, in seq order, for a cluster engine; `None` for an engine
    /// whose appends stay on this node (the hub dispatches them itself). Taken once, by the hub, with the
    /// seq it has seen up to (`last()` at start): the feed delivers every publication after it exactly once
    /// and in order, filling any gap from the log; when it cannot, it sends [`FeedEvent::Lost`].
    fn feed(&self, after: u64) -> Option<Feed> {
        let _ = after;
        None
    }

    /// Records with `after < seq <= upto`, ascending, at most `limit`; only those with a topic in `topics`
    /// when given (the filter runs in the store, so a replay of one quiet topic does not read the others).
    fn read_range(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        topics: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// Records of one channel with `after < seq <= upto`, ascending, at most `limit`.
    fn read_channel(
        &self,
        channel: String,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// Records of one channel with `seq < before`, newest first, at most `limit`.
    fn read_channel_back(
        &self,
        channel: String,
        before: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// The seq of the newest record with event id `id`, if retained.
    fn find_id(&self, id: String) -> BoxFuture<'_, Result<Option<u64>, LogError>>;

    /// The newest record, if any.
    fn last(&self) -> BoxFuture<'_, Result<Option<Record>, LogError>>;

    /// A channel's stream position at or below `upto` (removed history still counts).
    fn channel_top(
        &self,
        channel: String,
        upto: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, LogError>>;

    /// The highest seq of the channel that retention or `remove_channel` deleted, 0 if none.
    fn channel_pruned_upto(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>>;

    /// Deletes a channel's history, keeping its position.
    fn remove_channel(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>>;

    /// Deletes a channel's records with `seq <= upto`, keeping its position (a compacted document drops
    /// the updates its snapshot holds). An engine that cannot trims nothing and returns 0: callers must
    /// stay correct with the records still there.
    fn trim_channel(&self, channel: String, upto: u64) -> BoxFuture<'_, Result<u64, LogError>> {
        let _ = (channel, upto);
        Box::pin(async { Ok(0) })
    }

    /// Channels that have records and whose names start with `prefix`, sorted, after `after`, at most
    /// `limit`. An engine that cannot list says so with an error.
    fn channels(
        &self,
        prefix: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<String>, LogError>> {
        let _ = (prefix, after, limit);
        Box::pin(async { Err(LogError::Storage("this engine cannot list channels".into())) })
    }

    /// This history's incarnation: it changes when history is lost.
    fn epoch(&self) -> String;

    /// Whether the engine accepts writes now (for `/readyz`): `Err` says why not.
    fn health(&self) -> BoxFuture<'_, Result<(), LogError>>;

    /// Makes everything appended durable and releases resources; called once at shutdown.
    fn close(&self) -> BoxFuture<'_, Result<(), LogError>>;
}

/// What a cluster engine delivers to each node.
#[derive(Debug)]
pub enum FeedEvent {
    /// A committed publication (from any node), in seq order; `seq == 0` for one kept out of history.
    Publication(Record),
    /// A client joined or left a channel on some node.
    Presence {
        channel: String,
        info: ClientInfo,
        joined: bool,
    },
    /// A control message for live connections (server API: subscribe, unsubscribe, disconnect, refresh).
    Control {
        user: String,
        client: Option<String>,
        payload: bytes::Bytes,
    },
    /// The engine lost publications for this node (its connection dropped): subscribers must reconnect
    /// and resume from the log.
    Lost(String),
}

pub type Feed = tokio::sync::mpsc::Receiver<FeedEvent>;
