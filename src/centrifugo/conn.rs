//! One WebSocket connection speaking the Centrifugo client protocol v2 (JSON).
//!
//! A single task owns the socket and serves, in one `select!`: commands from the client (newline-delimited
//! JSON, replies batched into one frame), deliveries from the connection's outbox (pushes, coalesced), server
//! API controls, and a shared 250 ms tick for deadlines and pings (connect, pong, token expiry). One task means
//! replies and pushes are naturally ordered: a subscribe reply (with its recovered publications) is written
//! before any live publication of that channel, which the hub has queued since registration.
//!
//! Writes race the outbox's `closed` token: when the hub disconnects a slow client, a write stuck on a full
//! socket is abandoned and a close frame `3008 slow` is queued behind what was already written, so a client
//! that resumes reading learns why it was cut off.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::channel::{self, ChannelError};
use super::Control;
use crate::auth::{unix_now, Role};
use crate::error::ApiError;
use crate::frame::centrifugo::publication;
use crate::hub::{
    ClientInfo, ConnectionGuard, Delivery, NewPublication, Outbox, SubscribeSpec, Subscription,
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
pub async fn upgrade(
    State(st): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    check_origin(&st, &headers)?;
    let guard = st.hub.connect()?;
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
            tokio::spawn(Box::new(Conn::new(st, guard, socket)).run());
            std::future::ready(())
        }))
}

