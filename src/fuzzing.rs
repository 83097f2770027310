//! Entry points for the fuzz targets (`fuzz/`) and for the test that replays their corpora
//! (`tests/fuzz_corpus.rs`): thin wrappers over the parsers that read untrusted bytes. Not part of the API.
//!
//! Each wrapper runs one parser the way the server does and checks a few invariants of its result. None
//! panics, whatever the input: `Err` names a broken invariant (the fuzz target turns it into a crash), and a
//! panic inside a wrapper is a bug in the parser it wraps.

use std::sync::OnceLock;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Version};
use jsonwebtoken::{Algorithm, EncodingKey};
use prost::Message as _;

use crate::auth::{Auth, Role, TokenSource};
use crate::config::{AuthConfig, LimitsConfig};
use crate::frame::centrifugo::codec::Codec;
use crate::mercure::{publish, subscribe, HUB_PATH};
use crate::server::lean::{self, Head};
use crate::topic::Selector;

/// What a wrapper found wrong; `Ok` for every input the parser handled as it should, accepted or refused.
pub type Checked = Result<(), String>;

/// A wrapper: the input of one fuzz target in, its verdict out.
pub type Target = fn(&[u8]) -> Checked;

/// The HS256 secret the `token` target verifies with; its seed tokens are signed with it.
pub const TOKEN_KEY: &str = "herald-fuzz-key";

/// Topics every selector of `hub_query` is matched against, besides the query's own strings.
const TOPICS: &[&str] = &[
    "https://example.com/books/1",
    "https://example.com/users/dunglas/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1",
    "chat:lobby",
    "personal:#42",
    "",
];

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `lean::parse`, the request-head parser of the subscriber fast path, on bytes read from a socket.
pub fn lean_request(data: &[u8]) -> Checked {
    let head = lean::parse(data);
    let preface_prefix = data.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(data);
    if preface_prefix && !matches!(head, Head::Partial) {
        return Err("a strict prefix of the HTTP/2 preface must wait for more bytes".into());
    }
    if data.starts_with(H2_PREFACE) && !matches!(head, Head::Other) {
        return Err("an HTTP/2 preface must go to hyper".into());
    }
    let Head::Subscribe(req, keep_alive) = head else {
        return Ok(());
    };
    if req.method() != Method::GET || req.version() != Version::HTTP_11 {
        return Err(format!("taken: {} {:?}", req.method(), req.version()));
    }
    if req.uri().path() != HUB_PATH {
        return Err(format!("taken: path {:?}", req.uri().path()));
    }
    if !data.ends_with(b"\n") {
        return Err("taken with bytes after the head".into());
    }
    let h = req.headers();
    for name in [header::UPGRADE, header::TRANSFER_ENCODING, header::EXPECT] {
        if h.contains_key(&name) {
            return Err(format!("taken with a {name} header"));
        }
    }
    if h.get_all(header::CONTENT_LENGTH).iter().any(|v| v != "0") {
        return Err("taken with a body".into());
    }
    let close = h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    });
    if keep_alive == close {
        return Err(format!(
            "keep-alive {keep_alive} with connection: close {close}"
        ));
    }
    // What the handler does next with the query.
    hub_query(req.uri().query().unwrap_or("").as_bytes())
}

/// The hub's subscribe query: `topic`s and `lastEventID`, the selector cost check with the default limits,
/// then each selector compiled and matched, as `GET /.well-known/mercure` does.
pub fn hub_query(query: &[u8]) -> Checked {
    let query = String::from_utf8_lossy(query);
    let (topics, last_id) = subscribe::parse_query(&query);
    let limits = LimitsConfig::default();
    if subscribe::check_selector_cost(&limits, &topics).is_err() {
        return Ok(()); // refused with a 400 before anything is compiled
    }
    let selectors: Vec<Selector> = topics.iter().map(|t| Selector::parse(t)).collect();
    for (raw, s) in topics.iter().zip(&selectors) {
        check_selector(raw, s)?;
        for t in TOPICS
            .iter()
            .copied()
            .chain(topics.iter().map(String::as_str))
            .chain(last_id.as_deref())
        {
            s.matches(t);
        }
    }
    Ok(())
}

