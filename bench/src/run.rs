//! One workload: ramp up subscribers, warm up, publish, drain, count.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rss;
use crate::stats::{histogram, now_us, Sharded, Tracker};
use crate::sub::{self, Shared, SubState};
use crate::target::{channel_name, Payload, ServerKind, Target, Transport};

#[derive(Debug, Clone)]
pub struct Workload {
    pub label: String,
    pub target: Target,
    pub transport: Transport,
    pub subscribers: usize,
    pub channels: usize,
    pub messages: usize,
    /// Messages per second over all channels; 0 = as fast as the server acknowledges.
    pub rate: f64,
    /// Publishes in flight at once.
    pub concurrency: usize,
    /// Payload size in bytes (at least the marker's).
    pub size: usize,
    /// Subscribers connecting at once during the ramp, and the pause between batches.
    pub batch: usize,
    pub batch_pause: Duration,
    /// Spread subscribers over 127.0.0.2 .. 127.0.0.(1+src_ips); 0 = let the kernel choose.
    pub src_ips: usize,
    pub server_pids: Vec<u32>,
    /// Bound of the publish phase (no publish starts after it).
    pub publish_timeout: Duration,
    /// How long to wait for deliveries after the last publish was acknowledged.
    pub drain: Duration,
    /// Wait after the ramp before reading RSS with idle connections.
    pub settle: Duration,
    /// Rate search: find the highest publish rate whose publish-to-receive p99 stays under this, in
    /// phases of `phase`, starting at `rate` (or 100/s), doubling until a phase fails, then bisecting.
    /// `messages` is the budget over all phases.
    pub max_p99: Option<Duration>,
    pub phase: Duration,
    /// Distinguishes this run's channels from those of earlier runs.
    pub run_id: String,
}

impl Workload {
    pub fn new(target: Target, transport: Transport) -> Workload {
        Workload {
            label: String::new(),
            target,
            transport,
            subscribers: 100,
            channels: 1,
            messages: 100,
            rate: 0.0,
            concurrency: 8,
            size: 64,
            batch: 200,
            batch_pause: Duration::from_millis(20),
            src_ips: 19,
            server_pids: Vec::new(),
            publish_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(10),
            settle: Duration::from_secs(1),
            max_p99: None,
            phase: Duration::from_secs(3),
            run_id: format!(
                "{}",
                std::process::id() as u64 * 1_000_000 + now_us() % 1_000_000
            ),
        }
    }
}

/// Everything one run measured. `to_json` is the stable form the `table` command reads.
#[derive(Debug)]
pub struct Report {
    pub w: Workload,
    pub connected: usize,
    pub connect_errors: usize,
    pub first_connect_error: Option<String>,
    pub ramp_secs: f64,
    pub warmed: u64,
    pub sent: usize,
    pub publish_errors: usize,
    pub first_publish_error: Option<String>,
    pub expected_deliveries: u64,
    pub delivered: u64,
    /// WebSocket message bytes received per delivered publication (pushes, plus pings and replies).
    pub ws_bytes_per_delivery: Option<f64>,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub misrouted: u64,
    pub unexpected: u64,
    pub subscribers_with_loss: usize,
    pub ended_early: usize,
    pub first_end_reason: Option<String>,
    pub deliveries_per_sec: f64,
    pub publishes_per_sec: f64,
    pub latency: Histogram<u64>,
    pub reach_all: Histogram<u64>,
    pub reach_all_incomplete: usize,
    pub publish_ack: Histogram<u64>,
    /// Server CPU (percent of one core) while every connection was open and idle (the settle window).
    pub idle_cpu_percent: Option<f64>,
    pub rss_idle_kib: Option<u64>,
    pub rss_conns_kib: Option<u64>,
    pub rss_load_kib: Option<u64>,
    /// The phases of a rate search (empty without `max_p99`).
    pub search: Vec<Step>,
}

fn q(h: &Histogram<u64>, quantile: f64) -> Value {
    if h.is_empty() {
        Value::Null
    } else {
        json!(h.value_at_quantile(quantile) as f64 / 1000.0)
    }
}

