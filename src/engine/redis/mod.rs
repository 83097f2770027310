//! The Redis engine: several Herald nodes on one Redis behave as one server.
//!
//! Redis holds what must be the same everywhere: the position counter and the epoch, the log and its
//! per-channel indexes, publisher ids, retention marks and presence. A Lua script appends each record
//! (position, storage, the channel's count retention, publication on the feed, all at once), so a
//! publication has one position on every node; every node, the publishing one included, dispatches it
//! from its [`feed`], which fills from the log whatever pub/sub did not bring. The key layout and the
//! scripts are in [`scripts`], the wire shapes in [`codec`], presence in [`presence`].
//!
//! What "acknowledged" means here (docs/USAGE.md says it for operators): `append` returns `Ok` once
//! Redis has run the script and answered, so the record is in Redis's memory and, with `appendonly yes`,
//! written to the AOF file before the answer (`appendfsync always`: fsync'd; `everysec`: fsync'd within
//! about a second). Replication to replicas is asynchronous.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::ConnectionManager;
use ::redis::{RedisError, RedisResult, Value};
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Engine, Feed};
use crate::hub::ClientInfo;
use crate::log::{LogError, Record, Retention};

mod codec;
mod feed;
mod presence;
mod scripts;

pub use presence::RedisPresence;
use scripts::Scripts;

/// Records one append may remove from its channel beyond the steady one-for-one (a lowered `max_count`
/// is caught up by the periodic pass instead of by one long script).
const APPEND_TRIM_CAP: u64 = 100;
/// Records one retention or removal script removes before it yields to other clients.
const STEP_CAP: u64 = 1000;

pub(super) const FEED_NONE: u8 = 0;
pub(super) const FEED_UP: u8 = 1;
pub(super) const FEED_DOWN: u8 = 2;

/// How to reach Redis and what to keep there (from `[engine]` and the retention rules).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub prefix: String,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub presence_ttl: Duration,
    pub retention: Retention,
    /// How often the age-retention pass runs (one node at a time).
    pub prune_interval: Duration,
}

/// What the engine, its feed task and its presence writer share.
pub(super) struct Shared {
    client: ::redis::Client,
    conn: ConnectionManager,
    /// Every key starts with it: `<engine.prefix>:`.
    prefix: String,
    /// The URL with any password hidden, for messages.
    url: String,
    connect_timeout: Duration,
    op_timeout: Duration,
    scripts: Scripts,
    retention: Retention,
    epoch: RwLock<String>,
    /// The highest seq this node has seen (appended or delivered): after Redis lost data, the counter is
    /// raised above it so no position is given twice.
    seen: AtomicU64,
    /// False after a write failed, until a write succeeds: `/readyz` reports it.
    writes_ok: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// FEED_NONE until the hub takes the feed, then FEED_UP or FEED_DOWN.
    feed_state: AtomicU8,
    shutdown: CancellationToken,
    /// This process, for the retention lease.
    node: String,
}

impl Shared {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn error(&self, e: RedisError) -> LogError {
        LogError::Storage(format!("Redis at {}: {e}", self.url))
    }

