//! The durable log: every publication is appended here before anyone is told about it, and every reconnecting
//! client resumes from here.
//!
//! One log holds all channels. The log assigns each record a global, strictly increasing sequence number
//! (`seq`); that number is the publication's identity on every transport (SSE ids map to it, WebSocket
//! offsets are it), so a message has the same position whichever way it travels. Retention is applied per
//! channel (a record's channel is its first, canonical topic) by rules matched on topic selectors.
//!
//! The trait is synchronous on purpose: SQLite is a blocking library and the hub calls the log from one
//! writer task through `spawn_blocking`, batching appends so that one commit (one fsync) covers many
//! publications (group commit).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

pub mod memory;
pub mod sqlite;

pub use memory::MemoryLog;
pub use sqlite::SqliteLog;

use crate::topic::Selector;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("corrupt record {seq}: {reason}")]
    Corrupt { seq: u64, reason: String },
    #[error("the log is closed")]
    Closed,
}

impl From<rusqlite::Error> for LogError {
    fn from(e: rusqlite::Error) -> Self {
        LogError::Storage(e.to_string())
    }
}

/// The id of a publication whose publisher gave none: `#<epoch>-<seq>`. It is the same position a
/// WebSocket client sees as (epoch, offset), so one publication has one identity on every transport, and a
/// client resuming with it needs no lookup. Publishers cannot forge it: their ids must not start with `#`.
pub fn generated_id(epoch: &str, seq: u64) -> String {
    format!("#{epoch}-{seq}")
}

/// The (epoch, seq) of a [`generated_id`].
pub fn parse_generated_id(id: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = id.strip_prefix('#')?.rsplit_once('-')?;
    Some((epoch, seq.parse().ok()?))
}

/// One stored publication.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Assigned by [`Log::append`]; 0 before that.
    pub seq: u64,
    /// The event id clients see (Mercure `id`). Publisher-chosen (not necessarily unique), or empty before
    /// [`Log::append`], which then sets it to [`generated_id`].
    pub id: String,
    /// First topic is canonical (the channel), others are alternates.
    pub topics: Vec<String>,
    /// The payload, as bytes: Mercure and JSON publishers send text, Centrifugo's `b64data` and Protobuf
    /// clients may send anything.
    pub data: Bytes,
    pub private: bool,
    pub event_type: Option<String>,
    pub retry: Option<u64>,
    /// Milliseconds since the Unix epoch, set by the hub at publish time.
    pub time_ms: i64,
    /// Who published it, as JSON (a Centrifugo `ClientInfo`), when a client did.
    pub info: Option<String>,
    /// Centrifugo publication tags (`tags` of the server API's publish), delivered with the publication.
    pub tags: BTreeMap<String, String>,
}

impl Record {
    pub fn channel(&self) -> &str {
        self.topics.first().map(String::as_str).unwrap_or("")
    }

    /// The payload as text: as is when it is UTF-8 (always, for text publishers), otherwise with the
    /// invalid bytes replaced (SSE carries text only).
    pub fn data_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.data)
    }
}

/// How much history a channel keeps. Rules are tried in order; the first whose selector matches the channel
/// applies. A channel no rule matches keeps [`Retention::default_rule`].
#[derive(Debug, Clone)]
pub struct RetentionRule {
    pub selector: Selector,
    pub max_count: Option<u64>,
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub rules: Vec<RetentionRule>,
}

impl Retention {
    /// Reserved channels (`$`, a document's updates) match no rule: retention would drop edits nobody
    /// merged; documents shrink by compaction instead.
    pub fn rule_for(&self, channel: &str) -> Option<&RetentionRule> {
        if crate::access::is_reserved(channel) {
            return None;
        }
        self.rules.iter().find(|r| r.selector.matches(channel))
    }
}

