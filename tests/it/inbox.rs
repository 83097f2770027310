//! The notification centre: its APIs against a real server, live events over SSE and WebSocket, counts that
//! stay equal to a recount under concurrent changes, and a real `herald` killed with SIGKILL mid-batch.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::wsclient::{self, call, next, API_KEY};

pub(crate) const CHANNEL_ALICE: &str = "inbox:#alice";

async fn start(extra: &[(&str, &str)]) -> TestServer {
    start_on(Store::Sqlite, extra).await.server
}

/// Where a test's inboxes are kept: the tests of behaviour run on both stores.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    Sqlite,
    /// The Redis engine on the shared test Redis, under a prefix of the test's own (removed at the end).
    Redis,
    /// The NATS engine on the shared test NATS, under a prefix of the test's own (its streams and buckets
    /// removed at the end).
    Nats,
}

/// A server with the inbox on `store`; its Redis keys or NATS streams (if any) are removed when it is
/// dropped (after the server: fields drop in order).
pub(crate) struct Started {
    pub server: TestServer,
    pub keys: Option<crate::inbox_redis::Keys>,
    pub nats: Option<crate::inbox_nats::Streams>,
}

impl std::ops::Deref for Started {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.server
    }
}

pub(crate) async fn start_on(store: Store, extra: &[(&str, &str)]) -> Started {
    let key = format!("{API_KEY:?}");
    let mut o: Vec<(String, String)> = vec![
        ("inbox.enabled".into(), "true".into()),
        ("centrifugo.api_key".into(), key),
    ];
    let (mut keys, mut nats) = (None, None);
    match store {
        Store::Sqlite => {}
        Store::Redis => {
            let k = crate::inbox_redis::Keys::new();
            o.extend(k.overrides());
            keys = Some(k);
        }
        Store::Nats => {
            let n = crate::inbox_nats::Streams::new();
            o.extend(n.overrides());
            nats = Some(n);
        }
    }
    o.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Started {
        server: TestServer::start(&o).await,
        keys,
        nats,
    }
}

/// Runs each named `async fn name(store: Store)` as three tests, `name::sqlite`, `name::redis` and
/// `name::nats`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name(super::Store::Sqlite).await
                }
                #[tokio::test]
                async fn redis() {
                    super::$name(super::Store::Redis).await
                }
                #[tokio::test]
                async fn nats() {
                    super::$name(super::Store::Nats).await
                }
            }
        )*
    };
}

on_both_stores!(
    notify_list_change_and_counts,
    every_change_is_an_event_for_the_owner_only,
    a_page_then_a_subscription_from_its_position_misses_nothing,
    concurrent_toggles_during_a_notify_storm_keep_counts_exact,
    snoozed_items_wake_and_expired_items_go_as_events,
    an_audience_of_every_inbox_and_its_retry,
    the_cap_removes_the_oldest_and_large_changes_are_bulk_events,
    items_older_than_max_age_are_removed_with_an_event,
);

async fn items_older_than_max_age_are_removed_with_an_event(store: Store) {
    let s = start_on(store, &[("inbox.max_age", "\"1s\"")]).await;
    let mut sse = Sse::get(&sse_url(&s, "hal", None)).await;
    assert_eq!(sse.status, 200);
    let before = herald::inbox::now_ms();
    let id = notify(&s.url, &["hal"], "old soon", json!({})).await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(next_data(&mut sse).await["type"], "created");
    let removed = next_data(&mut sse).await;
    assert_eq!(
        (
            removed["type"].as_str(),
            removed["ids"].clone(),
            removed["counts"]["total"].as_i64()
        ),
        (Some("removed"), json!([id]), Some(0)),
        "{removed}"
    );
    assert!(
        herald::inbox::now_ms() > before + 1000,
        "not before max_age"
    );
    assert_eq!(counts(&s.url, "hal").await["total"], 0);
}

/// `max_items` removes the oldest item in the change that adds one (the `created` event says which), and a
/// change of more than 200 items is one `bulk` event with the new counts.
async fn the_cap_removes_the_oldest_and_large_changes_are_bulk_events(store: Store) {
    let s = start_on(store, &[("inbox.max_items", "210")]).await;
    let mut sse = Sse::get(&sse_url(&s, "gil", None)).await;
    assert_eq!(sse.status, 200);
    let mut ids = Vec::new();
    for i in 0..211 {
        let cat = if i % 3 == 0 { "a" } else { "b" };
        let r = notify(
            &s.url,
            &["gil"],
            &format!("n{i}"),
            json!({ "category": cat }),
        )
        .await;
        ids.push(r["delivered"][0]["id"].as_i64().unwrap());
    }
    let mut last = Value::Null;
    for _ in 0..211 {
        last = next_data(&mut sse).await;
    }
    assert_eq!(last["type"], "created", "{last}");
    assert_eq!(last["removed"], json!([ids[0]]), "the oldest went: {last}");
    assert_eq!(last["counts"]["total"], 210, "{last}");
    let (status, _) = browser(
        &s.url,
        "gil",
        "GET",
        &format!("/inbox/items/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // Mark all read up to the newest: 210 items change, more than an event lists.
    let (status, c) = browser(
        &s.url,
        "gil",
        "POST",
        "/inbox/update",
        Some(json!({"upto": ids[210], "set": {"read": true}})),
    )
    .await;
    assert_eq!((status, c["changed"].as_i64()), (200, Some(210)), "{c}");
    let ev = next_data(&mut sse).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["changed"].as_i64(),
            ev["counts"]["unread"].as_i64()
        ),
        (Some("bulk"), Some(210), Some(0)),
        "{ev}"
    );
    assert_eq!(ev["version"], 212);
    assert_eq!(ev["counts"], counts(&s.url, "gil").await);
    assert_eq!(
        recount(&all_items(&s.url, "gil").await),
        counts(&s.url, "gil").await
    );
    // Removing them all is one bulk event too, and the counts go to nothing.
    let (status, c) = browser(
        &s.url,
        "gil",
        "POST",
        "/inbox/remove",
        Some(json!({"upto": ids[210]})),
    )
    .await;
    assert_eq!((status, c["changed"].as_i64()), (200, Some(210)), "{c}");
    let ev = next_data(&mut sse).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["removed"].as_i64(),
            ev["counts"]["total"].as_i64()
        ),
        (Some("bulk"), Some(210), Some(0)),
        "{ev}"
    );
    assert_eq!(ev["counts"]["categories"], json!({}), "{ev}");
}

