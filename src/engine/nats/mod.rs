//! The NATS JetStream engine: several Herald nodes on one NATS server (or cluster) behave as one server.
//!
//! What lives where, every name derived from `engine.prefix` (see [`codec::Names`]):
//! - **The log** is one JetStream stream, `<prefix>-log`, file storage, capturing `<prefix>.pub.>`. A
//!   record is one message on `<prefix>.pub.<channel token>.<s|m>`: `s` when it has one topic, `m` when it
//!   has alternates. The stream sequence *is* `seq`, so a publication has the same position on every node.
//!   Every message of the stream is a publication, which is what lets the feed tell a removed message from
//!   a hole that never held one (there are none).
//! - **The epoch** is the stream's creation time (the server's, the same for every node): a stream deleted
//!   and created again is another epoch, so positions of lost history are never taken for new ones.
//! - **Publisher ids** → seq in the KV bucket `<prefix>-ids` (TTL: the longest age retention keeps
//!   anything); generated ids are `#<epoch>-<seq>` and need no lookup.
//! - **Removed history** per channel in `<prefix>-pruned`, written by the retention pass and by
//!   `remove_channel`, so recovery never claims a gap that retention cut was filled.
//! - **Presence** in `<prefix>-presence` (TTL `engine.presence_ttl`, refreshed by each node for its own
//!   clients), see [`presence`].
//! - **Core subjects** (not stored): `<prefix>.broadcast` (publications kept out of history),
//!   `<prefix>.presence` (joins and leaves), `<prefix>.control` (server API actions on live connections).
//!
//! Alternate topics with 2.9's single filter subject: a read of exact topics reads each topic's channel
//! subjects (`<prefix>.pub.<token>.*`) and the records that have alternates (`<prefix>.pub.*.m`, checked
//! here), merged by seq. So a replay of a quiet channel never reads the others' single-topic records, and
//! pays only for the publications that have alternates (none, for Centrifugo channels).

pub(crate) mod codec;
mod feed;
mod presence;
mod read;
mod retention;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectOptions};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Engine, Feed};
use crate::hub::ClientInfo;
use crate::log::{LogError, Record, Retention};
use codec::Names;

/// Reads in flight against NATS at once from this node (each may create a consumer on the server).
const MAX_READS: usize = 16;

/// What the engine needs from the configuration.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port` (several, comma-separated, for a NATS cluster).
    pub url: String,
    pub prefix: String,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub presence_ttl: Duration,
    pub retention: Retention,
    pub prune_interval: Duration,
}

/// State shared by the engine and its background tasks.
pub(crate) struct Shared {
    client: Client,
    js: jetstream::Context,
    names: Names,
    url: String,
    op_timeout: Duration,
    /// The server's `max_payload`: no message (record) may be larger.
    max_payload: usize,
    /// The epoch of the stream as last seen (it changes only if the stream is recreated).
    epoch: RwLock<String>,
    /// The stream's creation time (unix nanoseconds) the epoch was derived from.
    created: Mutex<i128>,
    /// The age limit set on the stream itself (zero: none); shorter per-pattern ages are the pass's.
    stream_max_age: Duration,
    retention: Retention,
    prune_interval: Duration,
    reads: Semaphore,
    /// False after a write failed, until one succeeds: `/readyz` reports it.
    writes_ok: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Bumped on every (re)connection: the feed and presence resynchronise on it.
    connections: watch::Sender<u64>,
    ids: kv::Store,
    pruned: kv::Store,
    stop: CancellationToken,
}

pub struct NatsEngine {
    shared: Arc<Shared>,
    presence: Arc<presence::NatsPresence>,
    feed_taken: AtomicBool,
}

/// Reconnection delay: quick at first, then at most two seconds apart, so a NATS restart costs little
/// more than its own downtime.
pub(crate) fn backoff(attempt: usize) -> Duration {
    let ms = 50u64.saturating_mul(1u64 << attempt.min(6) as u32);
    Duration::from_millis(ms.min(2_000))
}

/// Room kept under `max_payload` for a record's envelope (its id, topics, tags and type, as JSON): what
/// `max_record_data` leaves for the data.
const RECORD_ENVELOPE: usize = 8 * 1024;

