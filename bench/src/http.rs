//! The smallest HTTP/1.1 client side a streaming subscriber needs: one request written by hand, the response
//! head parsed with `httparse`, and a body decoder for `Transfer-Encoding: chunked` or a raw stream.
//! A full client (hyper, reqwest) per subscriber would cost the bench process more CPU and memory than the
//! server it measures at 10 000 connections on a 2-core machine.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection to `addr`, bound to `src` (port chosen by the kernel) when given. Binding
/// spreads connections over 127.0.0.x source addresses, each with its own ephemeral port range.
pub async fn connect(addr: SocketAddr, src: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let stream = sock
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// How the body of a response is framed.
#[derive(Debug)]
pub enum Body {
    Chunked(ChunkedDecoder),
    /// Until the connection closes (or `Content-Length`, which a stream never has).
    Raw,
}

impl Body {
    /// Decodes `input`, handing body bytes to `out`. Returns false once a chunked body has ended.
    pub fn decode(&mut self, input: &[u8], out: impl FnMut(&[u8])) -> anyhow::Result<bool> {
        match self {
            Body::Chunked(d) => d.feed(input, out),
            Body::Raw => {
                let mut out = out;
                out(input);
                Ok(true)
            }
        }
    }
}

/// Sends a GET and reads the response head. Returns the status, the body framing, and the body bytes that
/// arrived with the head.
pub async fn get_stream(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    accept: &str,
) -> anyhow::Result<(u16, Body, Vec<u8>)> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nCache-Control: no-cache\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 2048];
    loop {
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf)? {
            httparse::Status::Partial => {
                if buf.len() > 16 * 1024 {
                    bail!("response head larger than 16 KiB");
                }
            }
            httparse::Status::Complete(head_len) => {
                let status = resp.code.unwrap_or(0);
                let chunked = resp.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        && String::from_utf8_lossy(h.value)
                            .to_ascii_lowercase()
                            .contains("chunked")
                });
                let body = if chunked {
                    Body::Chunked(ChunkedDecoder::default())
                } else {
                    Body::Raw
                };
                return Ok((status, body, buf[head_len..].to_vec()));
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size (and ignoring extensions) up to CRLF.
    #[default]
    Size,
    Ext,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// The zero-size chunk was read: the body is over (trailers are ignored).
    Done,
}

/// Incremental decoder of `Transfer-Encoding: chunked`, fed with arbitrary splits.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    size_digits: u32,
}

impl ChunkedDecoder {
    /// Hands the payload bytes in `input` to `out`; returns false once the last chunk was seen.
    pub fn feed(&mut self, mut input: &[u8], mut out: impl FnMut(&[u8])) -> anyhow::Result<bool> {
        while !input.is_empty() {
            match self.state {
                State::Done => return Ok(false),
                State::Data(left) => {
                    let n = (left as usize).min(input.len());
                    out(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                }
                _ => {
                    let b = input[0];
                    input = &input[1..];
                    self.byte(b)?;
                }
            }
        }
        Ok(self.state != State::Done)
    }

    fn byte(&mut self, b: u8) -> anyhow::Result<()> {
        self.state = match (self.state, b) {
            (State::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                self.size_digits += 1;
                if self.size_digits > 15 {
                    bail!("chunk size too large");
                }
                self.size = self.size * 16 + d;
                State::Size
            }
            (State::Size | State::Ext, b';' | b' ' | b'\t') => State::Ext,
            (State::Ext, b'\r' | b'\n') | (State::Size, b'\r' | b'\n') if self.size_digits == 0 => {
                bail!("chunk without a size")
            }
            (State::Size | State::Ext, b'\r') => State::SizeLf,
            (State::Size | State::Ext | State::SizeLf, b'\n') => {
                let size = std::mem::take(&mut self.size);
                self.size_digits = 0;
                if size == 0 {
                    State::Done
                } else {
                    State::Data(size)
                }
            }
            (State::Ext, _) => State::Ext,
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataCr | State::DataLf, b'\n') => State::Size,
            (s, b) => bail!("bad chunked encoding: byte {b:#04x} in state {s:?}"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"5\r\n:\n\nid\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n3\r\n\n\n\n\r\n0\r\n\r\n";
    const PAYLOAD: &[u8] = b":\n\nidabcdefghijklmnopqrstuvwxyz\n\n\n";

    #[test]
    fn decodes_at_every_split() {
        for s in 0..=BODY.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            let more1 = d
                .feed(&BODY[..s], |b| out.extend_from_slice(b))
                .expect("ok");
            let more2 = d
                .feed(&BODY[s..], |b| out.extend_from_slice(b))
                .expect("ok");
            assert_eq!(out, PAYLOAD, "split at {s}");
            assert!(more1 || s >= BODY.len() - 2, "not ended early at {s}");
            assert!(!more2, "ended");
        }
    }

    #[test]
    fn byte_by_byte_and_bad_input() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        for b in BODY {
            d.feed(std::slice::from_ref(b), |x| out.extend_from_slice(x))
                .expect("ok");
        }
        assert_eq!(out, PAYLOAD);
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"zz\r\n", |_| {}).is_err());
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"2\r\nabX", |_| {}).is_err());
    }
}
