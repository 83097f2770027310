//! Composition and lifecycle: builds the router from a hub and a config, and runs it with our own accept
//! loop.
//!
//! Why not `axum::serve`: a subscriber that stops reading leaves its stream un-polled, so ending the stream
//! cannot close the connection; only dropping the connection can. The accept loop gives every connection a
//! kill switch ([`ConnKill`], a request extension) that the hub pulls when the subscriber's outbox
//! overflows. The same loop enforces graceful shutdown: stop accepting, end streams (clients reconnect
//! elsewhere), drain and flush the log, and cut whatever is left after `shutdown_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::auth::Auth;
use crate::config::{Config, ConfigError, EngineKind, LogBackend};
use crate::engine::{Engine, LocalEngine};
use crate::error::ApiError;
use crate::hub::{Hub, HubOptions};
use crate::log::{Log, MemoryLog, Retention, RetentionRule, SqliteLog};
use crate::state::AppState;
use crate::topic::Selector;

mod admission;
pub(crate) mod lean;

use admission::{Admission, Permit, Refusal, Throttle};

/// Cancelling it closes the client's TCP connection. Present on requests served by [`Server`]; absent when
/// the router is mounted in another server, where a stalled subscriber is dropped on its next write.
#[derive(Clone)]
pub struct ConnKill(pub CancellationToken);

/// Hub options from the config.
pub fn hub_options(c: &Config) -> HubOptions {
    HubOptions {
        outbox_capacity: c.limits.outbox_capacity,
        max_connections: c.limits.max_connections,
        max_topics_per_subscription: c.limits.max_topics_per_subscription,
        max_message_size: c.limits.max_message_size,
        max_batch: c.log.max_batch,
    }
}

/// Retention rules from the config: namespace history settings first (they are the more specific rules),
/// then the `[[retention]]` rules.
pub fn retention(c: &Config) -> Retention {
    Retention {
        rules: c
            .centrifugo
            .namespaces
            .iter()
            .filter(|n| !n.name.is_empty() && (n.history_size.is_some() || n.history_ttl.is_some()))
            .map(|n| RetentionRule {
                selector: Selector::parse(&format!("{}:{{+rest}}", n.name)),
                max_count: n.history_size,
                max_age: n.history_ttl,
            })
            .chain(c.retention.iter().map(|r| RetentionRule {
                selector: Selector::parse(&r.pattern),
                max_count: r.max_count,
                max_age: r.max_age,
            }))
            .collect(),
    }
}

/// Opens the configured log.
pub fn open_log(c: &Config) -> Result<Arc<dyn Log>, crate::log::LogError> {
    Ok(match c.log.backend {
        LogBackend::Memory => Arc::new(MemoryLog::new()),
        LogBackend::Sqlite => Arc::new(SqliteLog::open(c.log_path(), c.log.durable)?),
    })
}

/// Opens the configured engine: the local log with its writer thread and retention, or a cluster engine
/// (which connects, and fails with a clear message when its server cannot be reached).
pub async fn open_engine(c: &Config) -> Result<Arc<dyn Engine>, crate::log::LogError> {
    match c.engine.kind {
        EngineKind::Local => Ok(Arc::new(LocalEngine::new(
            open_log(c)?,
            retention(c),
            c.log.prune_interval,
        ))),
        EngineKind::Redis => Ok(Arc::new(
            crate::engine::redis::RedisEngine::open(crate::engine::redis::RedisOptions {
                url: c.engine.url.clone(),
                prefix: c.engine.prefix.clone(),
                connect_timeout: c.engine.connect_timeout,
                op_timeout: c.engine.op_timeout,
                presence_ttl: c.engine.presence_ttl,
                retention: retention(c),
                prune_interval: c.log.prune_interval,
            })
            .await?,
        )),
        EngineKind::Nats => Ok(Arc::new(
            crate::engine::NatsEngine::connect(crate::engine::nats::NatsOptions {
                url: c.engine.url.clone(),
                prefix: c.engine.prefix.clone(),
                connect_timeout: c.engine.connect_timeout,
                op_timeout: c.engine.op_timeout,
                presence_ttl: c.engine.presence_ttl,
                retention: retention(c),
                prune_interval: c.log.prune_interval,
            })
            .await?,
        )),
    }
}