pub(crate) fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(format!("nats: {e}"))
}

/// Runs `f` within `limit`, as a storage error when it does not finish.
pub(crate) async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, LogError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(|e| LogError::Storage(format!("nats: {what}: {e}"))),
        Err(_) => Err(LogError::Storage(format!(
            "nats: {what}: no answer within {limit:?}"
        ))),
    }
}

/// The longest age any channel keeps, if every channel has one (a rule for `*` with an age, and an age
/// on every rule before it): the stream's own age limit and the id bucket's TTL. Zero: some channel keeps
/// history without an age limit.
pub(crate) fn uniform_max_age(r: &Retention) -> Duration {
    let mut longest = Duration::ZERO;
    for rule in &r.rules {
        let Some(age) = rule.max_age else {
            return Duration::ZERO;
        };
        longest = longest.max(age);
        if matches!(rule.selector, crate::topic::Selector::Any) {
            return longest;
        }
    }
    Duration::ZERO
}

impl NatsEngine {
    /// Connects, checks JetStream, creates (or adopts) the stream and buckets, and starts the background
    /// tasks. Fails within `connect_timeout` with a message naming the URL when NATS cannot be used.
    pub async fn connect(o: NatsOptions) -> Result<NatsEngine, LogError> {
        let names = Names::new(&o.prefix)?;
        let (connections, _) = watch::channel(0u64);
        let on_event = connections.clone();
        let options = ConnectOptions::new()
            .name("herald")
            .connection_timeout(o.connect_timeout)
            .request_timeout(Some(o.op_timeout))
            .max_reconnects(None)
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(backoff)
            .event_callback(move |event| {
                let on_event = on_event.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            metrics::gauge!("herald_engine_connected").set(1.0);
                            metrics::counter!("herald_engine_reconnects_total").increment(1);
                            on_event.send_modify(|n| *n += 1);
                            tracing::info!("nats: connected");
                        }
                        async_nats::Event::Disconnected => {
                            metrics::gauge!("herald_engine_connected").set(0.0);
                            tracing::warn!("nats: disconnected; reconnecting");
                        }
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            });
        let url = o.url.clone();
        let unreachable =
            |e: &dyn std::fmt::Display| LogError::Storage(format!("cannot use NATS at {url}: {e}"));
        let client =
            match tokio::time::timeout(o.connect_timeout, options.connect(url.as_str())).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(unreachable(&e)),
                Err(_) => {
                    return Err(unreachable(&format!(
                        "no connection within {:?} (engine.connect_timeout)",
                        o.connect_timeout
                    )))
                }
            };
        metrics::gauge!("herald_engine_connected").set(1.0);
        let js = jetstream::ContextBuilder::new()
            .timeout(o.op_timeout)
            .build(client.clone());
        // The account info request answers only where JetStream is enabled (read as plain JSON: the
        // client's typed account info expects fields of newer servers).
        let probe = client.request("$JS.API.INFO", bytes::Bytes::new());
        match tokio::time::timeout(o.connect_timeout, probe).await {
            Ok(Ok(m)) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                if let Some(e) = v.get("error") {
                    return Err(unreachable(&format!(
                        "JetStream is not available ({e}); start nats-server with -js"
                    )));
                }
            }
            Ok(Err(e)) => {
                return Err(unreachable(&format!(
                    "JetStream is not available ({e}); start nats-server with -js"
                )))
            }
            Err(_) => return Err(unreachable(&"JetStream did not answer in time")),
        }
        let setup = async {
            let stream_max_age = uniform_max_age(&o.retention);
            let info = ensure_stream(&js, &names, stream_max_age).await?;
            let created = info.created.unix_timestamp_nanos();
            let ids = ensure_kv(&js, &names.ids, stream_max_age, kv_storage::File).await?;
            let pruned = ensure_kv(&js, &names.pruned, Duration::ZERO, kv_storage::File).await?;
            ensure_kv(
                &js,
                &names.presence,
                o.presence_ttl.max(Duration::from_secs(1)),
                kv_storage::Memory,
            )
            .await?;
            let lease = ensure_kv(
                &js,
                &names.lease,
                (o.prune_interval * 3).max(Duration::from_secs(3)),
                kv_storage::Memory,
            )
            .await?;
            Ok::<_, LogError>((info, created, ids, pruned, lease, stream_max_age))
        };
        let (info, created, ids, pruned, lease, stream_max_age) =
            tokio::time::timeout(o.connect_timeout.max(o.op_timeout), setup)
                .await
                .map_err(|_| unreachable(&"setting up the stream and buckets took too long"))?
                .map_err(|e| unreachable(&e))?;
        tracing::info!(
            stream = %names.stream,
            messages = info.state.messages,
            last_seq = info.state.last_sequence,
            "nats: log stream ready"
        );
        let max_payload = client.server_info().max_payload;
        let shared = Arc::new(Shared {
            max_payload,
            client,
            js,
            url: o.url.clone(),
            op_timeout: o.op_timeout,
            epoch: RwLock::new(codec::epoch_of(created)),
            created: Mutex::new(created),
            stream_max_age,
            retention: o.retention.clone(),
            prune_interval: o.prune_interval.max(Duration::from_millis(100)),
            reads: Semaphore::new(MAX_READS),
            writes_ok: AtomicBool::new(true),
            last_error: Mutex::new(None),
            connections,
            ids,
            pruned,
            stop: CancellationToken::new(),
            names,
        });
        let presence = presence::NatsPresence::start(shared.clone(), o.presence_ttl);
        tokio::spawn(retention::run(shared.clone(), lease));
        Ok(NatsEngine {
            shared,
            presence,
            feed_taken: AtomicBool::new(false),
        })
    }
}

