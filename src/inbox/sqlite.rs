//! The inbox on SQLite, in a file of its own beside the log (a notification storm does not queue behind
//! publications, and the log's retention never touches an inbox).
//!
//! One writer thread owns the write connection and commits whatever changes are waiting in one
//! transaction (group commit: one fsync for many requests), each change inside a savepoint, so a change that
//! fails is rolled back alone and the others still commit. Answers are sent only after the commit. Reads use
//! a pool of read-only connections, each read in one transaction, so a page and its counts are one snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{
    invalid, Archived, Changed, Counts, Delivered, InboxError, InboxStore, Item, ListQuery,
    NewItem, NotifyResult, Page, Patch, PendingEvent, Preferences, Stats, Status, Tally, Target,
    MAX_EVENT_ITEMS, MAX_PAGE,
};
use crate::engine::BoxFuture;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user          TEXT NOT NULL,
    category      TEXT NOT NULL,
    title         TEXT NOT NULL,
    body          TEXT NOT NULL,
    avatar        TEXT,
    action_url    TEXT,
    actions       TEXT NOT NULL,
    data          TEXT,
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER,
    read_ms       INTEGER,
    seen_ms       INTEGER,
    archived_ms   INTEGER,
    snoozed_until INTEGER,
    action        TEXT,
    idem_key      TEXT
);
CREATE INDEX IF NOT EXISTS items_user ON items (user, id);
CREATE UNIQUE INDEX IF NOT EXISTS items_idem ON items (user, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_expires ON items (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_snoozed ON items (snoozed_until) WHERE snoozed_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_created ON items (created_ms);
-- The counts, per user and category, changed in the transaction that changes the items.
CREATE TABLE IF NOT EXISTS counts (
    user     TEXT NOT NULL,
    category TEXT NOT NULL,
    total    INTEGER NOT NULL,
    unread   INTEGER NOT NULL,
    unseen   INTEGER NOT NULL,
    archived INTEGER NOT NULL,
    PRIMARY KEY (user, category)
) WITHOUT ROWID;
-- One row per inbox: its version (bumped by every change that makes an event) and preferences.
CREATE TABLE IF NOT EXISTS inboxes (
    user        TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    preferences TEXT
) WITHOUT ROWID;
-- Events committed with their change, deleted once published.
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    user     TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload  TEXT NOT NULL
);
";

const ITEM_COLUMNS: &str =
    "id, category, title, body, avatar, action_url, actions, data, created_ms, \
     expires_ms, read_ms, seen_ms, archived_ms, snoozed_until, action";

type Reply = Box<dyn FnOnce(Result<(), InboxError>) + Send>;
type Job = Box<dyn FnOnce(&Ctx, &Connection) -> Reply + Send>;

/// How many changes wait for the writer before callers wait to enqueue.
const QUEUE: usize = 1024;
/// Most changes committed in one transaction.
const GROUP: usize = 256;
/// The writer connection's page cache, in KiB (SQLite's default is 2 MiB).
const WRITER_CACHE_KIB: i64 = 32 * 1024;

pub struct SqliteInbox {
    jobs: mpsc::Sender<Job>,
    readers: std::sync::Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
}

/// Limits the store applies itself, in the same transaction as the change.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub max_items: usize,
    pub max_age: Duration,
}

/// What a change needs besides the connection.
struct Ctx {
    /// This file's incarnation, part of every event id: a new file never reuses an id the log still has.
    epoch: String,
    limits: StoreLimits,
}