/// The whole HTTP surface of Herald as an `axum::Router`, ready to mount in any axum app.
pub fn router(hub: Hub, config: Config) -> Result<Router, ConfigError> {
    config.validate()?;
    let inbox = open_inbox(&hub, &config)?;
    router_with_inbox(hub, config, inbox)
}

/// Like [`router`], with an inbox the application opened itself ([`open_inbox`]) and keeps a handle to,
/// to notify users from its own code (`inbox.notify(...)`).
pub fn router_with_inbox(
    hub: Hub,
    mut config: Config,
    inbox: Option<crate::inbox::Inbox>,
) -> Result<Router, ConfigError> {
    config.validate()?;
    if let Some(inbox) = &inbox {
        inbox_namespace(&mut config, &inbox.config().namespace);
    }
    let auth = Auth::from_config(&config.auth)
        .and_then(|a| a.with_api_key(config.centrifugo.api_key.as_deref()))
        .map_err(ConfigError::Invalid)?;
    // No allowed origins: no CORS headers at all (same-origin and reverse-proxied deployments need none).
    let cors = if config.cors.allowed_origins.is_empty() {
        None
    } else {
        Some(crate::cors::layer(&config.cors).map_err(ConfigError::Invalid)?)
    };
    let origins = crate::cors::OriginList::parse(&config.cors.allowed_origins)
        .map_err(ConfigError::Invalid)?;
    let console = crate::console::Console::from_config(&config)?;
    let clients = Arc::new(crate::centrifugo::Clients::default());
    let sink = clients.clone();
    hub.on_control(move |user, client, payload| sink.deliver(user, client, payload));
    let yjs = crate::yjs::routes(&hub, &config.yjs);
    let state = AppState {
        hub,
        auth: Arc::new(auth),
        access: Arc::new(
            crate::access::Access::new(&config.centrifugo)
                .with_anonymous_docs(config.yjs.anonymous),
        ),
        config: Arc::new(config),
        origins: Arc::new(origins),
        clients,
        idempotency: Arc::new(crate::centrifugo::Idempotency::default()),
        inbox,
    };
    Ok(Router::new()
        .merge(crate::mercure::routes())
        .merge(crate::centrifugo::routes())
        .merge(yjs)
        .merge(crate::console::routes(Arc::new(console)))
        .merge(crate::inbox::api::routes())
        .merge(crate::inbox::browser::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(tower::util::option_layer(cors))
        .layer(axum::middleware::from_fn(crate::error::log_refusals))
        .with_state(state))
}

/// Gives the inbox channels' namespace the rules an inbox needs (authenticated readers, the `#` list
/// admitting only the owner; no client publishes) unless the operator configured that namespace.
fn inbox_namespace(config: &mut Config, ns: &str) {
    if !config.centrifugo.namespaces.iter().any(|n| n.name == ns) {
        config
            .centrifugo
            .namespaces
            .push(crate::config::NamespaceConfig {
                name: ns.to_string(),
                subscribe: crate::config::SubscribePolicy::Authenticated,
                publish: crate::config::PublishPolicy::None,
                presence: false,
                ..Default::default()
            });
    }
}

/// Opens the inbox store when `inbox.enabled` (`None` otherwise), starts the check of its counts in the
/// background, and starts the publisher of its events on `hub`. Needs a tokio runtime.
pub fn open_inbox(hub: &Hub, config: &Config) -> Result<Option<crate::inbox::Inbox>, ConfigError> {
    if !config.inbox.enabled {
        return Ok(None);
    }
    config.validate()?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ConfigError::Invalid(
            "the inbox needs a tokio runtime: build the router inside one".into(),
        ));
    }
    if config.engine.kind != EngineKind::Local {
        return Err(ConfigError::Invalid(
            "the inbox on a cluster engine connects to Redis or NATS: open it with \
             herald::server::connect_inbox (async) and pass it to router_with_inbox"
                .into(),
        ));
    }
    let path = config.inbox_path();
    let store = crate::inbox::SqliteInbox::open_with(
        &path,
        config.log.durable,
        crate::inbox::sqlite::StoreLimits {
            max_items: config.inbox.max_items,
            max_age: config.inbox.max_age,
        },
        crate::inbox::sqlite::CheckOptions {
            batch: config.inbox.check_batch,
            pause: config.inbox.check_pause,
        },
    )
    .map_err(|e| {
        ConfigError::Invalid(format!("cannot open the inbox at {}: {e}", path.display()))
    })?;
    let inbox = crate::inbox::Inbox::start(Arc::new(store), hub.clone(), config.inbox.clone());
    crate::inbox::push::attach(&inbox, hub, config)?;
    Ok(Some(inbox))
}

