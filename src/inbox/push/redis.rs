//! Push subscriptions and the VAPID key in Redis, for a cluster on the Redis engine: a browser subscribes
//! through one node and the push for a notify on any other node must find it, signed with the key the
//! browser was given.
//!
//! Why it is built this way:
//! - **Each operation is one Lua script.** Moving an endpoint to another user touches the old owner's set,
//!   the new owner's set and the endpoint's record; the cap removes from all three. Run as one script,
//!   two nodes registering the same browser at once leave it with exactly one owner, and a reader never
//!   sees an endpoint listed by a user who no longer holds it.
//! - **Oldest first is registration order,** from a counter, not the clock: nodes' clocks differ, and the
//!   cap must remove the same subscriptions whichever node took the registration.
//! - **One VAPID key for the cluster** ([`shared_vapid`](super::vapid::shared_vapid)): browsers bind a subscription to the public
//!   key, so a node signing with another key would be refused by every push service. The first node
//!   stores its key in Redis (`SET NX`, so two first nodes agree on one); the others copy it to their key
//!   file, which keeps a node able to start with the key it had, and a file that differs from Redis stops
//!   the start rather than silently orphaning subscriptions.
//!
//! Layout, under the inbox prefix `P` (`<engine.prefix>:inbox` unless configured):
//! - `P:push:owner`: a hash, endpoint -> user.
//! - `P:push:keys`: a hash, endpoint -> `{"p256dh":..,"auth":..,"created_at":..}`.
//! - `P:push:u:<user>`: the user's endpoints, a sorted set scored by registration order.
//! - `P:push:seq`: the registration counter.
//! - `P:push:vapid`: the cluster's VAPID private key, PKCS#8 PEM.
//! - `P:push:due`: the pending pushes, a sorted set of `<event id>\n<endpoint>` scored by the time (ms,
//!   Redis's clock) each is due: now when recorded, the end of the lease while claimed, the retry time
//!   after a 429 or 5xx.
//! - `P:push:job`: a hash, pending push -> `<user>\n<category>\n<payload>` (neither a user id nor a
//!   category has a control character); `P:push:tries`, pending push -> attempts made.
//!
//! A pending push does not follow its subscription: removing one leaves its pushes to be found gone
//! when they are sent (one lookup the sender does anyway), which keeps the subscription scripts as they
//! were and a removal cheap.

use std::collections::HashSet;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::Value;
use serde::{Deserialize, Serialize};

use super::vapid;
use super::{Due, PushError, PushJob, PushStore, Recorded, Subscription};
use crate::engine::BoxFuture;
use crate::inbox::redis::redact;

/// The scripts share this prelude: the prefix is `ARGV[1]`, every key is built from it (so, like the
/// inbox store, one Redis server or a primary with replicas, not a sharded Redis Cluster).
const PRELUDE: &str = r"
local P = ARGV[1]
local owners, keys = P .. ':push:owner', P .. ':push:keys'
local function forget(user, ep)
  redis.call('ZREM', P .. ':push:u:' .. user, ep)
  redis.call('HDEL', owners, ep)
  redis.call('HDEL', keys, ep)
end
";

/// ARGV: P, user, endpoint, record, max. Moves the endpoint from its previous owner, makes it the user's
/// newest, and removes the user's oldest beyond max.
const ADD: &str = r"
local user, ep, rec, max = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local old = redis.call('HGET', owners, ep)
if old and old ~= user then redis.call('ZREM', P .. ':push:u:' .. old, ep) end
local seq = redis.call('INCR', P .. ':push:seq')
redis.call('HSET', owners, ep, user)
redis.call('HSET', keys, ep, rec)
local z = P .. ':push:u:' .. user
redis.call('ZADD', z, seq, ep)
local n = redis.call('ZCARD', z)
if n > max then
  for _, e in ipairs(redis.call('ZRANGE', z, 0, n - max - 1)) do forget(user, e) end
end
return n
";

