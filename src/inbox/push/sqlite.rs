//! Push subscriptions in an SQLite file of their own: a handful of rows per user, written when a browser
//! subscribes and read once per push, so one connection behind a mutex (on the blocking pool) is plenty,
//! and the inbox's writer thread never waits for it.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::{PushError, PushStore, Subscription};
use crate::engine::BoxFuture;

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
}
