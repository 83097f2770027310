//! Embedded SQLite log, the default: no server to install, history survives restarts.
//!
//! WAL mode with one writer connection; readers use their own connections so a replay never waits behind a
//! commit. `seq` is an AUTOINCREMENT rowid, so a number is never reused even after retention deleted the
//! newest rows. The epoch is created with the database file and stored in it: it only changes when the file
//! is replaced, which is exactly when positions held by clients stop meaning anything.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{Log, LogError, Record, Retention};

pub struct SqliteLog {
    writer: Mutex<Option<Connection>>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    epoch: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL,
    channel    TEXT NOT NULL,
    topics     TEXT NOT NULL,
    data       TEXT NOT NULL,
    private    INTEGER NOT NULL,
    event_type TEXT,
    retry      INTEGER,
    time_ms    INTEGER NOT NULL,
    info       TEXT,
    tags       TEXT
);
CREATE TABLE IF NOT EXISTS channels (channel TEXT PRIMARY KEY, pruned_upto INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS records_channel ON records (channel, seq);
CREATE INDEX IF NOT EXISTS records_id ON records (id);
-- Alternate topics (a record's second and later topics), so replays of exact topics filter in the store.
CREATE TABLE IF NOT EXISTS alt_topics (topic TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (topic, seq))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alt_topics_seq ON alt_topics (seq);
CREATE TRIGGER IF NOT EXISTS records_alt_topics_cleanup AFTER DELETE ON records
    WHEN json_array_length(old.topics) > 1
    BEGIN DELETE FROM alt_topics WHERE seq = old.seq; END;
";

const COLUMNS: &str = "seq, id, topics, data, private, event_type, retry, time_ms, info, tags";

/// Columns added after the first release, with their definitions: added to an older file when it is opened.
const ADDED_COLUMNS: &[(&str, &str)] = &[("tags", "TEXT")];

impl SqliteLog {
    /// Opens (creating if needed) the database at `path`. `durable` chooses `synchronous=FULL` (a commit has
    /// reached the disk before an append returns) over `NORMAL` (survives a crash of Herald, not of the OS).
    pub fn open(path: impl AsRef<Path>, durable: bool) -> Result<Self, LogError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    LogError::Storage(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        for (column, definition) in ADDED_COLUMNS {
            let present: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('records') WHERE name = ?1",
                [column],
                |r| r.get(0),
            )?;
            if !present {
                conn.execute_batch(&format!(
                    "ALTER TABLE records ADD COLUMN {column} {definition}"
                ))?;
            }
        }
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
        Ok(SqliteLog {
            writer: Mutex::new(Some(conn)),
            readers: Mutex::new(Vec::new()),
            path,
            epoch,
        })
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let conn = match self.readers.lock().pop() {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                c
            }
        };
        let out = f(&conn);
        let mut pool = self.readers.lock();
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let mut guard = self.writer.lock();
        let conn = guard.as_mut().ok_or(LogError::Closed)?;
        f(conn)
    }
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Record, String)> {
    let topics: String = row.get(2)?;
    // Text payloads are stored as TEXT (the file stays readable with the sqlite3 shell), others as BLOB.
    let data = match row.get_ref(3)? {
        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
            bytes::Bytes::copy_from_slice(t)
        }
        _ => bytes::Bytes::new(),
    };
    let tags = match row.get::<_, Option<String>>(9)? {
        Some(t) => serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(9, rusqlite::types::Type::Text, Box::new(e))
        })?,
        None => Default::default(),
    };
    Ok((
        Record {
            seq: row.get::<_, i64>(0)? as u64,
            id: row.get(1)?,
            topics: Vec::new(),
            data,
            private: row.get::<_, i64>(4)? != 0,
            event_type: row.get(5)?,
            retry: row.get::<_, Option<i64>>(6)?.map(|r| r as u64),
            time_ms: row.get(7)?,
            info: row.get(8)?,
            tags,
        },
        topics,
    ))
}

fn collect(
    epoch: &str,
    rows: impl Iterator<Item = rusqlite::Result<(Record, String)>>,
) -> Result<Vec<Record>, LogError> {
    rows.map(|row| {
        let (mut rec, topics) = row?;
        if rec.id.is_empty() {
            rec.id = super::generated_id(epoch, rec.seq);
        }
        rec.topics = serde_json::from_str(&topics).map_err(|e| LogError::Corrupt {
            seq: rec.seq,
            reason: e.to_string(),
        })?;
        Ok(rec)
    })
    .collect()
}

