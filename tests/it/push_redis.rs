//! Web Push on a cluster on the Redis engine: two Herald nodes on one Redis (a prefix of each test's own,
//! removed at the end) and the mock push service of `push.rs`. A browser that subscribed through one node
//! is pushed for a notify on the other, signed with the one key every node publishes; what the push
//! service says on one node (gone) and the per-user rules (cap, move) are seen from the other; and a node
//! whose key file is not the cluster's key refuses to start.

use std::time::Duration;

use p256::pkcs8::EncodePrivateKey;
use tokio::time::Instant;

use crate::common::*;
use crate::inbox_redis::Keys;
use crate::process::{self, Herald};
use crate::push::{
    browser, notify, notify_at, push_args, subscribe, subscribe_at, user_token, vapid_claims,
    wait_until, Device, PushService, PUSH_ON,
};
use crate::wsclient::API_KEY;

fn redis_url() -> String {
    std::env::var("HERALD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A node with push on, on the Redis engine under `keys`'s prefix, with a fresh data directory.
async fn node(keys: &Keys, extra: &[(&str, &str)]) -> TestServer {
    let key = format!("{API_KEY:?}");
    let mut o: Vec<(String, String)> = vec![("centrifugo.api_key".into(), key)];
    o.extend(PUSH_ON.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    o.extend(keys.overrides());
    o.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&o).await
}

async fn vapid_at(url: &str) -> String {
    let (status, v) = get_json(reqwest::Client::new().get(format!("{url}/inbox/push/vapid"))).await;
    assert_eq!(status, 200, "{v}");
    v["public_key"].as_str().expect("a public key").to_string()
}

async fn endpoints(s: &TestServer, user: &str) -> Vec<String> {
    let (status, list) = browser(s, user, "GET", None).await;
    assert_eq!(status, 200, "{list}");
    list["subscriptions"]
        .as_array()
        .expect("subscriptions")
        .iter()
        .map(|s| s["endpoint"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_browser_subscribed_through_one_node_is_pushed_by_the_other() {
    let mut ps = PushService::start(vec![(201, None)]).await;
    let keys = Keys::new();
    let a = node(&keys, &[]).await;
    let b = node(&keys, &[]).await;

    // Fresh data directories, one key: B took A's from Redis and keeps it in its own file.
    let key = vapid_at(&a.url).await;
    assert_eq!(vapid_at(&b.url).await, key);
    let pem = |s: &TestServer| std::fs::read_to_string(s.dir.join("vapid.pem")).expect("key file");
    assert_eq!(pem(&a), pem(&b));

    let phone = Device::new(21);
    subscribe(&a, "alice", &phone, &format!("{}/push/phone", ps.url)).await;
    notify(&b, &["alice"], "from B").await;
    let seen = ps.next().await;
    assert_eq!(seen.device, "phone");
    assert_eq!(phone.open(&seen.body)["title"], "from B");
    let claims = vapid_claims(&seen.headers, &key, &ps.url);
    assert_eq!(claims["sub"], "mailto:ops@example.com");

    // The push service says the subscription is gone to node B; node A no longer lists it.
    ps.script(vec![(410, None)]).await;
    notify(&b, &["alice"], "gone").await;
    let seen = ps.next().await;
    assert_eq!(phone.open(&seen.body)["title"], "gone");
    let deadline = Instant::now() + WAIT;
    loop {
        let left = endpoints(&a, "alice").await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a 410 seen by node B removes the subscription for node A: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_cap_and_a_move_to_another_user_hold_across_nodes() {
    let mut ps = PushService::start(vec![(201, None)]).await;
    let keys = Keys::new();
    let cap = [("inbox.push.max_subscriptions", "2")];
    let a = node(&keys, &cap).await;
    let b = node(&keys, &cap).await;
    let d = Device::new(31);
    let ep = |i: u32| format!("{}/push/{i}", ps.url);

    subscribe(&a, "alice", &d, &ep(1)).await;
    subscribe(&b, "alice", &d, &ep(2)).await;
    subscribe(&a, "alice", &d, &ep(3)).await;
    assert_eq!(
        endpoints(&b, "alice").await,
        [ep(2), ep(3)],
        "the oldest went, whichever node took it"
    );

    // Bob signs in on the browser of endpoint 2: it is his now, on both nodes.
    subscribe(&b, "bob", &d, &ep(2)).await;
    assert_eq!(endpoints(&a, "alice").await, [ep(3)]);
    assert_eq!(endpoints(&a, "bob").await, [ep(2)]);
    let (status, _) = browser(
        &a,
        "alice",
        "DELETE",
        Some(serde_json::json!({"endpoint": ep(2)})),
    )
    .await;
    assert_eq!(status, 404, "alice cannot remove bob's subscription");

    // Pushes follow: alice's to 3, then bob's to 2 (one worker per node, both sent by A, in order).
    notify(&a, &["alice"], "for alice").await;
    let seen = ps.next().await;
    assert_eq!(seen.device, "3");
    assert_eq!(d.open(&seen.body)["title"], "for alice");
    notify(&a, &["bob"], "for bob").await;
    let seen = ps.next().await;
    assert_eq!(seen.device, "2");
    assert_eq!(d.open(&seen.body)["title"], "for bob");
}

#[tokio::test]
async fn a_node_with_another_key_file_than_the_cluster_refuses_to_start() {
    let keys = Keys::new();
    let a = node(&keys, &[]).await;
    let cluster = vapid_at(&a.url).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("old-vapid.pem");
    let other = p256::SecretKey::from_slice(&[42u8; 32]).expect("a key");
    let pem = other
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .expect("pem");
    std::fs::write(&file, pem.as_bytes()).expect("write the key file");
    let sets = [
        "engine.kind=redis".to_string(),
        format!("engine.url={:?}", redis_url()),
        format!("engine.prefix={:?}", keys.prefix),
        "inbox.enabled=true".into(),
        "inbox.push.enabled=true".into(),
        "inbox.push.subject=\"mailto:ops@example.com\"".into(),
        format!("inbox.push.vapid_key={:?}", file.display().to_string()),
    ];
    let mut args: Vec<&str> = vec!["--listen", "127.0.0.1:0"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let envs = [("HERALD_CENTRIFUGO__API_KEY", API_KEY)];

    let (status, stderr) = process::refused(&args, &envs).await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:inbox:push:vapid", keys.prefix)),
        "names the key in Redis: {stderr}"
    );
    assert!(stderr.contains("another VAPID key"), "{stderr}");
    assert!(stderr.contains("Remove"), "says what to do: {stderr}");
    assert_eq!(vapid_at(&a.url).await, cluster, "the cluster's key stays");

    // Doing what it says: without the file the node starts with the cluster's key and keeps it.
    std::fs::remove_file(&file).expect("remove the key file");
    let h = Herald::start(&args, &envs).await;
    assert_eq!(vapid_at(&h.url).await, cluster);
    let kept = std::fs::read_to_string(&file).expect("the node wrote the cluster's key");
    assert_eq!(
        kept,
        std::fs::read_to_string(a.dir.join("vapid.pem")).unwrap()
    );
}

/// Two node processes on one Redis: alice reads her inbox on node B, so a notify through node A pushes
/// nothing, whichever node records or sends the push (each node has its own metrics, so both are
/// summed); once her connection is gone, the next notify through A pushes.
#[tokio::test]
async fn a_user_reading_on_another_node_is_not_pushed() {
    let mut ps = PushService::start(vec![(201, None)]).await;
    let keys = Keys::new();
    let cluster: Vec<(String, String)> = keys.overrides();
    let cluster: Vec<(&str, &str)> = cluster
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let args = push_args(&cluster);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Herald::start(&args, &[]).await;
    let b = Herald::start(&args, &[]).await;
    let both = |name: &'static str| {
        let (a, b) = (&a, &b);
        async move { a.metric(name).await + b.metric(name).await }
    };

    let phone = Device::new(51);
    subscribe_at(&a.url, "alice", &phone, &format!("{}/push/phone", ps.url)).await;
    let url = subscribe_url(
        &b.url,
        &["inbox:#alice"],
        &[("authorization", user_token("alice").as_str())],
    );
    let mut sse = Sse::get(&url).await;
    assert_eq!(sse.status, 200);
    // B's mark that alice reads there, in the engine's presence in Redis.
    let mark = format!("{}:pz:$subscribers:inbox:#alice", keys.prefix);
    let marks = || {
        let v = keys.cmd(&["ZCARD", &mark]);
        async move { v }
    };
    wait_until("B marks alice as reading", marks, |v| {
        *v == redis::Value::Int(1)
    })
    .await;

    notify_at(&a.url, &["alice"], "while reading on B").await;
    let ev = sse.next_event().await.expect("alice reads it live on B");
    assert!(ev.data.contains("while reading on B"), "{}", ev.data);
    wait_until(
        "the push is skipped as connected",
        || both("herald_inbox_push_skipped_total"),
        |n| *n >= 1.0,
    )
    .await;
    assert_eq!(both("herald_inbox_push_sent_total").await, 0.0);
    assert!(ps.rx.try_recv().is_err(), "no push to a user reading on B");

    drop(sse);
    wait_until("B's mark is gone", marks, |v| *v == redis::Value::Int(0)).await;
    notify_at(&a.url, &["alice"], "after leaving").await;
    let seen = ps.next().await;
    assert_eq!(seen.device, "phone");
    assert_eq!(phone.open(&seen.body)["title"], "after leaving");
    wait_until(
        "the push is counted sent",
        || both("herald_inbox_push_sent_total"),
        |n| *n == 1.0,
    )
    .await;
    assert_eq!(both("herald_inbox_push_skipped_total").await, 1.0);
}
