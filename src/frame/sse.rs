//! Server-Sent Events framing (WHATWG HTML, "Server-sent events").
//!
//! Data is split on line breaks into several `data:` lines (empty lines kept), because a raw newline would
//! end the field early; `\r\n` and lone `\r` count as breaks too, as the EventSource parser treats them so.
//! Ids and event types cannot contain line breaks (the hub rejects them at publish time), so they are
//! written verbatim.

use bytes::{BufMut, Bytes, BytesMut};

use crate::log::Record;

/// A comment line: flushes headers at subscription time and keeps idle connections alive through proxies.
pub const COMMENT: &[u8] = b":\n";

/// The event for `r`. A publication kept out of history (`skip_history`) has no id, so it does not move a
/// client's `Last-Event-ID`.
pub fn encode(r: &Record) -> Bytes {
    let mut b = BytesMut::with_capacity(r.data.len() + r.id.len() + 32);
    if let Some(t) = &r.event_type {
        b.put_slice(b"event: ");
        b.put_slice(t.as_bytes());
        b.put_u8(b'\n');
    }
    if let Some(retry) = r.retry {
        b.put_slice(format!("retry: {retry}\n").as_bytes());
    }
    if !r.id.is_empty() {
        b.put_slice(b"id: ");
        b.put_slice(r.id.as_bytes());
        b.put_u8(b'\n');
    }
    for line in split_lines(&r.data_text()) {
        b.put_slice(b"data: ");
        b.put_slice(line.as_bytes());
        b.put_u8(b'\n');
    }
    b.put_u8(b'\n');
    b.freeze()
}

fn split_lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(data: &str) -> Record {
        Record {
            seq: 1,
            id: "urn:uuid:1".into(),
            topics: vec!["t".into()],
            data: data.to_string().into(),
            private: false,
            event_type: None,
            retry: None,
            time_ms: 0,
            info: None,
            tags: Default::default(),
        }
    }

    #[test]
    fn multi_line_data_keeps_empty_lines() {
        let out = encode(&rec("a\n\nb\r\nc\rd"));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "id: urn:uuid:1\ndata: a\ndata: \ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn event_and_retry() {
        let mut r = rec("");
        r.event_type = Some("ping".into());
        r.retry = Some(1500);
        assert_eq!(
            std::str::from_utf8(&encode(&r)).unwrap(),
            "event: ping\nretry: 1500\nid: urn:uuid:1\ndata: \n\n"
        );
    }
}
