//! Admission control: sockets that never become a request (silent, partial, trickling, idle after a
//! response) are closed by the header-read deadline, and accepted sockets are limited, in total and per
//! address, so that such sockets cannot exhaust file descriptors while real clients keep being served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::common::*;

/// `limits.header_read_timeout` in these tests.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How late after the deadline a close may come on a loaded test machine.
const SLACK: Duration = Duration::from_secs(3);

fn addr(s: &TestServer) -> SocketAddr {
    s.url.trim_start_matches("http://").parse().expect("addr")
}

/// Reads until the server closes (EOF or reset) and returns what it sent; `None` if it is still open after
/// `wait`.
async fn until_closed(sock: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A request over a fresh connection (no pooling), so that it needs a newly accepted socket.
async fn healthz(s: &TestServer) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Connects and sends nothing.
    Silent,
    /// Sends part of a request line, then nothing.
    Partial,
    /// Sends a request head one byte every 200 ms.
    Trickle,
    /// Sends part of the HTTP/2 client preface, then nothing.
    PartialPreface,
}

/// One attacking socket: how long the server kept it open, and what it sent before closing it. `None` when
/// still open after the deadline plus `SLACK`.
async fn attack(addr: SocketAddr, kind: Attack) -> Option<(Duration, Vec<u8>)> {
    let mut sock = TcpStream::connect(addr).await.ok()?;
    let opened = Instant::now();
    let head =
        b"GET /.well-known/mercure?topic=t HTTP/1.1\r\nhost: localhost\r\nx-slow: aaaaaaaaaaaaaaaa";
    match kind {
        Attack::Silent => {}
        Attack::Partial => sock.write_all(b"GET /.well-known/merc").await.ok()?,
        Attack::PartialPreface => sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM").await.ok()?,
        Attack::Trickle => {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            for byte in head.iter().cycle() {
                tokio::select! {
                    r = sock.read(&mut chunk) => match r {
                        Ok(0) | Err(_) => return Some((opened.elapsed(), got)),
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    },
                    _ = tick.tick() => {
                        if sock.write_all(&[*byte]).await.is_err() {
                            // Reset: the server closed; what it sent may be lost, which is fine.
                            return Some((opened.elapsed(), got));
                        }
                    }
                }
                if opened.elapsed() > TIMEOUT + SLACK {
                    return None;
                }
            }
        }
    }
    let got = until_closed(&mut sock, TIMEOUT + SLACK).await?;
    Some((opened.elapsed(), got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partial_and_trickling_sockets_are_closed_while_real_clients_are_served() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("limits.header_read_timeout", "\"1s\""),
        ("log.backend", "\"memory\""),
    ])
    .await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    assert_eq!(sub.status, 200);
    wait_subscriptions(&s, 1).await;

    const EACH: usize = 300;
    let mut attackers = JoinSet::new();
    for kind in [
        Attack::Silent,
        Attack::Partial,
        Attack::Trickle,
        Attack::PartialPreface,
    ] {
        let n = if kind == Attack::PartialPreface {
            50
        } else {
            EACH
        };
        for _ in 0..n {
            let a = addr(&s);
            attackers.spawn(async move { (kind, attack(a, kind).await) });
        }
    }

    // While the attack lasts: the subscriber receives, and /healthz answers on new connections.
    let published = s
        .publish(&[("topic", "t"), ("data", "during"), ("id", "d1")])
        .await;
    assert_eq!(sub.next_event().await.unwrap().id, Some(published));
    let mut checks = 0;
    let mut results = Vec::new();
    let started = Instant::now();
    while !attackers.is_empty() {
        assert_eq!(healthz(&s).await, Ok(200), "healthz during the attack");
        checks += 1;
        while let Some(r) = attackers.try_join_next() {
            results.push(r.expect("attacker task"));
        }
        assert!(
            started.elapsed() < TIMEOUT + SLACK + Duration::from_secs(5),
            "the attack outlived its bound"
        );
    }
    assert!(checks >= 2, "healthz was checked during the attack");

    assert_eq!(results.len(), 3 * EACH + 50);
    for (kind, r) in results {
        let (open_for, got) = r.unwrap_or_else(|| panic!("a {kind:?} socket was never closed"));
        assert!(
            open_for >= TIMEOUT / 2 && open_for <= TIMEOUT + SLACK,
            "{kind:?} closed after {open_for:?}"
        );
        let text = String::from_utf8_lossy(&got);
        if kind != Attack::Trickle {
            // Nothing was left unread, so the 408 arrives before the FIN.
            assert!(
                text.starts_with("HTTP/1.1 408 Request Timeout\r\n")
                    && text.contains("request_timeout"),
                "{kind:?}: {text:?}"
            );
        }
    }
    // The subscriber is still there.
    s.publish(&[("topic", "t"), ("data", "after"), ("id", "d2")])
        .await;
    assert_eq!(sub.next_event().await.unwrap().id.as_deref(), Some("d2"));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_timeout() {
    let s = TestServer::start(&[("limits.header_read_timeout", "\"1s\"")]).await;
    // A response from the subscriber fast path (401: no token), then from hyper (/healthz), each followed by
    // silence on a connection that stays open for keep-alive.
    for (request, status) in [
        (
            "GET /.well-known/mercure?topic=t HTTP/1.1\r\nhost: h\r\n\r\n",
            "401",
        ),
        ("GET /healthz HTTP/1.1\r\nhost: h\r\n\r\n", "200"),
    ] {
        let mut sock = TcpStream::connect(addr(&s)).await.unwrap();
        sock.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(sock.read(&mut byte).await.unwrap(), 1, "{request}");
            head.push(byte[0]);
        }
        let answered = Instant::now();
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(text.starts_with(&format!("http/1.1 {status} ")), "{text}");
        assert!(!text.contains("connection: close"), "kept alive: {text}");
        until_closed(&mut sock, TIMEOUT + SLACK)
            .await
            .unwrap_or_else(|| panic!("still open after {request:?}"));
        let idle = answered.elapsed();
        assert!(idle >= TIMEOUT / 2, "closed after {idle:?}, too early");
    }
}

