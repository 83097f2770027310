//! Names and encodings: every stream, bucket and subject is derived from the configured prefix, and a
//! record travels as one message (its metadata and its payload in the body, so no header has to carry a
//! topic or an id that could hold any character).

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::log::{LogError, Record};

/// Encoded names longer than this are hashed instead: a subject is a line of the NATS protocol and a KV key
/// a subject, and both must stay well under the server's control-line limit.
const MAX_PLAIN_TOKEN: usize = 200;

/// The names this cluster uses on the NATS server, all derived from `engine.prefix`.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    /// The one stream holding every channel's publications.
    pub stream: String,
    /// Publisher ids → seq.
    pub ids: String,
    /// Channel → highest seq removed from it by retention or history removal.
    pub pruned: String,
    /// `<channel>.<client>` → ClientInfo, expiring unless refreshed.
    pub presence: String,
    /// Which node runs the retention pass.
    pub lease: String,
    /// Core subjects (not captured by the stream): publications kept out of history, joins and leaves,
    /// control messages.
    pub broadcast: String,
    pub announce: String,
    pub control: String,
}

impl Names {
    /// The names for `prefix`, which must be usable in stream, bucket and subject names.
    pub fn new(prefix: &str) -> Result<Names, LogError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(LogError::Storage(format!(
                "engine.prefix {prefix:?} cannot name NATS streams and subjects: use 1 to 32 letters, digits, \
                 '-' or '_'"
            )));
        }
        Ok(Names {
            prefix: prefix.to_string(),
            stream: format!("{prefix}-log"),
            ids: format!("{prefix}-ids"),
            pruned: format!("{prefix}-pruned"),
            presence: format!("{prefix}-presence"),
            lease: format!("{prefix}-lease"),
            broadcast: format!("{prefix}.broadcast"),
            announce: format!("{prefix}.presence"),
            control: format!("{prefix}.control"),
        })
    }

    /// What the stream captures.
    pub fn stream_subjects(&self) -> String {
        format!("{}.pub.>", self.prefix)
    }

    /// The subject of a record: its channel, and whether it has alternate topics (`m`) or not (`s`).
    pub fn record_subject(&self, r: &Record) -> String {
        let kind = if r.topics.len() > 1 { 'm' } else { 's' };
        format!("{}.pub.{}.{kind}", self.prefix, token(r.channel()))
    }

    /// Every record of one channel, with or without alternates.
    pub fn channel_filter(&self, channel: &str) -> String {
        format!("{}.pub.{}.*", self.prefix, token(channel))
    }

    /// Every record that has alternate topics, whatever its channel.
    pub fn multi_filter(&self) -> String {
        format!("{}.pub.*.m", self.prefix)
    }

    /// The channel subjects a subject-count listing reports, back to their token.
    pub fn channel_token_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".pub.")?;
        rest.strip_suffix(".s").or_else(|| rest.strip_suffix(".m"))
    }

    /// The KV subject of a key in `bucket` (for pipelined puts, which the KV API does not offer).
    pub fn kv_subject(bucket: &str, key: &str) -> String {
        format!("$KV.{bucket}.{key}")
    }

    pub fn presence_key(channel: &str, client: &str) -> String {
        format!("{}.{}", token(channel), token(client))
    }
}

/// A string as one subject token (and KV key part): base64url without padding, or, when that would be
/// long, `h` + a 128-bit hash in hex. The two cannot collide: 33 characters is not a base64 length. A
/// hash could in theory name two strings, so readers compare the decoded record's channel or id anyway.
pub fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    if plain.len() <= MAX_PLAIN_TOKEN {
        return plain;
    }
    let (a, b) = (
        fnv1a(s.as_bytes(), 0xcbf2_9ce4_8422_2325),
        fnv1a(s.as_bytes(), 0x6c62_272e_07bb_0142),
    );
    format!("h{a:016x}{b:016x}")
}

/// The string a plain token encodes (a hashed one cannot be decoded: `None`).
pub fn untoken(t: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .ok()?;
    String::from_utf8(bytes).ok()
}

