//! The socket of a y-websocket connection: the WebSocket upgrade done here rather than by axum's
//! `WebSocketUpgrade`, so the connection owns a tungstenite stream over an I/O of ours.
//!
//! Why: tungstenite formats every frame it writes into one `Vec` that it drains but never shrinks, so a
//! connection kept, for its whole life, a buffer as large as the largest frame (or batch of frames) it
//! ever wrote: the whole awareness of its document sent to it on joining (about 9 bytes per client, so
//! ~4.5 KB per connection on average for 1 000 clients of one document, growing with them), or its sync
//! step 2, which is the whole document. Here tungstenite writes each frame at once into [`BatchIo`],
//! which gathers a batch of frames in a buffer of its own, writes it with one syscall on flush, and then
//! frees it; and a message longer than [`FRAME_MAX`] is written as a fragmented WebSocket message
//! (RFC 6455 §5.4, reassembled by every client), so tungstenite's own buffer stays under a few hundred
//! bytes whatever is written. Clients see the same messages as before.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::SinkExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::error::ApiError;

/// A y-websocket connection's socket.
pub type Socket = WebSocketStream<BatchIo<TokioIo<hyper::upgrade::Upgraded>>>;

/// Payload bytes per WebSocket frame written; a longer message goes out as several frames of one
/// message. Small, because tungstenite keeps a buffer the size of the largest frame for the connection's
/// life; each further frame costs 4 bytes of header on the wire.
pub const FRAME_MAX: usize = 256;

/// Gathered bytes beyond which a write goes to the socket before the flush (bounds the batch buffer).
const BATCH_MAX: usize = 64 * 1024;

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

/// Queues one binary message, fragmented into frames of at most [`FRAME_MAX`] bytes. Nothing else is
/// written between its frames (this connection's task writes one message after the other; tungstenite may
/// put a pong or a close between them, which the protocol allows).
pub async fn feed<T: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<BatchIo<T>>,
    msg: Bytes,
) -> Result<(), tungstenite::Error> {
    if msg.len() <= FRAME_MAX {
        return socket.feed(Message::Binary(msg)).await;
    }
    let mut at = 0;
    while at < msg.len() {
        let end = (at + FRAME_MAX).min(msg.len());
        let op = if at == 0 {
            Data::Binary
        } else {
            Data::Continue
        };
        let frame = Frame::message(msg.slice(at..end), OpCode::Data(op), end == msg.len());
        socket.feed(Message::Frame(frame)).await?;
        at = end;
    }
    Ok(())
}

/// The upgraded connection, gathering what tungstenite writes until a flush. tungstenite is configured to
/// write each frame at once (`write_buffer_size` 0), so its own buffer holds one frame at a time; the
/// frames of a batch meet here and go out in one write, and the buffer is freed once written, so an idle
/// connection holds none.
pub struct BatchIo<T> {
    io: T,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
}

impl<T: AsyncWrite + Unpin> BatchIo<T> {
    fn new(io: T) -> Self {
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
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.out.len() >= BATCH_MAX {
            ready!(self.poll_drain(cx))?;
        }
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
    use futures_util::StreamExt;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// A long message leaves as frames of at most `FRAME_MAX` bytes that a stock client reads back as the
    /// one message it was, and once flushed neither tungstenite nor the batch keeps a buffer of its size.
    #[tokio::test]
    async fn a_long_message_is_fragmented_and_no_buffer_of_its_size_stays() {
        let (server_io, mut client_io) = tokio::io::duplex(1 << 20);
        let config = WebSocketConfig::default().write_buffer_size(0);
        let mut server =
            WebSocketStream::from_raw_socket(BatchIo::new(server_io), Role::Server, Some(config))
                .await;
        let long: Bytes = (0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
        let short = Bytes::from_static(b"short");
        feed(&mut server, long.clone()).await.unwrap();
        feed(&mut server, short.clone()).await.unwrap();
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

        // The raw frames: unmasked server frames, 2-byte headers (payloads < 126), FIN on the last only.
        let mut raw = vec![0u8; long.len() + short.len() + 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), client_io.read(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let (mut at, mut frames, mut payload) = (0, Vec::new(), Vec::new());
        while at < n {
            let (b0, len) = (raw[at], (raw[at + 1] & 0x7f) as usize);
            let len = if len == 126 {
                at += 2;
                u16::from_be_bytes([raw[at], raw[at + 1]]) as usize
            } else {
                len
            };
            assert!(len <= FRAME_MAX, "a frame of {len} bytes");
            frames.push((b0 & 0x80 != 0, b0 & 0x0f));
            payload.extend_from_slice(&raw[at + 2..at + 2 + len]);
            at += 2 + len;
        }
        assert_eq!(at, n);
        let pieces = long.len().div_ceil(FRAME_MAX);
        assert_eq!(frames.len(), pieces + 1);
        assert_eq!(frames[0], (false, 2), "binary, not final");
        assert!(
            frames[1..pieces - 1].iter().all(|f| *f == (false, 0)),
            "continuations"
        );
        assert_eq!(
            frames[pieces - 1],
            (true, 0),
            "the last continuation ends the message"
        );
        assert_eq!(frames[pieces], (true, 2), "the short message is one frame");
        assert_eq!(&payload[..long.len()], &long[..]);

        // And a client reassembles them.
        let (server_io, client_io) = tokio::io::duplex(1 << 20);
        let mut server =
            WebSocketStream::from_raw_socket(BatchIo::new(server_io), Role::Server, Some(config))
                .await;
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        feed(&mut server, long.clone()).await.unwrap();
        server.flush().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::Binary(long));
    }
}
