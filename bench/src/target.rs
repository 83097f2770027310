//! The servers under test: where to subscribe, how to publish, and the payload the bench sends through them.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use anyhow::{anyhow, bail};

/// Herald's default development key (Mercure's public one): used to sign a publisher token when none is
/// given.
pub const DEV_KEY: &str = "!ChangeThisMercureHubJWTSecretKey!";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Herald,
    Nchan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    Ws,
    /// WebSocket with the Centrifugo Protobuf codec (Herald only).
    WsProtobuf,
}

impl FromStr for ServerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "herald" => Ok(ServerKind::Herald),
            "nchan" => Ok(ServerKind::Nchan),
            _ => bail!("unknown server {s:?} (herald, nchan)"),
        }
    }
}

impl FromStr for Transport {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "sse" => Ok(Transport::Sse),
            "ws" => Ok(Transport::Ws),
            "ws-protobuf" => Ok(Transport::WsProtobuf),
            _ => bail!("unknown transport {s:?} (sse, ws, ws-protobuf)"),
        }
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Herald => "herald",
            ServerKind::Nchan => "nchan",
        })
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::WsProtobuf => "ws-protobuf",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub kind: ServerKind,
    /// One address, or the nodes of a cluster: subscriber `i` and publish `i` go to node `i % len`, as a
    /// round-robin load balancer would send them, so most deliveries cross from one node to another.
    pub addrs: Vec<SocketAddr>,
    /// Publisher token (Herald); anonymous subscribers are assumed (`--allow-anonymous`).
    pub token: String,
}

impl Target {
    pub fn new(
        kind: ServerKind,
        addrs: Vec<SocketAddr>,
        token: Option<String>,
    ) -> anyhow::Result<Target> {
        if addrs.is_empty() {
            bail!("no server address");
        }
        let token = match (kind, token) {
            (_, Some(t)) => t,
            (ServerKind::Herald, None) => sign_publisher(DEV_KEY)?,
            (ServerKind::Nchan, None) => String::new(),
        };
        Ok(Target { kind, addrs, token })
    }

    /// The node that serves subscriber or publish number `i` of `channels` (number `i` belongs to channel
    /// `i % channels`): consecutive numbers of one channel go to consecutive nodes, so every channel has
    /// subscribers and publishers on every node whatever the channel count.
    pub fn addr(&self, i: usize, channels: usize) -> SocketAddr {
        let channels = channels.max(1);
        self.addrs[(i % channels + i / channels) % self.addrs.len()]
    }

    /// Path (and query) of the subscriber endpoint for `channel`.
    pub fn sub_path(&self, transport: Transport, channel: &str) -> String {
        match (self.kind, transport) {
            (ServerKind::Herald, Transport::Sse) => format!("/.well-known/mercure?topic={channel}"),
            (ServerKind::Herald, Transport::Ws) => "/connection/websocket".to_string(),
            (ServerKind::Herald, Transport::WsProtobuf) => {
                "/connection/websocket?format=protobuf".to_string()
            }
            (ServerKind::Nchan, _) => format!("/sub?id={channel}"),
        }
    }

    /// A request for `payload` into `channel`, sent to `addr` (see [`Target::addr`]). `channel` and
    /// `payload` use URL-safe characters only (see [`channel_name`], [`Payload`]), so no escaping is needed.
    pub fn publish(
        &self,
        client: &reqwest::Client,
        addr: SocketAddr,
        channel: &str,
        payload: &str,
    ) -> reqwest::RequestBuilder {
        match self.kind {
            ServerKind::Herald => client
                .post(format!("http://{addr}/.well-known/mercure"))
                .bearer_auth(&self.token)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("topic={channel}&data={payload}")),
            ServerKind::Nchan => client
                .post(format!("http://{addr}/pub?id={channel}"))
                .header("content-type", "text/plain")
                .body(payload.to_string()),
        }
    }
}