/// ARGV: P, user, endpoint. 1 when the user held it.
const REMOVE: &str = r"
local user, ep = ARGV[2], ARGV[3]
if redis.call('HGET', owners, ep) ~= user then return 0 end
forget(user, ep)
return 1
";

/// ARGV: P, endpoint. 1 when someone held it.
const REMOVE_ENDPOINT: &str = r"
local ep = ARGV[2]
local user = redis.call('HGET', owners, ep)
if not user then return 0 end
forget(user, ep)
return 1
";

/// ARGV: P, user. `endpoint, record, ...`, oldest first (read in one step, so never half of a move).
const LIST: &str = r"
local out = {}
for _, ep in ipairs(redis.call('ZRANGE', P .. ':push:u:' .. ARGV[2], 0, -1)) do
  local rec = redis.call('HGET', keys, ep)
  if rec then
    out[#out + 1] = ep
    out[#out + 1] = rec
  end
end
return out
";

/// Redis's clock in ms, for due times every node agrees on.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due, jobs, tries = P .. ':push:due', P .. ':push:job', P .. ':push:tries'
";

/// ARGV: P, max, then (key, user, category, payload) per job. `{recorded, dropped}`.
const RECORD: &str = r"
local max = tonumber(ARGV[2])
local n = redis.call('ZCARD', due)
local rec, drop = 0, 0
for i = 3, #ARGV, 4 do
  local key, user = ARGV[i], ARGV[i + 1]
  local body = user .. '\n' .. ARGV[i + 2] .. '\n' .. ARGV[i + 3]
  for _, ep in ipairs(redis.call('ZRANGE', P .. ':push:u:' .. user, 0, -1)) do
    local id = key .. '\n' .. ep
    if redis.call('HEXISTS', jobs, id) == 0 then
      if n >= max then
        drop = drop + 1
      else
        redis.call('HSET', jobs, id, body)
        redis.call('ZADD', due, now, id)
        n = n + 1
        rec = rec + 1
      end
    end
  end
end
return {rec, drop}
";

/// ARGV: P, limit, lease (ms). `id, record, attempts, ...` of the claimed pushes.
const CLAIM: &str = r"
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local rec = redis.call('HGET', jobs, id)
  if rec then
    redis.call('ZADD', due, now + tonumber(ARGV[3]), id)
    out[#out + 1] = id
    out[#out + 1] = rec
    out[#out + 1] = redis.call('HGET', tries, id) or '0'
  else
    redis.call('ZREM', due, id)
  end
end
return out
";

/// ARGV: P, id.
const FINISH: &str = r"
redis.call('ZREM', due, ARGV[2])
redis.call('HDEL', jobs, ARGV[2])
redis.call('HDEL', tries, ARGV[2])
return 1
";

/// ARGV: P, id, after (ms), attempts.
const RETRY: &str = r"
if redis.call('HEXISTS', jobs, ARGV[2]) == 0 then return 0 end
redis.call('ZADD', due, now + tonumber(ARGV[3]), ARGV[2])
redis.call('HSET', tries, ARGV[2], ARGV[4])
return 1
";

/// ARGV: P. `{ms until the first due push (0 if due), count}`, or `{-1, 0}` when none is pending.
const NEXT_DUE: &str = r"
local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
if #first == 0 then return {-1, 0} end
local wait = tonumber(first[2]) - now
if wait < 0 then wait = 0 end
return {wait, redis.call('ZCARD', due)}
";

/// ARGV: P, users... The users among them with a subscription.
const SUBSCRIBED: &str = r"
local out = {}
for i = 2, #ARGV do
  if redis.call('EXISTS', P .. ':push:u:' .. ARGV[i]) == 1 then out[#out + 1] = ARGV[i] end
end
return out
";

/// What is kept per endpoint besides its owner.
#[derive(Serialize, Deserialize)]
struct Record {
    p256dh: String,
    auth: String,
    created_at: i64,
}

pub struct RedisPushStore {
    conn: ConnectionManager,
    prefix: String,
    url: String,
    op_timeout: Duration,
    add: ::redis::Script,
    remove: ::redis::Script,
    remove_endpoint: ::redis::Script,
    list: ::redis::Script,
    subscribed: ::redis::Script,
    record: ::redis::Script,
    claim: ::redis::Script,
    finish: ::redis::Script,
    retry: ::redis::Script,
    next_due: ::redis::Script,
}

impl RedisPushStore {
    /// Connects within `connect_timeout`; every later command is bounded by `op_timeout`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        connect_timeout: Duration,
        op_timeout: Duration,
    ) -> Result<RedisPushStore, PushError> {
        let shown = redact(url);
        let client = ::redis::Client::open(url)
            .map_err(|e| PushError::Storage(format!("{shown:?} is not a Redis URL: {e}")))?;
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout.min(op_timeout)))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(4)
            .set_max_delay(Duration::from_secs(1));
        let conn = tokio::time::timeout(
            connect_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| {
            PushError::Storage(format!(
                "cannot reach Redis at {shown} within {connect_timeout:?} (engine.connect_timeout)"
            ))
        })?
        .map_err(|e| PushError::Storage(format!("cannot reach Redis at {shown}: {e}")))?;
        let s = |body: &str| ::redis::Script::new(&format!("{PRELUDE}{body}"));
        Ok(RedisPushStore {
            conn,
            prefix: prefix.to_string(),
            url: shown,
            op_timeout,
            add: s(ADD),
            remove: s(REMOVE),
            remove_endpoint: s(REMOVE_ENDPOINT),
            list: s(LIST),
            subscribed: s(SUBSCRIBED),
            record: s(&format!("{NOW}{RECORD}")),
            claim: s(&format!("{NOW}{CLAIM}")),
            finish: s(&format!("{NOW}{FINISH}")),
            retry: s(&format!("{NOW}{RETRY}")),
            next_due: s(&format!("{NOW}{NEXT_DUE}")),
        })
    }

    /// The Redis key of the cluster's VAPID key (named in messages, so an operator can find it).
    pub fn vapid_key_name(&self) -> String {
        format!("{}:push:vapid", self.prefix)
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, ::redis::RedisError>>,
    ) -> Result<T, PushError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(|e| PushError::Storage(format!("Redis at {}: {e}", self.url))),
            Err(_) => Err(PushError::Storage(format!(
                "Redis at {} did not answer within {:?} (engine.op_timeout)",
                self.url, self.op_timeout
            ))),
        }
    }

    async fn eval(&self, script: &::redis::Script, args: &[&str]) -> Result<Value, PushError> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix);
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.bounded(inv.invoke_async::<Value>(&mut conn)).await
    }

    async fn flag(&self, script: &::redis::Script, args: &[&str]) -> Result<bool, PushError> {
        match self.eval(script, args).await? {
            Value::Int(n) => Ok(n > 0),
            other => Err(unexpected(other)),
        }
    }

    /// Who holds `endpoint` (tests and diagnostics).
    pub async fn owner(&self, endpoint: &str) -> Result<Option<String>, PushError> {
        let mut conn = self.conn.clone();
        let cmd = ::redis::cmd("HGET")
            .arg(format!("{}:push:owner", self.prefix))
            .arg(endpoint)
            .to_owned();
        self.bounded(cmd.query_async::<Option<String>>(&mut conn))
            .await
    }
}

