//! `herald-bench inbox ...`: the notification inbox's workloads (issue 14 item 9).
//!
//! - `fanout`: one notification to many inboxes (`/api/inbox_notify`, `--mode notify`) while some of their
//!   users are connected to their own inbox channel, or, as the baseline, the server API's `broadcast` of
//!   one message to the same users' personal channels (`--mode broadcast`). Measures the time until every
//!   call is acknowledged, the time until the last connected user has the event, rows per second, the
//!   server's RSS and the growth of the data directory's SQLite files.
//! - `markread`: two devices per user; device A marks items read and unread through the browser API at a
//!   total rate, device B holds a subscription; the latency from A's request to B's event with that change's
//!   version, then a check that the stored counts equal a recount from listing and what B last saw.
//! - `fill` then `read`: fills inboxes through `inbox_notify`, then measures list pages (first page, a
//!   cursor page deep in the inbox with a filter) and counts under concurrency.
//!
//! Users are `u0`, `u1`, …; their tokens are HS256 JWTs with `sub` = the user, signed with `--jwt-key`
//! (Herald's development key by default), the same key Herald verifies subscribers with.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Body};
use crate::rss;
use crate::sse::SseParser;
use crate::stats::{histogram, now_us};
use crate::target::Transport;

/// The server under test and how to reach it.
#[derive(Debug, Clone)]
pub struct Server {
    pub addr: SocketAddr,
    /// The server API key (`centrifugo.api_key`).
    pub api_key: String,
    /// The key subscriber tokens are signed with.
    pub jwt_key: String,
    pub pids: Vec<u32>,
    /// The server's data directory: the sizes of its files before and after are the database growth.
    pub data_dir: Option<PathBuf>,
    /// Spread subscriber sockets over 127.0.0.2 .. 127.0.0.(1+src_ips).
    pub src_ips: usize,
    /// Subscribers connecting at once, and the pause between batches.
    pub batch: usize,
    pub batch_pause: Duration,
}

pub fn user(i: usize) -> String {
    format!("u{i}")
}

/// An HS256 token whose `sub` is `user` (no expiry: runs are short).
pub fn user_token(key: &str, user: &str) -> anyhow::Result<String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": user }),
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .map_err(|e| anyhow!("signing a user token: {e}"))
}

fn src_ip(i: usize, n: usize) -> Option<IpAddr> {
    (n > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % n.min(250)) as u8)))
}

fn client(pool: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool.max(1))
        .timeout(Duration::from_secs(60))
        .build()
        .context("http client")
}

impl Server {
    /// `POST /api/<method>` with the API key; the JSON answer, or an error for a non-2xx status or a
    /// Centrifugo-style `error` object.
    pub async fn api(
        &self,
        client: &reqwest::Client,
        method: &str,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let resp = client
            .post(format!("http://{}/api/{method}", self.addr))
            .header("x-api-key", &self.api_key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            bail!(
                "{method}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        let v: Value = serde_json::from_slice(&bytes).context("answer is not JSON")?;
        if let Some(e) = v.get("error") {
            bail!("{method}: {e}");
        }
        Ok(v)
    }

    /// Bytes of the data directory's files, as (inbox database files, every other file).
    fn disk(&self) -> Option<(u64, u64)> {
        let dir = self.data_dir.as_ref()?;
        let (mut inbox, mut other) = (0, 0);
        let mut stack = vec![dir.clone()];
        let mut seen = 0;
        while let Some(d) = stack.pop() {
            seen += 1;
            if seen > 1000 {
                break;
            }
            for e in std::fs::read_dir(&d).ok()?.flatten() {
                let Ok(md) = e.metadata() else { continue };
                if md.is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().starts_with("inbox") {
                    inbox += md.len();
                } else {
                    other += md.len();
                }
            }
        }
        Some((inbox, other))
    }
}

/// A subscription to one channel with a user's token, between the handshake and the read loop.
pub enum Listener {
    Sse {
        stream: TcpStream,
        body: Body,
        first: Vec<u8>,
    },
    Ws(Box<WebSocketStream<TcpStream>>),
}

/// Percent-encodes a query value (channel names here are `[a-z0-9:#]`, tokens base64url and dots).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens a subscription to `channel` as `user`: SSE with the token in the `authorization` query
/// parameter, or WebSocket (Centrifugo JSON) with the token in `connect`. Returns once the server
/// answered the subscription.
pub async fn listen_open(
    srv: &Server,
    transport: Transport,
    user: &str,
    channel: &str,
    src: Option<IpAddr>,
) -> anyhow::Result<Listener> {
    let token = user_token(&srv.jwt_key, user)?;
    let mut stream = http::connect(srv.addr, src).await?;
    match transport {
        Transport::Sse => {
            let path = format!(
                "/.well-known/mercure?topic={}&authorization={token}",
                query_escape(channel)
            );
            let (status, body, first) = http::get_stream(
                &mut stream,
                &srv.addr.to_string(),
                &path,
                "text/event-stream",
            )
            .await?;
            if status != 200 {
                bail!("subscribe {channel}: HTTP {status}");
            }
            Ok(Listener::Sse {
                stream,
                body,
                first,
            })
        }
        Transport::Ws => {
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0);
            let url = format!("ws://{}/connection/websocket", srv.addr);
            let (mut ws, resp) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                    .await
                    .context("websocket handshake")?;
            if resp.status().as_u16() != 101 {
                bail!("websocket upgrade: HTTP {}", resp.status());
            }
            ws_command(
                &mut ws,
                1,
                json!({"id": 1, "connect": {"token": token}}).to_string(),
            )
            .await?;
            ws_command(
                &mut ws,
                2,
                json!({"id": 2, "subscribe": {"channel": channel}}).to_string(),
            )
            .await?;
            Ok(Listener::Ws(Box::new(ws)))
        }
        Transport::WsProtobuf => bail!("the inbox workloads speak SSE or WebSocket JSON"),
    }
}

async fn ws_command(
    ws: &mut WebSocketStream<TcpStream>,
    id: u64,
    cmd: String,
) -> anyhow::Result<()> {
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
            let v: Value = serde_json::from_str(line).context("reply is not JSON")?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("command {id} refused: {e}");
                }
                return Ok(());
            }
        }
    }
    bail!("no reply to command {id}")
}

