//! The engine seam seen from outside: what the hub reads for a replay or a history page, and what
//! `/readyz` says when writes fail. The engine is wrapped to count and to inject faults.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use herald::engine::{BoxFuture, Engine};
use herald::log::{LogError, Record};
use serde_json::json;

use crate::common::*;
use crate::wsclient::*;

/// Counts the records every read returns; fails appends while `fail` is set.
struct Observed {
    inner: Arc<dyn Engine>,
    read: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
}

impl Observed {
    fn counted<'a>(
        &'a self,
        f: BoxFuture<'a, Result<Vec<Record>, LogError>>,
    ) -> BoxFuture<'a, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            let r = f.await?;
            self.read.fetch_add(r.len(), Ordering::Relaxed);
            Ok(r)
        })
    }
}

impl Engine for Observed {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        if self.fail.load(Ordering::Relaxed) {
            return Box::pin(async { Err(LogError::Storage("injected: disk full".into())) });
        }
        self.inner.append(batch)
    }
    fn read_range(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        topics: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        self.counted(self.inner.read_range(after, upto, limit, topics))
    }
    fn read_channel(
        &self,
        channel: String,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        self.counted(self.inner.read_channel(channel, after, upto, limit))
    }
    fn read_channel_back(
        &self,
        channel: String,
        before: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        self.counted(self.inner.read_channel_back(channel, before, limit))
    }
    fn find_id(&self, id: String) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        self.inner.find_id(id)
    }
    fn last(&self) -> BoxFuture<'_, Result<Option<Record>, LogError>> {
        self.inner.last()
    }
    fn channel_top(&self, c: String, upto: u64) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        self.inner.channel_top(c, upto)
    }
    fn channel_pruned_upto(&self, c: String) -> BoxFuture<'_, Result<u64, LogError>> {
        self.inner.channel_pruned_upto(c)
    }
    fn remove_channel(&self, c: String) -> BoxFuture<'_, Result<u64, LogError>> {
        self.inner.remove_channel(c)
    }
    fn epoch(&self) -> String {
        self.inner.epoch()
    }
    fn health(&self) -> BoxFuture<'_, Result<(), LogError>> {
        if self.fail.load(Ordering::Relaxed) {
            return Box::pin(async {
                Err(LogError::Storage("injected: the last write failed".into()))
            });
        }
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        self.inner.close()
    }
}

async fn observed(
    overrides: &[(&str, &str)],
) -> (
    TestServer,
    Arc<AtomicUsize>,
    Arc<AtomicBool>,
    tempfile::TempDir,
) {
    let tmp = tempfile::tempdir().unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let (r, f) = (read.clone(), fail.clone());
    let s = TestServer::start_with(tmp.path(), overrides, move |inner| {
        Arc::new(Observed {
            inner,
            read: r,
            fail: f,
        })
    })
    .await;
    (s, read, fail, tmp)
}

/// A replay of one quiet topic reads that topic's records, not every channel's; a reverse history page
/// reads what it returns, not the whole channel.
#[tokio::test]
async fn replays_and_history_pages_read_only_what_they_return() {
    let (s, read, _, _tmp) = observed(&[
        ("auth.allow_anonymous", "true"),
        ("centrifugo.api_key", &format!("{API_KEY:?}")),
        ("retention", r#"[{pattern = "*", max_count = 100000}]"#),
    ])
    .await;
    let commands: Vec<serde_json::Value> = (0..2000)
        .map(|i| json!({"publish": {"channel": "busy", "data": {"i": i}}}))
        .collect();
    for chunk in commands.chunks(500) {
        let (status, _) = get_json(
            reqwest::Client::new()
                .post(format!("{}/api/batch", s.url))
                .header("x-api-key", API_KEY)
                .json(&json!({"commands": chunk})),
        )
        .await;
        assert_eq!(status, 200);
    }
    s.publish(&[("topic", "quiet"), ("data", "q1")]).await;
    s.publish(&[("topic", "busy"), ("data", "b")]).await;
    s.publish(&[("topic", "quiet"), ("data", "q2")]).await;

    read.store(0, Ordering::Relaxed);
    let mut sse = Sse::get(&subscribe_url(
        &s.url,
        &["quiet"],
        &[("lastEventID", "earliest")],
    ))
    .await;
    assert_eq!(sse.next_event().await.unwrap().data, "q1");
    assert_eq!(sse.next_event().await.unwrap().data, "q2");
    assert_eq!(
        read.load(Ordering::Relaxed),
        2,
        "the replay read the quiet topic only"
    );

    read.store(0, Ordering::Relaxed);
    let h = api(
        &s,
        "history",
        json!({"channel": "busy", "limit": 3, "reverse": true}),
    )
    .await;
    assert_eq!(h["publications"].as_array().unwrap().len(), 3);
    assert_eq!(
        read.load(Ordering::Relaxed),
        3,
        "a reverse page reads three records, not 2001"
    );
}

/// `/readyz` is 503 while writes fail, and 200 once they succeed again; a publish meanwhile is refused
/// with 503, never acknowledged.
#[tokio::test]
async fn readyz_follows_the_engine() {
    let (s, _, fail, _tmp) = observed(&[]).await;
    let readyz = || async {
        reqwest::get(format!("{}/readyz", s.url))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(readyz().await, 200);
    fail.store(true, Ordering::Relaxed);
    let resp = s
        .publish_raw(&[("topic", "t"), ("data", "x")], &publisher_token())
        .await;
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "log_unavailable");
    assert_eq!(readyz().await, 503);
    fail.store(false, Ordering::Relaxed);
    assert_eq!(readyz().await, 200);
    s.publish(&[("topic", "t"), ("data", "y")]).await;
}
