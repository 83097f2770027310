//! The inbox on the Redis engine across nodes: one inbox seen from every node (events with their counts
//! reach a device on another node, changes on any node keep the counts equal to a recount), a real
//! `herald` killed with SIGKILL in the middle of a notify storm, and the start-up recount on Redis.
//!
//! These tests use the Redis at 127.0.0.1:6379 (`HERALD_TEST_REDIS` to point elsewhere), each under a
//! key prefix of its own that [`Keys`] removes at the end. (The behaviour tests of `inbox.rs` run on
//! this store too: see `on_both_stores!` there.)

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::common::*;
use crate::inbox::{
    all_items, backend, browser, counts, next_data, notify, recount, sse_url_at, start_on,
    user_token, Store,
};
use crate::wsclient::{self, API_KEY};

fn redis_url() -> String {
    std::env::var("HERALD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of a test's own; its keys are deleted when it is dropped.
pub(crate) struct Keys {
    pub prefix: String,
}

impl Keys {
    pub(crate) fn new() -> Keys {
        Keys {
            prefix: format!("itinbox{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The config of a node on the Redis engine under this prefix.
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        vec![
            ("engine.kind".into(), "\"redis\"".into()),
            ("engine.url".into(), format!("{:?}", redis_url())),
            ("engine.prefix".into(), format!("{:?}", self.prefix)),
        ]
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(redis_url())
            .expect("redis url")
            .get_connection()
            .expect("connect to the test Redis")
    }

    /// One command on the test Redis.
    pub(crate) fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.connection()).expect("redis command")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        // Only this test's keys: the prefix is unique, and its glob characters are none.
        let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                      redis.call('DEL', k) n = n + 1 end return n";
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn);
    }
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

/// Reads events from `sse` until one has `version`; returns the versions seen, in order.
async fn versions_until(sse: &mut Sse, version: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let v = next_data(sse).await["version"].as_i64().expect("a version");
        seen.push(v);
        if v >= version {
            return seen;
        }
    }
    panic!("no event with version {version}: {seen:?}");
}

/// A second node on the same Redis and prefix as `keys`.
async fn node(keys: &Keys, extra: &[(&str, &str)]) -> TestServer {
    let key = format!("{API_KEY:?}");
    let mut o: Vec<(String, String)> = vec![
        ("inbox.enabled".into(), "true".into()),
        ("centrifugo.api_key".into(), key),
    ];
    o.extend(keys.overrides());
    o.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&o).await
}