pub(crate) fn user_token(sub: &str) -> String {
    wsclient::sign_json(&json!({"sub": sub, "exp": herald::auth::unix_now() + 600}))
}

/// A backend call: (status, body).
pub(crate) async fn backend(url: &str, method: &str, body: Value) -> (u16, Value) {
    get_json(
        reqwest::Client::new()
            .post(format!("{url}/api/inbox_{method}"))
            .header("x-api-key", API_KEY)
            .json(&body),
    )
    .await
}

pub(crate) async fn notify(url: &str, users: &[&str], title: &str, extra: Value) -> Value {
    let mut item = json!({"title": title});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            item[k] = v;
        }
    }
    let (status, v) = backend(url, "notify", json!({"users": users, "item": item})).await;
    assert_eq!(status, 200, "{v}");
    v["result"].clone()
}

/// A browser call with `user`'s token.
pub(crate) async fn browser(
    url: &str,
    user: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let req = match method {
        "GET" => c.get(format!("{url}{path}")),
        "POST" => c.post(format!("{url}{path}")),
        "PUT" => c.put(format!("{url}{path}")),
        "DELETE" => c.delete(format!("{url}{path}")),
        m => panic!("method {m}"),
    };
    let req = req.bearer_auth(user_token(user));
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    get_json(req).await
}

