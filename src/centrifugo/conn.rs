//! One WebSocket connection speaking the Centrifugo client protocol v2, in JSON or Protobuf.
//!
//! The protocol's messages (`frame::centrifugo::proto`) are the model; the connection's [`Codec`], chosen at
//! the upgrade, turns frames into commands and replies into frames, so every handler below is written once
//! for both encodings.
//!
//! A single task owns the socket and serves, in one `select!`: commands from the client (replies batched into
//! one frame), deliveries from the connection's outbox (pushes, coalesced), server API controls, and a shared
//! 250 ms tick for deadlines and pings (connect, pong, token expiry). One task means replies and pushes are
//! naturally ordered: a subscribe reply (with its recovered publications) is written before any live
//! publication of that channel, which the hub has queued since registration.
//!
//! Writes race the outbox's `closed` token: when the hub disconnects a slow client, a write stuck on a full
//! socket is abandoned and a close frame `3008 slow` is queued behind what was already written, so a client
//! that resumes reading learns why it was cut off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::{Control, Registration};
use crate::access::{ChannelError, Identity};
use crate::auth::{unix_now, Claims, Role};
use crate::error::ApiError;
use crate::frame::centrifugo::codec::{Codec, PROTOBUF_SUBPROTOCOL};
use crate::frame::centrifugo::{proto, publication};
use crate::hub::{
    ClientInfo, ConnectionGuard, Delivery, DisconnectReason, NewPublication, Outbox, PresenceGuard,
    SubscribeSpec, Subscription, Transport,
};
use crate::state::AppState;
use crate::topic::Selector;

const VERSION: &str = concat!("herald ", env!("CARGO_PKG_VERSION"));
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket read buffer, zero-filled and so resident for the connection's life. tungstenite's default
/// (128 KiB) would make an idle connection cost thirty times what the rest of it does. SDK commands
/// (subscribe, ping replies) fit in one read; a connect with a long token or a large publish takes a few
/// more reads, which is cheaper than every idle connection paying for the largest command.
const READ_BUFFER: usize = 256;

/// `GET /connection/websocket`. The Origin check happens before the upgrade: a page on a foreign site must
/// not be able to open a socket with the user's cookies (cross-site WebSocket hijacking).
///
/// The encoding is Protobuf when the client offers the `centrifuge-protobuf` subprotocol (it is then selected
/// in the response) or asks for `?format=protobuf`; JSON otherwise.
pub async fn upgrade(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    remote: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    check_origin(&st, &headers)?;
    let ws = ws.protocols([PROTOBUF_SUBPROTOCOL]);
    let asked_protobuf = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .any(|(k, v)| k == "format" && v == "protobuf");
    let codec = if asked_protobuf
        || ws.selected_protocol() == Some(&HeaderValue::from_static(PROTOBUF_SUBPROTOCOL))
    {
        Codec::Protobuf
    } else {
        Codec::Json
    };
    let guard = st
        .hub
        .connect(Transport::WebSocket, remote.map(|r| r.0 .0))?;
    // Frames up to 4x the limit are read so that an oversized one can be refused with a clear close code
    // instead of a transport error.
    let hard_cap = st
        .config
        .centrifugo
        .max_message_size
        .saturating_mul(4)
        .max(4096);
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| {
            // A task of its own for the connection's life: axum's upgrade task would keep its own state
            // (config, the spent callback) beside it for as long as the connection lives.
            tokio::spawn(Box::new(Conn::new(st, guard, socket, codec)).run());
            std::future::ready(())
        }))
}

pub(crate) fn check_origin(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(()); // not a browser
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let same_origin =
        host.is_some_and(|h| origin.split_once("://").is_some_and(|(_, rest)| rest == h));
    if same_origin || st.origins.allows(origin) {
        return Ok(());
    }
    Err(ApiError::forbidden(
        "origin_not_allowed",
        format!("WebSocket from origin {origin} refused: add it to cors.allowed_origins"),
    ))
}

/// A protocol error reply (`{"error":{"code":…,"message":…}}`). The message clients see is Centrifugo's
/// own for the code (SDKs and apps match on them); the detail goes to the log.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) code: u32,
    detail: String,
}

impl Refusal {
    pub(super) fn detail(&self) -> &str {
        &self.detail
    }

    pub(super) fn new(code: u32, detail: impl Into<String>) -> Self {
        Refusal {
            code,
            detail: detail.into(),
        }
    }

    /// Centrifugo's message for the code.
    pub(super) fn message(&self) -> &'static str {
        match self.code {
            100 => "internal server error",
            101 => "unauthorized",
            102 => "unknown channel",
            103 => "permission denied",
            104 => "method not found",
            105 => "already subscribed",
            106 => "limit exceeded",
            107 => "bad request",
            108 => "not available",
            109 => "token expired",
            110 => "expired",
            111 => "too many requests",
            112 => "unrecoverable position",
            _ => "error",
        }
    }
}