#[tokio::test]
async fn a_silent_http2_connection_is_closed() {
    let s = TestServer::start(&[("limits.header_read_timeout", "\"1s\"")]).await;
    // The whole preface: hyper serves HTTP/2, pings the silent peer and gives up on it.
    let mut sock = TcpStream::connect(addr(&s)).await.unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut sock, 2 * TIMEOUT + SLACK)
        .await
        .expect("closed after an unanswered ping");
    assert!(!got.is_empty(), "the server spoke HTTP/2 (settings, ping)");
}

/// Opens `n` sockets that send nothing, each one accepted (and holding its place) before the next connects.
async fn silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n {
        socks.push(TcpStream::connect(addr).await.expect("connect"));
    }
    socks
}

/// Sends a `/healthz` request on `sock` and returns the status line, or `None` if the server closed the
/// socket without answering.
async fn request_healthz(mut sock: TcpStream) -> Option<String> {
    // The server may have closed the socket already: a failed write is the same answer as an EOF.
    if sock
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return None;
    }
    let got = until_closed(&mut sock, Duration::from_secs(5))
        .await
        .expect("answered or closed");
    let text = String::from_utf8_lossy(&got);
    text.lines().next().map(str::to_string)
}

/// A socket from `ip` (a loopback address other than 127.0.0.1 shows the limit is per address).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.expect("connect")
}

/// A counter or gauge from `/metrics` (summed over label sets matching `labels`).
async fn metric(s: &TestServer, name_and_labels: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(name_and_labels))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn over_max_sockets_a_socket_is_closed_at_once_and_clients_get_in_after_the_timeout() {
    let s = TestServer::start(&[
        ("limits.max_sockets", "20"),
        ("limits.header_read_timeout", "\"2s\""),
    ])
    .await;
    let mut held = silent(addr(&s), 20).await;

    let t = Instant::now();
    let refused = TcpStream::connect(addr(&s)).await.unwrap();
    assert_eq!(
        request_healthz(refused).await,
        None,
        "no response over the limit"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "closed at once, not by the 2 s timeout ({:?})",
        t.elapsed()
    );

    for sock in &mut held {
        until_closed(sock, Duration::from_secs(2) + SLACK)
            .await
            .expect("silent sockets time out");
    }
    assert_eq!(
        healthz(&s).await,
        Ok(200),
        "room again once they are closed"
    );
    assert!(metric(&s, "herald_sockets_refused_total{reason=\"limit\"}").await >= 1.0);
    assert!(metric(&s, "herald_sockets_refused_total{reason=\"timeout\"}").await >= 20.0);
    assert!(
        metric(&s, "herald_sockets ").await >= 1.0,
        "this request's socket"
    );
}

