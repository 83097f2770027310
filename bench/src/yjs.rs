//! `herald-bench yjs`: update fan-out to the clients of one Yjs document, with wire-level clients that read
//! and decode every update they receive but keep no document.
//!
//! Why this exists beside bench/yjs (real `y-websocket` / `@hocuspocus/provider` clients in Node): there,
//! every client applies every update to its own `Y.Doc`, and on a 2-core machine the Node processes holding
//! 100-500 of them saturate both cores long before either server does, so that figure measures the clients
//! (Herald and Hocuspocus came out about equal, both bound the same way). These clients cost a small fraction
//! of that per delivery, so the server is what bounds the rate; the same clients measure every server.
//!
//! Two dialects of the same sync protocol: y-websocket's (Herald, @y/websocket-server: the document in the
//! URL, one socket per document) and Hocuspocus's (the document name before every message, an auth message
//! first, update acknowledgements back to the writer).
//!
//! What counts as delivered: a writer is a real Yjs client (a `yrs` document pushing the number `i` to the array
//! `a`, one transaction and one update message per entry, so entry `i` is the writer's clock `i`; a number,
//! because decoding is most of what a receiver costs and a number allocates nothing).
//! A receiver decodes each update it gets (`Update::decode_v1`) and credits the writer's clock ranges it
//! inserts: a server may merge several updates into one message, and a range that starts past what the
//! receiver already has is a gap (counted, not credited). Latency is from the writer's send to the receipt.
//! A frame identical to one already decoded (servers send one frame to every client) is not decoded again.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::encoding::read::{Cursor, Read as _};
use yrs::encoding::write::Write as _;
use yrs::updates::decoder::Decode;
use yrs::{Any, Array, ClientID, Doc, Transact, Update};

use crate::stats::{histogram, now_us, Tracker};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Which variant of the sync protocol the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    /// y-websocket: `<url>/<document>`, messages `[type][...]` (Herald, @y/websocket-server).
    YWebsocket,
    /// Hocuspocus: `<url>`, messages `[document][type][...]`, an auth message first.
    Hocuspocus,
}

/// One fan-out run.
#[derive(Clone, Debug)]
pub struct Fanout {
    pub url: String,
    pub dialect: Dialect,
    /// The document's name, or with `documents` > 1 the prefix of theirs (`<document>-<i>`).
    pub document: String,
    /// Documents, each with `clients` clients; all written at once.
    pub documents: usize,
    /// Clients per document, writers included.
    pub clients: usize,
    /// The first `writers` clients of each document write.
    pub writers: usize,
    /// Entries each writer pushes.
    pub updates: usize,
    /// Clients connecting at once.
    pub batch: usize,
    /// Bound on the whole run after every client is synced.
    pub timeout: Duration,
}

// Message types of the sync protocol (y-protocols), and Hocuspocus's additions.
const SYNC: u32 = 0;
const SYNC_STEP1: u32 = 0;
const SYNC_STEP2: u32 = 1;
const SYNC_UPDATE: u32 = 2;
const HOCUSPOCUS_AUTH: u32 = 2;
const HOCUSPOCUS_AUTH_TOKEN: u32 = 0;
const HOCUSPOCUS_SYNC_REPLY: u32 = 4;

/// What a receiver saw; merged over receivers at the end.
struct Seen {
    /// Per writer: the next clock this receiver expects (every clock below it is credited).
    next: Vec<u32>,
    gaps: u64,
    /// Clock ranges of clients that are not writers of this client's document.
    misrouted: u64,
    hist: Histogram<u64>,
}

/// A writer's client id and its send times by clock, shared with every receiver.
struct Writer {
    id: ClientID,
    sent: Tracker,
}

fn frame(dialect: Dialect, document: &str, body: impl FnOnce(&mut Vec<u8>)) -> Message {
    let mut buf = Vec::with_capacity(64);
    if dialect == Dialect::Hocuspocus {
        buf.write_string(document);
    }
    body(&mut buf);
    Message::Binary(buf.into())
}

fn sync_message(dialect: Dialect, document: &str, kind: u32, payload: &[u8]) -> Message {
    frame(dialect, document, |b| {
        b.write_var(SYNC);
        b.write_var(kind);
        b.write_buf(payload);
    })
}

