//! Loaded documents: one yrs `Doc` (inside an `Awareness`) per document in use on this node, rebuilt from
//! the engine and kept current by the hub.
//!
//! The engine is the truth, memory a cache. A document's updates are publications on its reserved
//! channel `$yjs:<name>`: a client's update is published there (stored, then fanned out), and every node
//! that holds the document applies it when the hub delivers it, the node it came from included. So an
//! update reaches other clients only once the engine acknowledged it, and clients on other nodes get it
//! through the engine's feed exactly as local ones do. Loading subscribes first and then reads what was
//! stored up to the registration boundary, so no update falls between the read and the live feed. Order
//! does not matter to Yjs (updates commute, and one applied twice is a no-op), which is what lets a
//! snapshot be stored after the updates it merges and loading simply apply everything on the channel.
//!
//! Awareness (cursors, presence) travels the same way with history off: it is state that expires, not
//! something to replay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use yrs::block::ClientID;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Awareness, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Transact, Update};

use crate::config::YjsConfig;
use crate::frame::Publication;
use crate::hub::{Delivery, Hub, HubError, NewPublication, SubscribeSpec};
use crate::log::{LogError, Record};
use crate::queue;
use crate::topic::Selector;

/// The reserved channel that stores a document.
pub const CHANNEL_PREFIX: &str = "$yjs:";
/// The reserved channel that keeps a document's point-in-time snapshots. A channel of its own, on the
/// same log, rather than records on the document's channel: loading a document then never reads them,
/// compaction (which trims the document's channel) never removes them, and they are trimmed by their own
/// rules (count and age); being on the log, they are durable on every engine and shared by every node
/// of a cluster with nothing new to deploy, and their ids are the engine's positions (ordered by time).
pub const SNAPSHOTS_PREFIX: &str = "$yjs-snapshots:";
/// Longest document name.
pub const MAX_NAME_LEN: usize = 255;

const KIND_UPDATE: &str = "update";
const KIND_SNAPSHOT: &str = "snapshot";
const KIND_AWARENESS: &str = "awareness";
/// Records read per page when a document loads.
const LOAD_PAGE: usize = 500;
/// Frames queued for one connection before its backlog is merged (see [`Peer::offer`]).
const PEER_QUEUE: usize = 1024;
/// Bytes queued for one connection before its backlog is merged. A connection that fell behind costs
/// at most this, or twice its merged backlog (about the document's size), whichever is larger.
const PEER_QUEUE_BYTES: usize = 1 << 20;
/// Publications a document applies before it relays what they changed: under load, one frame per
/// client then carries many updates, and each client applies one merged update instead of many.
const RELAY_BATCH: usize = 1024;
/// Publications queued for a document before the hub cuts it off; it is then reloaded.
const DOC_QUEUE: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("too many documents are open on this server ({0}); try again later")]
    TooMany(usize),
    #[error("storage: {0}")]
    Hub(#[from] HubError),
    #[error("storage: {0}")]
    Log(#[from] LogError),
    #[error("the update is corrupt: {0}")]
    Corrupt(String),
    #[error("the update ({size} bytes) is larger than max_update_size ({max})")]
    UpdateTooLarge { size: usize, max: usize },
    #[error("the document would exceed yjs.max_document_size ({0} bytes)")]
    DocumentFull(usize),
    #[error("the document was unloaded; reconnect")]
    Unloaded,
    #[error("document {0} has no snapshot {1}")]
    SnapshotNotFound(String, u64),
    #[error("document {0} is not stored")]
    DocumentNotFound(String),
}

/// One point-in-time snapshot, as listed. The newest snapshot's record carries the list of the older
/// ones kept (its `index` tag), so listing and trimming read one record, not every snapshot's content.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// The engine's position of the snapshot's record: unique, and ordered as the snapshots were taken.
    pub id: u64,
    /// When it was taken (ms since the epoch).
    pub time_ms: i64,
    /// Bytes of its Yjs update.
    pub size: usize,
    /// Why it was taken: `interval`, `idle`, `api` or `before-restore`.
    pub reason: String,
}

impl SnapshotInfo {
    fn of(r: &Record) -> SnapshotInfo {
        SnapshotInfo {
            id: r.seq,
            time_ms: r.time_ms,
            size: r.data.len(),
            reason: r.tags.get("reason").cloned().unwrap_or_default(),
        }
    }

    /// The snapshots listed by the record `r` of the newest one: itself, then the older ones kept.
    fn listed_by(r: &Record) -> Vec<SnapshotInfo> {
        let mut v = vec![SnapshotInfo::of(r)];
        if let Some(index) = r.tags.get("index") {
            v.extend(serde_json::from_str::<Vec<SnapshotInfo>>(index).unwrap_or_default());
        }
        v
    }
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    /// The snapshot restored.
    pub snapshot: u64,
    /// The snapshot of the content just before the restore (so a restore can itself be undone).
    pub before: Option<u64>,
    /// Bytes of the edit that made the document equal to the snapshot.
    pub update_size: usize,
}

/// The reserved channel of document `name`.
pub fn channel_of(name: &str) -> String {
    format!("{CHANNEL_PREFIX}{name}")
}

/// The reserved channel of document `name`'s point-in-time snapshots.
pub fn snapshots_channel_of(name: &str) -> String {
    format!("{SNAPSHOTS_PREFIX}{name}")
}

/// Whether `name` is acceptable as a document name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control)
}

/// Decodes a Yjs v1 update, refusing bytes that are not one. yrs is not hardened against arbitrary input
/// everywhere, so a panic while decoding is a refusal too, not a dead task.
pub fn decode_update(bytes: &[u8]) -> Result<Update, DocError> {
    match std::panic::catch_unwind(|| Update::decode_v1(bytes)) {
        Ok(Ok(u)) => Ok(u),
        Ok(Err(e)) => Err(DocError::Corrupt(e.to_string())),
        Err(_) => Err(DocError::Corrupt("undecodable".into())),
    }
}

/// Applies `update` to the document, turning a yrs panic into an error.
/// The entries of `u` that would change `aw`: a newer clock, the removal of a present state, a new
/// client with a state. A y-websocket provider sends back every awareness change it receives (everyone's,
/// not only its own), so relaying entries that change nothing would bounce each change off every client
/// to every client: frames growing with the cube of a document's clients, and full queues closing them.
fn news(aw: &Awareness, u: &AwarenessUpdate) -> AwarenessUpdate {
    let clients = u
        .clients
        .iter()
        .filter(|&(&client, e)| {
            let removal = e.json.as_ref() == "null";
            match aw.meta(client) {
                None => !removal,
                Some((clock, _)) => {
                    e.clock > clock
                        || (e.clock == clock
                            && removal
                            && aw.state::<serde::de::IgnoredAny>(client).is_some())
                }
            }
        })
        .map(|(client, e)| (*client, e.clone()))
        .collect();
    AwarenessUpdate { clients }
}