impl Report {
    /// Clean means every subscriber connected and got every published message exactly once.
    pub fn clean(&self) -> bool {
        self.connect_errors == 0
            && self.lost == 0
            && self.duplicated == 0
            && self.misrouted == 0
            && self.unexpected == 0
            && self.ended_early == 0
    }

    pub fn rss_per_conn_bytes(&self) -> Option<f64> {
        let (idle, conns) = (self.rss_idle_kib?, self.rss_conns_kib?);
        (self.connected > 0).then(|| (conns as f64 - idle as f64) * 1024.0 / self.connected as f64)
    }

    pub fn to_json(&self) -> Value {
        let w = &self.w;
        json!({
            "label": w.label,
            "server": w.target.kind.to_string(),
            "nodes": w.target.addrs.len(),
            "transport": w.transport.to_string(),
            "subscribers": w.subscribers,
            "channels": w.channels,
            "messages": w.messages,
            "rate": w.rate,
            "concurrency": w.concurrency,
            "size": w.size,
            "connected": self.connected,
            "connect_errors": self.connect_errors,
            "first_connect_error": self.first_connect_error,
            "ramp_secs": self.ramp_secs,
            "warmed": self.warmed,
            "sent": self.sent,
            "publish_errors": self.publish_errors,
            "first_publish_error": self.first_publish_error,
            "expected_deliveries": self.expected_deliveries,
            "delivered": self.delivered,
            "ws_bytes_per_delivery": self.ws_bytes_per_delivery,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "misrouted": self.misrouted,
            "unexpected": self.unexpected,
            "subscribers_with_loss": self.subscribers_with_loss,
            "ended_early": self.ended_early,
            "first_end_reason": self.first_end_reason,
            "clean": self.clean(),
            "deliveries_per_sec": self.deliveries_per_sec,
            "publishes_per_sec": self.publishes_per_sec,
            "latency_ms": {
                "p50": q(&self.latency, 0.5), "p90": q(&self.latency, 0.9),
                "p99": q(&self.latency, 0.99), "p999": q(&self.latency, 0.999),
                "max": q(&self.latency, 1.0),
            },
            "reach_all_ms": {
                "p50": q(&self.reach_all, 0.5), "p99": q(&self.reach_all, 0.99),
                "max": q(&self.reach_all, 1.0), "incomplete": self.reach_all_incomplete,
            },
            "publish_ack_ms": {
                "p50": q(&self.publish_ack, 0.5), "p99": q(&self.publish_ack, 0.99),
                "max": q(&self.publish_ack, 1.0),
            },
            "rss_kib": {
                "idle": self.rss_idle_kib, "conns": self.rss_conns_kib, "load": self.rss_load_kib,
            },
            "rss_per_conn_bytes": self.rss_per_conn_bytes(),
            "idle_cpu_percent": self.idle_cpu_percent,
            "rate_search": self.rate_search_json(),
        })
    }

    fn rate_search_json(&self) -> Value {
        let Some(max) = self.w.max_p99 else {
            return Value::Null;
        };
        let steps: Vec<Value> = self
            .search
            .iter()
            .map(|s| {
                json!({
                    "rate": s.rate, "acked_rate": s.acked_rate,
                    "deliveries_per_sec": s.deliveries_per_sec, "p99_ms": s.p99_ms, "ok": s.ok,
                })
            })
            .collect();
        let best = sustained(&self.search);
        json!({
            "max_p99_ms": max.as_secs_f64() * 1000.0,
            "sustained_rate": best.map(|s| s.rate),
            "sustained_deliveries_per_sec": best.map(|s| s.deliveries_per_sec),
            "steps": steps,
        })
    }