#[tokio::test]
async fn max_sockets_per_ip_counts_each_address_separately() {
    let s = TestServer::start(&[
        ("limits.max_sockets_per_ip", "3"),
        ("limits.header_read_timeout", "\"5s\""),
    ])
    .await;
    let mut held = silent(addr(&s), 3).await;
    let t = Instant::now();
    let fourth = TcpStream::connect(addr(&s)).await.unwrap();
    assert_eq!(request_healthz(fourth).await, None, "a 4th from 127.0.0.1");
    assert!(t.elapsed() < Duration::from_secs(2), "closed at once");

    // Other addresses have their own 3.
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let sock = connect_from(ip, addr(&s)).await;
        assert_eq!(
            request_healthz(sock).await.as_deref(),
            Some("HTTP/1.1 200 OK"),
            "from {ip}"
        );
    }
    let _more = [
        connect_from("127.0.0.2", addr(&s)).await,
        connect_from("127.0.0.2", addr(&s)).await,
        connect_from("127.0.0.2", addr(&s)).await,
    ];
    assert_eq!(
        request_healthz(connect_from("127.0.0.2", addr(&s)).await).await,
        None,
        "127.0.0.2 has its own limit too"
    );

    // A client that hangs up gives its place back (well before the 5 s timeout would).
    drop(held.pop());
    let t = Instant::now();
    loop {
        let sock = TcpStream::connect(addr(&s)).await.unwrap();
        if request_healthz(sock).await.as_deref() == Some("HTTP/1.1 200 OK") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metric(&s, "herald_sockets_refused_total{reason=\"per_ip\"}").await >= 2.0);
}

#[tokio::test]
async fn an_upgraded_websocket_keeps_its_place() {
    let s = TestServer::start(&[("limits.max_sockets", "2")]).await;
    let url = format!("{}/connection/websocket", s.url.replace("http://", "ws://"));
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("ws connect");
    let _silent = silent(addr(&s), 1).await;
    let third = TcpStream::connect(addr(&s)).await.unwrap();
    assert_eq!(
        request_healthz(third).await,
        None,
        "the WebSocket and the silent socket hold both places"
    );
    drop(ws);
    let t = Instant::now();
    loop {
        let sock = TcpStream::connect(addr(&s)).await.unwrap();
        if request_healthz(sock).await.as_deref() == Some("HTTP/1.1 200 OK") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the WebSocket's place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real binary, killed when dropped, with its stderr collected as it comes (a full pipe would block the
/// server's logging).
struct Herald {
    child: tokio::process::Child,
    addr: SocketAddr,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Herald {
    /// Starts `herald serve` through `sh`, whose `limits` (shell commands) run first.
    async fn start(limits: &str, settings: &[&str]) -> Herald {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{limits} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_herald"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--memory",
                "--jwt-key",
                KEY,
            ])
            .arg("--data-dir")
            .arg(dir.path());
        for s in settings {
            cmd.args(["--set", s]);
        }
        let mut child = cmd
            .env("HERALD_LOG_LEVEL", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn herald");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err_lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, out.next_line())
            .await
            .expect("herald started in time")
            .unwrap()
            .unwrap_or_else(|| panic!("herald exited: {}", stderr.lock().unwrap()));
        let addr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Herald {
            child,
            addr,
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_under_a_low_fd_limit_refuses_sockets_instead_of_running_out() {
    // Soft 128, hard 256: herald raises the soft limit to 256 and keeps 64 descriptors in reserve.
    let h = Herald::start(
        "ulimit -S -n 128 && ulimit -H -n 256",
        &["limits.header_read_timeout=1s"],
    )
    .await;
    let started = Instant::now();
    while !h.stderr().contains("at most 192 sockets") {
        assert!(
            started.elapsed() < WAIT,
            "no admission line: {}",
            h.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // More silent sockets than the process has descriptors.
    const N: usize = 400;
    let mut attackers = JoinSet::new();
    for _ in 0..N {
        let addr = h.addr;
        attackers.spawn(async move {
            let mut sock = TcpStream::connect(addr).await.expect("connect");
            until_closed(&mut sock, TIMEOUT + SLACK).await
        });
    }
    let (mut refused, mut timed_out) = (0, 0);
    while let Some(r) = attackers.join_next().await {
        let got = r
            .unwrap()
            .expect("every attack socket is closed, refused or timed out");
        if got.is_empty() {
            refused += 1;
        } else {
            assert!(got.starts_with(b"HTTP/1.1 408 "));
            timed_out += 1;
        }
    }
    assert!(
        refused >= N - 192,
        "{refused} refused, {timed_out} timed out"
    );
    assert!(timed_out > 0);

    let healthz = format!("http://{}/healthz", h.addr);
    let resp = reqwest::get(&healthz)
        .await
        .expect("healthz after the attack");
    assert_eq!(resp.status(), 200);

    let log = h.stderr();
    assert!(
        log.matches("accept failed").count() <= 3,
        "accept failures flood the log:\n{log}"
    );
    assert!(!log.contains("Too many open files"), "{log}");
}