/// The longest close reason a WebSocket close frame can carry: 125 bytes of payload minus the 2-byte code.
/// A longer one makes clients (the `ws` package, browsers) drop the frame and see 1006 instead, so the
/// SDK retries forever instead of stopping on a terminal code.
pub(super) const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to [`MAX_CLOSE_REASON`] bytes on a character boundary.
pub(crate) fn fit_close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// How the connection ends.
#[derive(Debug)]
enum Exit {
    /// Close with this code and reason.
    Close(u16, String),
    /// Close with this code and reason, for a reason the hub decided (this client fell behind, or the
    /// server is shutting down): the hub has counted the disconnect already, so it is not counted twice.
    Ended(u16, &'static str),
    /// The peer is gone; nothing to say.
    Gone,
}

fn close(code: u16, reason: &str) -> Exit {
    Exit::Close(code, reason.to_string())
}

/// A subscription of this connection. A connection holds few, so they live in a vector: a map would
/// allocate a table of several slots for the one channel most connections have.
struct ChanSub {
    channel: Arc<str>,
    sub: Subscription,
    /// The client's presence in the channel, where the namespace has presence; dropping it is the leave.
    _presence: Option<PresenceGuard>,
    exp: Option<u64>,
}

/// How a subscription came to be, beyond the client's request.
#[derive(Default)]
struct Grant {
    /// What presence and join/leave show about this subscription (a token's `info`).
    chan_info: Option<Value>,
    /// When the subscription token expires.
    exp: Option<u64>,
    /// The channel as granted by the server (server-side subscriptions) or a subscription token.
    channel: Option<String>,
    /// Data for the subscribe result (a `subs` claim's `data`, the server API's `data`/`b64data`).
    data: Option<Bytes>,
    /// Subscribed by the server: join/leave are pushed only when the namespace forces them.
    server_side: bool,
}

/// Everything one connection holds for its life, owned by its task and used in place: an idle connection
/// costs the size of this struct plus the futures of the one `select!` it waits in, so the socket is not
/// split (a split adds a shared lock and a send slot) and nothing here is copied into locals.
struct Conn {
    st: AppState,
    socket: WebSocket,
    rx: crate::queue::Receiver<Delivery>,
    ctl_rx: crate::queue::Receiver<Control>,
    outbox: Outbox,
    ctl: crate::queue::Sender<Control>,
    guard: ConnectionGuard,
    /// The connection's place in the registry of connections by user; dropping it removes it.
    registration: Option<Registration>,
    /// When the deadline clock will next wake this connection, if it is set to.
    scheduled: Option<Instant>,
    /// The client id, shared with the registry entry (no copy per connection).
    client: Arc<str>,
    /// Who this connection is, from its connection token; what it may read is decided by `access` from it.
    who: Arc<Identity>,
    conn_info: Option<Value>,
    codec: Codec,
    connected: bool,
    exp: Option<u64>,
    subs: Vec<ChanSub>,
    tokens: f64,
    refilled: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
    opened: Instant,
}

/// Pushes waiting in the outbox are joined into one frame up to this many bytes.
const JOIN_LIMIT: usize = 16 * 1024;

fn reply(id: u32) -> proto::Reply {
    proto::Reply {
        id,
        ..Default::default()
    }
}

fn push(channel: &str, fill: impl FnOnce(&mut proto::Push)) -> proto::Reply {
    let mut p = proto::Push {
        channel: channel.to_string(),
        ..Default::default()
    };
    fill(&mut p);
    proto::Reply {
        push: Some(p),
        ..Default::default()
    }
}

/// JSON for a `bytes` field (`info`, `data`).
fn json_bytes(v: &Option<Value>) -> Bytes {
    v.as_ref()
        .map(|v| Bytes::from(v.to_string()))
        .unwrap_or_default()
}

/// A presence entry as the protocol shows it.
pub(super) fn client_info(c: &ClientInfo) -> proto::ClientInfo {
    proto::ClientInfo {
        user: c.user.clone(),
        client: c.client.clone(),
        conn_info: json_bytes(&c.conn_info),
        chan_info: json_bytes(&c.chan_info),
    }
}

fn ttl(exp: u64) -> u32 {
    u32::try_from(exp.saturating_sub(unix_now())).unwrap_or(u32::MAX)
}

impl Conn {
    fn new(st: AppState, guard: ConnectionGuard, socket: WebSocket, codec: Codec) -> Conn {
        let (outbox, rx) = st.hub.outbox(None);
        // Controls and deadline wake-ups are rare: the queue keeps no buffer between them.
        let (ctl, ctl_rx) = crate::queue::channel_keeping(64, 0);
        Conn {
            socket,
            rx,
            ctl_rx,
            outbox,
            ctl,
            guard,
            registration: None,
            scheduled: None,
            client: uuid::Uuid::new_v4().to_string().into(),
            who: Identity::anonymous(),
            conn_info: None,
            codec,
            connected: false,
            exp: None,
            subs: Vec::new(),
            tokens: st.config.centrifugo.command_burst as f64,
            refilled: Instant::now(),
            next_ping: None,
            pong_deadline: None,
            opened: Instant::now(),
            st,
        }
    }

    /// The connection's life: serve until something ends it, say why in a close frame, unregister.
    /// Boxed: an async fn keeps its argument twice (as given and as moved in), which for the connection
    /// state would be a second copy of it in every idle task.
    ///
    /// Everything the connection registered (its subscriptions, presence, its place in the registry by
    /// user, its connection count) is held by guards in this struct, so it is released when the struct is
    /// dropped, however the task ends: returning, or unwinding from a panic.
    async fn run(mut self: Box<Self>) {
        self.reschedule();
        match self.serve().await {
            Exit::Close(code, reason) => {
                self.st.hub.count_disconnect(match code {
                    3008 => DisconnectReason::SlowConsumer,
                    3005 => DisconnectReason::TokenExpired,
                    3001 => DisconnectReason::Shutdown,
                    _ => DisconnectReason::Server,
                });
                Box::pin(self.close(code, reason)).await;
            }
            Exit::Ended(code, reason) => Box::pin(self.close(code, reason.to_string())).await,
            Exit::Gone => {}
        }
    }