impl SqliteInbox {
    /// Opens (creating if needed) the inbox at `path`, recounts every inbox (logging any repair), and
    /// starts the writer thread. `durable`: `synchronous=FULL`, as the log's `log.durable`.
    pub fn open(
        path: impl AsRef<Path>,
        durable: bool,
        limits: StoreLimits,
    ) -> Result<SqliteInbox, InboxError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                InboxError::Storage(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // The writer touches three b-trees keyed by user at random places (the inbox row, the counts, the
        // items' user index): SQLite's default 2 MiB page cache misses on most of them once a notify spans
        // tens of thousands of users, and spills dirty pages mid-transaction. A bound, not an allocation:
        // pages are cached only as they are touched.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        // Each change runs in a savepoint, and SQLite copies every page a savepoint first touches into a
        // sub-journal, a temporary file by default: a notify of 1 000 users wrote and reread it for
        // ~12% of the writer's time (perf). In memory it is a copy of the page and no system call.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.execute_batch(SCHEMA)?;
        let epoch: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let epoch = match epoch {
            Some(e) => e,
            None => {
                let e = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
                conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?1)", [&e])?;
                e
            }
        };
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let repaired = recount(&conn, true);
        conn.execute_batch(if repaired.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        })?;
        let repaired = repaired?;
        if repaired > 0 {
            tracing::warn!(
                repaired,
                path = %path.display(),
                "inbox: counts differed from the items and were repaired"
            );
        } else {
            tracing::info!(path = %path.display(), "inbox: counts checked against the items");
        }
        let (jobs, rx) = mpsc::channel(QUEUE);
        let ctx = Ctx { epoch, limits };
        std::thread::Builder::new()
            .name("herald-inbox".into())
            .spawn(move || run_writer(conn, ctx, rx))
            .map_err(|e| InboxError::Storage(format!("cannot start the inbox writer: {e}")))?;
        Ok(SqliteInbox {
            jobs,
            readers: Default::default(),
            path,
        })
    }

    /// Runs `f` in its own savepoint in the writer's next transaction; answers after the commit.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ctx, &Connection) -> Result<T, InboxError> + Send + 'static,
    ) -> Result<T, InboxError> {
        let (tx, rx) = oneshot::channel::<Result<T, InboxError>>();
        let job: Job = Box::new(move |ctx: &Ctx, conn: &Connection| -> Reply {
            let r = in_savepoint(conn, || f(ctx, conn));
            Box::new(move |committed: Result<(), InboxError>| {
                let _ = tx.send(committed.and(r));
            })
        });
        self.jobs.send(job).await.map_err(|_| InboxError::Closed)?;
        rx.await.map_err(|_| {
            InboxError::Storage("the inbox writer could not start a transaction".into())
        })?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, InboxError> + Send + 'static,
    ) -> Result<T, InboxError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match readers.lock().pop() {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    c.busy_timeout(Duration::from_secs(5))?;
                    c
                }
            };
            // One read transaction: a page, its counts and its version are one snapshot.
            conn.execute_batch("BEGIN")?;
            let out = f(&conn);
            let ended = conn.execute_batch("COMMIT");
            if ended.is_ok() {
                let mut pool = readers.lock();
                if pool.len() < 8 {
                    pool.push(conn);
                }
            }
            out
        })
        .await
        .map_err(|e| InboxError::Storage(format!("inbox read failed: {e}")))?
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, InboxError>,
) -> Result<T, InboxError> {
    conn.execute_batch("SAVEPOINT change")?;
    match f() {
        Ok(v) => {
            conn.execute_batch("RELEASE change")?;
            Ok(v)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO change; RELEASE change")?;
            Err(e)
        }
    }
}

/// The writer thread: takes what is waiting, runs each change in its savepoint, commits once, answers.
fn run_writer(conn: Connection, ctx: Ctx, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Dropping the jobs answers their callers with an error.
            tracing::warn!(error = %e, "inbox: cannot begin a transaction");
            continue;
        }
        let replies: Vec<Reply> = jobs.into_iter().map(|j| j(&ctx, &conn)).collect();
        let committed = conn.execute_batch("COMMIT").map_err(InboxError::from);
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies {
            reply(match &committed {
                Ok(()) => Ok(()),
                Err(e) => Err(InboxError::Storage(e.to_string())),
            });
        }
    }
    tracing::debug!("inbox writer stopped");
}

fn row_item(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    let actions: String = r.get(6)?;
    let data: Option<String> = r.get(7)?;
    Ok(Item {
        id: r.get(0)?,
        category: r.get(1)?,
        title: r.get(2)?,
        body: r.get(3)?,
        avatar: r.get(4)?,
        action_url: r.get(5)?,
        actions: serde_json::from_str(&actions).unwrap_or_default(),
        data: data.and_then(|d| serde_json::from_str(&d).ok()),
        created_at: r.get(8)?,
        expires_at: r.get(9)?,
        read_at: r.get(10)?,
        seen_at: r.get(11)?,
        archived_at: r.get(12)?,
        snoozed_until: r.get(13)?,
        action: r.get(14)?,
    })
}

/// What an item adds to its category's counts.
fn contribution(i: &Item) -> Tally {
    let active = i.archived_at.is_none() && i.snoozed_until.is_none();
    Tally {
        total: 1,
        unread: i64::from(active && i.read_at.is_none()),
        unseen: i64::from(active && i.seen_at.is_none()),
        archived: i64::from(i.archived_at.is_some()),
    }
}

fn apply(conn: &Connection, user: &str, category: &str, d: &Tally) -> Result<(), InboxError> {
    if d.is_zero() {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO counts (user, category, total, unread, unseen, archived) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (user, category) DO UPDATE SET total = total + excluded.total,
             unread = unread + excluded.unread, unseen = unseen + excluded.unseen,
             archived = archived + excluded.archived",
    )?
    .execute(params![user, category, d.total, d.unread, d.unseen, d.archived])?;
    // Only a change that takes items away can empty a category (a new item, the common change, cannot).
    if d.total <= 0 {
        conn.prepare_cached("DELETE FROM counts WHERE user = ?1 AND category = ?2 AND total = 0")?
            .execute(params![user, category])?;
    }
    Ok(())
}

fn counts_of(conn: &Connection, user: &str) -> Result<Counts, InboxError> {
    let mut stmt = conn.prepare_cached(
        "SELECT category, total, unread, unseen, archived FROM counts WHERE user = ?1",
    )?;
    let rows = stmt.query_map([user], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Tally {
                total: r.get(1)?,
                unread: r.get(2)?,
                unseen: r.get(3)?,
                archived: r.get(4)?,
            },
        ))
    })?;
    let mut categories = BTreeMap::new();
    for row in rows {
        let (c, t) = row?;
        categories.insert(c, t);
    }
    Ok(Counts::from_categories(categories))
}