/// Every item of `user`'s inbox (all states), paged through the browser API.
pub(crate) async fn all_items(url: &str, user: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let path = match cursor {
            Some(c) => format!("/inbox?archived=all&snoozed=true&limit=200&cursor={c}"),
            None => "/inbox?archived=all&snoozed=true&limit=200".to_string(),
        };
        let (status, page) = browser(url, user, "GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

/// The counts a client computes from the items themselves.
pub(crate) fn recount(items: &[Value]) -> Value {
    let mut cats: BTreeMap<String, [i64; 4]> = BTreeMap::new();
    for i in items {
        let active = i["archived_at"].is_null() && i["snoozed_until"].is_null();
        let c = cats
            .entry(i["category"].as_str().unwrap().to_string())
            .or_default();
        c[0] += 1;
        c[1] += i64::from(active && i["read_at"].is_null());
        c[2] += i64::from(active && i["seen_at"].is_null());
        c[3] += i64::from(!i["archived_at"].is_null());
    }
    let mut all = [0i64; 4];
    let mut categories = serde_json::Map::new();
    for (k, c) in &cats {
        for n in 0..4 {
            all[n] += c[n];
        }
        categories.insert(
            k.clone(),
            json!({"total": c[0], "unread": c[1], "unseen": c[2], "archived": c[3]}),
        );
    }
    json!({"total": all[0], "unread": all[1], "unseen": all[2], "archived": all[3], "categories": categories})
}

pub(crate) async fn counts(url: &str, user: &str) -> Value {
    let (status, v) = browser(url, user, "GET", "/inbox/counts", None).await;
    assert_eq!(status, 200, "{v}");
    v["counts"].clone()
}

async fn notify_list_change_and_counts(store: Store) {
    let s = start_on(store, &[]).await;
    let first = notify(
        &s.url,
        &["alice", "bob"],
        "Welcome",
        json!({"category": "news"}),
    )
    .await;
    assert_eq!(first["delivered"].as_array().unwrap().len(), 2, "{first}");
    let a1 = first["delivered"][0]["id"].as_i64().unwrap();
    let b1 = first["delivered"][1]["id"].as_i64().unwrap();
    // An idempotency key makes a retry harmless.
    let body = json!({"users": ["alice"], "item": {"title": "Invoice", "category": "billing",
        "actions": [{"id": "pay", "label": "Pay"}], "data": {"amount": 12}}, "idempotency_key": "inv-1"});
    let (_, r1) = backend(&s.url, "notify", body.clone()).await;
    let (_, r2) = backend(&s.url, "notify", body).await;
    assert_eq!(r1["result"]["delivered"][0]["outcome"], "created");
    assert_eq!(r2["result"]["delivered"][0]["outcome"], "duplicate");
    assert_eq!(
        r1["result"]["delivered"][0]["id"],
        r2["result"]["delivered"][0]["id"]
    );
    let a2 = r1["result"]["delivered"][0]["id"].as_i64().unwrap();
    let a3 = notify(&s.url, &["alice"], "Newest", json!({})).await["delivered"][0]["id"]
        .as_i64()
        .unwrap();

    let (status, page) = browser(&s.url, "alice", "GET", "/inbox", None).await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![a3, a2, a1], "newest first, only alice's");
    assert_eq!(page["channel"], CHANNEL_ALICE);
    assert_eq!(page["counts"]["unread"], 3);
    assert_eq!(page["counts"]["categories"]["billing"]["unread"], 1);
    assert_eq!(page["version"], 3);
    assert!(page["position"]["epoch"].is_string(), "{page}");

    // Filters and the cursor.
    let (_, p) = browser(&s.url, "alice", "GET", "/inbox?category=billing", None).await;
    assert_eq!(p["items"].as_array().unwrap().len(), 1);
    let (_, p) = browser(&s.url, "alice", "GET", "/inbox?limit=2", None).await;
    assert_eq!(p["items"].as_array().unwrap().len(), 2);
    let cursor = p["next_cursor"].as_i64().unwrap();
    let (_, p) = browser(
        &s.url,
        "alice",
        "GET",
        &format!("/inbox?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(p["items"][0]["id"].as_i64(), Some(a1));
    assert!(p["next_cursor"].is_null());

    // Mark read; repeating it changes nothing.
    let (status, c) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a1}"),
        Some(json!({"read": true})),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(
        (c["changed"].as_i64(), c["counts"]["unread"].as_i64()),
        (Some(1), Some(2))
    );
    let (status, c) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a1}"),
        Some(json!({"read": true})),
    )
    .await;
    assert_eq!((status, c["changed"].as_i64()), (200, Some(0)));

    // Someone else's id is 404, whoever owns it, for reads and changes alike; so is an id nobody owns.
    for (user, id) in [("alice", b1), ("bob", a1), ("alice", 999_999)] {
        let (status, e) = browser(
            &s.url,
            user,
            "POST",
            &format!("/inbox/items/{id}"),
            Some(json!({"read": true})),
        )
        .await;
        assert_eq!(
            (status, e["code"].as_str()),
            (404, Some("item_not_found")),
            "{user} {id}: {e}"
        );
        let (status, _) = browser(&s.url, user, "GET", &format!("/inbox/items/{id}"), None).await;
        assert_eq!(status, 404);
        let (status, _) =
            browser(&s.url, user, "DELETE", &format!("/inbox/items/{id}"), None).await;
        assert_eq!(status, 404);
    }
    assert_eq!(
        counts(&s.url, "bob").await["unread"],
        1,
        "bob's item untouched"
    );

    // "Mark all read" up to a position leaves newer items unread.
    let (status, c) = browser(
        &s.url,
        "alice",
        "POST",
        "/inbox/update",
        Some(json!({"upto": a2, "set": {"read": true}})),
    )
    .await;
    assert_eq!((status, c["changed"].as_i64()), (200, Some(1)), "{c}");
    assert_eq!(c["counts"]["unread"], 1, "the newest stays unread");

    // An action marks read; an unknown action is refused.
    let (status, e) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a2}"),
        Some(json!({"action": "nope"})),
    )
    .await;
    assert_eq!((status, e["code"].as_str()), (400, Some("unknown_action")));
    let (status, c) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a2}"),
        Some(json!({"action": "pay"})),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    let (_, item) = browser(&s.url, "alice", "GET", &format!("/inbox/items/{a2}"), None).await;
    assert_eq!(item["action"], "pay");

    // Snooze hides an item and takes it out of unread; waking it brings it back.
    let until = herald::inbox::now_ms() + 3_600_000;
    let (_, c) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a3}"),
        Some(json!({"snoozed_until": until})),
    )
    .await;
    assert_eq!(c["counts"]["unread"], 0, "{c}");
    let (_, p) = browser(&s.url, "alice", "GET", "/inbox", None).await;
    assert!(
        !p["items"].as_array().unwrap().iter().any(|i| i["id"] == a3),
        "snoozed items are hidden"
    );
    let (_, c) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a3}"),
        Some(json!({"snoozed_until": 0})),
    )
    .await;
    assert_eq!(c["counts"]["unread"], 1);
    let (status, e) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a3}"),
        Some(json!({"snoozed_until": 1})),
    )
    .await;
    assert_eq!((status, e["code"].as_str()), (400, Some("invalid_snooze")));

    // Archive, then the archived tab.
    let (_, c) = browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{a1}"),
        Some(json!({"archived": true})),
    )
    .await;
    assert_eq!(c["counts"]["archived"], 1);
    let (_, p) = browser(&s.url, "alice", "GET", "/inbox?archived=true", None).await;
    assert_eq!(p["items"][0]["id"].as_i64(), Some(a1));

    // Remove.
    let (status, c) = browser(
        &s.url,
        "alice",
        "DELETE",
        &format!("/inbox/items/{a1}"),
        None,
    )
    .await;
    assert_eq!(
        (status, c["changed"].as_i64(), c["counts"]["total"].as_i64()),
        (200, Some(1), Some(2))
    );

    // Preferences: a muted category is not delivered.
    let prefs = json!({"categories": {"news": {"inbox": false}}});
    let (status, _) = browser(
        &s.url,
        "alice",
        "PUT",
        "/inbox/preferences",
        Some(prefs.clone()),
    )
    .await;
    assert_eq!(status, 200);
    let (_, got) = browser(&s.url, "alice", "GET", "/inbox/preferences", None).await;
    assert_eq!(got["preferences"], prefs);
    let r = notify(&s.url, &["alice"], "Muted", json!({"category": "news"})).await;
    assert_eq!(r["delivered"][0]["outcome"], "muted");

    // The backend sees the same inbox.
    let (_, c) = backend(&s.url, "counts", json!({"user": "alice"})).await;
    assert_eq!(c["result"]["counts"], counts(&s.url, "alice").await);
    let (_, l) = backend(&s.url, "list", json!({"user": "alice", "archived": "all"})).await;
    assert_eq!(l["result"]["items"].as_array().unwrap().len(), 2);
    let (_, u) = backend(
        &s.url,
        "update",
        json!({"user": "alice", "ids": [a3], "set": {"seen": true}}),
    )
    .await;
    assert_eq!(u["result"]["changed"], 1, "{u}");
    let (_, st) = backend(&s.url, "stats", json!({})).await;
    assert_eq!(st["result"]["count_mismatches"], 0, "{st}");
    assert_eq!(
        recount(&all_items(&s.url, "alice").await),
        counts(&s.url, "alice").await
    );
}