/// The sync payload of a message (its step and where its bytes are), or None for anything else
/// (awareness, auth, acks).
fn sync_payload(dialect: Dialect, data: &[u8]) -> anyhow::Result<Option<(u32, Range<usize>)>> {
    let mut c = Cursor::new(data);
    if dialect == Dialect::Hocuspocus {
        c.read_string().context("document name")?;
    }
    let kind: u32 = c.read_var().context("message type")?;
    if kind != SYNC && !(dialect == Dialect::Hocuspocus && kind == HOCUSPOCUS_SYNC_REPLY) {
        return Ok(None);
    }
    let step: u32 = c.read_var().context("sync step")?;
    let len: usize = c.read_var().context("sync payload length")?;
    let payload = c.next..c.next.saturating_add(len);
    if payload.end > data.len() {
        bail!("sync payload cut short");
    }
    Ok(Some((step, payload)))
}

/// Opens one client and completes the sync handshake: our (empty) state vector out, the server's state back.
async fn open(f: &Fanout, document: &str) -> anyhow::Result<Ws> {
    let url = match f.dialect {
        Dialect::YWebsocket => format!("{}/{}", f.url.trim_end_matches('/'), document),
        Dialect::Hocuspocus => f.url.clone(),
    };
    // tungstenite zero-fills its read buffer (128 KiB by default) on every read: a small one keeps that
    // from being what the clients spend most on; no write buffering, every message goes out at once.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
    if f.dialect == Dialect::Hocuspocus {
        ws.send(frame(f.dialect, document, |b| {
            b.write_var(HOCUSPOCUS_AUTH);
            b.write_var(HOCUSPOCUS_AUTH_TOKEN);
            b.write_string("");
        }))
        .await?;
    }
    let empty_sv = yrs::StateVector::default();
    let sv = yrs::updates::encoder::Encode::encode_v1(&empty_sv);
    ws.send(sync_message(f.dialect, document, SYNC_STEP1, &sv))
        .await?;
    for _ in 0..64 {
        let Some(msg) = ws.next().await else {
            bail!("closed during the handshake")
        };
        let Message::Binary(data) = msg? else {
            continue;
        };
        match sync_payload(f.dialect, &data)? {
            Some((SYNC_STEP1, _)) => {
                // The server asks for what we have: nothing.
                ws.send(sync_message(
                    f.dialect,
                    document,
                    SYNC_STEP2,
                    Update::EMPTY_V1,
                ))
                .await?;
            }
            Some((SYNC_STEP2, _)) => return Ok(ws),
            _ => {}
        }
    }
    bail!("no sync step 2 within 64 messages")
}

/// The clock ranges an update inserts, by client: all a receiver needs of an update.
type Inserted = Arc<Vec<(ClientID, Range<u32>)>>;

/// An update's bytes as a map key: hashed by its length and ends (cheap for a large merged update),
/// compared in full.
#[derive(PartialEq, Eq)]
struct Key(Bytes);

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let b = &self.0[..];
        b.len().hash(h);
        b[..b.len().min(32)].hash(h);
        b[b.len().saturating_sub(32)..].hash(h);
    }
}

/// Updates already decoded, by their exact bytes. A server sends the same frame to every client of a
/// document, and decoding it (not reading it) is what these clients would otherwise spend most of their
/// time on: a hit is a byte-for-byte match, so it yields what decoding again would.
#[derive(Default)]
struct Decoded(Mutex<HashMap<Key, Inserted>>);

impl Decoded {
    /// How many distinct updates are kept; receivers are never that far apart, and the map starts over.
    const KEEP: usize = 4096;

    fn get(&self, payload: Bytes) -> Option<Inserted> {
        let key = Key(payload);
        if let Some(hit) = self.0.lock().get(&key) {
            return Some(hit.clone());
        }
        let update = Update::decode_v1(&key.0).ok()?;
        let mut inserted = Vec::new();
        for (client, ranges) in update.insertions(true).iter() {
            inserted.extend(ranges.iter().map(|r| (*client, r.clone())));
        }
        let inserted = Arc::new(inserted);
        let mut map = self.0.lock();
        if map.len() >= Self::KEEP {
            map.clear();
        }
        map.insert(key, inserted.clone());
        Some(inserted)
    }
}