    async fn close(&mut self, code: u16, reason: String) {
        tracing::debug!(client = %self.client, code, reason, "closing WebSocket");
        let reason = fit_close_reason(&reason).to_string();
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.send(Message::Close(Some(frame))))
            .await;
    }

    /// Waits for the next event and handles it. Only the waiting is inline; every handler that writes is a
    /// boxed future, allocated while it runs, so the task of an idle connection stays small.
    async fn serve(&mut self) -> Exit {
        loop {
            let step: Result<(), Exit> = tokio::select! {
                biased;
                msg = self.socket.recv() => match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Err(Exit::Gone),
                    Some(Ok(Message::Text(text))) if !self.codec.binary() => {
                        Box::pin(self.on_frame(Bytes::from(text))).await
                    }
                    Some(Ok(Message::Binary(data))) if self.codec.binary() => {
                        Box::pin(self.on_frame(data)).await
                    }
                    Some(Ok(Message::Text(_))) => Err(close(3501, "bad request: this connection speaks Protobuf in binary frames")),
                    Some(Ok(Message::Binary(_))) => Err(close(3501, "bad request: this connection speaks JSON in text frames")),
                    Some(Ok(_)) => Ok(()),
                },
                d = self.rx.recv() => match d {
                    Some(d) => Box::pin(self.deliver(d)).await,
                    None => Err(self.closed_exit()),
                },
                c = self.ctl_rx.recv() => match c {
                    Some(Control::Deadline) => Box::pin(self.check_deadlines()).await,
                    Some(c) => Box::pin(self.control(c)).await,
                    None => Ok(()),
                },
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    /// The hub closed the outbox: at shutdown, or because this client fell behind (counted there).
    fn closed_exit(&self) -> Exit {
        if self.st.hub.is_shutting_down() {
            Exit::Ended(3001, "shutdown")
        } else {
            Exit::Ended(3008, "slow")
        }
    }

    async fn on_frame(&mut self, frame: Bytes) -> Result<(), Exit> {
        if frame.len() > self.st.config.centrifugo.max_message_size {
            return Err(close(1009, "message too big"));
        }
        let commands = self.codec.decode(&frame).map_err(|e| {
            tracing::debug!(client = %self.client, error = %e, "undecodable command frame");
            close(3501, "bad request: undecodable command")
        })?;
        drop(frame);
        let mut replies = Vec::new();
        for cmd in commands {
            if let Some(r) = self.handle(cmd).await? {
                replies.push(self.codec.encode(&r));
            }
        }
        // A command may have moved a deadline (connect, refresh, a subscription token's expiry).
        self.reschedule();
        if replies.is_empty() {
            return Ok(());
        }
        let frame = self.codec.join(replies);
        self.write(frame).await
    }

    /// Writes `d` and whatever else is already queued (up to 64 pushes, up to `JOIN_LIMIT` bytes) as one
    /// frame. The byte bound matters beyond the write: tungstenite keeps its frame buffer at the size of the
    /// largest frame written, for the connection's life.
    async fn deliver(&mut self, d: Delivery) -> Result<(), Exit> {
        let mut frames: Vec<Bytes> = Vec::new();
        self.encode(d, &mut frames);
        let mut bytes: usize = frames.iter().map(Bytes::len).sum();
        while frames.len() < 64 && bytes < JOIN_LIMIT {
            match self.rx.try_recv() {
                Some(d) => {
                    let before = frames.len();
                    self.encode(d, &mut frames);
                    bytes += frames[before..].iter().map(Bytes::len).sum::<usize>();
                }
                None => break,
            }
        }
        if frames.is_empty() {
            return Ok(());
        }
        let frame = self.codec.join(frames);
        self.write(frame).await
    }

    /// Writes one frame; gives up when the hub has disconnected this client or the socket stays full.
    async fn write(&mut self, frame: Bytes) -> Result<(), Exit> {
        let msg = if self.codec.binary() {
            Message::Binary(frame)
        } else {
            // Every JSON encoding is built from Rust strings; a failure would drop the frame, not panic.
            match Utf8Bytes::try_from(frame) {
                Ok(text) => Message::Text(text),
                Err(_) => return Ok(()),
            }
        };
        tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, self.socket.send(msg)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Exit::Gone),
                Err(_) => Err(close(3008, "slow")),
            },
            _ = self.rx.closed() => Err(self.closed_exit()),
        }
    }

    async fn write_reply(&mut self, r: &proto::Reply) -> Result<(), Exit> {
        let frame = self.codec.encode(r);
        self.write(frame).await
    }

    /// Publications are passed on as their shared encoding (a reference count, no copy).
    fn encode(&self, d: Delivery, out: &mut Vec<Bytes>) {
        match d {
            Delivery::Pub { sub, publication } => {
                if let Some(s) = self.subs.iter().find(|s| s.sub.id == sub) {
                    out.push(publication.centrifugo_push(&s.channel, self.codec));
                }
            }
            Delivery::Join { channel, info, .. } => {
                let r = push(&channel, |p| {
                    p.join = Some(proto::Join {
                        info: Some(client_info(&info)),
                    })
                });
                out.push(self.codec.encode(&r));
            }
            Delivery::Leave { channel, info, .. } => {
                let r = push(&channel, |p| {
                    p.leave = Some(proto::Leave {
                        info: Some(client_info(&info)),
                    })
                });
                out.push(self.codec.encode(&r));
            }
        }
    }

    fn sub(&self, channel: &str) -> Option<&ChanSub> {
        self.subs.iter().find(|s| &*s.channel == channel)
    }

    /// The earliest of this connection's deadlines: the connect timeout, the next ping, the pong deadline,
    /// and the token expiries (connection and subscriptions, plus the refresh grace).
    fn next_deadline(&self) -> Option<Instant> {
        let cfg = &self.st.config.centrifugo;
        let now = Instant::now();
        let unix = unix_now();
        let grace = cfg.refresh_grace.as_secs();
        let expiry = |exp: u64| now + Duration::from_secs((exp + grace).saturating_sub(unix) + 1);
        let connect = (!self.connected).then(|| self.opened + cfg.connect_timeout);
        connect
            .into_iter()
            .chain(self.next_ping)
            .chain(self.pong_deadline)
            .chain(self.exp.map(expiry))
            .chain(self.subs.iter().filter_map(|s| s.exp).map(expiry))
            .min()
    }

    /// Asks the deadline clock to wake this connection at its next deadline, unless it already will by then.
    fn reschedule(&mut self) {
        let Some(next) = self.next_deadline() else {
            return;
        };
        if self.scheduled.is_some_and(|at| at <= next) {
            return;
        }
        self.scheduled = Some(next);
        self.st
            .clients
            .deadlines(&self.st.hub.shutdown_token())
            .schedule(next, self.ctl.clone());
    }

    /// Woken by the deadline clock: acts on what is due, then sets the next wake-up.
    async fn check_deadlines(&mut self) -> Result<(), Exit> {
        if self.scheduled.is_some_and(|at| at <= Instant::now()) {
            self.scheduled = None;
        }
        self.act_on_deadlines().await?;
        self.reschedule();
        Ok(())
    }

    async fn act_on_deadlines(&mut self) -> Result<(), Exit> {
        let cfg = &self.st.config.centrifugo;
        if self.st.hub.is_shutting_down() {
            return Err(Exit::Ended(3001, "shutdown"));
        }
        if !self.connected && self.opened.elapsed() > cfg.connect_timeout {
            return Err(close(3502, "stale: no connect command"));
        }
        let now = Instant::now();
        if self.pong_deadline.is_some_and(|d| now > d) {
            return Err(close(3012, "no pong"));
        }
        let ping_due = self.next_ping.is_some_and(|at| now >= at);
        let unix = unix_now();
        let grace = cfg.refresh_grace.as_secs();
        if self.exp.is_some_and(|exp| unix > exp + grace) {
            return Err(close(3005, "connection expired"));
        }
        if ping_due {
            self.next_ping = Some(now + cfg.ping.max(Duration::from_millis(10)));
            if self.pong_deadline.is_none() {
                self.pong_deadline = Some(now + cfg.pong_timeout);
            }
            let ping = self.codec.ping();
            self.write(ping).await?;
        }
        let expired: Vec<String> = self
            .subs
            .iter()
            .filter(|s| s.exp.is_some_and(|exp| unix > exp + grace))
            .map(|s| s.channel.to_string())
            .collect();
        for ch in expired {
            self.remove_sub(&ch);
            let r = push(&ch, |p| {
                p.unsubscribe = Some(proto::Unsubscribe {
                    code: 2501,
                    reason: "subscription expired".into(),
                })
            });
            self.write_reply(&r).await?;
        }
        Ok(())
    }

    /// Takes one token from the command bucket.
    fn allow_command(&mut self) -> bool {
        let cfg = &self.st.config.centrifugo;
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens =
            (self.tokens + elapsed * cfg.command_rate as f64).min(cfg.command_burst as f64);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// One command: its reply (`None` for a pong or a `send`), or how the connection ends.
    async fn handle(&mut self, cmd: proto::Command) -> Result<Option<proto::Reply>, Exit> {
        let id = cmd.id;
        let is_pong = id == 0
            && cmd.connect.is_none()
            && cmd.subscribe.is_none()
            && cmd.publish.is_none()
            && cmd.send.is_none();
        if is_pong {
            self.pong_deadline = None;
            return Ok(None);
        }
        if !self.connected && cmd.connect.is_none() {
            return Err(close(
                3501,
                "bad request: the first command must be connect",
            ));
        }
        if id != 0 && !self.allow_command() {
            return Ok(Some(error_reply(
                id,
                &Refusal::new(111, "command rate"),
                true,
            )));
        }
        let mut r = reply(id);
        let outcome: Result<(), Refusal> = if let Some(req) = cmd.connect {
            if self.connected {
                return Err(close(3501, "bad request: already connected"));
            }
            return self.connect(id, req).await.map(Some);
        } else if let Some(req) = cmd.subscribe {
            self.client_subscribe(req)
                .await?
                .map(|v| r.subscribe = Some(v))
        } else if let Some(req) = cmd.unsubscribe {
            self.remove_sub(&req.channel);
            r.unsubscribe = Some(proto::UnsubscribeResult {});
            Ok(())
        } else if let Some(req) = cmd.publish {
            self.publish(req)
                .await
                .map(|()| r.publish = Some(proto::PublishResult {}))
        } else if let Some(req) = cmd.presence {
            // `self` is not shared across the await (a connection is not Sync): only its state is.
            match self.check_presence(&req.channel) {
                Ok(()) => presence_result(&self.st, &req.channel)
                    .await
                    .map(|v| r.presence = Some(v)),
                Err(e) => Err(e),
            }
        } else if let Some(req) = cmd.presence_stats {
            match self.check_presence(&req.channel) {
                Ok(()) => presence_stats_result(&self.st, &req.channel)
                    .await
                    .map(|v| r.presence_stats = Some(v)),
                Err(e) => Err(e),
            }
        } else if let Some(req) = cmd.history {
            self.history(req).await.map(|v| r.history = Some(v))
        } else if let Some(req) = cmd.refresh {
            return self.refresh(id, req).map(Some);
        } else if let Some(req) = cmd.sub_refresh {
            self.sub_refresh(req)?.map(|v| r.sub_refresh = Some(v))
        } else if cmd.rpc.is_some() {
            Err(Refusal::new(108, "no RPC handlers on this server"))
        } else if cmd.ping.is_some() {
            r.ping = Some(proto::PingResult {});
            Ok(())
        } else if cmd.send.is_some() {
            return Ok(None);
        } else {
            Err(Refusal::new(104, "a command without a method"))
        };
        Ok(Some(match outcome {
            Ok(()) => r,
            Err(refusal) => error_reply(id, &refusal, false),
        }))
    }

    async fn connect(&mut self, id: u32, req: proto::ConnectRequest) -> Result<proto::Reply, Exit> {
        let claims = if req.token.is_empty() {
            if !self.st.auth.allow_anonymous {
                return Err(close(3500, "invalid token: a connection token is required"));
            }
            None
        } else {
            match self.verify_conn_token(id, &req.token)? {
                Ok(c) => Some(c),
                Err(reply) => return Ok(reply),
            }
        };
        // Server-side subscriptions: the token's `channels`, its `subs` (with options), the personal channel.
        let mut server_side: Vec<(String, Grant)> = Vec::new();
        if let Some(c) = claims {
            self.who = Arc::new(Identity::from_claims(&c));
            self.exp = c.exp;
            self.conn_info = c.info;
            for ch in c.channels {
                server_side.push((ch, Grant::default()));
            }
            for (ch, options) in c.subs {
                let grant = Grant {
                    chan_info: options.get("info").cloned(),
                    data: options.get("data").map(|d| Bytes::from(d.to_string())),
                    ..Default::default()
                };
                server_side.push((ch, grant));
            }
        }
        self.connected = true;
        self.next_ping = Some(Instant::now() + self.st.config.centrifugo.ping);
        self.registration = Some(self.st.clients.add(
            self.who.clone(),
            self.client.clone(),
            self.ctl.clone(),
            self.guard.meta().clone(),
        ));

        if self.st.config.centrifugo.subscribe_to_personal {
            if let Some(p) = self.st.access.personal_channel(&self.who.user) {
                server_side.push((p, Grant::default()));
            }
        }
        let mut subs = std::collections::BTreeMap::new();
        for (ch, mut grant) in server_side {
            if subs.contains_key(&ch) {
                continue;
            }
            let sreq = req.subs.get(&ch).cloned().unwrap_or_default();
            let sreq = proto::SubscribeRequest {
                channel: ch.clone(),
                ..sreq
            };
            // The server chose these channels: they are granted, but `access` still applies its rules
            // (nothing reads another user's `#` channel).
            grant.channel = Some(ch.clone());
            grant.server_side = true;
            match self.subscribe(sreq, grant).await {
                Ok(v) => {
                    subs.insert(ch, v);
                }
                Err(r) => {
                    tracing::warn!(channel = %ch, code = r.code, error = %r.detail, "server-side subscription refused")
                }
            }
        }
        let cfg = &self.st.config.centrifugo;
        let mut result = proto::ConnectResult {
            client: self.client.to_string(),
            version: VERSION.into(),
            ping: u32::try_from(cfg.ping.as_secs().max(1)).unwrap_or(u32::MAX),
            pong: true,
            subs,
            ..Default::default()
        };
        if let Some(exp) = self.exp {
            result.expires = true;
            result.ttl = ttl(exp);
        }
        let mut r = reply(id);
        r.connect = Some(result);
        Ok(r)
    }

    /// Verifies a connection token. An expired one is an error reply (109: the SDK fetches a new token and
    /// retries); any other fault ends the connection (3500).
    fn verify_conn_token(
        &self,
        id: u32,
        token: &str,
    ) -> Result<Result<Claims, proto::Reply>, Exit> {
        match self.st.auth.verify(Role::Subscriber, token) {
            Ok(c) => Ok(Ok(c)),
            Err(e) if e.code == "token_expired" => Ok(Err(error_reply(
                id,
                &Refusal::new(109, "connection token expired"),
                false,
            ))),
            Err(e) => {
                tracing::info!(client = %self.client, code = e.code, error = %e.message, "connection token refused");
                Err(close(3500, &format!("invalid token: {}", e.code)))
            }
        }
    }

    fn info(&self, chan_info: Option<Value>) -> ClientInfo {
        ClientInfo {
            client: self.client.to_string(),
            user: self.who.user.clone(),
            conn_info: self.conn_info.clone(),
            chan_info,
        }
    }

    /// A `subscribe` command. A subscription token that is not valid for this channel and user ends the
    /// connection (3500), as Centrifugo does: the SDK must not retry with it.
    async fn client_subscribe(
        &mut self,
        req: proto::SubscribeRequest,
    ) -> Result<Result<proto::SubscribeResult, Refusal>, Exit> {
        if let Err(e) = self.st.access.channel(&req.channel) {
            return Ok(Err(channel_refusal(e, &req.channel)));
        }
        let grant = if req.token.is_empty() {
            Grant::default()
        } else {
            match self.verify_sub_token(&req.token, &req.channel)? {
                Ok(claims) => Grant {
                    chan_info: claims.info,
                    exp: claims.exp,
                    channel: Some(req.channel.clone()),
                    ..Default::default()
                },
                Err(r) => return Ok(Err(r)),
            }
        };
        Ok(self.subscribe(req, grant).await)
    }

    /// Verifies a subscription token for `channel`: expired is error 109 (the SDK gets a new one), anything
    /// else (bad signature, another channel, another user) closes the connection with 3500.
    fn verify_sub_token(
        &self,
        token: &str,
        channel: &str,
    ) -> Result<Result<Claims, Refusal>, Exit> {
        let claims = match self.st.auth.verify(Role::Subscriber, token) {
            Ok(c) => c,
            Err(e) if e.code == "token_expired" => {
                return Ok(Err(Refusal::new(109, "subscription token expired")))
            }
            Err(e) => {
                tracing::info!(client = %self.client, channel, code = e.code, error = %e.message, "subscription token refused");
                return Err(close(3500, &format!("invalid token: {}", e.code)));
            }
        };
        let for_user = claims.sub.as_deref().unwrap_or("");
        if claims.channel.as_deref() != Some(channel) || for_user != self.who.user {
            tracing::info!(client = %self.client, channel, token_channel = ?claims.channel, token_user = for_user, "subscription token for another channel or user");
            return Err(close(
                3500,
                "invalid token: the subscription token is for another channel or user",
            ));
        }
        Ok(Ok(claims))
    }

    /// Registers a subscription and builds its `SubscribeResult`, recovering missed publications when asked.
    /// Every way of subscribing (a client's command, the connection token's channels and subs, the server
    /// API) comes through here, so `access` decides all of them. Recovery is all or nothing: the gap is
    /// returned only if the epoch matches, retention deleted nothing after the client's offset, and it fits
    /// `recovery_max_publications`; records this subscription may not read (private ones) are left out of
    /// it, as they are left out live.
    async fn subscribe(
        &mut self,
        req: proto::SubscribeRequest,
        grant: Grant,
    ) -> Result<proto::SubscribeResult, Refusal> {
        let max_channels = self.st.config.centrifugo.max_channels_per_connection;
        let max = self.st.config.centrifugo.recovery_max_publications;
        let name = req.channel.clone();
        let ns = self
            .st
            .access
            .channel(&name)
            .map_err(|e| channel_refusal(e, &name))?
            .clone();
        if self.sub(&name).is_some() {
            return Err(Refusal::new(105, format!("already subscribed to {name}")));
        }
        if self.subs.len() >= max_channels {
            return Err(Refusal::new(
                106,
                format!("more than {max_channels} channels on one connection"),
            ));
        }
        let selectors = vec![Selector::Exact(name.as_str().into())];
        let filter = self
            .st
            .access
            .reader(self.who.clone(), &selectors, grant.channel.as_deref())
            .map_err(|(ch, denied)| Refusal::new(103, format!("{ch}: {denied}")))?;
        // Join/leave go to subscribers that asked for them (the SDK's `joinLeave`), or to all when the
        // namespace forces them; only where the namespace has them at all.
        let asked = req.join_leave && !grant.server_side;
        let spec = SubscribeSpec {
            selectors,
            filter,
            subscriber: self.client.to_string(),
            payload: None,
            join_leave: ns.join_leave && (asked || ns.force_push_join_leave),
            conn: Some(self.guard.meta().clone()),
            observer: false,
        };
        let sub = self
            .st
            .hub
            .subscribe(spec, &self.outbox)
            .map_err(|e| Refusal::new(100, e.to_string()))?;
        let upto = sub.registered_at;
        let wants_recovery = req.recover && ns.recovery;
        let epoch = self.st.hub.epoch();
        let epoch_ok = req.epoch == epoch;
        let offset = req.offset;
        let spec = sub.spec.clone();
        let engine = self.st.hub.engine();
        let recovery = async {
            let top = engine.channel_top(name.clone(), upto).await?.unwrap_or(0);
            if !(wants_recovery && epoch_ok)
                || engine.channel_pruned_upto(name.clone()).await? > offset
            {
                return Ok((top, None));
            }
            let mut recs = engine
                .read_channel(name.clone(), offset, upto, max + 1)
                .await?;
            if recs.len() > max {
                return Ok((top, None));
            }
            recs.retain(|r| spec.wants(r));
            Ok::<_, crate::log::LogError>((top, Some(recs)))
        };
        let (top, recovered) = recovery
            .await
            .map_err(|e| Refusal::new(100, e.to_string()))?;

        let mut result = proto::SubscribeResult {
            data: grant.data.unwrap_or_default(),
            ..Default::default()
        };
        if ns.recovery {
            result.recoverable = true;
            result.epoch = epoch;
            result.offset = top;
        }
        if wants_recovery {
            result.was_recovering = true;
            result.recovered = recovered.is_some();
        }
        if let Some(recs) = recovered {
            result.publications = recs.iter().map(publication).collect();
        }
        if let Some(exp) = grant.exp {
            result.expires = true;
            result.ttl = ttl(exp);
        }
        // One allocation for the name, shared by this record and the presence guard.
        let channel: Arc<str> = name.as_str().into();
        let presence = ns.presence.then(|| {
            self.st
                .hub
                .join(channel.clone(), self.info(grant.chan_info))
        });
        self.subs.reserve_exact(1); // most connections hold one or two; a vector's default growth is 4
        self.subs.push(ChanSub {
            channel,
            sub,
            _presence: presence,
            exp: grant.exp,
        });
        Ok(result)
    }

    /// Ends a subscription: dropping it unregisters it from the hub and ends its presence.
    fn remove_sub(&mut self, channel: &str) {
        if let Some(i) = self.subs.iter().position(|s| &*s.channel == channel) {
            self.subs.swap_remove(i);
        }
    }

    async fn publish(&mut self, req: proto::PublishRequest) -> Result<(), Refusal> {
        let ns = self
            .st
            .access
            .channel(&req.channel)
            .map_err(|e| channel_refusal(e, &req.channel))?;
        let subscribed = self.sub(&req.channel).is_some();
        self.st
            .access
            .check_client_publish(&self.who, &req.channel, ns, subscribed)
            .map_err(|d| Refusal::new(103, format!("publish into {}: {d}", req.channel)))?;
        if req.data.is_empty() {
            return Err(Refusal::new(107, "publish without data"));
        }
        let info = serde_json::to_string(&self.info(None)).ok();
        self.st
            .hub
            .publish(NewPublication {
                topics: vec![req.channel],
                data: req.data,
                info,
                ..Default::default()
            })
            .await
            .map_err(|e| match e {
                crate::hub::HubError::MessageTooLarge { .. } => Refusal::new(106, e.to_string()),
                other => Refusal::new(100, other.to_string()),
            })?;
        Ok(())
    }

    /// Presence is for subscribers of the channel: `access` decided when they subscribed.
    fn check_presence(&self, channel_name: &str) -> Result<(), Refusal> {
        let ns = self
            .st
            .access
            .channel(channel_name)
            .map_err(|e| channel_refusal(e, channel_name))?;
        if !ns.presence {
            return Err(Refusal::new(
                108,
                format!("presence is off for the namespace of {channel_name}"),
            ));
        }
        if self.sub(channel_name).is_none() {
            return Err(Refusal::new(
                103,
                format!("presence of {channel_name} without a subscription"),
            ));
        }
        Ok(())
    }

    /// History is for subscribers of the channel, filtered by what their subscription may read.
    async fn history(
        &mut self,
        req: proto::HistoryRequest,
    ) -> Result<proto::HistoryResult, Refusal> {
        let ns = self
            .st
            .access
            .channel(&req.channel)
            .map_err(|e| channel_refusal(e, &req.channel))?;
        if !ns.history {
            return Err(Refusal::new(
                108,
                format!("history is off for the namespace of {}", req.channel),
            ));
        }
        let Some(spec) = self.sub(&req.channel).map(|s| s.sub.spec.clone()) else {
            return Err(Refusal::new(
                103,
                format!("history of {} without a subscription", req.channel),
            ));
        };
        history_result(
            &self.st,
            &req.channel,
            req.limit,
            req.since.map(|s| (s.offset, s.epoch)),
            req.reverse,
            Some(spec),
        )
        .await
    }

    fn refresh(&mut self, id: u32, req: proto::RefreshRequest) -> Result<proto::Reply, Exit> {
        let claims = match self.verify_conn_token(id, &req.token)? {
            Ok(c) => c,
            Err(reply) => return Ok(reply),
        };
        if claims.sub.unwrap_or_default() != self.who.user {
            return Err(close(
                3500,
                "invalid token: the refresh token is for another user",
            ));
        }
        self.exp = claims.exp;
        if claims.info.is_some() {
            self.conn_info = claims.info;
        }
        let mut result = proto::RefreshResult {
            client: self.client.to_string(),
            version: VERSION.into(),
            ..Default::default()
        };
        if let Some(exp) = self.exp {
            result.expires = true;
            result.ttl = ttl(exp);
        }
        let mut r = reply(id);
        r.refresh = Some(result);
        Ok(r)
    }

    fn sub_refresh(
        &mut self,
        req: proto::SubRefreshRequest,
    ) -> Result<Result<proto::SubRefreshResult, Refusal>, Exit> {
        if self.sub(&req.channel).is_none() {
            return Ok(Err(Refusal::new(
                103,
                format!("sub_refresh of {} without a subscription", req.channel),
            )));
        }
        let claims = match self.verify_sub_token(&req.token, &req.channel)? {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        if let Some(s) = self.subs.iter_mut().find(|s| *s.channel == *req.channel) {
            s.exp = claims.exp;
        }
        let mut result = proto::SubRefreshResult::default();
        if let Some(exp) = claims.exp {
            result.expires = true;
            result.ttl = ttl(exp);
        }
        Ok(Ok(result))
    }

    async fn control(&mut self, c: Control) -> Result<(), Exit> {
        let r = self.apply_control(c).await;
        // A server-side subscribe or refresh may have moved a deadline.
        self.reschedule();
        r
    }

    async fn apply_control(&mut self, c: Control) -> Result<(), Exit> {
        match c {
            Control::Subscribe {
                channel,
                info,
                data,
                expire_at,
            } => {
                let req = proto::SubscribeRequest {
                    channel: channel.clone(),
                    ..Default::default()
                };
                let grant = Grant {
                    chan_info: info.and_then(|i| serde_json::from_slice(&i).ok()),
                    data: data.map(Bytes::from),
                    exp: expire_at,
                    channel: Some(channel.clone()),
                    server_side: true,
                };
                match self.subscribe(req, grant).await {
                    Ok(result) => {
                        let r = push(&channel, |p| {
                            p.subscribe = Some(proto::Subscribe {
                                recoverable: result.recoverable,
                                epoch: result.epoch,
                                offset: result.offset,
                                data: result.data,
                                ..Default::default()
                            })
                        });
                        self.write_reply(&r).await
                    }
                    Err(r) => {
                        tracing::debug!(channel = %channel, code = r.code, error = %r.detail, "server-side subscribe refused");
                        Ok(())
                    }
                }
            }
            Control::Unsubscribe { channel } => {
                if self.sub(&channel).is_some() {
                    self.remove_sub(&channel);
                    let r = push(&channel, |p| {
                        p.unsubscribe = Some(proto::Unsubscribe {
                            code: 2000,
                            reason: "server unsubscribe".into(),
                        })
                    });
                    self.write_reply(&r).await
                } else {
                    Ok(())
                }
            }
            Control::Disconnect { code, reason, .. } => Err(Exit::Close(code, reason)),
            Control::Deadline => self.check_deadlines().await,
            Control::Refresh {
                expire_at,
                expired,
                info,
            } => {
                if expired {
                    return Err(close(3005, "connection expired"));
                }
                self.exp = expire_at;
                if info.is_some() {
                    self.conn_info = info;
                }
                let refresh = proto::Refresh {
                    expires: self.exp.is_some(),
                    ttl: self.exp.map(ttl).unwrap_or(0),
                };
                let r = push("", |p| p.refresh = Some(refresh));
                self.write_reply(&r).await
            }
        }
    }
}

pub(super) fn channel_refusal(e: ChannelError, channel: &str) -> Refusal {
    match e {
        ChannelError::Invalid => Refusal::new(107, format!("invalid channel name {channel:?}")),
        ChannelError::UnknownNamespace => {
            Refusal::new(102, format!("no namespace configured for {channel:?}"))
        }
    }
}

fn error_reply(id: u32, r: &Refusal, temporary: bool) -> proto::Reply {
    tracing::debug!(code = r.code, detail = %r.detail, "command refused");
    proto::Reply {
        id,
        error: Some(proto::Error {
            code: r.code,
            message: r.message().into(),
            temporary,
        }),
        ..Default::default()
    }
}

/// A `PresenceResult` for the client protocol and the server API alike.
pub(super) async fn presence_result(
    st: &AppState,
    channel: &str,
) -> Result<proto::PresenceResult, Refusal> {
    let clients = st
        .hub
        .presence(channel)
        .await
        .map_err(|e| Refusal::new(100, e.to_string()))?;
    Ok(proto::PresenceResult {
        presence: clients
            .iter()
            .map(|c| (c.client.clone(), client_info(c)))
            .collect(),
    })
}

/// A `PresenceStatsResult` for the client protocol and the server API alike.
pub(super) async fn presence_stats_result(
    st: &AppState,
    channel: &str,
) -> Result<proto::PresenceStatsResult, Refusal> {
    let clients = st
        .hub
        .presence(channel)
        .await
        .map_err(|e| Refusal::new(100, e.to_string()))?;
    let users: std::collections::HashSet<&str> = clients.iter().map(|c| c.user.as_str()).collect();
    Ok(proto::PresenceStatsResult {
        num_clients: u32::try_from(clients.len()).unwrap_or(u32::MAX),
        num_users: u32::try_from(users.len()).unwrap_or(u32::MAX),
    })
}

/// Most records one history request looks at while skipping those its reader may not see: a bound on the
/// work a client can cause, whatever the channel holds.
const HISTORY_SCAN: usize = 10_000;
/// Most publications one history reply carries.
const HISTORY_MAX: usize = 1000;

/// A `HistoryResult` for the client protocol and the server API alike. `reader` is the subscription the
/// history is read for (records it may not read are skipped); the server API reads with none.
///
/// Forward: publications after `since` (or from the oldest), oldest first. Reverse: publications before
/// `since` (or from the newest), newest first, as Centrifugo walks back from the position it is given.
pub(super) async fn history_result(
    st: &AppState,
    channel: &str,
    limit: i32,
    since: Option<(u64, String)>,
    reverse: bool,
    reader: Option<Arc<SubscribeSpec>>,
) -> Result<proto::HistoryResult, Refusal> {
    let epoch = st.hub.epoch();
    if let Some((_, e)) = &since {
        if *e != epoch {
            return Err(Refusal::new(
                112,
                format!("history since epoch {e:?}, the stream's is {epoch:?}"),
            ));
        }
    }
    let since = since.map(|(o, _)| o);
    let limit = if limit < 0 {
        HISTORY_MAX
    } else {
        (limit as usize).min(HISTORY_MAX)
    };
    let engine = st.hub.engine();
    let read = async {
        let top = engine
            .channel_top(channel.to_string(), u64::MAX)
            .await?
            .unwrap_or(0);
        let mut out = Vec::new();
        let mut cursor = match (reverse, since) {
            (false, s) => s.unwrap_or(0),
            (true, s) => s.unwrap_or(u64::MAX),
        };
        let mut scanned = 0;
        while out.len() < limit && scanned < HISTORY_SCAN {
            let want = (limit - out.len()).min(HISTORY_SCAN - scanned);
            let page = if reverse {
                engine
                    .read_channel_back(channel.to_string(), cursor, want)
                    .await?
            } else {
                engine
                    .read_channel(channel.to_string(), cursor, u64::MAX, want)
                    .await?
            };
            let Some(last) = page.last() else { break };
            cursor = last.seq;
            scanned += page.len();
            let full = page.len() == want;
            out.extend(
                page.into_iter()
                    .filter(|r| reader.as_ref().is_none_or(|s| s.wants(r))),
            );
            if !full {
                break;
            }
        }
        Ok::<_, crate::log::LogError>((top, out))
    };
    let (top, recs) = read.await.map_err(|e| Refusal::new(100, e.to_string()))?;
    Ok(proto::HistoryResult {
        publications: recs.iter().map(publication).collect(),
        epoch,
        offset: top,
    })
}