fn apply(awareness: &Awareness, update: Update) -> Result<(), DocError> {
    let doc = awareness.doc();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.transact_mut().apply_update(update)
    }))
    .map_err(|_| DocError::Corrupt("the update could not be applied".into()))?
    .map_err(|e| DocError::Corrupt(e.to_string()))
}

/// The JSON of root type `name` of `doc` read as `kind` (a text and an XML fragment as strings).
fn json_of(doc: &yrs::Doc, name: &str, kind: &str) -> Option<serde_json::Value> {
    use yrs::types::ToJson;
    use yrs::GetString;
    let txn = doc.transact();
    let any = match kind {
        "text" => yrs::Any::from(txn.get_text(name)?.get_string(&txn)),
        "map" => txn.get_map(name)?.to_json(&txn),
        "array" => txn.get_array(name)?.to_json(&txn),
        "xml" => yrs::Any::from(txn.get_xml_fragment(name)?.get_string(&txn)),
        _ => return None,
    };
    let mut s = String::new();
    any.to_json(&mut s);
    serde_json::from_str(&s).ok()
}

/// Counts a refused update by why (`herald_yjs_updates_refused_total`).
pub(crate) fn refused(e: &DocError) {
    let reason = match e {
        DocError::Corrupt(_) => "corrupt",
        DocError::UpdateTooLarge { .. } => "too_large",
        DocError::DocumentFull(_) => "document_full",
        _ => "storage",
    };
    metrics::counter!("herald_yjs_updates_refused_total", "reason" => reason).increment(1);
}

/// Every loaded document of this node.
pub struct Docs {
    hub: Hub,
    cfg: YjsConfig,
    /// Names this node in the origin of what it publishes, so a node does not echo a client's own update
    /// back to it.
    node: String,
    loaded: Mutex<HashMap<Arc<str>, Arc<Loaded>>>,
    next_peer: AtomicU64,
    /// The background task ([`Docs::run`]) starts with the first document, inside the runtime.
    started: std::sync::OnceLock<()>,
}

/// One document in memory.
pub struct Loaded {
    pub name: Arc<str>,
    channel: String,
    state: Mutex<DocState>,
    ready: tokio::sync::OnceCell<()>,
    /// Ends the document's task (unload).
    stop: CancellationToken,
}

struct DocState {
    awareness: Awareness,
    peers: HashMap<u64, Peer>,
    /// The highest stored seq applied: everything at or below it is in `awareness.doc()`.
    applied: u64,
    /// Bytes stored for the document: its last snapshot and the updates after it (approximate: what
    /// this node saw).
    stored_bytes: usize,
    /// Updates stored since the last snapshot.
    since_snapshot: u64,
    compacting: bool,
    /// `since_snapshot` when the last compaction failed: the next is tried `compact_after` updates
    /// later, not every second (a state too large for the engine stays too large).
    compact_failed_at: Option<u64>,
    /// No connection since then.
    idle_since: Option<Instant>,
    /// An update was applied since the newest point-in-time snapshot this node knows of.
    snap_dirty: bool,
    /// When the newest point-in-time snapshot known was taken (ms); `None`: not looked up yet.
    snap_last_ms: Option<i64>,
    snapshotting: bool,
    /// Changed by a client of this node since the last `changed` event.
    changed: bool,
    /// The hub subscription feeding the document; dropped on unload.
    sub: Option<crate::hub::Subscription>,
}

/// A connection's place in a document.
struct Peer {
    /// The connection's queue; its `extra` counts the bytes in it (the connection takes off what it
    /// writes).
    tx: queue::Sender<Frame, AtomicUsize>,
    /// Bytes left after this connection's last catch-up: the next one waits until the backlog is twice
    /// that, so a client slower than the document's edits costs one merge per doubling, not per update.
    floor: usize,
    /// The awareness client ids this connection announced, removed when it leaves. A provider announces
    /// one, so a `Vec` (one 8-byte allocation) rather than a set (a hash table per idle connection).
    clients: Vec<ClientID>,
}

/// A connection's handle on a document: the queue its frames arrive in, and its id for the others.
pub struct PeerHandle {
    pub doc: Arc<Loaded>,
    pub id: u64,
    rx: queue::Receiver<Frame, AtomicUsize>,
}

impl PeerHandle {
    /// The next frame to write; `None` once the document closed this connection's queue.
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        self.rx.extra().fetch_sub(f.len(), Ordering::Relaxed);
        Some(f)
    }

    /// A frame if one is waiting.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let f = self.rx.try_recv()?;
        self.rx.extra().fetch_sub(f.len(), Ordering::Relaxed);
        Some(f)
    }
}

/// One encoded y-websocket message on its way to connections: encoded once, shared by every queue it is
/// in. A thin pointer (8 bytes, where `Bytes` is 32), because a join storm queues the newcomers'
/// awareness to every connection at once, and the queues' buffers at that peak (1.7 MB for 1 000 clients
/// joining 50 at a time, by heaptrack) stay in the allocator's arenas after they drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Arc<Vec<u8>>);

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Frame {
    fn from(v: Vec<u8>) -> Frame {
        Frame(Arc::new(v))
    }
}

fn encode(msg: &Message) -> Frame {
    Frame::from(msg.encode_v1())
}

fn update_frame(update: Vec<u8>) -> Frame {
    encode(&Message::Sync(SyncMessage::Update(update)))
}

/// One update holding all of `updates` (the first one itself when it is alone); `None` when yrs cannot
/// merge them (it is not hardened against every input, hence the unwind guard).
fn merged<'a>(updates: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let updates: Vec<&[u8]> = updates.into_iter().collect();
    match updates.as_slice() {
        [] => None,
        [one] => Some(one.to_vec()),
        many => std::panic::catch_unwind(|| yrs::merge_updates_v1(many))
            .ok()
            .and_then(Result::ok),
    }
}