fn version_of(conn: &Connection, user: &str) -> Result<i64, InboxError> {
    Ok(conn
        .prepare_cached("SELECT version FROM inboxes WHERE user = ?1")?
        .query_row([user], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

fn bump(conn: &Connection, user: &str) -> Result<i64, InboxError> {
    Ok(conn
        .prepare_cached(
            "INSERT INTO inboxes (user, version) VALUES (?1, 1)
             ON CONFLICT (user) DO UPDATE SET version = version + 1 RETURNING version",
        )?
        .query_row([user], |r| r.get(0))?)
}

fn preferences_of(conn: &Connection, user: &str) -> Result<Preferences, InboxError> {
    let p: Option<Option<String>> = conn
        .prepare_cached("SELECT preferences FROM inboxes WHERE user = ?1")?
        .query_row([user], |r| r.get(0))
        .optional()?;
    Ok(p.flatten()
        .and_then(|p| serde_json::from_str(&p).ok())
        .unwrap_or_default())
}

/// Bumps the version and commits the event with the change: `payload` gets `type`, `version` and the
/// new `counts`.
fn emit(
    ctx: &Ctx,
    conn: &Connection,
    user: &str,
    kind: &str,
    mut payload: serde_json::Map<String, serde_json::Value>,
) -> Result<(i64, i64, Counts), InboxError> {
    let version = bump(conn, user)?;
    let counts = counts_of(conn, user)?;
    payload.insert("type".into(), json!(kind));
    payload.insert("version".into(), json!(version));
    payload.insert("counts".into(), json!(counts));
    let payload = serde_json::Value::Object(payload).to_string();
    Ok((
        enqueue(ctx, conn, user, version, &payload)?,
        version,
        counts,
    ))
}

/// Commits an event of `user` at `version` in the outbox; returns its outbox position.
fn enqueue(
    ctx: &Ctx,
    conn: &Connection,
    user: &str,
    version: i64,
    payload: &str,
) -> Result<i64, InboxError> {
    let event_id = format!("inbox-{}-{version}-{user}", ctx.epoch);
    conn.prepare_cached("INSERT INTO outbox (user, event_id, payload) VALUES (?1, ?2, ?3)")?
        .execute(params![user, event_id, payload])?;
    Ok(conn.last_insert_rowid())
}

fn select_items(conn: &Connection, user: &str, target: &Target) -> Result<Vec<Item>, InboxError> {
    match target {
        Target::Ids(ids) => {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids.dedup();
            let marks = vec!["?"; ids.len()].join(",");
            let sql = format!(
                "SELECT {ITEM_COLUMNS} FROM items WHERE user = ? AND id IN ({marks}) ORDER BY id"
            );
            let mut stmt = conn.prepare(&sql)?;
            let args = std::iter::once(rusqlite::types::Value::Text(user.to_string()))
                .chain(ids.iter().map(|i| rusqlite::types::Value::Integer(*i)));
            let items = stmt
                .query_map(params_from_iter(args), row_item)?
                .collect::<Result<Vec<_>, _>>()?;
            if items.len() < ids.len() {
                let missing = ids
                    .iter()
                    .find(|i| !items.iter().any(|it| it.id == **i))
                    .copied()
                    .unwrap_or_default();
                return Err(InboxError::NotFound(format!(
                    "no item {missing} in this inbox"
                )));
            }
            Ok(items)
        }
        Target::UpTo { upto, category } => {
            let sql = format!(
                "SELECT {ITEM_COLUMNS} FROM items WHERE user = ?1 AND id <= ?2 AND (?3 IS NULL OR category = ?3) ORDER BY id"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let items = stmt
                .query_map(params![user, upto, category], row_item)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(items)
        }
    }
}

/// Applies `patch` to `items` of `user`; one event for all that changed.
fn change_items(
    ctx: &Ctx,
    conn: &Connection,
    user: &str,
    items: Vec<Item>,
    patch: &Patch,
    target: &Target,
    now: i64,
) -> Result<Changed, InboxError> {
    let mut changed = Vec::new();
    for old in items {
        let new = patch.apply(&old, now)?;
        if new == old {
            continue;
        }
        conn.prepare_cached(
            "UPDATE items SET read_ms = ?2, seen_ms = ?3, archived_ms = ?4, snoozed_until = ?5, action = ?6
             WHERE id = ?1",
        )?
        .execute(params![
            new.id,
            new.read_at,
            new.seen_at,
            new.archived_at,
            new.snoozed_until,
            new.action
        ])?;
        let mut d = contribution(&new);
        d.add(&contribution(&old), -1);
        apply(conn, user, &new.category, &d)?;
        changed.push(new);
    }
    if changed.is_empty() {
        return Ok(Changed {
            changed: 0,
            counts: counts_of(conn, user)?,
            version: version_of(conn, user)?,
            event: None,
        });
    }
    let mut payload = serde_json::Map::new();
    let kind = if changed.len() <= MAX_EVENT_ITEMS {
        payload.insert(
            "items".into(),
            json!(changed.iter().map(Item::state).collect::<Vec<_>>()),
        );
        "updated"
    } else {
        payload.insert("target".into(), json!(target));
        payload.insert("set".into(), json!(patch));
        payload.insert("changed".into(), json!(changed.len()));
        "bulk"
    };
    let (event, version, counts) = emit(ctx, conn, user, kind, payload)?;
    Ok(Changed {
        changed: changed.len(),
        counts,
        version,
        event: Some(event),
    })
}

fn remove_items(
    ctx: &Ctx,
    conn: &Connection,
    user: &str,
    items: Vec<Item>,
    target: &Target,
) -> Result<Changed, InboxError> {
    for it in &items {
        conn.prepare_cached("DELETE FROM items WHERE id = ?1")?
            .execute([it.id])?;
        let mut d = Tally::default();
        d.add(&contribution(it), -1);
        apply(conn, user, &it.category, &d)?;
    }
    if items.is_empty() {
        return Ok(Changed {
            changed: 0,
            counts: counts_of(conn, user)?,
            version: version_of(conn, user)?,
            event: None,
        });
    }
    let mut payload = serde_json::Map::new();
    let kind = if items.len() <= MAX_EVENT_ITEMS {
        payload.insert(
            "ids".into(),
            json!(items.iter().map(|i| i.id).collect::<Vec<_>>()),
        );
        "removed"
    } else {
        payload.insert("target".into(), json!(target));
        payload.insert("removed".into(), json!(items.len()));
        "bulk"
    };
    let (event, version, counts) = emit(ctx, conn, user, kind, payload)?;
    Ok(Changed {
        changed: items.len(),
        counts,
        version,
        event: Some(event),
    })
}

/// What a notify computes once for all its users: the writer thread spends its time per user, so
/// nothing that is the same for every user (the item's columns, its JSON, what it adds to the counts)
/// is made again for each.
struct Prepared<'a> {
    item: &'a NewItem,
    key: Option<&'a str>,
    now: i64,
    actions: String,
    data: Option<String>,
    /// The stored item's JSON after its `"id":…,` (the only field that differs between users).
    item_tail: String,
    contribution: Tally,
}

impl<'a> Prepared<'a> {
    fn new(item: &'a NewItem, key: Option<&'a str>, now: i64) -> Result<Prepared<'a>, InboxError> {
        let storage = |e: serde_json::Error| InboxError::Storage(e.to_string());
        let stored = item.stored(0, now);
        let json = serde_json::to_string(&stored).map_err(storage)?;
        let item_tail = json
            .strip_prefix("{\"id\":0,")
            .ok_or_else(|| InboxError::Storage("an item's JSON does not start with its id".into()))?
            .to_string();
        Ok(Prepared {
            item,
            key,
            now,
            actions: serde_json::to_string(&item.actions).map_err(storage)?,
            data: item.data.as_ref().map(|d| d.to_string()),
            item_tail,
            contribution: contribution(&stored),
        })
    }
}

/// One user of a notify, in 4 statements in the common case (a user whose inbox had no item before):
/// the version bump that also returns the preferences, the item insert, the count upsert that returns
/// the category's new tally, the outbox insert.
fn notify_one(
    ctx: &Ctx,
    conn: &Connection,
    user: &str,
    p: &Prepared<'_>,
) -> Result<(Delivered, Option<i64>), InboxError> {
    let delivered = |id, outcome| Delivered {
        user: user.to_string(),
        id,
        outcome,
    };
    // The version is bumped first because the same statement returns the preferences (one b-tree
    // search instead of two); a muted user or a duplicate gets the bump undone, in this same change.
    // Either needs a row that was there before (a new row has no preferences and no items), so taking
    // one off restores its version exactly.
    let undo = || -> Result<(), InboxError> {
        conn.prepare_cached("UPDATE inboxes SET version = version - 1 WHERE user = ?1")?
            .execute([user])?;
        Ok(())
    };
    let (version, prefs): (i64, Option<String>) = conn
        .prepare_cached(
            "INSERT INTO inboxes (user, version) VALUES (?1, 1)
             ON CONFLICT (user) DO UPDATE SET version = version + 1 RETURNING version, preferences",
        )?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let prefs: Preferences = prefs
        .and_then(|p| serde_json::from_str(&p).ok())
        .unwrap_or_default();
    if !prefs.allows(p.item.category(), "inbox") {
        undo()?;
        return Ok((delivered(None, "muted"), None));
    }
    if let Some(k) = p.key {
        let existing: Option<i64> = conn
            .prepare_cached("SELECT id FROM items WHERE user = ?1 AND idem_key = ?2")?
            .query_row(params![user, k], |r| r.get(0))
            .optional()?;
        if let Some(id) = existing {
            undo()?;
            return Ok((delivered(Some(id), "duplicate"), None));
        }
    }
    let item = p.item;
    let category = item.category();
    conn.prepare_cached(
        "INSERT INTO items (user, category, title, body, avatar, action_url, actions, data, created_ms,
             expires_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        user,
        category,
        item.title,
        item.body,
        item.avatar,
        item.action_url,
        p.actions,
        p.data,
        p.now,
        item.expires_at,
        p.key
    ])?;
    let id = conn.last_insert_rowid();
    let d = p.contribution;
    let tally: Tally = conn
        .prepare_cached(
            "INSERT INTO counts (user, category, total, unread, unseen, archived) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (user, category) DO UPDATE SET total = total + excluded.total,
                 unread = unread + excluded.unread, unseen = unseen + excluded.unseen,
                 archived = archived + excluded.archived
             RETURNING total, unread, unseen, archived",
        )?
        .query_row(
            params![user, category, d.total, d.unread, d.unseen, d.archived],
            |r| {
                Ok(Tally {
                    total: r.get(0)?,
                    unread: r.get(1)?,
                    unseen: r.get(2)?,
                    archived: r.get(3)?,
                })
            },
        )?;
    // Every change that makes an event bumps the version, and every item came in with one; so at
    // version 1 this item is the inbox's first and its category's tally is all of the counts (the
    // common case of a notification storm: no counts read back).
    let mut counts = if version == 1 {
        Counts::from_categories(BTreeMap::from([(category.to_string(), tally)]))
    } else {
        counts_of(conn, user)?
    };
    // Over the cap: the oldest items go, in this same change.
    let over = counts.all.total - ctx.limits.max_items as i64;
    let mut removed = Vec::new();
    if over > 0 {
        let sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE user = ?1 ORDER BY id LIMIT ?2");
        let oldest = conn
            .prepare_cached(&sql)?
            .query_map(params![user, over], row_item)?
            .collect::<Result<Vec<_>, _>>()?;
        for it in oldest {
            conn.prepare_cached("DELETE FROM items WHERE id = ?1")?
                .execute([it.id])?;
            let mut d = Tally::default();
            d.add(&contribution(&it), -1);
            apply(conn, user, &it.category, &d)?;
            removed.push(it.id);
        }
        counts = counts_of(conn, user)?;
    }
    let event = enqueue(
        ctx,
        conn,
        user,
        version,
        &created_payload(&counts, id, &p.item_tail, &removed, version)?,
    )?;
    Ok((delivered(Some(id), "created"), Some(event)))
}

/// A `created` event, written out from its parts (the item's JSON is made once per notify): the same
/// JSON value as the map the other events are built with (inside the item and the counts the keys come
/// in their fields' order rather than sorted).
fn created_payload(
    counts: &Counts,
    id: i64,
    item_tail: &str,
    removed: &[i64],
    version: i64,
) -> Result<String, InboxError> {
    let storage = |e: serde_json::Error| InboxError::Storage(e.to_string());
    let counts = serde_json::to_string(counts).map_err(storage)?;
    let removed = if removed.is_empty() {
        String::new()
    } else {
        format!(
            ",\"removed\":{}",
            serde_json::to_string(removed).map_err(storage)?
        )
    };
    Ok(format!(
        "{{\"counts\":{counts},\"item\":{{\"id\":{id},{item_tail}{removed},\"type\":\"created\",\"version\":{version}}}"
    ))
}

/// Rows of (user, category, total, unread, unseen, archived), keyed by (user, category).
fn tallies(conn: &Connection, sql: &str) -> Result<BTreeMap<(String, String), Tally>, InboxError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((
            (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            Tally {
                total: r.get(2)?,
                unread: r.get(3)?,
                unseen: r.get(4)?,
                archived: r.get(5)?,
            },
        ))
    })?;
    let mut map = BTreeMap::new();
    for row in rows {
        let (k, t) = row?;
        map.insert(k, t);
    }
    Ok(map)
}

