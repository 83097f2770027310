//! Push subscriptions in an SQLite file of their own: a handful of rows per user, written when a browser
//! subscribes and read once per push, so one connection behind a mutex (on the blocking pool) is plenty,
//! and the inbox's writer thread never waits for it.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use std::collections::HashSet;
use std::time::Duration;

use super::{Due, PushError, PushJob, PushStore, Recorded, Subscription};
use crate::engine::BoxFuture;
use crate::inbox::now_ms;

/// Users asked about in one statement (SQLite's limit on parameters is far above it).
const IN_CHUNK: usize = 500;

pub struct SqlitePushStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS push_subscriptions (
    endpoint   TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    p256dh     TEXT NOT NULL,
    auth       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS push_subscriptions_user ON push_subscriptions (user, created_at);
CREATE TABLE IF NOT EXISTS push_pending (
    id       INTEGER PRIMARY KEY,
    key      TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    user     TEXT NOT NULL,
    category TEXT NOT NULL,
    payload  BLOB NOT NULL,
    due_ms   INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (key, endpoint)
);
CREATE INDEX IF NOT EXISTS push_pending_due ON push_pending (due_ms, id);
";

impl SqlitePushStore {
    pub fn open(path: &Path) -> Result<SqlitePushStore, PushError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| PushError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // One process owns this file: whatever the previous run had claimed died with it, so it is due
        // again now rather than when its claim would have run out.
        let resumed = conn.execute(
            "UPDATE push_pending SET claimed = 0, due_ms = MIN(due_ms, ?1) WHERE claimed = 1",
            params![now_ms()],
        )?;
        let pending: i64 = conn.query_row("SELECT COUNT(*) FROM push_pending", [], |r| r.get(0))?;
        if pending > 0 {
            tracing::info!(
                pending,
                resumed,
                "inbox push: resuming the pushes an earlier run left"
            );
        }
        Ok(SqlitePushStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, PushError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, PushError>> {
        let conn = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&mut conn.lock()))
                .await
                .map_err(|e| PushError::Storage(format!("push store task failed: {e}")))?
        })
    }
}

impl PushStore for SqlitePushStore {
    fn add(
        &self,
        user: String,
        sub: Subscription,
        max: usize,
    ) -> BoxFuture<'_, Result<(), PushError>> {
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO push_subscriptions (endpoint, user, p256dh, auth, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (endpoint) DO UPDATE SET user = ?2, p256dh = ?3, auth = ?4, created_at = ?5",
                params![sub.endpoint, user, sub.p256dh, sub.auth, sub.created_at],
            )?;
            // Beyond the limit the oldest devices go: they are the likeliest to be gone.
            tx.execute(
                "DELETE FROM push_subscriptions WHERE user = ?1 AND endpoint NOT IN (
                     SELECT endpoint FROM push_subscriptions WHERE user = ?1
                     ORDER BY created_at DESC, rowid DESC LIMIT ?2)",
                params![user, max as i64],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn remove(&self, user: String, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>> {
        self.run(move |c| {
            Ok(c.execute(
                "DELETE FROM push_subscriptions WHERE user = ?1 AND endpoint = ?2",
                params![user, endpoint],
            )? > 0)
        })
    }

    fn remove_endpoint(&self, endpoint: String) -> BoxFuture<'_, Result<bool, PushError>> {
        self.run(move |c| {
            Ok(c.execute(
                "DELETE FROM push_subscriptions WHERE endpoint = ?1",
                params![endpoint],
            )? > 0)
        })
    }

