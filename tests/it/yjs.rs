//! Yjs documents over y-websocket, with yrs as the client: sync, updates reaching others only once
//! stored, awareness, the docs claim, refusals with their close codes, restarts, compaction, the API,
//! document events, point-in-time snapshots and restore, and documents across nodes on Redis and NATS.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::auth::{Claims, DocsClaim};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::encoding::read::Cursor;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

use crate::common::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const API_KEY: &str = "yjs-api-key";

fn doc_token(read: &[&str], write: &[&str]) -> String {
    let claims = Claims {
        sub: Some("u".into()),
        docs: Some(DocsClaim {
            read: read.iter().map(|s| s.to_string()).collect(),
            write: write.iter().map(|s| s.to_string()).collect(),
        }),
        ..Default::default()
    };
    sign_with(&claims, KEY, Algorithm::HS256)
}

/// A y-websocket client on a yrs document, as the JS provider behaves: it answers the server's sync
/// step 1, sends its own, applies what arrives.
struct Client {
    ws: Socket,
    doc: Doc,
    /// Awareness states seen, by client id (`None`: removed).
    awareness: std::collections::HashMap<u64, Option<String>>,
    /// Every awareness entry received, in order: (client id, clock).
    awareness_log: Vec<(u64, u32)>,
    denied: Vec<String>,
    synced: bool,
    /// Update messages received (sync step 2 excluded).
    updates: usize,
}

#[derive(Debug)]
enum End {
    Closed(u16, String),
}

async fn open(s: &TestServer, doc: &str, token: Option<&str>) -> Socket {
    let mut url = format!("{}/yjs/{doc}", s.url.replace("http://", "ws://"));
    if let Some(t) = token {
        url.push_str(&format!("?authorization={t}"));
    }
    tokio_tungstenite::connect_async(url).await.expect("ws").0
}

impl Client {
    async fn connect(s: &TestServer, doc: &str, token: Option<&str>) -> Client {
        Client::connect_with(s, doc, token, Doc::new()).await
    }

    /// Connects with a document that already has content (a client coming back from offline).
    async fn connect_with(s: &TestServer, doc: &str, token: Option<&str>, state: Doc) -> Client {
        let mut c = Client {
            ws: open(s, doc, token).await,
            doc: state,
            awareness: Default::default(),
            awareness_log: Vec::new(),
            denied: Vec::new(),
            synced: false,
            updates: 0,
        };
        let sv = c.doc.transact().state_vector();
        c.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
        c
    }

    /// Connects and waits until the server answered its sync step 1.
    async fn synced(s: &TestServer, doc: &str, token: Option<&str>) -> Client {
        let mut c = Client::connect(s, doc, token).await;
        c.until(|c| c.synced).await.expect("synced");
        c
    }

    async fn send(&mut self, m: Message) {
        self.ws
            .send(Ws::Binary(m.encode_v1().into()))
            .await
            .expect("send");
    }

    fn text(&self) -> String {
        let t = self.doc.get_or_insert_text("t");
        t.get_string(&self.doc.transact())
    }