    pub fn print_human(&self) {
        let j = self.to_json();
        let w = &self.w;
        println!(
            "== {} {}/{} subscribers={} channels={} messages={} rate={} concurrency={}",
            w.label,
            w.target.kind,
            w.transport,
            w.subscribers,
            w.channels,
            w.messages,
            if w.rate > 0.0 {
                format!("{}/s", w.rate)
            } else {
                "max".into()
            },
            w.concurrency
        );
        println!(
            "connected {} (errors {}, ramp {:.2}s), warmed {}",
            self.connected, self.connect_errors, self.ramp_secs, self.warmed
        );
        if let Some(e) = &self.first_connect_error {
            println!("  first connect error: {e}");
        }
        println!(
            "published {} (errors {}) at {:.0}/s; ack p50 {} ms p99 {} ms",
            self.sent,
            self.publish_errors,
            self.publishes_per_sec,
            j["publish_ack_ms"]["p50"],
            j["publish_ack_ms"]["p99"]
        );
        if let Some(e) = &self.first_publish_error {
            println!("  first publish error: {e}");
        }
        println!(
            "delivered {}/{} at {:.0}/s; lost {} duplicated {} reordered {} misrouted {} ended early {}",
            self.delivered,
            self.expected_deliveries,
            self.deliveries_per_sec,
            self.lost,
            self.duplicated,
            self.reordered,
            self.misrouted,
            self.ended_early
        );
        if let Some(e) = &self.first_end_reason {
            println!("  first early end: {e}");
        }
        if let Some(c) = self.idle_cpu_percent {
            println!(
                "server CPU with every connection idle ({:.0} s): {c:.2}% of a core",
                self.w.settle.as_secs_f64()
            );
        }
        if let Some(b) = self.ws_bytes_per_delivery {
            println!("WebSocket bytes received per delivery: {b:.1}");
        }
        let l = &j["latency_ms"];
        println!(
            "latency ms: p50 {} p90 {} p99 {} p99.9 {} max {}",
            l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
        );
        let r = &j["reach_all_ms"];
        println!(
            "reach all ms: p50 {} p99 {} max {} (incomplete {})",
            r["p50"], r["p99"], r["max"], r["incomplete"]
        );
        println!(
            "server RSS KiB: idle {} with connections {} under load {}; per connection {} bytes",
            j["rss_kib"]["idle"],
            j["rss_kib"]["conns"],
            j["rss_kib"]["load"],
            j["rss_per_conn_bytes"]
        );
        if let Some(max) = self.w.max_p99 {
            match sustained(&self.search) {
                Some(s) => println!(
                    "sustained with p99 < {} ms: {:.0} deliveries/s at {:.0} msg/s (p99 {:?} ms)",
                    max.as_millis(),
                    s.deliveries_per_sec,
                    s.rate,
                    s.p99_ms
                ),
                None => println!(
                    "sustained with p99 < {} ms: no phase passed",
                    max.as_millis()
                ),
            }
        }
        println!("{}", if self.clean() { "CLEAN" } else { "NOT CLEAN" });
    }
}

fn src_ip(i: usize, n: usize) -> Option<IpAddr> {
    (n > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % n.min(250)) as u8)))
}

/// Number of messages `0..m` that go to channel `c` of `channels` (round robin).
fn per_channel(m: usize, channels: usize, c: usize) -> u64 {
    (m / channels + usize::from(c < m % channels)) as u64
}