    fn list(&self, user: String) -> BoxFuture<'_, Result<Vec<Subscription>, PushError>> {
        self.run(move |c| {
            let mut st = c.prepare_cached(
                "SELECT endpoint, p256dh, auth, created_at FROM push_subscriptions
                 WHERE user = ?1 ORDER BY created_at, rowid",
            )?;
            let rows = st.query_map(params![user], |r| {
                Ok(Subscription {
                    endpoint: r.get(0)?,
                    p256dh: r.get(1)?,
                    auth: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn subscribed(&self, users: Vec<String>) -> BoxFuture<'_, Result<HashSet<String>, PushError>> {
        self.run(move |c| {
            let mut out = HashSet::new();
            for chunk in users.chunks(IN_CHUNK) {
                let marks = vec!["?"; chunk.len()].join(",");
                let mut st = c.prepare_cached(&format!(
                    "SELECT DISTINCT user FROM push_subscriptions WHERE user IN ({marks})"
                ))?;
                let rows = st.query_map(rusqlite::params_from_iter(chunk), |r| r.get(0))?;
                for u in rows {
                    out.insert(u?);
                }
            }
            Ok(out)
        })
    }

    fn record(&self, jobs: Vec<PushJob>, max: usize) -> BoxFuture<'_, Result<Recorded, PushError>> {
        self.run(move |c| {
            let tx = c.transaction()?;
            let mut pending: i64 =
                tx.query_row("SELECT COUNT(*) FROM push_pending", [], |r| r.get(0))?;
            let mut out = Recorded::default();
            let now = now_ms();
            {
                let mut subs = tx.prepare_cached(
                    "SELECT endpoint FROM push_subscriptions WHERE user = ?1 ORDER BY created_at, rowid",
                )?;
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO push_pending (key, endpoint, user, category, payload, due_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for job in &jobs {
                    let endpoints = subs
                        .query_map(params![job.user], |r| r.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    for ep in endpoints {
                        if pending >= max as i64 {
                            out.dropped += 1;
                            continue;
                        }
                        let n = insert.execute(params![
                            job.key,
                            ep,
                            job.user,
                            job.category,
                            &job.payload[..],
                            now
                        ])?;
                        pending += n as i64;
                        out.recorded += n;
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    fn claim(&self, limit: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Due>, PushError>> {
        self.run(move |c| {
            let now = now_ms();
            let tx = c.transaction()?;
            let due = {
                let mut st = tx.prepare_cached(
                    "SELECT id, key, endpoint, user, category, payload, attempts FROM push_pending
                     WHERE due_ms <= ?1 ORDER BY due_ms, id LIMIT ?2",
                )?;
                let rows = st.query_map(params![now, limit as i64], |r| {
                    Ok(Due {
                        id: r.get::<_, i64>(0)?.to_string(),
                        key: r.get(1)?,
                        endpoint: r.get(2)?,
                        user: r.get(3)?,
                        category: r.get(4)?,
                        payload: r.get(5)?,
                        attempts: r.get(6)?,
                    })
                })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            {
                let mut st = tx.prepare_cached(
                    "UPDATE push_pending SET claimed = 1, due_ms = ?2 WHERE id = ?1",
                )?;
                let until = now + lease.as_millis() as i64;
                for d in &due {
                    st.execute(params![row_id(&d.id)?, until])?;
                }
            }
            tx.commit()?;
            Ok(due)
        })
    }

    fn finish(&self, id: String) -> BoxFuture<'_, Result<(), PushError>> {
        self.run(move |c| {
            let id = row_id(&id)?;
            c.prepare_cached("DELETE FROM push_pending WHERE id = ?1")?
                .execute(params![id])?;
            Ok(())
        })
    }

    fn retry(
        &self,
        id: String,
        after: Duration,
        attempts: u32,
    ) -> BoxFuture<'_, Result<(), PushError>> {
        self.run(move |c| {
            let id = row_id(&id)?;
            let at = now_ms() + after.as_millis() as i64;
            c.prepare_cached(
                "UPDATE push_pending SET claimed = 0, due_ms = ?2, attempts = ?3 WHERE id = ?1",
            )?
            .execute(params![id, at, attempts])?;
            Ok(())
        })
    }

    fn next_due(&self) -> BoxFuture<'_, Result<Option<Duration>, PushError>> {
        self.run(move |c| {
            let at: Option<i64> = c
                .prepare_cached("SELECT MIN(due_ms) FROM push_pending")?
                .query_row([], |r| r.get(0))?;
            Ok(at.map(|at| Duration::from_millis((at - now_ms()).max(0) as u64)))
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, PushError>> {
        self.run(move |c| {
            let n: i64 = c.query_row("SELECT COUNT(*) FROM push_pending", [], |r| r.get(0))?;
            Ok(n as u64)
        })
    }
}

/// A delivery's id as [`Due::id`] carries it.
fn row_id(id: &str) -> Result<i64, PushError> {
    id.parse()
        .map_err(|_| PushError::Storage(format!("{id:?} is not a pending push of this store")))
}

impl SqlitePushStore {
    /// Who holds `endpoint` (tests and diagnostics).
    pub fn owner(&self, endpoint: &str) -> Result<Option<String>, PushError> {
        Ok(self
            .conn
            .lock()
            .query_row(
                "SELECT user FROM push_subscriptions WHERE endpoint = ?1",
                params![endpoint],
                |r| r.get(0),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(endpoint: &str, at: i64) -> Subscription {
        Subscription {
            endpoint: endpoint.into(),
            p256dh: "k".into(),
            auth: "a".into(),
            created_at: at,
        }
    }

    #[tokio::test]
    async fn limits_moves_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqlitePushStore::open(&dir.path().join("push.sqlite3")).unwrap();
        for i in 0..4 {
            s.add("alice".into(), sub(&format!("https://p/{i}"), i), 3)
                .await
                .unwrap();
        }
        let l = s.list("alice".into()).await.unwrap();
        let eps: Vec<_> = l.iter().map(|s| s.endpoint.as_str()).collect();
        assert_eq!(
            eps,
            ["https://p/1", "https://p/2", "https://p/3"],
            "the oldest went"
        );

        // The same browser registered by another user moves to them.
        s.add("bob".into(), sub("https://p/2", 10), 3)
            .await
            .unwrap();
        assert_eq!(s.owner("https://p/2").unwrap().as_deref(), Some("bob"));
        assert_eq!(s.list("alice".into()).await.unwrap().len(), 2);

        assert!(!s
            .remove("alice".into(), "https://p/2".into())
            .await
            .unwrap());
        assert!(s.remove("bob".into(), "https://p/2".into()).await.unwrap());
        assert!(s.remove_endpoint("https://p/1".into()).await.unwrap());
        assert_eq!(s.list("alice".into()).await.unwrap().len(), 1);
    }

    fn job(key: &str, user: &str) -> PushJob {
        PushJob {
            key: key.into(),
            user: user.into(),
            category: "general".into(),
            payload: format!("{{\"k\":\"{key}\"}}").into_bytes(),
        }
    }

    /// Pending pushes: one per subscription, recorded once, bounded, claimed for a lease, retried later,
    /// finished, and due again at once when the file is reopened by the next process.
    #[tokio::test]
    async fn pending_pushes_are_recorded_once_bounded_claimed_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push.sqlite3");
        let s = SqlitePushStore::open(&path).unwrap();
        s.add("alice".into(), sub("https://p/a1", 1), 3)
            .await
            .unwrap();
        s.add("alice".into(), sub("https://p/a2", 2), 3)
            .await
            .unwrap();
        s.add("bob".into(), sub("https://p/b1", 3), 3)
            .await
            .unwrap();
        let who = s
            .subscribed(vec!["alice".into(), "carol".into(), "bob".into()])
            .await
            .unwrap();
        assert_eq!(who, HashSet::from(["alice".to_string(), "bob".to_string()]));

        let r = s
            .record(vec![job("e1", "alice"), job("e2", "carol")], 10)
            .await
            .unwrap();
        assert_eq!(
            r,
            Recorded {
                recorded: 2,
                dropped: 0
            },
            "one per subscription, none for carol"
        );
        let r = s.record(vec![job("e1", "alice")], 10).await.unwrap();
        assert_eq!(r.recorded, 0, "a batch recorded again records nothing new");
        let r = s
            .record(vec![job("e3", "alice"), job("e4", "bob")], 3)
            .await
            .unwrap();
        assert_eq!(
            r,
            Recorded {
                recorded: 1,
                dropped: 2
            },
            "the bound counts pending pushes"
        );
        assert_eq!(s.pending().await.unwrap(), 3);

        let lease = Duration::from_secs(60);
        let first = s.claim(2, lease).await.unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            (first[0].key.as_str(), first[0].endpoint.as_str()),
            ("e1", "https://p/a1")
        );
        assert_eq!(first[0].payload, br#"{"k":"e1"}"#);
        let rest = s.claim(10, lease).await.unwrap();
        assert_eq!(
            rest.len(),
            1,
            "a claimed push is not claimed again while its lease runs"
        );
        assert!(s.claim(10, lease).await.unwrap().is_empty());

        s.finish(first[0].id.clone()).await.unwrap();
        s.retry(first[1].id.clone(), Duration::from_secs(30), 1)
            .await
            .unwrap();
        let wait = s.next_due().await.unwrap().unwrap();
        assert!(wait > Duration::from_secs(25), "{wait:?}");
        drop(s);

        // The next process: the push still claimed (rest[0]) is due now, the retried one keeps its time
        // and its attempts.
        let s = SqlitePushStore::open(&path).unwrap();
        assert_eq!(s.pending().await.unwrap(), 2);
        let again = s.claim(10, lease).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].key, rest[0].key);
        assert_eq!(again[0].attempts, 0);
        s.finish(again[0].id.clone()).await.unwrap();
        s.retry(first[1].id.clone(), Duration::ZERO, 1)
            .await
            .unwrap();
        let last = s.claim(10, lease).await.unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].attempts, 1);
        s.finish(last[0].id.clone()).await.unwrap();
        assert_eq!(s.next_due().await.unwrap(), None);
    }
}
