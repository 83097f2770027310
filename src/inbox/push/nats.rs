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
//! - **One VAPID key for the cluster** ([`shared_vapid`]), as on Redis: the first node creates `vapid`
//!   (a conditional create, so two first nodes agree on one); the others copy it to their key file, and a
//!   file that differs stops the start.
//!
//! Layout: bucket `<stem>-push` (file storage): `e.<token>`, `u.<token>`, `vapid`.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::vapid::{parse_pem, read_key, to_pem, write_new};
use super::{PushError, PushStore, Subscription, Vapid};
use crate::engine::nats::codec::token;
use crate::engine::BoxFuture;

/// Attempts of one list write against concurrent writes of the same list.
const ATTEMPTS: u32 = 50;

#[derive(Clone, Serialize, Deserialize)]
struct Line {
    endpoint: String,
    p256dh: String,
    auth: String,
    created_at: i64,
}

pub struct NatsPushStore {
    kv: kv::Store,
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
        Ok(NatsPushStore {
            kv,
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

    async fn stored_vapid(&self) -> Result<Option<String>, PushError> {
        let v = self.bounded(self.kv.get("vapid")).await?;
        Ok(v.and_then(|b| String::from_utf8(b.to_vec()).ok()))
    }

    /// Stores `pem` as the cluster's key unless one is there; returns the one that is.
    async fn offer_vapid(&self, pem: &str) -> Result<String, PushError> {
        let _ = tokio::time::timeout(
            self.op_timeout,
            self.kv.create("vapid", Bytes::from(pem.to_string())),
        )
        .await;
        self.stored_vapid()
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
}

/// The VAPID key every node of the cluster signs with, kept in NATS and copied to `path` (see the module
/// notes). A node whose file holds another key is refused.
pub async fn shared_vapid(store: &NatsPushStore, path: &Path) -> Result<Vapid, PushError> {
    let name = store.vapid_key_name();
    let local = read_key(path)?;
    let held = match store.stored_vapid().await? {
        Some(pem) => pem,
        None => {
            let mine = match &local {
                Some(k) => k.clone(),
                None => p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng),
            };
            let held = store.offer_vapid(&to_pem(&mine)?).await?;
            tracing::info!(key = %name, "inbox push: the cluster's VAPID key is in NATS");
            held
        }
    };
    let cluster = parse_pem(&held).map_err(|e| {
        PushError::Key(format!(
            "the VAPID key in NATS ({name}) is not a P-256 private key in PEM: {e}"
        ))
    })?;
    match local {
        Some(k) if k.public_key() != cluster.public_key() => {
            return Err(PushError::Key(format!(
                "{} holds another VAPID key than the cluster's in NATS ({name}); every node must sign \
                 with the same key. Remove {} to have this node take the cluster's key (docs/USAGE.md, \
                 \"Web Push set-up\")",
                path.display(),
                path.display()
            )));
        }
        Some(_) => {}
        None => {
            write_new(path, &cluster)?;
            tracing::info!(
                path = %path.display(),
                key = %name,
                "inbox push: copied the cluster's VAPID key from NATS"
            );
        }
    }
    Vapid::from_key(&cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> String {
        std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    /// A bucket of the test's own, deleted when dropped.
    struct Stem(String);

    impl Drop for Stem {
        fn drop(&mut self) {
            let name = format!("KV_{}-push", self.0);
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    if let Ok(c) = async_nats::connect(url()).await {
                        let _ = jetstream::new(c).delete_stream(&name).await;
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
}