pub async fn run(w: Workload) -> anyhow::Result<Report> {
    if w.transport == Transport::WsProtobuf && w.target.kind != ServerKind::Herald {
        anyhow::bail!("ws-protobuf is the Centrifugo protocol's Protobuf codec: Herald only");
    }
    let _ = now_us();
    let channels = w.channels.max(1);
    let names: Vec<String> = (0..channels).map(|c| channel_name(&w.run_id, c)).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(w.concurrency.max(1))
        .timeout(Duration::from_secs(30))
        .build()
        .context("http client")?;

    let rss_idle_kib = rss::total_kib(&w.server_pids);

    let shared = Arc::new(Shared {
        tracker: Tracker::new(w.messages),
        latency: Sharded::new(64),
        channels,
        warm: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        ws_bytes: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });

    // Ramp: batches of `batch` connecting at once; each task reports its handshake, then reads.
    let ramp_start = Instant::now();
    let mut tasks: Vec<JoinHandle<SubState>> = Vec::with_capacity(w.subscribers);
    let mut connect_errors = 0;
    let mut first_connect_error = None;
    let mut subs_on = vec![0u32; channels];
    for start in (0..w.subscribers).step_by(w.batch.max(1)) {
        let end = (start + w.batch.max(1)).min(w.subscribers);
        let mut acks = Vec::with_capacity(end - start);
        for i in start..end {
            let (tx, rx) = oneshot::channel::<Result<(), String>>();
            let (target, transport, shared) = (w.target.clone(), w.transport, shared.clone());
            let channel = i % channels;
            let name = names[channel].clone();
            let src = src_ip(i, w.src_ips);
            tasks.push(tokio::spawn(async move {
                let st = SubState {
                    id: i,
                    channel,
                    ..Default::default()
                };
                let opened = tokio::time::timeout(
                    Duration::from_secs(30),
                    sub::open(&target, target.addr(i, channels), transport, &name, src),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake timed out")));
                match opened {
                    Ok(conn) => {
                        let _ = tx.send(Ok(()));
                        sub::run(conn, st, shared).await
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        SubState {
                            ended: Some("never connected".into()),
                            ..st
                        }
                    }
                }
            }));
            acks.push((channel, rx));
        }
        for (channel, rx) in acks {
            match rx.await {
                Ok(Ok(())) => subs_on[channel] += 1,
                Ok(Err(e)) => {
                    connect_errors += 1;
                    first_connect_error.get_or_insert(e);
                }
                Err(_) => {
                    connect_errors += 1;
                    first_connect_error.get_or_insert_with(|| "task failed".into());
                }
            }
        }
        if end < w.subscribers {
            tokio::time::sleep(w.batch_pause).await;
        }
    }
    let ramp_secs = ramp_start.elapsed().as_secs_f64();
    let connected = w.subscribers - connect_errors;

    // The settle is also the idle window: what the server burns with every connection open and nothing
    // to send (timers, pings, wake-ups) is its CPU time over it.
    let cpu_before = rss::total_cpu_ticks(&w.server_pids);
    let settle_start = Instant::now();
    tokio::time::sleep(w.settle).await;
    let idle_cpu_percent = match (cpu_before, rss::total_cpu_ticks(&w.server_pids)) {
        (Some(a), Some(b)) if connected > 0 => Some(
            (b.saturating_sub(a) as f64 / rss::CLOCK_TICKS) / settle_start.elapsed().as_secs_f64()
                * 100.0,
        ),
        _ => None,
    };
    let rss_conns_kib = rss::total_kib(&w.server_pids);

    // Warm-up: one marker per channel, repeated until every connected subscriber saw its own, so the
    // measured messages only start once every subscription is live on the server.
    let warm_deadline = Instant::now() + Duration::from_secs(20);
    if connected > 0 {
        'warm: for _attempt in 0..5 {
            let sem = Arc::new(tokio::sync::Semaphore::new(w.concurrency.max(1)));
            let mut pubs = Vec::new();
            for (c, name) in names.iter().enumerate() {
                if subs_on[c] == 0 {
                    continue;
                }
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let req = w.target.publish(
                    &client,
                    w.target.addr(c, names.len()),
                    name,
                    &Payload::Warm { channel: c as u64 }.encode(0),
                );
                pubs.push(tokio::spawn(async move {
                    let _ = req.send().await;
                    drop(permit);
                }));
            }
            for p in pubs {
                let _ = p.await;
            }
            let until = (Instant::now() + Duration::from_secs(3)).min(warm_deadline);
            while Instant::now() < until {
                if shared.warm.load(Ordering::Relaxed) >= connected as u64 {
                    break 'warm;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if Instant::now() >= warm_deadline {
                break;
            }
        }
    }
    let warmed = shared.warm.load(Ordering::Relaxed);

    // Publish, sampling the server's RSS meanwhile.
    let peak = Arc::new(AtomicU64::new(rss_conns_kib.unwrap_or(0)));
    let sampling = CancellationToken::new();
    let sampler = {
        let (peak, pids, sampling) = (peak.clone(), w.server_pids.clone(), sampling.clone());
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                if let Some(kib) = rss::total_kib(&pids) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = sampling.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };
    let publisher = Publisher {
        client: client.clone(),
        target: w.target.clone(),
        names: names.clone(),
        shared: shared.clone(),
        failed: Arc::new(Mutex::new(Vec::new())),
        first_error: Arc::new(Mutex::new(None)),
        acks: Arc::new(Mutex::new(histogram())),
        last_ack: Arc::new(AtomicU64::new(0)),
        concurrency: w.concurrency.max(1),
        size: w.size,
        timeout: w.publish_timeout,
    };
    let search = match w.max_p99 {
        Some(max_p99) => rate_search(&w, &publisher, &subs_on, max_p99).await,
        None => {
            publisher.publish(0..w.messages, w.rate).await;
            Vec::new()
        }
    };
    let publish_end = now_us();
    let Publisher {
        failed,
        first_error: first_publish_error,
        acks,
        last_ack,
        ..
    } = publisher;
    let failed: Vec<usize> = std::mem::take(&mut *failed.lock());
    let sent = (0..w.messages)
        .filter(|&i| shared.tracker.was_sent(i))
        .count();
    let ok_sent = sent - failed.len();

    // Expected deliveries: each acknowledged message times the connected subscribers of its channel.
    let failed_set: std::collections::HashSet<usize> = failed.iter().copied().collect();
    let expected_deliveries: u64 = (0..w.messages)
        .filter(|&i| shared.tracker.was_sent(i) && !failed_set.contains(&i))
        .map(|i| subs_on[i % channels] as u64)
        .sum();
    let drain_deadline = Instant::now() + w.drain;
    while Instant::now() < drain_deadline
        && shared.delivered.load(Ordering::Relaxed) < expected_deliveries
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sampling.cancel();
    let _ = sampler.await;
    let rss_load_kib = rss::total_kib(&w.server_pids).map(|k| k.max(peak.load(Ordering::Relaxed)));

    shared.stop.cancel();
    let mut states = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(10), t).await {
            states.push(st);
        }
    }

    // Count, per subscriber, against what was published to its channel.
    let mut unpublished: Vec<Vec<u64>> = vec![Vec::new(); channels];
    for &i in &failed {
        unpublished[i % channels].push((i / channels) as u64);
    }
    // Messages never sent (publish phase timed out) are not losses either.
    for i in 0..w.messages {
        if !shared.tracker.was_sent(i) {
            unpublished[i % channels].push((i / channels) as u64);
        }
    }
    let (mut lost, mut duplicated, mut reordered, mut misrouted, mut unexpected) = (0, 0, 0, 0, 0);
    let (mut with_loss, mut ended_early, mut first_end_reason) = (0, 0, None);
    for st in &states {
        if st.ended.as_deref() == Some("never connected") {
            continue;
        }
        let expected = per_channel(w.messages, channels, st.channel);
        let l = st.counter.lost(expected, &unpublished[st.channel]);
        lost += l;
        with_loss += usize::from(l > 0);
        duplicated += st.counter.duplicates;
        reordered += st.counter.reordered;
        misrouted += st.misrouted;
        unexpected += st.counter.unexpected(expected);
        if let Some(e) = &st.ended {
            ended_early += 1;
            first_end_reason.get_or_insert_with(|| e.clone());
        }
    }
    // Tasks that did not stop in time are counted as ended early.
    ended_early += w.subscribers - states.len();

    let mut reach_all = histogram();
    let mut reach_all_incomplete = 0;
    for i in 0..w.messages {
        if !shared.tracker.was_sent(i) || failed_set.contains(&i) {
            continue;
        }
        match shared.tracker.reach_all_us(i, subs_on[i % channels]) {
            Some(us) => reach_all.saturating_record(us.max(1)),
            None => reach_all_incomplete += usize::from(subs_on[i % channels] > 0),
        }
    }
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let deliveries_per_sec = match shared.tracker.span_us() {
        Some((first, last)) if last > first && delivered > 0 => {
            delivered as f64 / ((last - first) as f64 / 1e6)
        }
        _ => 0.0,
    };
    let last_ack = last_ack.load(Ordering::Relaxed).max(1).min(publish_end);
    let publishes_per_sec = match shared.tracker.span_us() {
        Some((first, _)) if last_ack > first && ok_sent > 0 => {
            ok_sent as f64 / ((last_ack - first) as f64 / 1e6)
        }
        _ => 0.0,
    };
    let ws_bytes = shared.ws_bytes.load(Ordering::Relaxed);
    let ws_bytes_per_delivery =
        (ws_bytes > 0 && delivered > 0).then(|| ws_bytes as f64 / delivered as f64);
    let publish_ack = acks.lock().clone();
    let latency = shared.latency.merged();
    let first_publish_error = first_publish_error.lock().take();
    Ok(Report {
        idle_cpu_percent,
        ws_bytes_per_delivery,
        connected,
        connect_errors,
        first_connect_error,
        ramp_secs,
        warmed,
        sent,
        publish_errors: failed.len(),
        first_publish_error,
        expected_deliveries,
        delivered,
        lost,
        duplicated,
        reordered,
        misrouted,
        unexpected,
        subscribers_with_loss: with_loss,
        ended_early,
        first_end_reason,
        deliveries_per_sec,
        publishes_per_sec,
        latency,
        reach_all,
        reach_all_incomplete,
        publish_ack,
        rss_idle_kib,
        rss_conns_kib,
        rss_load_kib,
        search,
        w,
    })
}

