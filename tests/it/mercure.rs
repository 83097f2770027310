//! Publishing and subscribing over the Mercure protocol: selectors, framing, private updates, headers.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn stream_opens_before_any_publication_with_streaming_headers() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["a"], &[])).await;
    assert_eq!(sub.status, 200);
    assert_eq!(
        sub.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(sub.header("x-accel-buffering").as_deref(), Some("no"));
    let cc = sub.header("cache-control").unwrap_or_default();
    assert!(
        cc.contains("no-cache") && cc.contains("no-store") && cc.contains("private"),
        "{cc}"
    );
    assert!(
        sub.header("last-event-id").is_none(),
        "no Last-Event-ID asked, none answered"
    );
    let first = sub.next_any().await.expect("opening comment");
    assert!(
        first.comment,
        "the stream opens with a comment so headers leave at once"
    );
}

#[tokio::test]
async fn selectors_exact_template_star_and_alternates() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut exact = Sse::get(&subscribe_url(
        &s.url,
        &["https://example.com/books/1"],
        &[],
    ))
    .await;
    let mut template = Sse::get(&subscribe_url(
        &s.url,
        &["https://example.com/books/{id}"],
        &[],
    ))
    .await;
    let mut star = Sse::get(&subscribe_url(&s.url, &["*"], &[])).await;
    let mut alternate = Sse::get(&subscribe_url(&s.url, &["urn:alt"], &[])).await;
    let mut other = Sse::get(&subscribe_url(
        &s.url,
        &["https://example.com/authors/{id}"],
        &[],
    ))
    .await;

    s.publish(&[
        ("topic", "https://example.com/books/1"),
        ("topic", "urn:alt"),
        ("data", "b1"),
        ("id", "e1"),
    ])
    .await;
    s.publish(&[
        ("topic", "https://example.com/books/2"),
        ("data", "b2"),
        ("id", "e2"),
    ])
    .await;

    assert_eq!(exact.next_event().await.unwrap().data, "b1");
    assert_eq!(
        alternate.next_event().await.unwrap().data,
        "b1",
        "alternate topics are matched"
    );
    for sub in [&mut template, &mut star] {
        assert_eq!(sub.next_event().await.unwrap().id.as_deref(), Some("e1"));
        assert_eq!(sub.next_event().await.unwrap().id.as_deref(), Some("e2"));
    }
    exact.assert_quiet(Duration::from_millis(300)).await;
    other.assert_quiet(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn sse_framing_multiline_event_type_retry_and_generated_id() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    let id = s
        .publish(&[
            ("topic", "t"),
            ("data", "line 1\n\nline 3"),
            ("type", "update"),
            ("retry", "1500"),
        ])
        .await;
    let (epoch, seq) =
        herald::log::parse_generated_id(&id).expect("a generated id names the log position");
    assert_eq!(epoch, s.hub.epoch());
    assert!(seq > 0);
    let ev = sub.next_event().await.unwrap();
    assert_eq!(
        ev.data, "line 1\n\nline 3",
        "empty lines inside data survive"
    );
    assert_eq!(ev.event.as_deref(), Some("update"));
    assert_eq!(ev.retry, Some(1500));
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
}

#[tokio::test]
async fn publish_response_is_text_plain_with_the_id_and_json_is_accepted() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    let resp = s
        .publish_raw(
            &[("topic", "t"), ("data", "x"), ("id", "my-id")],
            &publisher_token(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(resp.text().await.unwrap(), "my-id");
    let resp = reqwest::Client::new()
        .post(s.hub_url())
        .bearer_auth(publisher_token())
        .json(&serde_json::json!({"topic": ["t"], "data": {"n": 1}, "id": "json-id"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sub.next_event().await.unwrap().id.as_deref(), Some("my-id"));
    let ev = sub.next_event().await.unwrap();
    assert_eq!(
        (ev.id.as_deref(), ev.data.as_str()),
        (Some("json-id"), r#"{"n":1}"#)
    );
}

#[tokio::test]
async fn private_updates_reach_only_authorized_subscribers() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let books = "https://example.com/books/{id}";
    let mut anonymous = Sse::get(&subscribe_url(&s.url, &[books], &[])).await;
    let granted = token(&[], &["https://example.com/users/foo/{?topic}"], Some(600));
    let mut foo = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &[books], &[]))
            .bearer_auth(&granted),
    )
    .await;
    let other = token(&[], &["https://example.com/users/bar/{?topic}"], Some(600));
    let mut bar = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &[books], &[]))
            .bearer_auth(&other),
    )
    .await;

    // The spec's example: canonical topic for the resource, alternate topic naming the user it is for.
    s.publish(&[
        ("topic", "https://example.com/books/1"),
        (
            "topic",
            "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1",
        ),
        ("data", "secret"),
        ("private", "on"),
    ])
    .await;
    s.publish(&[("topic", "https://example.com/books/2"), ("data", "public")])
        .await;

    assert_eq!(foo.next_event().await.unwrap().data, "secret");
    assert_eq!(foo.next_event().await.unwrap().data, "public");
    assert_eq!(
        anonymous.next_event().await.unwrap().data,
        "public",
        "private skipped"
    );
    assert_eq!(
        bar.next_event().await.unwrap().data,
        "public",
        "private skipped"
    );

    // Nor does history leak it.
    let mut replay = Sse::get(&subscribe_url(
        &s.url,
        &["*"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    assert_eq!(replay.next_event().await.unwrap().data, "public");
    replay.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn heartbeat_comments_keep_idle_streams_alive() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("mercure.heartbeat", "\"100ms\""),
    ])
    .await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["idle"], &[])).await;
    assert!(sub.next_any().await.unwrap().comment, "opening comment");
    for _ in 0..3 {
        let ev = sub
            .next_within(Duration::from_secs(2))
            .await
            .expect("heartbeat in time");
        assert!(ev.expect("stream open").comment);
    }
}