/// Like [`open_inbox`], for every engine: on the Redis engine the store lives in the engine's Redis
/// (`engine.url`, keys under [`Config::inbox_prefix`]), shared by every node; it is connected to and
/// recounted here.
pub async fn connect_inbox(
    hub: &Hub,
    config: &Config,
) -> Result<Option<crate::inbox::Inbox>, ConfigError> {
    if config.inbox.enabled && config.engine.kind == EngineKind::Nats {
        return connect_nats_inbox(hub, config).await;
    }
    if !config.inbox.enabled || config.engine.kind != EngineKind::Redis {
        return open_inbox(hub, config);
    }
    config.validate()?;
    let store = crate::inbox::RedisInbox::open(
        crate::inbox::redis::RedisInboxOptions {
            url: config.engine.url.clone(),
            prefix: config.inbox_prefix(),
            connect_timeout: config.engine.connect_timeout,
            op_timeout: config.engine.op_timeout,
            limits: crate::inbox::sqlite::StoreLimits {
                max_items: config.inbox.max_items,
                max_age: config.inbox.max_age,
            },
        },
        hub.clone(),
    )
    .await
    .map_err(|e| ConfigError::Invalid(format!("cannot open the inbox on Redis: {e}")))?;
    let inbox = crate::inbox::Inbox::start(Arc::new(store), hub.clone(), config.inbox.clone());
    crate::inbox::push::attach_redis(&inbox, hub, config).await?;
    Ok(Some(inbox))
}

/// The inbox on the NATS engine: JetStream on the engine's server, shared by every node (see
/// [`crate::inbox::nats`]).
async fn connect_nats_inbox(
    hub: &Hub,
    config: &Config,
) -> Result<Option<crate::inbox::Inbox>, ConfigError> {
    config.validate()?;
    let store = crate::inbox::NatsInbox::open(
        crate::inbox::nats::NatsInboxOptions {
            url: config.engine.url.clone(),
            stem: config.inbox_stem(),
            prefix: config.engine.prefix.clone(),
            connect_timeout: config.engine.connect_timeout,
            op_timeout: config.engine.op_timeout,
            limits: crate::inbox::sqlite::StoreLimits {
                max_items: config.inbox.max_items,
                max_age: config.inbox.max_age,
            },
        },
        hub.clone(),
    )
    .await
    .map_err(|e| ConfigError::Invalid(format!("cannot open the inbox on NATS: {e}")))?;
    let inbox = crate::inbox::Inbox::start(Arc::new(store), hub.clone(), config.inbox.clone());
    crate::inbox::push::attach_nats(&inbox, hub, config).await?;
    Ok(Some(inbox))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready means a publish would be acknowledged now: not shutting down, the sequencer alive, the engine
/// accepting writes (its last write succeeded, its writer answers).
async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Err(e) = st.hub.ready().await {
        let code = match e {
            crate::hub::HubError::ShuttingDown => "shutting_down",
            _ => "log_unavailable",
        };
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            e.to_string(),
        ));
    }
    Ok(Json(
        json!({"status": "ready", "connections": st.hub.connection_count()}),
    ))
}

