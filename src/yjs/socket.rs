//! The socket of a y-websocket connection: the WebSocket upgrade done here rather than by axum's
//! `WebSocketUpgrade`, so the connection owns a tungstenite stream over an I/O of ours.
//!
//! Why: tungstenite formats every frame it writes into one `Vec` that it drains but never shrinks, so a
//! connection kept, for its whole life, a buffer as large as the largest frame (or batch of frames) it
//! ever wrote: the whole awareness of its document sent to it on joining (about 9 bytes per client, so
//! ~4.5 KB per connection on average for 1 000 clients of one document, growing with them), or its sync
//! step 2, which is the whole document. Here a message is written by [`push`] straight into [`BatchIo`]:
//! tungstenite's `FrameHeader` formats the header, the payload follows it, and the batch of frames goes
//! out in one write on flush, after which the buffer is freed. tungstenite itself only writes control
//! frames (pongs, the close), and [`BatchIo`] takes whatever it writes at once, so its buffer is always
//! empty between calls and the two writers cannot interleave within a frame. Clients see the same
//! messages as from any WebSocket server, one frame each.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::error::ApiError;

/// A y-websocket connection's socket.
pub type Socket = WsStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A WebSocket over a batching I/O (generic so that tests can run a connection over an in-memory pipe).
pub type WsStream<T> = WebSocketStream<BatchIo<T>>;

/// A WebSocket upgrade request (HTTP/1.1; Herald does not offer WebSockets over HTTP/2).
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let h = &parts.headers;
        let upgrade = has_token(h, header::CONNECTION, "upgrade")
            && has_token(h, header::UPGRADE, "websocket");
        if !upgrade {
            return Err(ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                "a y-websocket provider connects here with a WebSocket upgrade",
            ));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(ApiError::bad_request(
                "websocket_version",
                "Sec-WebSocket-Version must be 13",
            ));
        }
        let key = h.get(header::SEC_WEBSOCKET_KEY).cloned().ok_or_else(|| {
            ApiError::bad_request("websocket_key", "Sec-WebSocket-Key is missing")
        })?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
            ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                "this connection cannot be upgraded to a WebSocket",
            )
        })?;
        Ok(Upgrade { key, on_upgrade })
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

impl Upgrade {
    /// The 101 response; `then` gets the socket once the client has it. `then` runs in a short task that
    /// ends when it returns: it should spawn the connection's own task rather than run it.
    pub fn on_upgrade(
        self,
        config: WebSocketConfig,
        then: impl FnOnce(Socket) + Send + 'static,
    ) -> Response {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = BatchIo::new(TokioIo::new(upgraded));
                    then(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await);
                }
                Err(e) => tracing::debug!(error = %e, "y-websocket upgrade failed"),
            }
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        response
    }
}

/// Adds one binary message, as one frame, after what is already gathered; [`WebSocketStream::flush`]
/// sends the batch. Not async, so that the connection's task holds no future of it while it waits. The
/// caller bounds a batch (in messages) before it flushes. Only for a connection that neither sent nor
/// received a close (tungstenite would refuse to write after one; the connection's task stops writing
/// messages when it sees one).
pub fn push<T: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<BatchIo<T>>,
    msg: &[u8],
) -> Result<(), tungstenite::Error> {
    let out = &mut socket.get_mut().out;
    let header = FrameHeader {
        is_final: true,
        opcode: OpCode::Data(Data::Binary),
        ..FrameHeader::default()
    };
    header.format(msg.len() as u64, out)?;
    out.extend_from_slice(msg);
    Ok(())
}

/// The upgraded connection, gathering frames until a flush: the messages [`push`] adds, and what
/// tungstenite writes (configured to write each frame at once, `write_buffer_size` 0). A batch goes out
/// in one write, and the buffer is freed once written, so an idle connection holds none.
pub struct BatchIo<T> {
    io: T,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
}

impl<T: AsyncWrite + Unpin> BatchIo<T> {
    pub(super) fn new(io: T) -> Self {
        BatchIo {
            io,
            out: Vec::new(),
            sent: 0,
        }
    }

    /// Writes what is gathered, then frees the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Never pending: what tungstenite writes (a pong, the close) is taken whole at once, so nothing of
        // it waits in tungstenite's buffer while `push` adds frames here, and the order holds.
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::Message;

    /// A long message leaves as one frame that a stock client reads back as the message it was, frames
    /// keep their order with what tungstenite writes itself (a pong), and once flushed no buffer of the
    /// message's size stays.
    #[tokio::test]
    async fn messages_go_out_whole_in_order_and_no_buffer_of_their_size_stays() {
        let (server_io, mut client_io) = tokio::io::duplex(1 << 20);
        let config = WebSocketConfig::default().write_buffer_size(0);
        let mut server =
            WebSocketStream::from_raw_socket(BatchIo::new(server_io), Role::Server, Some(config))
                .await;
        let long: Bytes = (0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
        let short = Bytes::from_static(b"short");
        push(&mut server, &long).unwrap();
        server
            .feed(Message::Pong(Bytes::from_static(b"p")))
            .await
            .unwrap();
        push(&mut server, &short).unwrap();
        assert!(
            server.get_ref().out.len() > long.len(),
            "frames are gathered until the flush"
        );
        server.flush().await.unwrap();
        assert_eq!(
            server.get_ref().out.capacity(),
            0,
            "the batch buffer is freed"
        );

        // The raw frames: unmasked server frames with FIN set, in the order they were written.
        let mut raw = vec![0u8; long.len() + 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), client_io.read(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let (mut at, mut frames) = (0, Vec::new());
        while at < n {
            let b0 = raw[at];
            let (len, head) = match raw[at + 1] & 0x7f {
                126 => (u16::from_be_bytes([raw[at + 2], raw[at + 3]]) as usize, 4),
                127 => panic!("no 64-bit lengths here"),
                l => (l as usize, 2),
            };
            assert_eq!(raw[at + 1] & 0x80, 0, "a server frame is not masked");
            frames.push((b0, raw[at + head..at + head + len].to_vec()));
            at += head + len;
        }
        assert_eq!(at, n);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], (0x82, long.to_vec()), "binary, final, whole");
        assert_eq!(frames[1], (0x8a, b"p".to_vec()), "the pong, after it");
        assert_eq!(frames[2], (0x82, short.to_vec()));

        // And a client reads them as messages.
        let (server_io, client_io) = tokio::io::duplex(1 << 20);
        let mut server =
            WebSocketStream::from_raw_socket(BatchIo::new(server_io), Role::Server, Some(config))
                .await;
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        push(&mut server, &long).unwrap();
        push(&mut server, &short).unwrap();
        server.flush().await.unwrap();
        for want in [long, short] {
            let got = tokio::time::timeout(Duration::from_secs(5), client.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(got, Message::Binary(want));
        }
    }
}