/// Signs an HS256 publisher token allowed to publish anywhere (no expiry: bench runs are short).
pub fn sign_publisher(key: &str) -> anyhow::Result<String> {
    let claims = serde_json::json!({ "mercure": { "publish": ["*"] } });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .map_err(|e| anyhow!("signing the publisher token: {e}"))
}

/// Channel names: `[a-z0-9]` only, valid as a Mercure topic, a Centrifugo channel and an nchan id, and
/// unique per run so history from an earlier run (nchan keeps a buffer) never reaches this one.
pub fn channel_name(run: &str, c: usize) -> String {
    format!("bench{run}c{c}")
}

/// What a message carries: `~B<index>.<send time µs>~` padded with `x` to the wanted size, or a warm-up
/// marker `~W<channel>~`. Found by scanning, so it reads the same inside an SSE `data:` line, a raw nchan
/// WebSocket frame, or a Centrifugo JSON string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Msg { index: u64, sent_us: u64 },
    Warm { channel: u64 },
}

impl Payload {
    pub fn encode(&self, size: usize) -> String {
        let mut s = match self {
            Payload::Msg { index, sent_us } => format!("~B{index}.{sent_us}~"),
            Payload::Warm { channel } => format!("~W{channel}~"),
        };
        while s.len() < size {
            s.push('x');
        }
        s
    }

    /// Finds the first marker in `data`.
    pub fn find(data: &[u8]) -> Option<Payload> {
        let mut from = 0;
        while let Some(p) = data[from..].iter().position(|&b| b == b'~') {
            let at = from + p;
            if let Some(found) = Self::parse_at(&data[at + 1..]) {
                return Some(found);
            }
            from = at + 1;
        }
        None
    }

    /// Parses a marker whose leading `~` was just before `rest`.
    fn parse_at(rest: &[u8]) -> Option<Payload> {
        match rest.first()? {
            b'B' => {
                let (index, n1) = digits(&rest[1..])?;
                let after = &rest[1 + n1..];
                if after.first() != Some(&b'.') {
                    return None;
                }
                let (sent_us, n2) = digits(&after[1..])?;
                (after.get(1 + n2) == Some(&b'~')).then_some(Payload::Msg { index, sent_us })
            }
            b'W' => {
                let (channel, n) = digits(&rest[1..])?;
                (rest.get(1 + n) == Some(&b'~')).then_some(Payload::Warm { channel })
            }
            _ => None,
        }
    }
}

fn digits(b: &[u8]) -> Option<(u64, usize)> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &b[..n] {
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some((v, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_in_every_envelope() {
        let m = Payload::Msg {
            index: 42,
            sent_us: 123456,
        };
        let s = m.encode(64);
        assert_eq!(s.len(), 64);
        assert_eq!(Payload::find(s.as_bytes()), Some(m));
        let json = format!(r#"{{"push":{{"channel":"c","pub":{{"data":"{s}","offset":7}}}}}}"#);
        assert_eq!(Payload::find(json.as_bytes()), Some(m));
        let w = Payload::Warm { channel: 9 };
        assert_eq!(
            Payload::find(format!("data: {}", w.encode(0)).as_bytes()),
            Some(w)
        );
        assert_eq!(Payload::find(b"~B12~ ~Bx ~W~ nothing"), None);
        assert_eq!(
            Payload::find(b"~~B1.2~"),
            Some(Payload::Msg {
                index: 1,
                sent_us: 2
            })
        );
    }

    #[test]
    fn every_channel_spreads_over_every_node() {
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let t = Target::new(ServerKind::Nchan, addrs, None).expect("target");
        for channels in [1, 2, 3, 6, 1000] {
            for c in 0..channels.min(10) {
                let ports: std::collections::HashSet<u16> = (0..30 * channels)
                    .filter(|i| i % channels == c)
                    .map(|i| t.addr(i, channels).port())
                    .collect();
                assert_eq!(ports.len(), 3, "channel {c} of {channels}");
            }
        }
    }

    #[test]
    fn dev_token_signs() {
        let t = sign_publisher(DEV_KEY).expect("sign");
        assert_eq!(t.split('.').count(), 3);
    }
}
