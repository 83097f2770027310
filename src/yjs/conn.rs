//! One y-websocket connection: a task that owns the socket, reads the client's messages and writes what
//! its document queue holds (sync answers and the other clients' updates and awareness, in order).
//!
//! A refusal is said twice, because the stock provider shows only one of them: the protocol's auth
//! message (the provider passes its reason to `permissionDeniedHandler`), then a close frame whose code
//! and reason say why (a close code of the 4xxx range for auth, standard codes otherwise).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

use super::doc::{decode_update, valid_name, DocError, Docs, Frame, PeerHandle};
use super::socket::{Upgrade, WsStream};
use crate::access::DocRight;
use crate::auth::Role;
use crate::centrifugo::conn::{check_origin, fit_close_reason};
use crate::error::ApiError;
use crate::hub::{ConnectionGuard, Transport};
use crate::state::AppState;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Small: an idle connection keeps it (zero-filled, so resident) for its life; awareness and typing fit in
/// one read, and a larger update takes a few more reads, which is cheaper than every idle connection paying
/// for it (as on the Centrifugo face).
const READ_BUFFER: usize = 256;

/// Close codes. The 44xx ones mirror HTTP statuses, as y-websocket servers commonly do.
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_FORBIDDEN: u16 = 4403;
pub const CLOSE_DOCUMENT_FULL: u16 = 4413;
pub const CLOSE_INVALID: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_TRY_LATER: u16 = 1013;

type Close = (u16, String);

/// `GET /yjs/<document>`: the provider's `serverUrl` is `ws(s)://host/yjs`, and it appends the room.
pub async fn upgrade(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    remote: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    check_origin(&st, &headers)?;
    if !valid_name(&name) {
        return Err(ApiError::bad_request(
            "invalid_document",
            "a document name is 1 to 255 bytes without control characters",
        ));
    }
    // Decided before the upgrade, told after it: a browser shows a page nothing of a refused upgrade.
    let mut exp = None;
    let right = match st.auth.extract(&headers, query.as_deref()) {
        Ok(Some((token, _))) => match st.auth.verify(Role::Subscriber, &token) {
            Ok(claims) => {
                exp = claims.exp;
                Ok(st.access.doc_right(Some(&claims), &name))
            }
            Err(e) => Err((CLOSE_UNAUTHORIZED, e.message.clone())),
        },
        Ok(None) => match st.access.doc_right(None, &name) {
            DocRight::None => Err((
                CLOSE_UNAUTHORIZED,
                "no token: add ?authorization=<jwt> to the provider's params (or the header or cookie)"
                    .to_string(),
            )),
            r => Ok(r),
        },
        Err(e) => Err((CLOSE_UNAUTHORIZED, e.message.clone())),
    };
    let right = match right {
        Ok(DocRight::None) => Err((
            CLOSE_FORBIDDEN,
            format!("no access to document {name}: the token's docs claim must select it"),
        )),
        Ok(r) => Ok(r),
        Err(e) => Err(e),
    };
    let guard = st
        .hub
        .connect(Transport::WebSocket, remote.map(|r| r.0 .0))?;
    let max = docs.config().max_update_size;
    // Frames up to twice the limit are read, so that an oversized update is refused with a clear close.
    let cap = max.saturating_mul(2).max(64 * 1024);
    // Each frame goes to the socket's own batch at once (`write_buffer_size` 0): see socket.rs.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(cap))
        .max_frame_size(Some(cap));
    Ok(ws.on_upgrade(config, move |socket| {
        tokio::spawn(run(Box::new(Conn {
            docs,
            socket,
            name,
            right,
            exp,
            _guard: guard,
        })));
    }))
}

/// What a connection's task owns, in one allocation of its own.
struct Conn<S> {
    docs: Arc<Docs>,
    socket: WsStream<S>,
    name: String,
    right: Result<DocRight, Close>,
    exp: Option<u64>,
    _guard: ConnectionGuard,
}

