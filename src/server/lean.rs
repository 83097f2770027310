//! Subscriber streams served straight on the socket, without hyper.
//!
//! Why: an idle subscriber should cost a few KiB, and with hyper it cannot. For the whole life of every
//! HTTP/1 connection hyper keeps an 8 KiB header write buffer, an 8–16 KiB read buffer and a ~3 KiB
//! connection future; measured, that was 25 KB of RSS per idle SSE subscriber, nine tenths of the total.
//! A subscription is one bodiless `GET` followed by one endless response, which is little HTTP: this module
//! reads the request head itself (with httparse, hyper's own parser), runs it through the same axum
//! [`Router`] (auth, CORS and handlers are unchanged), and writes the response with chunked framing.
//!
//! It takes only what it is sure of: a complete HTTP/1.1 `GET` of the Mercure hub path with no body, no
//! upgrade, no `Expect` and nothing pipelined behind it. Everything else (other paths and methods, HTTP/1.0,
//! HTTP/2, WebSocket upgrades, odd or oversized heads) goes to hyper together with the bytes already read.
//! After a stream that ended cleanly (keep-alive) the next request is read here again.
//!
//! It is also where a connection's first defence against slowloris sits: the request head (or, for HTTP/2,
//! the whole client preface) must arrive before a deadline that trickling bytes cannot push back, and hyper
//! only ever receives a connection whose protocol is already decided by the bytes handed over with it, so
//! hyper-util's version detection (which has no timeout) never waits on the client.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use axum::Router;
use bytes::{Buf, Bytes};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::admission::Permit;
use super::ConnKill;
use crate::mercure::HUB_PATH;