/// Compares the stored counts with a recount of the items; with `repair`, replaces them. Returns the
/// number of (user, category) rows that differed.
fn recount(conn: &Connection, repair: bool) -> Result<i64, InboxError> {
    let actual = tallies(
        conn,
        "SELECT user, category, COUNT(*),
             SUM(archived_ms IS NULL AND snoozed_until IS NULL AND read_ms IS NULL),
             SUM(archived_ms IS NULL AND snoozed_until IS NULL AND seen_ms IS NULL),
             SUM(archived_ms IS NOT NULL)
         FROM items GROUP BY user, category",
    )?;
    let stored = tallies(
        conn,
        "SELECT user, category, total, unread, unseen, archived FROM counts",
    )?;
    let mut differ = 0i64;
    for (k, t) in &actual {
        if stored.get(k) != Some(t) {
            differ += 1;
        }
    }
    differ += stored.keys().filter(|k| !actual.contains_key(*k)).count() as i64;
    if repair && differ > 0 {
        conn.execute("DELETE FROM counts", [])?;
        let mut ins = conn.prepare(
            "INSERT INTO counts (user, category, total, unread, unseen, archived) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for ((u, c), t) in &actual {
            ins.execute(params![u, c, t.total, t.unread, t.unseen, t.archived])?;
        }
    }
    Ok(differ)
}