/// The connection's task. Its future is allocated once per connection and lives as long as it, so its size
/// is part of every idle connection's memory: a future is as large as its largest state, and an async
/// fn's arguments are stored in it twice (as arguments and as the locals they move into), so the task gets
/// its state boxed, in one argument, and boxes its one-off steps (the refusal, loading the document,
/// storing what is left and leaving), whose states would otherwise set the size of the loop an idle
/// connection waits in for hours. `an_idle_connection_task_is_small` holds it.
async fn run<S>(mut c: Box<Conn<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let right = match std::mem::replace(&mut c.right, Ok(DocRight::None)) {
        Ok(r) => r,
        Err((code, reason)) => {
            Box::pin(refuse(&mut c.socket, code, reason)).await;
            return;
        }
    };
    let doc = match Box::pin(c.docs.open(&c.name)).await {
        Ok(d) => d,
        Err(e) => {
            let (code, reason) = close_for(&e);
            Box::pin(close(&mut c.socket, code, &reason)).await;
            return;
        }
    };
    let c = &mut *c;
    let docs = &c.docs;
    let mut peer = docs.join(doc);
    let mut commits = Commits::default();
    let mut told_read_only = false;
    // Rights come from the token, so they end with it (as an SSE stream does): the provider stops on a
    // 44xx close, and the app reconnects it with a fresh token. The timer is boxed, and only made for a
    // token that expires: a timer in the loop's state would make every connection's task larger.
    let mut expires = c.exp.map(|e| {
        let left = e.saturating_sub(crate::auth::unix_now());
        Box::pin(tokio::time::sleep(Duration::from_secs(left)))
    });
    let end: Option<Close> = loop {
        tokio::select! {
            _ = expiry(&mut expires) => {
                break Some((CLOSE_UNAUTHORIZED, "the token expired: reconnect with a fresh one".into()))
            }
            stored = commits.committed() => match stored {
                Ok(()) => commits.start(docs, &peer),
                Err(e) => break Some(close_for(&e)),
            },
            frame = peer.recv() => match frame {
                Some(f) => {
                    gather(&mut c.socket, &mut peer, f);
                    if c.socket.flush().await.is_err() {
                        break None;
                    }
                }
                // The document closes the queues of its connections when it unloads, and when the
                // server stops (so a connection waits on one thing, not on a shutdown token too).
                None if docs.hub().shutdown_token().is_cancelled() => {
                    break Some((CLOSE_RESTART, "server restarting".into()))
                }
                None => break Some((
                    CLOSE_TRY_LATER,
                    "closed by the server (too slow, or the document was unloaded); reconnect".into(),
                )),
            },
            // Read on while earlier updates wait for their commit, up to a bound.
            msg = c.socket.next(), if !commits.full() => match msg {
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => break None,
                Some(Ok(WsMessage::Binary(data))) => {
                    // Boxed in place: a named future would keep its storage in this task's state.
                    let read =
                        Box::pin(on_frame(docs, &peer, &mut commits, right, data, &mut told_read_only));
                    if let Err(c) = read.await {
                        break Some(c);
                    }
                }
                Some(Ok(WsMessage::Text(_))) => {
                    break Some((CLOSE_INVALID, "y-websocket messages are binary frames".into()))
                }
                Some(Ok(_)) => {}
            },
        }
    };
    Box::pin(end_connection(
        docs,
        &mut c.socket,
        &c.name,
        peer,
        commits,
        end,
    ))
    .await;
}

/// Tells a refused client why: the protocol's auth message, then the close.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WsStream<S>,
    code: u16,
    reason: String,
) {
    let denied = Message::Auth(Some(reason.clone())).encode_v1();
    let _ = socket.send(WsMessage::Binary(denied.into())).await;
    close(socket, code, &reason).await;
}

/// What the client sent before it left (or was closed) is stored as if it had stayed: it was read. Then
/// the connection leaves its document and is closed with `end`'s code and reason, if any.
async fn end_connection<S: AsyncRead + AsyncWrite + Unpin>(
    docs: &Arc<Docs>,
    socket: &mut WsStream<S>,
    name: &str,
    peer: PeerHandle,
    mut commits: Commits,
    end: Option<Close>,
) {
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, commits.finish(docs, &peer)).await {
        tracing::debug!(doc = %name, error = %e, "updates of a closing connection not stored");
    }
    docs.leave(&peer.doc, peer.id).await;
    if let Some((code, reason)) = end {
        tracing::debug!(doc = %name, code, reason, "closing y-websocket connection");
        close(socket, code, &reason).await;
    }
}