/// Reads until every writer's entries arrived (or the socket ends), crediting clock ranges.
async fn receive(
    mut ws: futures_util::stream::SplitStream<Ws>,
    dialect: Dialect,
    writers: Arc<Vec<Writer>>,
    decoded: Arc<Decoded>,
    updates: u32,
    done: Arc<AtomicU64>,
) -> Seen {
    let mut seen = Seen {
        next: vec![0; writers.len()],
        gaps: 0,
        misrouted: 0,
        hist: histogram(),
    };
    let complete = |s: &Seen| s.next.iter().all(|&n| n >= updates);
    while !complete(&seen) {
        let Some(Ok(msg)) = ws.next().await else {
            break;
        };
        let Message::Binary(data) = msg else { continue };
        let Ok(Some((SYNC_STEP2 | SYNC_UPDATE, payload))) = sync_payload(dialect, &data) else {
            continue;
        };
        let t = now_us();
        let Some(inserted) = decoded.get(data.slice(payload)) else {
            seen.gaps += 1;
            continue;
        };
        for (client, r) in inserted.iter() {
            let Some(w) = writers.iter().position(|w| w.id == *client) else {
                // Not written by a writer of this client's document.
                seen.misrouted += 1;
                continue;
            };
            let next = &mut seen.next[w];
            if r.start > *next {
                seen.gaps += 1;
                continue;
            }
            for clock in *next..r.end {
                if let Some(sent) = writers[w].sent.sent_at(clock as usize) {
                    seen.hist.saturating_record(t.saturating_sub(sent).max(1));
                }
                writers[w].sent.arrived(clock as usize, t);
            }
            *next = (*next).max(r.end);
        }
    }
    if complete(&seen) {
        done.fetch_add(1, Ordering::Relaxed);
    }
    seen
}

/// One writer: its document, where it writes, and the send times it records by clock.
struct Write {
    dialect: Dialect,
    document: String,
    updates: usize,
    doc: Doc,
    writers: Arc<Vec<Writer>>,
    index: usize,
}