impl Peer {
    /// Queues `frame` for this connection. One that fell behind (more than `PEER_QUEUE_BYTES` or
    /// `PEER_QUEUE` frames waiting) is caught up rather than closed: its backlog becomes one merged
    /// update (and one awareness message), which brings it exactly where the frames would have, in one
    /// frame it can apply at once. Closing it instead made it reconnect and sync the whole document again,
    /// which is more work for both sides, under the very load that made it slow.
    fn offer(&mut self, frame: Frame, doc: &yrs::Doc) {
        let len = frame.len();
        let limit = PEER_QUEUE_BYTES.max(self.floor.saturating_mul(2));
        if self.tx.extra().load(Ordering::Relaxed) + len <= limit {
            // Counted before it is queued, so the connection never takes off more than was added.
            self.tx.extra().fetch_add(len, Ordering::Relaxed);
            match self.tx.try_send(frame) {
                Ok(()) => return,
                Err(queue::TrySendError::Closed(_)) => {
                    self.tx.extra().fetch_sub(len, Ordering::Relaxed);
                    return;
                }
                Err(queue::TrySendError::Full(f)) => {
                    self.tx.extra().fetch_sub(len, Ordering::Relaxed);
                    return self.catch_up(f, doc);
                }
            }
        }
        self.catch_up(frame, doc)
    }

    fn catch_up(&mut self, frame: Frame, doc: &yrs::Doc) {
        if self.tx.is_closed() {
            return;
        }
        let backlog = self.tx.take_all();
        let taken: usize = backlog.iter().map(|f| f.len()).sum();
        self.tx.extra().fetch_sub(taken, Ordering::Relaxed);
        let mut left = 0;
        for f in compact_backlog(backlog.into_iter().chain([frame]), doc) {
            let len = f.len();
            self.tx.extra().fetch_add(len, Ordering::Relaxed);
            if self.tx.try_send(f).is_err() {
                self.tx.extra().fetch_sub(len, Ordering::Relaxed);
            } else {
                left += len;
            }
        }
        self.floor = left;
        metrics::counter!("herald_yjs_catch_ups_total").increment(1);
    }
}

/// The frames of a backlog with every update merged into one (a sync step 2 if one of them was, which the
/// client takes as the end of its sync) and every awareness message into one (the newest entry per
/// client), behind the other frames (the server's sync step 1, an auth refusal) in their order. Yjs
/// updates commute and awareness entries are ordered by their clocks, so the client ends up where the
/// whole backlog would have taken it. When yrs cannot merge the updates, the whole document stands in for
/// them: every update relayed was applied to it first.
fn compact_backlog(frames: impl Iterator<Item = Frame>, doc: &yrs::Doc) -> Vec<Frame> {
    let mut kept = Vec::new();
    let mut updates: Vec<Vec<u8>> = Vec::new();
    let mut step2 = false;
    let mut aware: HashMap<ClientID, AwarenessUpdateEntry> = HashMap::new();
    for f in frames {
        match Message::decode_v1(&f) {
            Ok(Message::Sync(SyncMessage::SyncStep2(u))) => {
                step2 = true;
                updates.push(u);
            }
            Ok(Message::Sync(SyncMessage::Update(u))) => updates.push(u),
            Ok(Message::Awareness(a)) => {
                for (client, e) in a.clients {
                    match aware.get(&client) {
                        Some(old) if old.clock > e.clock => {}
                        _ => {
                            aware.insert(client, e);
                        }
                    }
                }
            }
            _ => kept.push(f),
        }
    }
    if !aware.is_empty() {
        kept.push(encode(&Message::Awareness(AwarenessUpdate {
            clients: aware,
        })));
    }
    if !updates.is_empty() {
        let update = merged(updates.iter().map(Vec::as_slice)).unwrap_or_else(|| {
            doc.transact()
                .encode_state_as_update_v1(&StateVector::default())
        });
        kept.push(encode(&Message::Sync(if step2 {
            SyncMessage::SyncStep2(update)
        } else {
            SyncMessage::Update(update)
        })));
    }
    kept
}