/// Completes when the token's timer does; never without one.
async fn expiry(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Frames written before one flush: each is still its own message (y-websocket reads one per frame).
const WRITE_BATCH: usize = 64;

/// Adds `first` and what else is already queued for this connection (up to `WRITE_BATCH` frames) to its
/// batch, which the caller flushes once: under fan-out most of the server's time went to one `send`
/// syscall per frame. A frame that cannot be added (the socket is closing) is dropped here and the flush
/// that follows reports the socket's state.
fn gather<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WsStream<S>,
    peer: &mut PeerHandle,
    first: Frame,
) {
    let mut frame = Some(first);
    for _ in 0..WRITE_BATCH {
        let Some(f) = frame.take().or_else(|| peer.try_recv()) else {
            break;
        };
        if super::socket::push(socket, &f).is_err() {
            break;
        }
    }
}

/// Bytes of one connection's updates waiting behind its commit in flight; past them the connection stops
/// reading its socket until that commit ends, which holds a writer faster than the disk to its pace.
const WAITING_BYTES: usize = 1 << 20;
/// The same, in updates.
const WAITING_UPDATES: usize = 4096;

type Commit = Pin<Box<dyn Future<Output = Result<(), DocError>> + Send>>;

/// A connection's updates on their way to the engine: at most one commit in flight, and the updates read
/// since, which go into the next one merged. So a fast writer's updates share commits instead of taking
/// one each (its next message used to be read only once the previous update was committed), their order
/// is kept (one commit at a time), and each is still stored before anyone else sees it.
#[derive(Default)]
struct Commits {
    inflight: Option<Commit>,
    waiting: Vec<Bytes>,
    waiting_bytes: usize,
}

impl Commits {
    /// Adds a checked update; it is stored at once when no commit is in flight.
    fn push(&mut self, docs: &Arc<Docs>, peer: &PeerHandle, update: Bytes) {
        self.waiting_bytes += update.len();
        self.waiting.push(update);
        if self.inflight.is_none() {
            self.start(docs, peer);
        }
    }

    /// Starts storing what waits, as one commit.
    fn start(&mut self, docs: &Arc<Docs>, peer: &PeerHandle) {
        if self.waiting.is_empty() {
            return;
        }
        let updates = std::mem::take(&mut self.waiting);
        self.waiting_bytes = 0;
        let (docs, doc, id) = (docs.clone(), peer.doc.clone(), peer.id);
        self.inflight = Some(Box::pin(async move {
            docs.store_updates(&doc, Some(id), updates).await
        }));
    }

    fn full(&self) -> bool {
        self.waiting_bytes >= WAITING_BYTES || self.waiting.len() >= WAITING_UPDATES
    }

