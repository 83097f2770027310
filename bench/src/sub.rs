//! Subscribers: SSE over a hand-written HTTP/1.1 GET, WebSocket over tokio-tungstenite (raw frames for
//! nchan, the Centrifugo client protocol v2 for Herald, in JSON or in Protobuf).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Body};
use crate::sse::SseParser;
use crate::stats::{now_us, LossCounter, Sharded, Tracker};
use crate::target::{Payload, ServerKind, Target, Transport};
use herald::frame::centrifugo::proto;
use prost::Message as _;

/// What every subscriber shares.
pub struct Shared {
    pub tracker: Tracker,
    pub latency: Sharded,
    pub channels: usize,
    /// Subscribers that received their channel's warm-up marker.
    pub warm: AtomicU64,
    pub delivered: AtomicU64,
    /// WebSocket message bytes received (frame payloads), to compare the encodings' cost per push.
    pub ws_bytes: AtomicU64,
    pub stop: CancellationToken,
}

/// One subscriber's view, returned by its task when it stops.
#[derive(Debug, Default)]
pub struct SubState {
    pub id: usize,
    pub channel: usize,
    pub counter: LossCounter,
    pub warmed: bool,
    /// Messages of another channel (never expected).
    pub misrouted: u64,
    /// Why the stream ended before it was told to stop.
    pub ended: Option<String>,
}