/// Reads until `stop`; hands every event's data (SSE `data`, or one Centrifugo JSON reply line) to
/// `on_event`.
pub async fn listen(
    l: Listener,
    stop: CancellationToken,
    mut on_event: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    match l {
        Listener::Sse {
            mut stream,
            mut body,
            first,
        } => {
            let mut parser = SseParser::new();
            let mut feed = |bytes: &[u8]| -> anyhow::Result<bool> {
                body.decode(bytes, |b| parser.feed(b, |ev| on_event(ev.data.as_bytes())))
            };
            if !feed(&first)? {
                bail!("stream ended");
            }
            let mut buf = vec![0u8; 8192];
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    r = stream.read(&mut buf) => {
                        let n = r?;
                        if n == 0 {
                            bail!("connection closed by the server");
                        }
                        if !feed(&buf[..n])? {
                            bail!("stream ended");
                        }
                    }
                }
            }
        }
        Listener::Ws(ws) => {
            let mut ws = *ws;
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    m = ws.next() => match m {
                        Some(m) => m?,
                        None => bail!("connection closed by the server"),
                    },
                };
                match msg {
                    Message::Text(text) => {
                        let mut pong = false;
                        for line in text.as_str().split('\n') {
                            if line.trim() == "{}" {
                                pong = true;
                            } else if !line.trim().is_empty() {
                                on_event(line.as_bytes());
                            }
                        }
                        if pong {
                            ws.send(Message::text("{}")).await?;
                        }
                    }
                    Message::Close(c) => bail!("closed by the server: {c:?}"),
                    _ => {}
                }
            }
        }
    }
}

/// The inbox event in `data`: an SSE event's data is the event itself; a WebSocket push carries it in
/// `push.pub.data` (an object, or its text).
fn inbox_event(data: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(data).ok()?;
    let inner = match v.pointer("/push/pub/data") {
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(d) => d.clone(),
        None => v,
    };
    inner.get("version").is_some().then_some(inner)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

/// Samples the server's RSS every 100 ms until stopped; the peak.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RssPeak {
    fn start(pids: &[u32]) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss::total_kib(pids).unwrap_or(0)));
        let stop = CancellationToken::new();
        let (p, s, pids) = (peak.clone(), stop.clone(), pids.to_vec());
        let task = tokio::spawn(async move {
            while !s.is_cancelled() {
                if let Some(k) = rss::total_kib(&pids) {
                    p.fetch_max(k, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = s.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        RssPeak { peak, stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.cancel();
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// CPU time of the server's processes in clock ticks, as (whole processes, by thread name). Named threads
/// are read live from `/proc/<pid>/task`; the whole process's figure also holds threads that exited
/// (tokio's blocking pool), so "other" is the whole minus the named ones. A figure steadier than wall
/// time on a shared machine: other load delays the server but does not add to its CPU time.
fn server_ticks(pids: &[u32]) -> (u64, HashMap<String, u64>) {
    let mut by_name: HashMap<String, u64> = HashMap::new();
    for &pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let name = match name.trim() {
                n @ ("herald-inbox" | "herald-writer") => n.to_string(),
                n if n.starts_with("tokio") => "tokio".to_string(),
                _ => "other".to_string(),
            };
            // `/proc/<tid>/stat` would give the whole process's time: the thread's is under `task/`.
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            *by_name.entry(name).or_default() += thread_ticks(&stat).unwrap_or(0);
        }
    }
    (rss::total_cpu_ticks(pids).unwrap_or(0), by_name)
}

/// utime + stime of a `stat` line (fields 14 and 15, counted after the command name's closing
/// parenthesis, as the name may hold spaces).
fn thread_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds spent between two [`server_ticks`] readings, per thread group, and this tool's own (it
/// shares the machine's cores with the server).
fn cpu_spent(
    before: &(u64, HashMap<String, u64>),
    after: &(u64, HashMap<String, u64>),
    tool: (u64, u64),
) -> Value {
    let secs = |t: u64| t as f64 / rss::CLOCK_TICKS;
    let of = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let named = |k: &str| of(&after.1, k).saturating_sub(of(&before.1, k));
    let (inbox, writer, tokio) = (
        named("herald-inbox"),
        named("herald-writer"),
        named("tokio"),
    );
    let whole = after.0.saturating_sub(before.0);
    json!({
        "server": secs(whole),
        "inbox_writer": secs(inbox),
        "log_writer": secs(writer),
        "tokio_workers": secs(tokio),
        "other_threads": secs(whole.saturating_sub(inbox + writer + tokio)),
        "load_tool": secs(tool.1.saturating_sub(tool.0)),
    })
}

/// Connects `n` listeners (user `i` to `channel(i)`) in batches; each calls `on_event(i, data)`. Returns
/// the tasks, how many connected, and the first error.
async fn connect_all<F>(
    srv: &Server,
    transport: Transport,
    n: usize,
    channel: impl Fn(usize) -> String,
    stop: &CancellationToken,
    on_event: Arc<F>,
) -> (Vec<JoinHandle<Option<String>>>, usize, Option<String>)
where
    F: Fn(usize, &[u8]) + Send + Sync + 'static,
{
    let mut tasks = Vec::with_capacity(n);
    let (mut connected, mut first_error) = (0, None);
    let batch = srv.batch.max(1);
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let mut acks = Vec::with_capacity(end - start);
        for i in start..end {
            let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            let (srv, stop, on_event) = (srv.clone(), stop.clone(), on_event.clone());
            let ch = channel(i);
            tasks.push(tokio::spawn(async move {
                let opened = tokio::time::timeout(
                    Duration::from_secs(30),
                    listen_open(&srv, transport, &user(i), &ch, src_ip(i, srv.src_ips)),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow!("handshake timed out")));
                match opened {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        listen(l, stop, |d| on_event(i, d))
                            .await
                            .err()
                            .map(|e| format!("{e:#}"))
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        Some("never connected".into())
                    }
                }
            }));
            acks.push(rx);
        }
        for rx in acks {
            match rx.await {
                Ok(Ok(())) => connected += 1,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| "task failed".into());
                }
            }
        }
        if end < n {
            tokio::time::sleep(srv.batch_pause).await;
        }
    }
    (tasks, connected, first_error)
}

