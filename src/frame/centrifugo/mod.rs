//! The Centrifugo client protocol v2 as a wire format: its messages (`proto`, generated from
//! `proto/centrifugo.proto`), its two encodings (`codec`: JSON and Protobuf), and a stored record as the
//! protocol's `Publication`.
//!
//! A publication made by a Mercure publisher may carry any text; the JSON codec sends data that is not JSON
//! as a JSON string, the Protobuf codec sends the bytes. Either way one publication has one encoding per
//! codec for all WebSocket subscribers of its channel.

pub mod codec;
/// Generated from `proto/centrifugo.proto` (see `tests/protocol_codegen.rs`); kept as generated.
#[allow(clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod proto;

use bytes::Bytes;

pub use codec::Codec;

use crate::log::Record;

/// A stored record as the protocol's `Publication` (no offset for one kept out of history).
pub fn publication(r: &Record) -> proto::Publication {
    proto::Publication {
        data: r.data.clone(),
        info: r
            .info
            .as_deref()
            .and_then(|i| serde_json::from_str::<proto::ClientInfo>(i).ok()),
        offset: r.seq,
        tags: r.tags.clone(),
        ..Default::default()
    }
}

/// The publication push of `r` on `channel` (its canonical channel or an alternate topic).
pub fn push(channel: &str, r: &Record, codec: Codec) -> Bytes {
    codec.encode(&proto::Reply {
        push: Some(proto::Push {
            channel: channel.to_string(),
            r#pub: Some(publication(r)),
            ..Default::default()
        }),
        ..Default::default()
    })
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
            info: Some(r#"{"client":"c","user":"42","conn_info":{"name":"n"}}"#.into()),
            tags: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn json_data_is_embedded_text_is_quoted() {
        let v: serde_json::Value =
            serde_json::from_slice(&push("chat:1", &rec(r#"{"text":"hi"}"#), Codec::Json)).unwrap();
        assert_eq!(v["push"]["channel"], "chat:1");
        assert_eq!(v["push"]["pub"]["data"]["text"], "hi");
        assert_eq!(v["push"]["pub"]["offset"], 7);
        assert_eq!(v["push"]["pub"]["info"]["user"], "42");
        assert_eq!(v["push"]["pub"]["info"]["conn_info"]["name"], "n");
        assert_eq!(v["push"]["pub"]["tags"]["k"], "v");
        let v: serde_json::Value =
            serde_json::from_slice(&push("chat:1", &rec("line\n\"two\""), Codec::Json)).unwrap();
        assert_eq!(v["push"]["pub"]["data"], "line\n\"two\"");
    }

    #[test]
    fn protobuf_carries_the_bytes() {
        use prost::Message as _;
        let frame = push("chat:1", &rec("plain text"), Codec::Protobuf);
        let reply = proto::Reply::decode_length_delimited(&frame[..]).unwrap();
        let p = reply.push.unwrap().r#pub.unwrap();
        assert_eq!((&p.data[..], p.offset), (&b"plain text"[..], 7));
        let info = p.info.unwrap();
        assert_eq!(
            (info.user.as_str(), &info.conn_info[..]),
            ("42", &br#"{"name":"n"}"#[..])
        );
    }
}