/// Pushes `updates` entries, one transaction and one message each, recording each send time by clock.
async fn write(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    w: Write,
) -> anyhow::Result<()> {
    let array = w.doc.get_or_insert_array("a");
    for i in 0..w.updates {
        let t = now_us();
        let update = {
            let mut txn = w.doc.transact_mut();
            array.push_back(&mut txn, Any::from(i as f64));
            txn.encode_update_v1()
        };
        w.writers[w.index].sent.sent(i, t);
        sink.send(sync_message(w.dialect, &w.document, SYNC_UPDATE, &update))
            .await
            .context("sending an update")?;
        if i % 10 == 9 {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// Connects the clients, lets the writers push, waits for every receiver to hold every entry (bounded by
/// `f.timeout`), and reports deliveries per second over first send .. last receipt, latency, gaps, and
/// this process's own CPU time (to show the clients were not the bound).
pub async fn fanout(f: &Fanout) -> anyhow::Result<serde_json::Value> {
    if f.documents == 0 || f.writers == 0 || f.writers >= f.clients || f.updates == 0 {
        bail!("need documents >= 1, 1 <= writers < clients and updates >= 1");
    }
    let names: Vec<String> = (0..f.documents)
        .map(|d| match f.documents {
            1 => f.document.clone(),
            _ => format!("{}-{d}", f.document),
        })
        .collect();
    // (document, client of it) per socket, documents interleaved: a batch of connections spans documents.
    let plan: Vec<(usize, usize)> = (0..f.clients)
        .flat_map(|c| (0..f.documents).map(move |d| (d, c)))
        .collect();
    let mut sockets = Vec::with_capacity(plan.len());
    for batch in plan.chunks(f.batch.max(1)) {
        // Each client's connection and handshake is bounded by the run's own limit.
        let opened = futures_util::future::join_all(
            batch
                .iter()
                .map(|&(d, _)| tokio::time::timeout(f.timeout, open(f, &names[d]))),
        )
        .await;
        for ws in opened {
            sockets.push(ws.context("a client's handshake took longer than --timeout")??);
        }
    }
    let docs: Vec<Vec<Doc>> = (0..f.documents)
        .map(|_| (0..f.writers).map(|_| Doc::new()).collect())
        .collect();
    let writers: Vec<Arc<Vec<Writer>>> = docs
        .iter()
        .map(|ds| {
            Arc::new(
                ds.iter()
                    .map(|d| Writer {
                        id: d.client_id(),
                        sent: Tracker::new(f.updates),
                    })
                    .collect(),
            )
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let decoded = Arc::new(Decoded::default());
    let mut drains = Vec::new();
    let mut receivers = Vec::new();
    let mut sinks = Vec::new();
    for (&(d, c), ws) in plan.iter().zip(sockets) {
        let (sink, stream) = ws.split();
        if c < f.writers {
            sinks.push((d, c, sink));
            // A writer's socket is read too (Hocuspocus acknowledges every update), and what comes is dropped.
            drains.push(tokio::spawn(drain(stream)));
        } else {
            receivers.push(tokio::spawn(receive(
                stream,
                f.dialect,
                writers[d].clone(),
                decoded.clone(),
                f.updates as u32,
                done.clone(),
            )));
        }
    }
    let mut docs: Vec<std::vec::IntoIter<Doc>> = docs.into_iter().map(Vec::into_iter).collect();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let mut writing = Vec::new();
    for (d, c, sink) in sinks {
        let doc = docs[d].next().context("a writer without its document")?;
        let w = Write {
            dialect: f.dialect,
            document: names[d].clone(),
            updates: f.updates,
            doc,
            writers: writers[d].clone(),
            index: c,
        };
        writing.push(tokio::spawn(write(sink, w)));
    }
    let receiving = receivers.len();
    let deadline = tokio::time::Instant::now() + f.timeout;
    let mut write_errors = 0;
    for w in writing {
        match tokio::time::timeout_at(deadline, w).await {
            Ok(Ok(Ok(()))) => {}
            _ => write_errors += 1,
        }
    }
    let mut seen = Vec::new();
    for r in receivers.iter_mut() {
        if let Ok(Ok(s)) = tokio::time::timeout_at(deadline, r).await {
            seen.push(s);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    for r in &receivers {
        r.abort();
    }
    for r in &drains {
        r.abort();
    }
    let mut hist = histogram();
    let mut gaps = 0;
    let mut misrouted = 0;
    let mut delivered: u64 = 0;
    for s in &seen {
        let _ = hist.add(&s.hist);
        gaps += s.gaps;
        misrouted += s.misrouted;
        delivered += s.next.iter().map(|&n| u64::from(n)).sum::<u64>();
    }
    let expected = (receiving * f.writers * f.updates) as u64;
    let (first, last) = writers
        .iter()
        .flat_map(|ws| ws.iter())
        .filter_map(|w| w.sent.span_us())
        .fold((u64::MAX, 0), |(a, b), (s, l)| (a.min(s), b.max(l)));
    let span_s = last.saturating_sub(first).max(1) as f64 / 1e6;
    let complete = done.load(Ordering::Relaxed) as usize == receiving
        && write_errors == 0
        && gaps == 0
        && misrouted == 0;
    Ok(json!({
        "documents": f.documents,
        "clients": f.clients,
        "writers": f.writers,
        "updates": f.updates * f.writers * f.documents,
        "deliveries_per_s": (delivered as f64 / span_s).round(),
        "p50_ms": hist.value_at_quantile(0.5) as f64 / 1000.0,
        "p99_ms": hist.value_at_quantile(0.99) as f64 / 1000.0,
        "lost": expected.saturating_sub(delivered),
        "gaps": gaps,
        "misrouted": misrouted,
        "complete": complete,
        "client_cpu_share": if wall > 0.0 { cpu / wall } else { 0.0 },
    }))
}

async fn drain(mut stream: futures_util::stream::SplitStream<Ws>) {
    while let Some(Ok(_)) = stream.next().await {}
}

/// This process's user + system CPU seconds (0 where /proc has none).
fn cpu_seconds() -> f64 {
    crate::rss::cpu_ticks(std::process::id()).unwrap_or(0) as f64 / 100.0
}
