//! The two encodings of the Centrifugo client protocol over one model: the message types of
//! `proto/centrifugo.proto` (generated into `proto.rs`) are what the connection code reads and writes;
//! this module turns them into frames and back.
//!
//! - **JSON** (text frames, the default): newline-delimited objects, snake_case names, default values
//!   omitted (as Centrifugo's Go encoder does), `bytes` fields carried as raw JSON. Data that is not JSON (a
//!   Mercure publisher's text, binary `b64data`) is sent as a JSON string, so a JSON client can always parse
//!   what it gets.
//! - **Protobuf** (binary frames, chosen by the `centrifuge-protobuf` subprotocol or `?format=protobuf`):
//!   varint-length-delimited messages, several per frame; `bytes` fields are the bytes themselves.

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use super::proto::{Command, Reply};

/// The WebSocket subprotocol that selects Protobuf (what the SDKs' Protobuf builds send).
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Protobuf,
}

impl Codec {
    /// Whether frames are binary (else text).
    pub fn binary(self) -> bool {
        self == Codec::Protobuf
    }

    /// The commands of one frame.
    pub fn decode(self, frame: &[u8]) -> Result<Vec<Command>, String> {
        match self {
            Codec::Json => frame
                .split(|&b| b == b'\n')
                .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
                .map(|line| serde_json::from_slice(line).map_err(|e| e.to_string()))
                .collect(),
            Codec::Protobuf => {
                let mut buf = frame;
                let mut out = Vec::new();
                while !buf.is_empty() {
                    out.push(
                        Command::decode_length_delimited(&mut buf).map_err(|e| e.to_string())?,
                    );
                }
                Ok(out)
            }
        }
    }

    /// One reply or push, as it goes into a frame (see [`Codec::join`]).
    pub fn encode(self, reply: &Reply) -> Bytes {
        match self {
            // Serializing these types cannot fail (string keys, no custom serializer that errors).
            Codec::Json => serde_json::to_vec(reply)
                .map(Bytes::from)
                .unwrap_or_default(),
            Codec::Protobuf => Bytes::from(reply.encode_length_delimited_to_vec()),
        }
    }

    /// Encoded replies and pushes joined into one frame: JSON objects one per line, Protobuf messages
    /// back to back (each carries its length). A lone one is passed through without a copy.
    pub fn join(self, mut parts: Vec<Bytes>) -> Bytes {
        if parts.len() == 1 {
            return parts.pop().unwrap_or_default();
        }
        let sep: &[u8] = match self {
            Codec::Json => b"\n",
            Codec::Protobuf => b"",
        };
        let mut buf = BytesMut::with_capacity(parts.iter().map(|p| p.len() + sep.len()).sum());
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                buf.extend_from_slice(sep);
            }
            buf.extend_from_slice(p);
        }
        buf.freeze()
    }

    /// The server's ping: an empty reply (`{}` in JSON).
    pub fn ping(self) -> Bytes {
        self.encode(&Reply::default())
    }
}

/// `skip_serializing_if` for every field of the generated types: omit what equals its default.
pub fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// `bytes` fields in JSON: embedded as raw JSON when they hold JSON, as a JSON string otherwise; read back
/// as the raw JSON text.
pub mod raw_json {
    use super::*;
    use serde::{Deserializer, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(text),
            },
            Err(_) => s.serialize_str(&String::from_utf8_lossy(b)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(Bytes::from(raw.get().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{Publication, Push, SubscribeRequest};
    use super::*;

    fn push(data: &[u8]) -> Reply {
        Reply {
            push: Some(Push {
                channel: "chat:1".into(),
                r#pub: Some(Publication {
                    data: Bytes::copy_from_slice(data),
                    offset: 7,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn json_omits_defaults_and_embeds_json_data() {
        let v: serde_json::Value =
            serde_json::from_slice(&Codec::Json.encode(&push(br#"{"text":"hi"}"#))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"push": {"channel": "chat:1", "pub": {"data": {"text": "hi"}, "offset": 7}}})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&Codec::Json.encode(&push(b"line\n\"two\""))).unwrap();
        assert_eq!(v["push"]["pub"]["data"], "line\n\"two\"");
        assert_eq!(&Codec::Json.ping()[..], b"{}");
    }

    #[test]
    fn json_commands_one_per_line_with_raw_data() {
        let cmds = Codec::Json
            .decode(b"{\"id\":1,\"publish\":{\"channel\":\"a\",\"data\":{\"x\":[1,2]}}}\n\n{}\n")
            .unwrap();
        assert_eq!(cmds.len(), 2);
        let p = cmds[0].publish.as_ref().unwrap();
        assert_eq!(&p.data[..], br#"{"x":[1,2]}"#);
        assert_eq!(cmds[1], Command::default(), "a pong");
        assert!(Codec::Json.decode(b"{nope").is_err());
    }

    #[test]
    fn protobuf_frames_hold_several_length_delimited_messages() {
        let a = Command {
            id: 1,
            subscribe: Some(SubscribeRequest {
                channel: "x".into(),
                join_leave: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = Command::default();
        let mut frame = a.encode_length_delimited_to_vec();
        frame.extend(b.encode_length_delimited_to_vec());
        assert_eq!(Codec::Protobuf.decode(&frame).unwrap(), vec![a, b]);
        assert!(Codec::Protobuf.decode(&frame[..frame.len() - 2]).is_err());
        let joined = Codec::Protobuf.join(vec![
            Codec::Protobuf.encode(&push(b"\x00\xff")),
            Codec::Protobuf.ping(),
        ]);
        let mut buf = &joined[..];
        let first = Reply::decode_length_delimited(&mut buf).unwrap();
        assert_eq!(&first.push.unwrap().r#pub.unwrap().data[..], b"\x00\xff");
        assert_eq!(
            Reply::decode_length_delimited(&mut buf).unwrap(),
            Reply::default()
        );
        assert!(buf.is_empty());
    }
}