#[tokio::test]
async fn a_notify_on_one_node_reaches_a_device_on_another_with_its_counts() {
    let a = start_on(Store::Redis, &[]).await;
    let keys = a.keys.as_ref().expect("redis keys");
    let b = node(keys, &[]).await;
    // Alice's phone on node B (SSE), her laptop on node A (WebSocket).
    let mut phone = Sse::get(&sse_url_at(&b.url, "alice")).await;
    assert_eq!(phone.status, 200);
    let mut laptop = wsclient::connected(&a, "alice").await;
    let r = wsclient::call(
        &mut laptop,
        2,
        json!({"subscribe": {"channel": "inbox:#alice"}}),
    )
    .await;
    assert!(r.get("error").is_none(), "{r}");
    wait_subscriptions(&b, 1).await;
    wait_subscriptions(&a, 1).await;

    let id = notify(
        &a.url,
        &["alice"],
        "Hello from A",
        json!({"category": "news"}),
    )
    .await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    let ev = next_data(&mut phone).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["item"]["title"].as_str(),
            ev["version"].as_i64()
        ),
        (Some("created"), Some("Hello from A"), Some(1)),
        "{ev}"
    );
    assert_eq!(ev["counts"]["unread"], 1, "{ev}");
    assert_eq!(ev["counts"]["categories"]["news"]["unread"], 1, "{ev}");

    // Marked read on B: both nodes report the same counts, and both devices get the change.
    let (status, c) = browser(
        &b.url,
        "alice",
        "POST",
        &format!("/inbox/items/{id}"),
        Some(json!({"read": true})),
    )
    .await;
    assert_eq!(
        (status, c["counts"]["unread"].as_i64()),
        (200, Some(0)),
        "{c}"
    );
    assert_eq!(counts(&a.url, "alice").await, counts(&b.url, "alice").await);
    assert_eq!(counts(&a.url, "alice").await["unread"], 0);
    let ev = next_data(&mut phone).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["version"].as_i64(),
            ev["counts"]["unread"].as_i64()
        ),
        (Some("updated"), Some(2), Some(0)),
        "{ev}"
    );
    let mut laptop_versions = Vec::new();
    while laptop_versions.len() < 2 {
        let v = wsclient::next(&mut laptop).await;
        if let Some(p) = v.get("push").and_then(|p| p.get("pub")) {
            laptop_versions.push(p["data"]["version"].as_i64().unwrap());
        }
    }
    assert_eq!(laptop_versions, vec![1, 2], "each event once, in order");
    // The page read on A has what B changed, at the version of the last event.
    let (_, page) = browser(&a.url, "alice", "GET", "/inbox", None).await;
    assert_eq!(page["version"], 2);
    assert!(page["items"][0]["read_at"].is_i64(), "{page}");
    phone.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn concurrent_changes_on_two_nodes_keep_counts_equal_to_a_recount() {
    let a = start_on(Store::Redis, &[("inbox.user_rate", "100000")]).await;
    let keys = a.keys.as_ref().expect("redis keys");
    let b = node(keys, &[("inbox.user_rate", "100000")]).await;
    let urls = [a.url.clone(), b.url.clone()];
    let users = ["u0", "u1", "u2"];
    // A device of u0 on B watches every event of the storm.
    let mut watcher = Sse::get(&sse_url_at(&b.url, "u0")).await;
    assert_eq!(watcher.status, 200);
    wait_subscriptions(&b, 1).await;
    let mut ids: Vec<(String, i64)> = Vec::new();
    for u in users {
        for i in 0..4 {
            let cat = ["a", "b"][i % 2];
            let r = notify(&urls[i % 2], &[u], "seed", json!({ "category": cat })).await;
            ids.push((u.to_string(), r["delivered"][0]["id"].as_i64().unwrap()));
        }
    }
    let mut tasks = Vec::new();
    for n in 0..6usize {
        let url = urls[n % 2].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..15usize {
                let cat = if (n + i) % 2 == 0 { "a" } else { "b" };
                notify(
                    &url,
                    &users,
                    &format!("storm {n}-{i}"),
                    json!({"category": cat}),
                )
                .await;
            }
        }));
    }
    // Two togglers per user, one starting on each node, change the same items at the same time.
    for (k, chunk) in ids.chunks(4).chain(ids.chunks(4)).enumerate() {
        let urls = urls.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for round in 0..24usize {
                let url = &urls[(round + k) % 2];
                let (user, id) = &chunk[round % chunk.len()];
                let set = match (round + k) % 4 {
                    0 => json!({"read": true}),
                    1 => json!({"read": false, "seen": true}),
                    2 => json!({"archived": round % 3 == 0}),
                    _ => json!({"seen": false}),
                };
                let (status, v) =
                    browser(url, user, "POST", &format!("/inbox/items/{id}"), Some(set)).await;
                assert_eq!(status, 200, "{v}");
                if round % 8 == 7 {
                    let (status, v) = browser(
                        url,
                        user,
                        "POST",
                        "/inbox/update",
                        Some(json!({"upto": i64::MAX, "set": {"read": true}})),
                    )
                    .await;
                    assert_eq!(status, 200, "{v}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for u in users {
        let items = all_items(&a.url, u).await;
        assert_eq!(items.len(), 4 + 6 * 15, "{u}");
        let expected = recount(&items);
        assert_eq!(counts(&a.url, u).await, expected, "{u} on A");
        assert_eq!(counts(&b.url, u).await, expected, "{u} on B");
    }
    for url in &urls {
        let (_, st) = backend(url, "stats", json!({})).await;
        assert_eq!(st["result"]["count_mismatches"], 0, "{st}");
    }
    // Every change of u0 reached the device once, in version order, whichever node made it.
    let (_, c) = backend(&a.url, "counts", json!({"user": "u0"})).await;
    let version = c["result"]["version"].as_i64().unwrap();
    let seen = versions_until(&mut watcher, version).await;
    assert_eq!(seen, (1..=version).collect::<Vec<_>>());
}

#[tokio::test]
async fn start_up_recount_repairs_damaged_counts_on_redis() {
    let s = start_on(Store::Redis, &[]).await;
    notify(&s.url, &["fay"], "one", json!({"category": "a"})).await;
    notify(&s.url, &["fay"], "two", json!({"category": "b"})).await;
    let before = counts(&s.url, "fay").await;
    let crate::inbox::Started { server, keys, .. } = s;
    let keys = keys.expect("redis keys");
    let mut server = server;
    server.stop().await;
    // Damage the counts behind Herald's back: one wrong, one missing, one for items that do not exist.
    let p = format!("{}:inbox", keys.prefix);
    keys.cmd(&["HSET", &format!("{p}:n:fay"), "r:a", "99"]);
    keys.cmd(&["HDEL", &format!("{p}:n:fay"), "t:b", "r:b", "s:b", "a:b"]);
    keys.cmd(&[
        "HSET",
        &format!("{p}:n:ghost"),
        "t:x",
        "5",
        "r:x",
        "5",
        "s:x",
        "5",
        "a:x",
        "0",
    ]);
    let mut o: Vec<(String, String)> = vec![
        ("inbox.enabled".into(), "true".into()),
        ("centrifugo.api_key".into(), format!("{API_KEY:?}")),
    ];
    o.extend(keys.overrides());
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let s = server.restart(&o).await;
    assert_eq!(
        counts(&s.url, "fay").await,
        before,
        "recounted from the items at start-up"
    );
    assert_eq!(counts(&s.url, "ghost").await["total"], 0);
    let (_, st) = backend(&s.url, "stats", json!({})).await;
    assert_eq!(st["result"]["count_mismatches"], 0, "{st}");
    assert_eq!(st["result"]["items"], 2, "{st}");
    // On Redis the check ends before the node serves.
    assert_eq!(st["result"]["startup_check"]["finished"], true, "{st}");
    assert_eq!(st["result"]["startup_check"]["repaired"], 3, "{st}");
    drop(s);
    drop(keys);
}

/// The real binary on the Redis engine under `keys`: (child, url, its stderr log file).
async fn spawn_node(
    keys: &Keys,
    dir: &std::path::Path,
) -> (tokio::process::Child, String, std::path::PathBuf) {
    let mut cmd = crate::process::command(dir);
    let log = dir.join(format!("stderr-{}.log", uuid::Uuid::new_v4().simple()));
    cmd.stderr(Stdio::from(std::fs::File::create(&log).expect("log file")));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("HERALD_INBOX__ENABLED", "true")
        .env("HERALD_CENTRIFUGO__API_KEY", API_KEY)
        .env("HERALD_JWT_KEY", KEY);
    for (k, v) in keys.overrides() {
        cmd.args(["--set", &format!("{k}={v}")]);
    }
    let mut child = cmd.spawn().expect("spawn herald");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("listening on ") {
                return Some(url.trim().to_string());
            }
        }
        None
    })
    .await
    .expect("herald listening in time");
    let Some(url) = url else {
        panic!(
            "herald exited before listening: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, log)
}

async fn list_all(url: &str, user: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<i64> = None;
    for _ in 0..1000 {
        let mut q = json!({"user": user, "archived": "all", "limit": 200});
        if let Some(c) = cursor {
            q["cursor"] = json!(c);
        }
        let (status, v) = backend(url, "list", q).await;
        assert_eq!(status, 200, "{v}");
        items.extend(v["result"]["items"].as_array().unwrap().iter().cloned());
        match v["result"]["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return items,
        }
    }
    panic!("too many pages");
}

#[tokio::test]
async fn sigkill_of_a_node_mid_storm_loses_no_acknowledged_notification() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut a, a_url, a_log) = spawn_node(&keys, dir.path()).await;
    let (_b, b_url, _) = spawn_node(&keys, dir.path()).await;
    // A Redis that keeps nothing on disk (the shared test Redis runs so) is reported at start-up.
    let setting = |name: &str| match keys.cmd(&["CONFIG", "GET", name]) {
        redis::Value::Array(v) => v
            .get(1)
            .and_then(|x| match x {
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                _ => None,
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    let volatile = setting("appendonly") == "no" && setting("save").trim().is_empty();
    let log = std::fs::read_to_string(&a_log).unwrap_or_default();
    assert_eq!(log.contains("keeps nothing on disk"), volatile, "{log}");
    // Concurrent notifies through node A, each with its own idempotency key.
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for n in 0..6 {
        let url = a_url.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..100_000 {
                let key = format!("k-{n}-{i}");
                let resp = client
                    .post(format!("{url}/api/inbox_notify"))
                    .header("x-api-key", API_KEY)
                    .json(&json!({"users": ["p", "q"], "item": {"title": key, "category": if i % 2 == 0 {"x"} else {"y"}}, "idempotency_key": key}))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => acked.lock().push(key),
                    Ok(r) => panic!("notify refused: {} {:?}", r.status(), r.text().await),
                    Err(_) => return, // killed
                }
            }
        }));
    }
    let deadline = Instant::now() + WAIT * 3;
    while acked.lock().len() < 150 {
        assert!(
            Instant::now() < deadline && !tasks.iter().all(|t| t.is_finished()),
            "the notify storm stopped early: {} acknowledged",
            acked.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<String> = acked.lock().clone();
    // Node B, still up, has every acknowledged notification; then A comes back on the same Redis.
    let (_a2, a2_url, _) = spawn_node(&keys, dir.path()).await;
    for url in [&b_url, &a2_url] {
        for user in ["p", "q"] {
            let items = list_all(url, user).await;
            let titles: HashSet<&str> =
                items.iter().map(|i| i["title"].as_str().unwrap()).collect();
            assert_eq!(titles.len(), items.len(), "no duplicate");
            for k in &acked {
                assert!(
                    titles.contains(k.as_str()),
                    "acknowledged {k} lost for {user}"
                );
            }
            let (_, c) = backend(url, "counts", json!({"user": user})).await;
            assert_eq!(c["result"]["counts"], recount(&items), "{user}");
        }
    }
    // Every committed change has its event in the log, once and in order: the outbox drains (the lease
    // of the killed node expires and a live node takes it over).
    until(WAIT * 2, "the outbox drained", || async {
        let (_, st) = backend(&b_url, "stats", json!({})).await;
        st["result"]["pending_events"] == 0 && st["result"]["count_mismatches"] == 0
    })
    .await;
    let mut sse = Sse::get(&subscribe_url(
        &b_url,
        &["inbox:#p"],
        &[
            ("authorization", &user_token("p")),
            ("lastEventID", "earliest"),
        ],
    ))
    .await;
    let (_, v) = backend(&b_url, "counts", json!({"user": "p"})).await;
    let version = v["result"]["version"].as_i64().unwrap();
    let versions = versions_until(&mut sse, version).await;
    assert_eq!(
        versions,
        (1..=version).collect::<Vec<_>>(),
        "one event per change, in order, none twice"
    );
    sse.assert_quiet(Duration::from_millis(300)).await;
}

/// The exactly-once hand-over of the outbox: an event that a holder published but did not acknowledge
/// (it died in between) is in the outbox again when the lease expires; the node that takes the lease over
/// finds its id in the log and does not publish it a second time.
#[tokio::test]
async fn a_taken_over_outbox_does_not_publish_an_event_twice() {
    let s = start_on(Store::Redis, &[]).await;
    let keys = s.keys.as_ref().expect("redis keys");
    let mut sse = Sse::get(&sse_url_at(&s.url, "alice")).await;
    assert_eq!(sse.status, 200);
    notify(&s.url, &["alice"], "one", json!({})).await;
    let first = sse.next_event().await.expect("an event");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(data["version"], 1);
    let event_id = first.id.expect("events have ids");
    // As after a holder's crash between publishing and acknowledging: the lease is gone and the event is
    // back in the outbox.
    let p = format!("{}:inbox", keys.prefix);
    let script = "redis.call('DEL', ARGV[1] .. ':drain') \
                  local n = redis.call('INCR', ARGV[1] .. ':oseq') \
                  redis.call('XADD', ARGV[1] .. ':outbox', string.format('%d', n) .. '-0', \
                  'u', 'alice', 'i', ARGV[2], 'p', ARGV[3]) return n";
    keys.cmd(&["EVAL", script, "0", &p, &event_id, &first.data]);
    notify(&s.url, &["alice"], "two", json!({})).await;
    let next = next_data(&mut sse).await;
    assert_eq!(
        (next["version"].as_i64(), next["item"]["title"].as_str()),
        (Some(2), Some("two")),
        "the re-queued event was not published again: {next}"
    );
    until(WAIT, "the outbox drained", || async {
        let (_, st) = backend(&s.url, "stats", json!({})).await;
        st["result"]["pending_events"] == 0
    })
    .await;
    sse.assert_quiet(Duration::from_millis(300)).await;
}