/// Raises the channel's `pruned_upto` to the seq `query` selects (the newest record about to be deleted).
fn note_pruned(
    tx: &rusqlite::Transaction<'_>,
    channel: &str,
    query: &str,
    args: impl rusqlite::Params,
) -> Result<(), LogError> {
    let top: Option<i64> = tx
        .query_row(query, args, |r| r.get::<_, Option<i64>>(0))
        .optional()?
        .flatten();
    if let Some(top) = top {
        tx.execute(
            "INSERT INTO channels (channel, pruned_upto) VALUES (?1, ?2)
             ON CONFLICT (channel) DO UPDATE SET pruned_upto = MAX(pruned_upto, excluded.pruned_upto)",
            params![channel, top],
        )?;
    }
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Log for SqliteLog {
    fn append(&self, batch: &mut [Record]) -> Result<(), LogError> {
        self.with_writer(|conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO records (id, channel, topics, data, private, event_type, retry, time_ms, info, tags)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?;
                for r in batch.iter_mut() {
                    let topics = serde_json::to_string(&r.topics)
                        .map_err(|e| LogError::Storage(e.to_string()))?;
                    let tags = if r.tags.is_empty() {
                        None
                    } else {
                        Some(
                            serde_json::to_string(&r.tags)
                                .map_err(|e| LogError::Storage(e.to_string()))?,
                        )
                    };
                    let data = match std::str::from_utf8(&r.data) {
                        Ok(text) => rusqlite::types::Value::Text(text.to_string()),
                        Err(_) => rusqlite::types::Value::Blob(r.data.to_vec()),
                    };
                    stmt.execute(params![
                        r.id,
                        r.channel(),
                        topics,
                        data,
                        r.private as i64,
                        r.event_type,
                        r.retry.map(to_i64),
                        r.time_ms,
                        r.info,
                        tags
                    ])?;
                    r.seq = tx.last_insert_rowid() as u64;
                    for alt in r.topics.iter().skip(1) {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO alt_topics (topic, seq) VALUES (?1, ?2)",
                        )?
                        .execute(params![alt, to_i64(r.seq)])?;
                    }
                    if r.id.is_empty() {
                        r.id = super::generated_id(&self.epoch, r.seq);
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn read_range(&self, after: u64, upto: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![to_i64(after), to_i64(upto), to_i64(limit as u64)],
                row_to_record,
            )?;
            collect(&self.epoch, rows)
        })
    }

    fn read_channel(
        &self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records WHERE channel = ?1 AND seq > ?2 AND seq <= ?3
                 ORDER BY seq LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![channel, to_i64(after), to_i64(upto), to_i64(limit as u64)],
                row_to_record,
            )?;
            collect(&self.epoch, rows)
        })
    }

    fn read_channel_back(
        &self,
        channel: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records WHERE channel = ?1 AND seq < ?2
                 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(
                params![channel, to_i64(before), to_i64(limit as u64)],
                row_to_record,
            )?;
            collect(&self.epoch, rows)
        })
    }

    fn find_id(&self, id: &str) -> Result<Option<u64>, LogError> {
        if let Some((epoch, seq)) = super::parse_generated_id(id) {
            if epoch != self.epoch {
                return Ok(None);
            }
            return self.with_reader(|conn| {
                Ok(conn
                    .prepare_cached("SELECT seq FROM records WHERE seq = ?1")?
                    .query_row([to_i64(seq)], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(|s| s as u64))
            });
        }
        self.with_reader(|conn| {
            Ok(conn
                .prepare_cached("SELECT MAX(seq) FROM records WHERE id = ?1")?
                .query_row([id], |r| r.get::<_, Option<i64>>(0))?
                .map(|s| s as u64))
        })
    }

    fn last(&self) -> Result<Option<Record>, LogError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records ORDER BY seq DESC LIMIT 1"
            ))?;
            let rows = stmt.query_map([], row_to_record)?;
            Ok(collect(&self.epoch, rows)?.pop())
        })
    }

    fn channel_first_seq(&self, channel: &str) -> Result<Option<u64>, LogError> {
        self.with_reader(|conn| {
            Ok(conn
                .prepare_cached("SELECT MIN(seq) FROM records WHERE channel = ?1")?
                .query_row([channel], |r| r.get::<_, Option<i64>>(0))?
                .map(|s| s as u64))
        })
    }

    fn channel_top(&self, channel: &str, upto: u64) -> Result<Option<u64>, LogError> {
        self.with_reader(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT MAX(s) FROM (
                       SELECT MAX(seq) AS s FROM records WHERE channel = ?1 AND seq <= ?2
                       UNION ALL
                       SELECT pruned_upto FROM channels WHERE channel = ?1 AND pruned_upto <= ?2)",
                )?
                .query_row(params![channel, to_i64(upto)], |r| {
                    r.get::<_, Option<i64>>(0)
                })?
                .map(|s| s as u64))
        })
    }

    fn channel_pruned_upto(&self, channel: &str) -> Result<u64, LogError> {
        self.with_reader(|conn| {
            Ok(conn
                .prepare_cached("SELECT pruned_upto FROM channels WHERE channel = ?1")?
                .query_row([channel], |r| r.get::<_, i64>(0))
                .optional()?
                .unwrap_or(0) as u64)
        })
    }

    fn read_topics(
        &self,
        after: u64,
        upto: u64,
        topics: &[String],
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let topics = serde_json::to_string(topics).map_err(|e| LogError::Storage(e.to_string()))?;
        self.with_reader(|conn| {
            // Two index-driven branches (canonical topics by (channel, seq), alternates by (topic, seq)),
            // each bounded by the limit, then merged in seq order.
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records WHERE seq IN (
                   SELECT seq FROM (SELECT seq FROM records
                                     WHERE channel IN (SELECT value FROM json_each(?3))
                                       AND seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?4)
                   UNION
                   SELECT seq FROM (SELECT seq FROM alt_topics
                                     WHERE topic IN (SELECT value FROM json_each(?3))
                                       AND seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?4))
                 ORDER BY seq LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![to_i64(after), to_i64(upto), topics, to_i64(limit as u64)],
                row_to_record,
            )?;
            collect(&self.epoch, rows)
        })
    }

    fn prune_step(
        &self,
        retention: &Retention,
        now_ms: i64,
        after: &str,
        max_channels: usize,
    ) -> Result<(u64, Option<String>), LogError> {
        if retention.rules.is_empty() {
            return Ok((0, None));
        }
        self.with_writer(|conn| {
            let tx = conn.transaction()?;
            let mut removed = 0u64;
            let mut cursor = after.to_string();
            let mut seen = 0;
            // Each next channel is one seek in the (channel, seq) index: a step costs what its channels
            // hold, not what the whole table holds.
            while seen < max_channels {
                let next: Option<String> = tx
                    .prepare_cached(
                        "SELECT channel FROM records WHERE channel > ?1 ORDER BY channel LIMIT 1",
                    )?
                    .query_row([&cursor], |r| r.get(0))
                    .optional()?;
                let Some(channel) = next else {
                    tx.commit()?;
                    return Ok((removed, None));
                };
                seen += 1;
                if let Some(rule) = retention.rule_for(&channel) {
                    if let Some(max) = rule.max_count {
                        // The newest record beyond the count, if any: everything up to it goes.
                        let cut: Option<i64> = tx
                            .prepare_cached(
                                "SELECT seq FROM records WHERE channel = ?1
                                 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
                            )?
                            .query_row(params![channel, to_i64(max)], |r| r.get(0))
                            .optional()?;
                        if let Some(cut) = cut {
                            note_pruned(&tx, &channel, "SELECT ?2", params![channel, cut])?;
                            removed += tx.execute(
                                "DELETE FROM records WHERE channel = ?1 AND seq <= ?2",
                                params![channel, cut],
                            )? as u64;
                        }
                    }
                    if let Some(age) = rule.max_age {
                        let cutoff = now_ms - age.as_millis() as i64;
                        let oldest: Option<i64> = tx
                            .prepare_cached(
                                "SELECT time_ms FROM records WHERE channel = ?1 ORDER BY seq LIMIT 1",
                            )?
                            .query_row([&channel], |r| r.get(0))
                            .optional()?;
                        if oldest.is_some_and(|t| t < cutoff) {
                            note_pruned(
                                &tx,
                                &channel,
                                "SELECT MAX(seq) FROM records WHERE channel = ?1 AND time_ms < ?2",
                                params![channel, cutoff],
                            )?;
                            removed += tx.execute(
                                "DELETE FROM records WHERE channel = ?1 AND time_ms < ?2",
                                params![channel, cutoff],
                            )? as u64;
                        }
                    }
                }
                cursor = channel;
            }
            tx.commit()?;
            Ok((removed, Some(cursor)))
        })
    }

    fn trim_channel(&self, channel: &str, upto: u64) -> Result<u64, LogError> {
        self.with_writer(|conn| {
            let tx = conn.transaction()?;
            note_pruned(
                &tx,
                channel,
                "SELECT MAX(seq) FROM records WHERE channel = ?1 AND seq <= ?2",
                params![channel, to_i64(upto)],
            )?;
            let n = tx.execute(
                "DELETE FROM records WHERE channel = ?1 AND seq <= ?2",
                params![channel, to_i64(upto)],
            )? as u64;
            tx.commit()?;
            Ok(n)
        })
    }

    fn channels(&self, prefix: &str, after: &str, limit: usize) -> Result<Vec<String>, LogError> {
        self.with_reader(|conn| {
            // One index seek per channel, as retention walks them.
            let mut out = Vec::new();
            let mut cursor = if after < prefix {
                prefix.to_string()
            } else {
                after.to_string()
            };
            let mut first = after < prefix;
            while out.len() < limit {
                let sql = if first {
                    "SELECT channel FROM records WHERE channel >= ?1 ORDER BY channel LIMIT 1"
                } else {
                    "SELECT channel FROM records WHERE channel > ?1 ORDER BY channel LIMIT 1"
                };
                first = false;
                let next: Option<String> = conn
                    .prepare_cached(sql)?
                    .query_row([&cursor], |r| r.get(0))
                    .optional()?;
                match next {
                    Some(c) if c.starts_with(prefix) => {
                        out.push(c.clone());
                        cursor = c;
                    }
                    _ => break,
                }
            }
            Ok(out)
        })
    }

    fn epoch(&self) -> String {
        self.epoch.clone()
    }

    fn flush(&self) -> Result<(), LogError> {
        self.readers.lock().clear();
        let mut guard = self.writer.lock();
        if let Some(conn) = guard.as_ref() {
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        }
        if let Some(conn) = guard.take() {
            conn.close().map_err(|(_, e)| LogError::from(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::*;

    #[test]
    fn contract_append() {
        let dir = tempfile::tempdir().unwrap();
        contract::append_assigns_increasing_seqs(
            &SqliteLog::open(dir.path().join("h.sqlite3"), true).unwrap(),
        );
    }

    #[test]
    fn contract_retention() {
        let dir = tempfile::tempdir().unwrap();
        contract::retention_by_count_and_age(
            &SqliteLog::open(dir.path().join("h.sqlite3"), false).unwrap(),
        );
    }

    #[test]
    fn contract_generated_ids() {
        let dir = tempfile::tempdir().unwrap();
        contract::generated_ids_name_the_position(
            &SqliteLog::open(dir.path().join("h.sqlite3"), false).unwrap(),
        );
    }

    #[test]
    fn survives_reopen_and_never_reuses_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite3");
        let log = SqliteLog::open(&path, true).unwrap();
        let epoch = log.epoch();
        let mut batch = vec![
            contract::rec("a", "1", "x", 0),
            contract::rec("a", "2", "y", 0),
        ];
        log.append(&mut batch).unwrap();
        log.remove_channel("a").unwrap();
        log.flush().unwrap();
        assert!(matches!(log.append(&mut []), Err(LogError::Closed)));
        drop(log);
        let log = SqliteLog::open(&path, true).unwrap();
        assert_eq!(log.epoch(), epoch, "the epoch lives in the file");
        let mut again = vec![contract::rec("a", "3", "z", 0)];
        log.append(&mut again).unwrap();
        assert!(again[0].seq > batch[1].seq, "seq is never reused");
    }
}
