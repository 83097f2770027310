//! How records and feed messages look in Redis.
//!
//! A stored record is a stream entry: its id is `<seq>-0`, its fields `i` (event id), `m` (metadata as
//! JSON: topics, flags, time, tags), `d` (the data, raw bytes: Centrifugo payloads need not be text). The
//! data stays out of the JSON so it is stored and sent as is, without escaping or base64.
//!
//! A feed message is one pub/sub payload whose first byte says what it is:
//! - `P<seq>\n<epoch>\n<id>\n<metadata>\n<data>`: a publication (seq 0: kept out of history). Ids and the
//!   epoch hold no line break (the hub refuses such ids) and JSON escapes its own, so the data, last, may
//!   hold anything. The append script writes this same shape.
//! - `J<json>`: a join or leave; `C<json>\n<payload>`: a control message for live connections.

use std::collections::BTreeMap;

use ::redis::Value;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::hub::ClientInfo;
use crate::log::{LogError, Record};

#[derive(Serialize, Deserialize)]
struct Meta {
    #[serde(rename = "t")]
    topics: Vec<String>,
    #[serde(rename = "p", default, skip_serializing_if = "is_false")]
    private: bool,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    retry: Option<u64>,
    #[serde(rename = "m", default)]
    time_ms: i64,
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    info: Option<String>,
    #[serde(rename = "g", default, skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The metadata of `r` as stored and sent (everything but seq, id and data).
pub fn meta(r: &Record) -> Result<String, LogError> {
    serde_json::to_string(&Meta {
        topics: r.topics.clone(),
        private: r.private,
        event_type: r.event_type.clone(),
        retry: r.retry,
        time_ms: r.time_ms,
        info: r.info.clone(),
        tags: r.tags.clone(),
    })
    .map_err(|e| LogError::Storage(format!("cannot encode a record: {e}")))
}

fn record(seq: u64, id: String, meta: &[u8], data: Bytes) -> Result<Record, LogError> {
    let m: Meta = serde_json::from_slice(meta).map_err(|e| LogError::Corrupt {
        seq,
        reason: format!("metadata: {e}"),
    })?;
    Ok(Record {
        seq,
        id,
        topics: m.topics,
        data,
        private: m.private,
        event_type: m.event_type,
        retry: m.retry,
        time_ms: m.time_ms,
        info: m.info,
        tags: m.tags,
    })
}

/// The seq of a stream entry id `<seq>-0`.
pub fn entry_seq(id: &[u8]) -> Option<u64> {
    std::str::from_utf8(id)
        .ok()?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// A value as text (a number or a string reply), for small replies.
pub fn text(v: Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// A value as a number (an integer reply or its decimal text); `Nil` is 0.
pub fn number(v: Value) -> Option<u64> {
    match v {
        Value::Nil => Some(0),
        Value::Int(i) => u64::try_from(i).ok(),
        v => text(v)?.parse().ok(),
    }
}

/// The elements of an array reply (`Nil`: none).
pub fn array(v: Value) -> Result<Vec<Value>, LogError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(LogError::Storage(format!(
            "unexpected reply from Redis: {other:?}"
        ))),
    }
}

/// One log entry (`[id, [field, value, ...]]`) as a record.
fn entry(v: Value) -> Result<Record, LogError> {
    let mut parts = array(v)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(LogError::Storage("a stream entry without fields".into()));
    };
    let id = bytes(id).unwrap_or_default();
    let seq = entry_seq(&id).ok_or_else(|| {
        LogError::Storage(format!(
            "a stream entry id that is not a position: {}",
            String::from_utf8_lossy(&id)
        ))
    })?;
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Map(m) => m,
        other => {
            let mut flat = array(other)?.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                pairs.push((k, v));
            }
            pairs
        }
    };
    let (mut event_id, mut meta, mut data) = (None, None, None);
    for (k, v) in pairs {
        match bytes(k).as_deref() {
            Some(b"i") => event_id = bytes(v),
            Some(b"m") => meta = bytes(v),
            Some(b"d") => data = bytes(v),
            _ => {}
        }
    }
    let (Some(event_id), Some(meta)) = (event_id, meta) else {
        return Err(LogError::Corrupt {
            seq,
            reason: "missing id or metadata".into(),
        });
    };
    let event_id = String::from_utf8(event_id).map_err(|_| LogError::Corrupt {
        seq,
        reason: "the id is not UTF-8".into(),
    })?;
    record(seq, event_id, &meta, Bytes::from(data.unwrap_or_default()))
}

/// The records of an array of log entries.
pub fn entries(v: Value) -> Result<Vec<Record>, LogError> {
    array(v)?.into_iter().map(entry).collect()
}

/// What arrives on the feed.
#[derive(Debug)]
pub enum Message {
    Publication {
        epoch: String,
        record: Record,
    },
    Presence {
        channel: String,
        info: ClientInfo,
        joined: bool,
    },
    Control {
        user: String,
        client: Option<String>,
        payload: Bytes,
    },
}

#[derive(Serialize, Deserialize)]
struct PresenceMsg {
    c: String,
    i: ClientInfo,
    j: bool,
}

#[derive(Serialize, Deserialize)]
struct ControlMsg {
    u: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
}