/// Stops the listeners; how many ended on their own before (errors), and the first reason.
async fn stop_all(
    stop: &CancellationToken,
    tasks: Vec<JoinHandle<Option<String>>>,
) -> (usize, Option<String>) {
    stop.cancel();
    let (mut ended, mut first) = (0, None);
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(10), t).await {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(e))) => {
                if e != "never connected" {
                    ended += 1;
                    first.get_or_insert(e);
                }
            }
            _ => ended += 1,
        }
    }
    (ended, first)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutMode {
    /// `inbox_notify` to the users' inboxes (events on `inbox:#<user>`).
    Notify,
    /// The server API's `broadcast` to the users' personal channels (`personal:#<user>`): the baseline.
    Broadcast,
}

impl std::str::FromStr for FanoutMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "notify" => Ok(FanoutMode::Notify),
            "broadcast" => Ok(FanoutMode::Broadcast),
            _ => bail!("unknown mode {s:?} (notify, broadcast)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fanout {
    pub mode: FanoutMode,
    pub transport: Transport,
    /// Inboxes (or personal channels) written to: users u0 .. u(users-1).
    pub users: usize,
    /// Users u0 .. u(connected-1) hold a subscription to their own channel.
    pub connected: usize,
    /// Users per call.
    pub per_call: usize,
    /// Calls in flight.
    pub concurrency: usize,
    /// Bound of the whole call phase.
    pub timeout: Duration,
    /// Wait for the connected users' events after the last acknowledgement.
    pub drain: Duration,
}