    /// Runs one Redis call within `engine.op_timeout`.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, LogError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn query(&self, cmd: &::redis::Cmd) -> Result<Value, LogError> {
        let mut conn = self.conn.clone();
        self.call(cmd.query_async(&mut conn)).await
    }

    /// Runs a pipeline; when Redis lost its scripts (NOSCRIPT) and `retry`, loads them and runs it again.
    async fn pipeline(&self, pipe: &::redis::Pipeline, retry: bool) -> Result<Value, LogError> {
        let mut conn = self.conn.clone();
        let first =
            tokio::time::timeout(self.op_timeout, pipe.query_async::<Value>(&mut conn)).await;
        match first {
            Ok(Err(e)) if retry && is_noscript(&e) => {
                self.load_scripts().await?;
                self.call(pipe.query_async(&mut conn)).await
            }
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> LogError {
        LogError::Storage(format!(
            "Redis at {} did not answer within {:?} (engine.op_timeout)",
            self.url, self.op_timeout
        ))
    }

    async fn eval(&self, script: &::redis::Script, args: &[&[u8]]) -> Result<Value, LogError> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.prefix.as_bytes());
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.call(inv.invoke_async(&mut conn)).await
    }

    /// Loads every script (after a Redis restart its script cache is empty).
    async fn load_scripts(&self) -> Result<(), LogError> {
        let mut conn = self.conn.clone();
        for s in self.scripts.all() {
            self.call(s.load_async(&mut conn)).await?;
        }
        Ok(())
    }

    /// Makes sure the history has an epoch and the counter is at least `floor` (see the INIT script);
    /// adopts the epoch Redis has. Returns it with the counter.
    async fn ensure_epoch(&self, floor: u64) -> Result<(String, u64), LogError> {
        let known = self.epoch.read().clone();
        let fresh = new_epoch();
        let v = self
            .eval(
                &self.scripts.init,
                &[
                    known.as_bytes(),
                    floor.to_string().as_bytes(),
                    fresh.as_bytes(),
                ],
            )
            .await?;
        let mut parts = codec::array(v)?.into_iter();
        let (Some(epoch), Some(counter)) = (
            parts.next().and_then(codec::text),
            parts.next().and_then(codec::number),
        ) else {
            return Err(LogError::Storage(
                "unexpected reply to the epoch check".into(),
            ));
        };
        if epoch != known {
            if !known.is_empty() {
                tracing::warn!(
                    url = %self.url,
                    old = %known,
                    new = %epoch,
                    "Redis lost its data: history starts again under a new epoch"
                );
            }
            *self.epoch.write() = epoch.clone();
        }
        Ok((epoch, counter))
    }

    /// The epoch (`None`: missing) and the counter, in one round trip.
    async fn counter(&self) -> Result<(Option<String>, u64), LogError> {
        let mut pipe = ::redis::pipe();
        pipe.cmd("GET").arg(self.key("epoch"));
        pipe.cmd("GET").arg(self.key("seq"));
        let mut parts = codec::array(self.pipeline(&pipe, false).await?)?.into_iter();
        let epoch = parts.next().and_then(codec::text);
        let counter = parts.next().and_then(codec::number).unwrap_or(0);
        Ok((epoch, counter))
    }

    /// Log records with `after < seq <= upto` (at most `limit`), and `pruned_max` read after them, so a
    /// record missing from the page because retention removed it is covered by the value.
    async fn read_log(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, u64), LogError> {
        let mut pipe = ::redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.key("log"))
            .arg(after.saturating_add(1))
            .arg(upto)
            .arg("COUNT")
            .arg(limit.min(i64::MAX as usize));
        pipe.cmd("GET").arg(self.key("pruned_max"));
        let mut parts = codec::array(self.pipeline(&pipe, false).await?)?.into_iter();
        let records = codec::entries(parts.next().unwrap_or(Value::Nil))?;
        let pruned_max = parts.next().and_then(codec::number).unwrap_or(0);
        Ok((records, pruned_max))
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
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript)
}

fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// `url` with the password (if any) replaced, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => format!("{}***@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Outcome of one pipelined append.
enum Attempt {
    Done(Vec<(u64, String)>),
    /// Nothing was written: the epoch changed, or Redis lost its scripts. Fix and try again.
    Again {
        epoch: bool,
        load: bool,
    },
}

pub struct RedisEngine {
    shared: Arc<Shared>,
    presence: Arc<RedisPresence>,
}

