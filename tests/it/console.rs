//! The web console's API: who may use it (loopback without a password, the password and admin tokens), the
//! stats stream, the tail, history pages, publish, disconnect, connections, dev tokens.

use serde_json::{json, Value};

use crate::common::*;
use crate::wsclient;

fn api(s: &TestServer, path: &str) -> String {
    format!("{}/console/api/{path}", s.url)
}

async fn get(s: &TestServer, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(api(s, path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    get_json(req).await
}

async fn post(s: &TestServer, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(api(s, path)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    get_json(req).await
}

/// The next `data:` event of a console stream, as JSON.
async fn next_json(sse: &mut Sse) -> Value {
    let e = sse.next_event().await.expect("an event");
    serde_json::from_str(&e.data).expect("JSON event")
}

#[tokio::test]
async fn on_loopback_without_a_password_no_login_but_only_local_requests() {
    let s = TestServer::start(&[]).await;
    let (status, v) = get(&s, "session", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["login_required"], false);
    let (status, v) = get(&s, "overview", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["engine"]["ready"], true);

    // A DNS-rebinding page (a foreign Host) and a page of another origin are refused.
    let (status, v) = get_json(
        reqwest::Client::new()
            .get(api(&s, "overview"))
            .header("host", "evil.example"),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("console_local_only"))
    );
    let (status, v) = get_json(
        reqwest::Client::new()
            .get(api(&s, "overview"))
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("console_local_only")),
        "{v}"
    );

    // The UI itself.
    let page = reqwest::get(format!("{}/", s.url)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(page.text().await.unwrap().contains("/console/app.js"));
    let js = reqwest::get(format!("{}/console/app.js", s.url))
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let (status, v) = get(&s, "no-such-thing", None).await;
    assert_eq!((status, v["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn a_password_is_exchanged_for_an_admin_token() {
    let s = TestServer::start(&[("console.password", "\"hunter2\"")]).await;
    let (status, v) = get(&s, "session", None).await;
    assert_eq!((status, &v["login_required"]), (200, &json!(true)));
    assert_eq!(v["authenticated"], false);

    let (status, v) = get(&s, "overview", None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("admin_token_missing")),
        "{v}"
    );
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("/console/api/login"));

    let (status, v) = post(&s, "login", json!({"password": "wrong"}), None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("wrong_password")),
        "{v}"
    );

    let (status, v) = post(&s, "login", json!({"password": "hunter2"}), None).await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    assert!(v["expires_at"].as_u64().unwrap() > herald::auth::unix_now());

    let (status, v) = get(&s, "overview", Some(&token)).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = get(&s, "session", Some(&token)).await;
    assert_eq!((status, &v["authenticated"]), (200, &json!(true)));

    // A Herald publisher token is not an admin token, nor is anything else.
    let (status, v) = get(&s, "overview", Some(&publisher_token())).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("admin_token_invalid")),
        "{v}"
    );
    let (status, v) = get(&s, "connections", Some("garbage")).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("admin_token_invalid")),
        "{v}"
    );
}

#[tokio::test]
async fn a_console_turned_off_says_so() {
    let s = TestServer::start(&[("console.enabled", "false")]).await;
    let (status, v) = get(&s, "session", None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (404, Some("console_disabled")),
        "{v}"
    );
    let (status, v) = get(&s, "overview", None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (404, Some("console_disabled")),
        "{v}"
    );
}