fn fnv1a(data: &[u8], basis: u64) -> u64 {
    data.iter().fold(basis, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A record's metadata, as the JSON head of its message.
#[derive(Serialize, Deserialize)]
struct Meta<'a> {
    /// The publisher's id; absent for a generated one, which is derived from the position when read (the
    /// position is not known when the message is sent).
    #[serde(default, skip_serializing_if = "str::is_empty", borrow)]
    i: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    t: Vec<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    p: bool,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    e: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<u64>,
    #[serde(default)]
    ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    info: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    g: BTreeMap<String, String>,
}

/// Format marker and version of an encoded record.
const MAGIC: &[u8; 2] = b"H1";

/// `H1`, the metadata's length (u32, big-endian), the metadata (JSON), the payload as is.
pub fn encode(r: &Record) -> Result<Bytes, LogError> {
    let meta = Meta {
        i: r.id.as_str().into(),
        t: r.topics.iter().map(|t| t.as_str().into()).collect(),
        p: r.private,
        e: r.event_type.as_deref().map(Into::into),
        r: r.retry,
        ms: r.time_ms,
        info: r.info.as_deref().map(Into::into),
        g: r.tags.clone(),
    };
    let head = serde_json::to_vec(&meta).map_err(|e| LogError::Storage(e.to_string()))?;
    let len = u32::try_from(head.len())
        .map_err(|_| LogError::Storage("record metadata too large".into()))?;
    let mut out = BytesMut::with_capacity(6 + head.len() + r.data.len());
    out.put_slice(MAGIC);
    out.put_u32(len);
    out.put_slice(&head);
    out.put_slice(&r.data);
    Ok(out.freeze())
}

/// The record a message holds, at position `seq`; a generated id is named with `epoch`.
pub fn decode(seq: u64, payload: &Bytes, epoch: &str) -> Result<Record, LogError> {
    let corrupt = |reason: &str| LogError::Corrupt {
        seq,
        reason: reason.into(),
    };
    if payload.len() < 6 || &payload[..2] != MAGIC {
        return Err(corrupt("not a Herald record"));
    }
    let len = u32::from_be_bytes([payload[2], payload[3], payload[4], payload[5]]) as usize;
    let end = 6usize
        .checked_add(len)
        .filter(|&e| e <= payload.len())
        .ok_or_else(|| corrupt("truncated metadata"))?;
    let meta: Meta<'_> =
        serde_json::from_slice(&payload[6..end]).map_err(|e| corrupt(&e.to_string()))?;
    let id = if meta.i.is_empty() {
        crate::log::generated_id(epoch, seq)
    } else {
        meta.i.into_owned()
    };
    Ok(Record {
        seq,
        id,
        topics: meta.t.into_iter().map(|t| t.into_owned()).collect(),
        data: payload.slice(end..),
        private: meta.p,
        event_type: meta.e.map(|e| e.into_owned()),
        retry: meta.r,
        time_ms: meta.ms,
        info: meta.info.map(|i| i.into_owned()),
        tags: meta.g,
    })
}

/// A join or leave, as published on the presence subject.
#[derive(Serialize, Deserialize)]
pub struct Announce {
    pub channel: String,
    pub info: crate::hub::ClientInfo,
    pub joined: bool,
}

/// A control message, as published on the control subject.
#[derive(Serialize, Deserialize)]
pub struct Control {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Base64 (standard): the payload is opaque bytes.
    pub payload: String,
}

impl Control {
    pub fn new(user: String, client: Option<String>, payload: &[u8]) -> Control {
        Control {
            user,
            client,
            payload: base64::engine::general_purpose::STANDARD.encode(payload),
        }
    }

    pub fn payload(&self) -> Option<Bytes> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .ok()
            .map(Bytes::from)
    }
}

/// A short, stable name for a stream incarnation: its creation time (nanoseconds) in base 36. Every node
/// reads the same time from the server, so they agree without coordinating; a stream deleted and created
/// again has another time, so positions of the lost history are never taken for new ones.
pub fn epoch_of(created_unix_nanos: i128) -> String {
    let mut n = created_unix_nanos.unsigned_abs();
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while n > 0 {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
    }
    if out.is_empty() {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_trip() {
        let r = Record {
            seq: 0,
            id: "pub-id".into(),
            topics: vec!["a b.c*>".into(), "https://x/y?z".into()],
            data: Bytes::from_static(b"\x00\xffbinary"),
            private: true,
            event_type: Some("t".into()),
            retry: Some(5),
            time_ms: 42,
            info: Some("{\"user\":\"u\"}".into()),
            tags: [("k".to_string(), "v".to_string())].into(),
        };
        let back = decode(7, &encode(&r).unwrap(), "ep").unwrap();
        assert_eq!(
            back,
            Record {
                seq: 7,
                ..r.clone()
            }
        );
        let generated = Record {
            id: String::new(),
            ..r
        };
        let back = decode(9, &encode(&generated).unwrap(), "ep").unwrap();
        assert_eq!(back.id, crate::log::generated_id("ep", 9));
        assert!(decode(1, &Bytes::from_static(b"H1\0\0\0\x09{}"), "e").is_err());
        assert!(decode(1, &Bytes::from_static(b"xx"), "e").is_err());
    }

    #[test]
    fn tokens_are_subject_safe_and_long_names_hashed() {
        for s in ["a.b", "*", ">", "with space", "é", "chat:1"] {
            let t = token(s);
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(untoken(&t).as_deref(), Some(s));
        }
        let long = "x".repeat(1000);
        let t = token(&long);
        assert_eq!(t.len(), 33);
        assert_ne!(t, token(&"y".repeat(1000)));
        assert!(untoken(&t).is_none());
        let names = Names::new("hx").unwrap();
        let r = Record {
            topics: vec!["c".into()],
            ..Default::default()
        };
        assert_eq!(names.record_subject(&r), "hx.pub.Yw.s");
        assert_eq!(names.channel_token_of("hx.pub.Yw.s"), Some("Yw"));
        assert!(Names::new("bad.prefix").is_err());
        assert!(Names::new("").is_err());
    }

    #[test]
    fn epochs_differ_by_creation_time() {
        assert_ne!(
            epoch_of(1_700_000_000_000_000_000),
            epoch_of(1_700_000_000_000_000_001)
        );
        assert!(!epoch_of(1_700_000_000_000_000_000).contains('-'));
    }
}
