//! Limits and bad input: every refusal has a status and a stable code; a subscriber that stops reading is
//! disconnected while the others keep receiving.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test]
async fn a_subscriber_that_never_reads_is_disconnected_and_others_keep_receiving() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("limits.outbox_capacity", "4"),
        ("log.backend", "\"memory\""),
    ])
    .await;
    let addr: std::net::SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();

    // The slow client: a tiny receive buffer, one request, then it never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(addr).await.unwrap();
    slow.write_all(b"GET /.well-known/mercure?topic=t HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    wait_subscriptions(&s, 1).await;
    let mut fast = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    wait_subscriptions(&s, 2).await;

    let payload = "x".repeat(60_000);
    let mut kicked_after = None;
    for i in 0..600 {
        s.publish(&[("topic", "t"), ("data", &payload), ("id", &format!("m{i}"))])
            .await;
        assert_eq!(
            fast.next_event().await.unwrap().id,
            Some(format!("m{i}")),
            "the fast subscriber misses nothing"
        );
        if s.hub.subscriptions().len() == 1 {
            kicked_after = Some(i);
            break;
        }
    }
    let kicked_after = kicked_after.expect("the slow subscriber was disconnected");
    assert!(kicked_after >= 4, "not before its outbox filled");

    s.publish(&[("topic", "t"), ("data", "after"), ("id", "after")])
        .await;
    assert_eq!(
        fast.next_event().await.unwrap().id.as_deref(),
        Some("after")
    );

    // Its connection is closed, not just its subscription: reading drains the kernel buffers, then EOF.
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    loop {
        match tokio::time::timeout(WAIT, slow.read(&mut buf))
            .await
            .expect("connection closed in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
        assert!(total < 200 << 20, "bounded");
    }
    let metrics = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"herald_disconnects_total{reason="slow_consumer"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn limits_have_clear_errors() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("limits.max_topics_per_subscription", "2"),
        ("limits.max_connections", "1"),
        ("limits.max_message_size", "10"),
    ])
    .await;
    let (status, body) =
        get_json(reqwest::Client::new().get(subscribe_url(&s.url, &["a", "b", "c"], &[]))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_topics"))
    );
    assert!(body["message"].as_str().unwrap().contains('2'));

    let _held = Sse::get(&subscribe_url(&s.url, &["a"], &[])).await;
    let (status, body) =
        get_json(reqwest::Client::new().get(subscribe_url(&s.url, &["a"], &[]))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("too_many_connections"))
    );

    let resp = s
        .publish_raw(
            &[("topic", "a"), ("data", "01234567890")],
            &publisher_token(),
        )
        .await;
    assert_eq!(resp.status(), 413);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["code"],
        "message_too_large"
    );
}

#[tokio::test]
async fn bad_publications_are_refused_and_not_dispatched() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["*"], &[])).await;
    let tok = publisher_token();
    for (fields, status, code) in [
        (
            vec![("topic", "t"), ("id", "#frag"), ("data", "x")],
            400,
            "invalid_id",
        ),
        (vec![("data", "x")], 400, "missing_topic"),
        (
            vec![("topic", "t"), ("retry", "soon")],
            400,
            "invalid_retry",
        ),
    ] {
        let resp = s.publish_raw(&fields, &tok).await;
        assert_eq!(resp.status(), status, "{fields:?}");
        assert_eq!(
            resp.json::<serde_json::Value>().await.unwrap()["code"],
            code
        );
    }
    let resp = reqwest::Client::new()
        .post(s.hub_url())
        .bearer_auth(&tok)
        .header("content-type", "text/xml")
        .body("<x/>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let resp = reqwest::Client::new()
        .post(s.hub_url())
        .bearer_auth(&tok)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["code"],
        "invalid_json"
    );
    let (status, body) = get_json(reqwest::Client::new().get(s.hub_url())).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("missing_topic"))
    );
    sub.assert_quiet(Duration::from_millis(200)).await;
}

/// Finding 4: one subscription with a 2 000-expression URI template cost about 3 MB, and 100 of them
/// 300 MB that stayed after they closed. Templates are bounded per subscription now; what is left costs
/// tens of KB and is reused once the subscriptions close. Measured on the real process.
#[tokio::test]
async fn subscription_templates_cost_bounded_memory() {
    use crate::process::Herald;
    let h = Herald::start(&["--allow-anonymous", "--memory"], &[]).await;
    let topic = |round: usize, i: usize, exprs: usize| {
        let vars: String = (0..exprs).map(|v| format!("/{{v{v}}}")).collect();
        format!("https://example.com/r{round}/s{i}{vars}")
    };
    let url = |topics: &[String]| {
        let t: Vec<&str> = topics.iter().map(String::as_str).collect();
        subscribe_url(&h.url, &t, &[])
    };
    let (status, body) = get_json(reqwest::Client::new().get(url(&[topic(0, 0, 17)]))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_template_expressions"))
    );
    let long: Vec<String> = (0..10)
        .map(|i| format!("https://example.com/{i}/{}", "x".repeat(2000)))
        .collect();
    let (status, body) = get_json(reqwest::Client::new().get(url(&long))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("selectors_too_large"))
    );

    let publish = |n: usize| {
        let h = &h.url;
        async move {
            let claims = herald::auth::Claims {
                mercure: Some(herald::auth::MercureClaim {
                    publish: Some(vec!["*".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let tok = sign_with(
                &claims,
                herald::config::DEV_JWT_KEY,
                jsonwebtoken::Algorithm::HS256,
            );
            let r = reqwest::Client::new()
                .post(format!("{h}/.well-known/mercure"))
                .bearer_auth(tok)
                .form(&[
                    ("topic", format!("https://example.com/other/{n}")),
                    ("data", "x".into()),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // Round 0 warms the process up (allocator arenas, runtime); rounds 1 and 2 are measured.
    let mut rss = Vec::new();
    for round in 0..3 {
        let before = h.rss();
        let mut subs = Vec::new();
        for i in 0..100 {
            let sse = Sse::get(&url(&[topic(round, i, 16)])).await;
            assert_eq!(sse.status, 200);
            subs.push(sse);
        }
        // A publication runs every template once, which is when a regex allocates its match cache.
        publish(round).await;
        let during = h.rss();
        drop(subs);
        for _ in 0..500 {
            if h.metric("herald_subscriptions").await == 0.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(h.metric("herald_subscriptions").await, 0.0);
        rss.push((before, during, h.rss()));
    }
    eprintln!("rss (before, with 100 subscriptions, after): {rss:?}");
    for &(before, during, _) in &rss[1..] {
        let per_sub = during.saturating_sub(before) / 100;
        assert!(per_sub < 150 * 1024, "{per_sub} bytes per subscription");
    }
    // Closed subscriptions give their memory back to the process: a second round costs no more.
    let (_, _, after_1) = rss[1];
    let (_, during_2, _) = rss[2];
    assert!(
        during_2 < after_1 + 4 * 1024 * 1024,
        "round 2 took {} KB more than was left after round 1",
        (during_2 - after_1) / 1024
    );
}