#[tokio::test]
async fn bad_input_and_refusals() {
    let s = start(&[("inbox.max_ids", "3")]).await;
    let long = "x".repeat(513);
    for (item, code) in [
        (json!({"title": long}), "field_too_long"),
        (json!({"title": ""}), "missing_title"),
        (
            json!({"title": "t", "category": "c".repeat(65)}),
            "field_too_long",
        ),
        (
            json!({"title": "t", "data": {"big": "x".repeat(5000)}}),
            "field_too_long",
        ),
        (
            json!({"title": "t", "actions": [{"id": "a", "label": "A"}, {"id": "a", "label": "B"}]}),
            "invalid_action",
        ),
    ] {
        let (status, e) = backend(&s.url, "notify", json!({"users": ["u"], "item": item})).await;
        assert_eq!((status, e["code"].as_str()), (400, Some(code)), "{e}");
    }
    let (status, e) = backend(
        &s.url,
        "notify",
        json!({"users": ["a,b"], "item": {"title": "t"}}),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_user")),
        "a comma would name a second reader"
    );
    let (status, e) = backend(
        &s.url,
        "notify",
        json!({"users": ["u"], "item": {"title": "t", "colour": 1}}),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_json")),
        "{e}"
    );
    let (status, e) = backend(
        &s.url,
        "update",
        json!({"user": "u", "ids": [1, 2, 3, 4], "set": {"read": true}}),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("too_many_ids")),
        "{e}"
    );
    let (status, e) = backend(
        &s.url,
        "update",
        json!({"user": "u", "ids": [1], "upto": 3, "set": {"read": true}}),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_target")),
        "{e}"
    );
    let (status, e) = backend(&s.url, "update", json!({"user": "u", "ids": [1]})).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("empty_change")),
        "{e}"
    );
    // Nobody publishes into an inbox channel but the inbox: not a Mercure publisher with a `*` grant, not the
    // server API.
    let resp = s
        .publish_raw(
            &[("topic", "inbox:#u"), ("data", "{\"version\": 999}")],
            &publisher_token(),
        )
        .await;
    assert_eq!(resp.status(), 403);
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{}/api/publish", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"channel": "inbox:#u", "data": {"version": 999}})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_i64()),
        (200, Some(103)),
        "{v}"
    );
    // The backend API needs the key.
    let (status, e) =
        get_json(reqwest::Client::new().post(format!("{}/api/inbox_stats", s.url))).await;
    assert_eq!((status, e["code"].as_str()), (401, Some("api_key_missing")));
    // The browser API needs a token with a sub, and names no other user.
    let (status, e) = get_json(reqwest::Client::new().get(format!("{}/inbox", s.url))).await;
    assert_eq!((status, e["code"].as_str()), (401, Some("token_missing")));
    let no_sub = wsclient::sign_json(&json!({"exp": herald::auth::unix_now() + 60}));
    let (status, e) = get_json(
        reqwest::Client::new()
            .get(format!("{}/inbox", s.url))
            .bearer_auth(no_sub),
    )
    .await;
    assert_eq!((status, e["code"].as_str()), (403, Some("user_required")));
    let (status, e) = browser(
        &s.url,
        "u",
        "POST",
        "/inbox/update",
        Some(json!({"user": "v", "upto": 9, "set": {"read": true}})),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_target")),
        "{e}"
    );
    // A cookie-authenticated change from a foreign origin is refused (CSRF).
    let (status, e) = get_json(
        reqwest::Client::new()
            .post(format!("{}/inbox/update", s.url))
            .header(
                "cookie",
                format!("mercureAuthorization={}", user_token("u")),
            )
            .header("origin", "https://evil.example")
            .json(&json!({"upto": 9, "set": {"read": true}})),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("origin_not_allowed")),
        "{e}"
    );
}

#[tokio::test]
async fn inbox_off_and_its_engines() {
    let s = TestServer::start(&[("centrifugo.api_key", &format!("{API_KEY:?}"))]).await;
    let (status, e) = backend(&s.url, "stats", json!({})).await;
    assert_eq!((status, e["code"].as_str()), (404, Some("inbox_disabled")));
    let dir = tempfile::tempdir().unwrap();
    for (kind, url) in [
        ("nats", "nats://127.0.0.1:4222"),
        ("redis", "redis://127.0.0.1:6379"),
    ] {
        config(
            dir.path(),
            &[
                ("inbox.enabled", "true"),
                ("engine.kind", &format!("{kind:?}")),
                ("engine.url", &format!("{url:?}")),
            ],
        )
        .unwrap_or_else(|e| panic!("the inbox runs on the {kind} engine: {e}"));
    }
    // On NATS the prefix names buckets and streams.
    let err = config(
        dir.path(),
        &[
            ("inbox.enabled", "true"),
            ("engine.kind", "\"nats\""),
            ("engine.url", "\"nats://127.0.0.1:4222\""),
            ("inbox.prefix", "\"app:inbox\""),
        ],
    )
    .unwrap_err();
    assert!(err.to_string().contains("names NATS buckets"), "{err}");
}

#[tokio::test]
async fn changes_over_the_rate_get_429_with_retry_after() {
    let s = start(&[("inbox.user_rate", "1")]).await;
    let id = notify(&s.url, &["u"], "t", json!({})).await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    let mut statuses = Vec::new();
    let mut retry = None;
    for i in 0..4 {
        let resp = reqwest::Client::new()
            .post(format!("{}/inbox/items/{id}", s.url))
            .bearer_auth(user_token("u"))
            .json(&json!({"read": i % 2 == 0}))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let e: Value = resp.json().await.unwrap();
            assert_eq!(e["code"], "rate_limited");
        }
    }
    assert_eq!(
        statuses[..2],
        [200, 200],
        "a burst of twice the rate passes"
    );
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert_eq!(retry.as_deref(), Some("1"));
    // Another user has a bucket of their own; reads are not limited.
    let (status, _) = browser(&s.url, "u", "GET", "/inbox", None).await;
    assert_eq!(status, 200);
    let (status, _) = browser(&s.url, "v", "PUT", "/inbox/preferences", Some(json!({}))).await;
    assert_eq!(status, 200);
}

