//! The WebSocket endpoint (Centrifugo client protocol) at its edges: each bad input gets the protocol's
//! error or close code, and one publication has one identity on both transports.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::wsclient::*;

#[tokio::test]
async fn connect_subscribe_and_receive_with_one_identity_on_both_transports() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
    ])
    .await;
    let mut ws = connected(&s, "42").await;
    // A command far larger than the socket read buffer (1 KiB) is read whole and answered.
    let big = "x".repeat(40_000);
    send(
        &mut ws,
        json!({"id": 80, "rpc": {"method": "x", "data": {"big": big}}}),
    )
    .await;
    let reply = next(&mut ws).await;
    assert_eq!(
        (reply["id"].as_u64(), reply["error"]["code"].as_u64()),
        (Some(80), Some(108))
    );
    send(&mut ws, json!({"id": 2, "subscribe": {"channel": "news"}})).await;
    let reply = next(&mut ws).await;
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["subscribe"]["recoverable"], true);
    assert_eq!(reply["subscribe"]["epoch"], s.hub.epoch());
    let mut sse = Sse::get(&subscribe_url(&s.url, &["news"], &[])).await;

    let resp = reqwest::Client::new()
        .post(format!("{}/api/publish", s.url))
        .header("x-api-key", API_KEY)
        .json(&json!({"channel": "news", "data": {"headline": "hi"}}))
        .send()
        .await
        .unwrap();
    let result: Value = resp.json().await.unwrap();
    let offset = result["result"]["offset"].as_u64().expect("offset");

    let push = next(&mut ws).await;
    assert_eq!(push["push"]["channel"], "news");
    assert_eq!(push["push"]["pub"]["data"], json!({"headline": "hi"}));
    assert_eq!(push["push"]["pub"]["offset"], offset);

    let ev = sse.next_event().await.unwrap();
    assert_eq!(ev.data, r#"{"headline":"hi"}"#);
    let (epoch, seq) =
        herald::log::parse_generated_id(ev.id.as_deref().unwrap()).expect("generated id");
    assert_eq!(
        (epoch, seq),
        (result["result"]["epoch"].as_str().unwrap(), offset),
        "SSE id = WS epoch + offset"
    );

    // A Mercure publication reaches the WebSocket too; text data arrives as a JSON string.
    s.publish(&[("topic", "news"), ("data", "plain text"), ("id", "m-1")])
        .await;
    let push = next(&mut ws).await;
    assert_eq!(push["push"]["pub"]["data"], "plain text");
}