/// Which storage a bucket gets: durable for what history depends on, memory for what expires anyway.
mod kv_storage {
    pub use async_nats::jetstream::stream::StorageType::{File, Memory};
}

/// The log stream, created if missing; an existing one is adopted (its replicas and placement are the
/// operator's) and only its age limit and direct reads are brought in line with the configuration.
async fn ensure_stream(
    js: &jetstream::Context,
    names: &Names,
    max_age: Duration,
) -> Result<stream::Info, LogError> {
    let config = stream::Config {
        name: names.stream.clone(),
        description: Some("Herald publications: one subject per channel".into()),
        subjects: vec![names.stream_subjects()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age,
        allow_direct: true,
        num_replicas: 1,
        ..Default::default()
    };
    let mut s = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| storage(format!("stream {}: {e}", names.stream)))?;
    let info = s.info().await.map_err(storage)?.clone();
    if !info.config.subjects.contains(&names.stream_subjects()) {
        return Err(storage(format!(
            "stream {} exists but does not capture {}: another application uses this prefix",
            names.stream,
            names.stream_subjects()
        )));
    }
    if info.config.max_age != max_age || !info.config.allow_direct {
        let mut c = info.config.clone();
        c.max_age = max_age;
        c.allow_direct = true;
        return js.update_stream(c).await.map_err(storage);
    }
    Ok(info)
}

/// A KV bucket with one value per key, created if missing, its TTL brought in line with `max_age`.
pub(crate) async fn ensure_kv(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    storage_type: stream::StorageType,
) -> Result<kv::Store, LogError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        let name = format!("KV_{bucket}");
        let mut s = js.get_stream(&name).await.map_err(storage)?;
        let info = s.info().await.map_err(storage)?.clone();
        if info.config.max_age != max_age {
            let mut c = info.config.clone();
            c.max_age = max_age;
            if !c.duplicate_window.is_zero() && !max_age.is_zero() && c.duplicate_window > max_age {
                c.duplicate_window = max_age;
            }
            js.update_stream(c).await.map_err(storage)?;
        }
        return Ok(store);
    }
    // The bucket's stream as the KV API lays it out, created directly: the client's own bucket creation
    // first reads account info in a shape only newer servers send.
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(format!("Herald {bucket}")),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: storage_type,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            max_age.min(Duration::from_secs(120))
        },
        num_replicas: 1,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| storage(format!("bucket {bucket}: {e}")))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| storage(format!("bucket {bucket}: {e}")))
}