/// Storage for channel history. Implementations must be safe to call from several threads; the hub
/// serializes appends itself.
pub trait Log: Send + Sync + 'static {
    /// Appends the batch atomically, assigning each record its `seq` in order. When this returns `Ok`, the
    /// records are durable to the degree the backend promises (SQLite: committed).
    fn append(&self, batch: &mut [Record]) -> Result<(), LogError>;

    /// Records with `after < seq <= upto`, ascending, at most `limit`.
    fn read_range(&self, after: u64, upto: u64, limit: usize) -> Result<Vec<Record>, LogError>;

    /// Records with `after < seq <= upto` having one of `topics` (canonical or alternate), ascending, at
    /// most `limit`: what a replay of exact topics reads, without reading every other channel.
    fn read_topics(
        &self,
        after: u64,
        upto: u64,
        topics: &[String],
        limit: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// Records of one channel with `after < seq <= upto`, ascending, at most `limit`.
    fn read_channel(
        &self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// Records of one channel with `seq < before`, newest first, at most `limit`: a reverse history page
    /// costs what it returns, however long the channel.
    fn read_channel_back(
        &self,
        channel: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// The seq of the newest record carrying event id `id`, if it is still retained.
    fn find_id(&self, id: &str) -> Result<Option<u64>, LogError>;

    /// The newest record, if any.
    fn last(&self) -> Result<Option<Record>, LogError>;

    /// The oldest retained seq of one channel, if it has history.
    fn channel_first_seq(&self, channel: &str) -> Result<Option<u64>, LogError>;

    /// The newest seq of one channel at or below `upto`: the channel's stream position. Records that
    /// retention or `remove_channel` deleted still count: removing history does not move a stream back
    /// (clients holding a position must still be able to recover from it).
    fn channel_top(&self, channel: &str, upto: u64) -> Result<Option<u64>, LogError>;

    /// The highest seq of this channel that retention (or `remove_channel`) has deleted, 0 if none. A client
    /// positioned at or after it can be brought up to date from the log; one before it cannot.
    fn channel_pruned_upto(&self, channel: &str) -> Result<u64, LogError>;

    /// Applies retention to at most `max_channels` channels whose names sort after `after` (`""`: from the
    /// first); returns how many records it removed and, when channels remain, the one to resume after. A
    /// pass is a sequence of bounded steps, so the writer serves appends between them.
    fn prune_step(
        &self,
        retention: &Retention,
        now_ms: i64,
        after: &str,
        max_channels: usize,
    ) -> Result<(u64, Option<String>), LogError>;

    /// A whole retention pass (tests and tools; the engine runs it in steps).
    fn prune(&self, retention: &Retention, now_ms: i64) -> Result<u64, LogError> {
        let mut removed = 0;
        let mut after = String::new();
        loop {
            let (n, resume) = self.prune_step(retention, now_ms, &after, 64)?;
            removed += n;
            match resume {
                Some(next) => after = next,
                None => return Ok(removed),
            }
        }
    }

    /// Removes a channel's records with `seq <= upto` (a document compacted into a snapshot drops the
    /// updates the snapshot holds); the channel keeps its position. Returns how many were removed.
    fn trim_channel(&self, channel: &str, upto: u64) -> Result<u64, LogError>;

    /// Removes a channel's history.
    fn remove_channel(&self, channel: &str) -> Result<u64, LogError> {
        self.trim_channel(channel, u64::MAX)
    }

    /// Names of channels that have records and start with `prefix`, sorted, after `after`, at most
    /// `limit` (listing documents, by their storage channels).
    fn channels(&self, prefix: &str, after: &str, limit: usize) -> Result<Vec<String>, LogError>;

    /// Identifies this log's incarnation: it changes when history is lost (a memory log restarts, a database
    /// file is replaced), so a client holding positions from another incarnation can be told so.
    fn epoch(&self) -> String;

    /// Makes everything appended so far durable and releases resources. Called on shutdown.
    fn flush(&self) -> Result<(), LogError>;
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    #[test]
    fn reserved_channels_match_no_rule() {
        let r = Retention {
            rules: vec![RetentionRule {
                selector: Selector::parse("*"),
                max_count: Some(1),
                max_age: None,
            }],
        };
        assert!(r.rule_for("news").is_some());
        assert!(r.rule_for("$yjs:doc").is_none());
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! Behaviour every backend must have; each backend's tests run these against it.
    use super::*;

    pub fn rec(topic: &str, id: &str, data: &str, time_ms: i64) -> Record {
        Record {
            seq: 0,
            id: id.into(),
            topics: vec![topic.into()],
            data: Bytes::copy_from_slice(data.as_bytes()),
            private: false,
            event_type: None,
            retry: None,
            time_ms,
            info: None,
            tags: BTreeMap::new(),
        }
    }

    pub fn generated_ids_name_the_position(log: &dyn Log) {
        let mut batch = vec![rec("a", "", "x", 0), rec("a", "custom", "y", 0)];
        log.append(&mut batch).unwrap();
        assert_eq!(batch[0].id, generated_id(&log.epoch(), batch[0].seq));
        assert_eq!(batch[1].id, "custom");
        let read = log.read_range(0, u64::MAX, 10).unwrap();
        assert_eq!(read[0].id, batch[0].id, "the generated id survives a read");
        assert_eq!(log.find_id(&batch[0].id).unwrap(), Some(batch[0].seq));
        assert_eq!(
            log.find_id(&generated_id("other-epoch", batch[0].seq))
                .unwrap(),
            None
        );
        assert_eq!(log.find_id(&generated_id(&log.epoch(), 999)).unwrap(), None);
    }

    pub fn append_assigns_increasing_seqs(log: &dyn Log) {
        let mut batch = vec![rec("a", "1", "x", 0), rec("b", "2", "y", 0)];
        log.append(&mut batch).unwrap();
        assert!(batch[0].seq > 0 && batch[1].seq == batch[0].seq + 1);
        let mut more = vec![rec("a", "3", "z", 0)];
        log.append(&mut more).unwrap();
        assert!(more[0].seq > batch[1].seq);
        let all = log.read_range(0, u64::MAX, 100).unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        assert_eq!(all[0], batch[0]);
        let a = log.read_channel("a", 0, u64::MAX, 100).unwrap();
        assert_eq!(
            a.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["1", "3"]
        );
        assert_eq!(log.find_id("2").unwrap(), Some(batch[1].seq));
        assert_eq!(log.find_id("nope").unwrap(), None);
        assert_eq!(log.last().unwrap().unwrap().id, "3");
        assert_eq!(
            log.read_topics(0, u64::MAX, &["a".to_string()], 1)
                .unwrap()
                .len(),
            1,
            "bounded by limit"
        );
        let back = log.read_channel_back("a", u64::MAX, 100).unwrap();
        assert_eq!(
            back.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["3", "1"],
            "newest first"
        );
        let back = log.read_channel_back("a", more[0].seq, 1).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].id, "1", "strictly before");
        assert!(log
            .read_channel_back("a", batch[0].seq, 10)
            .unwrap()
            .is_empty());
        let only_b = log
            .read_topics(0, u64::MAX, &["b".to_string()], 10)
            .unwrap();
        assert_eq!(
            only_b.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["2"]
        );
        let mut alt = vec![Record {
            topics: vec!["c".into(), "b".into()],
            ..rec("c", "4", "w", 0)
        }];
        log.append(&mut alt).unwrap();
        let b_or_alt = log
            .read_topics(0, u64::MAX, &["b".to_string(), "nope".to_string()], 10)
            .unwrap();
        assert_eq!(
            b_or_alt.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["2", "4"],
            "an alternate topic counts"
        );
        assert_eq!(
            log.read_topics(0, alt[0].seq - 1, &["b".to_string()], 10)
                .unwrap()
                .len(),
            1,
            "bounded by upto"
        );
        let bounded = log.read_range(batch[0].seq, batch[1].seq, 100).unwrap();
        assert_eq!(bounded.len(), 1);
        assert_eq!(bounded[0].id, "2");
    }

    pub fn retention_by_count_and_age(log: &dyn Log) {
        let mut batch: Vec<Record> = (0..10)
            .map(|i| rec("chat:1", &format!("c{i}"), "d", 1_000 + i))
            .chain((0..3).map(|i| rec("news", &format!("n{i}"), "d", 10 + i)))
            .collect();
        log.append(&mut batch).unwrap();
        let retention = Retention {
            rules: vec![
                RetentionRule {
                    selector: Selector::parse("chat:{id}"),
                    max_count: Some(4),
                    max_age: None,
                },
                RetentionRule {
                    selector: Selector::parse("*"),
                    max_count: None,
                    max_age: Some(Duration::from_millis(100)),
                },
            ],
        };
        let removed = log.prune(&retention, 1_000).unwrap();
        assert_eq!(removed, 6 + 3);
        let chat = log.read_channel("chat:1", 0, u64::MAX, 100).unwrap();
        assert_eq!(
            chat.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["c6", "c7", "c8", "c9"]
        );
        assert!(log
            .read_channel("news", 0, u64::MAX, 100)
            .unwrap()
            .is_empty());
        assert_eq!(log.channel_first_seq("chat:1").unwrap(), Some(chat[0].seq));
        assert_eq!(log.channel_pruned_upto("chat:1").unwrap(), chat[0].seq - 1);
        assert_eq!(
            log.channel_top("chat:1", u64::MAX).unwrap(),
            Some(chat[3].seq)
        );
        assert_eq!(
            log.channel_top("chat:1", chat[1].seq).unwrap(),
            Some(chat[1].seq)
        );
        assert_eq!(log.channel_pruned_upto("other").unwrap(), 0);
        // A step looks at a bounded number of channels and says where to resume.
        let mut more: Vec<Record> = (0..5)
            .map(|i| rec(&format!("step:{i}"), "", "d", 1_000))
            .chain((0..5).map(|i| rec(&format!("step:{i}"), "", "d", 1_000)))
            .collect();
        log.append(&mut more).unwrap();
        let one_each = Retention {
            rules: vec![RetentionRule {
                selector: Selector::parse("step:{n}"),
                max_count: Some(1),
                max_age: None,
            }],
        };
        let (removed, resume) = log.prune_step(&one_each, 1_000, "step:", 2).unwrap();
        let mut removed_total = removed;
        let mut after = resume;
        let mut steps = 1;
        while let Some(a) = after {
            let (n, next) = log.prune_step(&one_each, 1_000, &a, 2).unwrap();
            removed_total += n;
            after = next;
            steps += 1;
            assert!(steps <= 10);
        }
        assert_eq!(removed_total, 5, "one record kept per step channel");
        assert!(
            steps >= 3,
            "five channels in steps of two take at least three steps"
        );
        for i in 0..5 {
            let ch = format!("step:{i}");
            assert_eq!(log.read_channel(&ch, 0, u64::MAX, 10).unwrap().len(), 1);
            log.remove_channel(&ch).unwrap();
        }
        // Trimming keeps what is after the cut, and the position.
        let mut t: Vec<Record> = (0..3)
            .map(|i| rec("trim", &format!("t{i}"), "d", 0))
            .collect();
        log.append(&mut t).unwrap();
        assert_eq!(log.trim_channel("trim", t[1].seq).unwrap(), 2);
        let kept = log.read_channel("trim", 0, u64::MAX, 10).unwrap();
        assert_eq!(
            kept.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["t2"]
        );
        assert_eq!(log.channel_pruned_upto("trim").unwrap(), t[1].seq);
        assert_eq!(
            log.channels("tr", "", 10).unwrap(),
            ["trim"],
            "channels by prefix"
        );
        assert_eq!(log.channels("chat:", "", 10).unwrap(), ["chat:1"]);
        assert!(log.channels("chat:", "chat:1", 10).unwrap().is_empty());
        log.remove_channel("trim").unwrap();
        assert_eq!(log.remove_channel("chat:1").unwrap(), 4);
        assert_eq!(log.channel_pruned_upto("chat:1").unwrap(), chat[3].seq);
        assert_eq!(
            log.channel_top("chat:1", u64::MAX).unwrap(),
            Some(chat[3].seq),
            "removing history keeps the stream position"
        );
        assert!(log.last().unwrap().is_none());
    }
}