#[tokio::test]
async fn protocol_errors_have_their_codes() {
    let s = TestServer::start(&[("centrifugo.max_message_size", "1024")]).await;

    // Anything before connect is a bad request.
    let mut ws = open(&s).await;
    send(&mut ws, json!({"id": 1, "subscribe": {"channel": "x"}})).await;
    assert_eq!(closed(&mut ws).await.0, 3501);

    // Malformed JSON.
    let mut ws = connected(&s, "1").await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, 3501, "{reason}");

    // An unknown command is answered, not fatal.
    let mut ws = connected(&s, "1").await;
    send(&mut ws, json!({"id": 7, "teleport": {}})).await;
    let reply = next(&mut ws).await;
    assert_eq!(
        (reply["id"].as_u64(), reply["error"]["code"].as_u64()),
        (Some(7), Some(104))
    );
    // RPC is not available, clearly.
    send(&mut ws, json!({"id": 8, "rpc": {"method": "x"}})).await;
    assert_eq!(next(&mut ws).await["error"]["code"], 108);
    // Permission denied: a channel limited to other users.
    send(
        &mut ws,
        json!({"id": 9, "subscribe": {"channel": "dialog#2,3"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["error"]["code"], 103);
    send(
        &mut ws,
        json!({"id": 10, "subscribe": {"channel": "dialog#1,3"}}),
    )
    .await;
    assert!(
        next(&mut ws).await["subscribe"].is_object(),
        "user 1 may join dialog#1,3"
    );
    // Unknown namespace, already subscribed.
    send(
        &mut ws,
        json!({"id": 11, "subscribe": {"channel": "nope:x"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["error"]["code"], 102);
    send(
        &mut ws,
        json!({"id": 12, "subscribe": {"channel": "dialog#1,3"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["error"]["code"], 105);
    // Oversized frame.
    ws.send(Message::Text("x".repeat(2048).into()))
        .await
        .unwrap();
    assert_eq!(closed(&mut ws).await.0, 1009);

    // Bad token.
    let mut ws = open(&s).await;
    send(
        &mut ws,
        json!({"id": 1, "connect": {"token": "not.a.token"}}),
    )
    .await;
    assert_eq!(closed(&mut ws).await.0, 3500);
    // No token where anonymous connections are not allowed.
    let mut ws = open(&s).await;
    send(&mut ws, json!({"id": 1, "connect": {}})).await;
    assert_eq!(closed(&mut ws).await.0, 3500);
    // An expired token is an error the client can recover from (refresh and reconnect).
    let mut ws = open(&s).await;
    send(
        &mut ws,
        json!({"id": 1, "connect": {"token": conn_token("1", -10)}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["error"]["code"], 109);
}

#[tokio::test]
async fn command_rate_limit() {
    let s = TestServer::start(&[
        ("centrifugo.command_rate", "1"),
        ("centrifugo.command_burst", "3"),
    ])
    .await;
    let mut ws = connected(&s, "1").await;
    let batch: Vec<String> = (2..8)
        .map(|i| json!({"id": i, "presence_stats": {"channel": "x"}}).to_string())
        .collect();
    ws.send(Message::Text(batch.join("\n").into()))
        .await
        .unwrap();
    let mut codes = Vec::new();
    for _ in 2..8 {
        codes.push(next(&mut ws).await["error"]["code"].as_u64().unwrap());
    }
    assert!(codes.contains(&111), "the burst is exceeded: {codes:?}");
    assert!(
        codes.iter().filter(|c| **c == 111).count() >= 3,
        "{codes:?}"
    );
}

#[tokio::test]
async fn foreign_origin_is_refused_before_the_upgrade() {
    let s = TestServer::start(&[("cors.allowed_origins", r#"["https://app.example.com"]"#)]).await;
    let mut req = ws_url(&s).into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    let mut req = ws_url(&s).into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://app.example.com".parse().unwrap());
    assert!(
        tokio_tungstenite::connect_async(req).await.is_ok(),
        "an allowed origin connects"
    );
}

#[tokio::test]
async fn unrefreshed_expired_connection_is_closed_with_3005() {
    let s = TestServer::start(&[("centrifugo.refresh_grace", "\"0s\"")]).await;
    let mut ws = open(&s).await;
    send(
        &mut ws,
        json!({"id": 1, "connect": {"token": conn_token("1", 1)}}),
    )
    .await;
    let reply = next(&mut ws).await;
    assert_eq!(reply["connect"]["expires"], true);
    assert_eq!(closed(&mut ws).await.0, 3005);
}

#[tokio::test]
async fn missing_pong_closes_with_3012() {
    let s = TestServer::start(&[
        ("centrifugo.ping", "\"200ms\""),
        ("centrifugo.pong_timeout", "\"300ms\""),
    ])
    .await;
    let mut ws = connected(&s, "1").await;
    // This client never answers the server's `{}` pings.
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 3012);
                break;
            }
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "{}"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn slow_client_is_closed_with_3008_and_others_keep_receiving() {
    let s = TestServer::start(&[
        ("limits.outbox_capacity", "8"),
        ("log.backend", "\"memory\""),
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
    ])
    .await;
    let mut slow = connected(&s, "slow").await;
    send(
        &mut slow,
        json!({"id": 2, "subscribe": {"channel": "firehose"}}),
    )
    .await;
    next(&mut slow).await;
    let mut fast = connected(&s, "fast").await;
    send(
        &mut fast,
        json!({"id": 2, "subscribe": {"channel": "firehose"}}),
    )
    .await;
    next(&mut fast).await;

    // `slow` stops reading; publish until the hub gives up on it (bounded).
    let payload = json!({"blob": "y".repeat(60_000)});
    let mut kicked = false;
    for i in 0..600 {
        s.publish(&[
            ("topic", "firehose"),
            ("data", &payload.to_string()),
            ("id", &format!("f{i}")),
        ])
        .await;
        assert!(next(&mut fast).await["push"]["pub"]["offset"]
            .as_u64()
            .is_some());
        let firehose = s
            .hub
            .channels()
            .into_iter()
            .find(|(c, _)| c == "firehose")
            .map(|(_, n)| n);
        if firehose == Some(1) {
            kicked = true;
            break;
        }
    }
    assert!(kicked, "the slow client was disconnected");
    // When it reads again it finds what was already in flight, then the reason: 3008.
    let (code, reason) = closed(&mut slow).await;
    assert_eq!((code, reason.as_str()), (3008, "slow"));
    // The hub counted it; the connection closing on the hub's word does not count it again.
    let stats = s.hub.stats();
    assert_eq!(stats.disconnects.get("slow_consumer"), Some(&1));
}

#[tokio::test]
async fn server_api_auth_errors_and_openapi() {
    let s = TestServer::start(&[("centrifugo.api_key", &format!("{API_KEY:?}"))]).await;
    let c = reqwest::Client::new();
    let (status, body) = get_json(
        c.post(format!("{}/api/publish", s.url))
            .json(&json!({"channel": "a", "data": 1})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("api_key_missing"))
    );
    let (status, body) = get_json(
        c.post(format!("{}/api/info", s.url))
            .header("authorization", "apikey wrong"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("api_key_invalid"))
    );
    let (status, body) = get_json(
        c.post(format!("{}/api/info", s.url))
            .header("authorization", format!("apikey {API_KEY}")),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["result"]["nodes"][0]["version"].is_string());
    let (status, body) = get_json(
        c.post(format!("{}/api/teleport", s.url))
            .header("x-api-key", API_KEY),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("method_not_found"))
    );
    let (_, body) = get_json(
        c.post(format!("{}/api/publish", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"channel": "nope:x", "data": 1})),
    )
    .await;
    assert_eq!(body["error"]["code"], 102);
    let (_, body) = get_json(
        c.post(format!("{}/api/batch", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"commands": [{"publish": {"channel": "a", "data": {"n": 1}}}, {"history": {"channel": "a", "limit": 10}}]})),
    )
    .await;
    assert!(
        body["replies"][0]["publish"]["offset"].as_u64().is_some(),
        "{body}"
    );
    assert_eq!(
        body["replies"][1]["history"]["publications"][0]["data"],
        json!({"n": 1})
    );
    let (_, body) = get_json(
        c.post(format!("{}/api/history_remove", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"channel": "a"})),
    )
    .await;
    assert!(body["result"].is_object());
    let (_, body) = get_json(
        c.post(format!("{}/api/history", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"channel": "a", "limit": 10})),
    )
    .await;
    assert_eq!(body["result"]["publications"], json!([]));
    let (status, spec) = get_json(c.get(format!("{}/api/openapi.json", s.url))).await;
    assert_eq!(status, 200);
    assert_eq!(spec["openapi"], "3.0.3");
    assert!(spec["paths"]["/api/publish"]["post"].is_object());
}

#[tokio::test]
async fn server_api_controls_live_connections() {
    let s = TestServer::start(&[
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
        ("centrifugo.max_channels_per_connection", "3"),
        ("centrifugo.subscribe_to_personal", "true"),
    ])
    .await;
    let mut ws = connected(&s, "u1").await; // also subscribed to personal:#u1 by the server

    // Server-side subscribe reaches the live connection as a subscribe push.
    api(&s, "subscribe", json!({"user": "u1", "channel": "alerts"})).await;
    let push = next(&mut ws).await;
    assert_eq!(push["push"]["channel"], "alerts");
    assert_eq!(push["push"]["subscribe"]["recoverable"], true);
    let r = api(
        &s,
        "broadcast",
        json!({"channels": ["alerts", "personal:#u1"], "data": {"n": 1}}),
    )
    .await;
    assert_eq!(r["responses"].as_array().unwrap().len(), 2);
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        got.push(
            next(&mut ws).await["push"]["channel"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    got.sort();
    assert_eq!(got, ["alerts", "personal:#u1"]);

    let presence = api(&s, "presence", json!({"channel": "alerts"})).await;
    let clients: Vec<&Value> = presence["presence"].as_object().unwrap().values().collect();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0]["user"], "u1");
    let stats = api(&s, "presence_stats", json!({"channel": "alerts"})).await;
    assert_eq!(
        (stats["num_clients"].as_u64(), stats["num_users"].as_u64()),
        (Some(1), Some(1))
    );
    let channels = api(&s, "channels", json!({"pattern": "ale*"})).await;
    assert_eq!(channels["channels"]["alerts"]["num_clients"], 1);
    assert!(
        channels["channels"].get("personal:#u1").is_none(),
        "filtered by the pattern"
    );

    // The per-connection channel limit (3): personal + alerts + one more, then 106.
    send(&mut ws, json!({"id": 5, "subscribe": {"channel": "third"}})).await;
    assert!(next(&mut ws).await["subscribe"].is_object());
    send(
        &mut ws,
        json!({"id": 6, "subscribe": {"channel": "fourth"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["error"]["code"], 106);

    api(
        &s,
        "unsubscribe",
        json!({"user": "u1", "channel": "alerts"}),
    )
    .await;
    let push = next(&mut ws).await;
    assert_eq!(
        (
            push["push"]["channel"].as_str(),
            push["push"]["unsubscribe"]["code"].as_u64()
        ),
        (Some("alerts"), Some(2000))
    );

    api(&s, "disconnect", json!({"user": "u1"})).await;
    assert_eq!(closed(&mut ws).await.0, 3503);

    let mut ws = connected(&s, "u2").await;
    api(&s, "refresh", json!({"user": "u2", "expired": true})).await;
    assert_eq!(closed(&mut ws).await.0, 3005);
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_3001() {
    let mut s = TestServer::start(&[]).await;
    // One connection learns of the shutdown through its outbox (it has a subscription), the other,
    // with none, through the shared deadline tick.
    let mut subscribed = connected(&s, "a").await;
    send(
        &mut subscribed,
        json!({"id": 2, "subscribe": {"channel": "news"}}),
    )
    .await;
    assert!(next(&mut subscribed).await["subscribe"].is_object());
    let mut bare = connected(&s, "b").await;
    let readers =
        tokio::spawn(async move { (closed(&mut subscribed).await, closed(&mut bare).await) });
    s.stop().await;
    let (a, b) = readers.await.unwrap();
    assert_eq!(a.0, 3001, "{a:?}");
    assert_eq!(b.0, 3001, "{b:?}");
}

/// The server API's publish options (Centrifugo's): tags, b64data, skip_history, idempotency_key; and
/// history_remove keeps the stream position so clients can still recover.
#[tokio::test]
async fn server_api_publish_options_and_history_remove() {
    let s = TestServer::start(&[("centrifugo.api_key", &format!("{API_KEY:?}"))]).await;
    let mut ws = connected(&s, "u").await;
    send(&mut ws, json!({"id": 2, "subscribe": {"channel": "news"}})).await;
    assert!(next(&mut ws).await["subscribe"].is_object());
    let tok = token(&[], &[], Some(600));
    let mut sse = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &["news"], &[]))
            .bearer_auth(&tok),
    )
    .await;
    assert_eq!(sse.status, 200);

    let r = api(
        &s,
        "publish",
        json!({"channel": "news", "data": {"n": 1}, "tags": {"kind": "a"}}),
    )
    .await;
    let first = r["offset"].as_u64().expect("offset");
    let push = next(&mut ws).await;
    assert_eq!(push["push"]["pub"]["tags"], json!({"kind": "a"}));
    assert_eq!(sse.next_event().await.unwrap().data, r#"{"n":1}"#);

    // b64data: the bytes themselves (here UTF-8 JSON).
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(br#"{"n":2}"#);
    api(&s, "publish", json!({"channel": "news", "b64data": b64})).await;
    assert_eq!(next(&mut ws).await["push"]["pub"]["data"], json!({"n": 2}));
    assert_eq!(sse.next_event().await.unwrap().data, r#"{"n":2}"#);

    // skip_history: delivered live, with no offset and no SSE id, and not in history.
    let r = api(
        &s,
        "publish",
        json!({"channel": "news", "data": {"n": 3}, "skip_history": true}),
    )
    .await;
    assert_eq!(
        r,
        json!({}),
        "no position for a publication outside history"
    );
    let push = next(&mut ws).await;
    assert_eq!(push["push"]["pub"]["data"], json!({"n": 3}));
    assert!(push["push"]["pub"].get("offset").is_none(), "{push}");
    let ev = sse.next_event().await.unwrap();
    assert_eq!((ev.data.as_str(), ev.id.as_deref()), (r#"{"n":3}"#, None));
    let h = api(&s, "history", json!({"channel": "news", "limit": 10})).await;
    let datas: Vec<Value> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(datas, [json!({"n": 1}), json!({"n": 2})]);

    // idempotency_key: a repeat returns the first result and publishes nothing.
    let a = api(
        &s,
        "publish",
        json!({"channel": "news", "data": {"n": 4}, "idempotency_key": "k1"}),
    )
    .await;
    let b = api(
        &s,
        "publish",
        json!({"channel": "news", "data": {"n": 5}, "idempotency_key": "k1"}),
    )
    .await;
    assert_eq!(a, b);
    assert_eq!(next(&mut ws).await["push"]["pub"]["data"], json!({"n": 4}));
    let c = api(&s, "publish", json!({"channel": "news", "data": {"n": 6}})).await;
    assert_eq!(
        next(&mut ws).await["push"]["pub"]["data"],
        json!({"n": 6}),
        "the repeat was not published"
    );
    let top = c["offset"].as_u64().unwrap();
    assert!(top > first);

    // history_remove keeps the stream's position: the top offset stays, and a client at it recovers.
    api(&s, "history_remove", json!({"channel": "news"})).await;
    let h = api(&s, "history", json!({"channel": "news", "limit": 10})).await;
    assert_eq!(
        (
            h["offset"].as_u64(),
            h["publications"].as_array().map(Vec::len)
        ),
        (Some(top), Some(0))
    );
    let mut ws2 = connected(&s, "u2").await;
    send(
        &mut ws2,
        json!({"id": 2, "subscribe": {"channel": "news", "recover": true, "offset": top, "epoch": s.hub.epoch()}}),
    )
    .await;
    let r = next(&mut ws2).await;
    assert_eq!(
        (
            r["subscribe"]["recovered"].as_bool(),
            r["subscribe"]["offset"].as_u64()
        ),
        (Some(true), Some(top)),
        "{r}"
    );
}

/// `broadcast` publishes its channels concurrently (so group commit takes them together) and still
/// answers one response per channel, in the order of the channels, a refused channel among the others.
#[tokio::test]
async fn server_api_broadcast_answers_each_channel_in_order() {
    let s = TestServer::start(&[("centrifugo.api_key", &format!("{API_KEY:?}"))]).await;
    let bad = "x".repeat(300);
    let mut channels: Vec<String> = (0..150).map(|i| format!("b{i}")).collect();
    channels[77] = bad.clone();
    let r = api(
        &s,
        "broadcast",
        json!({"channels": channels, "data": {"n": 1}}),
    )
    .await;
    let responses = r["responses"].as_array().expect("responses");
    assert_eq!(responses.len(), 150);
    let mut offsets = std::collections::HashSet::new();
    for (i, resp) in responses.iter().enumerate() {
        if i == 77 {
            assert!(resp["error"]["code"].as_u64().is_some(), "{i}: {resp}");
            assert!(resp.get("result").is_none(), "{i}: {resp}");
            continue;
        }
        let offset = resp["result"]["offset"].as_u64();
        assert!(offset.is_some(), "{i}: {resp}");
        assert_eq!(resp["result"]["epoch"], s.hub.epoch(), "{i}: {resp}");
        assert!(offsets.insert(offset), "{i}: offset {offset:?} twice");
    }
    // Each channel has its publication at the offset its own response names.
    for i in [0usize, 76, 78, 149] {
        let h = api(&s, "history", json!({"channel": channels[i], "limit": 10})).await;
        let pubs = h["publications"].as_array().expect("publications");
        assert_eq!(pubs.len(), 1, "{}: {h}", channels[i]);
        assert_eq!(pubs[0]["data"], json!({"n": 1}));
        assert_eq!(pubs[0]["offset"], responses[i]["result"]["offset"]);
    }
}