/// Largest request head read here; a larger one goes to hyper, which answers 431.
const MAX_HEAD: usize = 16 * 1024;
/// More headers than this: hyper's business (it allows 100).
const MAX_HEADERS: usize = 64;
/// First read size: a browser's EventSource request with cookies fits.
const FIRST_READ: usize = 2048;
/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Sent, if the socket takes it at once, to a client whose request head did not arrive in time.
const TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: application/json\r\n\
content-length: 95\r\n\
connection: close\r\n\
\r\n\
{\"code\":\"request_timeout\",\"message\":\"no complete request head arrived within the time allowed\"}";

/// What the connection does after [`serve`].
pub(super) enum Outcome {
    /// Close the socket.
    Close,
    /// Close the socket: no complete request head arrived in time (a 408 was offered).
    TimedOut,
    /// Serve the rest with hyper; these bytes were read from the socket and come first. They always decide
    /// the protocol: a whole HTTP/2 preface, or bytes that cannot start one.
    Hyper(Bytes),
}

/// Serves the connection's requests for as long as they are subscriptions; then says what hyper must
/// replay. Each request head must arrive within `header_timeout` of the connection opening or the previous
/// response ending.
pub(super) async fn serve(
    stream: &mut TcpStream,
    router: &Router,
    kill: &ConnKill,
    closing: &CancellationToken,
    header_timeout: Duration,
) -> Outcome {
    loop {
        let deadline = Instant::now() + header_timeout;
        let (req, keep_alive) = match read_head(stream, deadline, closing).await {
            Read::Subscribe(req, keep_alive) => (req, keep_alive),
            Read::Hyper(prefix) => return Outcome::Hyper(prefix),
            Read::Closed => return Outcome::Close,
            Read::TimedOut => {
                // Best effort: a client that does not read must not hold the connection open any longer.
                let _ = stream.try_write(TIMEOUT_RESPONSE);
                return Outcome::TimedOut;
            }
        };
        let resp = {
            let mut req = *req; // the box is freed here, not kept for the life of the stream
            req.extensions_mut().insert(kill.clone());
            // Asked of the socket per request rather than kept in this future for the connection's life.
            if let Ok(peer) = stream.peer_addr() {
                req.extensions_mut().insert(ConnectInfo(peer));
            }
            let Ok(resp) = router.clone().oneshot(req).await;
            resp
        };
        match respond(stream, resp).await {
            Ok(Ended { pipelined: false }) if keep_alive && !closing.is_cancelled() => continue,
            _ => return Outcome::Close,
        }
    }
}

/// What [`read_head`] found.
enum Read {
    Subscribe(Box<Request<Body>>, bool),
    Hyper(Bytes),
    /// The client closed, the socket failed, or the hub is shutting down.
    Closed,
    TimedOut,
}

/// Reads one request head, until `deadline`.
async fn read_head(stream: &mut TcpStream, deadline: Instant, closing: &CancellationToken) -> Read {
    let read = async {
        // No buffer until there is something to read: a silent socket or an idle keep-alive connection
        // costs no heap.
        if stream.readable().await.is_err() {
            return Read::Closed;
        }
        let mut buf = Vec::with_capacity(FIRST_READ);
        loop {
            match stream.read_buf(&mut buf).await {
                // A partial head followed by EOF can only be answered with an error nobody reads.
                Ok(0) | Err(_) => return Read::Closed,
                Ok(_) => {}
            }
            match parse(&buf) {
                Head::Partial if buf.len() < MAX_HEAD => {
                    if buf.len() == buf.capacity() {
                        buf.reserve(buf.len());
                    }
                }
                Head::Subscribe(req, keep_alive) => return Read::Subscribe(req, keep_alive),
                // Oversized: hyper answers 431; `parse` never calls a strict prefix of the HTTP/2 preface
                // oversized, so the protocol is decided.
                Head::Partial | Head::Other => return Read::Hyper(Bytes::from(buf)),
            }
        }
    };
    tokio::select! {
        r = read => r,
        () = tokio::time::sleep_until(deadline) => Read::TimedOut,
        () = closing.cancelled() => Read::Closed,
    }
}

pub(crate) enum Head {
    Partial,
    /// Boxed: a request is large and this enum lives in the connection future.
    Subscribe(Box<Request<Body>>, bool),
    /// A complete head (or HTTP/2 preface) that hyper serves, or bytes that are no HTTP/1 request at all.
    Other,
}

/// Parses a request head; a sync function so that the header array lives on the stack, not in the
/// connection's future.
///
/// Heads that hyper will serve are read to their end here too (`Partial` until then), so that the deadline
/// of [`serve`] covers them: hyper's own header timer would start afresh when it gets the connection.
pub(crate) fn parse(buf: &[u8]) -> Head {
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return Head::Partial;
    }
    if buf.starts_with(H2_PREFACE) {
        return Head::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let n = match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => return Head::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(_) => return Head::Other,
    };
    if n != buf.len() || parsed.method != Some("GET") || parsed.version != Some(1) {
        return Head::Other;
    }
    let Some(target) = parsed.path else {
        return Head::Other;
    };
    if target.split('?').next() != Some(HUB_PATH) {
        return Head::Other;
    }
    let Ok(uri) = Uri::try_from(target) else {
        return Head::Other;
    };
    let mut req = Request::new(Body::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let mut keep_alive = true;
    for h in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Head::Other;
        };
        if name == header::UPGRADE
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || (name == header::CONTENT_LENGTH && value != "0")
        {
            return Head::Other;
        }
        if name == header::CONNECTION
            && value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        {
            keep_alive = false;
        }
        req.headers_mut().append(name, value);
    }
    Head::Subscribe(Box::new(req), keep_alive)
}

struct Ended {
    /// The client sent bytes while the stream ran (they were discarded, so the connection must close).
    pipelined: bool,
}

/// Writes `resp`: the head, then the body as it comes (chunked unless its length is known).
async fn respond(stream: &TcpStream, resp: Response<Body>) -> io::Result<Ended> {
    let (parts, mut body) = resp.into_parts();
    // The head is built and the response's headers dropped before the first await: they would otherwise
    // live, unused, as long as the stream.
    let (head, length) = head(parts, &body);
    write_all(stream, &mut [IoSlice::new(&head)]).await?;
    drop(head);
    let bodiless = length == Some(0);
    let chunked = length.is_none();
    let mut pipelined = false;
    if bodiless {
        return Ok(Ended { pipelined });
    }
    loop {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            () = client_gone(stream, &mut pipelined) => {
                return Err(io::ErrorKind::ConnectionReset.into())
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue, // empty data or trailers (SSE has none)
            },
        };
        if chunked {
            let mut size = [0u8; 18];
            let size = chunk_size(data.len(), &mut size);
            write_all(
                stream,
                &mut [
                    IoSlice::new(size),
                    IoSlice::new(&data),
                    IoSlice::new(b"\r\n"),
                ],
            )
            .await?;
        } else {
            write_all(stream, &mut [IoSlice::new(&data)]).await?;
        }
    }
    if chunked {
        write_all(stream, &mut [IoSlice::new(b"0\r\n\r\n")]).await?;
    }
    Ok(Ended { pipelined })
}