fn list_page(conn: &Connection, user: &str, q: &ListQuery) -> Result<Page, InboxError> {
    let counts = counts_of(conn, user)?;
    let version = version_of(conn, user)?;
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let mut sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE user = ?1 AND id < ?2");
    sql.push_str(match q.status {
        Status::All => "",
        Status::Unread => " AND read_ms IS NULL",
        Status::Read => " AND read_ms IS NOT NULL",
        Status::Unseen => " AND seen_ms IS NULL",
    });
    sql.push_str(match q.archived {
        Archived::False => " AND archived_ms IS NULL",
        Archived::True => " AND archived_ms IS NOT NULL",
        Archived::All => "",
    });
    if !q.snoozed {
        sql.push_str(" AND snoozed_until IS NULL");
    }
    sql.push_str(" AND (?3 IS NULL OR category = ?3) ORDER BY id DESC LIMIT ?4");
    let mut items = conn
        .prepare_cached(&sql)?
        .query_map(
            params![
                user,
                q.cursor.unwrap_or(i64::MAX),
                q.category,
                limit as i64 + 1
            ],
            row_item,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|i| i.id)
    } else {
        None
    };
    Ok(Page {
        items,
        next_cursor,
        counts,
        version,
    })
}

/// What the sweep looks for: snoozes that are over.
const SNOOZE_OVER: &str = "snoozed_until <= ?1";

