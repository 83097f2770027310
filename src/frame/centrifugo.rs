//! Centrifugo client protocol v2, JSON: publications as they appear in pushes, subscribe replies and history.
//!
//! `data` is raw JSON in this protocol. A publication made by a Mercure publisher may carry any text, so data
//! that is not JSON is sent as a JSON string; JSON data is embedded as is. Either way the same publication
//! has one encoding for all WebSocket subscribers of its channel.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::log::Record;

/// `{"data":…,"offset":N[,"info":…][,"tags":{…}]}`; no offset for a publication kept out of history.
pub fn publication(r: &Record) -> String {
    let text = r.data_text();
    let data = if serde_json::from_str::<&RawValue>(&text).is_ok() {
        text.into_owned()
    } else {
        json_string(&text)
    };
    let mut out = format!(r#"{{"data":{data}"#);
    if r.seq > 0 {
        out.push_str(&format!(r#","offset":{}"#, r.seq));
    }
    if !r.tags.is_empty() {
        if let Ok(tags) = serde_json::to_string(&r.tags) {
            out.push_str(r#","tags":"#);
            out.push_str(&tags);
        }
    }
    if let Some(info) = r
        .info
        .as_deref()
        .filter(|i| serde_json::from_str::<&RawValue>(i).is_ok())
    {
        out.push_str(r#","info":"#);
        out.push_str(info);
    }
    out.push('}');
    out
}

/// `{"push":{"channel":"…","pub":{…}}}` for `channel` (the record's canonical channel or an alternate).
pub fn push(channel: &str, r: &Record) -> Bytes {
    Bytes::from(format!(
        r#"{{"push":{{"channel":{},"pub":{}}}}}"#,
        json_string(channel),
        publication(r)
    ))
}

pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(data: &str) -> Record {
        Record {
            seq: 7,
            id: "x".into(),
            topics: vec!["chat:1".into()],
            data: data.to_string().into(),
            private: false,
            event_type: None,
            retry: None,
            time_ms: 0,
            info: Some(r#"{"client":"c","user":"42"}"#.into()),
            tags: Default::default(),
        }
    }

    #[test]
    fn json_data_is_embedded_text_is_quoted() {
        let v: serde_json::Value =
            serde_json::from_slice(&push("chat:1", &rec(r#"{"text":"hi"}"#))).unwrap();
        assert_eq!(v["push"]["channel"], "chat:1");
        assert_eq!(v["push"]["pub"]["data"]["text"], "hi");
        assert_eq!(v["push"]["pub"]["offset"], 7);
        assert_eq!(v["push"]["pub"]["info"]["user"], "42");
        let v: serde_json::Value =
            serde_json::from_slice(&push("chat:1", &rec("line\n\"two\""))).unwrap();
        assert_eq!(v["push"]["pub"]["data"], "line\n\"two\"");
    }
}
