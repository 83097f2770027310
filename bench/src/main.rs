//! `herald-bench run ...` measures one workload against one server; `herald-bench table FILE` turns the
//! JSON lines of several runs into a markdown table of medians and Herald/nchan ratios; `herald-bench inbox
//! ...` runs the notification inbox's workloads (see `inbox.rs`).
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald_bench::{inbox, rss, run, table, ServerKind, Target, Transport, Workload};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one workload against one server.
    Run(Box<RunArgs>),
    /// Print a markdown table of medians (and Herald/nchan ratios) from a JSON-lines results file.
    Table { file: std::path::PathBuf },
    /// The notification inbox's workloads (scripts/bench-inbox.sh runs them).
    Inbox(Box<InboxArgs>),
    /// Yjs update fan-out to the clients of one document, with wire-level clients (bench/yjs runs it
    /// against Herald and its peers; see `yjs.rs` for why).
    Yjs(YjsArgs),
}

#[derive(clap::Args)]
struct YjsArgs {
    /// The server's WebSocket URL: y-websocket clients connect to `<url>/<document>`.
    #[arg(long)]
    url: String,
    /// y-websocket or hocuspocus.
    #[arg(long, value_enum, default_value = "y-websocket")]
    dialect: herald_bench::yjs::Dialect,
    /// The document's name (with --documents > 1, their prefix).
    #[arg(long, default_value = "bench")]
    document: String,
    /// Documents, each with --clients clients and --writers writers of its own.
    #[arg(long, default_value_t = 1)]
    documents: usize,
    /// Clients per document, writers included.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Entries each writer pushes (one update each).
    #[arg(long, default_value_t = 1000)]
    updates: usize,
    /// Clients connecting at once.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Runtime threads of this process; 1 keeps the clients on one core, leaving the other to the server.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(clap::Args)]
struct InboxArgs {
    /// The Herald server's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The server API key (`centrifugo.api_key`).
    #[arg(long, env = "HERALD_API_KEY", default_value = "bench")]
    api_key: String,
    /// The key users' tokens are signed with (Herald's development key by default).
    #[arg(long, default_value = herald_bench::target::DEV_KEY)]
    jwt_key: String,
    /// The server's data directory: the growth of its files is reported.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Server process(es) whose VmRSS is read; default: those listening on the address's port.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) for subscriber sockets; 0 = kernel's choice.
    #[arg(long, default_value_t = 19)]
    src_ips: usize,
    /// Subscribers connecting at once during the ramp.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Pause between ramp batches.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    batch_pause: Duration,
    /// Name of the workload in reports.
    #[arg(long, default_value = "")]
    label: String,
    /// Round number, recorded in the JSON line.
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// Append the report as one JSON line to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    #[command(subcommand)]
    what: InboxCmd,
}

#[derive(Subcommand)]
enum InboxCmd {
    /// One notification to many inboxes (notify) or the server API's broadcast to the same users'
    /// personal channels (broadcast), with some users connected to their channel.
    Fanout {
        /// notify or broadcast.
        #[arg(long, default_value = "notify")]
        mode: inbox::FanoutMode,
        /// sse or ws.
        #[arg(long, default_value = "sse")]
        transport: Transport,
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Users u0.. that hold a subscription to their own channel.
        #[arg(long, default_value_t = 10_000)]
        connected: usize,
        /// Users per call.
        #[arg(long, default_value_t = 1000)]
        per_call: usize,
        /// Calls in flight.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Bound of the call phase.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Wait for the connected users' events after the last acknowledgement.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain: Duration,
    },
    /// Device A marks items read/unread through the browser API, device B is subscribed: A-to-B latency,
    /// then a drift check of the counts.
    Markread {
        #[arg(long, default_value = "sse")]
        transport: Transport,
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Items per inbox before the changes.
        #[arg(long, default_value_t = 10)]
        items: usize,
        /// Changes per second over all users.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain: Duration,
    },
    /// Fills inboxes: item k of every user, k = 0..items, through inbox_notify.
    Fill {
        #[arg(long)]
        users: usize,
        #[arg(long)]
        items: usize,
        #[arg(long, default_value_t = 1000)]
        per_call: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// No call starts after this.
        #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
        time_limit: Duration,
    },
    /// A markdown table of medians from the JSON lines of inbox runs.
    Table { file: std::path::PathBuf },
    /// List pages and counts through the browser API, after `fill`.
    Read {
        #[arg(long)]
        users: usize,
        /// Items per inbox as filled.
        #[arg(long)]
        items: usize,
        #[arg(long, default_value_t = 30_000)]
        requests: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        time_limit: Duration,
        /// Skip this many user visits of the sequence: rounds given disjoint ranges read users whose
        /// pages no earlier round brought into the page cache.
        #[arg(long, default_value_t = 0)]
        user_offset: usize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// herald or nchan.
    #[arg(long, default_value = "herald")]
    server: ServerKind,
    /// The server's address; several (comma-separated or repeated) for the nodes of a cluster, which
    /// share subscribers and publishes round-robin.
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',')]
    addr: Vec<SocketAddr>,
    /// sse or ws.
    #[arg(long, default_value = "sse")]
    transport: Transport,
    /// Subscribers (connections).
    #[arg(long, short = 'n', default_value_t = 1000)]
    subscribers: usize,
    /// Channels; subscriber i listens to channel i % channels, message i goes to channel i % channels.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Messages to publish.
    #[arg(long, short = 'm', default_value_t = 1000)]
    messages: usize,
    /// Messages per second over all channels; 0 = as fast as the server acknowledges.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Subscribers connecting at once during the ramp.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Pause between ramp batches.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    batch_pause: Duration,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) for subscriber sockets; 0 = kernel's choice.
    #[arg(long, default_value_t = 19)]
    src_ips: usize,
    /// Server process(es) whose VmRSS is read; default: those listening on the addresses' ports.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Publisher token (Herald); default: signed with the development key.
    #[arg(long, env = "HERALD_BENCH_TOKEN")]
    token: Option<String>,
    /// Bound of the publish phase.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    publish_timeout: Duration,
    /// Wait for outstanding deliveries after the last acknowledgement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Wait after the ramp before reading the RSS with idle connections.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Name of the workload in reports.
    #[arg(long, default_value = "")]
    label: String,
    /// Round number, recorded in the JSON line.
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// Append the report as one JSON line to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Rate search: the highest publish rate whose publish-to-receive p99 stays under this (e.g. 100ms),
    /// found in phases starting at --rate (or 100/s); -m is the message budget over all phases.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_p99: Option<Duration>,
    /// Length of one rate-search phase.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    phase: Duration,
    /// Exit non-zero when a message was lost or duplicated.
    #[arg(long)]
    strict: bool,
}

