//! The access matrix: publisher face × reader face × channel kind × identity × path. Every cell asserts
//! delivered, filtered (the subscription stands but the record is not shown) or refused (the subscription
//! itself is refused), against an expectation written here independently of the code: nothing denied on
//! one face may be readable on the other.

use std::fmt;

use serde_json::{json, Value};

use crate::common::*;
use crate::wsclient::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A public channel.
    Public,
    /// A private Mercure update on a public channel.
    Private,
    /// A channel of a namespace with `subscribe = "token"`.
    Token,
    /// A `#` user-limited channel (alice and bob).
    User,
    /// alice's personal channel.
    Personal,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Public,
        Kind::Private,
        Kind::Token,
        Kind::User,
        Kind::Personal,
    ];

    fn channel(self) -> &'static str {
        match self {
            Kind::Public | Kind::Private => "news",
            Kind::Token => "secret:plans",
            Kind::User => "dm:chat#alice,bob",
            Kind::Personal => "personal:#alice",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Anonymous,
    /// A valid token without any claim.
    NoClaims,
    /// alice, with the claim this kind needs.
    Right,
    /// eve, with claims for something else.
    Other,
}

const WHO: [Who; 4] = [Who::Anonymous, Who::NoClaims, Who::Right, Who::Other];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Face {
    Mercure,
    Api,
    Client,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reader {
    /// SSE with the channel as an exact topic.
    SseExact,
    /// SSE with `topic=*`.
    SseWildcard,
    /// WebSocket, Centrifugo protocol.
    Ws,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Live,
    /// SSE: `lastEventID=earliest`; WebSocket: the `history` command.
    History,
    /// SSE: reconnect with `Last-Event-ID`; WebSocket: subscribe with recovery.
    Resume,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Delivered,
    Filtered,
    Refused,
}

/// The model, stated independently of the code (docs/USAGE.md, "Who can read what").
fn expected(kind: Kind, who: Who, reader: Reader) -> Outcome {
    let may_read = kind == Kind::Public || who == Who::Right;
    if may_read {
        Outcome::Delivered
    } else if reader == Reader::SseWildcard || kind == Kind::Private {
        // A wildcard cannot be refused up front, and a private update sits on a channel anyone may read.
        Outcome::Filtered
    } else {
        Outcome::Refused
    }
}

struct Cell {
    face: Face,
    kind: Kind,
    reader: Reader,
    who: Who,
    path: Path,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} publish, {:?} read, {:?} channel, {:?}, {:?}",
            self.face, self.reader, self.kind, self.who, self.path
        )
    }
}

fn now() -> i64 {
    herald::auth::unix_now() as i64
}

fn signed(mut claims: Value) -> String {
    claims["exp"] = json!(now() + 600);
    sign_json(&claims)
}

/// The token of `who` reading `kind` (`None`: anonymous), and for the WebSocket a subscription token.
fn tokens(kind: Kind, who: Who) -> (Option<String>, Option<String>, Option<String>) {
    // (SSE token, WS connection token, WS subscription token)
    match who {
        Who::Anonymous => (None, None, None),
        Who::NoClaims => (Some(signed(json!({}))), Some(signed(json!({}))), None),
        Who::Other => {
            let t = signed(json!({"sub": "eve", "mercure": {"subscribe": ["other"]}}));
            (Some(t.clone()), Some(t), None)
        }
        Who::Right => match kind {
            Kind::Public | Kind::User | Kind::Personal => {
                let t = signed(json!({"sub": "alice"}));
                (Some(t.clone()), Some(t), None)
            }
            Kind::Private => {
                let t = signed(json!({"sub": "alice", "mercure": {"subscribe": ["news"]}}));
                (Some(t.clone()), Some(t), None)
            }
            Kind::Token => (
                Some(signed(
                    json!({"sub": "alice", "mercure": {"subscribe": ["secret:plans"]}}),
                )),
                Some(signed(json!({"sub": "alice"}))),
                Some(signed(json!({"sub": "alice", "channel": "secret:plans"}))),
            ),
        },
    }
}