/// What the sweep removes: items whose expiry passed or that are older than `oldest` (`max_age` ago).
fn expired_where(oldest: i64) -> String {
    format!("expires_ms <= ?1 OR created_ms < {oldest}")
}

/// `ORDER BY +id`, not `ORDER BY id`: with a bare `id` SQLite satisfies the order by walking the whole
/// table in id order (the LIMIT makes that look cheap) and never uses the indexes on `snoozed_until`,
/// `expires_ms` and `created_ms`; when nothing is due (most seconds) that is a read of every item, every
/// second, in the writer thread, which every change then waits behind (at 100 M items, 36 GB per sweep).
/// With `+id` the same order comes from sorting only the due rows found through those indexes.
fn due_sql(sql_where: &str) -> String {
    format!("SELECT user, {ITEM_COLUMNS} FROM items WHERE {sql_where} ORDER BY +id LIMIT 1000")
}

/// Items due (`snoozed_until` or expiry passed, or older than `max_age`), grouped by user, at most 1000.
fn due(
    conn: &Connection,
    sql_where: &str,
    now: i64,
) -> Result<BTreeMap<String, Vec<Item>>, InboxError> {
    let mut stmt = conn.prepare_cached(&due_sql(sql_where))?;
    let rows = stmt.query_map([now], |r| {
        let user: String = r.get(0)?;
        let item = Item {
            id: r.get(1)?,
            category: r.get(2)?,
            title: r.get(3)?,
            body: r.get(4)?,
            avatar: r.get(5)?,
            action_url: r.get(6)?,
            actions: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or_default(),
            data: r
                .get::<_, Option<String>>(8)?
                .and_then(|d| serde_json::from_str(&d).ok()),
            created_at: r.get(9)?,
            expires_at: r.get(10)?,
            read_at: r.get(11)?,
            seen_at: r.get(12)?,
            archived_at: r.get(13)?,
            snoozed_until: r.get(14)?,
            action: r.get(15)?,
        };
        Ok((user, item))
    })?;
    let mut out: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    for row in rows {
        let (u, i) = row?;
        out.entry(u).or_default().push(i);
    }
    Ok(out)
}