async fn metrics() -> Response {
    match crate::metrics::handle() {
        Some(h) => {
            let mut resp = h.render().into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_unavailable",
            "another metrics recorder is installed in this process",
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// The public development key on an address others can reach would let anyone mint tokens: refused
/// unless `auth.allow_dev_key` says the operator means it.
fn refuse_dev_key_on_network(config: &Config, addr: SocketAddr) -> Result<(), ConfigError> {
    if config.uses_dev_key() && !addr.ip().is_loopback() && !config.auth.allow_dev_key {
        return Err(ConfigError::Invalid(format!(
            "refusing to listen on {addr} with the public development key: anyone can mint tokens for \
             it. Set auth.jwt_key (e.g. HERALD_JWT_KEY=env:MY_SECRET or a secret of your own), or pass \
             --allow-dev-key (auth.allow_dev_key = true) to run like this anyway"
        )));
    }
    Ok(())
}

/// A bound, not yet running Herald.
pub struct Server {
    listener: TcpListener,
    router: Router,
    hub: Hub,
    shutdown_timeout: Duration,
    admission: Arc<Admission>,
}

impl Server {
    /// Opens the log, builds the hub and router, and binds the listener (port 0 picks a free port).
    ///
    /// Also raises the process's soft open-file limit to its hard limit (see [`admission`]); the socket
    /// limit in force is logged.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let addr = config.listen_addr()?;
        refuse_dev_key_on_network(&config, addr)?;
        let engine = open_engine(&config).await?;
        Server::bind_with(config, engine).await
    }

    /// Like [`Server::bind`], on an engine of the caller's (a cluster engine built elsewhere, or one
    /// wrapped to observe or inject faults in tests).
    pub async fn bind_with(config: Config, engine: Arc<dyn Engine>) -> anyhow::Result<Server> {
        let addr = config.listen_addr()?;
        refuse_dev_key_on_network(&config, addr)?;
        crate::metrics::handle();
        let hub = Hub::new(engine, hub_options(&config)).await?;
        let shutdown_timeout = config.shutdown_timeout;
        let limits = config.limits.clone();
        // The standalone server's front page is the console (an embedding app keeps `/` for itself).
        config.validate()?;
        let inbox = connect_inbox(&hub, &config).await?;
        let router =
            router_with_inbox(hub.clone(), config, inbox)?.route("/", get(crate::console::page));
        let listener = listen(addr).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    " (another process, perhaps another herald, listens there: stop it or choose another \
                     address with --listen)"
                }
                std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                std::io::ErrorKind::AddrNotAvailable => " (no interface of this machine has that address)",
                _ => "",
            };
            anyhow::anyhow!("cannot listen on {addr}: {e}{hint}")
        })?;
        let fds = admission::raise_fd_limit();
        let max_sockets = admission::socket_limit(limits.max_sockets, limits.max_connections, fds);
        if limits.max_sockets > max_sockets {
            tracing::warn!(
                "limits.max_sockets = {} lowered to {max_sockets}: the open-file limit is {}, less {} \
                 kept for other files",
                limits.max_sockets,
                fds.unwrap_or_default(),
                admission::FD_RESERVE,
            );
        }
        if max_sockets < limits.max_connections {
            tracing::warn!(
                "only {max_sockets} sockets can be open at once, fewer than limits.max_connections = {}; \
                 raise the open-file limit (ulimit -n) or lower max_connections",
                limits.max_connections,
            );
        }
        tracing::info!(
            max_sockets,
            max_sockets_per_ip = limits.max_sockets_per_ip,
            open_file_limit = fds,
            header_read_timeout = ?limits.header_read_timeout,
            "admission: at most {max_sockets} sockets open at once",
        );
        Ok(Server {
            listener,
            router,
            hub,
            shutdown_timeout,
            admission: Admission::new(
                max_sockets,
                limits.max_sockets_per_ip,
                limits.header_read_timeout,
            ),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Server {
            listener,
            router,
            hub,
            shutdown_timeout,
            admission,
        } = self;
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let builder = Arc::new(hyper_builder(admission.header_read_timeout()));
        let mut accept_failures = Throttle::default();
        let mut refusals = Throttle::default();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning, and say so
                        // once a second, not twenty times.
                        if let Some(suppressed) = accept_failures.ready(std::time::Instant::now()) {
                            tracing::warn!(error = %e, suppressed, "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let permit = match admission.admit(peer.ip()) {
                Ok(permit) => permit,
                Err(refusal) => {
                    if let Some(suppressed) = refusals.ready(std::time::Instant::now()) {
                        tracing::warn!(
                            reason = refusal.as_str(),
                            open = admission.open(),
                            max = admission.max(),
                            suppressed,
                            "socket limit reached: closing new sockets",
                        );
                    }
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(connection(
                stream,
                permit,
                router.clone(),
                builder.clone(),
                graceful.watcher(),
                hub.shutdown_token(),
            ));
        }
        drop(listener);
        tracing::info!("shutting down: ending streams and flushing the log");
        hub.shutdown().await?;
        // hyper's connections, then the upgraded WebSockets and streams it no longer tracks: each writes its
        // close frame or end of stream before the process may exit.
        let drained = async {
            graceful.shutdown().await;
            hub.connections_closed().await;
        };
        if tokio::time::timeout(shutdown_timeout, drained)
            .await
            .is_err()
        {
            tracing::warn!(
                open = hub.connection_count(),
                "connections still open after {shutdown_timeout:?}; cutting them"
            );
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// As many pending connections as the kernel allows (it caps the backlog at `net.core.somaxconn`), as Go
/// does. tokio's `TcpListener::bind` asks for 128: a burst of connections (a reconnect storm after a
/// restart, or a flood of attack sockets) overflows that before the accept loop drains it, and the kernel
/// then drops the handshakes that come next, real clients' included, which retry only after a second or
/// more.
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds `addr` like `TcpListener::bind` (with `SO_REUSEADDR` where it is safe), with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As mio does: on Windows this would allow another process to take over the port.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// hyper, with the deadlines that keep silent peers from holding sockets: an HTTP/1 connection must send
/// each request head within `header_read_timeout` (hyper's timer also runs while a keep-alive connection
/// waits for its next request). HTTP/2 has no such deadline (a connection may idle between streams), so a
/// connection quiet for that long is pinged and closed if the answer does not come within it again: that
/// is what frees the socket of a dead or silent peer.
fn hyper_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(header_read_timeout)
        .keep_alive_timeout(header_read_timeout);
    builder
}

/// One client connection, until it ends or the hub pulls its kill switch. Every request it serves carries
/// the [`ConnKill`] and the peer's address as axum's `ConnectInfo<SocketAddr>` extension (what
/// `into_make_service_with_connect_info` would set), which the transports record for listings. Requests that subscribe are served
/// the lean way ([`lean`]); from the first one that is not, the connection is hyper's. `permit` is the
/// socket's place under the socket limit; it goes wherever the socket goes.
///
/// Every byte of this future is paid by every idle subscriber (measured with `-Zprint-type-sizes`: 1000
/// bytes, a 1152-byte task): hyper's part is boxed and only built when needed, and the kill switch is
/// awaited here, around a future built here, not around a moved one (which would be stored twice).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of the arguments it moves"
)]
fn connection(
    mut stream: TcpStream,
    permit: Permit,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    closing: CancellationToken,
) -> impl Future<Output = ()> + Send {
    // Not an `async fn`: that would keep a second copy of every argument it moves (an `async move` block
    // uses its captures in place), and this future is as large as an idle subscriber's task.
    async move {
        let kill = ConnKill(CancellationToken::new());
        let killed = kill.0.clone();
        // Two phases, each awaited next to the kill switch, rather than one inner async block holding both:
        // that block would keep its own copy of `permit` and of everything else it moves.
        let header_timeout = permit.header_read_timeout();
        let outcome = tokio::select! {
            o = lean::serve(&mut stream, &router, &kill, &closing, header_timeout) => o,
            () = killed.cancelled() => return tracing::debug!("connection killed by the hub"),
        };
        let prefix = match outcome {
            lean::Outcome::Hyper(prefix) => prefix,
            lean::Outcome::Close => return,
            lean::Outcome::TimedOut => return Refusal::Timeout.count(),
        };
        let io = lean::Prefixed::new(prefix, stream, permit);
        let conn = hyper_connection(io, router, &builder, watcher, kill.clone());
        tokio::select! {
            r = conn => if let Err(e) = r {
                if is_timeout(&*e) {
                    Refusal::Timeout.count();
                }
                tracing::debug!(error = %e, "connection ended with an error");
            },
            () = killed.cancelled() => tracing::debug!("connection killed by the hub"),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's header-read deadline ended the connection (HTTP/1: no request head in time, first or keep-alive).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// hyper serving the rest of a connection (HTTP/1 with upgrades, or HTTP/2), with the bytes lean read first.
fn hyper_connection(
    io: lean::Prefixed,
    router: Router,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    kill: ConnKill,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>> {
    let peer = io.peer_addr().ok();
    let svc = router.map_request(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(kill.clone());
        if let Some(peer) = peer {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        req
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc))
        .into_owned();
    Box::pin(watcher.watch(conn))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