impl Shared {
    pub(crate) fn epoch(&self) -> String {
        self.epoch.read().clone()
    }

    fn connected(&self) -> Result<(), LogError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(LogError::Storage(format!(
                "not connected to NATS at {} ({state})",
                self.url
            ))),
        }
    }

    /// Whether the server takes a message of this size (its `max_payload`).
    fn fits(&self, payload: &[u8]) -> Result<(), LogError> {
        if payload.len() > self.max_payload {
            return Err(LogError::Storage(format!(
                "nats: a record of {} bytes is larger than the server's max_payload ({} bytes)",
                payload.len(),
                self.max_payload
            )));
        }
        Ok(())
    }

    fn note(&self, error: Option<&LogError>) {
        match error {
            None => self.writes_ok.store(true, Ordering::Release),
            Some(e) => {
                *self.last_error.lock() = Some(e.to_string());
                self.writes_ok.store(false, Ordering::Release);
            }
        }
    }

    async fn append(&self, mut batch: Vec<Record>) -> Result<Vec<Record>, LogError> {
        // Refuse at once rather than let the client queue messages for a server it cannot reach: a
        // publish that failed must not be stored later behind the publisher's back.
        self.connected()?;
        let epoch = self.epoch();
        // Every record is encoded and measured before any is sent: one the server would refuse must not
        // fail the batch halfway, after the records before it were stored (the hub refuses such records
        // by `max_record_data`; this is the last guard).
        let mut payloads = Vec::with_capacity(batch.len());
        for r in &batch {
            let payload = codec::encode(r)?;
            self.fits(&payload)?;
            payloads.push(payload);
        }
        let mut acks = Vec::with_capacity(batch.len());
        // Pipelined: every record is sent before the first acknowledgement is awaited; the server stores
        // them in this order (one connection), so their seqs ascend in batch order.
        for (r, payload) in batch.iter().zip(payloads) {
            let subject = self.names.record_subject(r);
            let ack = within(
                self.op_timeout,
                "publish",
                self.js.publish(subject, payload),
            )
            .await?;
            acks.push(ack);
        }
        let mut named = Vec::new();
        for (r, ack) in batch.iter_mut().zip(acks) {
            let ack = within(
                self.op_timeout,
                "publish acknowledgement",
                ack.into_future(),
            )
            .await?;
            if ack.stream != self.names.stream {
                return Err(storage(format!(
                    "{} was stored by stream {}, not {}",
                    self.names.record_subject(r),
                    ack.stream,
                    self.names.stream
                )));
            }
            r.seq = ack.sequence;
            if r.id.is_empty() {
                r.id = crate::log::generated_id(&epoch, r.seq);
            } else {
                named.push((codec::token(&r.id), r.seq));
            }
        }
        // Publisher ids, so a client resuming with one finds its position: also pipelined, and part of
        // the acknowledgement (a resume right after the ack must find it).
        let mut acks = Vec::with_capacity(named.len());
        for (key, seq) in named {
            let subject = Names::kv_subject(&self.names.ids, &key);
            let ack = within(
                self.op_timeout,
                "id index",
                self.js.publish(subject, seq.to_string().into()),
            )
            .await?;
            acks.push(ack);
        }
        for ack in acks {
            within(
                self.op_timeout,
                "id index acknowledgement",
                ack.into_future(),
            )
            .await?;
        }
        Ok(batch)
    }

    /// Sends on a core subject (not stored); fails when NATS is not reachable rather than queueing.
    async fn send_core(&self, subject: String, payload: bytes::Bytes) -> Result<(), LogError> {
        self.connected()?;
        within(
            self.op_timeout,
            "core publish",
            self.client.publish(subject, payload),
        )
        .await
    }

    /// Raises the recorded removed-history mark of `channel` to at least `seq` (compare-and-set, so
    /// concurrent writers from several nodes never lower it).
    async fn raise_pruned(&self, channel: &str, seq: u64) -> Result<(), LogError> {
        let key = codec::token(channel);
        for _ in 0..8 {
            let entry = within(self.op_timeout, "pruned mark", self.pruned.entry(&key)).await?;
            let value = bytes::Bytes::from(seq.to_string());
            let done = match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    let current = std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    if current >= seq {
                        return Ok(());
                    }
                    self.pruned.update(&key, value, e.revision).await.is_ok()
                }
                Some(e) => self.pruned.update(&key, value, e.revision).await.is_ok(),
                None => self.pruned.create(&key, value).await.is_ok(),
            };
            if done {
                return Ok(());
            }
        }
        Err(storage(format!(
            "could not record the removed history of {channel}: too many concurrent updates"
        )))
    }

    async fn recorded_pruned(&self, channel: &str) -> Result<u64, LogError> {
        let v = within(
            self.op_timeout,
            "pruned mark",
            self.pruned.get(codec::token(channel)),
        )
        .await?;
        Ok(v.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// The highest seq of the channel removed by retention or `remove_channel`; never below the truth.
    async fn channel_pruned_upto(&self, channel: &str) -> Result<u64, LogError> {
        let mut pruned = self.recorded_pruned(channel).await?;
        if !self.stream_max_age.is_zero() {
            // The stream's own age limit removes without telling anyone: everything below the stream's
            // first seq may have belonged to this channel (conservative).
            let first = self.stream_state().await?.first_sequence;
            pruned = pruned.max(first.saturating_sub(1));
        }
        Ok(pruned)
    }

    async fn stream_state(&self) -> Result<stream::State, LogError> {
        let s = within(
            self.op_timeout,
            "stream info",
            self.js.get_stream(&self.names.stream),
        )
        .await?;
        Ok(s.cached_info().state.clone())
    }

    /// Records the channel as removed up to `last` (one of its own positions), then purges its records up
    /// to it and no further: a record appended meanwhile is never removed unrecorded.
    async fn mark_and_purge(&self, channel: &str, last: u64) -> Result<u64, LogError> {
        self.raise_pruned(channel, last).await?;
        let stream = self.stream_handle().await?;
        let purged = within(
            self.op_timeout,
            "purge",
            stream
                .purge()
                .filter(self.names.channel_filter(channel))
                .sequence(last + 1)
                .into_future(),
        )
        .await?;
        Ok(purged.purged)
    }

    async fn remove_channel(&self, channel: &str) -> Result<u64, LogError> {
        self.connected()?;
        let Some(last) = self.last_of(&self.names.channel_filter(channel)).await? else {
            return Ok(0);
        };
        // Recorded first, so a reader never sees the history gone without the mark; only what was read
        // as the channel's newest is purged, so a publication racing with the removal is kept, not
        // removed unrecorded.
        self.mark_and_purge(channel, last.seq).await
    }

    /// Removes the channel's records with `seq <= upto`, the same way as `remove_channel`: the mark first
    /// (the channel's newest record at or below `upto`, so the mark stays a position of this channel), then
    /// a purge bounded by that seq, so a record appended meanwhile is never removed unrecorded.
    async fn trim_channel(&self, channel: &str, upto: u64) -> Result<u64, LogError> {
        self.connected()?;
        let Some(last) = self
            .read_back(channel, upto.saturating_add(1), 1)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(0);
        };
        self.mark_and_purge(channel, last.seq).await
    }

    async fn find_id(&self, id: &str) -> Result<Option<u64>, LogError> {
        let seq = if let Some((epoch, seq)) = crate::log::parse_generated_id(id) {
            if epoch != self.epoch() {
                return Ok(None);
            }
            seq
        } else {
            let v = within(self.op_timeout, "id lookup", self.ids.get(codec::token(id))).await?;
            match v.and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok()) {
                Some(seq) => seq,
                None => return Ok(None),
            }
        };
        // Retained, and really this id (a hashed key could name two).
        match self.record_at(seq).await? {
            Some(r) if r.id == id => Ok(Some(seq)),
            _ => Ok(None),
        }
    }

    async fn health(&self) -> Result<(), LogError> {
        self.connected()?;
        if !self.writes_ok.load(Ordering::Acquire) {
            // A node that is not ready gets no publishes from its load balancer, so it must find out by
            // itself when writes work again: a probe write to the (file-stored) id bucket.
            let probe = within(
                self.op_timeout,
                "probe write",
                self.ids.put("_probe", bytes::Bytes::from_static(b"0")),
            )
            .await;
            if let Err(probe) = probe {
                let e = self.last_error.lock().clone().unwrap_or_default();
                return Err(LogError::Storage(format!(
                    "the last write failed: {e} (and a probe write: {probe})"
                )));
            }
            self.note(None);
        }
        // A JetStream round trip proves the server answers for the stream, not just the socket.
        self.stream_state().await.map(|_| ())
    }
}