/// A selector (the bytes up to the first newline) compiled and matched against a topic (the rest; the
/// selector itself when there is no newline).
pub fn uri_template(data: &[u8]) -> Checked {
    let text = String::from_utf8_lossy(data);
    let (template, topic) = text.split_once('\n').unwrap_or((&text, &text));
    let s = Selector::parse(template);
    check_selector(template, &s)?;
    s.matches(topic);
    Ok(())
}

fn check_selector(raw: &str, s: &Selector) -> Checked {
    if s.as_str() != raw {
        return Err(format!("selector {raw:?} reads back as {:?}", s.as_str()));
    }
    if !s.matches(raw) {
        return Err(format!("selector {raw:?} does not match itself"));
    }
    if matches!(s, Selector::Template { .. }) && !raw.contains('{') {
        return Err(format!("{raw:?} compiled as a template"));
    }
    Ok(())
}

/// A publish body, as a form and as JSON.
pub fn publish_body(body: &[u8]) -> Checked {
    if let Ok(p) = publish::parse_form(body) {
        if p.id.as_deref() == Some("") || p.event_type.as_deref() == Some("") {
            return Err("an empty id or type from a form is kept".into());
        }
    }
    if let Ok(p) = publish::parse_json(body) {
        if p.info.is_some() {
            return Err("a JSON body set the publisher's client info".into());
        }
    }
    Ok(())
}

/// One WebSocket frame of the Centrifugo client protocol decoded into commands with each codec, as a
/// connection does (a text frame with JSON, a binary one with Protobuf); no connection. Every command
/// decoded must survive a Protobuf round trip unchanged: the two codecs share one model.
pub fn centrifugo_command(frame: &[u8]) -> Checked {
    for codec in [Codec::Json, Codec::Protobuf] {
        let Ok(commands) = codec.decode(frame) else {
            continue; // the connection closes with 3501
        };
        let mut encoded = Vec::new();
        for cmd in &commands {
            if cmd.encode_length_delimited(&mut encoded).is_err() {
                return Err(format!("{codec:?}: cannot re-encode {cmd:?}"));
            }
        }
        match Codec::Protobuf.decode(&encoded) {
            Ok(again) if again == commands => {}
            again => return Err(format!("{codec:?}: {commands:?} round-trips to {again:?}")),
        }
    }
    Ok(())
}

