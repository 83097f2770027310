//! Several `herald` processes on one Redis (`engine.kind = "redis"`) behave as one server: one position per
//! publication on every node, resume on any node, shared history and presence, server API control across
//! nodes, and what happens when a node or Redis itself goes away.
//!
//! Each test runs its own `redis-server` (AOF on, in a temporary directory, on a free port), so it can stop
//! and restart it and never touches a shared Redis; `scripts/install-test-deps.sh` installs the binary.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use herald::engine::redis::{RedisEngine, RedisOptions};
use herald::engine::{Engine, Feed, FeedEvent};
use herald::log::Record;

use crate::common::*;
use crate::process;
use crate::wsclient::{self, Ws, API_KEY};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Waits (bounded by `wait`) until `check` is true; panics with `what` otherwise.
async fn until<F, Fut>(wait: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `redis-server` of the test's own.
pub(crate) struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub(crate) async fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.spawn().await;
        r
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH (scripts/install-test-deps.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        until(WAIT, "redis-server answers PING", || ping(port)).await;
    }

    /// A clean stop (SHUTDOWN: the AOF is flushed), waiting for the process to exit.
    async fn stop(&mut self) {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
            let _ = s.write_all(b"SHUTDOWN\r\n").await;
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
        }
        if let Some(mut c) = self.child.take() {
            tokio::time::timeout(WAIT, c.wait())
                .await
                .expect("redis-server stopped in time")
                .expect("wait");
        }
    }

    /// Runs a command with redis-cli-like simplicity: one inline command, the first reply line.
    async fn command(&self, cmd: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis");
        s.write_all(format!("{cmd}\r\n").as_bytes()).await.unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await.unwrap();
        line.trim().to_string()
    }
}

async fn ping(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

/// One `herald serve` process on the Redis engine.
struct Node {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(redis: &Redis, prefix: &str, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = process::command(dir.path());
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        cmd.stderr(Stdio::from(stderr));
        cmd.args(["--listen", "127.0.0.1:0", "--memory", "--allow-anonymous"])
            .args(["--jwt-key", KEY])
            .args(["--set", "engine.kind=redis"])
            .args(["--set", &format!("engine.url={}", redis.url())])
            .args(["--set", &format!("engine.prefix={prefix}")])
            .args(["--set", &format!("centrifugo.api_key={API_KEY:?}")])
            .args(["--set", "shutdown_timeout=\"2s\""])
            .args(extra);
        let mut child = cmd.spawn().expect("spawn herald");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(WAIT * 3, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Some(url.trim().to_string());
                }
            }
            None
        })
        .await
        .expect("herald printed its address in time");
        let Some(url) = url else {
            let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
            panic!("herald exited before listening: {log}");
        };
        let node = Node {
            child,
            url,
            _dir: dir,
        };
        until(WAIT, "the node is ready", || async {
            node.readyz().await == 200
        })
        .await;
        node
    }

    /// A counter or gauge from `/metrics` (the sum of its series).
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn readyz(&self) -> u16 {
        match reqwest::get(format!("{}/readyz", self.url)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// kill -9.
    async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }

    /// Mercure publish; the response.
    async fn post(&self, fields: &[(&str, &str)]) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/.well-known/mercure", self.url))
            .bearer_auth(publisher_token())
            .form(fields)
            .send()
            .await
            .expect("publish request")
    }

    /// Mercure publish that must be acknowledged; the id.
    async fn publish(&self, fields: &[(&str, &str)]) -> String {
        let resp = self.post(fields).await;
        assert_eq!(
            resp.status(),
            200,
            "publish refused: {:?}",
            resp.text().await
        );
        resp.text().await.expect("body")
    }

    async fn api(&self, method: &str, body: Value) -> Value {
        let (status, v) = get_json(
            reqwest::Client::new()
                .post(format!("{}/api/{method}", self.url))
                .header("x-api-key", API_KEY)
                .json(&body),
        )
        .await;
        assert_eq!(status, 200, "{method}: {v}");
        assert!(v.get("error").is_none(), "{method}: {v}");
        v["result"].clone()
    }

    async fn sse(&self, topics: &[&str], last_event_id: Option<&str>) -> Sse {
        let mut req = reqwest::Client::new().get(subscribe_url(&self.url, topics, &[]));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let sse = Sse::open(req).await;
        assert_eq!(sse.status, 200);
        sse
    }

    async fn ws(&self, user: &str) -> Ws {
        let url = format!(
            "{}/connection/websocket",
            self.url.replace("http://", "ws://")
        );
        let (inner, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        let mut ws = Ws {
            inner,
            pending: Default::default(),
        };
        let reply = wsclient::call(
            &mut ws,
            1,
            json!({"connect": {"token": wsclient::conn_token(user, 600)}}),
        )
        .await;
        assert!(reply["connect"]["client"].is_string(), "{reply}");
        ws
    }
}