fn faces(kind: Kind) -> &'static [Face] {
    match kind {
        Kind::Private => &[Face::Mercure], // only Mercure publishers mark updates private
        Kind::Personal => &[Face::Mercure, Face::Api], // clients may not publish there
        _ => &[Face::Mercure, Face::Api, Face::Client],
    }
}

/// Reads SSE events until the one carrying `end`; the data of each event before it.
async fn sse_until(sse: &mut Sse, end: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let ev = sse.next_event().await.expect("the stream stays open");
        if ev.data.contains(end) {
            return seen;
        }
        seen.push(ev.data);
    }
}

/// Reads WebSocket pushes until the publication carrying `end`; the data of the publications before it.
async fn ws_until(ws: &mut Ws, end: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let v = next(ws).await;
        let Some(data) = v["push"]["pub"].get("data") else {
            continue; // join/leave and the like
        };
        let data = data.to_string();
        if data.contains(end) {
            return seen;
        }
        seen.push(data);
    }
}

async fn sse_open(
    s: &TestServer,
    topics: &[&str],
    token: Option<&str>,
    extra: &[(&str, &str)],
    last_id: Option<&str>,
) -> Result<Sse, u16> {
    let mut req = reqwest::Client::new().get(subscribe_url(&s.url, topics, extra));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    let sse = Sse::open(req).await;
    if sse.status == 200 {
        Ok(sse)
    } else {
        Err(sse.status)
    }
}

async fn ws_connect(s: &TestServer, token: Option<&str>) -> Ws {
    connected_with(s, token).await
}

/// Subscribes; `Err(code)` when refused.
async fn ws_subscribe(
    ws: &mut Ws,
    id: u32,
    channel: &str,
    sub_token: Option<&str>,
    recover_from: Option<(u64, &str)>,
) -> Result<Value, u64> {
    let mut req = json!({"channel": channel});
    if let Some(t) = sub_token {
        req["token"] = json!(t);
    }
    if let Some((offset, epoch)) = recover_from {
        req["recover"] = json!(true);
        req["offset"] = json!(offset);
        req["epoch"] = json!(epoch);
    }
    let reply = call(ws, id, json!({ "subscribe": req })).await;
    match reply["error"]["code"].as_u64() {
        Some(code) => Err(code),
        None => Ok(reply["subscribe"].clone()),
    }
}

struct Matrix {
    failures: Vec<String>,
    cells: usize,
}

impl Matrix {
    fn check(&mut self, cell: Cell, got: Outcome) {
        self.cells += 1;
        let want = expected(cell.kind, cell.who, cell.reader);
        if got != want {
            self.failures
                .push(format!("{cell}: expected {want:?}, got {got:?}"));
        }
    }
}

fn outcome(seen: &[String], marker: &str) -> Outcome {
    match seen.iter().filter(|d| d.contains(marker)).count() {
        0 => Outcome::Filtered,
        1 => Outcome::Delivered,
        n => panic!("{marker} delivered {n} times"),
    }
}