impl RedisEngine {
    /// Connects (waiting up to `connect_timeout`, then failing with a message naming the URL), makes
    /// sure the history has an epoch, and starts presence and the retention pass.
    pub async fn open(o: RedisOptions) -> Result<RedisEngine, LogError> {
        let url = redact(&o.url);
        let client = ::redis::Client::open(o.url.as_str()).map_err(|e| {
            LogError::Storage(format!("engine.url {url:?} is not a Redis URL: {e}"))
        })?;
        let deadline = Instant::now() + o.connect_timeout;
        let mut last = String::from("timed out");
        let conn = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LogError::Storage(format!(
                    "cannot reach Redis at {url} (engine.url) within {:?} (engine.connect_timeout): {last}",
                    o.connect_timeout
                )));
            }
            let config = ::redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(left.min(o.op_timeout)))
                .set_response_timeout(Some(o.op_timeout))
                .set_number_of_retries(0)
                .set_max_delay(Duration::from_secs(1));
            match tokio::time::timeout(
                left,
                ConnectionManager::new_with_config(client.clone(), config),
            )
            .await
            {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) => {
                    last = e.to_string();
                    tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                }
                Err(_) => last = "timed out".into(),
            }
        };
        // From here on a lost connection is retried (with backoff) on the next call.
        let conn = {
            let config = ::redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(o.connect_timeout.min(o.op_timeout)))
                .set_response_timeout(Some(o.op_timeout))
                .set_number_of_retries(4)
                .set_max_delay(Duration::from_secs(1));
            drop(conn);
            ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map_err(|e| {
                    LogError::Storage(format!("cannot reach Redis at {url} (engine.url): {e}"))
                })?
        };
        let prefix = if o.prefix.is_empty() {
            String::new()
        } else {
            format!("{}:", o.prefix)
        };
        let shared = Arc::new(Shared {
            client,
            conn,
            prefix,
            url,
            connect_timeout: o.connect_timeout,
            op_timeout: o.op_timeout,
            scripts: Scripts::new(),
            retention: o.retention,
            epoch: RwLock::new(String::new()),
            seen: AtomicU64::new(0),
            writes_ok: AtomicBool::new(true),
            last_error: Mutex::new(None),
            feed_state: AtomicU8::new(FEED_NONE),
            shutdown: CancellationToken::new(),
            node: uuid::Uuid::new_v4().simple().to_string(),
        });
        shared.load_scripts().await?;
        let (epoch, counter) = shared.ensure_epoch(0).await?;
        tracing::info!(url = %shared.url, prefix = %o.prefix, %epoch, counter, "Redis engine connected");
        tokio::spawn(retention_loop(shared.clone(), o.prune_interval));
        let presence = RedisPresence::start(shared.clone(), o.presence_ttl);
        Ok(RedisEngine { shared, presence })
    }

    async fn try_append(&self, batch: &[Record]) -> Result<Attempt, LogError> {
        let shared = &self.shared;
        let epoch = shared.epoch.read().clone();
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for r in batch {
            let channel = r.channel();
            let mut alternates: Vec<&str> = Vec::new();
            for t in r.topics.iter().skip(1) {
                if t != channel && !alternates.contains(&t.as_str()) {
                    alternates.push(t);
                }
            }
            let alternates_json = if alternates.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&alternates).map_err(|e| LogError::Storage(e.to_string()))?
            };
            let max_count = shared
                .retention
                .rule_for(channel)
                .and_then(|rule| rule.max_count)
                .map(|n| n.to_string())
                .unwrap_or_default();
            pipe.cmd("EVALSHA")
                .arg(shared.scripts.append.get_hash())
                .arg(0)
                .arg(&shared.prefix)
                .arg(&epoch)
                .arg(channel)
                .arg(&r.id)
                .arg(codec::meta(r)?)
                .arg(&r.data[..])
                .arg(r.time_ms)
                .arg(max_count)
                .arg(APPEND_TRIM_CAP)
                .arg(alternates_json)
                .arg(alternates);
        }
        let mut conn = shared.conn.clone();
        let replies: Vec<RedisResult<Value>> = shared.call(pipe.query_async(&mut conn)).await?;
        let mut done = Vec::with_capacity(batch.len());
        let (mut epoch_changed, mut noscript, mut failed) = (false, false, None);
        for reply in replies {
            match reply {
                Ok(v) => {
                    let mut parts = codec::array(v)?.into_iter();
                    match (
                        parts.next().and_then(codec::number),
                        parts.next().and_then(codec::text),
                    ) {
                        (Some(seq), Some(id)) if seq > 0 => done.push((seq, id)),
                        _ => return Err(LogError::Storage("unexpected reply to an append".into())),
                    }
                }
                Err(e) if is_noscript(&e) => noscript = true,
                Err(e) if e.code() == Some("HERALD_EPOCH") => epoch_changed = true,
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(shared.error(e));
        }
        if done.len() == batch.len() {
            return Ok(Attempt::Done(done));
        }
        if done.is_empty() {
            return Ok(Attempt::Again {
                epoch: epoch_changed,
                load: noscript,
            });
        }
        Err(LogError::Storage(format!(
            "Redis at {} appended {} of {} publications of a batch (its scripts or epoch changed \
             meanwhile); the batch is refused",
            shared.url,
            done.len(),
            batch.len()
        )))
    }

    async fn append_batch(&self, mut batch: Vec<Record>) -> Result<Vec<Record>, LogError> {
        for _ in 0..3 {
            match self.try_append(&batch).await? {
                Attempt::Done(assigned) => {
                    for (r, (seq, id)) in batch.iter_mut().zip(assigned) {
                        r.seq = seq;
                        r.id = id;
                        self.shared.seen.fetch_max(seq, Ordering::AcqRel);
                    }
                    return Ok(batch);
                }
                Attempt::Again { epoch, load } => {
                    if load {
                        self.shared.load_scripts().await?;
                    }
                    if epoch {
                        let floor = self.shared.seen.load(Ordering::Acquire);
                        self.shared.ensure_epoch(floor).await?;
                    }
                }
            }
        }
        Err(LogError::Storage(format!(
            "Redis at {} kept refusing the append (epoch or scripts changing)",
            self.shared.url
        )))
    }

    /// Runs the READ script: `mode` f/b/t, a range and names (see scripts.rs).
    async fn read_index(
        &self,
        mode: &str,
        start: String,
        end: String,
        limit: usize,
        names: &[String],
    ) -> Result<Vec<Record>, LogError> {
        let limit = limit.min(i64::MAX as usize).to_string();
        let mut args: Vec<&[u8]> = vec![
            mode.as_bytes(),
            start.as_bytes(),
            end.as_bytes(),
            limit.as_bytes(),
        ];
        args.extend(names.iter().map(|n| n.as_bytes()));
        let v = self.shared.eval(&self.shared.scripts.read, &args).await?;
        codec::entries(v)
    }
}