pub async fn fanout(srv: &Server, f: &Fanout) -> anyhow::Result<Value> {
    let marker = format!("bench{}x{}", std::process::id(), now_us() % 1_000_000_000);
    let channel = |i: usize| match f.mode {
        FanoutMode::Notify => format!("inbox:#{}", user(i)),
        FanoutMode::Broadcast => format!("personal:#{}", user(i)),
    };
    let connected_n = f.connected.min(f.users);
    let got: Arc<Vec<AtomicU64>> = Arc::new((0..connected_n).map(|_| AtomicU64::new(0)).collect());
    let stop = CancellationToken::new();
    let rss_idle = rss::total_kib(&srv.pids);
    let ramp = Instant::now();
    let on_event = {
        let (got, needle) = (got.clone(), marker.clone().into_bytes());
        Arc::new(move |i: usize, d: &[u8]| {
            if contains(d, &needle) {
                let _ = got[i].compare_exchange(0, now_us(), Ordering::Relaxed, Ordering::Relaxed);
            }
        })
    };
    let (tasks, connected, connect_error) =
        connect_all(srv, f.transport, connected_n, channel, &stop, on_event).await;
    let ramp_secs = ramp.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_conns = rss::total_kib(&srv.pids);
    let disk_before = srv.disk();
    let peak = RssPeak::start(&srv.pids);
    let ticks_before = server_ticks(&srv.pids);
    let tool_before = rss::cpu_ticks(std::process::id()).unwrap_or(0);

    let client = client(f.concurrency)?;
    let calls = f.users.div_ceil(f.per_call.max(1));
    let next = Arc::new(AtomicUsize::new(0));
    let acked_rows = Arc::new(AtomicU64::new(0));
    let last_ack = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new((0usize, None::<String>)));
    let call_ms = Arc::new(Mutex::new(histogram()));
    let t0 = now_us();
    let deadline = Instant::now() + f.timeout;
    let mut workers = Vec::new();
    for _ in 0..f.concurrency.max(1) {
        let (srv, client, next, acked_rows, last_ack, errors, call_ms, marker) = (
            srv.clone(),
            client.clone(),
            next.clone(),
            acked_rows.clone(),
            last_ack.clone(),
            errors.clone(),
            call_ms.clone(),
            marker.clone(),
        );
        let (mode, users, per_call) = (f.mode, f.users, f.per_call.max(1));
        workers.push(tokio::spawn(async move {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= calls || Instant::now() >= deadline {
                    break;
                }
                let range = c * per_call..((c + 1) * per_call).min(users);
                let (method, body) = match mode {
                    FanoutMode::Notify => (
                        "inbox_notify",
                        json!({
                            "users": range.clone().map(user).collect::<Vec<_>>(),
                            "item": {"title": marker, "body": "A benchmark notification", "category": "bench"},
                        }),
                    ),
                    FanoutMode::Broadcast => (
                        "broadcast",
                        json!({
                            "channels": range.clone().map(|i| format!("personal:#{}", user(i))).collect::<Vec<_>>(),
                            "data": {"title": marker, "body": "A benchmark notification", "category": "bench"},
                        }),
                    ),
                };
                let sent = now_us();
                let r = srv.api(&client, method, &body).await;
                let done = now_us();
                let ok_rows = match &r {
                    Ok(v) => match mode {
                        FanoutMode::Notify => v["result"]["delivered"]
                            .as_array()
                            .map_or(0, |d| d.iter().filter(|x| x["outcome"] == "created").count()),
                        FanoutMode::Broadcast => v["result"]["responses"]
                            .as_array()
                            .map_or(0, |d| d.iter().filter(|x| x.get("error").is_none()).count()),
                    },
                    Err(_) => 0,
                };
                if ok_rows < range.len() {
                    let mut e = errors.lock();
                    e.0 += range.len() - ok_rows;
                    if e.1.is_none() {
                        e.1 = Some(match &r {
                            Err(err) => format!("{err:#}"),
                            Ok(v) => v.to_string().chars().take(300).collect(),
                        });
                    }
                }
                acked_rows.fetch_add(ok_rows as u64, Ordering::Relaxed);
                last_ack.fetch_max(done, Ordering::Relaxed);
                call_ms.lock().saturating_record(done.saturating_sub(sent).max(1));
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let ack_us = last_ack.load(Ordering::Relaxed).saturating_sub(t0);
    let drain_until = Instant::now() + f.drain;
    let all_got = |got: &[AtomicU64]| got.iter().filter(|g| g.load(Ordering::Relaxed) > 0).count();
    while Instant::now() < drain_until && all_got(&got) < connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = all_got(&got);
    let mut reach = histogram();
    for g in got.iter() {
        let t = g.load(Ordering::Relaxed);
        if t > 0 {
            reach.saturating_record(t.saturating_sub(t0).max(1));
        }
    }
    // Let the server settle its files (the outbox cleared, the WAL written) before reading sizes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_peak = peak.finish().await;
    let cpu = cpu_spent(
        &ticks_before,
        &server_ticks(&srv.pids),
        (tool_before, rss::cpu_ticks(std::process::id()).unwrap_or(0)),
    );
    let disk_after = srv.disk();
    let (ended, end_reason) = stop_all(&stop, tasks).await;
    let rows = acked_rows.load(Ordering::Relaxed);
    let (failed, first_error) = errors.lock().clone();
    let growth = match (disk_before, disk_after) {
        (Some(b), Some(a)) => json!({
            "inbox_before": b.0, "inbox_after": a.0, "other_before": b.1, "other_after": a.1,
            "total_growth": (a.0 + a.1) as i64 - (b.0 + b.1) as i64,
        }),
        _ => Value::Null,
    };
    Ok(json!({
        "test": "fanout",
        "mode": match f.mode { FanoutMode::Notify => "notify", FanoutMode::Broadcast => "broadcast" },
        "transport": f.transport.to_string(),
        "users": f.users,
        "connected_wanted": connected_n,
        "connected": connected,
        "first_connect_error": connect_error,
        "ramp_secs": ramp_secs,
        "per_call": f.per_call,
        "concurrency": f.concurrency,
        "rows_acked": rows,
        "rows_failed": failed,
        "first_error": first_error,
        "ack_all_ms": ms(ack_us),
        "rows_per_sec": if ack_us > 0 { rows as f64 / (ack_us as f64 / 1e6) } else { 0.0 },
        "call_ms": quantiles(&call_ms.lock()),
        "received": received,
        "missing": connected.saturating_sub(received),
        "reach_ms": quantiles(&reach),
        "last_user_ms": if reach.is_empty() { Value::Null } else { json!(ms(reach.max())) },
        "ended_early": ended,
        "first_end_reason": end_reason,
        "rss_kib": {"idle": rss_idle, "conns": rss_conns, "peak": rss_peak},
        "cpu_secs": cpu,
        "disk_bytes": growth,
    }))
}

#[derive(Debug, Clone)]
pub struct MarkRead {
    pub transport: Transport,
    pub users: usize,
    /// Items each inbox gets before the changes start.
    pub items: usize,
    /// Changes per second over all users.
    pub rate: f64,
    pub duration: Duration,
    pub drain: Duration,
}

/// Notifies `users` users `items` times (calls of `per_call` users, `concurrency` in flight); returns the
/// item ids per user, oldest first.
async fn prefill(
    srv: &Server,
    client: &reqwest::Client,
    users: usize,
    items: usize,
    per_call: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Vec<i64>>> {
    let ids = Arc::new(Mutex::new(vec![Vec::with_capacity(items); users]));
    let chunks = users.div_ceil(per_call.max(1));
    for k in 0..items {
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (srv, client, next, ids) = (srv.clone(), client.clone(), next.clone(), ids.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= chunks {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let range = c * per_call..((c + 1) * per_call).min(users);
                    let body = json!({
                        "users": range.clone().map(user).collect::<Vec<_>>(),
                        "item": {"title": format!("item {k}"), "category": format!("c{}", k % 3)},
                    });
                    let v = srv.api(&client, "inbox_notify", &body).await?;
                    let delivered = v["result"]["delivered"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let mut ids = ids.lock();
                    for d in delivered {
                        let (Some(u), Some(id)) = (d["user"].as_str(), d["id"].as_i64()) else {
                            continue;
                        };
                        if let Some(i) = u.strip_prefix('u').and_then(|n| n.parse::<usize>().ok()) {
                            if let Some(v) = ids.get_mut(i) {
                                v.push(id);
                            }
                        }
                    }
                }
            }));
        }
        for w in workers {
            w.await.map_err(|e| anyhow!("prefill task: {e}"))??;
        }
    }
    let ids = std::mem::take(&mut *ids.lock());
    Ok(ids)
}

/// What device B saw: the receipt time of each (user, version), and the newest version with its counts.
#[derive(Default)]
struct Seen {
    at: HashMap<(usize, i64), u64>,
    last: HashMap<usize, (i64, Value)>,
}

pub async fn markread(srv: &Server, m: &MarkRead) -> anyhow::Result<Value> {
    let client = client(256)?;
    let t_fill = Instant::now();
    let ids = prefill(srv, &client, m.users, m.items, 1000, 4).await?;
    let fill_secs = t_fill.elapsed().as_secs_f64();
    if ids.iter().any(|v| v.len() < m.items) {
        bail!("prefill: some inbox got fewer than {} items", m.items);
    }
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..m.users)
            .map(|i| user_token(&srv.jwt_key, &user(i)))
            .collect::<anyhow::Result<_>>()?,
    );

    // Device B of every user.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = CancellationToken::new();
    let on_event = {
        let seen = seen.clone();
        Arc::new(move |i: usize, d: &[u8]| {
            let now = now_us();
            let Some(ev) = inbox_event(d) else { return };
            let Some(version) = ev["version"].as_i64() else {
                return;
            };
            let mut s = seen.lock();
            s.at.entry((i, version)).or_insert(now);
            let newer = s.last.get(&i).is_none_or(|(v, _)| *v < version);
            if newer {
                s.last.insert(i, (version, ev["counts"].clone()));
            }
        })
    };
    let (tasks, connected, connect_error) = connect_all(
        srv,
        m.transport,
        m.users,
        |i| format!("inbox:#{}", user(i)),
        &stop,
        on_event,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Device A: change k at t0 + k/rate, to user k % users, item (k / users) % items: the first pass over
    // a user's items marks them read, the next unread, and so on, so every change changes something.
    let n = (m.rate * m.duration.as_secs_f64()).ceil() as usize;
    let ids = Arc::new(ids);
    let locks: Arc<Vec<tokio::sync::Mutex<()>>> =
        Arc::new((0..m.users).map(|_| tokio::sync::Mutex::new(())).collect());
    let sends = Arc::new(Mutex::new(Vec::<(usize, i64, u64, u64)>::with_capacity(n)));
    let errors = Arc::new(Mutex::new((0usize, None::<String>)));
    let t0 = Instant::now();
    let deadline = t0 + m.duration + Duration::from_secs(30);
    let mut changes = Vec::with_capacity(n);
    for k in 0..n {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(k as f64 / m.rate)).await;
        if Instant::now() >= deadline {
            break;
        }
        let u = k % m.users;
        let pass = k / m.users;
        let item = ids[u][pass % m.items];
        let read = (pass / m.items).is_multiple_of(2);
        let (srv, client, tokens, locks, sends, errors) = (
            srv.clone(),
            client.clone(),
            tokens.clone(),
            locks.clone(),
            sends.clone(),
            errors.clone(),
        );
        changes.push(tokio::spawn(async move {
            let _one_at_a_time = locks[u].lock().await;
            let sent = now_us();
            let r = async {
                let resp = client
                    .post(format!("http://{}/inbox/items/{item}", srv.addr))
                    .bearer_auth(&tokens[u])
                    .header("content-type", "application/json")
                    .body(json!({ "read": read }).to_string())
                    .send()
                    .await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                if !status.is_success() {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
                Ok::<Value, anyhow::Error>(serde_json::from_slice(&body)?)
            }
            .await;
            let done = now_us();
            match r {
                Ok(v) if v["changed"].as_u64() == Some(1) => {
                    let version = v["version"].as_i64().unwrap_or(-1);
                    sends.lock().push((u, version, sent, done));
                }
                Ok(v) => {
                    let mut e = errors.lock();
                    e.0 += 1;
                    e.1.get_or_insert_with(|| format!("nothing changed: {v}"));
                }
                Err(err) => {
                    let mut e = errors.lock();
                    e.0 += 1;
                    e.1.get_or_insert_with(|| format!("{err:#}"));
                }
            }
        }));
    }
    for c in changes {
        let _ = tokio::time::timeout(Duration::from_secs(30), c).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let sends = std::mem::take(&mut *sends.lock());
    let drain_until = Instant::now() + m.drain;
    let missing = |seen: &Seen| {
        sends
            .iter()
            .filter(|(u, v, _, _)| !seen.at.contains_key(&(*u, *v)))
            .count()
    };
    while Instant::now() < drain_until && missing(&seen.lock()) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut latency, mut response) = (histogram(), histogram());
    {
        let s = seen.lock();
        for (u, v, sent, done) in &sends {
            response.saturating_record(done.saturating_sub(*sent).max(1));
            if let Some(at) = s.at.get(&(*u, *v)) {
                latency.saturating_record(at.saturating_sub(*sent).max(1));
            }
        }
    }
    let not_received = missing(&seen.lock());
    let (ended, end_reason) = stop_all(&stop, tasks).await;

    // No drift: the stored counts, a recount from listing every item, and what device B saw last.
    let last = std::mem::take(&mut seen.lock().last);
    let mut drift = json!({});
    let (mut stored_vs_recount, mut stored_vs_b, mut version_vs_b, mut checked) = (0, 0, 0, 0);
    let mut first_drift = None;
    for u in 0..m.users {
        let name = user(u);
        let c = srv
            .api(&client, "inbox_counts", &json!({ "user": name }))
            .await?;
        let stored = &c["result"]["counts"];
        let version = c["result"]["version"].as_i64();
        let (mut unread, mut total, mut cursor) = (0i64, 0i64, None::<i64>);
        for _page in 0..1000 {
            let mut q = json!({"user": name, "archived": "all", "snoozed": true, "limit": 200});
            if let Some(cur) = cursor {
                q["cursor"] = json!(cur);
            }
            let p = srv.api(&client, "inbox_list", &q).await?;
            for it in p["result"]["items"].as_array().into_iter().flatten() {
                total += 1;
                let active = it["archived_at"].is_null() && it["snoozed_until"].is_null();
                unread += i64::from(active && it["read_at"].is_null());
            }
            cursor = p["result"]["next_cursor"].as_i64();
            if cursor.is_none() {
                break;
            }
        }
        checked += 1;
        if stored["unread"].as_i64() != Some(unread) || stored["total"].as_i64() != Some(total) {
            stored_vs_recount += 1;
            first_drift.get_or_insert_with(|| {
                format!("{name}: stored {stored}, recount unread {unread} total {total}")
            });
        }
        if let Some((v, counts)) = last.get(&u) {
            if Some(*v) != version {
                version_vs_b += 1;
            }
            if counts["unread"] != stored["unread"] {
                stored_vs_b += 1;
                first_drift.get_or_insert_with(|| {
                    format!("{name}: stored {stored}, device B last saw {counts} (version {v})")
                });
            }
        }
    }
    drift["users_checked"] = json!(checked);
    drift["stored_vs_recount"] = json!(stored_vs_recount);
    drift["stored_vs_device_b"] = json!(stored_vs_b);
    drift["version_vs_device_b"] = json!(version_vs_b);
    drift["first"] = json!(first_drift);
    let (failed, first_error) = errors.lock().clone();
    Ok(json!({
        "test": "markread",
        "transport": m.transport.to_string(),
        "users": m.users,
        "items": m.items,
        "prefill_secs": fill_secs,
        "connected": connected,
        "first_connect_error": connect_error,
        "rate": m.rate,
        "changes_planned": n,
        "changes_ok": sends.len(),
        "changes_failed": failed,
        "first_error": first_error,
        "changes_per_sec": sends.len() as f64 / elapsed.max(1e-6),
        "a_to_b_ms": quantiles(&latency),
        "response_ms": quantiles(&response),
        "not_received": not_received,
        "ended_early": ended,
        "first_end_reason": end_reason,
        "drift": drift,
    }))
}

#[derive(Debug, Clone)]
pub struct Fill {
    pub users: usize,
    pub items: usize,
    pub per_call: usize,
    pub concurrency: usize,
    /// Stop starting calls after this.
    pub time_limit: Duration,
}

/// Item `k` of every inbox (category `c<k % 3>`), for k in 0..items, in calls of `per_call` users.
pub async fn fill(srv: &Server, f: &Fill) -> anyhow::Result<Value> {
    let client = client(f.concurrency)?;
    let per_call = f.per_call.max(1);
    let chunks = f.users.div_ceil(per_call);
    let calls = chunks * f.items;
    let next = Arc::new(AtomicUsize::new(0));
    let rows = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new((0usize, None::<String>)));
    let disk_before = srv.disk();
    let peak = RssPeak::start(&srv.pids);
    let t0 = Instant::now();
    let deadline = t0 + f.time_limit;
    let mut workers = Vec::new();
    for _ in 0..f.concurrency.max(1) {
        let (srv, client, next, rows, errors) = (
            srv.clone(),
            client.clone(),
            next.clone(),
            rows.clone(),
            errors.clone(),
        );
        let users = f.users;
        workers.push(tokio::spawn(async move {
            let mut last_report = Instant::now();
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= calls || Instant::now() >= deadline {
                    break;
                }
                let (k, c) = (j / chunks, j % chunks);
                let range = c * per_call..((c + 1) * per_call).min(users);
                let body = json!({
                    "users": range.clone().map(user).collect::<Vec<_>>(),
                    "item": {"title": format!("item {k}"), "body": "filled by herald-bench", "category": format!("c{}", k % 3)},
                });
                match srv.api(&client, "inbox_notify", &body).await {
                    Ok(v) => {
                        let n = v["result"]["delivered"].as_array().map_or(0, |d| d.len());
                        rows.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let mut er = errors.lock();
                        er.0 += 1;
                        er.1.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                if last_report.elapsed() > Duration::from_secs(30) {
                    last_report = Instant::now();
                    eprintln!(
                        "fill: {} rows after {:.0} s",
                        rows.load(Ordering::Relaxed),
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss_peak = peak.finish().await;
    let disk_after = srv.disk();
    let rows = rows.load(Ordering::Relaxed);
    let (failed, first_error) = errors.lock().clone();
    Ok(json!({
        "test": "fill",
        "users": f.users,
        "items": f.items,
        "rows_planned": f.users * f.items,
        "rows": rows,
        "complete": rows as usize == f.users * f.items,
        "calls_failed": failed,
        "first_error": first_error,
        "secs": secs,
        "rows_per_sec": rows as f64 / secs.max(1e-6),
        "rss_peak_kib": rss_peak,
        "disk_before": disk_before.map(|d| json!({"inbox": d.0, "other": d.1})),
        "disk_after": disk_after.map(|d| json!({"inbox": d.0, "other": d.1})),
    }))
}

#[derive(Debug, Clone)]
pub struct Read {
    pub users: usize,
    /// Items per inbox as filled: places the deep cursor.
    pub items: usize,
    pub requests: usize,
    pub concurrency: usize,
    pub time_limit: Duration,
    /// Visits skipped at the start of the user sequence (see `herald-bench inbox read --help`).
    pub user_offset: usize,
}

/// List and counts through the browser API with each user's token: request `r` is, in turn, the first
/// page, a filtered page (category `c1`, unread) from a cursor 70% deep in the inbox, and the counts.
pub async fn read(srv: &Server, r: &Read) -> anyhow::Result<Value> {
    let client = client(r.concurrency)?;
    // Fill writes item k of every inbox before item k+1: ids of item k are about k*users .. (k+1)*users.
    let deep_cursor = (r.items * 3 / 10).max(1) * r.users;
    let kinds = ["first_page", "deep_filtered_page", "counts"];
    let hists: Arc<Vec<Mutex<Histogram<u64>>>> =
        Arc::new(kinds.iter().map(|_| Mutex::new(histogram())).collect());
    let items_seen: Arc<Vec<AtomicU64>> =
        Arc::new(kinds.iter().map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new((0usize, None::<String>)));
    let t0 = Instant::now();
    let deadline = t0 + r.time_limit;
    let mut workers = Vec::new();
    for _ in 0..r.concurrency.max(1) {
        let (srv, client, next, hists, items_seen, errors) = (
            srv.clone(),
            client.clone(),
            next.clone(),
            hists.clone(),
            items_seen.clone(),
            errors.clone(),
        );
        let (users, requests, offset) = (r.users, r.requests, r.user_offset);
        workers.push(tokio::spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= requests || Instant::now() >= deadline {
                    break;
                }
                let kind = j % 3;
                let u = (offset + j / 3).wrapping_mul(7919) % users.max(1);
                let Ok(token) = user_token(&srv.jwt_key, &user(u)) else {
                    break;
                };
                let path = match kind {
                    0 => "/inbox?limit=50".to_string(),
                    1 => format!("/inbox?limit=50&status=unread&category=c1&cursor={deep_cursor}"),
                    _ => "/inbox/counts".to_string(),
                };
                let sent = now_us();
                let res = async {
                    let resp = client
                        .get(format!("http://{}{path}", srv.addr))
                        .bearer_auth(&token)
                        .send()
                        .await?;
                    let status = resp.status();
                    let body = resp.bytes().await?;
                    if !status.is_success() {
                        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
                    }
                    Ok::<Value, anyhow::Error>(serde_json::from_slice(&body)?)
                }
                .await;
                let done = now_us();
                match res {
                    Ok(v) => {
                        hists[kind]
                            .lock()
                            .saturating_record(done.saturating_sub(sent).max(1));
                        let n = v["items"].as_array().map_or(0, |a| a.len());
                        items_seen[kind].fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let mut er = errors.lock();
                        er.0 += 1;
                        er.1.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut out = json!({
        "test": "read",
        "users": r.users,
        "items": r.items,
        "concurrency": r.concurrency,
        "deep_cursor": deep_cursor,
        "user_offset": r.user_offset,
        "secs": secs,
        "requests_per_sec": next.load(Ordering::Relaxed).min(r.requests) as f64 / secs.max(1e-6),
    });
    for (i, k) in kinds.iter().enumerate() {
        let h = hists[i].lock();
        let mut q = quantiles(&h);
        if !q.is_null() && i < 2 {
            q["items_per_page"] =
                json!(items_seen[i].load(Ordering::Relaxed) as f64 / h.len().max(1) as f64);
        }
        out[*k] = q;
    }
    let (failed, first_error) = errors.lock().clone();
    out["failed"] = json!(failed);
    out["first_error"] = json!(first_error);
    Ok(out)
}

/// Appends `v` (with `round` and `label`) as one JSON line to `path`, and prints it.
pub fn report(v: &mut Value, label: &str, round: u32, path: Option<&Path>) -> anyhow::Result<()> {
    v["label"] = json!(label);
    v["round"] = json!(round);
    println!("{}", serde_json::to_string_pretty(v)?);
    if let Some(p) = path {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?;
        writeln!(f, "{v}")?;
    }
    Ok(())
}

/// The figures of each test that the summary table shows: (name, JSON pointer).
fn summary_metrics(test: &str) -> &'static [(&'static str, &'static str)] {
    match test {
        "fanout" => &[
            ("all calls acknowledged, ms", "/ack_all_ms"),
            ("last connected user has the event, ms", "/last_user_ms"),
            ("connected users' receipt p50, ms", "/reach_ms/p50_ms"),
            ("rows/s (acknowledged)", "/rows_per_sec"),
            ("call p99, ms", "/call_ms/p99_ms"),
            (
                "server CPU from the first call to 2 s after the last event, s",
                "/cpu_secs/server",
            ),
            ("  inbox writer thread, s", "/cpu_secs/inbox_writer"),
            ("  log writer thread, s", "/cpu_secs/log_writer"),
            ("  tokio workers, s", "/cpu_secs/tokio_workers"),
            ("load tool CPU, s", "/cpu_secs/load_tool"),
            ("server RSS with connections, KiB", "/rss_kib/conns"),
            ("server RSS peak, KiB", "/rss_kib/peak"),
            ("inbox files before, bytes", "/disk_bytes/inbox_before"),
            ("inbox files after, bytes", "/disk_bytes/inbox_after"),
            (
                "other files (log) before, bytes",
                "/disk_bytes/other_before",
            ),
            ("other files (log) after, bytes", "/disk_bytes/other_after"),
            ("connected", "/connected"),
            ("events missing", "/missing"),
            ("rows failed", "/rows_failed"),
        ],
        "markread" => &[
            ("changes/s", "/changes_per_sec"),
            ("A request to B event p50, ms", "/a_to_b_ms/p50_ms"),
            ("A request to B event p99, ms", "/a_to_b_ms/p99_ms"),
            ("A request to B event max, ms", "/a_to_b_ms/max_ms"),
            ("A response p99, ms", "/response_ms/p99_ms"),
            ("events not received", "/not_received"),
            ("changes failed", "/changes_failed"),
            (
                "counts differing from a recount",
                "/drift/stored_vs_recount",
            ),
            (
                "counts differing from B's last",
                "/drift/stored_vs_device_b",
            ),
            (
                "versions differing from B's last",
                "/drift/version_vs_device_b",
            ),
        ],
        "fill" => &[
            ("rows", "/rows"),
            ("seconds", "/secs"),
            ("rows/s", "/rows_per_sec"),
            ("inbox files after, bytes", "/disk_after/inbox"),
            ("server RSS peak, KiB", "/rss_peak_kib"),
        ],
        "read" => &[
            ("requests/s", "/requests_per_sec"),
            ("first page p50, ms", "/first_page/p50_ms"),
            ("first page p99, ms", "/first_page/p99_ms"),
            ("deep filtered page p50, ms", "/deep_filtered_page/p50_ms"),
            ("deep filtered page p99, ms", "/deep_filtered_page/p99_ms"),
            (
                "deep filtered page, items per page",
                "/deep_filtered_page/items_per_page",
            ),
            ("counts p50, ms", "/counts/p50_ms"),
            ("counts p99, ms", "/counts/p99_ms"),
            ("failed", "/failed"),
        ],
        // Written by scripts/inbox-bulk-fill.sh and scripts/bench-inbox.sh (FILL=bulk), not by this tool.
        "bulk_fill" => &[
            ("rows", "/rows"),
            ("items per inbox", "/items"),
            ("insert, s", "/insert_secs"),
            ("index rebuild, s", "/index_secs"),
            ("inbox file, bytes", "/db_bytes"),
        ],
        "start" => &[
            ("start to first answer, s", "/start_secs"),
            (
                "start-up check still running then (1 = yes)",
                "/check_running",
            ),
            ("server RSS, KiB", "/rss_kib"),
            ("inbox file in page cache, bytes", "/inbox_bytes_cached"),
        ],
        "check" => &[
            ("start-up check finished (1 = yes)", "/finished"),
            ("start-up check, s", "/check_secs"),
            ("inboxes checked", "/users"),
            ("counts rows repaired", "/repaired"),
            ("server RSS after it, KiB", "/rss_kib"),
        ],
        "rss" => &[("server RSS, KiB", "/rss_kib")],
        _ => &[],
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 || x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// A markdown table from the JSON lines of `inbox` runs: per label (in first-seen order) and figure, the
/// median over rounds and every round's value.
pub fn summary(jsonl: &str) -> anyhow::Result<String> {
    let mut labels: Vec<(String, String)> = Vec::new();
    let mut runs: HashMap<String, Vec<Value>> = HashMap::new();
    for (n, line) in jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
        let label = v["label"].as_str().unwrap_or("").to_string();
        let test = v["test"].as_str().unwrap_or("").to_string();
        if !runs.contains_key(&label) {
            labels.push((label.clone(), test));
        }
        runs.entry(label).or_default().push(v);
    }
    let mut out = String::from("| workload | figure | median | rounds |\n|---|---|---:|---|\n");
    for (label, test) in &labels {
        let rs = &runs[label];
        let mut first = true;
        for (name, ptr) in summary_metrics(test) {
            // A yes/no figure (the start-up check's) counts as 1/0.
            let vals: Vec<f64> = rs
                .iter()
                .filter_map(|r| {
                    let v = r.pointer(ptr)?;
                    v.as_f64().or_else(|| v.as_bool().map(f64::from))
                })
                .collect();
            if vals.is_empty() {
                continue;
            }
            let med = median(vals.clone()).map_or("–".to_string(), num);
            let each: Vec<String> = vals.iter().map(|x| num(*x)).collect();
            out.push_str(&format!(
                "| {} | {name} | {med} | {} |\n",
                if first { label.as_str() } else { "" },
                each.join(" / ")
            ));
            first = false;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_medians_per_label() {
        let lines = [
            json!({"label": "a", "test": "read", "requests_per_sec": 10.0, "first_page": {"p99_ms": 3.0}}),
            json!({"label": "a", "test": "read", "requests_per_sec": 30.0, "first_page": {"p99_ms": 1.0}}),
            json!({"label": "a", "test": "read", "requests_per_sec": 20.0, "first_page": {"p99_ms": 2.0}}),
        ]
        .map(|v| v.to_string())
        .join("\n");
        let t = summary(&lines).expect("table");
        assert!(t.contains("| a | requests/s | 20 | 10 / 30 / 20 |"), "{t}");
        assert!(
            t.contains("|  | first page p99, ms | 2 | 3 / 1 / 2 |"),
            "{t}"
        );
        assert!(
            !t.contains("counts p99"),
            "figures no run has are left out: {t}"
        );
    }

    /// A thread's own CPU time is read from its `task/<tid>/stat` (`/proc/<tid>/stat` gives every thread
    /// the whole process's): a spinning thread has its time, a sleeping one none of it.
    #[test]
    fn thread_cpu_is_each_threads_own() {
        let stat = "42 (herald inbox) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 9 0";
        assert_eq!(thread_ticks(stat), Some(281));
        let me = std::process::id();
        let named = |name: &str| server_ticks(&[me]).1.get(name).copied().unwrap_or(0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sleeper = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("herald-writer".into())
                .spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                        std::thread::park_timeout(Duration::from_millis(50));
                    }
                })
                .unwrap()
        };
        // Spins until it has 25 ticks of CPU of its own (bounded in wall time: a loaded machine gives it
        // less of a core), says so, then sleeps until stopped.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spinner = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("herald-inbox".into())
                .spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    let own = || {
                        std::fs::read_to_string("/proc/thread-self/stat")
                            .ok()
                            .and_then(|s| thread_ticks(&s))
                            .unwrap_or(0)
                    };
                    let mut x = 0u64;
                    while own() < 25 && std::time::Instant::now() < deadline {
                        for _ in 0..100_000 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
                        }
                    }
                    let _ = done_tx.send(own());
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                        std::thread::park_timeout(Duration::from_millis(50));
                    }
                })
                .unwrap()
        };
        let spun = done_rx.recv_timeout(Duration::from_secs(40)).unwrap();
        let (inbox, writer) = (named("herald-inbox"), named("herald-writer"));
        stop.store(true, Ordering::Relaxed);
        for t in [spinner, sleeper] {
            t.thread().unpark();
            t.join().unwrap();
        }
        assert!(spun >= 25, "the spinner got {spun} ticks in 30 s");
        assert!(inbox >= spun, "the spinning thread: {inbox} ticks");
        assert!(
            writer <= 2,
            "the sleeping thread: {writer} ticks, not the process's"
        );
    }

    #[test]
    fn events_are_found_in_either_envelope() {
        let ev = json!({"type": "updated", "version": 3, "counts": {"unread": 1}});
        assert_eq!(inbox_event(ev.to_string().as_bytes()), Some(ev.clone()));
        let push = json!({"push": {"channel": "inbox:#u1", "pub": {"data": ev}}});
        assert_eq!(inbox_event(push.to_string().as_bytes()), Some(ev.clone()));
        let text = json!({"push": {"pub": {"data": ev.to_string()}}});
        assert_eq!(inbox_event(text.to_string().as_bytes()), Some(ev));
        assert_eq!(inbox_event(b"{\"id\":1}"), None);
        assert_eq!(query_escape("inbox:#u1"), "inbox%3A%23u1");
    }
}