#[tokio::test]
async fn who_can_read_what_on_every_face_and_path() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
        ("centrifugo.namespaces", r#"[{name = "", publish = "subscribers"}, {name = "secret", subscribe = "token", publish = "subscribers"}, {name = "dm", publish = "subscribers"}]"#),
    ])
    .await;
    let epoch = s.hub.epoch();
    // alice publishes as a client: subscribed to every channel she may publish into.
    let mut alice = ws_connect(&s, Some(&signed(json!({"sub": "alice"})))).await;
    for (id, ch) in [(2, "news"), (3, "dm:chat#alice,bob")] {
        ws_subscribe(&mut alice, id, ch, None, None)
            .await
            .expect("alice subscribes");
    }
    let secret_token = signed(json!({"sub": "alice", "channel": "secret:plans"}));
    ws_subscribe(&mut alice, 4, "secret:plans", Some(&secret_token), None)
        .await
        .expect("alice subscribes with a subscription token");

    let mut m = Matrix {
        failures: Vec::new(),
        cells: 0,
    };
    let mut round = 0;
    for kind in Kind::ALL {
        for &face in faces(kind) {
            round += 1;
            let marker = format!("mark-{round}");
            let end = format!("end-{round}");
            let channel = kind.channel();
            let topics: Vec<&str> = if channel == "news" {
                vec!["news"]
            } else {
                vec![channel, "news"]
            };

            // Live readers, open before anything is published this round.
            let mut live_sse = Vec::new();
            let mut live_ws = Vec::new();
            for who in WHO {
                let (sse_tok, ws_tok, sub_tok) = tokens(kind, who);
                let exact = sse_open(&s, &topics, sse_tok.as_deref(), &[], None).await;
                let wild = sse_open(&s, &["*"], sse_tok.as_deref(), &[], None).await;
                let mut ws = ws_connect(&s, ws_tok.as_deref()).await;
                let sub = ws_subscribe(&mut ws, 2, channel, sub_tok.as_deref(), None).await;
                if channel != "news" {
                    ws_subscribe(&mut ws, 3, "news", None, None)
                        .await
                        .expect("news is public");
                }
                live_sse.push((who, exact, wild));
                live_ws.push((who, ws, sub));
            }

            // The round: an anchor on news, the marker on the channel through `face`, the end on news.
            let anchor = api(
                &s,
                "publish",
                json!({"channel": "news", "data": {"anchor": round}}),
            )
            .await;
            let anchor_seq = anchor["offset"].as_u64().expect("offset");
            let data = json!({ "m": marker }).to_string();
            match face {
                Face::Mercure => {
                    let mut fields = vec![("topic", channel), ("data", data.as_str())];
                    if kind == Kind::Private {
                        fields.push(("private", "on"));
                    }
                    s.publish(&fields).await;
                }
                Face::Api => {
                    api(
                        &s,
                        "publish",
                        json!({"channel": channel, "data": {"m": marker}}),
                    )
                    .await;
                }
                Face::Client => {
                    let r = call(
                        &mut alice,
                        10 + round,
                        json!({"publish": {"channel": channel, "data": {"m": marker}}}),
                    )
                    .await;
                    assert!(
                        r.get("error").is_none(),
                        "alice publishes into {channel}: {r}"
                    );
                }
            }
            api(
                &s,
                "publish",
                json!({"channel": "news", "data": {"end": end}}),
            )
            .await;
            let anchor_id = herald::log::generated_id(&epoch, anchor_seq);

            for (who, exact, wild) in live_sse {
                let cell = |reader, path| Cell {
                    face,
                    kind,
                    reader,
                    who,
                    path,
                };
                let got = match exact {
                    Err(403) => Outcome::Refused,
                    Err(status) => {
                        panic!("{}: status {status}", cell(Reader::SseExact, Path::Live))
                    }
                    Ok(mut sse) => outcome(&sse_until(&mut sse, &end).await, &marker),
                };
                m.check(cell(Reader::SseExact, Path::Live), got);
                let got = match wild {
                    Err(status) => {
                        panic!("{}: status {status}", cell(Reader::SseWildcard, Path::Live))
                    }
                    Ok(mut sse) => outcome(&sse_until(&mut sse, &end).await, &marker),
                };
                m.check(cell(Reader::SseWildcard, Path::Live), got);
            }
            for (who, mut ws, sub) in live_ws {
                let cell = |reader, path| Cell {
                    face,
                    kind,
                    reader,
                    who,
                    path,
                };
                let got = match sub {
                    Err(103) => Outcome::Refused,
                    Err(code) => panic!("{}: error {code}", cell(Reader::Ws, Path::Live)),
                    Ok(_) => outcome(&ws_until(&mut ws, &end).await, &marker),
                };
                m.check(cell(Reader::Ws, Path::Live), got);
                // History, on the same connection.
                let got = match sub {
                    Err(_) => Outcome::Refused,
                    Ok(_) => {
                        let r = call(
                            &mut ws,
                            50,
                            json!({"history": {"channel": channel, "limit": 1000}}),
                        )
                        .await;
                        assert!(
                            r.get("error").is_none(),
                            "{}: {r}",
                            cell(Reader::Ws, Path::History)
                        );
                        let seen: Vec<String> = r["history"]["publications"]
                            .as_array()
                            .expect("publications")
                            .iter()
                            .map(|p| p["data"].to_string())
                            .collect();
                        outcome(&seen, &marker)
                    }
                };
                m.check(cell(Reader::Ws, Path::History), got);
            }

            for who in WHO {
                let cell = |reader, path| Cell {
                    face,
                    kind,
                    reader,
                    who,
                    path,
                };
                let (sse_tok, ws_tok, sub_tok) = tokens(kind, who);
                // SSE history: the whole retained history, up to this round's end.
                for (reader, sel) in [
                    (Reader::SseExact, topics.clone()),
                    (Reader::SseWildcard, vec!["*"]),
                ] {
                    let got = match sse_open(
                        &s,
                        &sel,
                        sse_tok.as_deref(),
                        &[("lastEventID", "earliest")],
                        None,
                    )
                    .await
                    {
                        Err(403) => Outcome::Refused,
                        Err(status) => panic!("{}: status {status}", cell(reader, Path::History)),
                        Ok(mut sse) => outcome(&sse_until(&mut sse, &end).await, &marker),
                    };
                    m.check(cell(reader, Path::History), got);
                    // Resume after a drop: reconnect with the id of the anchor, published just before.
                    let got = match sse_open(&s, &sel, sse_tok.as_deref(), &[], Some(&anchor_id))
                        .await
                    {
                        Err(403) => Outcome::Refused,
                        Err(status) => panic!("{}: status {status}", cell(reader, Path::Resume)),
                        Ok(mut sse) => {
                            assert_eq!(
                                sse.header("last-event-id").as_deref(),
                                Some(anchor_id.as_str()),
                                "{}",
                                cell(reader, Path::Resume)
                            );
                            outcome(&sse_until(&mut sse, &end).await, &marker)
                        }
                    };
                    m.check(cell(reader, Path::Resume), got);
                }
                // WebSocket recovery from the anchor's position.
                let mut ws = ws_connect(&s, ws_tok.as_deref()).await;
                let got = match ws_subscribe(
                    &mut ws,
                    2,
                    channel,
                    sub_tok.as_deref(),
                    Some((anchor_seq, &epoch)),
                )
                .await
                {
                    Err(103) => Outcome::Refused,
                    Err(code) => panic!("{}: error {code}", cell(Reader::Ws, Path::Resume)),
                    Ok(r) => {
                        assert_eq!(
                            r["recovered"],
                            true,
                            "{}: {r}",
                            cell(Reader::Ws, Path::Resume)
                        );
                        let seen: Vec<String> = r["publications"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .iter()
                            .map(|p| p["data"].to_string())
                            .collect();
                        outcome(&seen, &marker)
                    }
                };
                m.check(cell(Reader::Ws, Path::Resume), got);
            }
        }
    }
    // 12 rounds (Mercure: 5 kinds, API: 4, client: 3) × 4 identities × (SSE exact and wildcard × 3 paths +
    // WebSocket × 3 paths): the matrix cannot shrink unnoticed.
    assert_eq!(m.cells, 12 * 4 * 9);
    assert!(
        m.failures.is_empty(),
        "{} of {} cells wrong:\n{}",
        m.failures.len(),
        m.cells,
        m.failures.join("\n")
    );
}
