//! A Centrifugo-protocol WebSocket client for the tests (tokio-tungstenite + JSON), and the server API.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

pub type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client socket plus the replies of a batched frame not yet looked at.
pub struct Ws {
    pub inner: Stream,
    pub pending: std::collections::VecDeque<Value>,
}

impl std::ops::Deref for Ws {
    type Target = Stream;
    fn deref(&self) -> &Stream {
        &self.inner
    }
}

impl std::ops::DerefMut for Ws {
    fn deref_mut(&mut self) -> &mut Stream {
        &mut self.inner
    }
}

pub const API_KEY: &str = "it-api-key";

pub fn ws_url(s: &TestServer) -> String {
    format!("{}/connection/websocket", s.url.replace("http://", "ws://"))
}

pub async fn open(s: &TestServer) -> Ws {
    Ws {
        inner: tokio_tungstenite::connect_async(ws_url(s))
            .await
            .expect("ws connect")
            .0,
        pending: Default::default(),
    }
}

pub fn conn_token(sub: &str, exp_in: i64) -> String {
    let claims = json!({"sub": sub, "exp": herald::auth::unix_now() as i64 + exp_in});
    let key = jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON reply or push (pings `{}` skipped); panics on close or timeout.
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        if let Some(v) = ws.pending.pop_front() {
            return v;
        }
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .unwrap();
        if let Message::Text(t) = msg {
            for line in t.split('\n') {
                let v: Value = serde_json::from_str(line).unwrap();
                if v != json!({}) {
                    ws.pending.push_back(v);
                }
            }
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
pub async fn closed(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("transport error instead of a close frame: {e}"),
        }
    }
}

pub async fn connected(s: &TestServer, user: &str) -> Ws {
    let mut ws = open(s).await;
    send(
        &mut ws,
        json!({"id": 1, "connect": {"token": conn_token(user, 600)}}),
    )
    .await;
    let reply = next(&mut ws).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    ws
}

pub async fn api(s: &TestServer, method: &str, body: Value) -> Value {
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{}/api/{method}", s.url))
            .header("x-api-key", API_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(status, 200, "{method}: {v}");
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}

/// Any claims, signed with the test key.
pub fn sign_json(claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).unwrap()
}

/// A connected client with this connection token (or none: anonymous).
pub async fn connected_with(s: &TestServer, token: Option<&str>) -> Ws {
    let mut ws = open(s).await;
    let connect = match token {
        Some(t) => json!({"id": 1, "connect": {"token": t}}),
        None => json!({"id": 1, "connect": {}}),
    };
    send(&mut ws, connect).await;
    let reply = next(&mut ws).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    ws
}

/// Sends one command with `id` and returns its reply (pushes that arrive first are kept for `next`).
pub async fn call(ws: &mut Ws, id: u32, cmd: Value) -> Value {
    let mut c = cmd;
    c["id"] = json!(id);
    send(ws, c).await;
    let mut skipped = Vec::new();
    let reply = loop {
        let v = next(ws).await;
        if v["id"] == json!(id) {
            break v;
        }
        skipped.push(v);
    };
    for v in skipped.into_iter().rev() {
        ws.pending.push_front(v);
    }
    reply
}