impl Engine for RedisEngine {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.append_batch(batch).await;
            metrics::histogram!("herald_log_append_seconds")
                .record(started.elapsed().as_secs_f64());
            self.shared.note(result.as_ref().err());
            result
        })
    }

    fn broadcast(&self, record: Record) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            let epoch = self.shared.epoch.read().clone();
            let message = codec::publication_message(&epoch, &record)?;
            let cmd = ::redis::cmd("PUBLISH")
                .arg(self.shared.key("feed"))
                .arg(message)
                .to_owned();
            self.shared.query(&cmd).await.map(|_| ())
        })
    }

    fn presence(&self) -> Option<Arc<dyn crate::presence::PresenceStore>> {
        Some(self.presence.clone())
    }

    fn announce(&self, channel: &str, info: &ClientInfo, joined: bool) {
        match codec::presence_message(channel, info, joined) {
            Ok(m) => self.presence.queue(presence::Op::Publish(m)),
            Err(e) => tracing::warn!(error = %e, "cannot encode a join or leave"),
        }
    }

    fn control(
        &self,
        user: String,
        client: Option<String>,
        payload: bytes::Bytes,
    ) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            let message = codec::control_message(user, client, &payload)?;
            let cmd = ::redis::cmd("PUBLISH")
                .arg(self.shared.key("feed"))
                .arg(message)
                .to_owned();
            self.shared.query(&cmd).await.map(|_| ())
        })
    }

    fn feed(&self, after: u64) -> Option<Feed> {
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
            if limit == 0 || after >= upto {
                return Ok(Vec::new());
            }
            match topics {
                None => Ok(self.shared.read_log(after, upto, limit).await?.0),
                Some(t) if t.is_empty() => Ok(Vec::new()),
                Some(t) => {
                    self.read_index("t", (after + 1).to_string(), upto.to_string(), limit, &t)
                        .await
                }
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
            if limit == 0 || after >= upto {
                return Ok(Vec::new());
            }
            self.read_index(
                "f",
                (after + 1).to_string(),
                upto.to_string(),
                limit,
                &[channel],
            )
            .await
        })
    }

    fn read_channel_back(
        &self,
        channel: String,
        before: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            if limit == 0 || before <= 1 {
                return Ok(Vec::new());
            }
            self.read_index("b", "-".into(), (before - 1).to_string(), limit, &[channel])
                .await
        })
    }

    fn find_id(&self, id: String) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(async move {
            if let Some((epoch, seq)) = crate::log::parse_generated_id(&id) {
                if epoch != *self.shared.epoch.read() || seq == 0 {
                    return Ok(None);
                }
                let (found, _) = self.shared.read_log(seq - 1, seq, 1).await?;
                return Ok(found.first().map(|r| r.seq));
            }
            let cmd = ::redis::cmd("HGET")
                .arg(self.shared.key("ids"))
                .arg(&id)
                .to_owned();
            let seq = codec::number(self.shared.query(&cmd).await?).unwrap_or(0);
            Ok((seq > 0).then_some(seq))
        })
    }

    fn last(&self) -> BoxFuture<'_, Result<Option<Record>, LogError>> {
        Box::pin(async move {
            let cmd = ::redis::cmd("XREVRANGE")
                .arg(self.shared.key("log"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .to_owned();
            Ok(codec::entries(self.shared.query(&cmd).await?)?
                .into_iter()
                .next())
        })
    }

    fn channel_top(
        &self,
        channel: String,
        upto: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(async move {
            let mut pipe = ::redis::pipe();
            pipe.cmd("XREVRANGE")
                .arg(format!("{}c:{channel}", self.shared.prefix))
                .arg(upto)
                .arg("-")
                .arg("COUNT")
                .arg(1);
            pipe.cmd("HGET")
                .arg(self.shared.key("pruned"))
                .arg(&channel);
            let mut parts = codec::array(self.shared.pipeline(&pipe, false).await?)?.into_iter();
            let kept = codec::array(parts.next().unwrap_or(Value::Nil))?
                .into_iter()
                .next()
                .and_then(|e| codec::array(e).ok()?.into_iter().next())
                .and_then(codec::text)
                .and_then(|id| codec::entry_seq(id.as_bytes()));
            let removed = parts
                .next()
                .and_then(codec::number)
                .filter(|&p| p > 0 && p <= upto);
            Ok(kept.max(removed))
        })
    }

    fn channel_pruned_upto(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let cmd = ::redis::cmd("HGET")
                .arg(self.shared.key("pruned"))
                .arg(&channel)
                .to_owned();
            Ok(codec::number(self.shared.query(&cmd).await?).unwrap_or(0))
        })
    }

    fn remove_channel(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let cap = STEP_CAP.to_string();
            let mut removed = 0u64;
            // Bounded steps, so one long channel does not hold Redis for long; bounded in number too.
            for _ in 0..1_000_000 {
                let v = self
                    .shared
                    .eval(
                        &self.shared.scripts.remove,
                        &[channel.as_bytes(), cap.as_bytes()],
                    )
                    .await;
                self.shared.note(v.as_ref().err());
                let mut parts = codec::array(v?)?.into_iter();
                let n = parts.next().and_then(codec::number).unwrap_or(0);
                let left = parts.next().and_then(codec::number).unwrap_or(0);
                removed += n;
                if left == 0 || n == 0 {
                    break;
                }
            }
            Ok(removed)
        })
    }

    fn trim_channel(&self, channel: String, upto: u64) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let cap = STEP_CAP.to_string();
            let upto = upto.to_string();
            let mut removed = 0u64;
            // Bounded steps, as for `remove_channel`: a long document history does not hold Redis.
            for _ in 0..1_000_000 {
                let v = self
                    .shared
                    .eval(
                        &self.shared.scripts.trim_upto,
                        &[channel.as_bytes(), upto.as_bytes(), cap.as_bytes()],
                    )
                    .await;
                self.shared.note(v.as_ref().err());
                let mut parts = codec::array(v?)?.into_iter();
                let n = parts.next().and_then(codec::number).unwrap_or(0);
                let more = parts.next().and_then(codec::number).unwrap_or(0);
                removed += n;
                if more == 0 || n == 0 {
                    break;
                }
            }
            Ok(removed)
        })
    }

    fn epoch(&self) -> String {
        self.shared.epoch.read().clone()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            let s = &self.shared;
            s.query(&::redis::cmd("PING")).await?;
            if s.feed_state.load(Ordering::Acquire) == FEED_DOWN {
                return Err(LogError::Storage(format!(
                    "the feed from Redis at {} is down (reconnecting)",
                    s.url
                )));
            }
            if !s.writes_ok.load(Ordering::Acquire) {
                // A write proves Redis takes writes again (not read-only, not out of memory).
                let probe = ::redis::cmd("SET")
                    .arg(s.key(&format!("probe:{}", s.node)))
                    .arg(1)
                    .arg("PX")
                    .arg(60_000)
                    .to_owned();
                if let Err(e) = s.query(&probe).await {
                    let last = s.last_error.lock().clone().unwrap_or_default();
                    return Err(LogError::Storage(format!(
                        "the last write failed: {last}; a probe write too: {e}"
                    )));
                }
                s.note(None);
            }
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            self.presence.close(self.shared.op_timeout).await;
            self.shared.shutdown.cancel();
            Ok(())
        })
    }
}

