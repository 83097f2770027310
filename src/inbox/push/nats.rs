//! Push subscriptions and the VAPID key in NATS JetStream, for a cluster on the NATS engine: a browser
//! subscribes through one node and the push for a notify on any other node must find it, signed with the
//! key the browser was given.
//!
//! Why it is built this way (2.9: one KV value is the unit of atomicity):
//! - **The owner entry is the authority.** `e.<endpoint token>` names the user an endpoint belongs to;
//!   `u.<user token>` lists the user's subscriptions in registration order (oldest first, so the cap
//!   removes the same ones whichever node took the registration, whatever the clocks say). Moving an
//!   endpoint to another user writes its owner first, then the new user's list, then takes it out of the
//!   old user's list; a reader lists only the endpoints whose owner is the user, so a crash between the
//!   steps can leave a stale line in a list but never shows it, and the next write of that list drops it.
//!   Every list write is conditional on the revision read (retried on a conflict).
//! - **One VAPID key for the cluster** ([`shared_vapid`](super::vapid::shared_vapid)), as on Redis: the first node creates `vapid`
//!   (a conditional create, so two first nodes agree on one); the others copy it to their key file, and a
//!   file that differs stops the start.
//!
//! - **Pending pushes are one KV entry each** in a bucket of their own (`<stem>-push-due`), so the
//!   dispatcher's scans see only the queue (bounded by `inbox.push.queue`), never the subscriptions. The
//!   entry's key is a token of (event id, endpoint): recording a batch again creates nothing new. A claim
//!   is a write conditional on the revision read that moves the entry's due time past the lease, so two
//!   nodes never claim the same push while its lease runs, and a node that dies leaves it due again
//!   when the lease ends. Due times are the nodes' wall clocks (NATS 2.9 offers none of its own to a
//!   client): clocks kept in step by NTP are assumed; a skew delays or advances a push by that much.
//!   Unlike SQLite and Redis, a `record` call is not one atomic step: entries are created one by one
//!   (each is idempotent, so the publisher's retry after a failure half way completes it).
//!
//! Layout: bucket `<stem>-push` (file storage): `e.<token>`, `u.<token>`, `vapid`; bucket
//! `<stem>-push-due` (file storage): `p.<token>`.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::vapid;
use super::{Due, PushError, PushJob, PushStore, Recorded, Subscription};
use crate::engine::nats::codec::token;
use crate::engine::BoxFuture;
use crate::inbox::now_ms;

/// Attempts of one list write against concurrent writes of the same list.
const ATTEMPTS: u32 = 50;

#[derive(Clone, Serialize, Deserialize)]
struct Line {
    endpoint: String,
    p256dh: String,
    auth: String,
    created_at: i64,
}

/// One pending push (the value of `p.<token>` in the `-push-due` bucket).
#[derive(Clone, Serialize, Deserialize)]
struct Pending {
    key: String,
    endpoint: String,
    user: String,
    category: String,
    /// The plaintext, base64.
    payload: String,
    attempts: u32,
    /// Wall-clock milliseconds when it is due (or when its claim's lease ends).
    due_ms: i64,
}

pub struct NatsPushStore {
    kv: kv::Store,
    /// The pending pushes, apart from the subscriptions so scanning them costs only the queue.
    due: kv::Store,
    bucket: String,
    op_timeout: Duration,
}

fn storage(e: impl std::fmt::Display) -> PushError {
    PushError::Storage(format!("nats: {e}"))
}

fn user_key(user: &str) -> String {
    format!("u.{}", token(user))
}

fn owner_key(endpoint: &str) -> String {
    format!("e.{}", token(endpoint))
}