impl SubState {
    fn on_data(&mut self, shared: &Shared, data: &[u8]) {
        match Payload::find(data) {
            Some(Payload::Msg { index, sent_us }) => {
                let now = now_us();
                let ch = shared.channels as u64;
                if index % ch != self.channel as u64 {
                    self.misrouted += 1;
                    return;
                }
                self.counter.observe(index / ch);
                shared.latency.record(self.id, now.saturating_sub(sent_us));
                shared.tracker.arrived(index as usize, now);
                shared.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Some(Payload::Warm { channel }) if channel == self.channel as u64 && !self.warmed => {
                self.warmed = true;
                shared.warm.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// An open subscription, between the handshake (done during the ramp) and the read loop.
pub enum Conn {
    Sse {
        stream: TcpStream,
        body: Body,
        first: Vec<u8>,
    },
    Ws {
        ws: Box<WebSocketStream<TcpStream>>,
        codec: WsCodec,
    },
}

/// How a WebSocket subscriber reads its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsCodec {
    /// nchan: each frame is one message.
    Raw,
    /// Herald, Centrifugo protocol in JSON (newline-delimited replies, `{}` pings).
    Json,
    /// Herald, Centrifugo protocol in Protobuf (varint-delimited replies, empty-reply pings).
    Protobuf,
}

/// Connects and subscribes `channel`: returns once the server answered the subscription (SSE response head,
/// WebSocket upgrade, Centrifugo `subscribe` reply).
pub async fn open(
    target: &Target,
    addr: SocketAddr,
    transport: Transport,
    channel: &str,
    src: Option<IpAddr>,
) -> anyhow::Result<Conn> {
    let mut stream = http::connect(addr, src).await?;
    let path = target.sub_path(transport, channel);
    match transport {
        Transport::Sse => {
            let (status, body, first) =
                http::get_stream(&mut stream, &addr.to_string(), &path, "text/event-stream")
                    .await?;
            if status != 200 {
                bail!("subscribe: HTTP {status}");
            }
            Ok(Conn::Sse {
                stream,
                body,
                first,
            })
        }
        Transport::Ws | Transport::WsProtobuf => {
            // Small buffers: 10 000 connections with tungstenite's default 128 KiB read buffer would take
            // more memory in the bench than in the server it measures.
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0);
            let url = format!("ws://{addr}{path}");
            let (mut ws, resp) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                    .await
                    .context("websocket handshake")?;
            if resp.status().as_u16() != 101 {
                bail!("websocket upgrade: HTTP {}", resp.status());
            }
            let codec = match (target.kind, transport) {
                (ServerKind::Herald, Transport::WsProtobuf) => WsCodec::Protobuf,
                (ServerKind::Herald, _) => WsCodec::Json,
                _ => WsCodec::Raw,
            };
            match codec {
                WsCodec::Json => {
                    command(&mut ws, 1, r#"{"id":1,"connect":{}}"#.to_string()).await?;
                    let sub = format!(r#"{{"id":2,"subscribe":{{"channel":"{channel}"}}}}"#);
                    command(&mut ws, 2, sub).await?;
                }
                WsCodec::Protobuf => {
                    pb_command(&mut ws, pb_connect()).await?;
                    pb_command(&mut ws, pb_subscribe(channel)).await?;
                }
                WsCodec::Raw => {}
            }
            Ok(Conn::Ws {
                ws: Box::new(ws),
                codec,
            })
        }
    }
}

/// Sends one Centrifugo command and waits for the reply with the same id (pings answered meanwhile).
async fn command(ws: &mut WebSocketStream<TcpStream>, id: u64, cmd: String) -> anyhow::Result<()> {
    ws.send(Message::text(cmd)).await?;
    for _ in 0..100 {
        let msg = match ws.next().await {
            Some(m) => m?,
            None => bail!("closed while waiting for reply {id}"),
        };
        let Message::Text(text) = msg else {
            if let Message::Close(c) = msg {
                bail!("closed while waiting for reply {id}: {c:?}");
            }
            continue;
        };
        for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
            if line.trim() == "{}" {
                ws.send(Message::text("{}")).await?;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).context("reply is not JSON")?;
            if v.get("id").and_then(|i| i.as_u64()) == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("command {id} refused: {e}");
                }
                return Ok(());
            }
        }
    }
    bail!("no reply to command {id}")
}

fn pb_connect() -> proto::Command {
    proto::Command {
        id: 1,
        connect: Some(proto::ConnectRequest::default()),
        ..Default::default()
    }
}

fn pb_subscribe(channel: &str) -> proto::Command {
    proto::Command {
        id: 2,
        subscribe: Some(proto::SubscribeRequest {
            channel: channel.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The replies in one Protobuf frame.
fn pb_replies(mut frame: &[u8]) -> anyhow::Result<Vec<proto::Reply>> {
    let mut out = Vec::new();
    while !frame.is_empty() {
        out.push(
            proto::Reply::decode_length_delimited(&mut frame).context("reply is not Protobuf")?,
        );
    }
    Ok(out)
}

/// The empty command that answers a ping.
fn pb_pong() -> Message {
    Message::binary(proto::Command::default().encode_length_delimited_to_vec())
}

/// Sends one Protobuf command and waits for the reply with its id (pings answered meanwhile).
async fn pb_command(
    ws: &mut WebSocketStream<TcpStream>,
    cmd: proto::Command,
) -> anyhow::Result<()> {
    let id = cmd.id;
    ws.send(Message::binary(cmd.encode_length_delimited_to_vec()))
        .await?;
    for _ in 0..100 {
        let msg = match ws.next().await {
            Some(m) => m?,
            None => bail!("closed while waiting for reply {id}"),
        };
        let Message::Binary(frame) = msg else {
            if let Message::Close(c) = msg {
                bail!("closed while waiting for reply {id}: {c:?}");
            }
            continue;
        };
        for r in pb_replies(&frame)? {
            if r == proto::Reply::default() {
                ws.send(pb_pong()).await?;
            } else if r.id == id {
                if let Some(e) = r.error {
                    bail!("command {id} refused: {} {}", e.code, e.message);
                }
                return Ok(());
            }
        }
    }
    bail!("no reply to command {id}")
}

/// Reads until told to stop (or the stream ends); returns the subscriber's counters.
pub async fn run(conn: Conn, mut st: SubState, shared: Arc<Shared>) -> SubState {
    let r = match conn {
        Conn::Sse {
            stream,
            body,
            first,
        } => read_sse(stream, body, first, &mut st, &shared).await,
        Conn::Ws { ws, codec } => read_ws(*ws, codec, &mut st, &shared).await,
    };
    if let Err(e) = r {
        st.ended = Some(format!("{e:#}"));
    }
    st
}

async fn read_sse(
    mut stream: TcpStream,
    mut body: Body,
    first: Vec<u8>,
    st: &mut SubState,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut parser = SseParser::new();
    let mut feed = |st: &mut SubState, bytes: &[u8]| -> anyhow::Result<bool> {
        body.decode(bytes, |b| {
            parser.feed(b, |ev| st.on_data(shared, ev.data.as_bytes()))
        })
    };
    if !feed(st, &first)? {
        bail!("stream ended");
    }
    let mut buf = vec![0u8; 8192];
    loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return Ok(()),
            r = stream.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    bail!("connection closed by the server");
                }
                if !feed(st, &buf[..n])? {
                    bail!("stream ended");
                }
            }
        }
    }
}

async fn read_ws(
    mut ws: WebSocketStream<TcpStream>,
    codec: WsCodec,
    st: &mut SubState,
    shared: &Shared,
) -> anyhow::Result<()> {
    loop {
        let msg = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return Ok(()),
            m = ws.next() => match m {
                Some(m) => m?,
                None => bail!("connection closed by the server"),
            },
        };
        if let Message::Text(_) | Message::Binary(_) = &msg {
            shared
                .ws_bytes
                .fetch_add(msg.len() as u64, Ordering::Relaxed);
        }
        match msg {
            Message::Binary(frame) if codec == WsCodec::Protobuf => {
                let mut pong = false;
                for r in pb_replies(&frame)? {
                    match r.push.and_then(|p| p.r#pub) {
                        Some(publication) => st.on_data(shared, &publication.data),
                        None => pong = true, // the only other thing pushed here is the ping
                    }
                }
                if pong {
                    ws.send(pb_pong()).await?;
                }
            }
            Message::Text(text) if codec == WsCodec::Json => {
                let mut pong = false;
                for line in text.as_str().split('\n') {
                    if line.trim() == "{}" {
                        pong = true;
                    } else {
                        st.on_data(shared, line.as_bytes());
                    }
                }
                if pong {
                    ws.send(Message::text("{}")).await?;
                }
            }
            Message::Text(text) => st.on_data(shared, text.as_bytes()),
            Message::Binary(b) => st.on_data(shared, &b),
            Message::Close(c) => bail!("closed by the server: {c:?}"),
            _ => {}
        }
    }
}
