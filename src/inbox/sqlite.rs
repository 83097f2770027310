//! The inbox on SQLite, in a file of its own beside the log (a notification storm does not queue behind
//! publications, and the log's retention never touches an inbox).
//!
//! One writer thread owns the write connection and commits whatever changes are waiting in one
//! transaction (group commit: one fsync for many requests), each change inside a savepoint, so a change that
//! fails is rolled back alone and the others still commit. Answers are sent only after the commit. Reads use
//! a pool of read-only connections, each read in one transaction, so a page and its counts are one snapshot.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{
    Archived, Changed, Counts, Delivered, InboxError, InboxStore, Item, ListQuery, NewItem,
    NotifyResult, Page, Patch, PendingEvent, Preferences, StartupCheck, Stats, Status, Tally,
    Target, MAX_PAGE,
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
/// Most payload bytes of committed events kept in memory for the publisher (see [`Handover`]).
const HANDOVER_BYTES: usize = 32 << 20;

pub struct SqliteInbox {
    jobs: mpsc::Sender<Job>,
    readers: std::sync::Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    /// The background start-up check's progress, for `stats`.
    check: std::sync::Arc<Mutex<StartupCheck>>,
    handover: Arc<Mutex<Handover>>,
}

/// How the start-up check goes through the inboxes (see [`SqliteInbox::open_with`]).
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Most inboxes recounted in one read transaction (which also ends after 100 ms, so that it never
    /// keeps the WAL from being checkpointed for long).
    pub batch: usize,
    /// A pause before each batch (none by default): leaves the disk and the cores to requests on a
    /// machine that needs them more than it needs the check done soon.
    pub pause: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            batch: 1000,
            pause: Duration::ZERO,
        }
    }
}

/// Committed events handed to the publisher in memory. The outbox table stays the durable record (a
/// crash before an event is in the log loses nothing: the next start reads the table), but reading every
/// event back from the file (a read transaction and a copy of ~500 B per event) and then deleting it in a
/// write of its own that queued behind every waiting change cost the publisher a round trip through the
/// writer per batch. So the writer thread, after each commit, appends the events it committed here, and
/// the publisher's `pending` takes them from memory; `published` forgets them at once and leaves the
/// deletion of their rows to the writer's next transaction (a crash before it: the next start finds the
/// rows, and the publisher, suspect after a start, looks each up in the log before publishing it).
struct Handover {
    /// Events committed and not yet published, in outbox order; every such event above `file_upto` is
    /// here.
    events: VecDeque<PendingEvent>,
    /// Payload bytes in `events`.
    bytes: usize,
    /// Most payload bytes kept; over it (a publisher that cannot keep up), the events are dropped from
    /// memory and read from the file instead.
    cap: usize,
    /// Events at or below this position may be in the file only (left by an earlier run, or dropped when
    /// over `cap`): until the publisher is past it, `pending` reads the file.
    file_upto: i64,
    /// The position published up to.
    published: i64,
    /// Rows up to this position are deleted from the file.
    cleared: i64,
}

impl Handover {
    /// Takes the events of a commit, in their order.
    fn committed(&mut self, events: Vec<PendingEvent>) {
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        let bytes: usize = events.iter().map(|e| e.payload.len()).sum();
        if self.bytes + bytes > self.cap {
            // Every unpublished event is in the file: read from there up to here.
            self.events.clear();
            self.bytes = 0;
            self.file_upto = last;
            return;
        }
        self.bytes += bytes;
        self.events.extend(events);
    }

    fn published(&mut self, upto: i64) {
        self.published = self.published.max(upto);
        while self.events.front().is_some_and(|e| e.seq <= upto) {
            if let Some(e) = self.events.pop_front() {
                self.bytes -= e.payload.len();
            }
        }
    }
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
    /// The events of the transaction in progress, handed over once it commits (a change rolled back to
    /// its savepoint takes its own back out).
    staged: RefCell<Vec<PendingEvent>>,
}

impl SqliteInbox {
    /// [`SqliteInbox::open_with`] the default [`CheckOptions`].
    pub fn open(
        path: impl AsRef<Path>,
        durable: bool,
        limits: StoreLimits,
    ) -> Result<SqliteInbox, InboxError> {
        Self::open_with(path, durable, limits, CheckOptions::default())
    }

    /// Opens (creating if needed) the inbox at `path`, starts the writer thread, and starts the check of
    /// every inbox's counts against its items in the background (`check`; see [`background_check`]): the
    /// store serves at once, whatever the size of the file. `durable`: `synchronous=FULL`, as the log's
    /// `log.durable`.
    pub fn open_with(
        path: impl AsRef<Path>,
        durable: bool,
        limits: StoreLimits,
        check: CheckOptions,
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
        // What an earlier run left unpublished is read from the file; what this run commits, from memory.
        let file_upto: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM outbox", [], |r| r.get(0))?;
        let handover = Arc::new(Mutex::new(Handover {
            events: VecDeque::new(),
            bytes: 0,
            cap: HANDOVER_BYTES,
            file_upto,
            published: 0,
            cleared: 0,
        }));
        let (jobs, rx) = mpsc::channel(QUEUE);
        let ctx = Ctx {
            epoch,
            limits,
            staged: RefCell::new(Vec::new()),
        };
        let shared = handover.clone();
        std::thread::Builder::new()
            .name("herald-inbox".into())
            .spawn(move || run_writer(conn, ctx, rx, shared))
            .map_err(|e| InboxError::Storage(format!("cannot start the inbox writer: {e}")))?;
        let store = SqliteInbox {
            jobs,
            readers: Default::default(),
            path,
            check: Default::default(),
            handover,
        };
        let on = CheckOn {
            jobs: store.jobs.downgrade(),
            readers: store.readers.clone(),
            path: store.path.clone(),
        };
        let progress = store.check.clone();
        std::thread::Builder::new()
            .name("herald-inbox-check".into())
            .spawn(move || background_check(on, check, progress))
            .map_err(|e| InboxError::Storage(format!("cannot start the inbox check: {e}")))?;
        Ok(store)
    }

