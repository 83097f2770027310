//! Who can read what: one access model decides every read path on both faces, whichever face published.

use serde_json::{json, Value};

use crate::common::*;
use crate::wsclient::*;

fn now() -> i64 {
    herald::auth::unix_now() as i64
}

/// A subscriber token with these claims (plus an expiry).
fn tok(claims: Value) -> String {
    let mut c = claims;
    c["exp"] = json!(now() + 600);
    sign_json(&c)
}

async fn sse_status(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("subscribe");
    let status = resp.status().as_u16();
    if status == 200 {
        return (status, Value::Null);
    }
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn api_server() -> [(&'static str, String); 2] {
    [
        ("auth.allow_anonymous", "true".into()),
        ("centrifugo.api_key", format!("{API_KEY:?}")),
    ]
}

async fn start() -> TestServer {
    let o = api_server();
    let o: Vec<(&str, &str)> = o.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start(&o).await
}

/// Finding 1: alice's personal channel, published through the server API, was readable over SSE by anyone.
#[tokio::test]
async fn a_user_channel_is_not_readable_over_sse_by_anyone_else() {
    let s = start().await;
    api(
        &s,
        "publish",
        json!({"channel": "personal:#alice", "data": {"n": 1}}),
    )
    .await;
    api(&s, "publish", json!({"channel": "news", "data": {"n": 1}})).await;

    let exact = subscribe_url(&s.url, &["personal:#alice"], &[("lastEventID", "earliest")]);
    let no_claims = tok(json!({}));
    let bob = tok(json!({"sub": "bob"}));
    for (who, token) in [
        ("anonymous", None),
        ("no-claim token", Some(no_claims.as_str())),
        ("bob", Some(bob.as_str())),
    ] {
        let (status, body) = sse_status(&exact, token).await;
        assert_eq!(status, 403, "{who}: {body}");
        assert_eq!(body["code"], "topic_not_allowed", "{who}: {body}");
    }

    // A wildcard cannot be refused up front: alice's records are filtered out of the replay and the live stream.
    for (n, token) in [
        (2, None),
        (3, Some(no_claims.as_str())),
        (4, Some(bob.as_str())),
    ] {
        let url = subscribe_url(&s.url, &["*"], &[("lastEventID", "earliest")]);
        let mut req = reqwest::Client::new().get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut sse = Sse::open(req).await;
        assert_eq!(sse.status, 200);
        // The replay holds only the news, oldest first.
        for m in 1..n {
            assert_eq!(
                sse.next_event().await.unwrap().data,
                format!(r#"{{"n":{m}}}"#)
            );
        }
        api(
            &s,
            "publish",
            json!({"channel": "personal:#alice", "data": {"n": n}}),
        )
        .await;
        api(&s, "publish", json!({"channel": "news", "data": {"n": n}})).await;
        // Delivery is in log order: had alice's update got through, it would come first.
        let ev = sse.next_event().await.unwrap();
        assert_eq!(ev.data, format!(r#"{{"n":{n}}}"#));
        let id = ev.id.unwrap_or_default();
        let (_, seq) = herald::log::parse_generated_id(&id).expect("a generated id");
        let news = api(
            &s,
            "history",
            json!({"channel": "news", "limit": 1, "reverse": true}),
        )
        .await;
        assert_eq!(
            news["publications"][0]["offset"], seq,
            "it is the news update"
        );
    }

    // Alice reads her own channel, history included.
    let alice = tok(json!({"sub": "alice"}));
    let mut sse = Sse::open(reqwest::Client::new().get(&exact).bearer_auth(&alice)).await;
    assert_eq!(sse.status, 200);
    for n in 1..=4 {
        assert_eq!(
            sse.next_event().await.unwrap().data,
            format!(r#"{{"n":{n}}}"#)
        );
    }
}

/// Finding 2: a private Mercure update reached every authenticated WebSocket subscriber, and `history` returned
/// private records to anyone subscribed.
#[tokio::test]
async fn private_updates_reach_websocket_only_with_a_grant() {
    let s = start().await;
    let mut anon = connected_with(&s, None).await;
    let mut bob = connected_with(&s, Some(&tok(json!({"sub": "bob"})))).await;
    let mut carol = connected_with(
        &s,
        Some(&tok(
            json!({"sub": "carol", "mercure": {"subscribe": ["news"]}}),
        )),
    )
    .await;
    for ws in [&mut anon, &mut bob, &mut carol] {
        let r = call(ws, 2, json!({"subscribe": {"channel": "news"}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    s.publish(&[("topic", "news"), ("data", "secret"), ("private", "on")])
        .await;
    s.publish(&[("topic", "news"), ("data", "public")]).await;
    for ws in [&mut anon, &mut bob] {
        assert_eq!(next(ws).await["push"]["pub"]["data"], "public");
    }
    assert_eq!(next(&mut carol).await["push"]["pub"]["data"], "secret");
    assert_eq!(next(&mut carol).await["push"]["pub"]["data"], "public");

    let datas = |r: &Value| -> Vec<Value> {
        r["history"]["publications"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .map(|p| p["data"].clone())
            .collect()
    };
    for ws in [&mut anon, &mut bob] {
        let r = call(ws, 3, json!({"history": {"channel": "news", "limit": 10}})).await;
        assert_eq!(datas(&r), [json!("public")], "{r}");
        let r = call(
            ws,
            4,
            json!({"history": {"channel": "news", "limit": 10, "reverse": true}}),
        )
        .await;
        assert_eq!(datas(&r), [json!("public")], "{r}");
    }
    let r = call(
        &mut carol,
        3,
        json!({"history": {"channel": "news", "limit": 10}}),
    )
    .await;
    assert_eq!(datas(&r), [json!("secret"), json!("public")], "{r}");

    // Recovery from before both: the private one is not recovered for bob.
    let epoch = s.hub.epoch();
    let mut bob2 = connected_with(&s, Some(&tok(json!({"sub": "bob"})))).await;
    let r = call(
        &mut bob2,
        2,
        json!({"subscribe": {"channel": "news", "recover": true, "epoch": epoch, "offset": 0}}),
    )
    .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let pubs: Vec<Value> = r["subscribe"]["publications"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(pubs, [json!("public")], "{r}");
}

/// Channels starting with `$` are Herald's own (document storage): nobody publishes into them from outside,
/// and nobody reads them over SSE or WebSocket, whatever their grants.
#[tokio::test]
async fn reserved_channels_are_neither_published_nor_read() {
    let s = start().await;
    let resp = s
        .publish_raw(&[("topic", "$yjs:doc"), ("data", "x")], &publisher_token())
        .await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "topic_reserved");

    let all = tok(json!({"sub": "root", "mercure": {"subscribe": ["*"]}}));
    let (status, body) = sse_status(&subscribe_url(&s.url, &["$yjs:doc"], &[]), Some(&all)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("topic_not_allowed"))
    );

    // Written by Herald itself (as the document code does), then a public one: a wildcard reader with every
    // grant sees only the public one.
    let url = subscribe_url(&s.url, &["*"], &[("lastEventID", "earliest")]);
    s.hub
        .publish(herald::hub::NewPublication {
            topics: vec!["$yjs:doc".into()],
            data: "internal".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    s.publish(&[("topic", "news"), ("data", "public")]).await;
    let mut sse = Sse::open(reqwest::Client::new().get(&url).bearer_auth(&all)).await;
    assert_eq!(sse.next_event().await.unwrap().data, "public");

    let mut ws = connected_with(&s, Some(&all)).await;
    let r = call(&mut ws, 2, json!({"subscribe": {"channel": "$yjs:doc"}})).await;
    assert!(r["error"]["code"].as_u64().is_some(), "{r}");
}
