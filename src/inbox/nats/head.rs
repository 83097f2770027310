//! The per-user head entry: everything a change of one inbox must read and write together (the items'
//! states, the counts, the version, the preferences and the events not yet published), in one KV value.
//!
//! Why this encoding: JetStream 2.9 commits one message atomically, and a message must stay under the
//! server's `max_payload` (1 MB by default) for an inbox at `inbox.max_items` (10 000 by default). So what
//! never changes (title, body, actions, data) lives in the bodies stream, and each item's states here
//! take a few bytes: ids and creation times as differences from the previous item, the other times as
//! differences from the creation time, all as variable-length integers; the category as an index into a
//! table; the idempotency key as a 64-bit hash (a key can be 128 bytes, 10 000 of them would not fit).
//! A typical item costs about 12 bytes, the worst (every state set, an action and a key) under 60, so a
//! full inbox stays near 600 KB at worst and the rest of the budget is left to the outbox.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::super::{Counts, Item, ItemAction, Preferences, Tally};
use super::super::{InboxError, NewItem};

/// Format marker of an encoded head.
const FORMAT: u8 = 1;

/// An item as the head keeps it: its id, category and states.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct State {
    pub id: i64,
    pub category: String,
    pub created: i64,
    pub expires: Option<i64>,
    pub read: Option<i64>,
    pub seen: Option<i64>,
    pub archived: Option<i64>,
    pub snoozed: Option<i64>,
    pub action: Option<String>,
    /// The FNV-1a hash of the idempotency key the item was created with.
    pub key: Option<u64>,
}

impl State {
    pub fn new(id: i64, item: &NewItem, now: i64, key: Option<&str>) -> State {
        State {
            id,
            category: item.category().to_string(),
            created: now,
            expires: item.expires_at,
            read: None,
            seen: None,
            archived: None,
            snoozed: None,
            action: None,
            key: key.map(key_hash),
        }
    }

    /// What the item adds to its category's counts (the same rule as the other stores).
    pub fn tally(&self) -> Tally {
        let active = self.archived.is_none() && self.snoozed.is_none();
        Tally {
            total: 1,
            unread: i64::from(active && self.read.is_none()),
            unseen: i64::from(active && self.seen.is_none()),
            archived: i64::from(self.archived.is_some()),
        }
    }

    /// The item, with `content` when read from its body (empty otherwise: a change of states needs none).
    pub fn item(&self, content: Option<Content>) -> Item {
        let c = content.unwrap_or_default();
        Item {
            id: self.id,
            category: self.category.clone(),
            title: c.title,
            body: c.body,
            avatar: c.avatar,
            action_url: c.action_url,
            actions: c.actions,
            data: c.data,
            created_at: self.created,
            expires_at: self.expires,
            read_at: self.read,
            seen_at: self.seen,
            archived_at: self.archived,
            snoozed_until: self.snoozed,
            action: self.action.clone(),
        }
    }

    /// Takes the states of `item` (after a patch).
    pub fn set_states(&mut self, item: &Item) {
        self.read = item.read_at;
        self.seen = item.seen_at;
        self.archived = item.archived_at;
        self.snoozed = item.snoozed_until;
        self.action = item.action.clone();
    }

    /// When the sweeper has something to do with this item.
    fn due(&self, max_age_ms: i64) -> i64 {
        let mut d = self.created.saturating_add(max_age_ms);
        for t in [self.expires, self.snoozed].into_iter().flatten() {
            d = d.min(t);
        }
        d
    }
}

/// An item's content, which never changes: one message of the bodies stream per item.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Content {
    pub title: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ItemAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Content {
    pub fn of(item: &NewItem) -> Content {
        Content {
            title: item.title.clone(),
            body: item.body.clone(),
            avatar: item.avatar.clone(),
            action_url: item.action_url.clone(),
            actions: item.actions.clone(),
            data: item.data.clone(),
        }
    }
}

/// A body message: the owner (checked on read, so an id of another user's item reads as missing) and the
/// content.
#[derive(Serialize, Deserialize)]
pub(super) struct Body {
    pub u: String,
    pub c: Content,
}

/// A committed event waiting in the head for the drainer: the inbox version it carries and its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Event {
    pub v: i64,
    pub p: String,
}

/// The JSON part of a head (everything but the items).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Meta {
    #[serde(default)]
    v: i64,
    /// Counts per category: `[total, unread, unseen, archived]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    c: BTreeMap<String, [i64; 4]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<Preferences>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    o: Vec<Event>,
    /// The category table the items' indexes point into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    k: Vec<String>,
}

/// One user's inbox head, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Head {
    pub version: i64,
    pub counts: BTreeMap<String, Tally>,
    pub prefs: Preferences,
    pub outbox: Vec<Event>,
    /// Ascending ids.
    pub items: Vec<State>,
}

fn corrupt(why: &str) -> InboxError {
    InboxError::Storage(format!("an inbox head on NATS is damaged: {why}"))
}