    /// Runs `f` in its own savepoint in the writer's next transaction; answers after the commit.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ctx, &Connection) -> Result<T, InboxError> + Send + 'static,
    ) -> Result<T, InboxError> {
        write_on(&self.jobs, f).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, InboxError> + Send + 'static,
    ) -> Result<T, InboxError> {
        read_on(&self.readers, &self.path, f).await
    }
}

/// [`SqliteInbox::write`] for whoever holds the writer's queue (the store, its check).
async fn write_on<T: Send + 'static>(
    jobs: &mpsc::Sender<Job>,
    f: impl FnOnce(&Ctx, &Connection) -> Result<T, InboxError> + Send + 'static,
) -> Result<T, InboxError> {
    let (tx, rx) = oneshot::channel::<Result<T, InboxError>>();
    let job: Job = Box::new(move |ctx: &Ctx, conn: &Connection| -> Reply {
        let r = in_savepoint(ctx, conn, || f(ctx, conn));
        Box::new(move |committed: Result<(), InboxError>| {
            let _ = tx.send(committed.and(r));
        })
    });
    jobs.send(job).await.map_err(|_| InboxError::Closed)?;
    rx.await
        .map_err(|_| InboxError::Storage("the inbox writer could not start a transaction".into()))?
}

/// A read in one transaction on a pooled read-only connection (see [`SqliteInbox::read`]).
async fn read_on<T: Send + 'static>(
    readers: &std::sync::Arc<Mutex<Vec<Connection>>>,
    path: &Path,
    f: impl FnOnce(&Connection) -> Result<T, InboxError> + Send + 'static,
) -> Result<T, InboxError> {
    let readers = readers.clone();
    let path = path.to_path_buf();
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

fn in_savepoint<T>(
    ctx: &Ctx,
    conn: &Connection,
    f: impl FnOnce() -> Result<T, InboxError>,
) -> Result<T, InboxError> {
    let staged = ctx.staged.borrow().len();
    let r = (|| {
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
    })();
    if r.is_err() {
        ctx.staged.borrow_mut().truncate(staged);
    }
    r
}

/// Deletes the rows of published events, in the transaction in progress; the position cleared up to
/// once it commits.
fn clear_published(ctx: &Ctx, conn: &Connection, handover: &Mutex<Handover>) -> Option<i64> {
    let (published, cleared) = {
        let h = handover.lock();
        (h.published, h.cleared)
    };
    if published <= cleared {
        return None;
    }
    let deleted = in_savepoint(ctx, conn, || {
        conn.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?
            .execute([published])?;
        Ok(())
    });
    match deleted {
        Ok(()) => Some(published),
        Err(e) => {
            tracing::warn!(error = %e, "inbox: cannot clear published events");
            None
        }
    }
}

/// The writer thread: takes what is waiting, runs each change in its savepoint, commits once, hands the
/// committed events to the publisher, answers.
fn run_writer(
    conn: Connection,
    ctx: Ctx,
    mut rx: mpsc::Receiver<Job>,
    handover: Arc<Mutex<Handover>>,
) {
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
        let cleared = clear_published(&ctx, &conn, &handover);
        let replies: Vec<Reply> = jobs.into_iter().map(|j| j(&ctx, &conn)).collect();
        let committed = conn.execute_batch("COMMIT").map_err(InboxError::from);
        let staged = std::mem::take(&mut *ctx.staged.borrow_mut());
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        } else {
            // Before the answers: a caller waits for its event to be published, which starts here.
            let mut h = handover.lock();
            h.committed(staged);
            if let Some(upto) = cleared {
                h.cleared = h.cleared.max(upto);
            }
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

/// The tally in columns 1 to 4 of a row (total, unread, unseen, archived), after its key in column 0.
fn tally_at(r: &rusqlite::Row<'_>) -> rusqlite::Result<Tally> {
    Ok(Tally {
        total: r.get(1)?,
        unread: r.get(2)?,
        unseen: r.get(3)?,
        archived: r.get(4)?,
    })
}

fn counts_of(conn: &Connection, user: &str) -> Result<Counts, InboxError> {
    let mut stmt = conn.prepare_cached(
        "SELECT category, total, unread, unseen, archived FROM counts WHERE user = ?1",
    )?;
    let rows = stmt.query_map([user], |r| Ok((r.get::<_, String>(0)?, tally_at(r)?)))?;
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
    Ok((enqueue(ctx, conn, user, version, payload)?, version, counts))
}

/// Commits an event of `user` at `version` in the outbox (and stages it for the hand-over); returns its
/// outbox position.
fn enqueue(
    ctx: &Ctx,
    conn: &Connection,
    user: &str,
    version: i64,
    payload: String,
) -> Result<i64, InboxError> {
    let event_id = event_id(ctx, version, user);
    conn.prepare_cached("INSERT INTO outbox (user, event_id, payload) VALUES (?1, ?2, ?3)")?
        .execute(params![user, event_id, payload])?;
    let seq = conn.last_insert_rowid();
    ctx.staged.borrow_mut().push(PendingEvent {
        seq,
        user: user.to_string(),
        event_id,
        payload,
        in_log: false,
    });
    Ok(seq)
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
    let (kind, payload) = super::updated_event(&changed, target, patch);
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
    let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
    let (kind, payload) = super::removed_event(&ids, target);
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

/// Users of a notify per batch of statements. Each statement takes the batch's users as one JSON array
/// (`json_each`), so its parameters do not grow with the batch.
const NOTIFY_BATCH: usize = 500;
/// Outbox rows per multi-row insert (3 parameters each); the rest of a batch goes in one by one.
const OUTBOX_ROWS: usize = 64;

/// Notifies each of `users` once (a user named twice is notified once), in the order given.
fn notify_users(
    ctx: &Ctx,
    conn: &Connection,
    users: &[String],
    p: &Prepared<'_>,
) -> Result<NotifyResult, InboxError> {
    let mut seen = HashSet::with_capacity(users.len());
    let users: Vec<&str> = users
        .iter()
        .map(String::as_str)
        .filter(|u| seen.insert(*u))
        .collect();
    let mut out = NotifyResult {
        delivered: Vec::with_capacity(users.len()),
        event: None,
    };
    for batch in users.chunks(NOTIFY_BATCH) {
        notify_batch(ctx, conn, batch, p, &mut out)?;
    }
    Ok(out)
}

/// Rows of a statement that returns (user, value), keyed by user.
fn by_user<T>(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
    value: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<HashMap<String, T>, InboxError> {
    let mut out = HashMap::new();
    let mut rows = stmt.query(params)?;
    while let Some(r) = rows.next()? {
        out.insert(r.get(0)?, value(r)?);
    }
    Ok(out)
}

/// One batch of a notify's users. The writer thread's time goes per statement as much as per row, so the
/// common case (a user who does not mute the category) costs a share of 4 statements for the whole batch
/// (the version bumps, which also return the preferences; the items; the count upserts, which return each
/// user's new tally; the outbox rows, `OUTBOX_ROWS` at a time) rather than 4 of its own. The rarer work
/// stays per user: reading the counts back (an inbox that had events before) and the per-inbox cap.
fn notify_batch(
    ctx: &Ctx,
    conn: &Connection,
    users: &[&str],
    p: &Prepared<'_>,
    out: &mut NotifyResult,
) -> Result<(), InboxError> {
    let storage = |e: serde_json::Error| InboxError::Storage(e.to_string());
    let missing =
        |what: &str, user: &str| InboxError::Storage(format!("no {what} for user {user}"));
    let list = serde_json::to_string(users).map_err(storage)?;
    // The versions are bumped first because the same statement returns the preferences; a muted user or
    // a duplicate gets its bump undone, in this same change. Either needs a row that was there before (a
    // new row has no preferences and no items), so taking one off restores its version exactly.
    let bumped = by_user(
        &mut conn.prepare_cached(
            "INSERT INTO inboxes (user, version) SELECT value, 1 FROM json_each(?1) WHERE true
             ON CONFLICT (user) DO UPDATE SET version = version + 1 RETURNING user, version, preferences",
        )?,
        [&list],
        |r| Ok((r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?)),
    )?;
    let duplicates = match p.key {
        Some(k) => by_user(
            &mut conn.prepare_cached(
                "SELECT user, id FROM items WHERE user IN (SELECT value FROM json_each(?1)) AND idem_key = ?2",
            )?,
            params![list, k],
            |r| r.get::<_, i64>(1),
        )?,
        None => HashMap::new(),
    };
    let item = p.item;
    let category = item.category();
    // Per user in order: None to create, or the outcome that creates nothing.
    let mut skipped: Vec<Option<(&'static str, Option<i64>)>> = Vec::with_capacity(users.len());
    let mut create: Vec<&str> = Vec::with_capacity(users.len());
    let mut undo: Vec<&str> = Vec::new();
    for &u in users {
        let (_, prefs) = bumped.get(u).ok_or_else(|| missing("inbox", u))?;
        let allowed = prefs
            .as_deref()
            .and_then(|t| serde_json::from_str::<Preferences>(t).ok())
            .is_none_or(|prefs| prefs.allows(category, "inbox"));
        let outcome = if !allowed {
            Some(("muted", None))
        } else {
            duplicates.get(u).map(|id| ("duplicate", Some(*id)))
        };
        match outcome {
            Some(_) => undo.push(u),
            None => create.push(u),
        }
        skipped.push(outcome);
    }
    if !undo.is_empty() {
        conn.prepare_cached(
            "UPDATE inboxes SET version = version - 1 WHERE user IN (SELECT value FROM json_each(?1))",
        )?
        .execute([serde_json::to_string(&undo).map_err(storage)?])?;
    }
    let mut ids = HashMap::new();
    let mut tallies = HashMap::new();
    if !create.is_empty() {
        let list = serde_json::to_string(&create).map_err(storage)?;
        ids = by_user(
            &mut conn.prepare_cached(
                "INSERT INTO items (user, category, title, body, avatar, action_url, actions, data,
                     created_ms, expires_ms, idem_key)
                 SELECT value, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 FROM json_each(?1)
                 RETURNING user, id",
            )?,
            params![
                list,
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
            ],
            |r| r.get::<_, i64>(1),
        )?;
        let d = p.contribution;
        tallies = by_user(
            &mut conn.prepare_cached(
                "INSERT INTO counts (user, category, total, unread, unseen, archived)
                 SELECT value, ?2, ?3, ?4, ?5, ?6 FROM json_each(?1) WHERE true
                 ON CONFLICT (user, category) DO UPDATE SET total = total + excluded.total,
                     unread = unread + excluded.unread, unseen = unseen + excluded.unseen,
                     archived = archived + excluded.archived
                 RETURNING user, total, unread, unseen, archived",
            )?,
            params![list, category, d.total, d.unread, d.unseen, d.archived],
            tally_at,
        )?;
    }
    let mut events = Vec::with_capacity(create.len());
    for &u in &create {
        let version = bumped.get(u).ok_or_else(|| missing("inbox", u))?.0;
        let id = *ids.get(u).ok_or_else(|| missing("item", u))?;
        let tally = *tallies.get(u).ok_or_else(|| missing("counts", u))?;
        // Every change that makes an event bumps the version, and every item came in with one; so at
        // version 1 this item is the inbox's first and its category's tally is all of the counts (the
        // common case of a notification storm: no counts read back).
        let mut counts = if version == 1 {
            Counts::from_categories(BTreeMap::from([(category.to_string(), tally)]))
        } else {
            counts_of(conn, u)?
        };
        // Over the cap: the oldest items go, in this same change.
        let over = counts.all.total - ctx.limits.max_items as i64;
        let mut removed = Vec::new();
        if over > 0 {
            let sql =
                format!("SELECT {ITEM_COLUMNS} FROM items WHERE user = ?1 ORDER BY id LIMIT ?2");
            let oldest = conn
                .prepare_cached(&sql)?
                .query_map(params![u, over], row_item)?
                .collect::<Result<Vec<_>, _>>()?;
            for it in oldest {
                conn.prepare_cached("DELETE FROM items WHERE id = ?1")?
                    .execute([it.id])?;
                let mut d = Tally::default();
                d.add(&contribution(&it), -1);
                apply(conn, u, &it.category, &d)?;
                removed.push(it.id);
            }
            counts = counts_of(conn, u)?;
        }
        let payload = created_payload(&counts, id, &p.item_tail, &removed, version)?;
        events.push(PendingEvent {
            seq: 0,
            user: u.to_string(),
            event_id: event_id(ctx, version, u),
            payload,
            in_log: false,
        });
    }
    let last = enqueue_all(ctx, conn, events)?;
    out.event = last.or(out.event);
    for (&u, outcome) in users.iter().zip(skipped) {
        let (outcome, id) = match outcome {
            Some(o) => o,
            None => ("created", ids.get(u).copied()),
        };
        out.delivered.push(Delivered {
            user: u.to_string(),
            id,
            outcome,
        });
    }
    Ok(())
}

/// Commits `events` (of distinct users) in the outbox and stages them for the hand-over, in outbox
/// order; returns the last one's position.
fn enqueue_all(
    ctx: &Ctx,
    conn: &Connection,
    mut events: Vec<PendingEvent>,
) -> Result<Option<i64>, InboxError> {
    let mut rows = events.chunks_exact_mut(OUTBOX_ROWS);
    if rows.len() > 0 {
        let sql = format!(
            "INSERT INTO outbox (user, event_id, payload) VALUES {} RETURNING user, seq",
            vec!["(?, ?, ?)"; OUTBOX_ROWS].join(", ")
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        for chunk in rows.by_ref() {
            let args = chunk
                .iter()
                .flat_map(|e| [e.user.as_str(), e.event_id.as_str(), e.payload.as_str()]);
            let seqs = by_user(&mut stmt, params_from_iter(args), |r| r.get::<_, i64>(1))?;
            for e in chunk.iter_mut() {
                e.seq = *seqs
                    .get(&e.user)
                    .ok_or_else(|| InboxError::Storage(format!("no outbox row for {}", e.user)))?;
            }
        }
    }
    for e in rows.into_remainder() {
        conn.prepare_cached("INSERT INTO outbox (user, event_id, payload) VALUES (?1, ?2, ?3)")?
            .execute(params![e.user, e.event_id, e.payload])?;
        e.seq = conn.last_insert_rowid();
    }
    events.sort_unstable_by_key(|e| e.seq);
    let last = events.last().map(|e| e.seq);
    ctx.staged.borrow_mut().extend(events);
    Ok(last)
}

fn event_id(ctx: &Ctx, version: i64, user: &str) -> String {
    format!("inbox-{}-{version}-{user}", ctx.epoch)
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

/// How many (user, category) counts differ from a recount of the items, in one snapshot of the whole file
/// (reads every item: `inbox_stats`' figure, an operator's tool).
fn count_mismatches(conn: &Connection) -> Result<i64, InboxError> {
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
    Ok(differing(&actual, &stored))
}

/// Keys whose tallies differ between `a` and `b`, counting keys present in only one of them.
fn differing<K: Ord>(a: &BTreeMap<K, Tally>, b: &BTreeMap<K, Tally>) -> i64 {
    let changed = a.iter().filter(|(k, t)| b.get(*k) != Some(*t)).count();
    let gone = b.keys().filter(|k| !a.contains_key(*k)).count();
    (changed + gone) as i64
}

/// One user's counts, per category: what the items add up to, and what is stored.
type UserTallies = (BTreeMap<String, Tally>, BTreeMap<String, Tally>);

fn user_tallies(conn: &Connection, user: &str) -> Result<UserTallies, InboxError> {
    let read = |sql: &str| -> Result<BTreeMap<String, Tally>, InboxError> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map([user], |r| Ok((r.get::<_, String>(0)?, tally_at(r)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    // One walk of the user's part of the `(user, id)` index, a table lookup per item.
    let actual = read(
        "SELECT category, COUNT(*),
             SUM(archived_ms IS NULL AND snoozed_until IS NULL AND read_ms IS NULL),
             SUM(archived_ms IS NULL AND snoozed_until IS NULL AND seen_ms IS NULL),
             SUM(archived_ms IS NOT NULL)
         FROM items WHERE user = ?1 GROUP BY category",
    )?;
    let stored =
        read("SELECT category, total, unread, unseen, archived FROM counts WHERE user = ?1")?;
    Ok((actual, stored))
}

/// The first user after `after` (or the first of all) that has items or stored counts: the check walks
/// both, so that counts left for a user with no items are found too.
fn next_user(conn: &Connection, after: Option<&str>) -> Result<Option<String>, InboxError> {
    let first = |table: &str| -> Result<Option<String>, InboxError> {
        Ok(match after {
            Some(a) => conn
                .prepare_cached(&format!(
                    "SELECT user FROM {table} WHERE user > ?1 ORDER BY user LIMIT 1"
                ))?
                .query_row([a], |r| r.get(0))
                .optional()?,
            None => conn
                .prepare_cached(&format!("SELECT user FROM {table} ORDER BY user LIMIT 1"))?
                .query_row([], |r| r.get(0))
                .optional()?,
        })
    };
    Ok(match (first("items")?, first("counts")?) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// A read batch of the check ends after this long (and at least one inbox).
const CHECK_READ_BUDGET: Duration = Duration::from_millis(100);
/// A repair in the writer ends after this long (and at least one inbox), so that changes queued behind
/// it wait little.
const CHECK_WRITE_BUDGET: Duration = Duration::from_millis(5);

/// What one read batch of the check found.
struct CheckedBatch {
    /// The last user checked (where the next batch starts), `None` if there was none.
    last: Option<String>,
    users: i64,
    /// Users whose counts differed from their items in this snapshot.
    suspects: Vec<String>,
    /// No user after `last`.
    done: bool,
}

/// Recounts the inboxes after `after`, in a read transaction (one snapshot, so the stored counts and the
/// items it compares are of the same moment), until `max` users or [`CHECK_READ_BUDGET`].
fn check_batch(
    conn: &Connection,
    after: Option<String>,
    max: usize,
) -> Result<CheckedBatch, InboxError> {
    let started = std::time::Instant::now();
    let mut b = CheckedBatch {
        last: after,
        users: 0,
        suspects: Vec::new(),
        done: false,
    };
    while b.users < max.max(1) as i64 && (b.users == 0 || started.elapsed() < CHECK_READ_BUDGET) {
        let Some(user) = next_user(conn, b.last.as_deref())? else {
            b.done = true;
            break;
        };
        let (actual, stored) = user_tallies(conn, &user)?;
        if differing(&actual, &stored) > 0 {
            b.suspects.push(user.clone());
        }
        b.users += 1;
        b.last = Some(user);
    }
    Ok(b)
}

/// In the writer (so nothing else changes these inboxes meanwhile): recounts each user again and
/// rewrites the counts that differ, until [`CHECK_WRITE_BUDGET`]. Returns how many users it went through
/// and, per repaired user, how many of its counts differed. Deciding here, not from the read snapshot,
/// is what keeps a change committed since the snapshot from being undone by a repair.
fn repair_users(
    conn: &Connection,
    users: &[String],
) -> Result<(usize, Vec<(String, i64)>), InboxError> {
    let started = std::time::Instant::now();
    let mut repaired = Vec::new();
    let mut done = 0;
    for user in users {
        if done > 0 && started.elapsed() >= CHECK_WRITE_BUDGET {
            break;
        }
        done += 1;
        let (actual, stored) = user_tallies(conn, user)?;
        let differ = differing(&actual, &stored);
        if differ == 0 {
            continue;
        }
        conn.prepare_cached("DELETE FROM counts WHERE user = ?1")?
            .execute([user])?;
        for (category, t) in &actual {
            conn.prepare_cached(
                "INSERT INTO counts (user, category, total, unread, unseen, archived)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                user, category, t.total, t.unread, t.unseen, t.archived
            ])?;
        }
        repaired.push((user.clone(), differ));
    }
    Ok((done, repaired))
}

/// What the check needs of the store: the writer's queue (weak, so that the check never keeps a closed
/// store's writer alive), the read connections, the file.
struct CheckOn {
    jobs: mpsc::WeakSender<Job>,
    readers: std::sync::Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
}

/// Waits `d`, or less if the store closes meanwhile (then `Closed`).
async fn pause(on: &CheckOn, d: Duration) -> Result<(), InboxError> {
    let until = tokio::time::Instant::now() + d;
    loop {
        if on.jobs.upgrade().is_none() {
            return Err(InboxError::Closed);
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return Ok(());
        }
        tokio::time::sleep_until(until.min(now + Duration::from_millis(100))).await;
    }
}

/// Repaired users named one by one in the log; beyond them, only the total.
const LOGGED_REPAIRS: usize = 20;

/// Checks every inbox's counts against its items, in user order: each batch recounts up to `o.batch`
/// users in a read snapshot, off the writer; only the users whose counts differed there are recounted
/// again in the writer and repaired ([`repair_users`]). So a check of a file whose counts are right costs
/// the writer nothing, and a change waits behind at most one short repair. Progress goes to `progress`
/// after each batch. Returns the counts repaired.
async fn check_all(
    on: &CheckOn,
    o: CheckOptions,
    progress: Option<&Mutex<StartupCheck>>,
) -> Result<i64, InboxError> {
    let (mut after, mut repaired, mut logged) = (None, 0i64, 0usize);
    loop {
        pause(on, o.pause).await?;
        let batch = o.batch;
        let b = read_on(&on.readers, &on.path, move |conn| {
            check_batch(conn, after, batch)
        })
        .await?;
        let mut suspects = b.suspects;
        while !suspects.is_empty() {
            let jobs = on.jobs.upgrade().ok_or(InboxError::Closed)?;
            let these = suspects.clone();
            let (done, fixed) = write_on(&jobs, move |_, conn| repair_users(conn, &these)).await?;
            suspects.drain(..done.min(suspects.len()));
            for (user, n) in fixed {
                repaired += n;
                metrics::counter!("herald_inbox_recount_repairs_total").increment(n as u64);
                if logged < LOGGED_REPAIRS {
                    logged += 1;
                    tracing::warn!(
                        user = %user,
                        counts = n,
                        "inbox: counts differed from the items and were repaired"
                    );
                }
            }
        }
        if let Some(p) = progress {
            let mut p = p.lock();
            p.users_checked += b.users;
            p.repaired = repaired;
            metrics::gauge!("herald_inbox_startup_check_users").set(p.users_checked as f64);
        }
        if b.done {
            return Ok(repaired);
        }
        after = b.last;
    }
}

/// The start-up check, on a thread of its own started by [`SqliteInbox::open_with`]: [`check_all`], then
/// the result logged and kept for `stats`. A restart in the middle starts again from the first user (it
/// keeps no position in the file); it repairs nothing twice, since what it repaired already matches.
fn background_check(on: CheckOn, o: CheckOptions, progress: std::sync::Arc<Mutex<StartupCheck>>) {
    let started = std::time::Instant::now();
    metrics::gauge!("herald_inbox_startup_check_finished").set(0.0);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "inbox: the start-up check could not start");
            progress.lock().error = Some(format!("could not start: {e}"));
            return;
        }
    };
    let path = on.path.display().to_string();
    match rt.block_on(check_all(&on, o, Some(&progress))) {
        Ok(repaired) => {
            let mut p = progress.lock();
            p.finished = true;
            p.duration_ms = Some(started.elapsed().as_millis() as u64);
            metrics::gauge!("herald_inbox_startup_check_finished").set(1.0);
            if repaired > 0 {
                tracing::warn!(
                    repaired,
                    users = p.users_checked,
                    secs = started.elapsed().as_secs_f64(),
                    path = %path,
                    "inbox: start-up check done: counts differed from the items and were repaired"
                );
            } else {
                tracing::info!(
                    users = p.users_checked,
                    secs = started.elapsed().as_secs_f64(),
                    path = %path,
                    "inbox: start-up check done: counts match the items"
                );
            }
        }
        Err(InboxError::Closed) => tracing::debug!("inbox: start-up check stopped with the store"),
        Err(e) => {
            tracing::warn!(error = %e, path = %path, "inbox: the start-up check stopped");
            progress.lock().error = Some(e.to_string());
        }
    }
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
            notify_users(ctx, conn, &users, &prepared)
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
            patch.check(&target, now)?;
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
        let published = {
            let h = self.handover.lock();
            if h.published >= h.file_upto {
                let events: Vec<PendingEvent> = h.events.iter().take(limit).cloned().collect();
                return Box::pin(async move { Ok(events) });
            }
            h.published
        };
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, user, event_id, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![published, limit as i64], |r| {
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
        self.handover.lock().published(upto);
        // The rows go in the writer's next transaction; an empty change makes sure there is one soon
        // (when the queue is full, the writer has transactions coming anyway).
        let nothing: Job = Box::new(|_, _| Box::new(|_| {}));
        let _ = self.jobs.try_send(nothing);
        Box::pin(async { Ok(()) })
    }

    /// With `repair`, the start-up check's walk ([`check_all`]), awaited: it never holds the writer for
    /// more than a short repair, whatever the size of the file.
    fn recount(&self, repair: bool) -> BoxFuture<'_, Result<i64, InboxError>> {
        if repair {
            Box::pin(async move {
                let on = CheckOn {
                    jobs: self.jobs.downgrade(),
                    readers: self.readers.clone(),
                    path: self.path.clone(),
                };
                check_all(&on, CheckOptions::default(), None).await
            })
        } else {
            Box::pin(self.read(count_mismatches))
        }
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, InboxError>> {
        // Taken before the counts are compared: a check that had not finished then may have repaired
        // what `count_mismatches` finds by the time it is read.
        let startup_check = self.check.lock().clone();
        let published = self.handover.lock().published;
        Box::pin(self.read(move |conn| {
            let one = |sql: &str| -> Result<i64, InboxError> {
                Ok(conn.query_row(sql, [], |r| r.get(0))?)
            };
            Ok(Stats {
                users: one("SELECT COUNT(DISTINCT user) FROM counts")?,
                items: one("SELECT COUNT(*) FROM items")?,
                // Rows of published events not deleted yet are not pending.
                pending_events: conn.query_row(
                    "SELECT COUNT(*) FROM outbox WHERE seq > ?1",
                    [published],
                    |r| r.get(0),
                )?,
                count_mismatches: count_mismatches(conn)?,
                startup_check,
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::NewItem;

    /// A store whose start-up check waits an hour before it starts (until the store closes): the tests
    /// that damage counts decide when they are checked.
    fn store(dir: &Path) -> SqliteInbox {
        let later = CheckOptions {
            batch: 1000,
            pause: Duration::from_secs(3600),
        };
        SqliteInbox::open_with(
            dir.join("inbox.sqlite3"),
            false,
            StoreLimits {
                max_items: 3,
                max_age: Duration::from_secs(3600),
            },
            later,
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

    /// The check compares each inbox in a read snapshot and repairs in the writer: a change committed
    /// between the two is kept (the repair recounts again), and an inbox whose counts are right is
    /// left alone.
    #[tokio::test]
    async fn a_repair_decided_in_the_writer_keeps_a_change_made_after_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for t in ["a", "b"] {
            s.notify(vec!["u".into(), "v".into()], item(t), None)
                .await
                .unwrap();
        }
        let conn = Connection::open(dir.path().join("inbox.sqlite3")).unwrap();
        conn.execute("UPDATE counts SET unread = 99 WHERE user = 'u'", [])
            .unwrap();
        let b = s.read(|c| check_batch(c, None, 10)).await.unwrap();
        assert_eq!(
            (b.users, b.suspects.clone(), b.done),
            (2, vec!["u".to_string()], true)
        );
        let id = s
            .list("u".into(), ListQuery::default())
            .await
            .unwrap()
            .items[0]
            .id;
        let read = Patch {
            read: Some(true),
            ..Default::default()
        };
        s.update("u".into(), Target::Ids(vec![id]), read)
            .await
            .unwrap();
        let users = vec!["u".to_string(), "v".to_string()];
        let (done, fixed) = s.write(move |_, c| repair_users(c, &users)).await.unwrap();
        assert_eq!(
            (done, fixed),
            (2, vec![("u".to_string(), 1)]),
            "v was right"
        );
        let (c, _) = s.counts("u".into()).await.unwrap();
        assert_eq!(
            (c.all.total, c.all.unread),
            (2, 1),
            "the read after the snapshot kept"
        );
        assert_eq!(s.recount(false).await.unwrap(), 0);
    }

    /// A store opened on damaged counts answers at once; its check, in the background, finds and
    /// repairs them, and says so in `stats`.
    #[tokio::test]
    async fn the_start_up_check_repairs_in_the_background_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.sqlite3");
        let users: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
        {
            let s = store(dir.path());
            s.notify(users.clone(), item("a"), None).await.unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "UPDATE counts SET unseen = 7 WHERE user IN ('u1', 'u3');
             INSERT INTO counts VALUES ('ghost', 'x', 5, 5, 5, 0);",
        )
        .unwrap();
        let limits = StoreLimits {
            max_items: 3,
            max_age: Duration::from_secs(3600),
        };
        // One inbox per batch, a pause before each: the check cannot be over before `stats` answers.
        let slow = CheckOptions {
            batch: 1,
            pause: Duration::from_millis(300),
        };
        let s = SqliteInbox::open_with(&path, false, limits, slow).unwrap();
        let first = s.stats().await.unwrap();
        assert!(!first.startup_check.finished, "{first:?}");
        assert_eq!(first.count_mismatches, 3, "not repaired yet");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let done = loop {
            let st = s.stats().await.unwrap();
            if st.startup_check.finished {
                break st;
            }
            assert!(std::time::Instant::now() < deadline, "{st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let c = &done.startup_check;
        assert_eq!((c.users_checked, c.repaired, c.error.clone()), (6, 3, None));
        assert!(c.duration_ms.unwrap() >= 6 * 300, "{c:?}");
        assert_eq!(done.count_mismatches, 0);
        assert_eq!(s.counts("ghost".into()).await.unwrap().0.all.total, 0);
    }

    /// A notify of more users than one batch of statements (and than one multi-row outbox insert) gives
    /// each user what one user at a time gave: outcomes in the order named, muted users and repeated keys
    /// untouched, counts read back where the inbox had events, the cap applied, one event per created item
    /// with that user's version and counts, in outbox order, and counts equal to a recount.
    #[tokio::test]
    async fn a_notify_in_batches_gives_each_user_what_one_at_a_time_did() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let n = NOTIFY_BATCH * 2 + OUTBOX_ROWS + 7;
        let users: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
        // u0..u9 are full (3 items: the cap), u10..u59 had one item, u100..u149 mute "c", u150..u199
        // used the key before.
        for _ in 0..3 {
            s.notify(users[..10].to_vec(), item("old"), None)
                .await
                .unwrap();
        }
        s.notify(users[10..60].to_vec(), item("old"), None)
            .await
            .unwrap();
        let mut off = BTreeMap::new();
        off.insert("inbox".to_string(), false);
        let mute = Preferences {
            categories: [("c".to_string(), off)].into(),
        };
        for u in &users[100..150] {
            s.set_preferences(u.clone(), mute.clone()).await.unwrap();
        }
        let mut c = item("new");
        c.category = Some("c".into());
        let first = s
            .notify(users[150..200].to_vec(), c.clone(), Some("k".into()))
            .await
            .unwrap();
        let before: Vec<(Counts, i64)> = {
            let mut v = Vec::new();
            for u in &users {
                v.push(s.counts(u.clone()).await.unwrap());
            }
            v
        };
        let skip = s.pending(100_000).await.unwrap().last().unwrap().seq;
        s.published(skip).await.unwrap();

        let mut named = users.clone();
        named.insert(7, "u3".into());
        let r = s.notify(named, c, Some("k".into())).await.unwrap();
        let got: Vec<&str> = r.delivered.iter().map(|d| d.user.as_str()).collect();
        assert_eq!(got, users.iter().map(String::as_str).collect::<Vec<_>>());
        let events = s.pending(100_000).await.unwrap();
        assert_eq!(events.len(), n - 100, "one event per created item");
        assert_eq!(r.event, events.last().map(|e| e.seq));
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        let file = outbox_rows(dir.path());
        assert_eq!(as_rows(&events), file[file.len() - events.len()..]);
        let by_user: HashMap<&str, &PendingEvent> =
            events.iter().map(|e| (e.user.as_str(), e)).collect();
        for (i, (u, d)) in users.iter().zip(&r.delivered).enumerate() {
            let (counts, version) = s.counts(u.clone()).await.unwrap();
            let (old_counts, old_version) = &before[i];
            match i {
                100..=149 => {
                    assert_eq!((d.outcome, d.id), ("muted", None), "{u}");
                    assert_eq!((&counts, version), (old_counts, *old_version), "{u}");
                    assert!(!by_user.contains_key(u.as_str()));
                }
                150..=199 => {
                    assert_eq!(d.outcome, "duplicate", "{u}");
                    assert_eq!(d.id, first.delivered[i - 150].id, "{u}");
                    assert_eq!((&counts, version), (old_counts, *old_version), "{u}");
                    assert!(!by_user.contains_key(u.as_str()));
                }
                _ => {
                    assert_eq!(d.outcome, "created", "{u}");
                    assert_eq!(version, old_version + 1, "{u}");
                    let e = by_user[u.as_str()];
                    assert!(e.event_id.ends_with(&format!("-{version}-{u}")), "{u}");
                    let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
                    assert_eq!(v["version"], json!(version), "{u}");
                    assert_eq!(v["counts"], json!(counts), "{u}");
                    assert_eq!(v["item"]["id"], json!(d.id.unwrap()), "{u}");
                    assert_eq!(v["item"]["title"], "new");
                    let removed = v.get("removed").map_or(0, |r| r.as_array().unwrap().len());
                    assert_eq!(removed, usize::from(i < 10), "{u}: the cap");
                    let total = (old_counts.all.total + 1).min(3);
                    assert_eq!(counts.all.total, total, "{u}");
                }
            }
        }
        assert_eq!(s.recount(false).await.unwrap(), 0);
    }

    /// The outbox rows as the file has them: (seq, user, event_id, payload).
    fn outbox_rows(dir: &Path) -> Vec<(i64, String, String, String)> {
        let conn = Connection::open(dir.join("inbox.sqlite3")).unwrap();
        let mut stmt = conn
            .prepare("SELECT seq, user, event_id, payload FROM outbox ORDER BY seq")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    fn as_rows(events: &[PendingEvent]) -> Vec<(i64, String, String, String)> {
        events
            .iter()
            .map(|e| (e.seq, e.user.clone(), e.event_id.clone(), e.payload.clone()))
            .collect()
    }

    /// The publisher gets the events this run committed from memory, exactly as the file has them; a
    /// published event is not handed out again and its row goes with the writer's next transaction; what
    /// was not published when the store stopped comes from the file at the next start, then memory again.
    #[tokio::test]
    async fn committed_events_are_handed_over_in_memory_and_the_file_backs_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.notify(vec!["u".into(), "v".into(), "w".into()], item("a"), None)
            .await
            .unwrap();
        let read = Patch {
            read: Some(true),
            ..Default::default()
        };
        s.update("u".into(), Target::Ids(vec![1]), read)
            .await
            .unwrap();
        let events = s.pending(100).await.unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(as_rows(&events), outbox_rows(dir.path()), "memory = file");
        assert_eq!(s.pending(2).await.unwrap().len(), 2, "the limit holds");

        s.published(events[1].seq).await.unwrap();
        assert_eq!(
            as_rows(&s.pending(100).await.unwrap()),
            as_rows(&events[2..])
        );
        assert_eq!(s.stats().await.unwrap().pending_events, 2);
        // The next transaction clears the published rows.
        s.notify(vec!["x".into()], item("b"), None).await.unwrap();
        let rows = outbox_rows(dir.path());
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[..2], as_rows(&events[2..]));
        drop(s);

        // A new start reads what is left from the file, in order, then takes new events from memory.
        let s = store(dir.path());
        let left = s.pending(100).await.unwrap();
        assert_eq!(as_rows(&left), rows);
        s.published(left[0].seq).await.unwrap();
        assert_eq!(as_rows(&s.pending(100).await.unwrap()), rows[1..]);
        s.notify(vec!["y".into()], item("c"), None).await.unwrap();
        let upto = left.last().unwrap().seq;
        s.published(upto).await.unwrap();
        let new = s.pending(100).await.unwrap();
        assert_eq!(new.len(), 1);
        assert!(new[0].seq > upto && new[0].user == "y", "{new:?}");
        assert!(s.handover.lock().file_upto <= upto, "from memory now");
        // (The rows up to `upto` may still be there: they go with the writer's next transaction.)
        assert_eq!(as_rows(&new).last(), outbox_rows(dir.path()).last());
    }

    /// A publisher that falls behind by more than the hand-over holds reads the file instead, and gets
    /// every event once, in order, across the switch and back.
    #[tokio::test]
    async fn over_its_bound_the_hand_over_falls_back_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.notify(vec!["u".into()], item("a"), None).await.unwrap();
        s.handover.lock().cap = 1;
        s.notify(vec!["v".into(), "w".into()], item("b"), None)
            .await
            .unwrap();
        {
            let h = s.handover.lock();
            assert!(
                h.events.is_empty() && h.file_upto == 3,
                "dropped to the file"
            );
        }
        s.handover.lock().cap = HANDOVER_BYTES;
        s.notify(vec!["x".into()], item("c"), None).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..10 {
            let batch = s.pending(2).await.unwrap();
            let Some(last) = batch.last().map(|e| e.seq) else {
                break;
            };
            got.extend(batch);
            s.published(last).await.unwrap();
        }
        let users: Vec<&str> = got.iter().map(|e| e.user.as_str()).collect();
        assert_eq!(users, ["u", "v", "w", "x"]);
        let seqs: Vec<i64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    /// A change that fails after writing its event takes the event back out of the hand-over with its
    /// savepoint; the changes committed beside it keep theirs.
    #[tokio::test]
    async fn a_failed_change_hands_over_no_event() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let failed = s.write(|ctx, conn| {
            enqueue(ctx, conn, "u", 1, "{}".into())?;
            Err::<(), _>(InboxError::Storage("failed after its event".into()))
        });
        let ok = s.notify(vec!["v".into()], item("a"), None);
        let (failed, ok) = tokio::join!(failed, ok);
        assert!(failed.is_err());
        ok.unwrap();
        let events = s.pending(10).await.unwrap();
        assert_eq!(as_rows(&events), outbox_rows(dir.path()));
        let users: Vec<&str> = events.iter().map(|e| e.user.as_str()).collect();
        assert_eq!(users, ["v"]);
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