fn check_origin(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
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

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Command {
    id: u32,
    connect: Option<ConnectRequest>,
    subscribe: Option<SubscribeRequest>,
    unsubscribe: Option<ChannelRequest>,
    publish: Option<PublishRequest>,
    presence: Option<ChannelRequest>,
    presence_stats: Option<ChannelRequest>,
    history: Option<HistoryRequest>,
    ping: Option<Value>,
    send: Option<Value>,
    rpc: Option<Value>,
    refresh: Option<TokenRequest>,
    sub_refresh: Option<SubRefreshRequest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnectRequest {
    token: String,
    subs: HashMap<String, SubscribeRequest>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
struct SubscribeRequest {
    channel: String,
    token: String,
    recover: bool,
    epoch: String,
    offset: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChannelRequest {
    channel: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PublishRequest {
    channel: String,
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamPosition {
    offset: u64,
    epoch: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HistoryRequest {
    channel: String,
    limit: i32,
    since: Option<StreamPosition>,
    reverse: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TokenRequest {
    token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SubRefreshRequest {
    channel: String,
    token: String,
}

/// Claims of a connection token.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnClaims {
    sub: Option<String>,
    exp: Option<u64>,
    info: Option<Value>,
    /// Server-side subscriptions.
    channels: Vec<String>,
}

/// Claims of a subscription token.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SubClaims {
    sub: Option<String>,
    channel: String,
    exp: Option<u64>,
    info: Option<Value>,
}

/// A protocol error reply (`{"error":{"code":…,"message":…}}`).
#[derive(Debug)]
pub(super) struct Refusal(u32, String);

impl Refusal {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Refusal(code, message.into())
    }
}

/// How the connection ends.
#[derive(Debug)]
enum Exit {
    /// Close with this code and reason.
    Close(u16, String),
    /// The peer is gone; nothing to say.
    Gone,
}

fn close(code: u16, reason: &str) -> Exit {
    Exit::Close(code, reason.to_string())
}

/// Pushes waiting together go out as one frame, one JSON object per line (the protocol allows it and the
/// SDK splits them). A lone push is its shared encoding, checked as UTF-8 but not copied.
fn join_frames(mut frames: Vec<Bytes>) -> Option<Utf8Bytes> {
    let joined = match frames.len() {
        0 => return None,
        1 => frames.pop()?,
        _ => {
            let mut buf = BytesMut::with_capacity(frames.iter().map(|f| f.len() + 1).sum());
            for (i, f) in frames.iter().enumerate() {
                if i > 0 {
                    buf.extend_from_slice(b"\n");
                }
                buf.extend_from_slice(f);
            }
            buf.freeze()
        }
    };
    // Encodings are built from Rust strings, so this cannot fail; a failure would drop the frame, not panic.
    Utf8Bytes::try_from(joined).ok()
}
/// A subscription of this connection. A connection holds few, so they live in a vector: a map would
/// allocate a table of several slots for the one channel most connections have.
struct ChanSub {
    channel: String,
    sub: Subscription,
    presence: bool,
    exp: Option<u64>,
}

/// Everything one connection holds for its life, owned by its task and used in place: an idle connection
/// costs the size of this struct plus the futures of the one `select!` it waits in, so the socket is not
/// split (a split adds a shared lock and a send slot) and nothing here is copied into locals.
struct Conn {
    st: AppState,
    socket: WebSocket,
    rx: crate::queue::Receiver<Delivery>,
    ctl_rx: crate::queue::Receiver<Control>,
    ticks: tokio::sync::watch::Receiver<()>,
    outbox: Outbox,
    ctl: crate::queue::Sender<Control>,
    _guard: ConnectionGuard,
    client: String,
    user: String,
    conn_info: Option<Value>,
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

/// How often deadlines are checked: connect timeout, pings and pongs, token expiry and shutdown of a
/// connection that has no subscription (one with subscriptions learns of it through its outbox at once).
const TICK: Duration = Duration::from_millis(250);

impl Conn {
    fn new(st: AppState, guard: ConnectionGuard, socket: WebSocket) -> Conn {
        let (outbox, rx) = st.hub.outbox(None);
        let (ctl, ctl_rx) = crate::queue::channel(64);
        Conn {
            socket,
            rx,
            ctl_rx,
            ticks: st.clients.ticks(TICK),
            outbox,
            ctl,
            _guard: guard,
            client: uuid::Uuid::new_v4().to_string(),
            user: String::new(),
            conn_info: None,
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
    async fn run(mut self: Box<Self>) {
        let exit = self.serve().await;
        if let Exit::Close(code, reason) = exit {
            Box::pin(self.close(code, reason)).await;
        }
        self.cleanup();
    }

    async fn close(&mut self, code: u16, reason: String) {
        tracing::debug!(client = %self.client, code, reason, "closing WebSocket");
        let label = match code {
            3008 => "slow_consumer",
            3005 => "token_expired",
            3001 => "shutdown",
            _ => "server",
        };
        metrics::counter!("herald_disconnects_total", "reason" => label).increment(1);
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
                    Some(Ok(Message::Text(text))) => Box::pin(self.on_text(text)).await,
                    Some(Ok(Message::Binary(_))) => Err(close(3501, "bad request: this endpoint speaks JSON in text frames")),
                    Some(Ok(_)) => Ok(()),
                },
                d = self.rx.recv() => match d {
                    Some(d) => Box::pin(self.deliver(d)).await,
                    None => Err(self.closed_exit()),
                },
                c = self.ctl_rx.recv() => match c {
                    Some(c) => Box::pin(self.control(c)).await,
                    None => Ok(()),
                },
                t = self.ticks.changed() => match t {
                    Ok(()) => Box::pin(self.check_deadlines()).await,
                    Err(_) => Err(close(3001, "shutdown")), // the server is being torn down
                },
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    /// The hub closed the outbox: at shutdown, or because this client fell behind.
    fn closed_exit(&self) -> Exit {
        if self.st.hub.is_shutting_down() {
            close(3001, "shutdown")
        } else {
            close(3008, "slow")
        }
    }

    async fn on_text(&mut self, text: Utf8Bytes) -> Result<(), Exit> {
        if text.len() > self.st.config.centrifugo.max_message_size {
            return Err(close(1009, "message too big"));
        }
        let replies = self.handle_frame(text.as_str()).await?;
        if replies.is_empty() {
            return Ok(());
        }
        self.write(replies.join("\n")).await
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
        match join_frames(frames) {
            Some(text) => self.write(text).await,
            None => Ok(()),
        }
    }

    /// Writes one frame; gives up when the hub has disconnected this client or the socket stays full.
    async fn write(&mut self, text: impl Into<Utf8Bytes>) -> Result<(), Exit> {
        let text = text.into();
        tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, self.socket.send(Message::Text(text))) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Exit::Gone),
                Err(_) => Err(close(3008, "slow")),
            },
            _ = self.rx.closed() => Err(self.closed_exit()),
        }
    }

    /// Publications are passed on as their shared encoding (a reference count, no copy).
    fn encode(&self, d: Delivery, out: &mut Vec<Bytes>) {
        match d {
            Delivery::Pub { sub, publication } => {
                if let Some(s) = self.subs.iter().find(|s| s.sub.id == sub) {
                    out.push(publication.centrifugo_push(&s.channel));
                }
            }
            Delivery::Join { channel, info, .. } => out.push(Bytes::from(
                json!({"push": {"channel": &*channel, "join": {"info": &*info}}}).to_string(),
            )),
            Delivery::Leave { channel, info, .. } => out.push(Bytes::from(
                json!({"push": {"channel": &*channel, "leave": {"info": &*info}}}).to_string(),
            )),
        }
    }

    fn sub(&self, channel: &str) -> Option<&ChanSub> {
        self.subs.iter().find(|s| s.channel == channel)
    }

    async fn check_deadlines(&mut self) -> Result<(), Exit> {
        let cfg = &self.st.config.centrifugo;
        if self.st.hub.is_shutting_down() {
            return Err(close(3001, "shutdown"));
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
            self.write("{}").await?;
        }
        let expired: Vec<String> = self
            .subs
            .iter()
            .filter(|s| s.exp.is_some_and(|exp| unix > exp + grace))
            .map(|s| s.channel.clone())
            .collect();
        for ch in expired {
            self.remove_sub(&ch);
            let push = json!({"push": {"channel": ch, "unsubscribe": {"code": 2501, "reason": "subscription expired"}}});
            self.write(push.to_string()).await?;
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

    async fn handle_frame(&mut self, text: &str) -> Result<Vec<String>, Exit> {
        let mut replies = Vec::new();
        for line in text.split('\n').map(str::trim).filter(|l| !l.is_empty()) {
            let cmd: Command = serde_json::from_str(line)
                .map_err(|e| close(3501, &format!("bad request: {e}")))?;
            if let Some(reply) = self.handle(cmd).await? {
                replies.push(reply);
            }
        }
        Ok(replies)
    }

    async fn handle(&mut self, cmd: Command) -> Result<Option<String>, Exit> {
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
                &Refusal::new(111, "too many requests"),
                true,
            )));
        }
        let result: Result<(&str, Value), Refusal> = if let Some(req) = cmd.connect {
            if self.connected {
                return Err(close(3501, "bad request: already connected"));
            }
            return self.connect(id, req).await.map(Some);
        } else if let Some(req) = cmd.subscribe {
            self.client_subscribe(req).await.map(|v| ("subscribe", v))
        } else if let Some(req) = cmd.unsubscribe {
            self.remove_sub(&req.channel);
            Ok(("unsubscribe", json!({})))
        } else if let Some(req) = cmd.publish {
            self.publish(req).await.map(|v| ("publish", v))
        } else if let Some(req) = cmd.presence {
            self.presence(&req.channel, false).map(|v| ("presence", v))
        } else if let Some(req) = cmd.presence_stats {
            self.presence(&req.channel, true)
                .map(|v| ("presence_stats", v))
        } else if let Some(req) = cmd.history {
            self.history(req).await.map(|v| ("history", v))
        } else if let Some(req) = cmd.refresh {
            return self.refresh(id, req).map(Some);
        } else if let Some(req) = cmd.sub_refresh {
            self.sub_refresh(req).map(|v| ("sub_refresh", v))
        } else if cmd.rpc.is_some() {
            Err(Refusal::new(
                108,
                "not available: this server has no RPC handlers",
            ))
        } else if cmd.ping.is_some() {
            Ok(("ping", json!({})))
        } else if cmd.send.is_some() {
            return Ok(None);
        } else {
            Err(Refusal::new(104, "method not found"))
        };
        Ok(Some(match result {
            Ok((method, v)) => {
                let mut reply = serde_json::Map::new();
                reply.insert("id".into(), json!(id));
                reply.insert(method.into(), v);
                Value::Object(reply).to_string()
            }
            Err(r) => error_reply(id, &r, false),
        }))
    }

    async fn connect(&mut self, id: u32, req: ConnectRequest) -> Result<String, Exit> {
        let claims = if req.token.is_empty() {
            if !self.st.auth.allow_anonymous {
                return Err(close(
                    3500,
                    "invalid token: this server requires a connection token",
                ));
            }
            ConnClaims::default()
        } else {
            match self.verify_conn_token(id, &req.token)? {
                Ok(c) => c,
                Err(reply) => return Ok(reply),
            }
        };
        self.user = claims.sub.unwrap_or_default();
        self.exp = claims.exp;
        self.conn_info = claims.info;
        self.connected = true;
        self.next_ping = Some(Instant::now() + self.st.config.centrifugo.ping);
        self.st
            .clients
            .add(&self.user, &self.client, self.ctl.clone());

        let cfg = self.st.config.centrifugo.clone();
        let mut server_side: Vec<String> = claims.channels;
        if let Some(p) = channel::personal(&cfg, &self.user) {
            server_side.push(p);
        }
        let mut subs = serde_json::Map::new();
        for ch in server_side {
            let sreq = req.subs.get(&ch).cloned().unwrap_or_default();
            let sreq = SubscribeRequest {
                channel: ch.clone(),
                ..sreq
            };
            match self.subscribe(sreq, None, None).await {
                Ok(v) => {
                    subs.insert(ch, v);
                }
                Err(r) => {
                    tracing::warn!(channel = %ch, error = %r.1, "server-side subscription refused")
                }
            }
        }
        let mut result = json!({
            "client": self.client,
            "version": VERSION,
            "ping": cfg.ping.as_secs().max(1),
            "pong": true,
        });
        if let Some(exp) = self.exp {
            result["expires"] = json!(true);
            result["ttl"] = json!(exp.saturating_sub(unix_now()));
        }
        if !subs.is_empty() {
            result["subs"] = Value::Object(subs);
        }
        Ok(json!({"id": id, "connect": result}).to_string())
    }

    /// Verifies a connection token. An expired one is an error reply (109: the SDK fetches a new token and
    /// retries); any other fault ends the connection (3500).
    fn verify_conn_token(&self, id: u32, token: &str) -> Result<Result<ConnClaims, String>, Exit> {
        match self
            .st
            .auth
            .verify_as::<ConnClaims>(Role::Subscriber, token)
        {
            Ok(c) => Ok(Ok(c)),
            Err(e) if e.code == "token_expired" => Ok(Err(error_reply(
                id,
                &Refusal::new(109, "token expired"),
                false,
            ))),
            Err(e) => Err(close(3500, &format!("invalid token: {}", e.message))),
        }
    }

    fn info(&self, chan_info: Option<Value>) -> ClientInfo {
        ClientInfo {
            client: self.client.clone(),
            user: self.user.clone(),
            conn_info: self.conn_info.clone(),
            chan_info,
        }
    }

    async fn client_subscribe(&mut self, req: SubscribeRequest) -> Result<Value, Refusal> {
        let ch =
            channel::parse(&req.channel, &self.st.config.centrifugo).map_err(channel_refusal)?;
        if !ch.allows_user(&self.user) {
            return Err(Refusal::new(
                103,
                "permission denied: this channel is limited to other users",
            ));
        }
        let (chan_info, exp) = if req.token.is_empty() {
            match ch.namespace.subscribe {
                crate::config::SubscribePolicy::Public => {}
                crate::config::SubscribePolicy::Authenticated if !self.user.is_empty() => {}
                crate::config::SubscribePolicy::Token if ch.users.is_some() => {}
                _ => {
                    return Err(Refusal::new(
                        103,
                        "permission denied: this channel needs a subscription token",
                    ))
                }
            }
            (None, None)
        } else {
            let claims = self.verify_sub_token(&req.token, &req.channel)?;
            (claims.info, claims.exp)
        };
        self.subscribe(req, chan_info, exp).await
    }

    fn verify_sub_token(&self, token: &str, channel: &str) -> Result<SubClaims, Refusal> {
        let claims = match self.st.auth.verify_as::<SubClaims>(Role::Subscriber, token) {
            Ok(c) => c,
            Err(e) if e.code == "token_expired" => return Err(Refusal::new(109, "token expired")),
            Err(e) => {
                return Err(Refusal::new(
                    103,
                    format!("permission denied: {}", e.message),
                ))
            }
        };
        if claims.channel != channel || claims.sub.as_deref().is_some_and(|s| s != self.user) {
            return Err(Refusal::new(
                103,
                "permission denied: the token is for another channel or user",
            ));
        }
        Ok(claims)
    }

    /// Registers a subscription (permissions already checked, or granted by the server) and builds its
    /// `SubscribeResult`, recovering missed publications when asked. Recovery is all or nothing: the gap is
    /// returned only if the epoch matches, retention deleted nothing after the client's offset, and it fits
    /// `recovery_max_publications`.
    async fn subscribe(
        &mut self,
        req: SubscribeRequest,
        chan_info: Option<Value>,
        exp: Option<u64>,
    ) -> Result<Value, Refusal> {
        let cfg = self.st.config.centrifugo.clone();
        let name = req.channel.clone();
        let ch = channel::parse(&name, &cfg).map_err(channel_refusal)?;
        if self.sub(&name).is_some() {
            return Err(Refusal::new(105, "already subscribed"));
        }
        if self.subs.len() >= cfg.max_channels_per_connection {
            return Err(Refusal::new(
                106,
                "limit exceeded: too many channels on this connection",
            ));
        }
        let ns = ch.namespace.clone();
        let spec = SubscribeSpec {
            selectors: vec![Selector::Exact(name.as_str().into())],
            private_grants: if self.user.is_empty() {
                vec![]
            } else {
                vec![Selector::Any]
            },
            subscriber: self.client.clone(),
            payload: None,
            join_leave: ns.join_leave,
        };
        let sub = self
            .st
            .hub
            .subscribe(spec, &self.outbox)
            .map_err(|e| Refusal::new(100, e.to_string()))?;
        let upto = sub.registered_at;
        let max = cfg.recovery_max_publications;
        let wants_recovery = req.recover && ns.recovery;
        let epoch = self.st.hub.log().epoch();
        let epoch_ok = req.epoch == epoch;
        let (offset, offset_req) = (req.offset, req.offset);
        let chan = name.clone();
        let (top, recovered) = self
            .st
            .hub
            .with_log(move |log| {
                let top = log.channel_top(&chan, upto)?.unwrap_or(0);
                if !(wants_recovery && epoch_ok) || log.channel_pruned_upto(&chan)? > offset_req {
                    return Ok((top, None));
                }
                let recs = log.read_channel(&chan, offset, upto, max + 1)?;
                Ok((top, (recs.len() <= max).then_some(recs)))
            })
            .await
            .map_err(|e| Refusal::new(100, e.to_string()))?;

        let mut result = json!({});
        if ns.recovery {
            result["recoverable"] = json!(true);
            result["epoch"] = json!(epoch);
            result["offset"] = json!(top);
        }
        if wants_recovery {
            result["was_recovering"] = json!(true);
            result["recovered"] = json!(recovered.is_some());
        }
        if let Some(recs) = recovered.filter(|r| !r.is_empty()) {
            let pubs: Vec<Value> = recs
                .iter()
                .filter_map(|r| serde_json::from_str(&publication(r)).ok())
                .collect();
            result["publications"] = Value::Array(pubs);
        }
        if let Some(exp) = exp {
            result["expires"] = json!(true);
            result["ttl"] = json!(exp.saturating_sub(unix_now()));
        }
        if ns.presence {
            self.st.hub.join(&name, self.info(chan_info));
        }
        self.subs.reserve_exact(1); // most connections hold one or two; a vector's default growth is 4
        self.subs.push(ChanSub {
            channel: name,
            sub,
            presence: ns.presence,
            exp,
        });
        Ok(result)
    }

    fn remove_sub(&mut self, channel: &str) {
        if let Some(i) = self.subs.iter().position(|s| s.channel == channel) {
            let s = self.subs.swap_remove(i);
            if s.presence {
                self.st.hub.leave(channel, &self.client);
            }
        }
    }

    async fn publish(&mut self, req: PublishRequest) -> Result<Value, Refusal> {
        let ch =
            channel::parse(&req.channel, &self.st.config.centrifugo).map_err(channel_refusal)?;
        let allowed = match ch.namespace.publish {
            crate::config::PublishPolicy::None => false,
            crate::config::PublishPolicy::Subscribers => self.sub(&req.channel).is_some(),
            crate::config::PublishPolicy::Any => ch.allows_user(&self.user),
        };
        if !allowed {
            return Err(Refusal::new(
                103,
                "permission denied: clients may not publish into this channel",
            ));
        }
        let data = req
            .data
            .ok_or_else(|| Refusal::new(107, "bad request: publish needs data"))?;
        let info = serde_json::to_string(&self.info(None)).ok();
        self.st
            .hub
            .publish(NewPublication {
                topics: vec![req.channel],
                data: data.get().to_string(),
                info,
                ..Default::default()
            })
            .await
            .map_err(|e| match e {
                crate::hub::HubError::MessageTooLarge { .. } => Refusal::new(106, e.to_string()),
                other => Refusal::new(100, other.to_string()),
            })?;
        Ok(json!({}))
    }

    fn presence(&self, channel_name: &str, stats: bool) -> Result<Value, Refusal> {
        let ch =
            channel::parse(channel_name, &self.st.config.centrifugo).map_err(channel_refusal)?;
        if !ch.namespace.presence {
            return Err(Refusal::new(
                108,
                "not available: presence is off for this namespace",
            ));
        }
        if self.sub(channel_name).is_none() {
            return Err(Refusal::new(
                103,
                "permission denied: subscribe to the channel first",
            ));
        }
        Ok(presence_result(&self.st, channel_name, stats))
    }

    async fn history(&mut self, req: HistoryRequest) -> Result<Value, Refusal> {
        let ch =
            channel::parse(&req.channel, &self.st.config.centrifugo).map_err(channel_refusal)?;
        if !ch.namespace.history {
            return Err(Refusal::new(
                108,
                "not available: history is off for this namespace",
            ));
        }
        if self.sub(&req.channel).is_none() {
            return Err(Refusal::new(
                103,
                "permission denied: subscribe to the channel first",
            ));
        }
        history_result(
            &self.st,
            &req.channel,
            req.limit,
            req.since.map(|s| (s.offset, s.epoch)),
            req.reverse,
        )
        .await
    }

    fn refresh(&mut self, id: u32, req: TokenRequest) -> Result<String, Exit> {
        let claims = match self.verify_conn_token(id, &req.token)? {
            Ok(c) => c,
            Err(reply) => return Ok(reply),
        };
        if claims.sub.unwrap_or_default() != self.user {
            return Err(close(
                3500,
                "invalid token: refresh token is for another user",
            ));
        }
        self.exp = claims.exp;
        if claims.info.is_some() {
            self.conn_info = claims.info;
        }
        let mut result = json!({"client": self.client, "version": VERSION});
        if let Some(exp) = self.exp {
            result["expires"] = json!(true);
            result["ttl"] = json!(exp.saturating_sub(unix_now()));
        }
        Ok(json!({"id": id, "refresh": result}).to_string())
    }

    fn sub_refresh(&mut self, req: SubRefreshRequest) -> Result<Value, Refusal> {
        if self.sub(&req.channel).is_none() {
            return Err(Refusal::new(103, "permission denied: not subscribed"));
        }
        let claims = self.verify_sub_token(&req.token, &req.channel)?;
        if let Some(s) = self.subs.iter_mut().find(|s| s.channel == req.channel) {
            s.exp = claims.exp;
        }
        let mut result = json!({});
        if let Some(exp) = claims.exp {
            result["expires"] = json!(true);
            result["ttl"] = json!(exp.saturating_sub(unix_now()));
        }
        Ok(result)
    }

    async fn control(&mut self, c: Control) -> Result<(), Exit> {
        match c {
            Control::Subscribe { channel, info } => {
                let req = SubscribeRequest {
                    channel: channel.clone(),
                    ..Default::default()
                };
                match self.subscribe(req, info, None).await {
                    Ok(mut result) => {
                        if let Some(obj) = result.as_object_mut() {
                            obj.remove("publications");
                        }
                        let push = json!({"push": {"channel": channel, "subscribe": result}});
                        self.write(push.to_string()).await
                    }
                    Err(r) => {
                        tracing::debug!(channel = %channel, error = %r.1, "server-side subscribe refused");
                        Ok(())
                    }
                }
            }
            Control::Unsubscribe { channel } => {
                if self.sub(&channel).is_some() {
                    self.remove_sub(&channel);
                    let push = json!({"push": {"channel": channel, "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}});
                    self.write(push.to_string()).await
                } else {
                    Ok(())
                }
            }
            Control::Disconnect { code, reason } => Err(Exit::Close(code, reason)),
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
                let mut refresh = json!({"expires": self.exp.is_some()});
                if let Some(exp) = self.exp {
                    refresh["ttl"] = json!(exp.saturating_sub(unix_now()));
                }
                self.write(json!({"push": {"refresh": refresh}}).to_string())
                    .await
            }
        }
    }

    fn cleanup(&mut self) {
        let channels: Vec<String> = self.subs.iter().map(|s| s.channel.clone()).collect();
        for ch in channels {
            self.remove_sub(&ch);
        }
        if self.connected {
            self.st.clients.remove(&self.user, &self.client);
        }
    }
}

fn channel_refusal(e: ChannelError) -> Refusal {
    match e {
        ChannelError::Invalid => Refusal::new(107, "bad request: invalid channel name"),
        ChannelError::UnknownNamespace => Refusal::new(102, "unknown channel: no such namespace"),
    }
}

fn error_reply(id: u32, r: &Refusal, temporary: bool) -> String {
    let mut err = json!({"code": r.0, "message": r.1});
    if temporary {
        err["temporary"] = json!(true);
    }
    json!({"id": id, "error": err}).to_string()
}

/// A `PresenceResult` (or `PresenceStatsResult`) for the client protocol and the server API alike.
pub(super) fn presence_result(st: &AppState, channel: &str, stats: bool) -> Value {
    let clients = st.hub.presence(channel);
    if stats {
        let users: std::collections::HashSet<&str> =
            clients.iter().map(|c| c.user.as_str()).collect();
        return json!({"num_clients": clients.len(), "num_users": users.len()});
    }
    let map: serde_json::Map<String, Value> = clients
        .into_iter()
        .filter_map(|c| Some((c.client.clone(), serde_json::to_value(c).ok()?)))
        .collect();
    json!({ "presence": map })
}

/// A `HistoryResult` for the client protocol and the server API alike.
pub(super) async fn history_result(
    st: &AppState,
    channel: &str,
    limit: i32,
    since: Option<(u64, String)>,
    reverse: bool,
) -> Result<Value, Refusal> {
    let epoch = st.hub.log().epoch();
    if let Some((_, e)) = &since {
        if *e != epoch {
            return Err(Refusal::new(
                112,
                "unrecoverable position: the epoch changed",
            ));
        }
    }
    let after = since.map(|(o, _)| o).unwrap_or(0);
    let limit = if limit < 0 {
        1000
    } else {
        (limit as usize).min(1000)
    };
    let chan = channel.to_string();
    let (top, recs) = st
        .hub
        .with_log(move |log| {
            let top = log.channel_top(&chan, u64::MAX)?.unwrap_or(0);
            if limit == 0 {
                return Ok((top, Vec::new()));
            }
            let recs = if reverse {
                let mut all = log.read_channel(&chan, after, u64::MAX, 100_000)?;
                let keep = all.len().saturating_sub(limit);
                all.drain(..keep);
                all.reverse();
                all
            } else {
                log.read_channel(&chan, after, u64::MAX, limit)?
            };
            Ok((top, recs))
        })
        .await
        .map_err(|e| Refusal::new(100, e.to_string()))?;
    let pubs: Vec<Value> = recs
        .iter()
        .filter_map(|r| serde_json::from_str(&publication(r)).ok())
        .collect();
    Ok(json!({"publications": pubs, "epoch": epoch, "offset": top}))
}

pub(super) fn refusal_parts(r: Refusal) -> (u32, String) {
    (r.0, r.1)
}