    /// Edits the text and sends the update, as the provider does on a local change.
    async fn insert(&mut self, at: u32, s: &str) {
        let before = self.doc.transact().state_vector();
        {
            let t = self.doc.get_or_insert_text("t");
            let mut txn = self.doc.transact_mut();
            t.insert(&mut txn, at, s);
        }
        let update = self.doc.transact().encode_state_as_update_v1(&before);
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    /// Appends `n` edits to the text (edit `i` is `"<i>,"`), each its own update message as a provider
    /// sends them, all written before one flush (a burst). Returns the text they add.
    async fn burst(&mut self, n: usize) -> String {
        let mut added = String::new();
        for i in 0..n {
            let piece = format!("{i},");
            let at = self.text().len() as u32;
            let before = self.doc.transact().state_vector();
            {
                let t = self.doc.get_or_insert_text("t");
                let mut txn = self.doc.transact_mut();
                t.insert(&mut txn, at, &piece);
            }
            let update = self.doc.transact().encode_state_as_update_v1(&before);
            let m = Message::Sync(SyncMessage::Update(update));
            self.ws
                .feed(Ws::Binary(m.encode_v1().into()))
                .await
                .expect("feed");
            added.push_str(&piece);
        }
        self.ws.flush().await.expect("flush");
        added
    }

    /// Reads messages until `pred` holds; `Err` when the server closed first.
    async fn until(&mut self, pred: impl Fn(&Client) -> bool) -> Result<(), End> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(self) {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for the server");
            match msg {
                Some(Ok(Ws::Binary(b))) => self.handle(&b).await,
                Some(Ok(Ws::Close(f))) => {
                    let f = f.expect("close frame");
                    return Err(End::Closed(f.code.into(), f.reason.to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("socket error: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
        Ok(())
    }

    /// Reads until the server closes; returns its close code and reason.
    async fn closed(&mut self) -> (u16, String) {
        match self.until(|_| false).await {
            Err(End::Closed(code, reason)) => (code, reason),
            Ok(()) => unreachable!(),
        }
    }

    async fn handle(&mut self, frame: &[u8]) {
        let mut dec = DecoderV1::new(Cursor::new(frame));
        let msgs: Vec<Message> = MessageReader::new(&mut dec)
            .map(|m| m.expect("server message"))
            .collect();
        for m in msgs {
            match m {
                Message::Sync(SyncMessage::SyncStep1(sv)) => {
                    let u = self.doc.transact().encode_state_as_update_v1(&sv);
                    self.send(Message::Sync(SyncMessage::SyncStep2(u))).await;
                }
                Message::Sync(SyncMessage::SyncStep2(u)) => {
                    self.apply(&u);
                    self.synced = true;
                }
                Message::Sync(SyncMessage::Update(u)) => {
                    self.updates += 1;
                    self.apply(&u);
                }
                Message::Awareness(u) => {
                    for (id, e) in u.clients {
                        let v = (&*e.json != "null").then(|| e.json.to_string());
                        self.awareness_log.push((id.get(), e.clock));
                        self.awareness.insert(id.get(), v);
                    }
                }
                Message::Auth(Some(reason)) => self.denied.push(reason),
                _ => {}
            }
        }
    }

    fn apply(&self, u: &[u8]) {
        self.doc
            .transact_mut()
            .apply_update(Update::decode_v1(u).expect("update"))
            .expect("apply");
    }
}

fn awareness(client: u64, clock: u32, json: &str) -> Message {
    let mut clients = std::collections::HashMap::new();
    clients.insert(
        yrs::block::ClientID::new(client),
        AwarenessUpdateEntry {
            clock,
            json: json.into(),
        },
    );
    Message::Awareness(AwarenessUpdate { clients })
}

/// The text of document `doc`'s type `t`, through the document API.
async fn api_text(s: &TestServer, doc: &str) -> (u16, Value) {
    get_json(
        reqwest::Client::new()
            .get(format!("{}/api/yjs/doc/json?name={doc}&type=t", s.url))
            .header("x-api-key", API_KEY),
    )
    .await
}

/// Waits until the server's document (read through the API) has text `want`: y-websocket has no
/// acknowledgement, so a test that needs an edit stored before its next step waits for it this way.
async fn stored(s: &TestServer, doc: &str, want: &str) {
    stored_within(s, doc, want, WAIT).await
}

/// Waits (up to `budget`) for the stored document to read `want`.
async fn stored_within(s: &TestServer, doc: &str, want: &str, budget: Duration) {
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let (_, v) = api_text(s, doc).await;
        if v["value"] == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{doc} is {v}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn with_api(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
    let mut v = vec![("centrifugo.api_key", format!("{API_KEY:?}"))];
    v.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    v
}

async fn start(extra: &[(&'static str, &'static str)]) -> TestServer {
    let o = with_api(extra);
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start(&o).await
}

#[tokio::test]
async fn clients_converge_and_a_late_joiner_gets_the_whole_document() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["notes/{id}"]);
    let mut a = Client::synced(&s, "notes/1", Some(&w)).await;
    let mut b = Client::synced(&s, "notes/1", Some(&w)).await;
    // Concurrent edits at the same place: each client sends before seeing the other's.
    a.insert(0, "alpha ").await;
    b.insert(0, "beta ").await;
    a.until(|c| c.text().len() == 11).await.unwrap();
    b.until(|c| c.text().len() == 11).await.unwrap();
    assert_eq!(a.text(), b.text(), "converged");
    assert!(a.text().contains("alpha ") && a.text().contains("beta "));

    let late = Client::synced(&s, "notes/1", Some(&w)).await;
    assert_eq!(
        late.text(),
        a.text(),
        "the late joiner's sync step 2 holds everything"
    );
    // Another document is another document.
    let other = Client::synced(&s, "notes/2", Some(&w)).await;
    assert_eq!(other.text(), "");
}

#[tokio::test]
async fn updates_are_stored_before_anyone_sees_them_and_survive_a_restart_and_compaction() {
    let s = start(&[("yjs.compact_after", "3")]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "plan", Some(&w)).await;
    let mut b = Client::synced(&s, "plan", Some(&w)).await;
    for (i, word) in ["one ", "two ", "three ", "four ", "five "]
        .iter()
        .enumerate()
    {
        a.insert(a.text().len() as u32, word).await;
        b.until(|c| c.text().split(' ').count() == i + 2)
            .await
            .unwrap();
        // Whatever b saw is in the store already.
        let stored = s
            .hub
            .engine()
            .read_channel("$yjs:plan".into(), 0, u64::MAX, 100)
            .await
            .unwrap();
        let replay = Doc::new();
        for r in &stored {
            replay
                .transact_mut()
                .apply_update(Update::decode_v1(&r.data).unwrap())
                .unwrap();
        }
        let t = replay.get_or_insert_text("t");
        assert_eq!(t.get_string(&replay.transact()), b.text());
    }
    // Compaction (after 3 updates) leaves a snapshot and fewer records; wait for it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored = s
            .hub
            .engine()
            .read_channel("$yjs:plan".into(), 0, u64::MAX, 100)
            .await
            .unwrap();
        if stored
            .first()
            .is_some_and(|r| r.event_type.as_deref() == Some("snapshot"))
            && stored.len() < 5
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no compaction: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = a.text();
    drop((a, b));
    let o = with_api(&[]);
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = s.restart(&o).await;
    let c = Client::synced(&s, "plan", Some(&w)).await;
    assert_eq!(c.text(), text);
    assert_eq!(text, "one two three four five ");
}

/// Documents are not held to `limits.max_message_size` (64 KiB by default) but to `yjs.max_update_size`, and
/// the default retention rule (`*`, 1000 records) never drops their updates.
#[tokio::test]
async fn large_updates_and_many_updates_are_kept() {
    let s = start(&[
        ("yjs.compact_after", "100000"),
        ("log.prune_interval", "\"20ms\""),
    ])
    .await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "big", Some(&w)).await;
    let big = "b".repeat(100_000);
    a.insert(0, &big).await;
    stored(&s, "big", &big).await;
    // 1100 updates as 1100 records, past the default retention of 1000 per channel: through the API,
    // since one client's updates sent back to back share commits (merged into fewer records).
    let local = Doc::new();
    let t = local.get_or_insert_text("t");
    let updates: Vec<Vec<u8>> = (0..1100)
        .map(|_| {
            let before = local.transact().state_vector();
            t.insert(&mut local.transact_mut(), 0, "m");
            local.transact().encode_state_as_update_v1(&before)
        })
        .collect();
    let http = reqwest::Client::new();
    let statuses: Vec<u16> = futures_util::stream::iter(updates)
        .map(|u| {
            let req = http
                .post(format!("{}/api/yjs/doc/update?name=many", s.url))
                .header("x-api-key", API_KEY)
                .body(u);
            async move { req.send().await.map_or(0, |r| r.status().as_u16()) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|&c| c == 200), "every update stored");
    // 1100 durable appends: seconds on a loaded machine, so a wider bound.
    stored_within(&s, "many", &"m".repeat(1100), Duration::from_secs(60)).await;
    let stored = s
        .hub
        .engine()
        .read_channel("$yjs:many".into(), 0, u64::MAX, 2000)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1100, "retention kept every update");
    let o = with_api(&[]);
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = s.restart(&o).await;
    let c = Client::synced(&s, "many", Some(&w)).await;
    assert_eq!(c.text().len(), 1100);
}

#[tokio::test]
async fn a_client_that_edited_offline_merges_on_reconnect() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "d", Some(&w)).await;
    a.insert(0, "online").await;
    stored(&s, "d", "online").await;
    let b = Client::synced(&s, "d", Some(&w)).await;
    assert_eq!(b.text(), "online");
    // b goes offline and edits; a edits meanwhile.
    let offline = b.doc.clone();
    drop(b);
    {
        let t = offline.get_or_insert_text("t");
        t.insert(&mut offline.transact_mut(), 0, "[b] ");
    }
    a.insert(6, " [a]").await;
    // b reconnects with its document: its answer to the server's sync step 1 carries its offline edit.
    let mut b = Client::connect(&s, "d", Some(&w)).await;
    b.doc = offline;
    b.synced = false;
    b.until(|c| c.synced && c.text().contains("[a]"))
        .await
        .unwrap();
    a.until(|c| c.text().contains("[b]")).await.unwrap();
    assert_eq!(a.text(), b.text());
    assert_eq!(a.text(), "[b] online [a]");
}

#[tokio::test]
async fn an_echoed_awareness_state_is_neither_relayed_nor_taken_over() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "echo", Some(&w)).await;
    let mut b = Client::synced(&s, "echo", Some(&w)).await;
    let mut c = Client::synced(&s, "echo", Some(&w)).await;
    a.send(awareness(77, 1, r#"{"user":"ada"}"#)).await;
    b.until(|c| c.awareness.contains_key(&77)).await.unwrap();
    c.until(|c| c.awareness.contains_key(&77)).await.unwrap();
    // b does what the y-websocket provider does with a state it receives: sends it back. Then its own,
    // which reaches the others after anything the echo would have caused.
    b.send(awareness(77, 1, r#"{"user":"ada"}"#)).await;
    b.send(awareness(88, 1, r#"{"user":"bob"}"#)).await;
    c.until(|c| c.awareness.contains_key(&88)).await.unwrap();
    a.until(|c| c.awareness.contains_key(&88)).await.unwrap();
    assert_eq!(c.awareness_log, [(77, 1), (88, 1)], "the echo was relayed");
    assert_eq!(a.awareness_log, [(88, 1)], "a got its own state back");
    // b leaves: its own state goes, not ada's that it had echoed.
    drop(b);
    c.until(|c| c.awareness.get(&88) == Some(&None))
        .await
        .unwrap();
    assert_eq!(
        c.awareness.get(&77),
        Some(&Some(r#"{"user":"ada"}"#.to_string())),
        "ada's state went with b"
    );
}

#[tokio::test]
async fn awareness_reaches_the_others_and_goes_when_its_client_leaves() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "room", Some(&w)).await;
    let mut b = Client::synced(&s, "room", Some(&w)).await;
    a.send(awareness(77, 1, r#"{"user":{"name":"ada"}}"#)).await;
    b.until(|c| c.awareness.get(&77).is_some_and(|v| v.is_some()))
        .await
        .unwrap();
    // A newcomer gets the states known with its first messages; query-awareness asks again.
    let mut c = Client::synced(&s, "room", Some(&w)).await;
    c.until(|c| c.awareness.contains_key(&77)).await.unwrap();
    c.awareness.clear();
    c.send(Message::AwarenessQuery).await;
    c.until(|c| c.awareness.contains_key(&77)).await.unwrap();
    drop(a);
    b.until(|c| c.awareness.get(&77).is_some_and(|v| v.is_none()))
        .await
        .unwrap();
}

/// Server messages longer than a WebSocket frame of Herald's (256 bytes) go out as fragmented messages
/// (so a connection keeps no buffer of their size): a joiner still gets every awareness state and the
/// whole document in its first messages, and again when it asks.
#[tokio::test]
async fn a_joiner_of_a_document_with_many_awareness_states_gets_them_all() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "crowd", Some(&w)).await;
    let big = "x".repeat(5_000);
    a.insert(0, &big).await;
    // 400 states, as 400 providers would have announced them (in 4 messages of 100 here).
    let n = 400u64;
    for batch in 0..4 {
        let mut clients = std::collections::HashMap::new();
        for i in 0..100 {
            let id = 1_000 + batch * 100 + i;
            let json = format!(r#"{{"user":{{"name":"user {id}","color":"blue"}}}}"#);
            clients.insert(
                yrs::block::ClientID::new(id),
                AwarenessUpdateEntry {
                    clock: 1,
                    json: json.into(),
                },
            );
        }
        a.send(Message::Awareness(AwarenessUpdate { clients }))
            .await;
    }
    let mut b = Client::synced(&s, "crowd", Some(&w)).await;
    b.until(|c| c.awareness.len() as u64 == n && c.text().len() == big.len())
        .await
        .unwrap();
    let mut c = Client::synced(&s, "crowd", Some(&w)).await;
    c.until(|c| c.awareness.len() as u64 == n).await.unwrap();
    assert_eq!(c.text(), big, "the whole document");
    for id in 1_000..1_000 + n {
        let want = format!(r#"{{"user":{{"name":"user {id}","color":"blue"}}}}"#);
        assert_eq!(c.awareness.get(&id), Some(&Some(want)), "state of {id}");
    }
    c.awareness.clear();
    c.send(Message::AwarenessQuery).await;
    c.until(|c| c.awareness.len() as u64 == n).await.unwrap();
    // They are a's, and go with it.
    drop(a);
    c.until(|c| c.awareness.values().filter(|v| v.is_none()).count() as u64 == n)
        .await
        .unwrap();
}

#[tokio::test]
async fn tokens_decide_who_reads_and_who_edits() {
    let s = start(&[]).await;
    // No token: refused with the auth message and 4401.
    let mut anon = Client::connect(&s, "secret", None).await;
    let (code, reason) = anon.closed().await;
    assert_eq!(code, herald::yjs::CLOSE_UNAUTHORIZED, "{reason}");
    assert!(
        anon.denied[0].contains("authorization"),
        "{:?}",
        anon.denied
    );
    let mut bad = Client::connect(&s, "secret", Some("not-a-jwt")).await;
    assert_eq!(bad.closed().await.0, herald::yjs::CLOSE_UNAUTHORIZED);
    // A token for other documents: 4403, with a reason that names the claim.
    let mut other = Client::connect(&s, "secret", Some(&doc_token(&["public/*"], &[]))).await;
    let (code, reason) = other.closed().await;
    assert_eq!(code, herald::yjs::CLOSE_FORBIDDEN);
    assert!(
        reason.contains("docs claim") && reason.len() <= 123,
        "{reason}"
    );

    let w = doc_token(&[], &["secret"]);
    let mut writer = Client::synced(&s, "secret", Some(&w)).await;
    writer.insert(0, "mine").await;
    stored(&s, "secret", "mine").await;
    let mut reader = Client::synced(&s, "secret", Some(&doc_token(&["secret"], &[]))).await;
    assert_eq!(reader.text(), "mine", "read-only clients read");
    // A read-only client's edit is refused (auth message), applied nowhere, and stored nowhere.
    reader.insert(0, "theirs ").await;
    reader.until(|c| !c.denied.is_empty()).await.unwrap();
    assert!(
        reader.denied[0].contains("read-only"),
        "{:?}",
        reader.denied
    );
    writer.insert(4, "!").await;
    reader.until(|c| c.text().contains('!')).await.unwrap();
    assert_eq!(api_text(&s, "secret").await.1["value"], "mine!");
    let fresh = Client::synced(&s, "secret", Some(&w)).await;
    assert_eq!(fresh.text(), "mine!");
}

#[tokio::test]
async fn a_connection_ends_when_its_token_expires() {
    let s = start(&[]).await;
    let claims = Claims {
        exp: Some(herald::auth::unix_now() + 2),
        docs: Some(DocsClaim {
            read: vec![],
            write: vec!["*".into()],
        }),
        ..Default::default()
    };
    let t = sign_with(&claims, KEY, Algorithm::HS256);
    let mut c = Client::synced(&s, "short", Some(&t)).await;
    let (code, reason) = c.closed().await;
    assert_eq!(code, herald::yjs::CLOSE_UNAUTHORIZED);
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test]
async fn anonymous_access_only_where_configured() {
    let s = start(&[("yjs.anonymous", "\"read\"")]).await;
    let mut w = Client::synced(&s, "pub", Some(&doc_token(&[], &["pub"]))).await;
    w.insert(0, "hello").await;
    stored(&s, "pub", "hello").await;
    let mut anon = Client::synced(&s, "pub", None).await;
    assert_eq!(anon.text(), "hello");
    anon.insert(0, "x").await;
    anon.until(|c| !c.denied.is_empty()).await.unwrap();
    assert_eq!(api_text(&s, "pub").await.1["value"], "hello");
}

#[tokio::test]
async fn corrupt_and_oversized_updates_close_the_connection_and_leave_the_document_intact() {
    let s = start(&[("yjs.max_update_size", "1000")]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "doc", Some(&w)).await;
    a.insert(0, "intact").await;
    stored(&s, "doc", "intact").await;
    let mut watcher = Client::synced(&s, "doc", Some(&w)).await;
    assert_eq!(watcher.text(), "intact");

    let mut bad = Client::synced(&s, "doc", Some(&w)).await;
    bad.send(Message::Sync(SyncMessage::Update(vec![
        0xff, 0xff, 0xff, 0x7f, 1, 2, 3,
    ])))
    .await;
    let (code, reason) = bad.closed().await;
    assert_eq!(code, herald::yjs::CLOSE_INVALID, "{reason}");
    assert!(reason.contains("corrupt"), "{reason}");

    let mut big = Client::synced(&s, "doc", Some(&w)).await;
    big.insert(0, &"x".repeat(1500)).await;
    let (code, reason) = big.closed().await;
    assert_eq!(code, herald::yjs::CLOSE_TOO_BIG, "{reason}");
    assert!(reason.contains("max_update_size"), "{reason}");

    // Not a y-websocket message at all.
    let mut junk = open(&s, "doc", Some(&w)).await;
    junk.send(Ws::Binary(vec![9, 200].into())).await.unwrap();
    let code = loop {
        match tokio::time::timeout(WAIT, junk.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Ws::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, herald::yjs::CLOSE_INVALID);

    // The watcher got nothing of them, and the document is what it was.
    a.insert(6, ".").await;
    watcher.until(|c| c.text() == "intact.").await.unwrap();
    assert_eq!(api_text(&s, "doc").await.1["value"], "intact.");
}

#[tokio::test]
async fn the_document_api_reads_lists_and_applies_updates() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "api/one", Some(&w)).await;
    a.insert(0, "from a client").await;
    stored(&s, "api/one", "from a client").await;
    let http = reqwest::Client::new();

    // Without the key: refused.
    let resp = http
        .get(format!("{}/api/yjs/docs", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let (status, body) = get_json(
        http.get(format!("{}/api/yjs/docs?prefix=api/", s.url))
            .header("x-api-key", API_KEY),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["docs"], json!(["api/one"]));

    // As a Yjs update: a client applies it.
    let bytes = http
        .get(format!("{}/api/yjs/doc?name=api/one", s.url))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let copy = Doc::new();
    copy.transact_mut()
        .apply_update(Update::decode_v1(&bytes).unwrap())
        .unwrap();
    assert_eq!(
        copy.get_or_insert_text("t").get_string(&copy.transact()),
        "from a client"
    );
    assert_eq!(api_text(&s, "api/one").await.1["value"], "from a client");
    let (status, _) = get_json(
        http.get(format!("{}/api/yjs/doc/json?name=api/one&type=nope", s.url))
            .header("x-api-key", API_KEY),
    )
    .await;
    assert_eq!(status, 404);

    // A backend's update reaches the connected client.
    let before = copy.transact().state_vector();
    copy.get_or_insert_text("t")
        .push(&mut copy.transact_mut(), " and the backend");
    let update = copy.transact().encode_state_as_update_v1(&before);
    let resp = http
        .post(format!("{}/api/yjs/doc/update?name=api/one", s.url))
        .header("x-api-key", API_KEY)
        .body(update)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    a.until(|c| c.text() == "from a client and the backend")
        .await
        .unwrap();
    let resp = http
        .post(format!("{}/api/yjs/doc/update?name=api/one", s.url))
        .header("x-api-key", API_KEY)
        .body(vec![0xff, 0xff, 0xff, 0x7f, 1])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn document_events_are_published_for_backends() {
    let s = start(&[("yjs.idle_unload", "\"1s\"")]).await;
    let grant = token(&[], &["yjs-events"], None);
    let mut sse = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &["yjs-events"], &[]))
            .bearer_auth(&grant),
    )
    .await;
    // Events are private: a reader without a grant of the channel sees none of them.
    let mut outsider = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &["yjs-events"], &[]))
            .bearer_auth(token(&[], &["other"], None)),
    )
    .await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "evt", Some(&w)).await;
    a.insert(0, "x").await;
    let ev = sse.next_event().await.unwrap();
    let v: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(v, json!({"type": "changed", "doc": "evt"}));
    drop(a);
    let ev = sse.next_event().await.unwrap();
    let v: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(v, json!({"type": "idle", "doc": "evt"}));
    outsider.assert_quiet(Duration::from_millis(300)).await;
    // Unloaded, then loaded again from the store.
    let b = Client::synced(&s, "evt", Some(&w)).await;
    assert_eq!(b.text(), "x");
}

/// Two nodes on one Redis: a document's updates and awareness reach the clients of the other node through
/// the engine, and a client joining on either node gets everything; compaction trims there too.
#[tokio::test]
async fn documents_are_shared_by_the_nodes_of_a_cluster() {
    let redis = crate::cluster_redis::Redis::start().await;
    let url = format!("{:?}", redis.url());
    let mut o = with_api(&[
        ("engine.kind", "\"redis\""),
        ("engine.prefix", "\"yjs\""),
        ("yjs.compact_after", "3"),
    ]);
    o.push(("engine.url", url));
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let n1 = TestServer::start(&o).await;
    let n2 = TestServer::start(&o).await;
    two_nodes_share_a_document(&n1, &n2).await;
    compaction_trims_the_updates(&n2).await;
}

/// A document API call that answers JSON: (status, body).
async fn doc_api(s: &TestServer, method: &str, path_query: &str) -> (u16, Value) {
    let http = reqwest::Client::new();
    let url = format!("{}/api/yjs/{path_query}", s.url);
    let req = if method == "POST" {
        http.post(url)
    } else {
        http.get(url)
    };
    get_json(req.header("x-api-key", API_KEY)).await
}

/// The snapshots listed for `doc`: (id, reason), newest first.
async fn snapshots(s: &TestServer, doc: &str) -> Vec<(u64, String)> {
    let (status, v) = doc_api(s, "GET", &format!("doc/snapshots?name={doc}")).await;
    assert_eq!(status, 200, "{v}");
    v["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|e| {
            assert!(e["size"].as_u64().unwrap_or(0) > 0, "{e}");
            assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
            (
                e["id"].as_u64().expect("id"),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Snapshots are taken, listed, read (as an update and as JSON) and restored; the restore is an edit
/// that connected clients receive, that a client coming back with the reverted content in its own state
/// cannot undo by merging, that survives a restart, and that can itself be undone (the content before
/// the restore was snapshotted).
#[tokio::test]
async fn a_snapshot_is_restored_for_everyone_and_a_stale_client_cannot_resurrect_what_it_reverted()
{
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "hist", Some(&w)).await;
    let mut b = Client::synced(&s, "hist", Some(&w)).await;
    a.insert(0, "version one").await;
    stored(&s, "hist", "version one").await;
    let (status, v) = doc_api(&s, "POST", "doc/snapshot?name=hist").await;
    assert_eq!(status, 200, "{v}");
    let first = v["snapshot"]["id"].as_u64().expect("id");
    assert_eq!(v["snapshot"]["reason"], "api");

    a.insert(11, " plus more").await;
    b.until(|c| c.text() == "version one plus more")
        .await
        .unwrap();
    // A client that has everything goes offline, keeping its state.
    let mut stale = Client::synced(&s, "hist", Some(&w)).await;
    assert_eq!(stale.text(), "version one plus more");
    let _ = stale.ws.close(None).await;
    let stale_doc = stale.doc;

    assert_eq!(snapshots(&s, "hist").await, vec![(first, "api".into())]);
    let (status, v) = doc_api(
        &s,
        "GET",
        &format!("doc/snapshot/json?name=hist&id={first}&type=t"),
    )
    .await;
    assert_eq!((status, &v["value"]), (200, &json!("version one")), "{v}");
    let bytes = reqwest::Client::new()
        .get(format!(
            "{}/api/yjs/doc/snapshot?name=hist&id={first}",
            s.url
        ))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let copy = Doc::new();
    copy.transact_mut()
        .apply_update(Update::decode_v1(&bytes).unwrap())
        .unwrap();
    assert_eq!(
        copy.get_or_insert_text("t").get_string(&copy.transact()),
        "version one"
    );

    let (status, v) = doc_api(&s, "POST", &format!("doc/restore?name=hist&id={first}")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["restored"], first);
    let before = v["before"]
        .as_u64()
        .expect("the content before the restore");
    assert!(before > first);
    a.until(|c| c.text() == "version one").await.unwrap();
    b.until(|c| c.text() == "version one").await.unwrap();
    stored(&s, "hist", "version one").await;

    // The stale client comes back with " plus more" in its state: merging brings nothing back, for it
    // or for anyone. (Its edit after the sync is processed after its sync step 2, so once the edit is
    // stored, what the sync carried was applied too.)
    let mut stale = Client::connect_with(&s, "hist", Some(&w), stale_doc).await;
    stale.until(|c| c.synced).await.unwrap();
    assert_eq!(stale.text(), "version one");
    stale.insert(11, "!").await;
    stored(&s, "hist", "version one!").await;
    a.until(|c| c.text() == "version one!").await.unwrap();

    // Listed newest first: the snapshot taken before the restore, then the first.
    assert_eq!(
        snapshots(&s, "hist").await,
        vec![(before, "before-restore".into()), (first, "api".into())]
    );
    // Snapshots and the restore survive a restart; restoring the content from before the restore
    // undoes it.
    drop((a, b, stale));
    let o = with_api(&[]);
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = s.restart(&o).await;
    stored(&s, "hist", "version one!").await;
    assert_eq!(snapshots(&s, "hist").await.len(), 2);
    let mut c = Client::synced(&s, "hist", Some(&w)).await;
    let (status, v) = doc_api(&s, "POST", &format!("doc/restore?name=hist&id={before}")).await;
    assert_eq!(status, 200, "{v}");
    c.until(|c| c.text() == "version one plus more")
        .await
        .unwrap();
}

/// The snapshot API's refusals: JSON `{code, message}` with stable codes.
#[tokio::test]
async fn snapshot_api_errors_have_stable_codes() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "errs", Some(&w)).await;
    a.insert(0, "x").await;
    stored(&s, "errs", "x").await;
    let cases = [
        (
            "GET",
            "doc/snapshots?name=never-stored",
            404,
            "document_not_found",
        ),
        (
            "POST",
            "doc/snapshot?name=never-stored",
            404,
            "document_not_found",
        ),
        (
            "POST",
            "doc/restore?name=errs&id=999999",
            404,
            "snapshot_not_found",
        ),
        (
            "GET",
            "doc/snapshot?name=errs&id=999999",
            404,
            "snapshot_not_found",
        ),
        (
            "GET",
            "doc/snapshot?name=errs&id=abc",
            400,
            "invalid_snapshot",
        ),
        ("POST", "doc/restore?name=errs", 400, "invalid_snapshot"),
        (
            "GET",
            "doc/snapshot/json?name=errs&id=1",
            400,
            "missing_type",
        ),
    ];
    for (method, path, status, code) in cases {
        let (got, v) = doc_api(&s, method, path).await;
        assert_eq!(
            (got, v["code"].as_str()),
            (status, Some(code)),
            "{path}: {v}"
        );
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // A stored document without snapshots lists none; a snapshot id of another document is unknown.
    assert!(snapshots(&s, "errs").await.is_empty());
    let mut b = Client::synced(&s, "other", Some(&w)).await;
    b.insert(0, "y").await;
    stored(&s, "other", "y").await;
    let (_, v) = doc_api(&s, "POST", "doc/snapshot?name=other").await;
    let id = v["snapshot"]["id"].as_u64().expect("id");
    let (got, v) = doc_api(&s, "POST", &format!("doc/restore?name=errs&id={id}")).await;
    assert_eq!((got, v["code"].as_str()), (404, Some("snapshot_not_found")));
    let resp = reqwest::Client::new()
        .get(format!("{}/api/yjs/doc/snapshots?name=errs", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

/// While a document changes, a snapshot is taken at most once per `snapshot_interval`; only
/// `snapshot_keep` are kept, the older ones removed from the store, not just from the list.
#[tokio::test]
async fn snapshots_are_taken_by_time_and_trimmed_by_count() {
    let s = start(&[
        ("yjs.snapshot_interval", "\"1s\""),
        ("yjs.snapshot_keep", "2"),
    ])
    .await;
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(&s, "timed", Some(&w)).await;
    let mut seen: Vec<u64> = Vec::new();
    for round in 0..3u32 {
        a.insert(round, "z").await;
        let want = "z".repeat(round as usize + 1);
        stored(&s, "timed", &want).await;
        // The next snapshot, taken after this edit, holds it.
        let deadline = tokio::time::Instant::now() + WAIT;
        let newest = loop {
            let list = snapshots(&s, "timed").await;
            if let Some((id, reason)) = list.first() {
                if !seen.contains(id) {
                    assert_eq!(reason, "interval");
                    break *id;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no new snapshot");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (_, v) = doc_api(
            &s,
            "GET",
            &format!("doc/snapshot/json?name=timed&id={newest}&type=t"),
        )
        .await;
        assert_eq!(v["value"], json!(want));
        seen.push(newest);
    }
    let listed: Vec<u64> = snapshots(&s, "timed").await.iter().map(|e| e.0).collect();
    assert_eq!(listed, vec![seen[2], seen[1]]);
    let stored_snapshots: Vec<u64> = s
        .hub
        .engine()
        .read_channel("$yjs-snapshots:timed".into(), 0, u64::MAX, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        stored_snapshots,
        vec![seen[1], seen[2]],
        "the oldest was trimmed"
    );
    let (status, _) = doc_api(
        &s,
        "GET",
        &format!("doc/snapshot?name=timed&id={}", seen[0]),
    )
    .await;
    assert_eq!(status, 404);
}

/// Two nodes, a client on each, edits and awareness both ways, over `engine`.
async fn two_nodes_share_a_document(n1: &TestServer, n2: &TestServer) {
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(n1, "shared", Some(&w)).await;
    let mut b = Client::synced(n2, "shared", Some(&w)).await;
    a.insert(0, "from node 1").await;
    b.until(|c| c.text() == "from node 1").await.unwrap();
    b.insert(0, "node 2 + ").await;
    a.until(|c| c.text() == "node 2 + from node 1")
        .await
        .unwrap();
    a.send(awareness(5, 1, r#"{"user":"a"}"#)).await;
    b.until(|c| c.awareness.get(&5).is_some_and(|v| v.is_some()))
        .await
        .unwrap();
    b.send(awareness(6, 1, r#"{"user":"b"}"#)).await;
    a.until(|c| c.awareness.get(&6).is_some_and(|v| v.is_some()))
        .await
        .unwrap();
    drop(a);
    b.until(|c| c.awareness.get(&5).is_some_and(|v| v.is_none()))
        .await
        .unwrap();
    let late = Client::synced(n1, "shared", Some(&w)).await;
    assert_eq!(late.text(), "node 2 + from node 1");
}

/// Compaction on a cluster engine leaves a snapshot and drops the updates it merged (the engine's
/// `trim_channel`), and the document still loads whole.
async fn compaction_trims_the_updates(s: &TestServer) {
    let w = doc_token(&[], &["*"]);
    let mut a = Client::synced(s, "compact", Some(&w)).await;
    let mut so_far = String::new();
    for word in ["one ", "two ", "three ", "four ", "five "] {
        a.insert(a.text().len() as u32, word).await;
        // Stored before the next is sent: five records (updates sent back to back may share one).
        so_far.push_str(word);
        stored(s, "compact", &so_far).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored = s
            .hub
            .engine()
            .read_channel("$yjs:compact".into(), 0, u64::MAX, 100)
            .await
            .unwrap();
        if stored
            .first()
            .is_some_and(|r| r.event_type.as_deref() == Some("snapshot"))
            && stored.len() < 5
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the merged updates were not trimmed: {:?}",
            stored
                .iter()
                .map(|r| (r.seq, r.event_type.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = Client::synced(s, "compact", Some(&w)).await;
    assert_eq!(late.text(), "one two three four five ");
}

/// Two nodes on one NATS JetStream: updates and awareness cross nodes; compaction trims there too.
#[tokio::test]
async fn documents_are_shared_by_the_nodes_of_a_nats_cluster() {
    let nats = crate::cluster_nats::Nats::start();
    let url = format!("{:?}", nats.url());
    let prefix = format!("\"yjs{}\"", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut o = with_api(&[("engine.kind", "\"nats\""), ("yjs.compact_after", "3")]);
    o.push(("engine.url", url));
    o.push(("engine.prefix", prefix));
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let n1 = TestServer::start(&o).await;
    let n2 = TestServer::start(&o).await;
    two_nodes_share_a_document(&n1, &n2).await;
    compaction_trims_the_updates(&n1).await;
}

/// On NATS nothing larger than the server's `max_payload` can be stored, and Herald says so by the size
/// limits, not as an engine failure: an update over it closes its connection with 1009 (the document and
/// the other clients untouched), a publish over it is refused with 413 even where
/// `limits.max_message_size` allows more, and a document whose merged state is over it is not compacted
/// (its updates are kept, tried again only `compact_after` updates later) and still loads whole.
#[tokio::test]
async fn a_nats_max_payload_bounds_updates_publishes_and_compaction() {
    // 64 KiB: what Herald leaves for data is 56 KiB (8 KiB for a record's envelope).
    let nats = crate::cluster_nats::Nats::start_with_max_payload(64 * 1024);
    let url = format!("{:?}", nats.url());
    let prefix = format!("\"yjs{}\"", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut o = with_api(&[
        ("engine.kind", "\"nats\""),
        ("yjs.compact_after", "3"),
        ("limits.max_message_size", "1048576"),
        ("auth.allow_anonymous", "true"),
    ]);
    o.push(("engine.url", url));
    o.push(("engine.prefix", prefix));
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = TestServer::start(&o).await;
    let w = doc_token(&[], &["*"]);

    // Four 20 KiB updates: each fits, their merged state (80 KiB) does not.
    let mut a = Client::synced(&s, "big", Some(&w)).await;
    let mut want = String::new();
    for c in ["a", "b", "c", "d"] {
        a.insert(want.len() as u32, &c.repeat(20 * 1024)).await;
        want.push_str(&c.repeat(20 * 1024));
        stored(&s, "big", &want).await;
    }
    let mut watcher = Client::synced(&s, "big", Some(&w)).await;
    assert_eq!(watcher.text(), want);

    // One update over the limit: refused by size, stored nowhere, the others unaffected.
    let mut big = Client::synced(&s, "big", Some(&w)).await;
    big.insert(0, &"x".repeat(60 * 1024)).await;
    let (code, reason) = big.closed().await;
    assert_eq!(code, herald::yjs::CLOSE_TOO_BIG, "{reason}");
    assert!(reason.contains("max_update_size"), "{reason}");
    a.insert(want.len() as u32, "!").await;
    want.push('!');
    stored(&s, "big", &want).await;
    watcher.until(|c| c.text() == want).await.unwrap();

    // Compaction was due (5 updates >= 3) and could not store the merged state: every update is kept,
    // no snapshot. (The failure counter is global to this test process; only this test fails one.)
    let failed = "herald_yjs_compactions_total{result=\"failed\"}";
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&s, failed).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no compaction was tried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not tried again before `compact_after` more updates: a bounded window of three of the document
    // loop's one-second ticks, in which an unchecked retry would fail three more times.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(metric(&s, failed).await, 1.0);
    let records = s
        .hub
        .engine()
        .read_channel("$yjs:big".into(), 0, u64::MAX, 100)
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        5,
        "{:?}",
        records
            .iter()
            .map(|r| r.event_type.clone())
            .collect::<Vec<_>>()
    );
    assert!(records
        .iter()
        .all(|r| r.event_type.as_deref() != Some("snapshot")));

    // A publish over the engine's limit, under limits.max_message_size: 413, not a storage failure.
    let resp = s
        .publish_raw(
            &[("topic", "news"), ("data", &"y".repeat(60 * 1024))],
            &publisher_token(),
        )
        .await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "message_too_large", "{body}");
    s.publish(&[("topic", "news"), ("data", "small")]).await;

    // Unloaded and loaded again: the document is whole.
    drop((a, watcher, big));
    let s = s.restart(&o).await;
    let fresh = Client::synced(&s, "big", Some(&w)).await;
    assert_eq!(fresh.text(), want);
}

/// The sum of a metric's series whose name and labels start with `prefix` (the recorder is global to
/// this process, so tests compare before and after).
async fn metric(s: &TestServer, prefix: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Loaded documents, connections, applied updates and their bytes, refusals by reason and restores are
/// counted.
#[tokio::test]
async fn yjs_work_is_counted_in_the_metrics() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let applied = metric(&s, "herald_yjs_updates_applied_total").await;
    let bytes = metric(&s, "herald_yjs_update_bytes_total").await;
    let corrupt = metric(&s, "herald_yjs_updates_refused_total{reason=\"corrupt\"}").await;
    let restores = metric(&s, "herald_yjs_restores_total").await;
    let mut a = Client::synced(&s, "counted", Some(&w)).await;
    a.insert(0, "abc").await;
    stored(&s, "counted", "abc").await;
    assert!(metric(&s, "herald_yjs_updates_applied_total").await > applied);
    assert!(metric(&s, "herald_yjs_update_bytes_total").await > bytes);
    assert!(metric(&s, "herald_yjs_connections").await >= 1.0);
    assert!(metric(&s, "herald_yjs_documents_loaded").await >= 1.0);
    let (_, v) = doc_api(&s, "POST", "doc/snapshot?name=counted").await;
    let id = v["snapshot"]["id"].as_u64().expect("id");
    let (status, _) = doc_api(&s, "POST", &format!("doc/restore?name=counted&id={id}")).await;
    assert_eq!(status, 200);
    assert!(metric(&s, "herald_yjs_restores_total").await > restores);
    let mut bad = Client::synced(&s, "counted", Some(&w)).await;
    bad.ws
        .send(Ws::Binary(
            vec![0, 2, 7, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3].into(),
        ))
        .await
        .unwrap();
    assert_eq!(bad.closed().await.0, herald::yjs::CLOSE_INVALID);
    assert!(metric(&s, "herald_yjs_updates_refused_total{reason=\"corrupt\"}").await > corrupt);
}

/// One writer's burst: the connection reads on while its first update is being committed, so the rest
/// share the next commits (stored merged, in order), and the other client gets them as a few merged
/// updates, not one message each, and ends with every edit in the writer's order.
#[tokio::test]
async fn one_writers_burst_shares_commits_and_is_relayed_merged_and_in_order() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    let mut writer = Client::synced(&s, "burst", Some(&w)).await;
    let mut reader = Client::synced(&s, "burst", Some(&w)).await;
    const N: usize = 300;
    let want = writer.burst(N).await;
    reader.until(|c| c.text() == want).await.unwrap();
    assert!(
        reader.updates < N / 2,
        "{} update messages for {N} updates: not merged",
        reader.updates
    );
    let records = s
        .hub
        .engine()
        .read_channel("$yjs:burst".into(), 0, u64::MAX, 2 * N)
        .await
        .unwrap();
    assert!(
        records.len() < N / 2,
        "{} records for {N} updates: each had a commit of its own",
        records.len()
    );
    stored(&s, "burst", &want).await;
    // The writer got none of its own updates back.
    assert_eq!(writer.updates, 0);
    // A late joiner, and the writer itself, agree.
    let late = Client::synced(&s, "burst", Some(&w)).await;
    assert_eq!(late.text(), want);
}

/// A client that stops reading while a writer sends far more than its queue holds is caught up (its
/// backlog replaced by one merged update), not closed: once it reads again it converges, on the same
/// connection, and the server counted the catch-up.
#[tokio::test]
async fn a_reader_that_falls_behind_is_caught_up_and_converges() {
    let s = start(&[]).await;
    let w = doc_token(&[], &["*"]);
    // A small receive buffer, so the backlog stays in Herald's queue rather than in the kernel's.
    let url = format!(
        "{}/yjs/slow?authorization={w}",
        s.url.replace("http://", "ws://")
    );
    let addr = s.url.trim_start_matches("http://").to_string();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(addr.parse().unwrap()).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .expect("ws");
    let mut slow = Client {
        ws,
        doc: Doc::new(),
        awareness: Default::default(),
        awareness_log: Vec::new(),
        denied: Vec::new(),
        synced: false,
        updates: 0,
    };
    let sv = slow.doc.transact().state_vector();
    slow.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
    slow.until(|c| c.synced).await.unwrap();
    let before = metric(&s, "herald_yjs_catch_ups_total").await;

    let mut writer = Client::synced(&s, "slow", Some(&w)).await;
    let chunk = "z".repeat(8 * 1024);
    let mut want = String::new();
    // 6 MiB in 768 updates: several times the 1 MiB a connection's queue holds.
    for _ in 0..768 {
        let at = want.len() as u32;
        writer.insert(at, &chunk).await;
        want.push_str(&chunk);
    }
    stored_within(&s, "slow", &want, Duration::from_secs(60)).await;
    let caught_up = metric(&s, "herald_yjs_catch_ups_total").await;
    assert!(
        caught_up > before,
        "no catch-up counted ({before} -> {caught_up})"
    );
    // Reading again: the same connection converges (a close would be an Err here).
    slow.until(|c| c.text().len() == want.len())
        .await
        .expect("caught up, not closed");
    assert_eq!(slow.text(), want);
    assert!(
        slow.updates < 768,
        "{} update messages: the backlog was not merged",
        slow.updates
    );
}

/// Under sustained edits a document relays at most once per `yjs.relay_interval`: updates committed one
/// after the other (each a publication of its own) reach a reader as one merged update, not one each,
/// while the first edit after a quiet interval is relayed on its own.
#[tokio::test]
async fn sustained_edits_are_relayed_once_per_interval() {
    let s = start(&[("yjs.relay_interval", "1s")]).await;
    let w = doc_token(&[], &["*"]);
    let mut writer = Client::synced(&s, "paced", Some(&w)).await;
    let mut reader = Client::synced(&s, "paced", Some(&w)).await;
    let records = |n: usize| {
        let hub = s.hub.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let got = hub
                    .engine()
                    .read_channel("$yjs:paced".into(), 0, u64::MAX, 100)
                    .await
                    .unwrap()
                    .len();
                if got >= n {
                    return got;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{got} of {n} stored"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    writer.insert(0, "a").await;
    reader.until(|c| c.text() == "a").await.unwrap();
    assert_eq!(reader.updates, 1);
    // Five more, each committed before the next is sent: five publications within the interval.
    let mut want = String::from("a");
    for (i, piece) in ["b", "c", "d", "e", "f"].iter().enumerate() {
        writer.insert(want.len() as u32, piece).await;
        want.push_str(piece);
        assert_eq!(records(i + 2).await, i + 2, "one record per update");
    }
    reader.until(|c| c.text() == want).await.unwrap();
    assert!(
        reader.updates <= 3,
        "{} update messages for 6 separately committed updates within one interval",
        reader.updates
    );
}
