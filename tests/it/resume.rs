//! Reconnection: `Last-Event-ID` (header and query), `earliest`, the response header, and history that
//! survives a restart of the server on its SQLite log.

use std::time::Duration;

use crate::common::*;

async fn ids(sub: &mut Sse, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(sub.next_event().await.expect("event").id.expect("id"));
    }
    out
}

#[tokio::test]
async fn last_event_id_response_header_cases() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;

    // Empty history, earliest asked: header says earliest, nothing is sent.
    let mut empty = Sse::get(&subscribe_url(
        &s.url,
        &["t"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    assert_eq!(empty.header("last-event-id").as_deref(), Some("earliest"));
    empty.assert_quiet(Duration::from_millis(200)).await;

    for i in 1..=3 {
        s.publish(&[("topic", "t"), ("data", "x"), ("id", &format!("e{i}"))])
            .await;
    }
    s.publish(&[("topic", "other"), ("data", "x"), ("id", "o1")])
        .await;

    // Known id: the events after it, and the header echoes it.
    let mut known = Sse::get(&subscribe_url(&s.url, &["t"], &[("lastEventID", "e1")])).await;
    assert_eq!(known.header("last-event-id").as_deref(), Some("e1"));
    assert_eq!(ids(&mut known, 2).await, ["e2", "e3"]);
    known.assert_quiet(Duration::from_millis(200)).await;

    // earliest: the whole history of the subscribed topics.
    let mut earliest = Sse::get(&subscribe_url(
        &s.url,
        &["t"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    assert_eq!(
        earliest.header("last-event-id").as_deref(),
        Some("earliest")
    );
    assert_eq!(ids(&mut earliest, 3).await, ["e1", "e2", "e3"]);

    // Unknown id (never existed or aged out): replay what is retained, and say `earliest`.
    let mut unknown = Sse::get(&subscribe_url(&s.url, &["t"], &[("lastEventID", "nope")])).await;
    assert_eq!(unknown.header("last-event-id").as_deref(), Some("earliest"));
    assert_eq!(ids(&mut unknown, 3).await, ["e1", "e2", "e3"]);

    // The header wins over the query parameter.
    let req = reqwest::Client::new()
        .get(subscribe_url(&s.url, &["t"], &[("lastEventID", "e1")]))
        .header("Last-Event-ID", "e2");
    let mut both = Sse::open(req).await;
    assert_eq!(both.header("last-event-id").as_deref(), Some("e2"));
    assert_eq!(ids(&mut both, 1).await, ["e3"]);

    // Replay then live, with no gap and no duplicate.
    s.publish(&[("topic", "t"), ("data", "x"), ("id", "e4")])
        .await;
    assert_eq!(ids(&mut both, 1).await, ["e4"]);
    assert_eq!(ids(&mut known, 1).await, ["e4"]);
}

#[tokio::test]
async fn resume_after_restart_on_the_sqlite_log() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["https://example.com/feed"], &[])).await;
    for i in 1..=3 {
        s.publish(&[
            ("topic", "https://example.com/feed"),
            ("data", &format!("m{i}")),
            ("id", &format!("id-{i}")),
        ])
        .await;
    }
    let seen = ids(&mut sub, 3).await;
    assert_eq!(seen, ["id-1", "id-2", "id-3"]);

    // The server goes away; the stream ends so the client can reconnect elsewhere.
    let s = s.restart(&[("auth.allow_anonymous", "true")]).await;
    assert!(sub.wait_end(WAIT).await, "stream ended by shutdown");

    for i in 4..=5 {
        s.publish(&[
            ("topic", "https://example.com/feed"),
            ("data", &format!("m{i}")),
            ("id", &format!("id-{i}")),
        ])
        .await;
    }
    let req = reqwest::Client::new()
        .get(subscribe_url(&s.url, &["https://example.com/feed"], &[]))
        .header("Last-Event-ID", "id-3");
    let mut resumed = Sse::open(req).await;
    assert_eq!(resumed.header("last-event-id").as_deref(), Some("id-3"));
    let ev = resumed.next_event().await.unwrap();
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some("id-4"), "m4"));
    assert_eq!(ids(&mut resumed, 1).await, ["id-5"]);
    resumed.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn memory_log_forgets_on_restart() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("log.backend", "\"memory\""),
    ])
    .await;
    s.publish(&[("topic", "t"), ("data", "x"), ("id", "gone")])
        .await;
    let s = s
        .restart(&[
            ("auth.allow_anonymous", "true"),
            ("log.backend", "\"memory\""),
        ])
        .await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["t"], &[("lastEventID", "gone")])).await;
    assert_eq!(
        sub.header("last-event-id").as_deref(),
        Some("earliest"),
        "the client learns history was lost"
    );
    sub.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn retention_keeps_the_newest_per_channel() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("retention", r#"[{pattern = "*", max_count = 2}]"#),
        ("log.prune_interval", "\"50ms\""),
    ])
    .await;
    for i in 1..=5 {
        s.publish(&[("topic", "t"), ("data", "x"), ("id", &format!("r{i}"))])
            .await;
    }
    // Pruning runs in the background; poll the log (bounded) until it has applied.
    let engine = s.hub.engine().clone();
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = engine
            .read_channel("t".into(), 0, u64::MAX, 10)
            .await
            .unwrap();
        if kept.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kept.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["r4", "r5"]
    );
    let mut sub = Sse::get(&subscribe_url(
        &s.url,
        &["t"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    assert_eq!(ids(&mut sub, 2).await, ["r4", "r5"]);
}