/// The cluster's VAPID key lives in Redis (see the module notes and `vapid::shared_vapid`).
impl vapid::ClusterKey for RedisPushStore {
    const BACKEND: &'static str = "Redis";

    fn key_name(&self) -> String {
        self.vapid_key_name()
    }

    /// The cluster's key as Redis holds it, `None` when no node stored one yet.
    async fn stored(&self) -> Result<Option<String>, PushError> {
        let mut conn = self.conn.clone();
        let cmd = ::redis::cmd("GET").arg(self.vapid_key_name()).to_owned();
        self.bounded(cmd.query_async::<Option<String>>(&mut conn))
            .await
    }

    /// Stores `pem` unless a key is there; returns the key Redis holds afterwards (ours or the winner's).
    async fn offer(&self, pem: &str) -> Result<String, PushError> {
        let mut conn = self.conn.clone();
        let mut pipe = ::redis::pipe();
        pipe.cmd("SET")
            .arg(self.vapid_key_name())
            .arg(pem)
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(self.vapid_key_name());
        let (held,): (Option<String>,) = self.bounded(pipe.query_async(&mut conn)).await?;
        held.ok_or_else(|| {
            PushError::Storage(format!(
                "Redis did not keep the VAPID key at {}",
                self.vapid_key_name()
            ))
        })
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// A claimed push from its id (`key\nendpoint`), record (`user\ncategory\npayload`) and attempts.
fn due_of(id: String, rec: String, attempts: String) -> Result<Due, PushError> {
    let bad = || PushError::Storage(format!("the pending push {id:?} in Redis is not readable"));
    let (key, endpoint) = id.split_once('\n').ok_or_else(bad)?;
    let mut parts = rec.splitn(3, '\n');
    let (Some(user), Some(category), Some(payload)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok(Due {
        key: key.to_string(),
        endpoint: endpoint.to_string(),
        user: user.to_string(),
        category: category.to_string(),
        payload: payload.as_bytes().to_vec(),
        attempts: attempts.parse().unwrap_or(0),
        id,
    })
}

fn unexpected(v: Value) -> PushError {
    PushError::Storage(format!("unexpected reply from Redis: {v:?}"))
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

impl PushStore for RedisPushStore {
    fn add(
        &self,
        user: String,
        sub: Subscription,
        max: usize,
    ) -> BoxFuture<'_, Result<(), PushError>> {
        Box::pin(async move {
            let record = serde_json::to_string(&Record {
                p256dh: sub.p256dh,
                auth: sub.auth,
                created_at: sub.created_at,
            })
            .map_err(|e| PushError::Storage(e.to_string()))?;
            let max = max.to_string();
            self.eval(&self.add, &[&user, &sub.endpoint, &record, &max])
                .await
                .map(drop)
        })
    }

    fn remove(&self, user: String, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>> {
        Box::pin(async move { self.flag(&self.remove, &[&user, &endpoint]).await })
    }

    fn remove_endpoint(&self, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>> {
        Box::pin(async move { self.flag(&self.remove_endpoint, &[&endpoint]).await })
    }

    fn list(&self, user: String) -> BoxFuture<'_, Result<Vec<Subscription>, PushError>> {
        Box::pin(async move {
            let reply = match self.eval(&self.list, &[&user]).await? {
                Value::Array(a) => a,
                Value::Nil => Vec::new(),
                other => return Err(unexpected(other)),
            };
            let mut out = Vec::with_capacity(reply.len() / 2);
            let mut it = reply.into_iter();
            while let (Some(ep), Some(rec)) = (it.next(), it.next()) {
                let (Some(endpoint), Some(rec)) = (text(ep), text(rec)) else {
                    return Err(PushError::Storage(
                        "a push subscription in Redis is not text".into(),
                    ));
                };
                let r: Record = serde_json::from_str(&rec).map_err(|e| {
                    PushError::Storage(format!(
                        "the push subscription {endpoint:?} in Redis is not readable: {e}"
                    ))
                })?;
                out.push(Subscription {
                    endpoint,
                    p256dh: r.p256dh,
                    auth: r.auth,
                    created_at: r.created_at,
                });
            }
            Ok(out)
        })
    }

    fn subscribed(&self, users: Vec<String>) -> BoxFuture<'_, Result<HashSet<String>, PushError>> {
        Box::pin(async move {
            let mut out = HashSet::new();
            // Bounded arguments per script call, so one call never holds Redis for long.
            for chunk in users.chunks(1000) {
                let args: Vec<&str> = chunk.iter().map(String::as_str).collect();
                match self.eval(&self.subscribed, &args).await? {
                    Value::Array(a) => out.extend(a.into_iter().filter_map(text)),
                    Value::Nil => {}
                    other => return Err(unexpected(other)),
                }
            }
            Ok(out)
        })
    }

    fn record(&self, jobs: Vec<PushJob>, max: usize) -> BoxFuture<'_, Result<Recorded, PushError>> {
        Box::pin(async move {
            let mut out = Recorded::default();
            let max = max.to_string();
            for chunk in jobs.chunks(256) {
                let mut args: Vec<&str> = vec![&max];
                for j in chunk {
                    let payload = std::str::from_utf8(&j.payload)
                        .map_err(|_| PushError::Storage("a push payload is not text".into()))?;
                    args.extend([j.key.as_str(), &j.user, &j.category, payload]);
                }
                match self.eval(&self.record, &args).await? {
                    Value::Array(a) if a.len() == 2 => {
                        out.recorded += int(&a[0]).unwrap_or(0) as usize;
                        out.dropped += int(&a[1]).unwrap_or(0) as usize;
                    }
                    other => return Err(unexpected(other)),
                }
            }
            Ok(out)
        })
    }

    fn claim(&self, limit: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Due>, PushError>> {
        Box::pin(async move {
            let (limit, lease) = (limit.to_string(), lease.as_millis().to_string());
            let reply = match self.eval(&self.claim, &[&limit, &lease]).await? {
                Value::Array(a) => a,
                Value::Nil => Vec::new(),
                other => return Err(unexpected(other)),
            };
            let mut out = Vec::with_capacity(reply.len() / 3);
            let mut it = reply.into_iter();
            while let (Some(id), Some(rec), Some(n)) = (it.next(), it.next(), it.next()) {
                let (Some(id), Some(rec), Some(n)) = (text(id), text(rec), text(n)) else {
                    return Err(PushError::Storage(
                        "a pending push in Redis is not text".into(),
                    ));
                };
                out.push(due_of(id, rec, n)?);
            }
            Ok(out)
        })
    }

    fn finish(&self, id: String) -> BoxFuture<'_, Result<(), PushError>> {
        Box::pin(async move { self.eval(&self.finish, &[&id]).await.map(drop) })
    }

    fn retry(
        &self,
        id: String,
        after: Duration,
        attempts: u32,
    ) -> BoxFuture<'_, Result<(), PushError>> {
        Box::pin(async move {
            let (after, attempts) = (after.as_millis().to_string(), attempts.to_string());
            self.eval(&self.retry, &[&id, &after, &attempts])
                .await
                .map(drop)
        })
    }

    fn next_due(&self) -> BoxFuture<'_, Result<Option<Duration>, PushError>> {
        Box::pin(async move {
            match self.eval(&self.next_due, &[]).await? {
                Value::Array(a) if a.len() == 2 => Ok(int(&a[0])
                    .filter(|w| *w >= 0)
                    .map(|w| Duration::from_millis(w as u64))),
                other => Err(unexpected(other)),
            }
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, PushError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cmd = ::redis::cmd("ZCARD")
                .arg(format!("{}:push:due", self.prefix))
                .to_owned();
            self.bounded(cmd.query_async::<u64>(&mut conn)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::vapid::{read_key, shared_vapid, Vapid};
    use super::*;

    fn url() -> String {
        std::env::var("HERALD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// A prefix of the test's own, whose keys go when dropped.
    struct Prefix(String);

    impl Prefix {
        fn new() -> Prefix {
            Prefix(format!("unitpush{}", uuid::Uuid::new_v4().simple()))
        }
    }

    impl Drop for Prefix {
        fn drop(&mut self) {
            let Ok(client) = ::redis::Client::open(url()) else {
                return;
            };
            let Ok(mut conn) = client.get_connection() else {
                return;
            };
            let script =
                "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end";
            let _: ::redis::RedisResult<Value> = ::redis::cmd("EVAL")
                .arg(script)
                .arg(0)
                .arg(format!("{}:*", self.0))
                .query(&mut conn);
        }
    }

    async fn store(p: &Prefix) -> RedisPushStore {
        RedisPushStore::connect(&url(), &p.0, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .expect("the test Redis at 127.0.0.1:6379")
    }

    fn sub(endpoint: &str, at: i64) -> Subscription {
        Subscription {
            endpoint: endpoint.into(),
            p256dh: format!("k{at}"),
            auth: format!("a{at}"),
            created_at: at,
        }
    }

    fn endpoints(l: &[Subscription]) -> Vec<&str> {
        l.iter().map(|s| s.endpoint.as_str()).collect()
    }

    #[tokio::test]
    async fn limits_moves_and_removals() {
        let p = Prefix::new();
        let s = store(&p).await;
        // A second connection stands for another node.
        let other = store(&p).await;
        for i in 0..4 {
            let node = if i % 2 == 0 { &s } else { &other };
            node.add("alice".into(), sub(&format!("https://p/{i}"), 100 - i), 3)
                .await
                .unwrap();
        }
        let l = other.list("alice".into()).await.unwrap();
        assert_eq!(
            endpoints(&l),
            ["https://p/1", "https://p/2", "https://p/3"],
            "the oldest registration went, whatever the clocks said"
        );
        assert_eq!(l[0].p256dh, "k99");
        assert_eq!(l[0].auth, "a99");
        assert_eq!(l[0].created_at, 99);
        assert_eq!(s.owner("https://p/0").await.unwrap(), None);

        // Registering again makes it the newest.
        s.add("alice".into(), sub("https://p/1", 200), 3)
            .await
            .unwrap();
        let l = s.list("alice".into()).await.unwrap();
        assert_eq!(endpoints(&l), ["https://p/2", "https://p/3", "https://p/1"]);
        assert_eq!(l[2].created_at, 200);

        // The same browser registered by another user moves to them.
        other
            .add("bob".into(), sub("https://p/2", 10), 3)
            .await
            .unwrap();
        assert_eq!(
            s.owner("https://p/2").await.unwrap().as_deref(),
            Some("bob")
        );
        assert_eq!(
            endpoints(&s.list("alice".into()).await.unwrap()),
            ["https://p/3", "https://p/1"]
        );
        assert_eq!(
            endpoints(&s.list("bob".into()).await.unwrap()),
            ["https://p/2"]
        );

        assert!(!s
            .remove("alice".into(), "https://p/2".into())
            .await
            .unwrap());
        assert_eq!(s.list("bob".into()).await.unwrap().len(), 1, "not alice's");
        assert!(s.remove("bob".into(), "https://p/2".into()).await.unwrap());
        assert!(s.list("bob".into()).await.unwrap().is_empty());
        assert!(other.remove_endpoint("https://p/1".into()).await.unwrap());
        assert!(!other.remove_endpoint("https://p/1".into()).await.unwrap());
        assert_eq!(
            endpoints(&s.list("alice".into()).await.unwrap()),
            ["https://p/3"]
        );
        assert_eq!(s.owner("https://p/1").await.unwrap(), None);
        assert!(s.list("nobody".into()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_vapid_key_for_every_node() {
        let p = Prefix::new();
        let s = store(&p).await;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("a/vapid.pem"),
            dir.path().join("b/vapid.pem"),
        );

        // The first node makes the key and stores it; the second copies it to its file.
        let ka = shared_vapid(&s, &a).await.unwrap();
        let kb = shared_vapid(&s, &b).await.unwrap();
        assert_eq!(ka.public_key(), kb.public_key());
        assert_eq!(
            read_key(&b).unwrap().unwrap().public_key(),
            read_key(&a).unwrap().unwrap().public_key()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&b).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A restart with the file agrees with Redis.
        assert_eq!(
            shared_vapid(&s, &a).await.unwrap().public_key(),
            ka.public_key()
        );

        // A file with another key is refused, naming the file and the Redis key.
        let c = dir.path().join("c.pem");
        Vapid::load_or_create(&c).unwrap();
        let e = shared_vapid(&s, &c).await.unwrap_err().to_string();
        assert!(e.contains(&c.display().to_string()), "{e}");
        assert!(e.contains(&s.vapid_key_name()), "{e}");

        // With nothing in Redis yet, an existing file's key becomes the cluster's.
        let q = Prefix::new();
        let fresh = store(&q).await;
        let kc = shared_vapid(&fresh, &c).await.unwrap();
        assert_eq!(
            kc.public_key(),
            Vapid::load_or_create(&c).unwrap().public_key()
        );
        let d = dir.path().join("d.pem");
        assert_eq!(
            shared_vapid(&fresh, &d).await.unwrap().public_key(),
            kc.public_key()
        );
    }

    #[tokio::test]
    async fn nodes_starting_together_agree_on_one_key() {
        let p = Prefix::new();
        let s = store(&p).await;
        let dir = tempfile::tempdir().unwrap();
        let starts = (0..4).map(|i| {
            let path = dir.path().join(format!("n{i}.pem"));
            let s = &s;
            async move { shared_vapid(s, &path).await.unwrap() }
        });
        let keys = futures_util::future::join_all(starts).await;
        for k in &keys[1..] {
            assert_eq!(k.public_key(), keys[0].public_key());
        }
    }

    fn job(key: &str, user: &str) -> PushJob {
        PushJob {
            key: key.into(),
            user: user.into(),
            category: "news".into(),
            payload: format!("{{\"k\":\"{key}\"}}\n").into_bytes(),
        }
    }

    /// Pending pushes shared by two nodes: recorded once, bounded, and each claimed by exactly one of
    /// them, concurrently; a retry comes back when due, a finished push never.
    #[tokio::test]
    async fn pending_pushes_are_claimed_by_one_node_each() {
        let p = Prefix::new();
        let (a, b) = (store(&p).await, store(&p).await);
        for i in 0..3 {
            a.add("alice".into(), sub(&format!("https://p/a{i}"), i), 5)
                .await
                .unwrap();
        }
        b.add("bob".into(), sub("https://p/b", 9), 5).await.unwrap();
        let who = a
            .subscribed(vec!["alice".into(), "carol".into(), "bob".into()])
            .await
            .unwrap();
        assert_eq!(who, HashSet::from(["alice".to_string(), "bob".to_string()]));

        let jobs: Vec<PushJob> = (0..10).map(|i| job(&format!("e{i}"), "alice")).collect();
        let r = a.record(jobs.clone(), 25).await.unwrap();
        assert_eq!(
            r,
            Recorded {
                recorded: 25,
                dropped: 5
            }
        );
        let r = b.record(jobs, 100).await.unwrap();
        assert_eq!(r.recorded, 5, "only what was not recorded before");
        assert_eq!(a.pending().await.unwrap(), 30);

        let lease = Duration::from_secs(60);
        let (ca, cb) = tokio::join!(a.claim(20, lease), b.claim(20, lease));
        let (ca, cb) = (ca.unwrap(), cb.unwrap());
        assert_eq!(ca.len() + cb.len(), 30);
        let ids: HashSet<&str> = ca.iter().chain(&cb).map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), 30, "no push claimed twice");
        assert!(a.claim(20, lease).await.unwrap().is_empty());
        let d = &ca[0];
        assert_eq!(d.user, "alice");
        assert_eq!(d.category, "news");
        assert_eq!(d.payload, format!("{{\"k\":\"{}\"}}\n", d.key).into_bytes());
        assert!(d.endpoint.starts_with("https://p/a"));

        for d in ca.iter().chain(&cb).skip(1) {
            a.finish(d.id.clone()).await.unwrap();
        }
        b.retry(ca[0].id.clone(), Duration::ZERO, 2).await.unwrap();
        let back = a.claim(20, lease).await.unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].id.as_str(), back[0].attempts),
            (ca[0].id.as_str(), 2)
        );
        b.finish(back[0].id.clone()).await.unwrap();
        assert_eq!(a.pending().await.unwrap(), 0);
        assert_eq!(a.next_due().await.unwrap(), None);
    }
}