fn prefix() -> String {
    format!("it{}", uuid::Uuid::new_v4().simple())
}

/// The next publication push of a WebSocket client (joins, leaves and replies are skipped).
async fn next_pub(ws: &mut Ws) -> Value {
    for _ in 0..100 {
        let v = wsclient::next(ws).await;
        if v["push"]["pub"].is_object() {
            return v["push"].clone();
        }
    }
    panic!("no publication among 100 messages");
}

async fn subscribe(ws: &mut Ws, id: u32, sub: Value) -> Value {
    let reply = wsclient::call(ws, id, json!({ "subscribe": sub })).await;
    assert!(reply["error"].is_null(), "{reply}");
    reply["subscribe"].clone()
}

/// 1. A publish on one node (Mercure POST and server API) reaches SSE and WebSocket subscribers on every
///    node, the publishing one included, with one identity: the same SSE id and WebSocket offset/epoch.
#[tokio::test]
async fn a_publish_on_one_node_reaches_every_node_with_one_identity() {
    let redis = Redis::start().await;
    let p = prefix();
    let a = Node::start(&redis, &p, &[]).await;
    let b = Node::start(&redis, &p, &[]).await;
    let c = Node::start(&redis, &p, &[]).await;

    let mut sse = vec![
        a.sse(&["news"], None).await,
        b.sse(&["news"], None).await,
        c.sse(&["news"], None).await,
    ];
    let mut ws = Vec::new();
    let mut epochs = Vec::new();
    for n in [&b, &c] {
        let mut w = n.ws("u").await;
        let r = subscribe(&mut w, 2, json!({"channel": "news"})).await;
        epochs.push(r["epoch"].as_str().expect("epoch").to_string());
        ws.push(w);
    }
    assert_eq!(epochs[0], epochs[1], "one epoch for the cluster");

    let id = a
        .publish(&[("topic", "news"), ("data", r#"{"n":1}"#)])
        .await;
    let (epoch, seq) = herald::log::parse_generated_id(&id).expect("a generated id");
    assert_eq!(epoch, epochs[0]);
    let r = a
        .api("publish", json!({"channel": "news", "data": {"n": 2}}))
        .await;
    let offset = r["offset"].as_u64().expect("offset");
    assert_eq!(r["epoch"], epochs[0]);
    assert!(offset > seq);

    for s in &mut sse {
        let e = s.next_event().await.expect("event");
        assert_eq!(
            (e.id.as_deref(), e.data.as_str()),
            (Some(id.as_str()), r#"{"n":1}"#)
        );
        let e = s.next_event().await.expect("event");
        assert_eq!(
            e.id.as_deref(),
            Some(herald::log::generated_id(&epochs[0], offset).as_str())
        );
        assert_eq!(e.data, r#"{"n":2}"#);
    }
    for w in &mut ws {
        let p1 = next_pub(w).await;
        assert_eq!(p1["channel"], "news");
        assert_eq!(p1["pub"]["offset"], seq);
        assert_eq!(p1["pub"]["data"], json!({"n": 1}));
        let p2 = next_pub(w).await;
        assert_eq!(p2["pub"]["offset"], offset);
        assert_eq!(p2["pub"]["data"], json!({"n": 2}));
    }
    for s in &mut sse {
        s.assert_quiet(Duration::from_millis(300)).await;
    }
}

/// 2. A client cut from one node resumes on another, from its SSE `Last-Event-ID` or its WebSocket
///    offset and epoch, with nothing lost and nothing twice.
#[tokio::test]
async fn a_client_cut_from_one_node_resumes_on_another() {
    let redis = Redis::start().await;
    let p = prefix();
    let a = Node::start(&redis, &p, &[]).await;
    let b = Node::start(&redis, &p, &[]).await;
    let c = Node::start(&redis, &p, &[]).await;

    // SSE: three events on A, cut, three more published on C, resume on B.
    let mut sub = a.sse(&["feed"], None).await;
    let mut last = String::new();
    for i in 0..3 {
        let node = if i % 2 == 0 { &a } else { &b };
        let id = node
            .publish(&[("topic", "feed"), ("data", &format!("before {i}"))])
            .await;
        let e = sub.next_event().await.expect("event");
        assert_eq!(e.id.as_deref(), Some(id.as_str()));
        last = id;
    }
    drop(sub);
    let mut missed = Vec::new();
    for i in 0..3 {
        missed.push(
            c.publish(&[("topic", "feed"), ("data", &format!("during {i}"))])
                .await,
        );
    }
    let mut resumed = b.sse(&["feed"], Some(&last)).await;
    assert_eq!(
        resumed.header("last-event-id").as_deref(),
        Some(last.as_str())
    );
    for (i, id) in missed.iter().enumerate() {
        let e = resumed.next_event().await.expect("replayed event");
        assert_eq!(e.id.as_deref(), Some(id.as_str()));
        assert_eq!(e.data, format!("during {i}"));
    }
    let after = a.publish(&[("topic", "feed"), ("data", "after")]).await;
    let e = resumed.next_event().await.expect("live event");
    assert_eq!(e.id.as_deref(), Some(after.as_str()));
    resumed.assert_quiet(Duration::from_millis(300)).await;

    // WebSocket: subscribed on A, two publications, cut, three on C, recover on B.
    let mut w = a.ws("u1").await;
    let r = subscribe(&mut w, 2, json!({"channel": "room", "recover": true})).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    let mut offset = r["offset"].as_u64().unwrap_or(0);
    for i in 0..2 {
        b.api("publish", json!({"channel": "room", "data": {"i": i}}))
            .await;
        let push = next_pub(&mut w).await;
        assert_eq!(push["pub"]["data"], json!({"i": i}));
        let o = push["pub"]["offset"].as_u64().expect("offset");
        assert!(o > offset);
        offset = o;
    }
    let _ = w.close(None).await;
    drop(w);
    let mut offsets = Vec::new();
    for i in 2..5 {
        let r = c
            .api("publish", json!({"channel": "room", "data": {"i": i}}))
            .await;
        offsets.push(r["offset"].as_u64().expect("offset"));
    }
    let mut w = b.ws("u1").await;
    let r = subscribe(
        &mut w,
        2,
        json!({"channel": "room", "recover": true, "offset": offset, "epoch": epoch}),
    )
    .await;
    assert_eq!(r["recovered"], true, "{r}");
    let got: Vec<(u64, Value)> = r["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap_or(0), p["data"].clone()))
        .collect();
    let want: Vec<(u64, Value)> = offsets
        .iter()
        .zip(2..5)
        .map(|(&o, i)| (o, json!({ "i": i })))
        .collect();
    assert_eq!(got, want, "exactly the missed publications, in order");
    let r = a
        .api("publish", json!({"channel": "room", "data": {"i": 5}}))
        .await;
    let push = next_pub(&mut w).await;
    assert_eq!(push["pub"]["offset"], r["offset"]);
    assert_eq!(push["pub"]["data"], json!({"i": 5}));
}

/// 3. History from any node; presence lists the clients of every node and drops those of a node killed
///    with -9 once the TTL has passed; join and leave cross nodes; a server API disconnect on one node
///    reaches a connection on another.
#[tokio::test]
async fn history_presence_join_leave_and_disconnect_across_nodes() {
    let redis = Redis::start().await;
    let p = prefix();
    let opts = [
        "--set",
        "engine.presence_ttl=\"3s\"",
        "--set",
        r#"centrifugo.namespaces=[{name = "", join_leave = true, force_push_join_leave = true}]"#,
    ];
    let a = Node::start(&redis, &p, &opts).await;
    let b = Node::start(&redis, &p, &opts).await;
    let mut c = Node::start(&redis, &p, &opts).await;

    let mut published = Vec::new();
    for (i, n) in [&a, &b, &c].into_iter().enumerate() {
        let r = n
            .api("publish", json!({"channel": "room", "data": {"i": i}}))
            .await;
        published.push(r["offset"].as_u64().expect("offset"));
    }
    for n in [&a, &b, &c] {
        let h = n
            .api("history", json!({"channel": "room", "limit": 10}))
            .await;
        let offsets: Vec<u64> = h["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .filter_map(|p| p["offset"].as_u64())
            .collect();
        assert_eq!(offsets, published, "the same history on every node");
    }

    let mut u1 = a.ws("u1").await;
    subscribe(&mut u1, 2, json!({"channel": "room"})).await;
    let mut u2 = b.ws("u2").await;
    subscribe(&mut u2, 2, json!({"channel": "room"})).await;
    let mut u3 = c.ws("u3").await;
    subscribe(&mut u3, 2, json!({"channel": "room"})).await;

    // u1 (on A) hears u2 join on B and u3 join on C.
    let mut joined = Vec::new();
    for _ in 0..50 {
        if joined.len() == 2 {
            break;
        }
        let v = wsclient::next(&mut u1).await;
        if let Some(user) = v["push"]["join"]["info"]["user"].as_str() {
            if user != "u1" {
                joined.push(user.to_string());
            }
        }
    }
    joined.sort();
    assert_eq!(joined, ["u2", "u3"]);

    let users = |v: &Value| -> Vec<String> {
        let mut u: Vec<String> = v["presence"]
            .as_object()
            .expect("presence")
            .values()
            .filter_map(|c| c["user"].as_str().map(String::from))
            .collect();
        u.sort();
        u
    };
    let present = b.api("presence", json!({"channel": "room"})).await;
    assert_eq!(users(&present), ["u1", "u2", "u3"]);

    // u2 leaves B: u1 on A hears it.
    let _ = u2.close(None).await;
    drop(u2);
    let mut left = None;
    for _ in 0..50 {
        let v = wsclient::next(&mut u1).await;
        if let Some(user) = v["push"]["leave"]["info"]["user"].as_str() {
            left = Some(user.to_string());
            break;
        }
    }
    assert_eq!(left.as_deref(), Some("u2"));

    // C dies without a word: its client drops out of presence once the TTL (3s) has passed.
    c.kill9().await;
    drop(u3);
    let killed_at = Instant::now();
    let present = a.api("presence", json!({"channel": "room"})).await;
    assert_eq!(
        users(&present),
        ["u1", "u3"],
        "u3 stays until its entry expires"
    );
    until(
        Duration::from_secs(10),
        "u3 drops out of presence",
        || async { users(&a.api("presence", json!({"channel": "room"})).await) == ["u1"] },
    )
    .await;
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "dropped by expiry, not at once"
    );

    // A server API disconnect on B closes u1's connection on A.
    b.api(
        "disconnect",
        json!({"user": "u1", "disconnect": {"code": 4000, "reason": "bye"}}),
    )
    .await;
    let (code, reason) = wsclient::closed(&mut u1).await;
    assert_eq!((code, reason.as_str()), (4000, "bye"));
}

/// 4. A node killed with -9 while a publisher hammers it: every publish it acknowledged is in the history
///    read from another node.
#[tokio::test]
async fn acknowledged_publishes_survive_a_node_killed_mid_run() {
    let redis = Redis::start().await;
    let p = prefix();
    let mut a = Node::start(&redis, &p, &[]).await;
    let b = Node::start(&redis, &p, &[]).await;

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/.well-known/mercure", a.url);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (acked, stop, url) = (acked.clone(), stop.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let token = publisher_token();
            for i in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let id = format!("w{w}-{i}");
                let sent = client
                    .post(&url)
                    .bearer_auth(&token)
                    .form(&[("topic", "hammer"), ("data", "x"), ("id", &id)])
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => acked.lock().unwrap().push(id),
                    _ => return, // the node is gone
                }
            }
        }));
    }
    until(WAIT, "some publishes acknowledged", || {
        let n = acked.lock().unwrap().len();
        async move { n >= 200 }
    })
    .await;
    a.kill9().await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(WAIT, t).await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200);

    let mut replay = b.sse(&["hammer"], Some("earliest")).await;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.iter().any(|id| !seen.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "{} acknowledged publishes missing from history",
            acked.iter().filter(|id| !seen.contains(*id)).count()
        );
        match replay.next_within(Duration::from_secs(5)).await {
            Ok(Some(e)) if !e.comment => {
                let id = e.id.expect("id");
                assert!(seen.insert(id.clone()), "{id} replayed twice");
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(()) => panic!(
                "history ended with {} acknowledged publishes missing",
                acked.iter().filter(|id| !seen.contains(*id)).count()
            ),
        }
    }
}