impl Docs {
    pub fn new(hub: Hub, mut cfg: YjsConfig) -> Arc<Docs> {
        // An update is stored as one record: no larger than the engine takes (NATS: its max_payload), or
        // a client would be told the engine failed where it sent too much.
        if let Some(max) = hub.engine().max_record_data() {
            if cfg.max_update_size > max {
                tracing::warn!(
                    configured = cfg.max_update_size,
                    engine = max,
                    "yjs.max_update_size is larger than the engine stores in one record: updates are \
                     limited to the engine's size (and a document whose merged state is larger is not \
                     compacted)"
                );
                cfg.max_update_size = max;
            }
        }
        Arc::new(Docs {
            hub,
            cfg,
            node: uuid::Uuid::new_v4().simple().to_string(),
            loaded: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            started: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &YjsConfig {
        &self.cfg
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Names of the loaded documents.
    pub fn loaded_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.loaded.lock().keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// The document `name`, loaded from the engine if it is not in memory.
    pub async fn open(self: &Arc<Self>, name: &str) -> Result<Arc<Loaded>, DocError> {
        self.started.get_or_init(|| {
            tokio::spawn(self.clone().run(self.hub.shutdown_token()));
        });
        let doc = {
            let mut map = self.loaded.lock();
            match map.get(name) {
                Some(d) => d.clone(),
                None => {
                    if map.len() >= self.cfg.max_documents {
                        self.evict_one(&mut map);
                    }
                    if map.len() >= self.cfg.max_documents {
                        return Err(DocError::TooMany(self.cfg.max_documents));
                    }
                    let name: Arc<str> = name.into();
                    let d = Arc::new(Loaded {
                        channel: channel_of(&name),
                        name: name.clone(),
                        state: Mutex::new(DocState {
                            awareness: Awareness::new(yrs::Doc::new()),
                            peers: HashMap::new(),
                            applied: 0,
                            stored_bytes: 0,
                            since_snapshot: 0,
                            compact_failed_at: None,
                            compacting: false,
                            idle_since: Some(Instant::now()),
                            snap_dirty: false,
                            snap_last_ms: None,
                            snapshotting: false,
                            changed: false,
                            sub: None,
                        }),
                        ready: tokio::sync::OnceCell::new(),
                        stop: CancellationToken::new(),
                    });
                    map.insert(name, d.clone());
                    metrics::gauge!("herald_yjs_documents_loaded").increment(1.0);
                    d
                }
            }
        };
        let loading = doc.ready.get_or_try_init(|| self.load(doc.clone())).await;
        if let Err(e) = loading {
            self.forget(&doc);
            return Err(e);
        }
        if doc.stop.is_cancelled() {
            return Err(DocError::Unloaded);
        }
        Ok(doc)
    }

    /// Removes the document that has been idle longest, if one is idle.
    fn evict_one(&self, map: &mut HashMap<Arc<str>, Arc<Loaded>>) {
        let victim = map
            .values()
            .filter_map(|d| {
                let st = d.state.lock();
                match (st.peers.is_empty(), st.idle_since) {
                    (true, Some(t)) if d.ready.initialized() => Some((t, d.clone())),
                    _ => None,
                }
            })
            .min_by_key(|(t, _)| *t);
        if let Some((_, d)) = victim {
            map.remove(&d.name);
            metrics::gauge!("herald_yjs_documents_loaded").decrement(1.0);
            d.unload();
        }
    }

    fn forget(&self, doc: &Arc<Loaded>) {
        let mut map = self.loaded.lock();
        if map.get(&doc.name).is_some_and(|d| Arc::ptr_eq(d, doc)) {
            map.remove(&doc.name);
            metrics::gauge!("herald_yjs_documents_loaded").decrement(1.0);
        }
        drop(map);
        doc.unload();
    }

    /// Subscribes the document's channel, then applies what the engine stored up to the registration
    /// boundary; the task started last applies what arrives live.
    async fn load(self: &Arc<Self>, doc: Arc<Loaded>) -> Result<(), DocError> {
        let (outbox, mut rx) = self.hub.outbox_with_capacity(DOC_QUEUE);
        let spec = SubscribeSpec::new(
            vec![Selector::Exact(doc.channel.as_str().into())],
            crate::access::Identity::anonymous(),
            format!("yjs:{}", doc.name),
        );
        let sub = self.hub.subscribe(spec, &outbox)?;
        let upto = sub.registered_at;
        let engine = self.hub.engine().clone();
        let mut after = 0;
        let (mut bytes, mut count) = (0usize, 0u64);
        loop {
            let page = engine
                .read_channel(doc.channel.clone(), after, upto, LOAD_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let full = page.len() == LOAD_PAGE;
            let st = doc.state.lock();
            for r in &page {
                match r.event_type.as_deref() {
                    Some(KIND_SNAPSHOT) => {
                        bytes = r.data.len();
                        count = 0;
                    }
                    _ => {
                        bytes += r.data.len();
                        count += 1;
                    }
                }
                // A stored update that no longer applies is skipped, not fatal: the rest still loads.
                if let Err(e) = decode_update(&r.data).and_then(|u| apply(&st.awareness, u)) {
                    tracing::warn!(doc = %doc.name, seq = r.seq, error = %e, "stored Yjs update skipped");
                }
            }
            drop(st);
            if !full {
                break;
            }
        }
        {
            let mut st = doc.state.lock();
            st.applied = upto;
            st.stored_bytes = bytes;
            st.since_snapshot = count;
            st.sub = Some(sub);
        }
        let docs = self.clone();
        let task_doc = doc.clone();
        let interval = self.cfg.relay_interval;
        tokio::spawn(async move {
            // When the last relay was, unless it was cut short by `RELAY_BATCH` (then more waits already).
            let mut last_relay: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = task_doc.stop.cancelled() => return,
                    d = rx.recv() => match d {
                        Some(first) => {
                            // Under sustained edits, what arrives within `relay_interval` of the last
                            // relay waits for the interval's end and goes with it: a client then gets at
                            // most one update per interval, however many were stored. Applying a message
                            // costs a client about the same whatever it holds, and it is the clients
                            // (browsers, phones) that fall behind first. The first edit after a quiet
                            // interval goes at once, so typing alone is not delayed.
                            if let Some(due) = last_relay.map(|t| t + interval) {
                                if due > Instant::now() {
                                    tokio::select! {
                                        _ = task_doc.stop.cancelled() => return,
                                        _ = tokio::time::sleep_until(due) => {}
                                    }
                                }
                            }
                            // What else already arrived is applied with it, and relayed as one update.
                            let mut batch = Vec::new();
                            let mut next = Some(first);
                            while let Some(d) = next {
                                if let Delivery::Pub { publication, .. } = d {
                                    batch.push(publication);
                                }
                                next = if batch.len() < RELAY_BATCH { rx.try_recv() } else { None };
                            }
                            task_doc.deliver(&docs, &batch);
                            last_relay = (batch.len() < RELAY_BATCH).then(Instant::now);
                        }
                        None => break,
                    },
                }
            }
            // The hub cut the document off (it fell behind, or the hub is shutting down): what it holds
            // may miss updates, so it goes, and its clients reconnect and load it again.
            // An idle unload drops the subscription too, and may win the race with `stop`: not a warning.
            if !docs.hub.is_shutting_down() && !task_doc.stop.is_cancelled() {
                tracing::warn!(doc = %task_doc.name, "document feed ended; unloading it");
            }
            docs.forget(&task_doc);
        });
        Ok(())
    }

    /// Stores a client's update (`origin`: its connection), after checking it. Returns once the engine
    /// acknowledged it; the document and the other clients get it from the hub.
    pub async fn submit_update(
        &self,
        doc: &Loaded,
        origin: Option<u64>,
        data: Bytes,
    ) -> Result<(), DocError> {
        if self.check_update(doc, &data, 0)? {
            self.store_updates(doc, origin, vec![data]).await?;
        }
        Ok(())
    }

    /// Checks a client's update before it is stored: its size, that it decodes, and the room left in the
    /// document with `pending` bytes of the same connection's updates not stored yet. `Ok(false)`: an empty
    /// update, nothing to store. A refusal is counted.
    pub fn check_update(
        &self,
        doc: &Loaded,
        data: &[u8],
        pending: usize,
    ) -> Result<bool, DocError> {
        let result = (|| {
            let max = self.cfg.max_update_size;
            if data.len() > max {
                return Err(DocError::UpdateTooLarge {
                    size: data.len(),
                    max,
                });
            }
            if decode_update(data)?.is_empty() {
                return Ok(false);
            }
            let st = doc.state.lock();
            if st.stored_bytes + pending + data.len() > self.cfg.max_document_size {
                return Err(DocError::DocumentFull(self.cfg.max_document_size));
            }
            Ok(true)
        })();
        if let Err(e) = &result {
            refused(e);
        }
        result
    }

    /// Stores checked updates of one connection as one record: merged when there are several, which
    /// is what lets a connection read on while its earlier updates wait for their commit (they go into
    /// the next one together). Returns once the engine acknowledged them; the document and the other
    /// clients get them from the hub, so nothing is relayed before it is stored.
    pub async fn store_updates(
        &self,
        doc: &Loaded,
        origin: Option<u64>,
        updates: Vec<Bytes>,
    ) -> Result<(), DocError> {
        let data = match updates.as_slice() {
            [] => return Ok(()),
            [one] => one.clone(),
            many => match merged(many.iter().map(|u| u.as_ref())) {
                Some(m) => Bytes::from(m),
                None => {
                    // Each was checked alone: stored alone, in order, they are as good.
                    for u in updates {
                        self.publish(doc, origin, u, KIND_UPDATE, false)
                            .await
                            .inspect_err(refused)?;
                    }
                    doc.state.lock().changed = true;
                    return Ok(());
                }
            },
        };
        self.publish(doc, origin, data, KIND_UPDATE, false)
            .await
            .inspect_err(refused)?;
        doc.state.lock().changed = true;
        Ok(())
    }

    /// Relays a client's awareness update to every client of the document, on every node; returns the
    /// client ids it names (the connection owns them from then on).
    pub async fn submit_awareness(
        &self,
        doc: &Loaded,
        origin: u64,
        update: &AwarenessUpdate,
    ) -> Result<(), DocError> {
        let update = {
            let mut st = doc.state.lock();
            let news = news(&st.awareness, update);
            if news.clients.is_empty() {
                return Ok(()); // an echo of what everyone has: relaying it would only bounce it again
            }
            // Only states this connection changed become its own: an echoed state of another client is
            // not, or its leaving would remove that client for everyone.
            if let Some(p) = st.peers.get_mut(&origin) {
                p.clients.extend(news.clients.keys().copied());
                p.clients.sort_unstable();
                p.clients.dedup();
            }
            news
        };
        let data = Bytes::from(update.encode_v1());
        self.publish(doc, Some(origin), data, KIND_AWARENESS, true)
            .await
    }

    async fn publish(
        &self,
        doc: &Loaded,
        origin: Option<u64>,
        data: Bytes,
        kind: &str,
        skip_history: bool,
    ) -> Result<(), DocError> {
        let mut tags = std::collections::BTreeMap::new();
        if let Some(o) = origin {
            tags.insert("origin".to_string(), format!("{}:{o}", self.node));
        }
        self.hub
            .publish(NewPublication {
                topics: vec![doc.channel.clone()],
                data,
                event_type: Some(kind.to_string()),
                tags,
                skip_history,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Adds a connection to the document. Its queue starts with the server's sync step 1 and the
    /// awareness states known, in the same lock as every broadcast, so nothing is lost or reordered.
    pub fn join(&self, doc: Arc<Loaded>) -> PeerHandle {
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        // Its buffer is given back whenever it is drained: an idle connection of a busy document would
        // otherwise keep up to 16 slots (512 B) from the last burst of frames it was sent.
        let (tx, rx) = queue::channel_with(PEER_QUEUE, 0, AtomicUsize::new(0));
        {
            let mut st = doc.state.lock();
            let mut peer = Peer {
                tx,
                floor: 0,
                clients: Vec::new(),
            };
            let sv = st.awareness.doc().transact().state_vector();
            let step1 = encode(&Message::Sync(SyncMessage::SyncStep1(sv)));
            peer.offer(step1, st.awareness.doc());
            if let Ok(u) = st.awareness.update() {
                if !u.clients.is_empty() {
                    peer.offer(encode(&Message::Awareness(u)), st.awareness.doc());
                }
            }
            if doc.stop.is_cancelled() || self.hub.shutdown_token().is_cancelled() {
                // Unloaded meanwhile (the connection ends and reconnects), or the server is stopping.
                peer.tx.close();
            }
            st.peers.insert(id, peer);
            st.idle_since = None;
        }
        metrics::gauge!("herald_yjs_connections").increment(1.0);
        PeerHandle { doc, id, rx }
    }

    /// Removes a connection, and its awareness states for everyone.
    pub async fn leave(&self, doc: &Loaded, id: u64) {
        let gone = {
            let mut st = doc.state.lock();
            let peer = st.peers.remove(&id);
            if st.peers.is_empty() {
                st.idle_since = Some(Instant::now());
            }
            let Some(peer) = peer else { return };
            metrics::gauge!("herald_yjs_connections").decrement(1.0);
            let mut clients = HashMap::new();
            for c in peer.clients {
                let clock = st.awareness.meta(c).map_or(0, |(clock, _)| clock);
                clients.insert(
                    c,
                    AwarenessUpdateEntry {
                        clock: clock + 1,
                        json: "null".into(),
                    },
                );
            }
            clients
        };
        if gone.is_empty() {
            return;
        }
        let update = AwarenessUpdate { clients: gone };
        let data = Bytes::from(update.encode_v1());
        if let Err(e) = self.publish(doc, None, data, KIND_AWARENESS, true).await {
            tracing::debug!(doc = %doc.name, error = %e, "awareness removal not relayed");
        }
    }

    /// Background work, once a second until `shutdown`: `changed` events, compaction, idle unloading.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Ends every connection (each sees the token cancelled and says "restarting"):
                    // they wait on their queue, not on the token, which would make every idle
                    // connection's task larger.
                    for d in self.loaded.lock().values() {
                        d.close_peers();
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let docs: Vec<Arc<Loaded>> = self.loaded.lock().values().cloned().collect();
            for d in docs {
                if !d.ready.initialized() {
                    continue;
                }
                let (changed, compact, idle, snapshot) = {
                    let mut st = d.state.lock();
                    let changed = std::mem::take(&mut st.changed);
                    let every = self.cfg.compact_after.max(1);
                    let compact = !st.compacting
                        && st.since_snapshot >= every
                        && st
                            .compact_failed_at
                            .is_none_or(|f| st.since_snapshot >= f.saturating_add(every));
                    let idle = st
                        .idle_since
                        .is_some_and(|t| t.elapsed() >= self.cfg.idle_unload);
                    if compact || (idle && st.since_snapshot > 1) {
                        st.compacting = true;
                    }
                    let interval = self.cfg.snapshot_interval.as_millis() as i64;
                    let snapshot = interval > 0
                        && st.snap_dirty
                        && !st.snapshotting
                        && (idle
                            || st
                                .snap_last_ms
                                .is_none_or(|t| crate::hub::now_ms() - t >= interval));
                    if snapshot {
                        st.snapshotting = true;
                    }
                    (changed, compact, idle, snapshot)
                };
                if changed {
                    self.event(&d.name, "changed").await;
                }
                if snapshot && idle {
                    // The last changes of a document going out of memory get their snapshot now,
                    // whatever the interval: nothing else would take one until it is edited again.
                    self.timed_snapshot(&d, "idle", true).await;
                } else if snapshot {
                    let docs = self.clone();
                    let d = d.clone();
                    tokio::spawn(async move { docs.timed_snapshot(&d, "interval", false).await });
                }
                if compact {
                    let docs = self.clone();
                    tokio::spawn(async move { docs.compact(&d).await });
                } else if idle {
                    if d.state.lock().compacting {
                        self.compact(&d).await;
                    }
                    // Still idle after the compaction's awaits (nobody joined meanwhile)?
                    let still = d.state.lock().peers.is_empty();
                    if still {
                        self.forget(&d);
                        self.event(&d.name, "idle").await;
                    }
                }
            }
        }
    }

    /// Merges the document into one snapshot, stores it, and drops the updates it holds. Safe at any
    /// moment: the snapshot holds every update up to `applied`, and updates stored meanwhile stay.
    pub async fn compact(&self, doc: &Loaded) {
        let (snapshot, upto) = {
            let st = doc.state.lock();
            let txn = st.awareness.doc().transact();
            (
                Bytes::from(txn.encode_state_as_update_v1(&StateVector::default())),
                st.applied,
            )
        };
        let result = async {
            self.publish(doc, None, snapshot, KIND_SNAPSHOT, false)
                .await?;
            let trimmed = self
                .hub
                .engine()
                .trim_channel(doc.channel.clone(), upto)
                .await?;
            Ok::<u64, DocError>(trimmed)
        }
        .await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("herald_yjs_compactions_total", "result" => outcome).increment(1);
        let mut st = doc.state.lock();
        match result {
            Ok(n) => tracing::debug!(doc = %doc.name, upto, trimmed = n, "document compacted"),
            Err(e) => {
                tracing::warn!(
                    doc = %doc.name,
                    error = %e,
                    retry_after_updates = self.cfg.compact_after.max(1),
                    "compaction failed; the document's updates are kept"
                );
                st.compact_failed_at = Some(st.since_snapshot);
            }
        }
        st.compacting = false;
    }

    /// A snapshot of the background work: failures are logged, and the document stays due for one.
    async fn timed_snapshot(&self, doc: &Loaded, reason: &str, force: bool) {
        match self.take_snapshot(doc, reason, force).await {
            Ok(Some(info)) => {
                tracing::debug!(doc = %doc.name, id = info.id, reason, "snapshot taken")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(doc = %doc.name, error = %e, "snapshot failed"),
        }
        doc.state.lock().snapshotting = false;
    }

    /// Stores a point-in-time snapshot of the document and trims the older ones (`yjs.snapshot_keep`,
    /// `yjs.snapshot_max_age`). Unless `force`, it is skipped when the newest stored snapshot is more
    /// recent than `yjs.snapshot_interval`: every node holding the document looks before it writes, so a
    /// cluster keeps about one per interval, not one per node.
    pub async fn take_snapshot(
        &self,
        doc: &Loaded,
        reason: &str,
        force: bool,
    ) -> Result<Option<SnapshotInfo>, DocError> {
        let channel = snapshots_channel_of(&doc.name);
        let engine = self.hub.engine().clone();
        let newest = engine
            .read_channel_back(channel.clone(), u64::MAX, 1)
            .await?
            .into_iter()
            .next();
        let now = crate::hub::now_ms();
        if !force {
            if let Some(n) = &newest {
                let interval = self.cfg.snapshot_interval.as_millis() as i64;
                if now - n.time_ms < interval {
                    doc.state.lock().snap_last_ms = Some(n.time_ms);
                    return Ok(None);
                }
            }
        }
        let state = {
            let mut st = doc.state.lock();
            st.snap_dirty = false;
            let txn = st.awareness.doc().transact();
            Bytes::from(txn.encode_state_as_update_v1(&StateVector::default()))
        };
        // The older snapshots this one keeps listed; the first one pushed out (by count or age) and
        // everything before it are trimmed once this one is stored.
        let older = newest
            .as_ref()
            .map(SnapshotInfo::listed_by)
            .unwrap_or_default();
        let keep = self.cfg.snapshot_keep.max(1);
        let max_age = self.cfg.snapshot_max_age.as_millis() as i64;
        let mut kept = Vec::new();
        let mut cut = 0u64;
        for s in older {
            let expired = max_age > 0 && now - s.time_ms > max_age;
            // Once one goes, every older one goes too: the trim removes everything up to the cut, so a
            // kept snapshot must be newer than every dropped one (nodes' clocks may disagree a little).
            if cut == 0 && kept.len() + 1 < keep && !expired {
                kept.push(s);
            } else {
                cut = cut.max(s.id);
            }
        }
        let mut tags = std::collections::BTreeMap::new();
        tags.insert("reason".to_string(), reason.to_string());
        tags.insert(
            "index".to_string(),
            serde_json::to_string(&kept).unwrap_or_else(|_| "[]".into()),
        );
        let published = self
            .hub
            .publish(NewPublication {
                topics: vec![channel.clone()],
                data: state,
                event_type: Some(KIND_SNAPSHOT.to_string()),
                tags,
                ..Default::default()
            })
            .await;
        let published = match published {
            Ok(p) => p,
            Err(e) => {
                doc.state.lock().snap_dirty = true;
                return Err(e.into());
            }
        };
        doc.state.lock().snap_last_ms = Some(published.record.time_ms);
        metrics::counter!("herald_yjs_snapshots_total").increment(1);
        if cut > 0 {
            // A failed trim leaves old snapshots listed by nobody; the next snapshot trims them.
            if let Err(e) = engine.trim_channel(channel, cut).await {
                tracing::warn!(doc = %doc.name, error = %e, "old snapshots not trimmed");
            }
        }
        Ok(Some(SnapshotInfo::of(&published.record)))
    }

    /// The document's snapshots, newest first (those older than `yjs.snapshot_max_age` left out).
    pub async fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, DocError> {
        let engine = self.hub.engine();
        let newest = engine
            .read_channel_back(snapshots_channel_of(name), u64::MAX, 1)
            .await?
            .into_iter()
            .next();
        let Some(newest) = newest else {
            if engine
                .channel_top(channel_of(name), u64::MAX)
                .await?
                .is_none()
            {
                return Err(DocError::DocumentNotFound(name.to_string()));
            }
            return Ok(Vec::new());
        };
        let max_age = self.cfg.snapshot_max_age.as_millis() as i64;
        let now = crate::hub::now_ms();
        Ok(SnapshotInfo::listed_by(&newest)
            .into_iter()
            .filter(|s| max_age == 0 || now - s.time_ms <= max_age)
            .collect())
    }

    /// The stored record of snapshot `id` of document `name`.
    pub async fn snapshot(&self, name: &str, id: u64) -> Result<Record, DocError> {
        let found = self
            .hub
            .engine()
            .read_channel(snapshots_channel_of(name), id.saturating_sub(1), id, 1)
            .await?;
        found
            .into_iter()
            .find(|r| r.seq == id && id > 0)
            .ok_or_else(|| DocError::SnapshotNotFound(name.to_string(), id))
    }

    /// Makes document `name` hold what snapshot `id` held, as an edit stored and relayed like any other
    /// (see `restore.rs` for what is restored). The current content is snapshotted first.
    pub async fn restore(self: &Arc<Self>, name: &str, id: u64) -> Result<Restored, DocError> {
        let snapshot = self.snapshot(name, id).await?;
        let doc = self.open(name).await?;
        let before = self.take_snapshot(&doc, "before-restore", true).await?;
        let current = Bytes::from(doc.state_update());
        let target = snapshot.data.clone();
        let update =
            tokio::task::spawn_blocking(move || super::restore::restore_update(&current, &target))
                .await
                .map_err(|_| DocError::Corrupt("the restore could not be computed".into()))??;
        let update_size = update.len();
        if decode_update(&update)?.is_empty() {
            return Ok(Restored {
                snapshot: id,
                before: before.map(|b| b.id),
                update_size: 0,
            });
        }
        {
            let st = doc.state.lock();
            if st.stored_bytes + update_size > self.cfg.max_document_size {
                return Err(DocError::DocumentFull(self.cfg.max_document_size));
            }
        }
        // Not held to yjs.max_update_size: it is Herald's own edit, as large as the snapshot.
        self.publish(&doc, None, Bytes::from(update), KIND_UPDATE, false)
            .await?;
        doc.state.lock().changed = true;
        metrics::counter!("herald_yjs_restores_total").increment(1);
        Ok(Restored {
            snapshot: id,
            before: before.map(|b| b.id),
            update_size,
        })
    }

    /// Publishes a document event on `yjs.events_channel` (private: readers need a grant of it).
    async fn event(&self, name: &str, kind: &str) {
        if self.cfg.events_channel.is_empty() {
            return;
        }
        let data = serde_json::json!({"type": kind, "doc": name}).to_string();
        let r = self
            .hub
            .publish(NewPublication {
                topics: vec![self.cfg.events_channel.clone()],
                data: data.into(),
                private: true,
                event_type: Some(format!("yjs.{kind}")),
                ..Default::default()
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(doc = %name, error = %e, "document event not published");
        }
    }
}

impl Loaded {
    fn unload(&self) {
        self.stop.cancel();
        self.state.lock().sub = None;
        // Closing their queues ends the connections, which then reconnect and load it again.
        self.close_peers();
    }

    /// Ends every connection of this document on this node: each finds its queue closed.
    fn close_peers(&self) {
        for p in self.state.lock().peers.values() {
            p.tx.close();
        }
    }

    /// Applies what the hub delivered and passes it on to this node's clients (but the one each came
    /// from). The updates of a batch are relayed as one merged update, encoded once and shared by every
    /// client (the clients that wrote some of them get the others' only); an awareness message is relayed
    /// in its place, after the updates before it.
    fn deliver(&self, docs: &Docs, batch: &[Arc<Publication>]) {
        let mut st = self.state.lock();
        let mut updates: Vec<(Option<u64>, Bytes)> = Vec::new();
        for p in batch {
            let r = &p.record;
            let origin = r
                .tags
                .get("origin")
                .and_then(|o| o.split_once(':'))
                .filter(|(node, _)| *node == docs.node)
                .and_then(|(_, id)| id.parse::<u64>().ok());
            match r.event_type.as_deref() {
                Some(KIND_AWARENESS) => {
                    let Ok(u) = AwarenessUpdate::decode_v1(&r.data) else {
                        continue;
                    };
                    // Another node may have relayed what this one already has (or two clients sent the same).
                    let u = news(&st.awareness, &u);
                    if u.clients.is_empty() {
                        continue;
                    }
                    if let Err(e) = st.awareness.apply_update(u.clone()) {
                        tracing::debug!(doc = %self.name, error = %e, "awareness update not applied");
                    }
                    relay_updates(&mut st, std::mem::take(&mut updates));
                    relay(&mut st, origin, &encode(&Message::Awareness(u)));
                }
                kind => {
                    if r.seq <= st.applied {
                        continue;
                    }
                    st.applied = r.seq;
                    if kind == Some(KIND_SNAPSHOT) {
                        st.stored_bytes = r.data.len();
                        st.since_snapshot = 0;
                        st.compact_failed_at = None;
                    } else {
                        st.stored_bytes += r.data.len();
                        st.since_snapshot += 1;
                        st.snap_dirty = true;
                    }
                    let update = match decode_update(&r.data) {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::warn!(doc = %self.name, seq = r.seq, error = %e, "stored update skipped");
                            continue;
                        }
                    };
                    if let Err(e) = apply(&st.awareness, update) {
                        tracing::warn!(doc = %self.name, seq = r.seq, error = %e, "update not applied");
                    } else if kind != Some(KIND_SNAPSHOT) {
                        metrics::counter!("herald_yjs_updates_applied_total").increment(1);
                        metrics::counter!("herald_yjs_update_bytes_total")
                            .increment(r.data.len() as u64);
                    }
                    if kind != Some(KIND_SNAPSHOT) {
                        // A snapshot brings clients nothing new: it merges what they already had.
                        updates.push((origin, r.data.clone()));
                    }
                }
            }
        }
        relay_updates(&mut st, updates);
    }

    /// Answers a client's sync step 1 with what it lacks, queued behind everything already sent to it.
    pub fn sync_step2(&self, peer: u64, sv: &StateVector) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let diff = st.awareness.doc().transact().encode_state_as_update_v1(sv);
        if let Some(p) = st.peers.get_mut(&peer) {
            let frame = encode(&Message::Sync(SyncMessage::SyncStep2(diff)));
            p.offer(frame, st.awareness.doc());
        }
    }

    /// Queues a frame for one connection, behind what is already queued for it.
    pub fn send(&self, peer: u64, frame: Frame) {
        let mut st = self.state.lock();
        let st = &mut *st;
        if let Some(p) = st.peers.get_mut(&peer) {
            p.offer(frame, st.awareness.doc());
        }
    }

    /// Sends a connection every awareness state known (its query-awareness).
    pub fn send_awareness(&self, peer: u64) {
        let mut st = self.state.lock();
        let st = &mut *st;
        if let (Some(p), Ok(u)) = (st.peers.get_mut(&peer), st.awareness.update()) {
            p.offer(encode(&Message::Awareness(u)), st.awareness.doc());
        }
    }

    /// The whole document as one Yjs v1 update.
    pub fn state_update(&self) -> Vec<u8> {
        let st = self.state.lock();
        let txn = st.awareness.doc().transact();
        txn.encode_state_as_update_v1(&StateVector::default())
    }

    /// The JSON of the root type `name` (`kind`: text, map, array, xml), `None` when the document has
    /// no such root.
    pub fn root_json(&self, name: &str, kind: &str) -> Option<serde_json::Value> {
        let st = self.state.lock();
        json_of(st.awareness.doc(), name, kind)
    }

    /// The same, of the document a full-state update describes (a snapshot).
    pub fn json_of_update(
        update: &[u8],
        name: &str,
        kind: &str,
    ) -> Result<Option<serde_json::Value>, DocError> {
        let awareness = Awareness::new(yrs::Doc::new());
        apply(&awareness, decode_update(update)?)?;
        Ok(json_of(awareness.doc(), name, kind))
    }

    /// Bytes stored for the document and updates since its last snapshot.
    pub fn stats(&self) -> (usize, u64, usize) {
        let st = self.state.lock();
        (st.stored_bytes, st.since_snapshot, st.peers.len())
    }
}

/// Queues `frame` for every connection of the document but `origin`.
fn relay(st: &mut DocState, origin: Option<u64>, frame: &Frame) {
    let DocState {
        awareness, peers, ..
    } = st;
    for (id, p) in peers.iter_mut() {
        if Some(*id) != origin {
            p.offer(frame.clone(), awareness.doc());
        }
    }
}

/// Relays `updates` (each with the connection it came from) as one merged update, encoded once: a
/// connection that wrote some of them gets the merge of the others only (nothing when they are all its
/// own), as it would have had they been relayed one by one. When yrs cannot merge them, each goes alone.
fn relay_updates(st: &mut DocState, updates: Vec<(Option<u64>, Bytes)>) {
    if updates.is_empty() {
        return;
    }
    let Some(all) = merged(updates.iter().map(|(_, u)| u.as_ref())) else {
        for (origin, u) in updates {
            relay(st, origin, &update_frame(u.to_vec()));
        }
        return;
    };
    let frame = update_frame(all);
    let mut writers: Vec<u64> = updates.iter().filter_map(|(o, _)| *o).collect();
    writers.sort_unstable();
    writers.dedup();
    let mut own: HashMap<u64, Option<Frame>> = HashMap::with_capacity(writers.len());
    for w in writers {
        if !st.peers.contains_key(&w) {
            continue;
        }
        let others: Vec<&[u8]> = updates
            .iter()
            .filter(|(o, _)| *o != Some(w))
            .map(|(_, u)| u.as_ref())
            .collect();
        let f = if others.is_empty() {
            None
        } else {
            // Unmergeable: the whole merge, its own updates included, which Yjs ignores as known.
            Some(merged(others).map_or_else(|| frame.clone(), update_frame))
        };
        own.insert(w, f);
    }
    let DocState {
        awareness, peers, ..
    } = st;
    for (id, p) in peers.iter_mut() {
        match own.get(id) {
            Some(None) => {}
            Some(Some(f)) => p.offer(f.clone(), awareness.doc()),
            None => p.offer(frame.clone(), awareness.doc()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{GetString, Text};

    fn edit(doc: &yrs::Doc, s: &str) -> Vec<u8> {
        let before = doc.transact().state_vector();
        let t = doc.get_or_insert_text("t");
        let at = t.len(&doc.transact());
        t.insert(&mut doc.transact_mut(), at, s);
        doc.transact().encode_state_as_update_v1(&before)
    }

    fn presence(client: u64, clock: u32, json: &str) -> Frame {
        let mut clients = HashMap::new();
        clients.insert(
            ClientID::new(client),
            AwarenessUpdateEntry {
                clock,
                json: json.into(),
            },
        );
        encode(&Message::Awareness(AwarenessUpdate { clients }))
    }

    /// A backlog becomes its other frames in order, one awareness message with the newest entry per
    /// client, and one update that brings a client where the whole backlog would have: a sync step 2 when
    /// one of them was, so the client still sees the end of its sync.
    #[test]
    fn a_backlog_is_merged_into_one_update_and_one_awareness_message() {
        let writer = yrs::Doc::new();
        let (a, b, c) = (edit(&writer, "a"), edit(&writer, "b"), edit(&writer, "c"));
        let step1 = encode(&Message::Sync(SyncMessage::SyncStep1(
            StateVector::default(),
        )));
        let frames = vec![
            step1.clone(),
            presence(7, 1, "{\"x\":1}"),
            update_frame(a),
            presence(7, 3, "{\"x\":3}"),
            encode(&Message::Sync(SyncMessage::SyncStep2(b))),
            presence(7, 2, "{\"x\":2}"),
            update_frame(c),
        ];
        let out = compact_backlog(frames.into_iter(), &yrs::Doc::new());
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0], step1);
        match Message::decode_v1(&out[1]).unwrap() {
            Message::Awareness(u) => {
                assert_eq!(u.clients.len(), 1);
                let e = &u.clients[&ClientID::new(7)];
                assert_eq!(
                    (e.clock, &*e.json),
                    (3, "{\"x\":3}"),
                    "the newest clock wins"
                );
            }
            m => panic!("not awareness: {m:?}"),
        }
        let Message::Sync(SyncMessage::SyncStep2(merged)) = Message::decode_v1(&out[2]).unwrap()
        else {
            panic!("the merged update is not a sync step 2");
        };
        let reader = yrs::Doc::new();
        reader
            .transact_mut()
            .apply_update(Update::decode_v1(&merged).unwrap())
            .unwrap();
        let t = reader.get_or_insert_text("t");
        assert_eq!(t.get_string(&reader.transact()), "abc");
    }

    /// Updates that yrs cannot merge are replaced by the whole document, which holds them all.
    #[test]
    fn an_unmergeable_backlog_is_replaced_by_the_whole_document() {
        let doc = yrs::Doc::new();
        let good = edit(&doc, "whole");
        let frames = vec![
            update_frame(good),
            update_frame(vec![0xff, 0xff, 0xff, 0x7f, 1]),
        ];
        let out = compact_backlog(frames.into_iter(), &doc);
        assert_eq!(out.len(), 1);
        let Message::Sync(SyncMessage::Update(u)) = Message::decode_v1(&out[0]).unwrap() else {
            panic!("not an update");
        };
        let reader = yrs::Doc::new();
        reader
            .transact_mut()
            .apply_update(Update::decode_v1(&u).unwrap())
            .unwrap();
        let t = reader.get_or_insert_text("t");
        assert_eq!(t.get_string(&reader.transact()), "whole");
    }
}