impl InboxStore for SqliteInbox {
    fn notify(
        &self,
        users: Vec<String>,
        item: NewItem,
        idempotency_key: Option<String>,
    ) -> BoxFuture<'_, Result<NotifyResult, InboxError>> {
        Box::pin(self.write(move |ctx, conn| {
            let prepared = Prepared::new(&item, idempotency_key.as_deref(), super::now_ms())?;
            let mut seen = std::collections::HashSet::new();
            let mut out = NotifyResult::default();
            for u in users {
                if !seen.insert(u.clone()) {
                    continue;
                }
                let (d, ev) = notify_one(ctx, conn, &u, &prepared)?;
                out.delivered.push(d);
                if ev.is_some() {
                    out.event = ev;
                }
            }
            Ok(out)
        }))
    }

    fn list(&self, user: String, q: ListQuery) -> BoxFuture<'_, Result<Page, InboxError>> {
        Box::pin(self.read(move |conn| list_page(conn, &user, &q)))
    }

    fn users(&self, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, InboxError>> {
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT user FROM inboxes WHERE user > ?1 ORDER BY user LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        }))
    }

    fn counts(&self, user: String) -> BoxFuture<'_, Result<(Counts, i64), InboxError>> {
        Box::pin(self.read(move |conn| Ok((counts_of(conn, &user)?, version_of(conn, &user)?))))
    }

    fn get(&self, user: String, id: i64) -> BoxFuture<'_, Result<Item, InboxError>> {
        Box::pin(self.read(move |conn| {
            let mut items = select_items(conn, &user, &Target::Ids(vec![id]))?;
            items
                .pop()
                .ok_or_else(|| InboxError::NotFound(format!("no item {id} in this inbox")))
        }))
    }

    fn update(
        &self,
        user: String,
        target: Target,
        patch: Patch,
    ) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(self.write(move |ctx, conn| {
            let now = super::now_ms();
            if let Some(t) = patch.snoozed_until {
                if t != 0 && t <= now {
                    return Err(invalid(
                        "invalid_snooze",
                        "snoozed_until must be in the future (or 0 to wake the item)",
                    ));
                }
            }
            if patch.action.is_some() && !matches!(target, Target::Ids(_)) {
                return Err(invalid(
                    "invalid_change",
                    "an action is taken on items named by id",
                ));
            }
            let items = select_items(conn, &user, &target)?;
            change_items(ctx, conn, &user, items, &patch, &target, now)
        }))
    }

    fn remove(&self, user: String, target: Target) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(self.write(move |ctx, conn| {
            let items = select_items(conn, &user, &target)?;
            remove_items(ctx, conn, &user, items, &target)
        }))
    }

    fn preferences(&self, user: String) -> BoxFuture<'_, Result<Preferences, InboxError>> {
        Box::pin(self.read(move |conn| preferences_of(conn, &user)))
    }

    fn set_preferences(
        &self,
        user: String,
        prefs: Preferences,
    ) -> BoxFuture<'_, Result<Changed, InboxError>> {
        Box::pin(self.write(move |ctx, conn| {
            if preferences_of(conn, &user)? == prefs {
                return Ok(Changed {
                    changed: 0,
                    counts: counts_of(conn, &user)?,
                    version: version_of(conn, &user)?,
                    event: None,
                });
            }
            let text =
                serde_json::to_string(&prefs).map_err(|e| InboxError::Storage(e.to_string()))?;
            conn.prepare_cached(
                "INSERT INTO inboxes (user, version, preferences) VALUES (?1, 0, ?2)
                 ON CONFLICT (user) DO UPDATE SET preferences = excluded.preferences",
            )?
            .execute(params![user, text])?;
            let mut payload = serde_json::Map::new();
            payload.insert("preferences".into(), json!(prefs));
            let (event, version, counts) = emit(ctx, conn, &user, "preferences", payload)?;
            Ok(Changed {
                changed: 1,
                counts,
                version,
                event: Some(event),
            })
        }))
    }

    fn sweep(&self, now_ms: i64) -> BoxFuture<'_, Result<Option<i64>, InboxError>> {
        Box::pin(self.write(move |ctx, conn| {
            let mut last = None;
            let wake = Patch {
                snoozed_until: Some(0),
                ..Default::default()
            };
            for (user, items) in due(conn, SNOOZE_OVER, now_ms)? {
                let target = Target::Ids(items.iter().map(|i| i.id).collect());
                let c = change_items(ctx, conn, &user, items, &wake, &target, now_ms)?;
                last = c.event.or(last);
            }
            let oldest = now_ms.saturating_sub(ctx.limits.max_age.as_millis() as i64);
            for (user, items) in due(conn, &expired_where(oldest), now_ms)? {
                let target = Target::Ids(items.iter().map(|i| i.id).collect());
                let c = remove_items(ctx, conn, &user, items, &target)?;
                last = c.event.or(last);
            }
            Ok(last)
        }))
    }

    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PendingEvent>, InboxError>> {
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, user, event_id, payload FROM outbox ORDER BY seq LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(PendingEvent {
                    seq: r.get(0)?,
                    user: r.get(1)?,
                    event_id: r.get(2)?,
                    payload: r.get(3)?,
                    in_log: false,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        }))
    }

    fn published(&self, upto: i64) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(self.write(move |_, conn| {
            conn.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?
                .execute([upto])?;
            Ok(())
        }))
    }

    fn recount(&self, repair: bool) -> BoxFuture<'_, Result<i64, InboxError>> {
        if repair {
            Box::pin(self.write(move |_, conn| recount(conn, true)))
        } else {
            Box::pin(self.read(move |conn| recount(conn, false)))
        }
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, InboxError>> {
        Box::pin(self.read(move |conn| {
            let one = |sql: &str| -> Result<i64, InboxError> {
                Ok(conn.query_row(sql, [], |r| r.get(0))?)
            };
            Ok(Stats {
                users: one("SELECT COUNT(DISTINCT user) FROM counts")?,
                items: one("SELECT COUNT(*) FROM items")?,
                pending_events: one("SELECT COUNT(*) FROM outbox")?,
                count_mismatches: recount(conn, false)?,
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::NewItem;

    fn store(dir: &Path) -> SqliteInbox {
        SqliteInbox::open(
            dir.join("inbox.sqlite3"),
            false,
            StoreLimits {
                max_items: 3,
                max_age: Duration::from_secs(3600),
            },
        )
        .unwrap()
    }

    fn item(title: &str) -> NewItem {
        NewItem {
            title: title.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn counts_follow_every_change_and_a_recount_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for t in ["a", "b", "c", "d"] {
            s.notify(vec!["u".into()], item(t), None).await.unwrap();
        }
        let (c, v) = s.counts("u".into()).await.unwrap();
        assert_eq!(
            (c.all.total, c.all.unread, v),
            (3, 3, 4),
            "capped at max_items"
        );
        let page = s.list("u".into(), ListQuery::default()).await.unwrap();
        let ids: Vec<i64> = page.items.iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![4, 3, 2], "newest first; the oldest went");
        let read = Patch {
            read: Some(true),
            ..Default::default()
        };
        let r = s
            .update("u".into(), Target::Ids(vec![3]), read.clone())
            .await
            .unwrap();
        assert_eq!((r.changed, r.counts.all.unread), (1, 2));
        let again = s
            .update("u".into(), Target::Ids(vec![3]), read.clone())
            .await
            .unwrap();
        assert_eq!(
            (again.changed, again.event),
            (0, None),
            "a repeat changes nothing"
        );
        let other = s
            .update("v".into(), Target::Ids(vec![3]), read.clone())
            .await
            .unwrap_err();
        assert!(matches!(other, InboxError::NotFound(_)), "{other}");
        let archive = Patch {
            archived: Some(true),
            ..Default::default()
        };
        let r = s
            .update(
                "u".into(),
                Target::UpTo {
                    upto: 3,
                    category: None,
                },
                archive,
            )
            .await
            .unwrap();
        assert_eq!(
            (r.changed, r.counts.all.unread, r.counts.all.archived),
            (2, 1, 2)
        );
        assert_eq!(s.recount(false).await.unwrap(), 0);
        // A count damaged behind the store's back is found and repaired.
        let conn = Connection::open(dir.path().join("inbox.sqlite3")).unwrap();
        conn.execute("UPDATE counts SET unread = 99", []).unwrap();
        assert_eq!(s.recount(false).await.unwrap(), 1);
        assert_eq!(s.recount(true).await.unwrap(), 1);
        assert_eq!(s.recount(false).await.unwrap(), 0);
        let events = s.pending(100).await.unwrap();
        assert_eq!(
            events.len(),
            6,
            "4 created, 1 read, 1 archive; the repeat made none"
        );
    }

    /// The notify path's shortcuts keep what the slower path gave: the created event is the same JSON as
    /// one built as a map, a muted user or a repeated key leaves the version alone, and counts read back
    /// (version above 1) and counts known (version 1) agree with a recount.
    #[tokio::test]
    async fn notify_shortcuts_keep_events_versions_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut a = item("a");
        a.data = Some(json!({"k": [1, "x"]}));
        a.actions = vec![super::super::ItemAction {
            id: "ok".into(),
            label: "OK".into(),
            url: None,
        }];
        let r = s
            .notify(vec!["u".into(), "u".into()], a.clone(), None)
            .await
            .unwrap();
        assert_eq!(r.delivered.len(), 1, "a user named twice is notified once");
        let id = r.delivered[0].id.unwrap();
        let events = s.pending(10).await.unwrap();
        let stored = s.get("u".into(), id).await.unwrap();
        let (counts, version) = s.counts("u".into()).await.unwrap();
        assert_eq!((counts.all.total, counts.all.unread, version), (1, 1, 1));
        let expected = json!({"item": stored, "type": "created", "version": 1, "counts": counts});
        // The same JSON value (inside the item and the counts the keys now come in their fields'
        // order, not sorted as a map sorts them).
        let got: serde_json::Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(got, expected);
        assert_eq!(
            events[0].event_id,
            format!("inbox-{}-1-u", &events[0].event_id[6..14])
        );

        let mut off = std::collections::BTreeMap::new();
        off.insert("inbox".to_string(), false);
        let prefs = Preferences {
            categories: [("muted".to_string(), off)].into(),
        };
        s.set_preferences("u".into(), prefs).await.unwrap();
        let mut m = item("m");
        m.category = Some("muted".into());
        let r = s.notify(vec!["u".into()], m, None).await.unwrap();
        assert_eq!((r.delivered[0].outcome, r.event), ("muted", None));
        assert_eq!(s.counts("u".into()).await.unwrap().1, 2, "muted: no bump");

        let mut k = item("k");
        k.category = Some("other".into());
        let first = s
            .notify(vec!["u".into(), "w".into()], k.clone(), Some("key".into()))
            .await
            .unwrap();
        let again = s
            .notify(vec!["u".into(), "w".into()], k, Some("key".into()))
            .await
            .unwrap();
        let outcomes: Vec<_> = again.delivered.iter().map(|d| (d.outcome, d.id)).collect();
        let ids: Vec<_> = first
            .delivered
            .iter()
            .map(|d| ("duplicate", d.id))
            .collect();
        assert_eq!(outcomes, ids);
        let (counts, version) = s.counts("u".into()).await.unwrap();
        assert_eq!((counts.all.total, version), (2, 3), "a duplicate: no bump");
        assert_eq!(counts.categories.len(), 2);
        assert_eq!(s.counts("w".into()).await.unwrap().1, 1);
        let events = s.pending(10).await.unwrap();
        assert_eq!(
            events.len(),
            4,
            "2 created for u, its preferences, 1 created for w"
        );
        assert!(
            events[2].event_id.ends_with("-3-u"),
            "{}",
            events[2].event_id
        );
        let last: serde_json::Value = serde_json::from_str(&events[2].payload).unwrap();
        assert_eq!(
            last["counts"],
            json!(counts),
            "counts read back at version 3"
        );
        assert_eq!(s.recount(false).await.unwrap(), 0);
    }

    /// The sweep runs every second in the writer thread: its queries must find due items through an
    /// index, never by reading the whole table (SQLite's plan for `ORDER BY id LIMIT` did).
    #[tokio::test]
    async fn the_sweep_reads_due_items_through_indexes_not_the_whole_table() {
        let dir = tempfile::tempdir().unwrap();
        let _s = store(dir.path());
        let conn = Connection::open(dir.path().join("inbox.sqlite3")).unwrap();
        for wh in [SNOOZE_OVER.to_string(), expired_where(1)] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {}", due_sql(&wh)))
                .unwrap()
                .query_map([0], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|d| !d.starts_with("SCAN items")),
                "{wh}: {plan:?}"
            );
            assert!(
                plan.iter().any(|d| d.contains("USING INDEX items_")),
                "{wh}: {plan:?}"
            );
        }
    }
}