pub(super) fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn put_uvar(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_ivar(out: &mut Vec<u8>, n: i64) {
    put_uvar(out, ((n << 1) ^ (n >> 63)) as u64);
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, InboxError> {
        let b = *self.buf.get(self.at).ok_or_else(|| corrupt("truncated"))?;
        self.at += 1;
        Ok(b)
    }
    fn uvar(&mut self) -> Result<u64, InboxError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(n);
            }
        }
        Err(corrupt("an integer too long"))
    }
    fn ivar(&mut self) -> Result<i64, InboxError> {
        let u = self.uvar()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
    fn bytes(&mut self, n: usize) -> Result<&[u8], InboxError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
}

const F_EXPIRES: u8 = 1;
const F_READ: u8 = 2;
const F_SEEN: u8 = 4;
const F_ARCHIVED: u8 = 8;
const F_SNOOZED: u8 = 16;
const F_ACTION: u8 = 32;
const F_KEY: u8 = 64;

impl Head {
    /// `FORMAT`, the metadata's length and JSON, the number of items, then each item.
    pub fn encode(&self) -> Result<Vec<u8>, InboxError> {
        let mut table: Vec<String> = Vec::new();
        let mut index: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &self.items {
            if !index.contains_key(s.category.as_str()) {
                index.insert(&s.category, table.len() as u64);
                table.push(s.category.clone());
            }
        }
        let meta = Meta {
            v: self.version,
            c: self
                .counts
                .iter()
                .map(|(c, t)| (c.clone(), [t.total, t.unread, t.unseen, t.archived]))
                .collect(),
            p: (self.prefs != Preferences::default()).then(|| self.prefs.clone()),
            o: self.outbox.clone(),
            k: table,
        };
        let json = serde_json::to_vec(&meta).map_err(|e| corrupt(&e.to_string()))?;
        let mut out = Vec::with_capacity(json.len() + 16 + self.items.len() * 16);
        out.push(FORMAT);
        put_uvar(&mut out, json.len() as u64);
        out.extend_from_slice(&json);
        put_uvar(&mut out, self.items.len() as u64);
        let (mut prev_id, mut prev_created) = (0i64, 0i64);
        for s in &self.items {
            put_ivar(&mut out, s.id - prev_id);
            put_ivar(&mut out, s.created - prev_created);
            (prev_id, prev_created) = (s.id, s.created);
            put_uvar(
                &mut out,
                index.get(s.category.as_str()).copied().unwrap_or(0),
            );
            let times = [
                (F_EXPIRES, s.expires),
                (F_READ, s.read),
                (F_SEEN, s.seen),
                (F_ARCHIVED, s.archived),
                (F_SNOOZED, s.snoozed),
            ];
            let mut flags = 0u8;
            for (f, t) in times {
                if t.is_some() {
                    flags |= f;
                }
            }
            if s.action.is_some() {
                flags |= F_ACTION;
            }
            if s.key.is_some() {
                flags |= F_KEY;
            }
            out.push(flags);
            for t in times.into_iter().filter_map(|(_, t)| t) {
                put_ivar(&mut out, t - s.created);
            }
            if let Some(a) = &s.action {
                put_uvar(&mut out, a.len() as u64);
                out.extend_from_slice(a.as_bytes());
            }
            if let Some(k) = s.key {
                out.extend_from_slice(&k.to_le_bytes());
            }
        }
        Ok(out)
    }