fn sse_url(s: &TestServer, user: &str, last_event_id: Option<&str>) -> String {
    let token = user_token(user);
    let mut extra = vec![("authorization", token.as_str())];
    if let Some(id) = last_event_id {
        extra.push(("lastEventID", id));
    }
    subscribe_url(&s.url, &[&format!("inbox:#{user}")], &extra)
}

pub(crate) async fn next_data(sse: &mut Sse) -> Value {
    let ev = sse.next_event().await.expect("an event");
    serde_json::from_str(&ev.data).expect("json")
}

/// The next publication pushed on a WebSocket.
async fn next_pub(ws: &mut wsclient::Ws) -> Value {
    loop {
        let v = next(ws).await;
        if let Some(p) = v.get("push").and_then(|p| p.get("pub")) {
            return p.clone();
        }
    }
}

async fn every_change_is_an_event_for_the_owner_only(store: Store) {
    let s = start_on(store, &[]).await;
    // Alice on two devices: SSE and WebSocket.
    let mut sse = Sse::get(&sse_url(&s, "alice", None)).await;
    assert_eq!(sse.status, 200);
    let mut ws = wsclient::connected(&s, "alice").await;
    let r = call(&mut ws, 2, json!({"subscribe": {"channel": CHANNEL_ALICE}})).await;
    assert!(r.get("error").is_none(), "{r}");
    wait_subscriptions(&s, 2).await;

    // Nobody else reads it, on either face.
    let denied = Sse::get(&sse_url(&s, "bob", None).replace("%23bob", "%23alice")).await;
    assert_eq!(denied.status, 403);
    let mut bob = wsclient::connected(&s, "bob").await;
    let r = call(
        &mut bob,
        2,
        json!({"subscribe": {"channel": CHANNEL_ALICE}}),
    )
    .await;
    assert_eq!(r["error"]["code"], 103, "{r}");
    let mut anon = wsclient::connected_with(
        &s,
        Some(&wsclient::sign_json(
            &json!({"exp": herald::auth::unix_now() + 60}),
        )),
    )
    .await;
    let r = call(
        &mut anon,
        2,
        json!({"subscribe": {"channel": CHANNEL_ALICE}}),
    )
    .await;
    assert!(r.get("error").is_some(), "{r}");

    let id = notify(&s.url, &["alice"], "Hello", json!({})).await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    for ev in [
        next_data(&mut sse).await,
        next_pub(&mut ws).await["data"].clone(),
    ] {
        assert_eq!(ev["type"], "created", "{ev}");
        assert_eq!(ev["item"]["title"], "Hello");
        assert_eq!(
            (ev["version"].as_i64(), ev["counts"]["unread"].as_i64()),
            (Some(1), Some(1))
        );
    }
    // A read on device A (the WebSocket one, through the browser API) reaches device B (SSE).
    browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{id}"),
        Some(json!({"read": true})),
    )
    .await;
    let ev = next_data(&mut sse).await;
    assert_eq!(
        (ev["type"].as_str(), ev["counts"]["unread"].as_i64()),
        (Some("updated"), Some(0))
    );
    assert_eq!(ev["items"][0]["id"].as_i64(), Some(id));
    assert!(ev["items"][0]["read_at"].is_i64());
    assert_eq!(
        next_pub(&mut ws).await["data"],
        ev,
        "both devices get the same event"
    );
    // A repeated change makes no event: the next one seen is the removal.
    browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{id}"),
        Some(json!({"read": true})),
    )
    .await;
    browser(
        &s.url,
        "alice",
        "DELETE",
        &format!("/inbox/items/{id}"),
        None,
    )
    .await;
    let ev = next_data(&mut sse).await;
    assert_eq!(
        (ev["type"].as_str(), ev["version"].as_i64()),
        (Some("removed"), Some(3)),
        "{ev}"
    );
    assert_eq!(ev["ids"], json!([id]));
    assert_eq!(next_pub(&mut ws).await["data"], ev);
    // Bob's inbox stays silent for alice.
    notify(&s.url, &["bob"], "For bob", json!({})).await;
    notify(&s.url, &["alice"], "After", json!({})).await;
    assert_eq!(next_data(&mut sse).await["item"]["title"], "After");
}

async fn a_page_then_a_subscription_from_its_position_misses_nothing(store: Store) {
    let s = start_on(store, &[]).await;
    for i in 0..3 {
        notify(&s.url, &["alice"], &format!("old {i}"), json!({})).await;
    }
    let (_, page) = browser(&s.url, "alice", "GET", "/inbox", None).await;
    let version = page["version"].as_i64().unwrap();
    assert_eq!(version, 3);
    // Changes after the page was read, before the client subscribes.
    notify(&s.url, &["alice"], "new 1", json!({})).await;
    browser(
        &s.url,
        "alice",
        "POST",
        "/inbox/update",
        Some(json!({"upto": i64::MAX, "set": {"seen": true}})),
    )
    .await;

    let pos = &page["position"];
    let mut ws = wsclient::connected(&s, "alice").await;
    let r = call(
        &mut ws,
        2,
        json!({"subscribe": {"channel": CHANNEL_ALICE, "recover": true,
        "offset": pos["offset"], "epoch": pos["epoch"]}}),
    )
    .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let recovered: Vec<Value> = r["subscribe"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    let versions: Vec<i64> = recovered
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .filter(|v| *v > version)
        .collect();
    assert_eq!(versions, vec![4, 5], "{recovered:?}");

    let mut sse = Sse::get(&sse_url(
        &s,
        "alice",
        Some(pos["last_event_id"].as_str().unwrap()),
    ))
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let e = next_data(&mut sse).await;
        let v = e["version"].as_i64().unwrap();
        if v > version {
            got.push(v);
        }
    }
    assert_eq!(got, vec![4, 5]);
    // And the live tail goes on from there.
    notify(&s.url, &["alice"], "new 2", json!({})).await;
    assert_eq!(next_data(&mut sse).await["version"], 6);
    assert_eq!(next_pub(&mut ws).await["data"]["version"], 6);
}

