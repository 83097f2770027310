//! Several `herald` processes on one NATS JetStream server behave as one server: delivery, identities,
//! resume, history, presence, join/leave and server API actions cross nodes; a node killed with -9 loses
//! nothing acknowledged; a NATS restart is survived. Each test starts its own `nats-server` (JetStream,
//! free port, temporary store) so it can stop and restart it, and never touches a shared instance.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::log::{generated_id, parse_generated_id};
use serde_json::{json, Value};

use crate::common::*;
use crate::process::{refused, Herald};
use crate::wsclient::*;

/// A nats-server of this test's own.
pub(crate) struct Nats {
    child: Option<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// A configuration file passed with `-c` (settings the command line has no flag for).
    conf: Option<std::path::PathBuf>,
}

fn nats_bin() -> &'static str {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .unwrap_or("nats-server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nats {
    pub(crate) fn start() -> Nats {
        let mut n = Nats {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            conf: None,
        };
        n.run();
        n
    }

    /// A server whose `max_payload` (the largest message it takes) is `bytes`.
    pub(crate) fn start_with_max_payload(bytes: usize) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, format!("max_payload: {bytes}\n")).unwrap();
        let mut n = Nats {
            child: None,
            port: free_port(),
            dir,
            conf: Some(conf),
        };
        n.run();
        n
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store.
    fn run(&mut self) {
        let mut cmd = std::process::Command::new(nats_bin());
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        let child = cmd
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/install-test-deps.sh installs it)");
        self.child = Some(child);
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    /// Stops the server the way an operator does (SIGTERM) and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            for _ in 0..400 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A prefix of this test's own (streams, buckets and subjects are named from it).
fn prefix() -> String {
    format!("it{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A `herald serve` on `nats` with `prefix`, plus `extra` arguments. Dropping it is `kill -9`.
async fn node(nats: &Nats, prefix: &str, extra: &[&str]) -> Herald {
    let url = format!("engine.url={}", nats.url());
    let pre = format!("engine.prefix={prefix}");
    let mut args = vec![
        "--memory",
        "--jwt-key",
        KEY,
        "--allow-anonymous",
        "--set",
        "engine.kind=nats",
        "--set",
        &url,
        "--set",
        &pre,
        "--set",
        "engine.presence_ttl=2s",
        "--set",
        "engine.op_timeout=2s",
        "--set",
        "centrifugo.api_key=it-api-key",
        "--set",
        r#"centrifugo.namespaces=[{name = "room", join_leave = true}]"#,
    ];
    args.extend_from_slice(extra);
    Herald::start(&args, &[("HERALD_LOG_LEVEL", "warn")]).await
}

async fn ws_at(base: &str, user: &str) -> Ws {
    let url = format!("{}/connection/websocket", base.replace("http://", "ws://"));
    let mut ws = Ws {
        inner: tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect")
            .0,
        pending: Default::default(),
    };
    let reply = call(
        &mut ws,
        1,
        json!({"connect": {"token": conn_token(user, 600)}}),
    )
    .await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    ws
}

async fn api_at(base: &str, method: &str, body: Value) -> Value {
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{base}/api/{method}"))
            .header("x-api-key", API_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(status, 200, "{method}: {v}");
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}

/// A Mercure publish; `(status, body)`.
async fn post(base: &str, topic: &str, data: &str, id: Option<&str>) -> (u16, String) {
    let mut form = vec![("topic", topic), ("data", data)];
    if let Some(id) = id {
        form.push(("id", id));
    }
    let resp = reqwest::Client::new()
        .post(format!("{base}/.well-known/mercure"))
        .bearer_auth(publisher_token())
        .form(&form)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match resp {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

async fn published(base: &str, topic: &str, data: &str, id: Option<&str>) -> String {
    let (status, body) = post(base, topic, data, id).await;
    assert_eq!(status, 200, "publish refused: {body}");
    body
}

async fn readyz(base: &str) -> u16 {
    match reqwest::Client::new()
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits (bounded) until `/readyz` answers `want`.
async fn wait_ready(base: &str, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = 0;
    while Instant::now() < deadline {
        last = readyz(base).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz of {base} answered {last}, not {want}, for {within:?}");
}

/// The next publication push on a WebSocket (other pushes are skipped): `(channel, offset, data)`.
async fn next_pub(ws: &mut Ws) -> (String, u64, Value) {
    for _ in 0..50 {
        let v = next(ws).await;
        if let Some(p) = v["push"]["pub"].as_object() {
            return (
                v["push"]["channel"].as_str().unwrap_or("").to_string(),
                p.get("offset").and_then(Value::as_u64).unwrap_or(0),
                p.get("data").cloned().unwrap_or(Value::Null),
            );
        }
    }
    panic!("no publication among 50 pushes");
}

async fn subscribe(ws: &mut Ws, id: u32, body: Value) -> Value {
    let reply = call(ws, id, json!({ "subscribe": body })).await;
    assert!(reply["subscribe"].is_object(), "{reply}");
    reply["subscribe"].clone()
}

fn seq_of(id: &str) -> u64 {
    parse_generated_id(id).expect("a generated id").1
}

#[tokio::test]
async fn three_nodes_deliver_everywhere_with_one_identity() {
    let nats = Nats::start();
    let p = prefix();
    let a = node(&nats, &p, &[]).await;
    let b = node(&nats, &p, &[]).await;
    let c = node(&nats, &p, &[]).await;
    let mut sse_b = Sse::get(&subscribe_url(&b.url, &["news"], &[])).await;
    let mut sse_c = Sse::get(&subscribe_url(&c.url, &["news"], &[])).await;
    let mut ws_b = ws_at(&b.url, "ub").await;
    let mut ws_c = ws_at(&c.url, "uc").await;
    let epoch_b = subscribe(&mut ws_b, 2, json!({"channel": "news"})).await["epoch"].clone();
    let epoch_c = subscribe(&mut ws_c, 2, json!({"channel": "news"})).await["epoch"].clone();
    assert_eq!(epoch_b, epoch_c, "one epoch for the whole cluster");

    // Mercure POST on A.
    let id = published(&a.url, "news", "{\"n\":1}", None).await;
    assert_eq!(
        parse_generated_id(&id).map(|(e, _)| e.to_string()),
        epoch_b.as_str().map(str::to_string)
    );
    for sse in [&mut sse_b, &mut sse_c] {
        let ev = sse.next_event().await.expect("the publication");
        assert_eq!(
            (ev.id.as_deref(), ev.data.as_str()),
            (Some(id.as_str()), "{\"n\":1}")
        );
    }
    for ws in [&mut ws_b, &mut ws_c] {
        let (channel, offset, data) = next_pub(ws).await;
        assert_eq!((channel.as_str(), offset), ("news", seq_of(&id)));
        assert_eq!(data, json!({"n": 1}));
    }

    // Server API publish on A.
    let r = api_at(
        &a.url,
        "publish",
        json!({"channel": "news", "data": {"n": 2}}),
    )
    .await;
    let offset = r["offset"].as_u64().expect("offset");
    assert_eq!(r["epoch"], epoch_b);
    assert!(offset > seq_of(&id));
    for ws in [&mut ws_b, &mut ws_c] {
        assert_eq!(
            next_pub(ws).await.1,
            offset,
            "the same offset on every node"
        );
    }
    let same = generated_id(epoch_b.as_str().unwrap(), offset);
    for sse in [&mut sse_b, &mut sse_c] {
        let ev = sse.next_event().await.expect("the publication");
        assert_eq!(
            ev.id.as_deref(),
            Some(same.as_str()),
            "the same SSE id on every node"
        );
    }
    // Each publication arrived once.
    sse_b.assert_quiet(Duration::from_millis(300)).await;
    drop(a);
}

#[tokio::test]
async fn a_client_cut_from_one_node_resumes_on_another() {
    let nats = Nats::start();
    let p = prefix();
    let a = node(&nats, &p, &[]).await;
    let b = node(&nats, &p, &[]).await;
    let mut sse = Sse::get(&subscribe_url(&a.url, &["feed"], &[])).await;
    let mut ws = ws_at(&a.url, "u").await;
    let sub = subscribe(&mut ws, 2, json!({"channel": "feed"})).await;
    let epoch = sub["epoch"].clone();
    let first = published(&a.url, "feed", "1", None).await;
    let second = published(&b.url, "feed", "2", Some("mine-2")).await;
    assert_eq!(second, "mine-2");
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(sse.next_event().await.unwrap().id.unwrap());
    }
    assert_eq!(seen, [first.clone(), second.clone()]);
    let mut offset = 0;
    for _ in 0..2 {
        offset = next_pub(&mut ws).await.1;
    }
    // Cut from A; three more publications meanwhile, from both nodes.
    drop(sse);
    drop(ws);
    let mut missed = Vec::new();
    for (i, base) in [&a.url, &b.url, &a.url].into_iter().enumerate() {
        missed.push(published(base, "feed", &format!("m{i}"), None).await);
    }

    // SSE resumes on B with the publisher's id as Last-Event-ID (found through the cluster's index).
    let mut sse = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&b.url, &["feed"], &[]))
            .header("Last-Event-ID", &second),
    )
    .await;
    let mut resumed = Vec::new();
    for _ in 0..3 {
        resumed.push(sse.next_event().await.unwrap().id.unwrap());
    }
    assert_eq!(resumed, missed, "nothing lost, in order");
    sse.assert_quiet(Duration::from_millis(300)).await;

    // WebSocket recovery on B with offset and epoch.
    let mut ws = ws_at(&b.url, "u").await;
    let sub = subscribe(
        &mut ws,
        2,
        json!({"channel": "feed", "recover": true, "offset": offset, "epoch": epoch}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let offsets: Vec<u64> = sub["publications"]
        .as_array()
        .expect("recovered publications")
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        missed.iter().map(|id| seq_of(id)).collect::<Vec<_>>()
    );

    // And live goes on, once, on both.
    let live = published(&a.url, "feed", "live", None).await;
    assert_eq!(
        sse.next_event().await.unwrap().id.as_deref(),
        Some(live.as_str())
    );
    assert_eq!(next_pub(&mut ws).await.1, seq_of(&live));
    sse.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn history_presence_join_leave_and_disconnect_cross_nodes() {
    let nats = Nats::start();
    let p = prefix();
    let a = node(&nats, &p, &[]).await;
    let b = node(&nats, &p, &[]).await;
    let c = node(&nats, &p, &[]).await;

    // History from any node.
    let mut offsets = Vec::new();
    for i in 0..3 {
        let r = api_at(
            &a.url,
            "publish",
            json!({"channel": "room:1", "data": {"i": i}}),
        )
        .await;
        offsets.push(r["offset"].as_u64().unwrap());
    }
    let h = api_at(&c.url, "history", json!({"channel": "room:1", "limit": 10})).await;
    let got: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(got, offsets);
    let h = api_at(
        &b.url,
        "history",
        json!({"channel": "room:1", "limit": 2, "reverse": true}),
    )
    .await;
    assert_eq!(h["publications"][0]["offset"].as_u64(), Some(offsets[2]));
    assert_eq!(h["offset"].as_u64(), Some(offsets[2]));

    // Join and leave cross nodes.
    let mut wa = ws_at(&a.url, "ua").await;
    subscribe(&mut wa, 2, json!({"channel": "room:1", "join_leave": true})).await;
    let mut wb = ws_at(&b.url, "ub").await;
    subscribe(&mut wb, 2, json!({"channel": "room:1"})).await;
    join_of(&mut wa, "ub").await;
    let mut wc = ws_at(&c.url, "uc").await;
    subscribe(&mut wc, 2, json!({"channel": "room:1"})).await;
    join_of(&mut wa, "uc").await;

    // Presence lists the clients of every node.
    let users = |v: &Value| -> Vec<String> {
        let mut u: Vec<String> = v["presence"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|i| i["user"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        u.sort();
        u
    };
    wait_presence(&b.url, "room:1", &["ua", "ub", "uc"], users).await;

    call(&mut wb, 3, json!({"unsubscribe": {"channel": "room:1"}})).await;
    assert_eq!(push_with(&mut wa, "leave").await["info"]["user"], "ub");
    wait_presence(&a.url, "room:1", &["ua", "uc"], users).await;

    // A node killed with -9 takes its clients out of presence after the TTL (2 s here).
    drop(wc);
    drop(c);
    let started = Instant::now();
    wait_presence(&a.url, "room:1", &["ua"], users).await;
    assert!(started.elapsed() < Duration::from_secs(10));

    // The server API on A disconnects a connection on B.
    api_at(&a.url, "disconnect", json!({"user": "ub"})).await;
    assert_eq!(closed(&mut wb).await.0, 3503);
}

/// Waits (bounded) until `channel`'s presence, asked of `base`, is exactly `want`.
async fn wait_presence(
    base: &str,
    channel: &str,
    want: &[&str],
    users: impl Fn(&Value) -> Vec<String>,
) {
    let mut last = Vec::new();
    for _ in 0..150 {
        last = users(&api_at(base, "presence", json!({"channel": channel})).await);
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("presence of {channel} on {base}: {last:?}, expected {want:?}");
}

/// Waits for the join of `user` (a subscriber is told of its own join too).
async fn join_of(ws: &mut Ws, user: &str) {
    for _ in 0..10 {
        if push_with(ws, "join").await["info"]["user"] == user {
            return;
        }
    }
    panic!("no join of {user}");
}

/// The next push carrying `kind` (join, leave, …), its body.
async fn push_with(ws: &mut Ws, kind: &str) -> Value {
    for _ in 0..50 {
        let v = next(ws).await;
        if !v["push"][kind].is_null() {
            return v["push"][kind].clone();
        }
    }
    panic!("no {kind} push among 50");
}

#[tokio::test]
async fn a_node_killed_mid_stream_loses_nothing_acknowledged() {
    let nats = Nats::start();
    let p = prefix();
    let keep = r#"retention=[{pattern = "*", max_count = 100000}]"#;
    let a = node(&nats, &p, &["--set", keep]).await;
    let b = node(&nats, &p, &["--set", keep]).await;
    let acked = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (url, acked, count) = (a.url.clone(), acked.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..3000 {
                let id = format!("h-{t}-{i}");
                match post(&url, "hammer", "x", Some(&id)).await {
                    (200, body) => {
                        assert_eq!(body, id);
                        acked.lock().push(id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return, // the node is gone
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        count.load(Ordering::SeqCst) >= 300,
        "the publishers got going"
    );
    drop(a); // kill -9, publishers still sending
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("publishers stop once the node is gone")
            .unwrap();
    }
    let acked: HashSet<String> = acked.lock().iter().cloned().collect();
    // Everything acknowledged is in the history, read from the other node.
    let mut sse = Sse::get(&subscribe_url(
        &b.url,
        &["hammer"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    let mut found = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !acked.is_subset(&found) && Instant::now() < deadline {
        match sse.next_within(Duration::from_secs(5)).await {
            Ok(Some(ev)) if !ev.comment => {
                found.insert(ev.id.unwrap_or_default());
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let missing: Vec<&String> = acked.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged publications lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test]
async fn a_nats_restart_is_survived_without_losing_anything_acknowledged() {
    let mut nats = Nats::start();
    let p = prefix();
    let a = node(&nats, &p, &[]).await;
    let b = node(&nats, &p, &[]).await;
    let mut sse = Sse::get(&subscribe_url(&b.url, &["r"], &[])).await;
    let mut acked = vec![
        published(&a.url, "r", "1", None).await,
        published(&a.url, "r", "2", None).await,
    ];
    let epoch = parse_generated_id(&acked[0]).unwrap().0.to_string();
    let mut received = Vec::new();
    for _ in 0..2 {
        received.push(sse.next_event().await.unwrap().id.unwrap());
    }

    nats.stop();
    wait_ready(&a.url, 503, Duration::from_secs(20)).await;
    let (status, body) = post(&a.url, "r", "during", None).await;
    assert_eq!(
        status, 503,
        "a publish during the outage is refused: {body}"
    );
    assert!(body.contains("log_unavailable"), "{body}");

    nats.run();
    wait_ready(&a.url, 200, Duration::from_secs(30)).await;
    wait_ready(&b.url, 200, Duration::from_secs(30)).await;
    for i in 0..3 {
        acked.push(published(&a.url, "r", &format!("after{i}"), None).await);
    }
    assert_eq!(
        parse_generated_id(&acked[2]).unwrap().0,
        epoch,
        "the history survived: same epoch"
    );
    // The subscriber either stayed (and was filled in) or was disconnected and resumes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < acked.len() && Instant::now() < deadline {
        match sse.next_within(Duration::from_secs(5)).await {
            Ok(Some(ev)) if !ev.comment => received.push(ev.id.unwrap_or_default()),
            Ok(Some(_)) => {}
            Ok(None) | Err(()) => {
                let last = received.last().cloned().unwrap_or_default();
                sse = Sse::open(
                    reqwest::Client::new()
                        .get(subscribe_url(&b.url, &["r"], &[]))
                        .header("Last-Event-ID", last),
                )
                .await;
            }
        }
    }
    assert_eq!(
        received, acked,
        "every acknowledged publication once, in order"
    );
    // Nothing refused during the outage shows up later.
    let mut replay = Sse::get(&subscribe_url(
        &a.url,
        &["r"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    let mut all = Vec::new();
    while all.len() < acked.len() {
        let ev = replay.next_event().await.unwrap();
        all.push(ev.data);
    }
    assert!(!all.contains(&"during".to_string()), "{all:?}");
    replay.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn start_up_fails_fast_naming_an_unreachable_nats() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let (status, stderr) = refused(
        &[
            "--memory",
            "--set",
            "engine.kind=nats",
            "--set",
            &format!("engine.url={url}"),
            "--set",
            "engine.connect_timeout=2s",
        ],
        &[],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains(&url), "the message names the URL: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "fails fast");
}

/// `trim_channel` on NATS (Yjs compaction uses it): the records up to the cut are purged, the removal is
/// recorded, and recovery from before the cut is refused rather than silently skipping them.
#[tokio::test]
async fn trim_channel_purges_up_to_a_seq_and_recovery_says_so() {
    let nats = Nats::start();
    let s = TestServer::start(&[
        ("engine.kind", "\"nats\""),
        ("engine.url", &format!("{:?}", nats.url())),
        ("engine.prefix", &format!("{:?}", prefix())),
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
    ])
    .await;
    crate::cluster_redis::trim_keeps_recovery_honest(&s).await;
}