/// The response head, and the body length when known (`Some(0)` for bodiless statuses).
fn head(parts: http::response::Parts, body: &Body) -> (Vec<u8>, Option<u64>) {
    let status = parts.status;
    let bodiless = status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    let length = if bodiless {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match length {
        Some(n) if !bodiless => {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes())
        }
        Some(_) => {}
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
    (head, length)
}

/// `<hex length>\r\n` into `buf`.
fn chunk_size(n: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// Resolves when the client closed its side or the socket failed; bytes it sends meanwhile are discarded
/// and remembered in `pipelined`.
async fn client_gone(stream: &TcpStream, pipelined: &mut bool) {
    let mut scratch = [0u8; 64];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => *pipelined = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Writes every slice, with as few syscalls as the socket allows.
async fn write_all(stream: &TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The socket with the bytes [`serve`] already read in front, for hyper. It carries the socket's permit:
/// an upgraded (WebSocket) connection outlives hyper's connection future but keeps this IO, and so its
/// place under the socket limit.
pub(super) struct Prefixed {
    prefix: Bytes,
    /// Declared (so dropped) before `io`: the place is free by the time the client sees the close.
    _permit: Permit,
    io: TcpStream,
}

impl Prefixed {
    pub(super) fn new(prefix: Bytes, io: TcpStream, permit: Permit) -> Self {
        Prefixed {
            prefix,
            _permit: permit,
            io,
        }
    }

    pub(super) fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.peer_addr()
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Free the head buffer now: an upgraded (WebSocket) connection keeps this IO for its life.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_response_is_well_formed() {
        let text = std::str::from_utf8(TIMEOUT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 408 Request Timeout\r\n"));
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "request_timeout");
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size(0, &mut b), b"0\r\n");
        assert_eq!(chunk_size(10, &mut b), b"a\r\n");
        assert_eq!(chunk_size(0x1f40, &mut b), b"1f40\r\n");
        assert_eq!(chunk_size(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn only_plain_subscriptions_are_taken() {
        let sub = |extra: &str| {
            format!("GET /.well-known/mercure?topic=a HTTP/1.1\r\nhost: h\r\n{extra}\r\n")
                .into_bytes()
        };
        assert!(matches!(parse(&sub("")), Head::Subscribe(_, true)));
        assert!(matches!(
            parse(&sub("connection: keep-alive, close\r\n")),
            Head::Subscribe(_, false)
        ));
        assert!(matches!(
            parse(&sub("content-length: 0\r\n")),
            Head::Subscribe(..)
        ));
        for partial in [
            b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nho".as_slice(),
            b"G",
            b"GET /healthz HTTP/1.1\r\n",
            b"POST /.well-known/mercure HTTP/1.1\r\ncontent-length: 3\r\n",
            b"P",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        ] {
            assert!(
                matches!(parse(partial), Head::Partial),
                "{}",
                String::from_utf8_lossy(partial)
            );
        }
        for other in [
            sub("upgrade: websocket\r\n"),
            sub("content-length: 3\r\n"),
            sub("transfer-encoding: chunked\r\n"),
            sub("expect: 100-continue\r\n"),
            [sub(""), b"GET / HTTP/1.1\r\n\r\n".to_vec()].concat(), // pipelined
            b"GET /.well-known/mercure?topic=a HTTP/1.0\r\n\r\n".to_vec(),
            b"GET /.well-known/mercure/subscriptions HTTP/1.1\r\n\r\n".to_vec(),
            b"GET /healthz HTTP/1.1\r\n\r\n".to_vec(),
            b"POST /.well-known/mercure HTTP/1.1\r\n\r\n".to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04".to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nXX".to_vec(), // not a preface: hyper's HTTP/1 parser refuses it
            b"POST /.well-known/mercure HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc".to_vec(),
            b"\x16\x03\x01\x02\x00".to_vec(), // TLS to a plain port
            b"GET /.well-known/mercure HTTP/1.1\r\nbad header\r\n\r\n".to_vec(),
        ] {
            assert!(
                matches!(parse(&other), Head::Other),
                "{}",
                String::from_utf8_lossy(&other)
            );
        }
        let Head::Subscribe(req, _) = parse(&sub("cookie: a=b\r\nlast-event-id: x\r\n")) else {
            panic!("not taken");
        };
        assert_eq!(req.uri(), "/.well-known/mercure?topic=a");
        assert_eq!(req.headers()["last-event-id"], "x");
        assert_eq!(req.headers()["cookie"], "a=b");
    }
}
