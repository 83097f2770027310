//! HTTP/1.1 on the wire for subscriber connections, which Herald serves without hyper (src/server/lean.rs):
//! framing, keep-alive after a finished response, pipelining, HTTP/1.0, and unregistering on disconnect.
//! A raw TCP client, so that nothing a client library smooths over goes unseen.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(10);

/// A response as read off the socket: status, lower-cased headers, de-chunked body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Raw {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(s: &TestServer) -> Raw {
        let addr = s.url.trim_start_matches("http://");
        Raw {
            sock: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        self.sock.write_all(text.as_bytes()).await.unwrap();
    }

    /// Reads more bytes; false at EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.sock.read(&mut chunk))
            .await
            .expect("server answered in time")
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..i].to_vec()).unwrap();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.fill().await, "connection closed mid-line");
        }
    }

    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    async fn head(&mut self) -> Resp {
        let status_line = self.line().await;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap().to_string();
        assert!(version.starts_with("HTTP/1."), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let l = self.line().await;
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').expect("header line");
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        Resp {
            status,
            headers,
            body: Vec::new(),
        }
    }

    /// One chunk of a chunked body (`None` for the last, empty one).
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let size = usize::from_str_radix(&self.line().await, 16).expect("hex chunk size");
        let data = self.bytes(size).await;
        assert_eq!(self.bytes(2).await, b"\r\n", "chunk ends with CRLF");
        (size > 0).then_some(data)
    }

    /// A whole response with a finite body.
    async fn response(&mut self) -> Resp {
        let mut r = self.head().await;
        if let Some(n) = r.header("content-length") {
            r.body = self.bytes(n.parse().unwrap()).await;
        } else if r.header("transfer-encoding") == Some("chunked") {
            while let Some(c) = self.chunk().await {
                r.body.extend_from_slice(&c);
            }
        }
        r
    }

    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 256];
        matches!(
            tokio::time::timeout(WAIT, self.sock.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{extra}\r\n")
}

#[tokio::test]
async fn a_stream_is_chunked_with_date_and_events_arrive_as_chunks() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut c = Raw::connect(&s).await;
    c.send(&get("/.well-known/mercure?topic=t", "")).await;
    let head = c.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(head.header("date").is_some_and(|d| d.ends_with(" GMT")));
    assert_eq!(head.header("content-length"), None);
    assert_eq!(
        c.chunk().await.unwrap(),
        b":\n",
        "a comment opens the stream"
    );
    wait_subscriptions(&s, 1).await;
    s.publish(&[("topic", "t"), ("data", "hello"), ("id", "e1")])
        .await;
    let chunk = String::from_utf8(c.chunk().await.unwrap()).unwrap();
    assert_eq!(chunk, "id: e1\ndata: hello\n\n");
}

#[tokio::test]
async fn a_finished_response_leaves_the_connection_open_for_the_next_request() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut c = Raw::connect(&s).await;
    // A refusal on the subscriber path: a finite JSON body with its length.
    c.send(&get("/.well-known/mercure", "")).await;
    let r = c.response().await;
    assert_eq!(r.status, 400);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["code"], "missing_topic");
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    // Same connection, next request.
    c.send(&get("/healthz", "")).await;
    let r = c.response().await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, br#"{"status":"ok"}"#.as_slice())
    );

    // A stream that ends (its token expires) is terminated with the last chunk, and the connection
    // serves the next request.
    let tok = token(&[], &["t"], Some(1));
    c.send(&get(
        "/.well-known/mercure?topic=t",
        &format!("authorization: Bearer {tok}\r\n"),
    ))
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with(b":\n"),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    c.send(&get("/healthz", "")).await;
    assert_eq!(c.response().await.status, 200);

    // `connection: close` is honoured.
    c.send(&get("/.well-known/mercure", "connection: close\r\n"))
        .await;
    assert_eq!(c.response().await.status, 400);
    assert!(c.closed().await, "closed after the response");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut c = Raw::connect(&s).await;
    c.send(&format!(
        "{}{}{}",
        get("/.well-known/mercure", ""),
        get("/healthz", ""),
        get("/.well-known/mercure?topic=a", "")
    ))
    .await;
    assert_eq!(c.response().await.status, 400);
    assert_eq!(c.response().await.status, 200);
    let head = c.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
}

#[tokio::test]
async fn http_1_0_subscribers_are_served_until_close() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut c = Raw::connect(&s).await;
    c.send("GET /.well-known/mercure?topic=t HTTP/1.0\r\n\r\n")
        .await;
    let head = c.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("transfer-encoding"),
        None,
        "no chunking in HTTP/1.0"
    );
    wait_subscriptions(&s, 1).await;
    s.publish(&[("topic", "t"), ("data", "old client"), ("id", "e1")])
        .await;
    let want = b"id: e1\ndata: old client\n\n";
    while !c.buf.windows(want.len()).any(|w| w == want) {
        assert!(c.fill().await, "stream ended early");
    }
}

#[tokio::test]
async fn a_subscriber_that_hangs_up_is_unregistered() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut c = Raw::connect(&s).await;
    c.send(&get("/.well-known/mercure?topic=t", "")).await;
    assert_eq!(c.head().await.status, 200);
    wait_subscriptions(&s, 1).await;
    assert_eq!(s.hub.connection_count(), 1);
    drop(c);
    wait_subscriptions(&s, 0).await;
    assert_eq!(s.hub.connection_count(), 0);
}