/// The soft open-file limit of this process, from /proc/self/limits.
fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Table { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            print!("{}", table::markdown(&text)?);
            Ok(())
        }
        Cmd::Inbox(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(inbox_cmd(*a))
        }
        Cmd::Yjs(a) => {
            let rt = if a.threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(a.threads)
                    .enable_all()
                    .build()
            }
            .context("tokio runtime")?;
            let f = herald_bench::yjs::Fanout {
                url: a.url,
                dialect: a.dialect,
                document: a.document,
                documents: a.documents,
                clients: a.clients,
                writers: a.writers,
                updates: a.updates,
                batch: a.batch,
                timeout: a.timeout,
            };
            let report = rt.block_on(herald_bench::yjs::fanout(&f))?;
            println!("{report}");
            Ok(())
        }
        Cmd::Run(a) => {
            if let Some(limit) = nofile_limit() {
                if (a.subscribers + a.concurrency + 64) as u64 > limit {
                    eprintln!(
                        "warning: open-file limit {limit} is below {} subscribers (raise it: ulimit -n)",
                        a.subscribers
                    );
                }
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(run_cmd(*a))
        }
    }
}

async fn inbox_cmd(a: InboxArgs) -> anyhow::Result<()> {
    if let InboxCmd::Table { file } = &a.what {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        print!("{}", inbox::summary(&text)?);
        return Ok(());
    }
    let pids = if a.server_pids.is_empty() {
        rss::pids_listening(a.addr.port())?
    } else {
        a.server_pids
    };
    if pids.is_empty() {
        eprintln!(
            "no server process found listening on port {}: RSS not measured",
            a.addr.port()
        );
    }
    let srv = inbox::Server {
        addr: a.addr,
        api_key: a.api_key,
        jwt_key: a.jwt_key,
        pids,
        data_dir: a.data_dir,
        src_ips: a.src_ips,
        batch: a.batch.max(1),
        batch_pause: a.batch_pause,
    };
    let mut v = match a.what {
        InboxCmd::Fanout {
            mode,
            transport,
            users,
            connected,
            per_call,
            concurrency,
            timeout,
            drain,
        } => {
            let f = inbox::Fanout {
                mode,
                transport,
                users,
                connected,
                per_call,
                concurrency,
                timeout,
                drain,
            };
            inbox::fanout(&srv, &f).await?
        }
        InboxCmd::Markread {
            transport,
            users,
            items,
            rate,
            duration,
            drain,
        } => {
            let m = inbox::MarkRead {
                transport,
                users,
                items: items.max(1),
                rate: rate.max(0.1),
                duration,
                drain,
            };
            inbox::markread(&srv, &m).await?
        }
        InboxCmd::Fill {
            users,
            items,
            per_call,
            concurrency,
            time_limit,
        } => {
            let f = inbox::Fill {
                users,
                items,
                per_call,
                concurrency,
                time_limit,
            };
            inbox::fill(&srv, &f).await?
        }
        InboxCmd::Read {
            users,
            items,
            requests,
            concurrency,
            time_limit,
            user_offset,
        } => {
            let r = inbox::Read {
                users,
                items,
                requests,
                concurrency,
                time_limit,
                user_offset,
            };
            inbox::read(&srv, &r).await?
        }
        InboxCmd::Table { .. } => return Ok(()),
    };
    inbox::report(&mut v, &a.label, a.round, a.json_out.as_deref())
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<()> {
    let ports: Vec<u16> = a.addr.iter().map(|s| s.port()).collect();
    let target = Target::new(a.server, a.addr, a.token)?;
    let mut w = Workload::new(target, a.transport);
    w.server_pids = if a.server_pids.is_empty() {
        let mut pids = Vec::new();
        for port in &ports {
            pids.extend(rss::pids_listening(*port)?);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    } else {
        a.server_pids
    };
    if w.server_pids.is_empty() {
        eprintln!("no server process found listening on ports {ports:?}: RSS not measured");
    }
    w.label = a.label;
    w.subscribers = a.subscribers;
    w.channels = a.channels.max(1);
    w.messages = a.messages;
    w.rate = a.rate;
    w.concurrency = a.concurrency.max(1);
    w.size = a.size;
    w.batch = a.batch.max(1);
    w.batch_pause = a.batch_pause;
    w.src_ips = a.src_ips;
    w.publish_timeout = a.publish_timeout;
    w.drain = a.drain;
    w.settle = a.settle;
    w.max_p99 = a.max_p99;
    w.phase = a.phase;
    let report = run(w).await?;
    report.print_human();
    if let Some(path) = a.json_out {
        let mut j = report.to_json();
        j["round"] = a.round.into();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{j}")?;
    }
    if a.strict && !report.clean() {
        anyhow::bail!("messages lost, duplicated or misrouted, or subscribers failed");
    }
    Ok(())
}
