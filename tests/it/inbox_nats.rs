//! The inbox on the NATS engine across nodes: one inbox seen from two nodes (an event with its counts
//! reaches a device on the other node), and two real `herald` processes on one NATS, the outbox drainer's
//! node killed with SIGKILL in the middle of a notify storm, the other taking over with nothing
//! acknowledged lost and no event published twice.
//!
//! These tests use the NATS at 127.0.0.1:4222 (`HERALD_TEST_NATS` to point elsewhere), each under an
//! engine prefix of its own whose streams and buckets [`Streams`] deletes at the end. (The behaviour
//! tests of `inbox.rs` run on this store too: see `on_both_stores!` there.)

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::common::*;
use crate::inbox::{
    backend, browser, counts, next_data, notify, recount, sse_url_at, start_on, user_token, Store,
};
use crate::wsclient::{self, API_KEY};

fn nats_url() -> String {
    std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// An engine prefix of a test's own; the streams and buckets named from it are deleted when dropped.
pub(crate) struct Streams {
    pub prefix: String,
}

impl Streams {
    pub(crate) fn new() -> Streams {
        Streams {
            prefix: format!("itin{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        }
    }

    /// The config of a node on the NATS engine under this prefix.
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        vec![
            ("engine.kind".into(), "\"nats\"".into()),
            ("engine.url".into(), format!("{:?}", nats_url())),
            ("engine.prefix".into(), format!("{:?}", self.prefix)),
        ]
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        // Drop may run inside the test's runtime: the clean-up gets a thread and a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(nats_url()))
                        .await
                else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                let mut names = js.stream_names();
                let mut ours = Vec::new();
                let kv = format!("KV_{prefix}");
                for _ in 0..100_000 {
                    use futures_util::StreamExt;
                    match tokio::time::timeout(Duration::from_secs(5), names.next()).await {
                        Ok(Some(Ok(n))) => {
                            if n.starts_with(&prefix) || n.starts_with(&kv) {
                                ours.push(n);
                            }
                        }
                        _ => break,
                    }
                }
                for n in ours {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), js.delete_stream(&n)).await;
                }
            });
        })
        .join();
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

/// A second node on the same NATS and prefix as `streams`.
async fn node(streams: &Streams) -> TestServer {
    let mut o: Vec<(String, String)> = vec![
        ("inbox.enabled".into(), "true".into()),
        ("centrifugo.api_key".into(), format!("{API_KEY:?}")),
    ];
    o.extend(streams.overrides());
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&o).await
}

#[tokio::test]
async fn a_change_on_one_node_reaches_a_device_on_another_with_exact_counts() {
    let a = start_on(Store::Nats, &[]).await;
    let streams = a.nats.as_ref().expect("nats streams");
    let b = node(streams).await;
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

    let r = notify(
        &a.url,
        &["alice", "bob"],
        "Hello from A",
        json!({"category": "news"}),
    )
    .await;
    let id = r["delivered"][0]["id"].as_i64().unwrap();
    let ev = next_data(&mut phone).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["item"]["title"].as_str(),
            ev["item"]["id"].as_i64(),
            ev["version"].as_i64()
        ),
        (Some("created"), Some("Hello from A"), Some(id), Some(1)),
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
    assert_eq!(counts(&b.url, "bob").await["unread"], 1, "bob's is his own");
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
    for _ in 0..100 {
        if laptop_versions.len() == 2 {
            break;
        }
        let v = wsclient::next(&mut laptop).await;
        if let Some(p) = v.get("push").and_then(|p| p.get("pub")) {
            laptop_versions.push(p["data"]["version"].as_i64().unwrap());
        }
    }
    assert_eq!(laptop_versions, vec![1, 2], "each event once, in order");
    // The page read on A has what B changed, at the version of the last event, with its content.
    let (_, page) = browser(&a.url, "alice", "GET", "/inbox", None).await;
    assert_eq!(page["version"], 2);
    assert_eq!(page["items"][0]["title"], "Hello from A", "{page}");
    assert!(page["items"][0]["read_at"].is_i64(), "{page}");
    phone.assert_quiet(Duration::from_millis(300)).await;
    drop(b);
}

/// The real binary on the NATS engine under `streams`: (child, url).
async fn spawn_node(streams: &Streams, dir: &std::path::Path) -> (tokio::process::Child, String) {
    let mut cmd = crate::process::command(dir);
    let log = dir.join(format!("stderr-{}.log", uuid::Uuid::new_v4().simple()));
    cmd.stderr(Stdio::from(std::fs::File::create(&log).expect("log file")));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("HERALD_INBOX__ENABLED", "true")
        .env("HERALD_CENTRIFUGO__API_KEY", API_KEY)
        .env("HERALD_JWT_KEY", KEY);
    for (k, v) in streams.overrides() {
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
    (child, url)
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

/// Two nodes; the first to start takes the outbox lease and drains for both. It is killed with SIGKILL
/// in the middle of a notify storm sent through it: the other node takes the lease over once it expires,
/// publishes what was committed and not yet published, and nothing acknowledged is lost or doubled.
#[tokio::test]
async fn sigkill_of_the_drainer_mid_notify_loses_nothing_acknowledged() {
    let streams = Streams::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut a, a_url) = spawn_node(&streams, dir.path()).await;
    // A drains: its first notify is published before B exists.
    notify(&a_url, &["p"], "first", json!({})).await;
    let (_b, b_url) = spawn_node(&streams, dir.path()).await;
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
    assert!(acked.len() >= 150);
    // Node B has every acknowledged notification, once, with exact counts.
    for user in ["p", "q"] {
        let items = list_all(&b_url, user).await;
        let titles: HashSet<&str> = items.iter().map(|i| i["title"].as_str().unwrap()).collect();
        assert_eq!(titles.len(), items.len(), "no duplicate");
        for k in &acked {
            assert!(
                titles.contains(k.as_str()),
                "acknowledged {k} lost for {user}"
            );
        }
        let (_, c) = backend(&b_url, "counts", json!({"user": user})).await;
        assert_eq!(c["result"]["counts"], recount(&items), "{user}");
    }
    // B takes the lease over (A's expires) and drains what A left: no event is left waiting.
    until(
        WAIT * 2,
        "the outbox drained by the surviving node",
        || async {
            let (_, st) = backend(&b_url, "stats", json!({})).await;
            st["result"]["pending_events"] == 0 && st["result"]["count_mismatches"] == 0
        },
    )
    .await;
    // Every committed change has its event in the log, once and in version order.
    for user in ["p", "q"] {
        let mut sse = Sse::get(&subscribe_url(
            &b_url,
            &[&format!("inbox:#{user}")],
            &[
                ("authorization", &user_token(user)),
                ("lastEventID", "earliest"),
            ],
        ))
        .await;
        let (_, v) = backend(&b_url, "counts", json!({"user": user})).await;
        let version = v["result"]["version"].as_i64().unwrap();
        let versions = versions_until(&mut sse, version).await;
        assert_eq!(
            versions,
            (1..=version).collect::<Vec<_>>(),
            "one event per change of {user}, in order, none twice"
        );
        sse.assert_quiet(Duration::from_millis(300)).await;
    }
    // A new notify through B is published by B, now the drainer.
    let mut sse = Sse::get(&sse_url_at(&b_url, "p")).await;
    notify(&b_url, &["p"], "after the takeover", json!({})).await;
    assert_eq!(
        next_data(&mut sse).await["item"]["title"],
        "after the takeover"
    );
}