impl Engine for NatsEngine {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = self.shared.append(batch).await;
            metrics::histogram!("herald_log_append_seconds")
                .record(started.elapsed().as_secs_f64());
            self.shared.note(result.as_ref().err());
            result
        })
    }

    fn broadcast(&self, record: Record) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            let payload = codec::encode(&record)?;
            self.shared.fits(&payload)?;
            self.shared
                .send_core(self.shared.names.broadcast.clone(), payload)
                .await
        })
    }

    fn presence(&self) -> Option<Arc<dyn crate::presence::PresenceStore>> {
        Some(self.presence.clone())
    }

    fn max_record_data(&self) -> Option<usize> {
        Some(self.shared.max_payload.saturating_sub(RECORD_ENVELOPE))
    }

    fn announce(&self, channel: &str, info: &ClientInfo, joined: bool) {
        self.presence.announce(channel, info, joined);
    }

    fn control(
        &self,
        user: String,
        client: Option<String>,
        payload: bytes::Bytes,
    ) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            let msg = codec::Control::new(user, client, &payload);
            let body = serde_json::to_vec(&msg).map_err(storage)?;
            self.shared
                .send_core(self.shared.names.control.clone(), body.into())
                .await
        })
    }

    fn feed(&self, after: u64) -> Option<Feed> {
        if self.feed_taken.swap(true, Ordering::AcqRel) {
            tracing::error!("the NATS feed can be taken once");
            return None;
        }
        Some(feed::start(self.shared.clone(), after))
    }

    fn read_range(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        topics: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            match topics {
                None => {
                    let all = self.shared.names.stream_subjects();
                    self.shared.scan(all, after, upto, limit, |_| true).await
                }
                Some(t) => self.shared.read_topics(after, upto, limit, t).await,
            }
        })
    }

    fn read_channel(
        &self,
        channel: String,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            let filter = self.shared.names.channel_filter(&channel);
            self.shared
                .scan(filter, after, upto, limit, |r| r.channel() == channel)
                .await
        })
    }

    fn read_channel_back(
        &self,
        channel: String,
        before: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move { self.shared.read_back(&channel, before, limit).await })
    }

    fn find_id(&self, id: String) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(async move { self.shared.find_id(&id).await })
    }

    fn last(&self) -> BoxFuture<'_, Result<Option<Record>, LogError>> {
        Box::pin(async move {
            let all = self.shared.names.stream_subjects();
            self.shared.last_of(&all).await
        })
    }

    fn channel_top(
        &self,
        channel: String,
        upto: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(async move {
            let kept = self
                .shared
                .read_back(&channel, upto.saturating_add(1), 1)
                .await?
                .first()
                .map(|r| r.seq);
            let removed = Some(self.shared.channel_pruned_upto(&channel).await?)
                .filter(|&p| p > 0 && p <= upto);
            Ok(kept.max(removed))
        })
    }

    fn channel_pruned_upto(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move { self.shared.channel_pruned_upto(&channel).await })
    }

    fn remove_channel(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let result = self.shared.remove_channel(&channel).await;
            self.shared.note(result.as_ref().err());
            result
        })
    }

    fn trim_channel(&self, channel: String, upto: u64) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let result = self.shared.trim_channel(&channel, upto).await;
            self.shared.note(result.as_ref().err());
            result
        })
    }

    fn epoch(&self) -> String {
        self.shared.epoch()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move { self.shared.health().await })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            // Leaves of the connections that just closed are queued: let them reach NATS.
            self.presence.flush(self.shared.op_timeout).await;
            self.shared.stop.cancel();
            within(self.shared.op_timeout, "flush", self.shared.client.flush()).await
        })
    }
}

#[cfg(test)]
mod tests;