/// Publishes ranges of message indices at a rate, from `concurrency` workers; collects acknowledgements
/// and failures over all ranges.
struct Publisher {
    client: reqwest::Client,
    target: Target,
    names: Vec<String>,
    shared: Arc<Shared>,
    failed: Arc<Mutex<Vec<usize>>>,
    first_error: Arc<Mutex<Option<String>>>,
    acks: Arc<Mutex<Histogram<u64>>>,
    last_ack: Arc<AtomicU64>,
    concurrency: usize,
    size: usize,
    timeout: Duration,
}

impl Publisher {
    /// Publishes messages `range` (message i to channel i % channels), paced at `rate` per second from
    /// now (0 = as fast as acknowledged), none started after the publish timeout.
    async fn publish(&self, range: std::ops::Range<usize>, rate: f64) {
        let next = Arc::new(AtomicUsize::new(range.start));
        let t0 = Instant::now();
        let deadline = t0 + self.timeout;
        let mut workers = Vec::new();
        for _ in 0..self.concurrency {
            let (next, failed, first_err, acks, last_ack) = (
                next.clone(),
                self.failed.clone(),
                self.first_error.clone(),
                self.acks.clone(),
                self.last_ack.clone(),
            );
            let (client, target, names, shared) = (
                self.client.clone(),
                self.target.clone(),
                self.names.clone(),
                self.shared.clone(),
            );
            let (range, size) = (range.clone(), self.size);
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= range.end {
                        break;
                    }
                    if rate > 0.0 {
                        let at = (i - range.start) as f64 / rate;
                        tokio::time::sleep_until(t0 + Duration::from_secs_f64(at)).await;
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    let sent_us = now_us();
                    let payload = Payload::Msg {
                        index: i as u64,
                        sent_us,
                    }
                    .encode(size);
                    shared.tracker.sent(i, sent_us);
                    let r = target
                        .publish(
                            &client,
                            target.addr(i, names.len()),
                            &names[i % names.len()],
                            &payload,
                        )
                        .send()
                        .await;
                    let err = match r {
                        Ok(resp) if resp.status().is_success() => {
                            // Read the (small) body so the connection goes back to the pool.
                            let _ = resp.bytes().await;
                            None
                        }
                        Ok(resp) => Some(format!("HTTP {}", resp.status())),
                        Err(e) => Some(format!("{e}")),
                    };
                    let done = now_us();
                    match err {
                        None => {
                            acks.lock()
                                .saturating_record(done.saturating_sub(sent_us).max(1));
                            last_ack.fetch_max(done, Ordering::Relaxed);
                        }
                        Some(e) => {
                            failed.lock().push(i);
                            first_err.lock().get_or_insert(e);
                        }
                    }
                }
            }));
        }
        for wk in workers {
            let _ = wk.await;
        }
    }
}