/// A publication message, as the append script writes it (used for those kept out of history).
pub fn publication_message(epoch: &str, r: &Record) -> Result<Vec<u8>, LogError> {
    let meta = meta(r)?;
    let mut m = Vec::with_capacity(r.data.len() + meta.len() + 32);
    m.extend_from_slice(format!("P{}\n{epoch}\n{}\n{meta}\n", r.seq, r.id).as_bytes());
    m.extend_from_slice(&r.data);
    Ok(m)
}

pub fn presence_message(
    channel: &str,
    info: &ClientInfo,
    joined: bool,
) -> Result<Vec<u8>, LogError> {
    let json = serde_json::to_vec(&PresenceMsg {
        c: channel.to_string(),
        i: info.clone(),
        j: joined,
    })
    .map_err(|e| LogError::Storage(e.to_string()))?;
    let mut m = Vec::with_capacity(json.len() + 1);
    m.push(b'J');
    m.extend_from_slice(&json);
    Ok(m)
}

pub fn control_message(
    user: String,
    client: Option<String>,
    payload: &[u8],
) -> Result<Vec<u8>, LogError> {
    let json = serde_json::to_vec(&ControlMsg { u: user, c: client })
        .map_err(|e| LogError::Storage(e.to_string()))?;
    let mut m = Vec::with_capacity(json.len() + payload.len() + 2);
    m.push(b'C');
    m.extend_from_slice(&json);
    m.push(b'\n');
    m.extend_from_slice(payload);
    Ok(m)
}

/// Reads one feed message.
pub fn parse(payload: &[u8]) -> Result<Message, String> {
    let (kind, rest) = payload.split_first().ok_or("an empty message")?;
    match kind {
        b'P' => {
            let mut parts = rest.splitn(5, |&b| b == b'\n');
            let (Some(seq), Some(epoch), Some(id), Some(meta), Some(data)) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err("a truncated publication".into());
            };
            let seq: u64 = std::str::from_utf8(seq)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("a publication without a position")?;
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|e| e.to_string());
            let record = record(seq, text(id)?, meta, Bytes::copy_from_slice(data))
                .map_err(|e| e.to_string())?;
            Ok(Message::Publication {
                epoch: text(epoch)?,
                record,
            })
        }
        b'J' => {
            let m: PresenceMsg = serde_json::from_slice(rest).map_err(|e| e.to_string())?;
            Ok(Message::Presence {
                channel: m.c,
                info: m.i,
                joined: m.j,
            })
        }
        b'C' => {
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("a control message without a payload")?;
            let m: ControlMsg = serde_json::from_slice(&rest[..nl]).map_err(|e| e.to_string())?;
            Ok(Message::Control {
                user: m.u,
                client: m.c,
                payload: Bytes::copy_from_slice(&rest[nl + 1..]),
            })
        }
        other => Err(format!("an unknown message kind {:?}", *other as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            seq: 7,
            id: "#ep-7".into(),
            topics: vec!["chat".into(), "alt".into()],
            data: Bytes::from_static(b"line1\nline2\0\xff"),
            private: true,
            event_type: Some("msg".into()),
            retry: Some(3),
            time_ms: 1234,
            info: Some(r#"{"user":"u"}"#.into()),
            tags: [("k".to_string(), "v".to_string())].into(),
        }
    }

    /// A publication survives the feed's framing whatever its data holds (line breaks, binary).
    #[test]
    fn publication_round_trip() {
        let r = rec();
        let m = publication_message("ep", &r).unwrap();
        match parse(&m).unwrap() {
            Message::Publication { epoch, record } => {
                assert_eq!(epoch, "ep");
                assert_eq!(record, r);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stored_entry_round_trip() {
        let r = rec();
        let v = Value::Array(vec![
            Value::BulkString(b"7-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"i".to_vec()),
                Value::BulkString(r.id.clone().into_bytes()),
                Value::BulkString(b"m".to_vec()),
                Value::BulkString(meta(&r).unwrap().into_bytes()),
                Value::BulkString(b"d".to_vec()),
                Value::BulkString(r.data.to_vec()),
            ]),
        ]);
        assert_eq!(entries(Value::Array(vec![v])).unwrap(), vec![r]);
    }

    #[test]
    fn presence_and_control_round_trip() {
        let info = ClientInfo {
            client: "c1".into(),
            user: "u1".into(),
            conn_info: None,
            chan_info: Some(serde_json::json!({"a": 1})),
        };
        match parse(&presence_message("room", &info, true).unwrap()).unwrap() {
            Message::Presence {
                channel,
                info: i,
                joined,
            } => assert_eq!((channel.as_str(), i, joined), ("room", info, true)),
            other => panic!("{other:?}"),
        }
        let m = control_message("u1".into(), Some("c1".into()), b"{\"x\":\n1}").unwrap();
        match parse(&m).unwrap() {
            Message::Control {
                user,
                client,
                payload,
            } => {
                assert_eq!(user, "u1");
                assert_eq!(client.as_deref(), Some("c1"));
                assert_eq!(&payload[..], b"{\"x\":\n1}");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(b"").is_err());
        assert!(parse(b"Pnope").is_err());
        assert!(parse(b"X").is_err());
    }
}
