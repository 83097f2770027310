//! Test harness: a real Herald on 127.0.0.1:0 and a small SSE reader over reqwest.

use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use herald::auth::{self, Claims, MercureClaim};
use herald::{Config, Server};
use jsonwebtoken::Algorithm;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const KEY: &str = "test-secret";
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub url: String,
    pub hub: herald::Hub,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Config for tests: fresh data dir, test key, ephemeral port, plus `overrides` (dotted keys).
pub fn config(dir: &std::path::Path, overrides: &[(&str, &str)]) -> anyhow::Result<Config> {
    let mut o: Vec<(String, String)> = vec![
        ("listen".into(), "\"127.0.0.1:0\"".into()),
        (
            "data_dir".into(),
            format!("{:?}", dir.display().to_string()),
        ),
        ("auth.jwt_key".into(), format!("{KEY:?}")),
        ("shutdown_timeout".into(), "\"2s\"".into()),
    ];
    o.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Ok(Config::load(None, Vec::new(), &o)?)
}

impl TestServer {
    pub async fn start(overrides: &[(&str, &str)]) -> TestServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in(&dir, overrides).await;
        s._tmp = Some(tmp);
        s
    }

    pub async fn start_in(dir: &std::path::Path, overrides: &[(&str, &str)]) -> TestServer {
        Self::start_with(dir, overrides, |e| e).await
    }

    /// A server whose engine is wrapped by `wrap` (to observe it or inject faults).
    pub async fn start_with(
        dir: &std::path::Path,
        overrides: &[(&str, &str)],
        wrap: impl FnOnce(
            std::sync::Arc<dyn herald::engine::Engine>,
        ) -> std::sync::Arc<dyn herald::engine::Engine>,
    ) -> TestServer {
        let config = config(dir, overrides).expect("config");
        let engine = wrap(herald::server::open_engine(&config).await.expect("engine"));
        let server = Server::bind_with(config, engine).await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let hub = server.hub().clone();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            url: format!("http://{addr}"),
            hub,
            dir: dir.to_path_buf(),
            stop: Some(stop),
            task: Some(task),
            _tmp: None,
        }
    }

    pub fn hub_url(&self) -> String {
        format!("{}/.well-known/mercure", self.url)
    }

    /// Graceful shutdown; returns when the server has flushed its log and stopped.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("shutdown in time")
                .expect("join")
                .expect("clean shutdown");
        }
    }

    /// Stops this server and starts a new one on the same data directory (a restart).
    pub async fn restart(mut self, overrides: &[(&str, &str)]) -> TestServer {
        self.stop().await;
        let mut next = TestServer::start_in(&self.dir, overrides).await;
        next._tmp = self._tmp.take();
        next
    }

    /// Publishes with a token allowed to publish anywhere; returns the id.
    pub async fn publish(&self, fields: &[(&str, &str)]) -> String {
        let resp = self.publish_raw(fields, &publisher_token()).await;
        assert_eq!(
            resp.status(),
            200,
            "publish refused: {:?}",
            resp.text().await
        );
        resp.text().await.expect("body")
    }

    pub async fn publish_raw(&self, fields: &[(&str, &str)], token: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.hub_url())
            .bearer_auth(token)
            .form(fields)
            .send()
            .await
            .expect("publish request")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn sign_with(claims: &Claims, key: &str, alg: Algorithm) -> String {
    auth::sign(claims, alg, &auth::encoding_key(key, alg).expect("key")).expect("sign")
}

pub fn token(publish: &[&str], subscribe: &[&str], exp_in: Option<i64>) -> String {
    let claims = Claims {
        sub: None,
        exp: exp_in.map(|d| (auth::unix_now() as i64 + d) as u64),
        mercure: Some(MercureClaim {
            publish: (!publish.is_empty()).then(|| publish.iter().map(|s| s.to_string()).collect()),
            subscribe: (!subscribe.is_empty())
                .then(|| subscribe.iter().map(|s| s.to_string()).collect()),
            payload: None,
        }),
        ..Default::default()
    };
    sign_with(&claims, KEY, Algorithm::HS256)
}

pub fn publisher_token() -> String {
    token(&["*"], &[], Some(3600))
}

/// One parsed SSE event; comments are reported too (heartbeats, the opening comment).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: bool,
}

pub struct Sse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: BytesMut,
    pub ended: bool,
}

pub fn subscribe_url(base: &str, topics: &[&str], extra: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for t in topics {
        s.append_pair("topic", t);
    }
    for (k, v) in extra {
        s.append_pair(k, v);
    }
    format!("{base}/.well-known/mercure?{}", s.finish())
}

impl Sse {
    pub async fn open(req: reqwest::RequestBuilder) -> Sse {
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("headers arrive without any publication")
            .expect("subscribe request");
        Sse {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            stream: Box::pin(resp.bytes_stream()),
            buf: BytesMut::new(),
            ended: false,
        }
    }

    pub async fn get(url: &str) -> Sse {
        Sse::open(reqwest::Client::new().get(url)).await
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_string())
    }

    /// Next event or comment, or `None` when the stream ended. Panics after `WAIT`.
    pub async fn next_any(&mut self) -> Option<Event> {
        self.next_within(WAIT)
            .await
            .expect("an event within the wait time")
    }

    /// Like `next_any`, but `Err(())` on timeout instead of panicking.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<Event>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(ev) = self.parse_one() {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Err(()),
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Some(Err(_))) | Ok(None) => self.ended = true,
            }
        }
    }

    /// Next real event (comments skipped), or `None` at end of stream.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.next_any().await {
                Some(e) if e.comment => continue,
                other => return other,
            }
        }
    }

    /// Asserts that no real event arrives within `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Err(()) => return,
                Ok(Some(e)) if e.comment => continue,
                Ok(Some(e)) => panic!("unexpected event {e:?}"),
                Ok(None) => return,
            }
        }
    }

    /// Waits for the end of the stream, skipping anything still buffered.
    pub async fn wait_end(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Err(()) => return false,
                Ok(None) => return true,
                Ok(Some(_)) => continue,
            }
        }
    }

    fn parse_one(&mut self) -> Option<Event> {
        // A block ends at a blank line; a lone comment line is reported as soon as it is complete.
        let text = std::str::from_utf8(&self.buf).ok()?;
        if text.starts_with(':') {
            let end = text.find('\n')?;
            let _ = self.buf.split_to(end + 1);
            return Some(Event {
                comment: true,
                ..Default::default()
            });
        }
        if let Some(rest) = text.strip_prefix('\n') {
            let _ = rest;
            let _ = self.buf.split_to(1);
            return self.parse_one();
        }
        let end = text.find("\n\n")?;
        let block = text[..end].to_string();
        let _ = self.buf.split_to(end + 2);
        let mut ev = Event::default();
        let mut data: Vec<&str> = Vec::new();
        for line in block.split('\n') {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => ev.id = Some(value.to_string()),
                "event" => ev.event = Some(value.to_string()),
                "retry" => ev.retry = value.parse().ok(),
                "data" => data.push(value),
                _ => {}
            }
        }
        ev.data = data.join("\n");
        Some(ev)
    }
}

pub async fn get_json(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Waits (bounded) until the hub has exactly `n` subscriptions: registration and removal happen on the
/// server's tasks, after the client-side step that caused them.
pub async fn wait_subscriptions(s: &TestServer, n: usize) {
    for _ in 0..500 {
        if s.hub.subscriptions().len() == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "expected {n} subscriptions, have {}",
        s.hub.subscriptions().len()
    );
}