fn auth() -> Result<&'static Auth, String> {
    static AUTH: OnceLock<Result<Auth, String>> = OnceLock::new();
    AUTH.get_or_init(|| {
        Auth::from_config(&AuthConfig {
            jwt_key: Some(TOKEN_KEY.into()),
            ..AuthConfig::default()
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Token extraction and verification. The input is lines: `name: value` is a request header (invalid
/// names and values are skipped, as hyper would refuse them), a line starting with `?` is the query string
/// (the last one wins). The token found is verified with the HS256 key [`TOKEN_KEY`] as sent, and again
/// re-signed with that key, so that mutated claims reach claim decoding and validation past the signature.
pub fn token(data: &[u8]) -> Checked {
    let auth = auth()?;
    let mut headers = HeaderMap::new();
    let mut query = None;
    for line in data.split(|&b| b == b'\n') {
        if let Some(q) = line.strip_prefix(b"?") {
            query = Some(String::from_utf8_lossy(q).into_owned());
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let found = match auth.extract(&headers, query.as_deref()) {
        Ok(found) => found,
        Err(e) if headers.contains_key(header::AUTHORIZATION) && e.code == "token_malformed" => {
            return Ok(())
        }
        Err(e) => return Err(format!("extract refused with {}: {}", e.code, e.message)),
    };
    let Some((token, source)) = found else {
        return Ok(());
    };
    let expected = if headers.contains_key(header::AUTHORIZATION) {
        TokenSource::Header
    } else if query
        .as_deref()
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "authorization"))
    {
        TokenSource::Query
    } else {
        TokenSource::Cookie
    };
    if source != expected {
        return Err(format!("token from {source:?}, expected {expected:?}"));
    }
    let as_sent = verify(auth, &token)?;
    let Some((signed, _)) = token.rsplit_once('.') else {
        return Ok(());
    };
    let alg = match jsonwebtoken::decode_header(&token).map(|h| h.alg) {
        Ok(alg @ (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)) => alg,
        _ => return Ok(()),
    };
    let key = EncodingKey::from_secret(TOKEN_KEY.as_bytes());
    let Ok(signature) = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, alg) else {
        return Ok(());
    };
    let resigned = verify(auth, &format!("{signed}.{signature}"))?;
    if as_sent && !resigned {
        return Err("a token valid as sent is refused once re-signed with the same key".into());
    }
    Ok(())
}

/// Whether `token` verified; `Err` when a refusal is not one of the explained ones.
fn verify(auth: &Auth, token: &str) -> Result<bool, String> {
    match auth.verify(Role::Subscriber, token) {
        Ok(claims) => {
            let _ = claims.payload();
            Ok(true)
        }
        Err(e) if e.code.starts_with("token_") => Ok(false),
        Err(e) => Err(format!("verify refused with {}: {}", e.code, e.message)),
    }
}

/// Every wrapper by the name of its fuzz target (and corpus directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("lean_request", lean_request),
    ("hub_query", hub_query),
    ("uri_template", uri_template),
    ("publish_body", publish_body),
    ("centrifugo_command", centrifugo_command),
    ("token", token),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realistic_inputs_pass() {
        assert_eq!(
            lean_request(
                b"GET /.well-known/mercure?topic=https%3A%2F%2Fe.com%2F%7Bid%7D HTTP/1.1\r\n\
                  host: e.com\r\ncookie: mercureAuthorization=x\r\nlast-event-id: 5\r\n\r\n"
            ),
            Ok(())
        );
        assert_eq!(
            hub_query(b"topic=a&topic=b%2F%7Bid%7D&lastEventID=x"),
            Ok(())
        );
        assert_eq!(uri_template(b"/books/{id}\n/books/1"), Ok(()));
        assert_eq!(publish_body(b"topic=a&data=b&id=&type="), Ok(()));
        assert_eq!(publish_body(br#"{"topic":["a"],"data":{"x":1}}"#), Ok(()));
        assert_eq!(
            centrifugo_command(b"{\"id\":1,\"connect\":{\"token\":\"t\"}}\n{\"id\":2,\"ping\":{}}"),
            Ok(())
        );
        assert_eq!(centrifugo_command(&[b'{'; 300]), Ok(()));
    }

    /// Replays every committed input of every fuzz target (`fuzz/corpus/<target>/`, minimized) and every
    /// crash reproducer kept after its fix (`fuzz/regressions/<target>/`) through the target's wrapper: the
    /// short fuzzing run of CI.
    #[test]
    fn fuzz_corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for (target, run) in TARGETS {
            let mut files = 0;
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    if let Err(e) = run(&data) {
                        panic!("{}: {e}", path.display());
                    }
                    files += 1;
                }
            }
            assert!(files > 0, "no corpus for {target} under {}", root.display());
        }
    }

    #[test]
    fn token_sources_and_resigning() {
        let key = crate::auth::encoding_key(TOKEN_KEY, Algorithm::HS256).unwrap();
        let jwt =
            crate::auth::sign(&crate::auth::Claims::default(), Algorithm::HS256, &key).unwrap();
        assert_eq!(verify(auth().unwrap(), &jwt), Ok(true));
        for input in [
            format!("authorization: Bearer {jwt}"),
            format!("?authorization={jwt}\ncookie: a=b"),
            format!("cookie: x=1; mercureAuthorization=\"{jwt}\""),
            format!("cookie: mercureAuthorization={}x", &jwt[..jwt.len() - 1]),
            "authorization: Basic abc".to_string(),
        ] {
            assert_eq!(token(input.as_bytes()), Ok(()), "{input}");
        }
    }
}