/// Age (and count) retention for every channel with a rule, one bounded step at a time, run by one node
/// at a time (a lease in Redis), every `interval`.
async fn retention_loop(shared: Arc<Shared>, interval: Duration) {
    if shared.retention.rules.is_empty() {
        return;
    }
    let interval = interval.max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match retention_pass(&shared, interval).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "retention applied"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}

async fn retention_pass(shared: &Shared, interval: Duration) -> Result<u64, LogError> {
    let lease = ::redis::cmd("SET")
        .arg(shared.key("retention_lease"))
        .arg(&shared.node)
        .arg("NX")
        .arg("PX")
        .arg(interval.as_millis().max(1) as u64)
        .to_owned();
    if matches!(shared.query(&lease).await?, Value::Nil) {
        return Ok(0); // another node runs this pass
    }
    let cap = STEP_CAP.to_string();
    let mut removed = 0;
    let mut cursor = 0u64;
    for _ in 0..1_000_000 {
        let scan = ::redis::cmd("SSCAN")
            .arg(shared.key("channels"))
            .arg(cursor)
            .arg("COUNT")
            .arg(100)
            .to_owned();
        let mut parts = codec::array(shared.query(&scan).await?)?.into_iter();
        cursor = parts.next().and_then(codec::number).unwrap_or(0);
        let channels = codec::array(parts.next().unwrap_or(Value::Nil))?;
        for channel in channels.into_iter().filter_map(codec::text) {
            let Some(rule) = shared.retention.rule_for(&channel) else {
                continue;
            };
            let cutoff = rule
                .max_age
                .map(|age| (crate::hub::now_ms() - age.as_millis() as i64).to_string());
            if rule.max_count.is_none() && cutoff.is_none() {
                continue;
            }
            let count = rule.max_count.map(|n| n.to_string()).unwrap_or_default();
            let cutoff = cutoff.unwrap_or_default();
            for _ in 0..1000 {
                let v = shared
                    .eval(
                        &shared.scripts.trim,
                        &[
                            channel.as_bytes(),
                            count.as_bytes(),
                            cutoff.as_bytes(),
                            cap.as_bytes(),
                        ],
                    )
                    .await?;
                let n = codec::number(v).unwrap_or(0);
                removed += n;
                if n < STEP_CAP {
                    break;
                }
            }
        }
        if cursor == 0 {
            break;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    /// Start-up fails fast, naming the URL, when nothing listens there.
    #[tokio::test]
    async fn unreachable_redis_fails_with_the_url() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("redis://127.0.0.1:{port}");
        let started = Instant::now();
        let err = RedisEngine::open(RedisOptions {
            url: url.clone(),
            prefix: "t".into(),
            connect_timeout: Duration::from_millis(500),
            op_timeout: Duration::from_millis(500),
            presence_ttl: Duration::from_secs(5),
            retention: Retention::default(),
            prune_interval: Duration::from_secs(60),
        })
        .await
        .err()
        .expect("no Redis there");
        assert!(err.to_string().contains(&url), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