impl NatsPushStore {
    /// Connects within `connect_timeout` and creates (or adopts) the bucket `<stem>-push`.
    pub async fn connect(
        url: &str,
        stem: &str,
        connect_timeout: Duration,
        op_timeout: Duration,
    ) -> Result<NatsPushStore, PushError> {
        let options = async_nats::ConnectOptions::new()
            .name("herald-push")
            .connection_timeout(connect_timeout)
            .request_timeout(Some(op_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(crate::engine::nats::backoff);
        let client = tokio::time::timeout(connect_timeout, options.connect(url))
            .await
            .map_err(|_| {
                storage(format!(
                    "cannot reach NATS at {url} within {connect_timeout:?}"
                ))
            })?
            .map_err(|e| storage(format!("cannot reach NATS at {url}: {e}")))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(op_timeout)
            .build(client);
        let bucket = format!("{stem}-push");
        let kv = tokio::time::timeout(
            connect_timeout.max(op_timeout),
            crate::engine::nats::ensure_kv(
                &js,
                &bucket,
                Duration::ZERO,
                jetstream::stream::StorageType::File,
            ),
        )
        .await
        .map_err(|_| storage(format!("bucket {bucket}: no answer in time")))?
        .map_err(|e| storage(format!("bucket {bucket}: {e}")))?;
        let due_bucket = format!("{stem}-push-due");
        let due = tokio::time::timeout(
            connect_timeout.max(op_timeout),
            crate::engine::nats::ensure_kv(
                &js,
                &due_bucket,
                Duration::ZERO,
                jetstream::stream::StorageType::File,
            ),
        )
        .await
        .map_err(|_| storage(format!("bucket {due_bucket}: no answer in time")))?
        .map_err(|e| storage(format!("bucket {due_bucket}: {e}")))?;
        Ok(NatsPushStore {
            kv,
            due,
            bucket,
            op_timeout,
        })
    }

    pub fn vapid_key_name(&self) -> String {
        format!("{}/vapid", self.bucket)
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, PushError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(storage),
            Err(_) => Err(storage(format!(
                "no answer within {:?} (engine.op_timeout)",
                self.op_timeout
            ))),
        }
    }

    pub async fn owner(&self, endpoint: &str) -> Result<Option<String>, PushError> {
        Ok(self.owner_entry(endpoint).await?.map(|(u, _)| u))
    }

    /// The endpoint's owner and the entry's revision.
    async fn owner_entry(&self, endpoint: &str) -> Result<Option<(String, u64)>, PushError> {
        let e = self.bounded(self.kv.entry(owner_key(endpoint))).await?;
        Ok(e.filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                let v: (String, String) = serde_json::from_slice(&e.value).ok()?;
                // A hashed token could name two endpoints: the value says which one it is.
                (v.1 == endpoint).then_some((v.0, e.revision))
            }))
    }

    async fn lines(&self, user: &str) -> Result<(Vec<Line>, u64), PushError> {
        match self.bounded(self.kv.entry(user_key(user))).await? {
            Some(e) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value).map_err(storage)?,
                e.revision,
            )),
            Some(e) => Ok((Vec::new(), e.revision)),
            None => Ok((Vec::new(), 0)),
        }
    }

    /// Rewrites `user`'s list with `f` (conditional on the revision read, retried); `f` gets the lines
    /// still owned by the user and returns what it removed.
    async fn edit(
        &self,
        user: &str,
        f: impl Fn(&mut Vec<Line>) -> Vec<Line>,
    ) -> Result<Vec<Line>, PushError> {
        for _ in 0..ATTEMPTS {
            let (mut lines, rev) = self.lines(user).await?;
            let owned = self.owned(user, lines.clone()).await?;
            lines.retain(|l| owned.iter().any(|o| o.endpoint == l.endpoint));
            let removed = f(&mut lines);
            let value = Bytes::from(serde_json::to_vec(&lines).map_err(storage)?);
            let key = user_key(user);
            let r = tokio::time::timeout(self.op_timeout, async {
                if rev == 0 {
                    self.kv.create(&key, value).await.map_err(|e| e.to_string())
                } else {
                    self.kv
                        .update(&key, value, rev)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await;
            if let Ok(Ok(_)) = r {
                return Ok(removed);
            }
            let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]);
            tokio::time::sleep(Duration::from_micros(200 + jitter * 20)).await;
        }
        Err(storage(format!(
            "the push subscriptions of {user} kept changing; try again"
        )))
    }

    /// The lines whose endpoint `user` owns.
    async fn owned(&self, user: &str, lines: Vec<Line>) -> Result<Vec<Line>, PushError> {
        let futures = lines
            .iter()
            .map(|l| self.owner_entry(&l.endpoint))
            .collect();
        let owners = crate::inbox::nats::all(futures, 16).await;
        let mut out = Vec::with_capacity(lines.len());
        for (l, o) in lines.into_iter().zip(owners) {
            if o?.is_some_and(|(u, _)| u == user) {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// Deletes the owner entry of `endpoint` if it still names `user`.
    async fn disown(&self, user: &str, endpoint: &str) -> Result<bool, PushError> {
        let Some((owner, rev)) = self.owner_entry(endpoint).await? else {
            return Ok(false);
        };
        if owner != user {
            return Ok(false);
        }
        let r = tokio::time::timeout(
            self.op_timeout,
            self.kv
                .delete_expect_revision(owner_key(endpoint), Some(rev)),
        )
        .await;
        Ok(matches!(r, Ok(Ok(()))))
    }

    /// Every pending push with its key and revision (the queue is bounded by `inbox.push.queue`).
    async fn pending_entries(&self) -> Result<Vec<(String, Pending, u64)>, PushError> {
        let keys: Vec<String> = self
            .bounded(async {
                let keys = self.due.keys().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    keys.filter_map(|k| async move { k.ok() })
                        .collect::<Vec<_>>()
                        .await,
                )
            })
            .await?;
        let futures =
            keys.into_iter()
                .map(|k| async move {
                    let e = self.bounded(self.due.entry(k.clone())).await?;
                    Ok::<_, PushError>(e.filter(|e| e.operation == kv::Operation::Put).and_then(
                        |e| {
                            serde_json::from_slice::<Pending>(&e.value)
                                .ok()
                                .map(|p| (k, p, e.revision))
                        },
                    ))
                })
                .collect();
        let mut out = Vec::new();
        for r in crate::inbox::nats::all(futures, 32).await {
            if let Some(e) = r? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Writes `p` at `key` if the entry is still at `revision`; false when another write came first.
    async fn swap(&self, key: &str, p: &Pending, revision: u64) -> Result<bool, PushError> {
        let value = Bytes::from(serde_json::to_vec(p).map_err(storage)?);
        match tokio::time::timeout(self.op_timeout, self.due.update(key, value, revision)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Ok(Err(e)) => Err(storage(e)),
            Err(_) => Err(storage(format!(
                "no answer within {:?} (engine.op_timeout)",
                self.op_timeout
            ))),
        }
    }
}

/// The cluster's VAPID key lives in NATS (see the module notes and `vapid::shared_vapid`).
impl vapid::ClusterKey for NatsPushStore {
    const BACKEND: &'static str = "NATS";

    fn key_name(&self) -> String {
        self.vapid_key_name()
    }

    async fn stored(&self) -> Result<Option<String>, PushError> {
        let v = self.bounded(self.kv.get("vapid")).await?;
        Ok(v.and_then(|b| String::from_utf8(b.to_vec()).ok()))
    }

    /// Stores `pem` as the cluster's key unless one is there; returns the one that is.
    async fn offer(&self, pem: &str) -> Result<String, PushError> {
        let _ = tokio::time::timeout(
            self.op_timeout,
            self.kv.create("vapid", Bytes::from(pem.to_string())),
        )
        .await;
        self.stored()
            .await?
            .ok_or_else(|| storage(format!("{} was not kept", self.vapid_key_name())))
    }
}

impl PushStore for NatsPushStore {
    fn add(
        &self,
        user: String,
        sub: Subscription,
        max: usize,
    ) -> BoxFuture<'_, Result<(), PushError>> {
        Box::pin(async move {
            let previous = self.owner(&sub.endpoint).await?;
            let owner = serde_json::to_vec(&(&user, &sub.endpoint)).map_err(storage)?;
            self.bounded(self.kv.put(owner_key(&sub.endpoint), owner.into()))
                .await?;
            let line = Line {
                endpoint: sub.endpoint.clone(),
                p256dh: sub.p256dh.clone(),
                auth: sub.auth.clone(),
                created_at: sub.created_at,
            };
            let dropped = self
                .edit(&user, |lines| {
                    lines.retain(|l| l.endpoint != line.endpoint);
                    lines.push(line.clone());
                    let over = lines.len().saturating_sub(max.max(1));
                    lines.drain(..over).collect()
                })
                .await?;
            for l in dropped {
                self.disown(&user, &l.endpoint).await?;
            }
            if let Some(old) = previous.filter(|o| o != &user) {
                let ep = sub.endpoint.clone();
                self.edit(&old, move |lines| {
                    lines.retain(|l| l.endpoint != ep);
                    Vec::new()
                })
                .await?;
            }
            Ok(())
        })
    }

    fn remove(&self, user: String, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>> {
        Box::pin(async move {
            if !self.disown(&user, &endpoint).await? {
                return Ok(false);
            }
            // The owner entry is gone: the line is invisible already; this only tidies the list.
            self.edit(&user, |_| Vec::new()).await?;
            Ok(true)
        })
    }

    fn remove_endpoint(&self, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>> {
        Box::pin(async move {
            match self.owner(&endpoint).await? {
                Some(user) => self.remove(user, endpoint).await,
                None => Ok(false),
            }
        })
    }

    fn list(&self, user: String) -> BoxFuture<'_, Result<Vec<Subscription>, PushError>> {
        Box::pin(async move {
            let (lines, _) = self.lines(&user).await?;
            Ok(self
                .owned(&user, lines)
                .await?
                .into_iter()
                .map(|l| Subscription {
                    endpoint: l.endpoint,
                    p256dh: l.p256dh,
                    auth: l.auth,
                    created_at: l.created_at,
                })
                .collect())
        })
    }

    fn subscribed(&self, users: Vec<String>) -> BoxFuture<'_, Result<HashSet<String>, PushError>> {
        Box::pin(async move {
            let futures = users
                .into_iter()
                .map(|u| async move {
                    let (lines, _) = self.lines(&u).await?;
                    // A stale line (its endpoint moved away) only costs a look at the owners later.
                    Ok::<_, PushError>((!lines.is_empty()).then_some(u))
                })
                .collect();
            let mut out = HashSet::new();
            for r in crate::inbox::nats::all(futures, 32).await {
                if let Some(u) = r? {
                    out.insert(u);
                }
            }
            Ok(out)
        })
    }

    fn record(&self, jobs: Vec<PushJob>, max: usize) -> BoxFuture<'_, Result<Recorded, PushError>> {
        Box::pin(async move {
            let mut pending = self.pending_entries().await?.len();
            let mut out = Recorded::default();
            let now = now_ms();
            let b64 = base64::engine::general_purpose::STANDARD;
            for job in &jobs {
                let (lines, _) = self.lines(&job.user).await?;
                for l in self.owned(&job.user, lines).await? {
                    if pending >= max {
                        out.dropped += 1;
                        continue;
                    }
                    let p = Pending {
                        key: job.key.clone(),
                        endpoint: l.endpoint.clone(),
                        user: job.user.clone(),
                        category: job.category.clone(),
                        payload: b64.encode(&job.payload),
                        attempts: 0,
                        due_ms: now,
                    };
                    let value = Bytes::from(serde_json::to_vec(&p).map_err(storage)?);
                    let key = pending_key(&job.key, &l.endpoint);
                    match tokio::time::timeout(self.op_timeout, self.due.create(&key, value)).await
                    {
                        Ok(Ok(_)) => {
                            out.recorded += 1;
                            pending += 1;
                        }
                        // Recorded before and still pending: not again.
                        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                        Ok(Err(e)) => return Err(storage(e)),
                        Err(_) => {
                            return Err(storage(format!(
                                "no answer within {:?} (engine.op_timeout)",
                                self.op_timeout
                            )))
                        }
                    }
                }
            }
            Ok(out)
        })
    }

    fn claim(&self, limit: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Due>, PushError>> {
        Box::pin(async move {
            let now = now_ms();
            let mut due: Vec<_> = self
                .pending_entries()
                .await?
                .into_iter()
                .filter(|(_, p, _)| p.due_ms <= now)
                .collect();
            due.sort_by_key(|(_, p, rev)| (p.due_ms, *rev));
            let until = now + lease.as_millis() as i64;
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut out = Vec::new();
            for (key, mut p, rev) in due {
                if out.len() >= limit {
                    break;
                }
                let claimed_at = p.due_ms;
                p.due_ms = until;
                // Another node's claim (or a finish) came first: it is theirs.
                if !self.swap(&key, &p, rev).await? {
                    continue;
                }
                let Ok(payload) = b64.decode(&p.payload) else {
                    tracing::warn!(
                        key,
                        due = claimed_at,
                        "inbox push: an unreadable pending push is dropped"
                    );
                    let _ = self.bounded(self.due.purge(&key)).await;
                    continue;
                };
                out.push(Due {
                    id: key,
                    key: p.key,
                    endpoint: p.endpoint,
                    user: p.user,
                    category: p.category,
                    payload,
                    attempts: p.attempts,
                });
            }
            Ok(out)
        })
    }

    fn finish(&self, id: String) -> BoxFuture<'_, Result<(), PushError>> {
        Box::pin(async move { self.bounded(self.due.purge(&id)).await })
    }

    fn retry(
        &self,
        id: String,
        after: Duration,
        attempts: u32,
    ) -> BoxFuture<'_, Result<(), PushError>> {
        Box::pin(async move {
            for _ in 0..ATTEMPTS {
                let Some(e) = self.bounded(self.due.entry(id.clone())).await? else {
                    return Ok(());
                };
                if e.operation != kv::Operation::Put {
                    return Ok(()); // finished meanwhile
                }
                let mut p: Pending = serde_json::from_slice(&e.value).map_err(storage)?;
                p.attempts = attempts;
                p.due_ms = now_ms() + after.as_millis() as i64;
                if self.swap(&id, &p, e.revision).await? {
                    return Ok(());
                }
            }
            Err(storage(format!("the pending push {id} kept changing")))
        })
    }

    fn next_due(&self) -> BoxFuture<'_, Result<Option<Duration>, PushError>> {
        Box::pin(async move {
            let now = now_ms();
            Ok(self
                .pending_entries()
                .await?
                .iter()
                .map(|(_, p, _)| p.due_ms)
                .min()
                .map(|at| Duration::from_millis((at - now).max(0) as u64)))
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, PushError>> {
        Box::pin(async move {
            let keys = self
                .bounded(async {
                    let keys = self.due.keys().await.map_err(|e| e.to_string())?;
                    Ok::<_, String>(keys.filter(|k| std::future::ready(k.is_ok())).count().await)
                })
                .await?;
            Ok(keys as u64)
        })
    }
}

/// The key of the pending push of event `key` to `endpoint`.
fn pending_key(key: &str, endpoint: &str) -> String {
    format!("p.{}", token(&format!("{key}\n{endpoint}")))
}

#[cfg(test)]
mod tests {
    use super::vapid::{read_key, shared_vapid, write_new};
    use super::*;

    fn url() -> String {
        std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    /// A bucket of the test's own, deleted when dropped.
    struct Stem(String);

    impl Drop for Stem {
        fn drop(&mut self) {
            let names = [
                format!("KV_{}-push", self.0),
                format!("KV_{}-push-due", self.0),
            ];
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    if let Ok(c) = async_nats::connect(url()).await {
                        let js = jetstream::new(c);
                        for name in &names {
                            let _ = js.delete_stream(name).await;
                        }
                    }
                });
            })
            .join();
        }
    }

    async fn store(s: &Stem) -> NatsPushStore {
        NatsPushStore::connect(&url(), &s.0, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .expect("the test NATS at 127.0.0.1:4222")
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
    async fn limits_moves_removals_and_one_vapid_key() {
        let stem = Stem(format!(
            "unitpush{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ));
        let s = store(&stem).await;
        // A second connection stands for another node.
        let other = store(&stem).await;
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
        assert_eq!((l[0].p256dh.as_str(), l[0].auth.as_str()), ("k99", "a99"));
        assert_eq!(s.owner("https://p/0").await.unwrap(), None);
        // Registering again makes it the newest.
        s.add("alice".into(), sub("https://p/1", 200), 3)
            .await
            .unwrap();
        let l = s.list("alice".into()).await.unwrap();
        assert_eq!(endpoints(&l), ["https://p/2", "https://p/3", "https://p/1"]);
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
        assert!(!s
            .remove("alice".into(), "https://p/2".into())
            .await
            .unwrap());
        assert!(s.remove("bob".into(), "https://p/2".into()).await.unwrap());
        assert!(s.list("bob".into()).await.unwrap().is_empty());
        assert!(other.remove_endpoint("https://p/1".into()).await.unwrap());
        assert!(!other.remove_endpoint("https://p/1".into()).await.unwrap());
        assert_eq!(
            endpoints(&s.list("alice".into()).await.unwrap()),
            ["https://p/3"]
        );
        // Two nodes without key files end with the same key, copied to each file; a third file with
        // another key is refused.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        let (ka, kb) = tokio::join!(shared_vapid(&s, &a), shared_vapid(&other, &b));
        assert_eq!(ka.unwrap().public_key(), kb.unwrap().public_key());
        assert_eq!(read_key(&a).unwrap(), read_key(&b).unwrap());
        let c = dir.path().join("c.pem");
        let key = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        write_new(&c, &key).unwrap();
        assert!(matches!(shared_vapid(&s, &c).await, Err(PushError::Key(_))));
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
        let stem = Stem(format!(
            "unitdue{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ));
        let (a, b) = (store(&stem).await, store(&stem).await);
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
        assert_eq!(a.next_due().await.unwrap(), Some(Duration::ZERO));

        let lease = Duration::from_secs(60);
        let (ca, cb) = tokio::join!(a.claim(20, lease), b.claim(20, lease));
        let (ca, cb) = (ca.unwrap(), cb.unwrap());
        assert_eq!(ca.len() + cb.len(), 30);
        let ids: HashSet<&str> = ca.iter().chain(&cb).map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), 30, "no push claimed twice");
        assert!(a.claim(20, lease).await.unwrap().is_empty());
        assert!(
            a.next_due().await.unwrap() > Some(Duration::from_secs(50)),
            "leased"
        );
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
        b.retry(back[0].id.clone(), Duration::ZERO, 3)
            .await
            .unwrap();
        assert_eq!(
            a.pending().await.unwrap(),
            0,
            "a finished push is not retried"
        );
        assert_eq!(a.next_due().await.unwrap(), None);
        // Finished, the same event to the same endpoint may be recorded again (a later batch's retry).
        assert_eq!(
            a.record(vec![job("e0", "bob")], 10).await.unwrap().recorded,
            1
        );
    }
}