/// Pub/sub is at most once: a node whose subscription Redis drops (here at every message, through a
/// one-byte output buffer limit for pub/sub clients and messages larger than a client's 16 KiB static reply
/// buffer, which the limit does not count) still delivers every publication, once and in order, read from
/// the log.
#[tokio::test]
async fn a_node_that_misses_pubsub_messages_fills_them_from_the_log() {
    let redis = Redis::start().await;
    let p = prefix();
    let a = Node::start(&redis, &p, &[]).await;
    let b = Node::start(&redis, &p, &[]).await;
    let mut sub = b.sse(&["gap"], None).await;
    let mut ws = b.ws("u").await;
    subscribe(&mut ws, 2, json!({"channel": "gap"})).await;

    assert_eq!(
        redis
            .command(r#"CONFIG SET client-output-buffer-limit "pubsub 1 1 0""#)
            .await,
        "+OK"
    );
    let mut acked = Vec::new();
    for i in 0..10 {
        let data = format!("{i}{}", "x".repeat(20_000));
        acked.push(a.publish(&[("topic", "gap"), ("data", &data)]).await);
    }
    for id in &acked {
        let e = sub.next_event().await.expect("event");
        assert_eq!(e.id.as_ref(), Some(id));
        let (_, seq) = herald::log::parse_generated_id(id).expect("generated id");
        assert_eq!(next_pub(&mut ws).await["pub"]["offset"], seq);
    }
    assert_eq!(
        redis
            .command(r#"CONFIG SET client-output-buffer-limit "pubsub 33554432 8388608 60""#)
            .await,
        "+OK"
    );
    sub.assert_quiet(Duration::from_millis(300)).await;
    assert!(b.metric("herald_engine_feed_gaps_total").await >= 1.0);
    assert!(b.metric("herald_engine_reconnects_total").await >= 1.0);
}

/// 5. Redis stopped and restarted (AOF on, same directory) during a run: `/readyz` goes 503 and back to
///    200, publishes meanwhile fail with 503 and are not acknowledged, subscribers carry on or resume, and
///    nothing acknowledged is lost.
#[tokio::test]
async fn a_redis_restart_loses_nothing_acknowledged() {
    let mut redis = Redis::start().await;
    let p = prefix();
    let opts = [
        "--set",
        "engine.op_timeout=\"1s\"",
        "--set",
        "engine.connect_timeout=\"1s\"",
    ];
    let a = Node::start(&redis, &p, &opts).await;
    let b = Node::start(&redis, &p, &opts).await;
    let epoch_before = a.api("info", json!({})).await;

    let mut sub = b.sse(&["t"], None).await;
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(
            a.publish(&[("topic", "t"), ("data", &format!("a{i}"))])
                .await,
        );
    }

    redis.stop().await;
    until(WAIT, "A reports 503", || async { a.readyz().await == 503 }).await;
    until(WAIT, "B reports 503", || async { b.readyz().await == 503 }).await;
    for i in 0..3 {
        let resp = a.post(&[("topic", "t"), ("data", &format!("x{i}"))]).await;
        assert_eq!(resp.status(), 503, "a publish without Redis is refused");
        let body: Value = resp.json().await.expect("json error");
        assert_eq!(body["code"], "log_unavailable");
    }

    redis.spawn().await;
    until(Duration::from_secs(20), "A ready again", || async {
        a.readyz().await == 200
    })
    .await;
    until(Duration::from_secs(20), "B ready again", || async {
        b.readyz().await == 200
    })
    .await;
    for i in 0..5 {
        acked.push(
            b.publish(&[("topic", "t"), ("data", &format!("b{i}"))])
                .await,
        );
    }
    assert_eq!(
        a.api("info", json!({})).await["nodes"][0]["uid"],
        epoch_before["nodes"][0]["uid"],
        "the AOF kept the history: same epoch"
    );

    // The subscriber either stayed (its gap filled from the log) or was disconnected and resumes.
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < acked.len() {
        assert!(Instant::now() < deadline, "got {got:?}, want {acked:?}");
        match sub.next_within(Duration::from_secs(5)).await {
            Ok(Some(e)) if e.comment => {}
            Ok(Some(e)) => got.push(e.id.expect("id")),
            Ok(None) | Err(()) => {
                let last = got.last().cloned();
                sub = b.sse(&["t"], last.as_deref()).await;
            }
        }
    }
    assert_eq!(got, acked, "every acknowledged publish, once, in order");
    sub.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(redis.command("PING").await, "+PONG");
}

/// 6. Start-up against an unreachable Redis fails fast, naming the URL.
#[tokio::test]
async fn startup_without_redis_fails_fast_naming_the_url() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let (status, stderr) = process::refused(
        &[
            "--memory",
            "--set",
            "engine.kind=redis",
            "--set",
            &format!("engine.url={url}"),
            "--set",
            "engine.connect_timeout=\"1s\"",
        ],
        &[],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains(&url), "{stderr}");
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn engine_options(redis: &Redis, prefix: &str, retention: herald::log::Retention) -> RedisOptions {
    RedisOptions {
        url: redis.url(),
        prefix: prefix.into(),
        connect_timeout: Duration::from_secs(2),
        op_timeout: Duration::from_secs(2),
        presence_ttl: Duration::from_secs(5),
        retention,
        prune_interval: Duration::from_secs(3600),
    }
}

fn rec(topics: &[&str], id: &str) -> Record {
    Record {
        id: id.into(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        data: bytes::Bytes::from_static(b"d"),
        time_ms: 1,
        ..Default::default()
    }
}

async fn next_event(feed: &mut Feed) -> FeedEvent {
    tokio::time::timeout(WAIT, feed.recv())
        .await
        .expect("a feed event in time")
        .expect("the feed is open")
}

async fn next_seq(feed: &mut Feed) -> u64 {
    match next_event(feed).await {
        FeedEvent::Publication(r) => r.seq,
        other => panic!("expected a publication, got {other:?}"),
    }
}

/// The engine on its own: reads, ids, count retention and removal keep the log's contract; the feed fills
/// what was appended before it started, skips a hole (a seq no record holds), reports a loss when a missing
/// seq may have been removed by retention, and reports one when Redis loses its data (new epoch, positions
/// never given twice).
#[tokio::test]
async fn the_engine_keeps_the_contract_and_its_feed_fills_skips_and_reports_losses() {
    let redis = Redis::start().await;
    let p = prefix();
    let retention = herald::log::Retention {
        rules: vec![herald::log::RetentionRule {
            selector: herald::topic::Selector::parse("short:{x}"),
            max_count: Some(2),
            max_age: None,
        }],
    };
    let e = RedisEngine::open(engine_options(&redis, &p, retention))
        .await
        .expect("open");
    let epoch = e.epoch();

    let first = e
        .append(vec![rec(&["a"], ""), rec(&["b", "a", "alt"], "pub-1")])
        .await
        .unwrap();
    assert_eq!(first[0].id, herald::log::generated_id(&epoch, first[0].seq));
    assert_eq!(first[1].seq, first[0].seq + 1);
    assert_eq!(e.find_id("pub-1".into()).await.unwrap(), Some(first[1].seq));
    assert_eq!(
        e.find_id(first[0].id.clone()).await.unwrap(),
        Some(first[0].seq)
    );
    assert_eq!(e.find_id("#other-1".into()).await.unwrap(), None);
    let alt = e
        .read_range(0, u64::MAX, 10, Some(vec!["alt".into()]))
        .await
        .unwrap();
    assert_eq!(alt, vec![first[1].clone()], "an alternate topic counts");
    let a = e
        .read_range(0, u64::MAX, 10, Some(vec!["a".into()]))
        .await
        .unwrap();
    assert_eq!(a.len(), 2, "canonical and alternate, once each");
    assert_eq!(e.last().await.unwrap().map(|r| r.seq), Some(first[1].seq));

    // The feed starts after the first record: it fills the second from the log, then goes live.
    let mut feed = e.feed(first[0].seq).expect("a cluster engine has a feed");
    assert_eq!(next_seq(&mut feed).await, first[1].seq);

    // Count retention at append: two kept, the older removed everywhere but the position stays.
    let short: Vec<u64> = e
        .append(
            (0..4)
                .map(|i| rec(&["short:1"], &format!("s{i}")))
                .collect(),
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    for &seq in &short {
        assert_eq!(
            next_seq(&mut feed).await,
            seq,
            "live, removed from history or not"
        );
    }
    let kept = e
        .read_channel("short:1".into(), 0, u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(kept.iter().map(|r| r.seq).collect::<Vec<_>>(), short[2..]);
    assert_eq!(
        e.channel_pruned_upto("short:1".into()).await.unwrap(),
        short[1]
    );
    assert_eq!(
        e.find_id("s0".into()).await.unwrap(),
        None,
        "its id went too"
    );
    let back = e
        .read_channel_back("short:1".into(), short[3], 10)
        .await
        .unwrap();
    assert_eq!(back.iter().map(|r| r.seq).collect::<Vec<_>>(), [short[2]]);
    assert_eq!(e.remove_channel("short:1".into()).await.unwrap(), 2);
    assert_eq!(
        e.channel_top("short:1".into(), u64::MAX).await.unwrap(),
        Some(short[3]),
        "removing history keeps the position"
    );
    assert!(e
        .read_channel("short:1".into(), 0, u64::MAX, 10)
        .await
        .unwrap()
        .is_empty());

    let live = e.append(vec![rec(&["a"], "")]).await.unwrap()[0].seq;
    assert_eq!(next_seq(&mut feed).await, live);

    // A hole (a seq taken by a script that failed) is skipped without a loss.
    assert!(redis
        .command(&format!("INCR {p}:seq"))
        .await
        .starts_with(':'));
    let after_hole = e.append(vec![rec(&["a"], "")]).await.unwrap()[0].seq;
    assert_eq!(after_hole, live + 2);
    assert_eq!(next_seq(&mut feed).await, after_hole);

    // A missing seq that retention may have removed is a loss, reported before what follows it.
    assert!(redis
        .command(&format!("INCR {p}:seq"))
        .await
        .starts_with(':'));
    redis
        .command(&format!("SET {p}:pruned_max {}", after_hole + 1))
        .await;
    let after_loss = e.append(vec![rec(&["a"], "")]).await.unwrap()[0].seq;
    assert!(matches!(next_event(&mut feed).await, FeedEvent::Lost(_)));
    assert_eq!(next_seq(&mut feed).await, after_loss);

    // Redis loses everything: a new epoch, a loss, and positions continue above what was given.
    assert_eq!(redis.command("FLUSHALL").await, "+OK");
    let reborn = e.append(vec![rec(&["a"], "")]).await.unwrap()[0].clone();
    assert_ne!(e.epoch(), epoch, "a new epoch");
    assert!(reborn.seq > after_loss, "a position is never given twice");
    assert_eq!(reborn.id, herald::log::generated_id(&e.epoch(), reborn.seq));
    assert_eq!(
        e.find_id(first[0].id.clone()).await.unwrap(),
        None,
        "positions of the old epoch are unknown"
    );
    let lost = loop {
        match next_event(&mut feed).await {
            FeedEvent::Lost(why) => break why,
            FeedEvent::Publication(r) => panic!("publication {} before the loss", r.seq),
            _ => {}
        }
    };
    assert!(lost.contains("epoch"), "{lost}");
    assert_eq!(next_seq(&mut feed).await, reborn.seq);

    // Age retention: a node whose rules give `old:{x}` one second removes old records in its pass.
    let old = e.append(vec![rec(&["old:1"], "o1")]).await.unwrap()[0].seq;
    assert_eq!(next_seq(&mut feed).await, old);
    let aging = RedisEngine::open(RedisOptions {
        prune_interval: Duration::from_millis(100),
        ..engine_options(
            &redis,
            &p,
            herald::log::Retention {
                rules: vec![herald::log::RetentionRule {
                    selector: herald::topic::Selector::parse("old:{x}"),
                    max_count: None,
                    max_age: Some(Duration::from_secs(1)),
                }],
            },
        )
    })
    .await
    .expect("open");
    until(WAIT, "the old record is removed", || async {
        aging.channel_pruned_upto("old:1".into()).await.unwrap() == old
    })
    .await;
    assert!(e
        .read_channel("old:1".into(), 0, u64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(e.find_id("o1".into()).await.unwrap(), None);
    aging.close().await.unwrap();
    e.close().await.unwrap();
}

/// Publishes four records on a channel (and one on another), trims the channel up to the second, and
/// checks what is left, the removed mark, and what recovery says from before and after the cut: a
/// client that missed a trimmed record is told it was not recovered, one that missed none recovers.
pub(crate) async fn trim_keeps_recovery_honest(s: &TestServer) {
    let mut offsets = Vec::new();
    for i in 0..4 {
        let r = wsclient::api(
            s,
            "publish",
            json!({"channel": "trimmed", "data": {"i": i}}),
        )
        .await;
        offsets.push(r["offset"].as_u64().expect("offset"));
        if i == 1 {
            wsclient::api(s, "publish", json!({"channel": "kept", "data": {}})).await;
        }
    }
    let engine = s.hub.engine();
    let epoch = engine.epoch();
    let removed = engine
        .trim_channel("trimmed".into(), offsets[1])
        .await
        .expect("trim");
    assert_eq!(removed, 2);
    let left: Vec<u64> = engine
        .read_channel("trimmed".into(), 0, u64::MAX, 100)
        .await
        .expect("read")
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(left, offsets[2..].to_vec());
    assert_eq!(
        engine.channel_pruned_upto("trimmed".into()).await.unwrap(),
        offsets[1]
    );
    let other = engine
        .read_channel("kept".into(), 0, u64::MAX, 100)
        .await
        .unwrap();
    assert_eq!(other.len(), 1, "another channel is untouched");
    assert_eq!(
        engine
            .trim_channel("trimmed".into(), offsets[1])
            .await
            .unwrap(),
        0,
        "nothing left below the cut"
    );

    let mut ws = wsclient::connected(s, "u").await;
    let r = wsclient::call(
        &mut ws,
        2,
        json!({"subscribe": {"channel": "trimmed", "recover": true, "offset": offsets[0], "epoch": epoch}}),
    )
    .await;
    // `recovered: false` is left out of the reply, as Centrifugo does with false fields.
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert!(
        !r["subscribe"]["recovered"].as_bool().unwrap_or(false),
        "missed a trimmed record: {r}"
    );
    let mut ws = wsclient::connected(s, "v").await;
    let r = wsclient::call(
        &mut ws,
        2,
        json!({"subscribe": {"channel": "trimmed", "recover": true, "offset": offsets[1], "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        r["subscribe"]["recovered"], true,
        "missed nothing trimmed: {r}"
    );
    let got: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(got, offsets[2..].to_vec());
}

/// `trim_channel` on Redis, atomically per step in a script with the removed mark.
#[tokio::test]
async fn trim_channel_removes_up_to_a_seq_and_recovery_says_so() {
    let redis = Redis::start().await;
    let s = TestServer::start(&[
        ("engine.kind", "\"redis\""),
        ("engine.url", &format!("{:?}", redis.url())),
        ("engine.prefix", &format!("{:?}", prefix())),
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
    ])
    .await;
    trim_keeps_recovery_honest(&s).await;
}
