//! CI smoke run: a real Herald in-process on 127.0.0.1:0, a few hundred subscribers, every message delivered
//! exactly once. No timing assertions: the numbers depend on the machine.

use std::time::Duration;

use herald::{Config, Server};
use herald_bench::{run, ServerKind, Target, Transport, Workload};
use tokio::sync::oneshot;

const KEY: &str = "bench-smoke-key";

async fn start_herald(dir: &std::path::Path) -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let mut overrides: Vec<(String, String)> = vec![
        ("listen".into(), "\"127.0.0.1:0\"".into()),
        (
            "data_dir".into(),
            format!("{:?}", dir.display().to_string()),
        ),
        ("auth.jwt_key".into(), format!("{KEY:?}")),
        ("auth.allow_anonymous".into(), "true".into()),
        ("shutdown_timeout".into(), "\"2s\"".into()),
    ];
    // The Yjs fan-out's clients carry no token.
    overrides.push(("yjs.anonymous".into(), "\"write\"".into()));
    let config = Config::load(None, Vec::new(), &overrides).expect("config");
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addr().expect("addr");
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (addr, stop)
}

fn workload(addr: std::net::SocketAddr, transport: Transport, subscribers: usize) -> Workload {
    let token = herald_bench::target::sign_publisher(KEY).expect("token");
    let target = Target::new(ServerKind::Herald, vec![addr], Some(token)).expect("target");
    let mut w = Workload::new(target, transport);
    w.label = format!("smoke {transport}");
    w.subscribers = subscribers;
    w.messages = 50;
    w.concurrency = 4;
    w.batch = 100;
    w.src_ips = 4;
    w.settle = Duration::from_millis(100);
    w.drain = Duration::from_secs(20);
    w.server_pids = vec![std::process::id()];
    w
}

fn assert_clean(r: &herald_bench::Report) {
    r.print_human();
    assert_eq!(r.connect_errors, 0, "{:?}", r.first_connect_error);
    assert_eq!(r.publish_errors, 0, "{:?}", r.first_publish_error);
    assert_eq!(r.sent, r.w.messages);
    assert_eq!(r.lost, 0);
    assert_eq!(r.duplicated, 0);
    assert_eq!(r.misrouted, 0);
    assert_eq!(r.ended_early, 0, "{:?}", r.first_end_reason);
    assert_eq!(r.delivered, r.expected_deliveries);
    assert_eq!(
        r.expected_deliveries,
        (r.w.messages * r.w.subscribers / r.w.channels) as u64
    );
    assert_eq!(r.reach_all_incomplete, 0);
    assert!(r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_300_subscribers_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _stop) = start_herald(dir.path()).await;
    assert_clean(&run(workload(addr, Transport::Sse, 300)).await.expect("run"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_channels_and_websocket_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _stop) = start_herald(dir.path()).await;
    let mut w = workload(addr, Transport::Sse, 200);
    w.channels = 20;
    assert_clean(&run(w).await.expect("run sse channels"));
    let json = run(workload(addr, Transport::Ws, 200))
        .await
        .expect("run ws");
    assert_clean(&json);
    let protobuf = run(workload(addr, Transport::WsProtobuf, 200))
        .await
        .expect("run ws-protobuf");
    assert_clean(&protobuf);
    let (j, p) = (
        json.ws_bytes_per_delivery.expect("bytes counted"),
        protobuf.ws_bytes_per_delivery.expect("bytes counted"),
    );
    assert!(
        p < j,
        "a Protobuf push is smaller than a JSON one ({p:.1} vs {j:.1} bytes)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_wire_clients_get_every_update_of_every_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _stop) = start_herald(dir.path()).await;
    let f = herald_bench::yjs::Fanout {
        url: format!("ws://{addr}/yjs"),
        dialect: herald_bench::yjs::Dialect::YWebsocket,
        document: "smoke".into(),
        documents: 3,
        clients: 10,
        writers: 2,
        updates: 300,
        batch: 10,
        timeout: Duration::from_secs(60),
    };
    let r = herald_bench::yjs::fanout(&f).await.expect("fan-out");
    println!("{r}");
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["gaps"], 0, "{r}");
    assert_eq!(r["misrouted"], 0, "{r}");
    // 3 documents x 2 writers x 300 updates, each update to the 8 other clients of its document only.
    assert_eq!(r["updates"], 1800, "{r}");
    assert!(r["deliveries_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
}