#[tokio::test]
async fn an_offline_device_resumes_exactly_after_a_restart() {
    let s = start(&[]).await;
    let mut sse = Sse::get(&sse_url(&s, "alice", None)).await;
    let id = notify(&s.url, &["alice"], "one", json!({})).await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    let ev = sse.next_event().await.unwrap();
    let last_id = ev.id.expect("events have ids");
    drop(sse);
    // Offline: changes, then a restart, then more changes.
    notify(&s.url, &["alice"], "two", json!({})).await;
    browser(
        &s.url,
        "alice",
        "POST",
        &format!("/inbox/items/{id}"),
        Some(json!({"read": true})),
    )
    .await;
    let key = format!("{API_KEY:?}");
    let s = s
        .restart(&[("inbox.enabled", "true"), ("centrifugo.api_key", &key)])
        .await;
    notify(&s.url, &["alice"], "three", json!({})).await;
    let mut sse = Sse::get(&sse_url(&s, "alice", Some(&last_id))).await;
    assert_eq!(
        sse.header("last-event-id").as_deref(),
        Some(last_id.as_str()),
        "the id is still known"
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = next_data(&mut sse).await;
        got.push((
            e["version"].as_i64().unwrap(),
            e["type"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (2, "created".into()),
            (3, "updated".into()),
            (4, "created".into())
        ]
    );
    sse.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(counts(&s.url, "alice").await["unread"], 2);
}

async fn concurrent_toggles_during_a_notify_storm_keep_counts_exact(store: Store) {
    let s = start_on(store, &[("inbox.user_rate", "100000")]).await;
    let users = ["u0", "u1", "u2", "u3"];
    let mut ids: Vec<(String, i64)> = Vec::new();
    for u in users {
        for i in 0..5 {
            let cat = if i % 2 == 0 { "a" } else { "b" };
            let r = notify(&s.url, &[u], "seed", json!({"category": cat})).await;
            ids.push((u.to_string(), r["delivered"][0]["id"].as_i64().unwrap()));
        }
    }
    let url = s.url.clone();
    let storm = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for n in 0..8 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25 {
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
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut togglers = Vec::new();
    // Two togglers per user change the same items at the same time.
    for (k, chunk) in ids.chunks(5).chain(ids.chunks(5)).enumerate() {
        let url = s.url.clone();
        let chunk = chunk.to_vec();
        togglers.push(tokio::spawn(async move {
            for round in 0..30 {
                let (user, id) = &chunk[round % chunk.len()];
                let set = match (round + k) % 4 {
                    0 => json!({"read": true}),
                    1 => json!({"read": false, "seen": true}),
                    2 => json!({"archived": round % 3 == 0}),
                    _ => json!({"seen": false}),
                };
                let (status, v) =
                    browser(&url, user, "POST", &format!("/inbox/items/{id}"), Some(set)).await;
                assert_eq!(status, 200, "{v}");
                if round % 10 == 9 {
                    let (status, v) = browser(
                        &url,
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
    storm.await.unwrap();
    for t in togglers {
        t.await.unwrap();
    }
    for u in users {
        let items = all_items(&s.url, u).await;
        assert_eq!(items.len(), 5 + 8 * 25);
        assert_eq!(recount(&items), counts(&s.url, u).await, "{u}");
    }
    let (_, st) = backend(&s.url, "stats", json!({})).await;
    assert_eq!(st["result"]["count_mismatches"], 0, "{st}");
}

#[tokio::test]
async fn sigkill_mid_batch_loses_no_acknowledged_notification() {
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("HERALD_INBOX__ENABLED", "true"),
        ("HERALD_CENTRIFUGO__API_KEY", API_KEY),
        ("HERALD_JWT_KEY", KEY),
    ];
    let (mut child, url) = spawn_herald(dir.path(), &envs).await;
    // Concurrent notifies, each with its own idempotency key; remember which were acknowledged.
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for n in 0..6 {
        let url = url.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
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
    // Kill in the middle of the storm, once enough has been acknowledged.
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while acked.lock().len() < 150 {
        assert!(
            tokio::time::Instant::now() < deadline && !tasks.iter().all(|t| t.is_finished()),
            "the notify storm stopped early: {} acknowledged",
            acked.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<String> = acked.lock().clone();
    let (_child, url) = spawn_herald(dir.path(), &envs).await;
    for user in ["p", "q"] {
        let mut items = Vec::new();
        let mut cursor: Option<i64> = None;
        loop {
            let mut q = json!({"user": user, "archived": "all", "limit": 200});
            if let Some(c) = cursor {
                q["cursor"] = json!(c);
            }
            let (status, v) = backend(&url, "list", q).await;
            assert_eq!(status, 200, "{v}");
            items.extend(v["result"]["items"].as_array().unwrap().iter().cloned());
            match v["result"]["next_cursor"].as_i64() {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let titles: HashSet<&str> = items.iter().map(|i| i["title"].as_str().unwrap()).collect();
        assert_eq!(titles.len(), items.len(), "no duplicate");
        for k in &acked {
            assert!(
                titles.contains(k.as_str()),
                "acknowledged {k} lost for {user}"
            );
        }
        let (_, c) = backend(&url, "counts", json!({"user": user})).await;
        assert_eq!(c["result"]["counts"], recount(&items), "{user}");
    }
    let (_, st) = backend(&url, "stats", json!({})).await;
    assert_eq!(st["result"]["count_mismatches"], 0, "{st}");
    // Every committed change has its event in the log: the outbox drains after the restart.
    let mut pending = st["result"]["pending_events"].as_i64().unwrap();
    for _ in 0..200 {
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        pending = backend(&url, "stats", json!({})).await.1["result"]["pending_events"]
            .as_i64()
            .unwrap();
    }
    assert_eq!(pending, 0);
    let mut sse = Sse::get(&subscribe_url(
        &url,
        &["inbox:#p"],
        &[
            ("authorization", &user_token("p")),
            ("lastEventID", "earliest"),
        ],
    ))
    .await;
    let (_, v) = backend(&url, "counts", json!({"user": "p"})).await;
    let version = v["result"]["version"].as_i64().unwrap();
    let mut versions = Vec::new();
    while versions.len() < version as usize {
        versions.push(next_data(&mut sse).await["version"].as_i64().unwrap());
    }
    assert_eq!(
        versions,
        (1..=version).collect::<Vec<_>>(),
        "one event per change, in order, none twice"
    );
}

/// The real binary on `dir`, and its URL.
pub(crate) async fn spawn_herald(
    dir: &std::path::Path,
    envs: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = crate::process::command(dir);
    cmd.args(["--listen", "127.0.0.1:0"]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn herald");
    let stdout = child.stdout.take().expect("stdout");
    if let Some(stderr) = child.stderr.take() {
        let mut err = tokio::io::BufReader::new(stderr).lines();
        tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });
    }
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("listening on ") {
                return url.trim().to_string();
            }
        }
        panic!("herald exited before listening");
    })
    .await
    .expect("herald listening in time");
    // Keep reading stdout so that the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

#[tokio::test]
async fn an_embedding_app_notifies_from_its_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &[("inbox.enabled", "true")]).unwrap();
    let engine = herald::server::open_engine(&config).await.unwrap();
    let hub = herald::Hub::new(engine, herald::server::hub_options(&config))
        .await
        .unwrap();
    let inbox = herald::server::open_inbox(&hub, &config)
        .unwrap()
        .expect("enabled");
    let app = herald::server::router_with_inbox(hub.clone(), config, Some(inbox.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut sse = Sse::get(&sse_url_at(&url, "dora")).await;
    assert_eq!(sse.status, 200);
    let item = herald::inbox::NewItem {
        title: "From the app".into(),
        ..Default::default()
    };
    let r = inbox.notify(vec!["dora".into()], item, None).await.unwrap();
    assert_eq!(r.delivered[0].outcome, "created");
    assert_eq!(next_data(&mut sse).await["item"]["title"], "From the app");
    let (status, page) = browser(&url, "dora", "GET", "/inbox", None).await;
    assert_eq!((status, page["counts"]["unread"].as_i64()), (200, Some(1)));
}

pub(crate) fn sse_url_at(url: &str, user: &str) -> String {
    subscribe_url(
        url,
        &[&format!("inbox:#{user}")],
        &[("authorization", &user_token(user))],
    )
}

async fn snoozed_items_wake_and_expired_items_go_as_events(store: Store) {
    let s = start_on(store, &[]).await;
    let mut sse = Sse::get(&sse_url(&s, "erin", None)).await;
    let id = notify(&s.url, &["erin"], "wake me", json!({})).await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(next_data(&mut sse).await["type"], "created");
    let until = herald::inbox::now_ms() + 1500;
    let (_, c) = browser(
        &s.url,
        "erin",
        "POST",
        &format!("/inbox/items/{id}"),
        Some(json!({"snoozed_until": until})),
    )
    .await;
    assert_eq!(c["counts"]["unread"], 0);
    assert_eq!(
        next_data(&mut sse).await["items"][0]["snoozed_until"],
        until
    );
    // The sweeper wakes it: an event, not a poll, tells the client.
    let woke = next_data(&mut sse).await;
    assert_eq!(
        (woke["type"].as_str(), woke["counts"]["unread"].as_i64()),
        (Some("updated"), Some(1)),
        "{woke}"
    );
    assert!(woke["items"][0]["snoozed_until"].is_null());
    assert!(herald::inbox::now_ms() >= until, "not before its time");
    // An item past its expiry is removed, with its event.
    let expires = herald::inbox::now_ms() + 1000;
    let gone = notify(
        &s.url,
        &["erin"],
        "short-lived",
        json!({"expires_at": expires}),
    )
    .await["delivered"][0]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(next_data(&mut sse).await["type"], "created");
    let removed = next_data(&mut sse).await;
    assert_eq!(
        (removed["type"].as_str(), removed["ids"].clone()),
        (Some("removed"), json!([gone])),
        "{removed}"
    );
    assert_eq!(removed["counts"]["total"], 1);
    assert_eq!(
        recount(&all_items(&s.url, "erin").await),
        counts(&s.url, "erin").await
    );
}

async fn an_audience_of_every_inbox_and_its_retry(store: Store) {
    let s = start_on(store, &[("inbox.max_users", "2")]).await;
    for u in ["ann", "ben", "cat"] {
        notify(&s.url, &[u], "hello", json!({})).await;
    }
    let (status, _) = browser(
        &s.url,
        "dan",
        "PUT",
        "/inbox/preferences",
        Some(json!({"categories": {"news": {"inbox": false}}})),
    )
    .await;
    assert_eq!(status, 200);
    let body = json!({"audience": {"all": true}, "item": {"title": "Maintenance tonight", "category": "news"}, "idempotency_key": "maint-1"});
    let (status, r) = backend(&s.url, "notify", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["result"]["audience"],
        json!({"created": 3, "duplicate": 0, "muted": 1}),
        "in commits of two users"
    );
    let (status, again) = backend(&s.url, "notify", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["result"]["audience"],
        json!({"created": 0, "duplicate": 3, "muted": 1}),
        "{again}"
    );
    for u in ["ann", "ben", "cat"] {
        assert_eq!(counts(&s.url, u).await["total"], 2, "{u}");
    }
    assert_eq!(counts(&s.url, "dan").await["total"], 0);
    let (status, e) = backend(
        &s.url,
        "notify",
        json!({"users": ["ann"], "audience": {"all": true}, "item": {"title": "t"}}),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_audience"))
    );
}

#[tokio::test]
async fn start_up_recount_repairs_damaged_counts() {
    let s = start(&[]).await;
    notify(&s.url, &["fay"], "one", json!({"category": "a"})).await;
    notify(&s.url, &["fay"], "two", json!({"category": "b"})).await;
    let before = counts(&s.url, "fay").await;
    let mut s = s;
    s.stop().await;
    // Damage the counts behind Herald's back: one wrong, one missing, one for items that do not exist.
    let db = rusqlite::Connection::open(s.dir.join("inbox.sqlite3")).unwrap();
    db.execute_batch(
        "UPDATE counts SET unread = 99 WHERE category = 'a';
         DELETE FROM counts WHERE category = 'b';
         INSERT INTO counts VALUES ('ghost', 'x', 5, 5, 5, 0);",
    )
    .unwrap();
    drop(db);
    let key = format!("{API_KEY:?}");
    let s = s
        .restart(&[("inbox.enabled", "true"), ("centrifugo.api_key", &key)])
        .await;
    let st = checked(&s.url).await;
    assert_eq!(st["startup_check"]["repaired"], 3, "{st}");
    assert_eq!(
        counts(&s.url, "fay").await,
        before,
        "recounted from the items at start-up"
    );
    assert_eq!(counts(&s.url, "ghost").await["total"], 0);
    assert_eq!(st["count_mismatches"], 0, "{st}");
}

/// `inbox_stats` once the start-up check has finished (it runs in the background): waits for it, up
/// to 60 s.
async fn checked(url: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, st) = backend(url, "stats", json!({})).await;
        assert_eq!(status, 200, "{st}");
        if st["result"]["startup_check"]["finished"] == true {
            return st["result"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline
                && st["result"]["startup_check"]["error"].is_null(),
            "the start-up check did not finish: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The start-up check on a real restart of the binary: Herald answers before the check has finished
/// (the check is slowed by config: one inbox per batch, a pause before each, so ≥ 5 s for 10 inboxes),
/// serves the damaged counts as they are until the check reaches them, keeps a change made meanwhile,
/// and repairs every damaged count, reporting it in `inbox_stats` and the metrics.
#[tokio::test]
async fn the_start_up_check_runs_in_the_background_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut envs = vec![
        ("HERALD_INBOX__ENABLED", "true"),
        ("HERALD_CENTRIFUGO__API_KEY", API_KEY),
        ("HERALD_JWT_KEY", KEY),
    ];
    let (mut child, url) = spawn_herald(dir.path(), &envs).await;
    let users: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    notify(&url, &names, "one", json!({"category": "x"})).await;
    notify(&url, &names, "two", json!({"category": "y"})).await;
    assert_eq!(checked(&url).await["startup_check"]["repaired"], 0);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // Every user's `x` counts wrong, c3's `y` counts gone, counts for a user with no items.
    let db = rusqlite::Connection::open(dir.path().join("inbox.sqlite3")).unwrap();
    db.execute_batch(
        "UPDATE counts SET unread = 99 WHERE category = 'x';
         DELETE FROM counts WHERE user = 'c3' AND category = 'y';
         INSERT INTO counts VALUES ('ghost', 'x', 5, 5, 5, 0);",
    )
    .unwrap();
    drop(db);
    envs.extend([
        ("HERALD_INBOX__CHECK_BATCH", "1"),
        ("HERALD_INBOX__CHECK_PAUSE", "500ms"),
    ]);
    let (_child, url) = spawn_herald(dir.path(), &envs).await;
    let (status, first) = backend(&url, "stats", json!({})).await;
    assert_eq!(status, 200, "{first}");
    let first = &first["result"];
    assert_eq!(first["startup_check"]["finished"], false, "{first}");
    assert!(first["count_mismatches"].as_i64().unwrap() > 0, "{first}");
    // A change to the inbox the check reaches last among the users with items: its counts are still
    // damaged (unread 99 in `x`), the change applies to them, and the repair must keep it.
    let items = all_items(&url, "c8").await;
    let x = items.iter().find(|i| i["category"] == "x").unwrap();
    let id = x["id"].as_i64().unwrap();
    let (status, v) = browser(
        &url,
        "c8",
        "POST",
        &format!("/inbox/items/{id}"),
        Some(json!({"read": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["counts"]["categories"]["x"]["unread"], 98,
        "served as stored until the check"
    );
    let st = checked(&url).await;
    // 9 `x` counts, c3's `y`, the ghost's.
    assert_eq!(st["startup_check"]["repaired"], 11, "{st}");
    assert_eq!(st["startup_check"]["users_checked"], 10, "{st}");
    assert_eq!(st["count_mismatches"], 0, "{st}");
    for u in &names {
        assert_eq!(
            counts(&url, u).await,
            recount(&all_items(&url, u).await),
            "{u}"
        );
    }
    assert_eq!(
        counts(&url, "c8").await["categories"]["x"]["unread"],
        0,
        "the read kept"
    );
    assert_eq!(counts(&url, "ghost").await["total"], 0);
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "herald_inbox_recount_repairs_total 11",
        "herald_inbox_startup_check_finished 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in {metrics}"
        );
    }
}