/// One phase of a rate search.
#[derive(Debug, Clone)]
pub struct Step {
    pub rate: f64,
    /// Publishes per second the server acknowledged (below `rate` when it could not keep up).
    pub acked_rate: f64,
    pub deliveries_per_sec: f64,
    pub p99_ms: Option<f64>,
    /// Every message of the phase reached every subscriber, the server kept up with the rate and the p99
    /// stayed under the bound.
    pub ok: bool,
}

/// At most this many phases, so a search is bounded whatever the server does.
const MAX_STEPS: usize = 14;

/// Phases at rising rates (doubling from `w.rate`, or 100/s) until one fails, then bisection between the
/// best passing and the first failing rate until they are within 10%. Each phase waits for its deliveries
/// (up to `w.drain`) and is judged on its own latencies.
async fn rate_search(w: &Workload, p: &Publisher, subs_on: &[u32], max_p99: Duration) -> Vec<Step> {
    let shared = &p.shared;
    let channels = subs_on.len().max(1);
    let mut rate = if w.rate > 0.0 { w.rate } else { 100.0 };
    let (mut good, mut bad): (Option<f64>, Option<f64>) = (None, None);
    let mut start = 0;
    let mut steps = Vec::new();
    for _ in 0..MAX_STEPS {
        let count = ((rate * w.phase.as_secs_f64()).ceil() as usize).max(1);
        if start + count > w.messages {
            eprintln!(
                "rate search: message budget ({}) spent; raise -m to search further",
                w.messages
            );
            break;
        }
        let range = start..start + count;
        let before = shared.latency.merged();
        let delivered_before = shared.delivered.load(Ordering::Relaxed);
        let failed_before = p.failed.lock().len();
        let t0 = Instant::now();
        p.publish(range.clone(), rate).await;
        let publish_secs = t0.elapsed().as_secs_f64();
        let failed_now: std::collections::HashSet<usize> =
            p.failed.lock()[failed_before..].iter().copied().collect();
        let expected: u64 = range
            .clone()
            .filter(|&i| shared.tracker.was_sent(i) && !failed_now.contains(&i))
            .map(|i| u64::from(subs_on[i % channels]))
            .sum();
        let drain_deadline = Instant::now() + w.drain;
        while Instant::now() < drain_deadline
            && shared.delivered.load(Ordering::Relaxed) - delivered_before < expected
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = shared.delivered.load(Ordering::Relaxed) - delivered_before;
        let mut h = shared.latency.merged();
        let _ = h.subtract(&before);
        let p99_us = (!h.is_empty()).then(|| h.value_at_quantile(0.99));
        let deliveries_per_sec = match shared.tracker.span_us_in(range.clone()) {
            Some((first, last)) if last > first => got as f64 / ((last - first) as f64 / 1e6),
            _ => 0.0,
        };
        let acked = count - failed_now.len();
        let acked_rate = acked as f64 / publish_secs.max(1e-6);
        let ok = failed_now.is_empty()
            && expected > 0
            && got >= expected
            && acked_rate >= 0.9 * rate
            && p99_us.is_some_and(|us| us <= max_p99.as_micros() as u64);
        let step = Step {
            rate,
            acked_rate,
            deliveries_per_sec,
            p99_ms: p99_us.map(|us| us as f64 / 1000.0),
            ok,
        };
        eprintln!(
            "rate search: {:.0} msg/s -> acked {:.0}/s, {:.0} deliveries/s, p99 {:?} ms: {}",
            step.rate,
            step.acked_rate,
            step.deliveries_per_sec,
            step.p99_ms,
            if ok { "ok" } else { "over" }
        );
        steps.push(step);
        start += count;
        if ok {
            good = Some(good.map_or(rate, |g: f64| g.max(rate)));
        } else {
            bad = Some(bad.map_or(rate, |b: f64| b.min(rate)));
        }
        rate = match (good, bad) {
            (Some(g), None) => g * 2.0,
            (None, Some(b)) => b / 2.0,
            (Some(g), Some(b)) if (b - g) / g > 0.1 => (g + b) / 2.0,
            _ => break,
        };
        if rate < 1.0 {
            break;
        }
    }
    steps
}

/// The best passing phase of a search.
pub fn sustained(steps: &[Step]) -> Option<&Step> {
    steps
        .iter()
        .filter(|s| s.ok)
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
}