    pub fn decode(buf: &[u8]) -> Result<Head, InboxError> {
        if buf.is_empty() {
            return Ok(Head::default());
        }
        let mut r = Reader { buf, at: 0 };
        if r.byte()? != FORMAT {
            return Err(corrupt("unknown format"));
        }
        let n = usize::try_from(r.uvar()?).map_err(|_| corrupt("metadata length"))?;
        let meta: Meta =
            serde_json::from_slice(r.bytes(n)?).map_err(|e| corrupt(&e.to_string()))?;
        let count = r.uvar()?;
        let mut items = Vec::with_capacity(count.min(100_000) as usize);
        let (mut id, mut created) = (0i64, 0i64);
        for _ in 0..count {
            id += r.ivar()?;
            created += r.ivar()?;
            let cat = usize::try_from(r.uvar()?).map_err(|_| corrupt("category index"))?;
            let category = meta
                .k
                .get(cat)
                .cloned()
                .ok_or_else(|| corrupt("category index out of the table"))?;
            let flags = r.byte()?;
            let mut time = |f: u8| -> Result<Option<i64>, InboxError> {
                if flags & f == 0 {
                    return Ok(None);
                }
                Ok(Some(created + r.ivar()?))
            };
            let expires = time(F_EXPIRES)?;
            let read = time(F_READ)?;
            let seen = time(F_SEEN)?;
            let archived = time(F_ARCHIVED)?;
            let snoozed = time(F_SNOOZED)?;
            let action = if flags & F_ACTION != 0 {
                let n = usize::try_from(r.uvar()?).map_err(|_| corrupt("action length"))?;
                Some(
                    String::from_utf8(r.bytes(n)?.to_vec())
                        .map_err(|_| corrupt("action not UTF-8"))?,
                )
            } else {
                None
            };
            let key = if flags & F_KEY != 0 {
                let b = r.bytes(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Some(u64::from_le_bytes(a))
            } else {
                None
            };
            items.push(State {
                id,
                category,
                created,
                expires,
                read,
                seen,
                archived,
                snoozed,
                action,
                key,
            });
        }
        Ok(Head {
            version: meta.v,
            counts: meta
                .c
                .into_iter()
                .map(|(c, [total, unread, unseen, archived])| {
                    (
                        c,
                        Tally {
                            total,
                            unread,
                            unseen,
                            archived,
                        },
                    )
                })
                .collect(),
            prefs: meta.p.unwrap_or_default(),
            outbox: meta.o,
            items,
        })
    }

    pub fn counts(&self) -> Counts {
        Counts::from_categories(self.counts.clone())
    }

    /// Adds `sign` times `t` to `category`'s counts; a category whose total reaches 0 is dropped.
    pub fn add(&mut self, category: &str, t: &Tally, sign: i64) {
        let c = self.counts.entry(category.to_string()).or_default();
        c.add(t, sign);
        if c.total == 0 {
            self.counts.remove(category);
        }
    }

    /// The counts recomputed from the items.
    pub fn recount(&self) -> BTreeMap<String, Tally> {
        let mut out: BTreeMap<String, Tally> = BTreeMap::new();
        for s in &self.items {
            out.entry(s.category.clone())
                .or_default()
                .add(&s.tally(), 1);
        }
        out
    }

    /// Categories whose stored counts differ from a recount.
    pub fn mismatches(&self) -> i64 {
        let real = self.recount();
        let mut n = 0;
        for (c, t) in &real {
            if self.counts.get(c) != Some(t) {
                n += 1;
            }
        }
        n + self
            .counts
            .keys()
            .filter(|c| !real.contains_key(*c))
            .count() as i64
    }

    pub fn position(&self, id: i64) -> Option<usize> {
        self.items.binary_search_by_key(&id, |s| s.id).ok()
    }

    pub fn has_key(&self, key: &str) -> Option<i64> {
        let h = key_hash(key);
        self.items.iter().find(|s| s.key == Some(h)).map(|s| s.id)
    }

    /// The earliest time the sweeper has work in this inbox.
    pub fn due(&self, max_age_ms: i64) -> Option<i64> {
        self.items.iter().map(|s| s.due(max_age_ms)).min()
    }

    /// Appends an event for a change that made the inbox version `version`, with the counts as they are
    /// now (every count difference of the change is applied before).
    pub fn push_event(
        &mut self,
        epoch: &str,
        user: &str,
        kind: &str,
        mut payload: serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, InboxError> {
        self.version += 1;
        payload.insert("type".into(), kind.into());
        payload.insert("version".into(), self.version.into());
        payload.insert(
            "counts".into(),
            serde_json::to_value(self.counts()).map_err(|e| corrupt(&e.to_string()))?,
        );
        let p = serde_json::Value::Object(payload).to_string();
        self.outbox.push(Event { v: self.version, p });
        Ok(event_id(epoch, self.version, user))
    }
}

/// The id an inbox event has in the log (the same shape as the other stores').
pub(super) fn event_id(epoch: &str, version: i64, user: &str) -> String {
    format!("inbox-{epoch}-{version}-{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_round_trips_and_stays_small_at_the_item_limit() {
        let mut h = Head {
            version: 7,
            ..Default::default()
        };
        let now = 1_764_000_000_000;
        for i in 0..10_000i64 {
            let mut s = State::new(
                1_000 + i * 3,
                &NewItem {
                    category: Some(format!("c{}", i % 5)),
                    title: "t".into(),
                    ..Default::default()
                },
                now + i * 1000,
                Some(&format!("key-{i}")),
            );
            s.read = Some(now + i * 1000 + 5_000_000);
            s.seen = Some(now + i * 1000 + 6_000_000);
            s.archived = Some(now + i * 1000 + 7_000_000);
            s.snoozed = Some(now + 90 * 86_400_000);
            s.expires = Some(now + 80 * 86_400_000);
            s.action = Some("accept".into());
            h.add(&s.category.clone(), &s.tally(), 1);
            h.items.push(s);
        }
        h.push_event("e", "u", "created", serde_json::Map::new())
            .unwrap();
        let bytes = h.encode().unwrap();
        assert!(bytes.len() < 600_000, "{} bytes", bytes.len());
        let back = Head::decode(&bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.mismatches(), 0);
        assert_eq!(back.has_key("key-42"), Some(1_000 + 42 * 3));
    }
}