    /// Completes when the commit in flight does (never when there is none). Cancel-safe: the commit
    /// stays in `inflight` until it completes.
    async fn committed(&mut self) -> Result<(), DocError> {
        match &mut self.inflight {
            Some(commit) => {
                let r = commit.await;
                self.inflight = None;
                if r.is_err() {
                    // The connection is closed for it: what waited behind it is not stored either.
                    self.waiting.clear();
                    self.waiting_bytes = 0;
                }
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Stores everything read, commit after commit.
    async fn finish(&mut self, docs: &Arc<Docs>, peer: &PeerHandle) -> Result<(), DocError> {
        loop {
            if self.inflight.is_none() {
                self.start(docs, peer);
            }
            if self.inflight.is_none() {
                return Ok(());
            }
            self.committed().await?;
        }
    }
}

/// Handles the message of one frame. A frame holds one message, as every y-websocket client sends them
/// (and as the reference server reads them); a truncated one is refused, not skipped.
async fn on_frame(
    docs: &Arc<Docs>,
    peer: &PeerHandle,
    commits: &mut Commits,
    right: DocRight,
    data: Bytes,
    told_read_only: &mut bool,
) -> Result<(), Close> {
    let max = docs.config().max_update_size;
    if data.len() > max {
        let e = DocError::UpdateTooLarge {
            size: data.len(),
            max,
        };
        super::doc::refused(&e);
        return Err(close_for(&e));
    }
    // yrs is not hardened against every input: a panic while decoding is a refusal too.
    let msg = match std::panic::catch_unwind(|| Message::decode_v1(&data)) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err((CLOSE_INVALID, format!("malformed y-websocket message: {e}"))),
        Err(_) => return Err((CLOSE_INVALID, "malformed y-websocket message".into())),
    };
    {
        match msg {
            Message::Sync(SyncMessage::SyncStep1(sv)) => peer.doc.sync_step2(peer.id, &sv),
            Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) => {
                if right < DocRight::Write {
                    // A read-only client's provider answers the server's sync step 1 with what it has;
                    // that is nothing unless it edited, and only an edit is refused.
                    let update = decode_update(&u).map_err(|e| close_for(&e))?;
                    if !update.is_empty() {
                        metrics::counter!("herald_yjs_updates_refused_total", "reason" => "read_only")
                            .increment(1);
                    }
                    if !update.is_empty() && !*told_read_only {
                        *told_read_only = true;
                        let reason =
                            format!("read-only: this token may not edit {}", peer.doc.name);
                        peer.doc
                            .send(peer.id, Message::Auth(Some(reason)).encode_v1().into());
                    }
                    return Ok(());
                }
                let pending = commits.waiting_bytes;
                if docs
                    .check_update(&peer.doc, &u, pending)
                    .map_err(|e| close_for(&e))?
                {
                    commits.push(docs, peer, u.into());
                }
            }
            Message::Awareness(update) => {
                docs.submit_awareness(&peer.doc, peer.id, &update)
                    .await
                    .map_err(|e| close_for(&e))?;
            }
            Message::AwarenessQuery => peer.doc.send_awareness(peer.id),
            Message::Auth(_) | Message::Custom(..) => {}
        }
    }
    Ok(())
}

fn close_for(e: &DocError) -> Close {
    let code = match e {
        DocError::TooMany(_) => CLOSE_TRY_LATER,
        DocError::Hub(_) | DocError::Log(_) => CLOSE_INTERNAL,
        DocError::Corrupt(_) => CLOSE_INVALID,
        DocError::UpdateTooLarge { .. } => CLOSE_TOO_BIG,
        DocError::DocumentFull(_) => CLOSE_DOCUMENT_FULL,
        DocError::Unloaded => CLOSE_TRY_LATER,
        DocError::SnapshotNotFound(..) | DocError::DocumentNotFound(_) => CLOSE_INTERNAL,
    };
    (code, e.to_string())
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WsStream<S>,
    code: u16,
    reason: &str,
) {
    let frame = CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from(fit_close_reason(reason)),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(WsMessage::Close(Some(frame)))).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::YjsConfig;
    use crate::engine::LocalEngine;
    use crate::hub::{Hub, HubOptions};
    use crate::log::{MemoryLog, Retention};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    /// The connection's task lives as long as the connection, so its size is paid by every idle one:
    /// 2.7 KB of the ~6.5 KB an idle y-websocket connection cost (heaptrack, 1 000 idle clients) was this
    /// task, sized by its arguments (stored twice) and its one-off steps' states. With the state boxed,
    /// those steps boxed, the writes synchronous and the shutdown seen through the queue, the future is
    /// 360 bytes (and the box ~430), so tokio's task cell (the future plus its header and trailer, in
    /// 128-byte lines) takes 512. The bound fails if a large state creeps back into the loop.
    #[tokio::test]
    async fn an_idle_connection_task_is_small() {
        let engine = Arc::new(LocalEngine::new(
            Arc::new(MemoryLog::new()),
            Retention::default(),
            Duration::from_secs(60),
        ));
        let hub = Hub::new(engine, HubOptions::default()).await.unwrap();
        let guard = hub.connect(Transport::WebSocket, None).unwrap();
        let docs = Docs::new(hub, YjsConfig::default());
        let (io, _client) = tokio::io::duplex(64);
        let socket = WebSocketStream::from_raw_socket(
            super::super::socket::BatchIo::new(io),
            Role::Server,
            None,
        )
        .await;
        let task = run(Box::new(Conn {
            docs,
            socket,
            name: "d".into(),
            right: Ok(DocRight::Write),
            exp: None,
            _guard: guard,
        }));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 400, "the connection's future is {size} bytes");
    }
}