#[tokio::test]
async fn tokens_are_minted_only_with_the_development_key() {
    let s = TestServer::start(&[]).await;
    let (status, v) = post(&s, "token", json!({"sub": "alice"}), None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("dev_key_not_in_use")),
        "{v}"
    );

    // A server on the public development key (no auth.jwt_key), as `herald serve` starts.
    let tmp = tempfile::tempdir().unwrap();
    let config = herald::Config::load(
        None,
        Vec::new(),
        &[
            ("listen".into(), "\"127.0.0.1:0\"".into()),
            ("log.backend".into(), "\"memory\"".into()),
            (
                "data_dir".into(),
                format!("{:?}", tmp.path().display().to_string()),
            ),
        ],
    )
    .unwrap();
    assert!(config.uses_dev_key());
    let server = herald::Server::bind(config).await.unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{url}/console/api/token"))
            .json(&json!({"sub": "alice", "channels": ["lobby"], "subscribe": ["a", " "], "ttl": "10m"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["claims"]["sub"], "alice");
    assert_eq!(v["claims"]["channels"], json!(["lobby"]));
    assert_eq!(v["claims"]["mercure"]["subscribe"], json!(["a"]));
    let claims: herald::auth::Claims = herald::auth::Auth::from_config(&Default::default())
        .unwrap()
        .verify(herald::auth::Role::Subscriber, v["token"].as_str().unwrap())
        .expect("verifies with the development key");
    let exp = claims.exp.unwrap();
    assert!(
        (590..=600).contains(&(exp - herald::auth::unix_now())),
        "{exp}"
    );
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{url}/console/api/token"))
            .json(&json!({"ttl": "soon"})),
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_ttl")),
        "{v}"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_stats_stream_moves_when_something_is_published() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut stats = Sse::get(&api(&s, "stats/stream")).await;
    assert_eq!(stats.status, 200);
    assert_eq!(
        stats.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    let first = next_json(&mut stats).await;
    assert_eq!(first["hub"]["publications"], 0);
    assert!(first["rates"].is_null(), "no rate before a second snapshot");

    let mut sub = Sse::get(&subscribe_url(&s.url, &["news"], &[])).await;
    assert_eq!(sub.status, 200);
    s.publish(&[("topic", "news"), ("data", "one")]).await;
    s.publish(&[("topic", "news"), ("data", "two")]).await;
    assert_eq!(sub.next_event().await.unwrap().data, "one");
    let mut moved = None;
    for _ in 0..5 {
        let v = next_json(&mut stats).await;
        if v["hub"]["publications"] == 2 && v["hub"]["deliveries"] == 2 {
            moved = Some(v);
            break;
        }
    }
    let v = moved.expect("the counters moved within a few snapshots");
    assert_eq!(v["hub"]["sse_connections"], 1);
    assert_eq!(v["hub"]["websocket_connections"], 0);
    assert_eq!(v["hub"]["channels"], 1);
    assert!(v["rates"]["publications"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["engine"]["ready"], true);
}

#[tokio::test]
async fn history_pages_newest_first() {
    let s = TestServer::start(&[]).await;
    for i in 0..25 {
        s.publish(&[("topic", "paged"), ("data", &format!("m{i}"))])
            .await;
    }
    s.publish(&[("topic", "other"), ("data", "elsewhere")])
        .await;
    let mut before: Option<u64> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let path = match before {
            Some(b) => format!("history?channel=paged&limit=10&before={b}"),
            None => "history?channel=paged&limit=10".to_string(),
        };
        let (status, v) = get(&s, &path, None).await;
        assert_eq!(status, 200, "{v}");
        pages += 1;
        for p in v["publications"].as_array().unwrap() {
            seen.push(p["data"].as_str().unwrap().to_string());
        }
        match v["older"].as_u64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..25).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(seen, want);
    let (status, v) = get(&s, "history?channel=", None).await;
    assert_eq!((status, v["code"].as_str()), (400, Some("missing_channel")));
}

#[tokio::test]
async fn publish_through_the_console_and_the_admin_tail_sees_private_updates() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut tail = Sse::get(&api(&s, "tail?topic=room")).await;
    assert_eq!(tail.status, 200);
    assert!(
        tail.next_any().await.unwrap().comment,
        "the opening comment"
    );
    let mut anon = Sse::get(&subscribe_url(&s.url, &["room"], &[])).await;
    let granted = token(&[], &["room"], Some(600));
    let mut reader = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &["room"], &[]))
            .bearer_auth(granted),
    )
    .await;
    wait_subscriptions(&s, 3).await;

    let (status, v) = post(
        &s,
        "publish",
        json!({"topic": "room", "data": "{\"secret\": 1}", "format": "json", "private": true}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["seq"].as_u64().unwrap() > 0);
    let (status, v) = post(
        &s,
        "publish",
        json!({"topic": "room", "data": "hello"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");

    assert_eq!(reader.next_event().await.unwrap().data, "{\"secret\": 1}");
    assert_eq!(reader.next_event().await.unwrap().data, "hello");
    assert_eq!(
        anon.next_event().await.unwrap().data,
        "hello",
        "private stays private"
    );
    let t1 = next_json(&mut tail).await;
    assert_eq!(
        (t1["data"].as_str(), &t1["private"]),
        (Some("{\"secret\": 1}"), &json!(true))
    );
    assert_eq!(next_json(&mut tail).await["data"], "hello");

    let (status, v) = post(
        &s,
        "publish",
        json!({"topic": "room", "data": "{nope", "format": "json"}),
        None,
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_json")),
        "{v}"
    );
    let (status, v) = post(&s, "publish", json!({"topic": "", "data": "x"}), None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("missing_topic")),
        "{v}"
    );
}

#[tokio::test]
async fn connections_are_listed_and_a_disconnect_reaches_the_websocket_client() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut ws = wsclient::connected(&s, "alice").await;
    let reply = wsclient::call(&mut ws, 2, json!({"subscribe": {"channel": "lobby"}})).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let _sse = Sse::get(&subscribe_url(&s.url, &["news"], &[])).await;
    wait_subscriptions(&s, 2).await;

    let (status, v) = get(&s, "connections", None).await;
    assert_eq!(status, 200, "{v}");
    let alice = &v["websocket"][0];
    assert_eq!(alice["user"], "alice");
    assert_eq!(alice["channels"], json!(["lobby"]));
    assert!(
        alice["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{v}"
    );
    let sse = &v["sse"][0];
    assert_eq!(sse["topics"], json!(["news"]));
    assert!(sse["subscriber"].as_str().unwrap().starts_with("urn:uuid:"));
    assert!(
        sse["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{v}"
    );
    assert_eq!(v["sse_total"], 1);

    let (status, v) = get(&s, "channels", None).await;
    assert_eq!(status, 200, "{v}");
    let lobby = v["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "lobby")
        .cloned()
        .expect("lobby listed");
    assert_eq!(
        (lobby["subscribers"].as_u64(), lobby["presence"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, v) = get(&s, "overview", None).await;
    assert_eq!(
        (
            &v["hub"]["sse_connections"],
            &v["hub"]["websocket_connections"]
        ),
        (&json!(1), &json!(1))
    );

    let (status, v) = post(&s, "disconnect", json!({"user": "alice"}), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["connected_here"], 1);
    let (code, _) = wsclient::closed(&mut ws).await;
    assert_eq!(code, 3503);

    let (status, v) = post(&s, "disconnect", json!({}), None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("missing_user")),
        "{v}"
    );
}

/// The tail is an operator watching, not a reader of the channel: it gets what is published, but no face
/// counts or lists it (Centrifugo `channels` and `info`, the Mercure subscriptions API), so it neither
/// shows an admin to the channel's clients nor makes a channel look read (an inbox's user look connected,
/// which would hold back their push notifications).
#[tokio::test]
async fn the_tail_is_neither_counted_nor_listed_as_a_subscriber() {
    let key = format!("{:?}", wsclient::API_KEY);
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("mercure.subscriptions", "true"),
        ("centrifugo.api_key", &key),
    ])
    .await;
    let mut tail = Sse::get(&api(&s, "tail?topic=room")).await;
    assert_eq!(tail.status, 200);
    assert!(
        tail.next_any().await.unwrap().comment,
        "the opening comment"
    );
    wait_subscriptions(&s, 1).await;
    s.publish(&[("topic", "room"), ("data", "hello")]).await;
    assert_eq!(next_json(&mut tail).await["data"], "hello");

    let watcher = token(
        &[],
        &[
            "/.well-known/mercure/subscriptions{/topic}{/subscriber}",
            "*",
        ],
        Some(600),
    );
    let listed = || async {
        let (status, list) = get_json(
            reqwest::Client::new()
                .get(format!("{}/.well-known/mercure/subscriptions", s.url))
                .bearer_auth(&watcher),
        )
        .await;
        assert_eq!(status, 200, "{list}");
        list["subscriptions"].as_array().unwrap().clone()
    };
    let channels = wsclient::api(&s, "channels", json!({})).await;
    assert!(channels["channels"].get("room").is_none(), "{channels}");
    let info = wsclient::api(&s, "info", json!({})).await;
    assert_eq!(info["nodes"][0]["num_subs"], 0, "{info}");
    assert_eq!(listed().await, Vec::<Value>::new());

    // A client reading the same channel is counted and listed.
    let _reader = Sse::get(&subscribe_url(&s.url, &["room"], &[])).await;
    wait_subscriptions(&s, 2).await;
    let channels = wsclient::api(&s, "channels", json!({})).await;
    assert_eq!(channels["channels"]["room"]["num_clients"], 1, "{channels}");
    let info = wsclient::api(&s, "info", json!({})).await;
    assert_eq!(info["nodes"][0]["num_subs"], 1, "{info}");
    let list = listed().await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["topic"], "room");
}
