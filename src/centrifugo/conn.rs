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
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::Control;
use crate::access::{ChannelError, Identity};
use crate::auth::{unix_now, Claims, Role};
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
pub(crate) struct Command {
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

/// The commands of one frame: one JSON object per non-blank line.
pub(crate) fn commands(text: &str) -> impl Iterator<Item = serde_json::Result<Command>> + '_ {
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(serde_json::from_str)
}

/// A protocol error reply (`{"error":{"code":…,"message":…}}`). The message clients see is Centrifugo's
/// own for the code (SDKs and apps match on them); the detail goes to the log.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) code: u32,
    detail: String,
}

impl Refusal {
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
pub(crate) const MAX_CLOSE_REASON: usize = 123;

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
    /// Who this connection is, from its connection token; what it may read is decided by `access` from it.
    who: Arc<Identity>,
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
            who: Identity::anonymous(),
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
        let reason = fit_close_reason(&reason).to_string();
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
        for cmd in commands(text) {
            let cmd = cmd.map_err(|e| close(3501, &format!("bad request: {e}")))?;
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
            self.client_subscribe(req).await?.map(|v| ("subscribe", v))
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
            self.sub_refresh(req)?.map(|v| ("sub_refresh", v))
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
                return Err(close(3500, "invalid token: a connection token is required"));
            }
            None
        } else {
            match self.verify_conn_token(id, &req.token)? {
                Ok(c) => Some(c),
                Err(reply) => return Ok(reply),
            }
        };
        let mut server_side: Vec<String> = Vec::new();
        if let Some(c) = claims {
            self.who = Arc::new(Identity::from_claims(&c));
            self.exp = c.exp;
            self.conn_info = c.info;
            server_side = c.channels;
            server_side.extend(c.subs.into_keys());
        }
        self.connected = true;
        self.next_ping = Some(Instant::now() + self.st.config.centrifugo.ping);
        self.st
            .clients
            .add(&self.who.user, &self.client, self.ctl.clone());

        if self.st.config.centrifugo.subscribe_to_personal {
            server_side.extend(self.st.access.personal_channel(&self.who.user));
        }
        server_side.dedup();
        let mut subs = serde_json::Map::new();
        for ch in server_side {
            let sreq = req.subs.get(&ch).cloned().unwrap_or_default();
            let sreq = SubscribeRequest {
                channel: ch.clone(),
                ..sreq
            };
            // The server chose these channels: they are granted, but `access` still applies its rules
            // (nothing reads another user's `#` channel).
            let granted = Some(ch.clone());
            match self.subscribe(sreq, None, None, granted).await {
                Ok(v) => {
                    subs.insert(ch, v);
                }
                Err(r) => {
                    tracing::warn!(channel = %ch, code = r.code, error = %r.detail, "server-side subscription refused")
                }
            }
        }
        let cfg = &self.st.config.centrifugo;
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
    fn verify_conn_token(&self, id: u32, token: &str) -> Result<Result<Claims, String>, Exit> {
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
            client: self.client.clone(),
            user: self.who.user.clone(),
            conn_info: self.conn_info.clone(),
            chan_info,
        }
    }

    /// A `subscribe` command. A subscription token that is not valid for this channel and user ends the
    /// connection (3500), as Centrifugo does: the SDK must not retry with it.
    async fn client_subscribe(
        &mut self,
        req: SubscribeRequest,
    ) -> Result<Result<Value, Refusal>, Exit> {
        if let Err(e) = self.st.access.channel(&req.channel) {
            return Ok(Err(channel_refusal(e, &req.channel)));
        }
        let (chan_info, exp, granted) = if req.token.is_empty() {
            (None, None, None)
        } else {
            match self.verify_sub_token(&req.token, &req.channel)? {
                Ok(claims) => (claims.info, claims.exp, Some(req.channel.clone())),
                Err(r) => return Ok(Err(r)),
            }
        };
        Ok(self.subscribe(req, chan_info, exp, granted).await)
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
    /// Every way of subscribing (a client's command, the connection token's channels, the server API) comes
    /// through here, so `access` decides all of them; `granted` is a channel the server or a subscription
    /// token granted. Recovery is all or nothing: the gap is returned only if the epoch matches, retention
    /// deleted nothing after the client's offset, and it fits `recovery_max_publications`; records this
    /// subscription may not read (private ones) are left out of it, as they are left out live.
    async fn subscribe(
        &mut self,
        req: SubscribeRequest,
        chan_info: Option<Value>,
        exp: Option<u64>,
        granted: Option<String>,
    ) -> Result<Value, Refusal> {
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
            .reader(self.who.clone(), &selectors, granted.as_deref())
            .map_err(|(ch, denied)| Refusal::new(103, format!("{ch}: {denied}")))?;
        let spec = SubscribeSpec {
            selectors,
            filter,
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
        let wants_recovery = req.recover && ns.recovery;
        let epoch = self.st.hub.log().epoch();
        let epoch_ok = req.epoch == epoch;
        let offset = req.offset;
        let chan = name.clone();
        let spec = sub.spec.clone();
        let (top, recovered) = self
            .st
            .hub
            .with_log(move |log| {
                let top = log.channel_top(&chan, upto)?.unwrap_or(0);
                if !(wants_recovery && epoch_ok) || log.channel_pruned_upto(&chan)? > offset {
                    return Ok((top, None));
                }
                let mut recs = log.read_channel(&chan, offset, upto, max + 1)?;
                if recs.len() > max {
                    return Ok((top, None));
                }
                recs.retain(|r| spec.wants(r));
                Ok((top, Some(recs)))
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
        let data = req
            .data
            .ok_or_else(|| Refusal::new(107, "publish without data"))?;
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

    /// Presence is for subscribers of the channel: `access` decided when they subscribed.
    fn presence(&self, channel_name: &str, stats: bool) -> Result<Value, Refusal> {
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
        Ok(presence_result(&self.st, channel_name, stats))
    }

    /// History is for subscribers of the channel, filtered by what their subscription may read.
    async fn history(&mut self, req: HistoryRequest) -> Result<Value, Refusal> {
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

    fn refresh(&mut self, id: u32, req: TokenRequest) -> Result<String, Exit> {
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
        let mut result = json!({"client": self.client, "version": VERSION});
        if let Some(exp) = self.exp {
            result["expires"] = json!(true);
            result["ttl"] = json!(exp.saturating_sub(unix_now()));
        }
        Ok(json!({"id": id, "refresh": result}).to_string())
    }

    fn sub_refresh(&mut self, req: SubRefreshRequest) -> Result<Result<Value, Refusal>, Exit> {
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
        if let Some(s) = self.subs.iter_mut().find(|s| s.channel == req.channel) {
            s.exp = claims.exp;
        }
        let mut result = json!({});
        if let Some(exp) = claims.exp {
            result["expires"] = json!(true);
            result["ttl"] = json!(exp.saturating_sub(unix_now()));
        }
        Ok(Ok(result))
    }

    async fn control(&mut self, c: Control) -> Result<(), Exit> {
        match c {
            Control::Subscribe { channel, info } => {
                let req = SubscribeRequest {
                    channel: channel.clone(),
                    ..Default::default()
                };
                match self.subscribe(req, info, None, Some(channel.clone())).await {
                    Ok(mut result) => {
                        if let Some(obj) = result.as_object_mut() {
                            obj.remove("publications");
                        }
                        let push = json!({"push": {"channel": channel, "subscribe": result}});
                        self.write(push.to_string()).await
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
            self.st.clients.remove(&self.who.user, &self.client);
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

fn error_reply(id: u32, r: &Refusal, temporary: bool) -> String {
    tracing::debug!(code = r.code, detail = %r.detail, "command refused");
    let mut err = json!({"code": r.code, "message": r.message()});
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
) -> Result<Value, Refusal> {
    let epoch = st.hub.log().epoch();
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
    let chan = channel.to_string();
    let (top, recs) = st
        .hub
        .with_log(move |log| {
            let top = log.channel_top(&chan, u64::MAX)?.unwrap_or(0);
            let mut out = Vec::new();
            let mut cursor = match (reverse, since) {
                (false, s) => s.unwrap_or(0),
                (true, s) => s.unwrap_or(u64::MAX),
            };
            let mut scanned = 0;
            while out.len() < limit && scanned < HISTORY_SCAN {
                let want = (limit - out.len()).min(HISTORY_SCAN - scanned);
                let page = if reverse {
                    log.read_channel_back(&chan, cursor, want)?
                } else {
                    log.read_channel(&chan, cursor, u64::MAX, want)?
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
            Ok((top, out))
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
    (r.code, r.message().to_string())
}
