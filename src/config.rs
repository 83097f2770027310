//! Configuration: defaults, then a TOML file, then `HERALD_*` environment variables, then command-line
//! flags; the later source wins. Everything a flag or variable can set is a dotted key of the file
//! (`HERALD_CORS__ALLOWED_ORIGINS` is `cors.allowed_origins`), so the three sources cannot drift apart.
//!
//! The config is validated as a whole at start-up: a deployment that browsers would silently break (CORS `*`
//! with credentials) or that cannot verify tokens is refused with a message saying what to change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The secret used when none is configured. It is Mercure's well-known development key, so tokens from
/// Mercure tutorials work against a fresh Herald; start-up warns loudly while it is in use.
pub const DEV_JWT_KEY: &str = "!ChangeThisMercureHubJWTSecretKey!";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file does not parse or holds a wrong key or value; the message has the line and the key.
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// A `HERALD_*` variable's value does not fit its setting.
    #[error("environment variable {var} (the setting {key}): {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
    /// A command-line setting's value does not fit it.
    #[error("setting {key} (from the command line): {message}")]
    Flag { key: String, message: String },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Where the default SQLite log lives (`<data_dir>/herald.sqlite3`).
    pub data_dir: PathBuf,
    /// How long shutdown waits for connections to close before cutting them.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub log: LogConfig,
    /// Where publications are stored and how they reach the other nodes of a cluster.
    pub engine: EngineConfig,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    pub mercure: MercureConfig,
    pub centrifugo: CentrifugoConfig,
    pub limits: LimitsConfig,
    /// History kept per channel; the first rule whose `pattern` (a topic selector) matches applies.
    pub retention: Vec<RetentionConfig>,
    /// The web console at `/` and its API under `/console/api/`.
    pub console: ConsoleConfig,
    /// The notification centre: a durable inbox per user (`src/inbox/`).
    pub inbox: InboxConfig,
    /// Yjs documents over the y-websocket protocol at `/yjs/<document>`.
    pub yjs: YjsConfig,
}

/// The notification centre. Off by default. On the local engine it keeps an SQLite file of its own beside
/// the log; on the Redis engine it lives in the engine's Redis, on the NATS engine in JetStream (a KV
/// bucket and a stream), shared by every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    pub enabled: bool,
    /// The inbox database (`<data_dir>/inbox.sqlite3` when not set); local engine only.
    pub path: Option<PathBuf>,
    /// Cluster engines: on Redis the prefix of the inbox's keys (`<engine.prefix>:inbox` when not set); on
    /// NATS the stem of its bucket and stream names (`<engine.prefix>-inbox`).
    pub prefix: Option<String>,
    /// The namespace of the users' inbox channels (`<namespace>:#<user>`); created with the rules an
    /// inbox needs (a user reads only their own, clients never publish) unless configured.
    pub namespace: String,
    /// Items kept per inbox; a new item beyond it removes the oldest.
    pub max_items: usize,
    /// Items older than this are removed (as are items past their own expiry).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Ids in one update or remove.
    pub max_ids: usize,
    /// Users in one `notify`.
    pub max_users: usize,
    /// Changes one user may make per second through the browser API (a burst of twice as many is let
    /// through); over it, 429 with Retry-After.
    pub user_rate: u32,
    /// The start-up check of the counts (SQLite, in the background while Herald serves): most inboxes
    /// recounted in one read transaction.
    pub check_batch: usize,
    /// A pause before each batch of the start-up check (none by default): spreads the check out, leaving
    /// the disk and the cores to requests.
    #[serde(with = "humantime_serde")]
    pub check_pause: Duration,
    /// Web Push to users with no open connection (`[inbox.push]`).
    pub push: PushConfig,
}

/// Web Push (RFC 8030, payloads encrypted per RFC 8291, VAPID per RFC 8292). Off by default: it sends
/// users' notifications to third-party push services, which an operator turns on knowingly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    pub enabled: bool,
    /// The subscriptions database (`<data_dir>/push.sqlite3` when not set).
    pub path: Option<PathBuf>,
    /// The VAPID private key, a P-256 key in PEM (`<data_dir>/vapid.pem` when not set); generated with
    /// mode 0600 on first start. Changing it invalidates every subscription browsers made.
    pub vapid_key: Option<PathBuf>,
    /// The VAPID `sub` claim: how a push service reaches the operator (`mailto:` or `https:`).
    pub subject: String,
    /// How long a push service keeps a message for an offline device.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The `Urgency` header: `very-low`, `low`, `normal` or `high`.
    pub urgency: String,
    /// Pushes pending (recorded in the push store, not yet sent or given up); beyond it a push is
    /// dropped (and counted), never waited for.
    pub queue: usize,
    /// Tasks sending pushes concurrently.
    pub workers: usize,
    /// Subscriptions (devices) kept per user; a new one beyond it replaces the oldest.
    pub max_subscriptions: usize,
    /// Retries of a push answered 429 or 5xx (or not answered).
    pub retries: u32,
    /// The first wait before a retry when the push service sent no `Retry-After`; doubled each time.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// One request to a push service, connection included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Accept `http://` endpoints on loopback hosts (tests with a local mock push service only).
    pub allow_insecure_endpoints: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: false,
            path: None,
            vapid_key: None,
            subject: String::new(),
            ttl: Duration::from_secs(24 * 3600),
            urgency: "normal".into(),
            queue: 10_000,
            workers: 4,
            max_subscriptions: 10,
            retries: 3,
            retry_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            allow_insecure_endpoints: false,
        }
    }
}

impl PushConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.subject.starts_with("mailto:") || self.subject.starts_with("https://"))
            || self.subject.len() < 10
        {
            return bad(format!(
                "inbox.push.subject = {:?} must be a contact for the push services, \
                 \"mailto:you@example.com\" or \"https://example.com/contact\" (RFC 8292)",
                self.subject
            ));
        }
        if !["very-low", "low", "normal", "high"].contains(&self.urgency.as_str()) {
            return bad(format!(
                "inbox.push.urgency = {:?} must be very-low, low, normal or high",
                self.urgency
            ));
        }
        if self.ttl > Duration::from_secs(28 * 24 * 3600) {
            return bad("inbox.push.ttl must be at most 28 days".into());
        }
        if self.queue == 0 || self.workers == 0 || self.workers > 256 || self.max_subscriptions == 0
        {
            return bad(
                "inbox.push.queue and max_subscriptions must be at least 1, workers 1 to 256"
                    .into(),
            );
        }
        if self.retries > 10 || self.timeout.is_zero() {
            return bad("inbox.push.retries must be at most 10 and timeout above 0".into());
        }
        Ok(())
    }
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            enabled: false,
            path: None,
            prefix: None,
            namespace: "inbox".into(),
            max_items: 10_000,
            max_age: Duration::from_secs(90 * 24 * 3600),
            max_ids: 500,
            max_users: 1000,
            user_rate: 20,
            check_batch: 1000,
            check_pause: Duration::ZERO,
            push: PushConfig::default(),
        }
    }
}

/// Who may open a document without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousDocs {
    /// A token is required.
    None,
    /// Anyone may read every document; editing needs a token.
    Read,
    /// Anyone may read and edit every document (demos, trusted networks).
    Write,
}

/// Yjs documents: the y-websocket endpoint, its limits and its background work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct YjsConfig {
    /// Serve `/yjs/<document>` and the document API.
    pub enabled: bool,
    /// What a connection without a token may do.
    pub anonymous: AnonymousDocs,
    /// Largest update (or awareness message) one client may send, in bytes; larger ones close the
    /// connection (1009) and are not stored.
    pub max_update_size: usize,
    /// Largest document, in bytes of stored updates (the compacted state plus the updates after it); an
    /// update that would make it larger is refused.
    pub max_document_size: usize,
    /// Documents held in memory at once on this node; idle ones are unloaded to make room, and a new one
    /// is refused (close 1013) when none is idle.
    pub max_documents: usize,
    /// How long a document with no connection stays in memory.
    #[serde(with = "humantime_serde")]
    pub idle_unload: Duration,
    /// Stored updates after which a loaded document is compacted (merged into one snapshot).
    pub compact_after: u64,
    /// The channel document events (`changed`, `idle`) are published on, as private publications; empty:
    /// none are published.
    pub events_channel: String,
    /// At most one point-in-time snapshot per document per this interval while it changes (plus one
    /// when it goes idle with changes not in a snapshot yet); zero: none taken automatically (the API
    /// still takes them).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// Point-in-time snapshots kept per document; the oldest go when a new one is taken.
    pub snapshot_keep: usize,
    /// Snapshots older than this are no longer listed and are removed with the next one taken; zero: no
    /// age limit.
    #[serde(with = "humantime_serde")]
    pub snapshot_max_age: Duration,
    /// Under sustained edits, a document relays what it received at most once per this interval, as one
    /// merged update per client (the first edit after a quiet interval goes at once); zero (the default):
    /// every batch the engine delivers is relayed as it comes. Off by default until measured to help: on a
    /// loaded 2-core machine it helped at 100 clients of a document and hurt at 500 (docs/BENCHMARKS.md).
    #[serde(with = "humantime_serde")]
    pub relay_interval: Duration,
}

impl Default for YjsConfig {
    fn default() -> Self {
        YjsConfig {
            enabled: true,
            anonymous: AnonymousDocs::None,
            max_update_size: 1024 * 1024,
            max_document_size: 32 * 1024 * 1024,
            max_documents: 1000,
            idle_unload: Duration::from_secs(30),
            compact_after: 500,
            events_channel: "yjs-events".into(),
            snapshot_interval: Duration::from_secs(10 * 60),
            snapshot_keep: 50,
            snapshot_max_age: Duration::from_secs(30 * 24 * 3600),
            relay_interval: Duration::ZERO,
        }
    }
}

/// The web console: who may use it. Like Centrifugo's admin: a password, exchanged at login for a
/// short-lived admin token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console. Not set: on when `listen` is a loopback address, off otherwise.
    pub enabled: Option<bool>,
    /// The admin password (the password itself, `env:VAR` or `file:/path`). Without one the console needs
    /// no login, which is allowed only on a loopback address.
    pub password: Option<String>,
    /// Key that signs admin tokens (a secret, `env:VAR` or `file:/path`). Not set: a random key made at
    /// start-up, so tokens end with the process.
    pub admin_jwt_key: Option<String>,
    /// How long an admin token lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: None,
            password: None,
            admin_jwt_key: None,
            session_ttl: Duration::from_secs(8 * 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    Sqlite,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// This node only: the `[log]` backend (SQLite or memory) on this machine.
    Local,
    /// Several nodes on one Redis (`engine.url`): history, positions, presence and the feed are shared.
    Redis,
    /// A cluster on NATS JetStream (`engine.url`): every node shares history, presence and delivery.
    Nats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub kind: EngineKind,
    /// The cluster engine's server(s), e.g. `redis://127.0.0.1:6379` or `nats://127.0.0.1:4222`.
    pub url: String,
    /// Prefix of every key, stream and subject Herald uses, so several clusters can share one server.
    pub prefix: String,
    /// How long start-up waits for the engine before giving up with a clear message.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one engine operation (a publish, a read) may take before it fails.
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// How long a node's presence entries live without being refreshed (a node that dies takes its
    /// clients out of presence after this).
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Local,
            url: String::new(),
            prefix: "herald".into(),
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub backend: LogBackend,
    /// SQLite file; defaults to `<data_dir>/herald.sqlite3`.
    pub path: Option<PathBuf>,
    /// `true`: a publish is acknowledged after its commit reached the disk (fsync). `false`: after the commit
    /// reached the OS (survives a Herald crash, not a power loss), which is much faster.
    pub durable: bool,
    /// Most publications per commit.
    pub max_batch: usize,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Key for both publishers and subscribers unless the specific ones are set. A literal secret, `env:VAR`,
    /// `file:/path/key.pem`, or PEM text.
    pub jwt_key: Option<String>,
    /// HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA.
    pub jwt_alg: String,
    pub publisher_jwt_key: Option<String>,
    pub publisher_jwt_alg: Option<String>,
    pub subscriber_jwt_key: Option<String>,
    pub subscriber_jwt_alg: Option<String>,
    /// Let subscribers without a token receive public updates.
    pub allow_anonymous: bool,
    pub cookie_name: String,
    /// Origins a cookie-authenticated publish may come from (CSRF protection); `*` allows any.
    pub publish_origins: Vec<String>,
    /// Serve with the public development key on a non-loopback address anyway. Off: `herald serve` refuses,
    /// because anyone who has read the docs can mint tokens for that key.
    pub allow_dev_key: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), wildcard subdomains (`https://*.example.com`), any port
    /// (`http://localhost:*`), or `*` (only without credentials).
    pub allowed_origins: Vec<String>,
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MercureConfig {
    /// Comment sent on idle streams so proxies and load balancers do not cut them; `0s` disables.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Publish active-subscription events and serve the subscriptions API.
    pub subscriptions: bool,
    /// Records read from the log per step of a replay.
    pub history_page: usize,
}

/// The WebSocket endpoint speaking the Centrifugo client protocol, and its server API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CentrifugoConfig {
    /// Interval of server pings (`{}`); the client must answer within `pong_timeout`. Both are checked on a
    /// shared 250 ms tick, so they are kept to that granularity.
    #[serde(with = "humantime_serde")]
    pub ping: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// A connection that has not sent `connect` by then is closed (3502 stale).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long after a token's `exp` a connection may still send `refresh` before it is closed.
    #[serde(with = "humantime_serde")]
    pub refresh_grace: Duration,
    pub max_channels_per_connection: usize,
    /// Largest inbound frame, in bytes; larger ones close the connection with 1009.
    pub max_message_size: usize,
    /// Commands per second a connection may send (token bucket of `command_burst`).
    pub command_rate: u32,
    pub command_burst: u32,
    /// Most publications returned by one recovery; a larger gap answers `recovered: false`.
    pub recovery_max_publications: usize,
    /// Namespace of personal channels (`<ns>:#<user>`, readable only by that user); it exists even when
    /// not configured. Empty disables.
    pub personal_namespace: String,
    /// Subscribe every authenticated connection to its user's personal channel at connect (Centrifugo's
    /// `user_subscribe_to_personal`). Off by default, as there.
    pub subscribe_to_personal: bool,
    /// Key for the server API (`X-API-Key` or `Authorization: apikey KEY`); the API is off without one.
    pub api_key: Option<String>,
    /// Channel namespaces (`ns:channel`); `name = ""` sets the options of channels without a namespace.
    pub namespaces: Vec<NamespaceConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscribePolicy {
    /// Any connection, anonymous ones included.
    Public,
    /// Connections with a user.
    Authenticated,
    /// Only with a subscription token for the channel.
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishPolicy {
    /// Clients never publish; only the server API and Mercure publishers do.
    None,
    /// Clients subscribed to the channel may publish into it.
    Subscribers,
    /// Any connected client may publish.
    Any,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    pub subscribe: SubscribePolicy,
    pub publish: PublishPolicy,
    pub presence: bool,
    /// Join/leave are generated for this namespace's channels; they reach the subscribers that asked for
    /// them (the SDK's `joinLeave` option) unless `force_push_join_leave`.
    pub join_leave: bool,
    /// Push join/leave to every subscriber, whether it asked or not.
    pub force_push_join_leave: bool,
    /// Clients may call `history` on channels they are subscribed to.
    pub history: bool,
    /// Subscriptions are recoverable (offset + epoch).
    pub recovery: bool,
    /// History kept per channel of this namespace (adds a retention rule before the global ones).
    pub history_size: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub history_ttl: Option<Duration>,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            name: String::new(),
            subscribe: SubscribePolicy::Public,
            publish: PublishPolicy::None,
            presence: true,
            join_leave: false,
            force_push_join_leave: false,
            history: true,
            recovery: true,
            history_size: None,
            history_ttl: None,
        }
    }
}

impl Default for CentrifugoConfig {
    fn default() -> Self {
        CentrifugoConfig {
            ping: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            connect_timeout: Duration::from_secs(10),
            refresh_grace: Duration::from_secs(25),
            max_channels_per_connection: 128,
            max_message_size: 64 * 1024,
            command_rate: 100,
            command_burst: 200,
            recovery_max_publications: 300,
            personal_namespace: "personal".into(),
            subscribe_to_personal: false,
            api_key: None,
            namespaces: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_topics_per_subscription: usize,
    /// Total bytes of the topic selectors of one subscription.
    pub max_selector_bytes: usize,
    /// URI template expressions (`{…}`) in the selectors of one subscription: each costs memory when
    /// compiled, so an unbounded count lets one request take megabytes.
    pub max_template_expressions: usize,
    /// Largest `data` accepted, in bytes.
    pub max_message_size: usize,
    /// Publications queued for one subscriber before it is disconnected as too slow.
    pub outbox_capacity: usize,
    /// Time a connection has to send a whole request head, counted from when it opened or its previous
    /// response ended, so that trickling bytes cannot extend it. A socket that sends nothing, part of a
    /// request, or nothing more after a response holds a file descriptor; without this deadline a few
    /// thousand of them (slowloris) exhaust the process's descriptors.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Accepted sockets open at once, whatever they are doing (streams, requests, idle keep-alive, not yet
    /// read); a socket over it is closed as soon as it is accepted. `0`: `max_connections + 1024`. Always
    /// kept below the open-file limit, so that accepting never fails for want of descriptors.
    pub max_sockets: usize,
    /// Accepted sockets open at once from one IP address; `0`: no per-address limit. Off by default because
    /// clients behind one NAT or proxy share an address.
    pub max_sockets_per_ip: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub pattern: String,
    pub max_count: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("herald-data"),
            shutdown_timeout: Duration::from_secs(10),
            log: LogConfig::default(),
            engine: EngineConfig::default(),
            auth: AuthConfig::default(),
            cors: CorsConfig::default(),
            mercure: MercureConfig::default(),
            centrifugo: CentrifugoConfig::default(),
            limits: LimitsConfig::default(),
            retention: vec![RetentionConfig {
                pattern: "*".into(),
                max_count: Some(1000),
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            }],
            console: ConsoleConfig::default(),
            inbox: InboxConfig::default(),
            yjs: YjsConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: LogBackend::Sqlite,
            path: None,
            durable: true,
            max_batch: 512,
            prune_interval: Duration::from_secs(60),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_key: None,
            jwt_alg: "HS256".into(),
            publisher_jwt_key: None,
            publisher_jwt_alg: None,
            subscriber_jwt_key: None,
            subscriber_jwt_alg: None,
            allow_anonymous: false,
            cookie_name: "mercureAuthorization".into(),
            publish_origins: Vec::new(),
            allow_dev_key: false,
        }
    }
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allow_credentials: true,
            max_age: Duration::from_secs(600),
        }
    }
}

impl Default for MercureConfig {
    fn default() -> Self {
        MercureConfig {
            heartbeat: Duration::from_secs(25),
            subscriptions: false,
            history_page: 500,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_topics_per_subscription: 64,
            max_selector_bytes: 16 * 1024,
            max_template_expressions: 16,
            max_message_size: 64 * 1024,
            outbox_capacity: 1000,
            header_read_timeout: Duration::from_secs(10),
            max_sockets: 0,
            max_sockets_per_ip: 0,
        }
    }
}

impl Config {
    /// Builds the effective config. `file` is read if given (or named by `HERALD_CONFIG`), then every
    /// `HERALD_*` variable of `env`, then `overrides` (`key=value` pairs from flags) are applied.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let env_file = env
            .iter()
            .find(|(k, _)| k == "HERALD_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        let file = file.map(Path::to_path_buf).or(env_file);
        let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
        let mut table = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                // Parsed whole first, so a wrong key or value is reported with its line and column.
                toml::from_str::<Config>(&text).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    message: e.to_string().trim_end().to_string(),
                })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                    path: path.clone(),
                    message: e.to_string().trim_end().to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        // Each variable and flag is checked as it is applied, so an error names the one at fault.
        for (name, value) in &env {
            if let Some(key) = env_key(name) {
                set_key(&mut table, &key, value, &defaults)
                    .and_then(|()| check(&table))
                    .map_err(|message| ConfigError::Env {
                        var: name.clone(),
                        key: key.clone(),
                        message,
                    })?;
            }
        }
        for (key, value) in overrides {
            set_key(&mut table, key, value, &defaults)
                .and_then(|()| check(&table))
                .map_err(|message| ConfigError::Flag {
                    key: key.clone(),
                    message,
                })?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if self.cors.allow_credentials && self.cors.allowed_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::Invalid(
                "cors.allowed_origins contains \"*\" while cors.allow_credentials is true: browsers \
                 refuse credentialed responses for a wildcard origin. List the origins (wildcard \
                 subdomains like https://*.example.com are fine) or set cors.allow_credentials = false"
                    .into(),
            ));
        }
        for o in self
            .cors
            .allowed_origins
            .iter()
            .chain(&self.auth.publish_origins)
        {
            crate::cors::OriginPattern::parse(o).map_err(ConfigError::Invalid)?;
        }
        if self.limits.outbox_capacity == 0 || self.limits.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.outbox_capacity and limits.max_connections must be at least 1".into(),
            ));
        }
        if self.limits.header_read_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "limits.header_read_timeout must be more than 0s: every connection would be closed \
                 before its first request"
                    .into(),
            ));
        }
        if self.engine.kind == EngineKind::Nats && self.engine.url.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "engine.kind = \"nats\" needs engine.url, e.g. \"nats://127.0.0.1:4222\"".into(),
            ));
        }
        crate::auth::Auth::from_config(&self.auth)
            .and_then(|a| a.with_api_key(self.centrifugo.api_key.as_deref()))
            .map_err(ConfigError::Invalid)?;
        self.console_password()?;
        if self.console_enabled() && self.console.password.is_none() {
            let addr = self.listen_addr()?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "console.enabled = true on {addr}, which is not a loopback address, needs \
                     console.password (e.g. HERALD_CONSOLE__PASSWORD=env:MY_ADMIN_PASSWORD): without one \
                     anyone who reaches the server could administer it. Set a password, or turn the \
                     console off (console.enabled = false)"
                )));
            }
        }
        if self.inbox.enabled {
            if let Some(p) = &self.inbox.prefix {
                let nats_name = p.len() <= 48
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if self.engine.kind == EngineKind::Nats && !nats_name {
                    return Err(ConfigError::Invalid(format!(
                        "inbox.prefix = {p:?} names NATS buckets and streams on the NATS engine: use 1 to \
                         48 letters, digits, '-' or '_'"
                    )));
                }
                if p.is_empty() || p.chars().any(char::is_control) {
                    return Err(ConfigError::Invalid(format!(
                        "inbox.prefix = {p:?} must be a non-empty name without control characters"
                    )));
                }
            }
            let ns = &self.inbox.namespace;
            if ns.is_empty() || ns.contains([':', '#', '$']) || ns.chars().any(char::is_control) {
                return Err(ConfigError::Invalid(format!(
                    "inbox.namespace = {ns:?} must be a non-empty name without ':', '#' or '$'"
                )));
            }
            if self.inbox.max_items == 0
                || self.inbox.max_ids == 0
                || self.inbox.max_users == 0
                || self.inbox.user_rate == 0
            {
                return Err(ConfigError::Invalid(
                    "inbox.max_items, max_ids, max_users and user_rate must be at least 1".into(),
                ));
            }
            if self.inbox.push.enabled {
                // The engine needs no check of its own: on Redis and NATS the subscriptions and the
                // VAPID key are shared through the engine's server.
                self.inbox.push.validate()?;
            }
        } else if self.inbox.push.enabled {
            return Err(ConfigError::Invalid(
                "inbox.push.enabled = true needs inbox.enabled = true: pushes carry inbox notifications"
                    .into(),
            ));
        }
        if self.yjs.max_documents == 0 || self.yjs.max_update_size == 0 {
            return Err(ConfigError::Invalid(
                "yjs.max_documents and yjs.max_update_size must be at least 1".into(),
            ));
        }
        if self.yjs.snapshot_keep == 0 {
            return Err(ConfigError::Invalid(
                "yjs.snapshot_keep must be at least 1 (set yjs.snapshot_interval = \"0s\" to take none automatically)".into(),
            ));
        }
        if self.yjs.relay_interval > Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "yjs.relay_interval must be at most 1s (it delays what clients see under sustained edits)"
                    .into(),
            ));
        }
        if self.yjs.max_document_size < self.yjs.max_update_size {
            return Err(ConfigError::Invalid(
                "yjs.max_document_size must be at least yjs.max_update_size".into(),
            ));
        }
        if crate::access::is_reserved(&self.yjs.events_channel) {
            return Err(ConfigError::Invalid(
                "yjs.events_channel must not start with $ (those channels are Herald's own)".into(),
            ));
        }
        if self.console.session_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "console.session_ttl must be more than 0s".into(),
            ));
        }
        Ok(())
    }

    /// Whether the console is served: as configured, else on a loopback address only.
    pub fn console_enabled(&self) -> bool {
        self.console
            .enabled
            .unwrap_or_else(|| self.listen_addr().is_ok_and(|a| a.ip().is_loopback()))
    }

    /// The console password, resolved (`env:`/`file:`; a file loses its trailing line break); `None` when
    /// none is set. An empty password is refused.
    pub fn console_password(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(spec) = self.console.password.as_deref() else {
            return Ok(None);
        };
        let mut pw = crate::auth::resolve_key_material(spec)
            .map_err(|e| ConfigError::Invalid(format!("console.password: {e}")))?;
        if spec.starts_with("file:") {
            while pw.last().is_some_and(|b| b.is_ascii_whitespace()) {
                pw.pop();
            }
        }
        if pw.is_empty() {
            return Err(ConfigError::Invalid("console.password is empty".into()));
        }
        Ok(Some(pw))
    }

    /// The address to listen on: an IP and port, or a host name and port (`localhost:8083`) resolved here.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        use std::net::ToSocketAddrs;
        if let Ok(addr) = self.listen.parse() {
            return Ok(addr);
        }
        let invalid = |why: String| {
            ConfigError::Invalid(format!(
                "listen = {:?} is not an address: {why} (use host:port, e.g. 127.0.0.1:8080 or \
                 localhost:8080)",
                self.listen
            ))
        };
        let mut addrs = self
            .listen
            .to_socket_addrs()
            .map_err(|e| invalid(e.to_string()))?
            .collect::<Vec<_>>();
        // localhost resolves to ::1 and 127.0.0.1: take IPv4 first, as clients most often try it.
        addrs.sort_by_key(|a| !a.is_ipv4());
        addrs
            .into_iter()
            .next()
            .ok_or_else(|| invalid("it resolves to no address".into()))
    }

    /// Where history goes, in words, for the start-up log.
    pub fn history_location(&self) -> String {
        match (self.engine.kind, self.log.backend) {
            (EngineKind::Local, LogBackend::Memory) => "memory only (lost on restart)".into(),
            (EngineKind::Local, LogBackend::Sqlite) => {
                let path = self.log_path();
                let shown = std::path::absolute(&path).unwrap_or(path);
                format!("{} (SQLite)", shown.display())
            }
            (EngineKind::Redis, _) => format!(
                "Redis at {} (keys {}:*), shared by every node",
                redact_url(&self.engine.url),
                self.engine.prefix
            ),
            (EngineKind::Nats, _) => format!(
                "NATS JetStream at {} (stream {}-log), shared by every node",
                redact_url(&self.engine.url),
                self.engine.prefix
            ),
        }
    }

    /// The stem of the inbox's bucket and stream names on the NATS engine (`inbox.prefix`, or
    /// `<engine.prefix>-inbox`).
    pub fn inbox_stem(&self) -> String {
        self.inbox
            .prefix
            .clone()
            .unwrap_or_else(|| format!("{}-inbox", self.engine.prefix))
    }

    /// The prefix of the inbox's keys on the Redis engine.
    pub fn inbox_prefix(&self) -> String {
        self.inbox.prefix.clone().unwrap_or_else(|| {
            if self.engine.prefix.is_empty() {
                "inbox".into()
            } else {
                format!("{}:inbox", self.engine.prefix)
            }
        })
    }

    pub fn inbox_path(&self) -> PathBuf {
        self.inbox
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("inbox.sqlite3"))
    }

    pub fn push_path(&self) -> PathBuf {
        self.inbox
            .push
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("push.sqlite3"))
    }

    pub fn vapid_key_path(&self) -> PathBuf {
        self.inbox
            .push
            .vapid_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("vapid.pem"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.log
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("herald.sqlite3"))
    }

    /// True when no key was configured and the public development key is in use.
    pub fn uses_dev_key(&self) -> bool {
        let a = &self.auth;
        a.jwt_key.is_none() && (a.publisher_jwt_key.is_none() || a.subscriber_jwt_key.is_none())
    }

    /// Where each configured secret comes from, one comment line each, for `herald config`: every secret
    /// setting accepts `env:VAR` and `file:/path`, and a missing variable or file is what people get wrong.
    pub fn secret_sources(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, v) in [
            ("auth.jwt_key", &self.auth.jwt_key),
            ("auth.publisher_jwt_key", &self.auth.publisher_jwt_key),
            ("auth.subscriber_jwt_key", &self.auth.subscriber_jwt_key),
            ("centrifugo.api_key", &self.centrifugo.api_key),
            ("console.password", &self.console.password),
            ("console.admin_jwt_key", &self.console.admin_jwt_key),
        ] {
            let Some(v) = v else { continue };
            let state = if let Some(var) = v.strip_prefix("env:") {
                match std::env::var_os(var) {
                    Some(_) => format!("read from the environment variable {var} (set)"),
                    None => format!("read from the environment variable {var}, which is NOT set"),
                }
            } else if let Some(path) = v.strip_prefix("file:") {
                match std::fs::metadata(path) {
                    Ok(_) => format!("read from the file {path}"),
                    Err(e) => format!("read from the file {path}, which cannot be read: {e}"),
                }
            } else {
                "given inline (env:VAR and file:/path are also accepted)".to_string()
            };
            out.push(format!("# {key}: {state}"));
        }
        if self.uses_dev_key() {
            out.push(format!(
                "# the public development JWT key {DEV_JWT_KEY:?} is in use: anyone can mint tokens for it"
            ));
        }
        out
    }

    /// The config as TOML with secrets masked, for `herald config`.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        for v in [
            &mut c.centrifugo.api_key,
            &mut c.auth.jwt_key,
            &mut c.auth.publisher_jwt_key,
            &mut c.auth.subscriber_jwt_key,
            &mut c.console.password,
            &mut c.console.admin_jwt_key,
        ]
        .into_iter()
        .flatten()
        {
            if !v.starts_with("env:") && !v.starts_with("file:") {
                *v = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// `url` without its password, for logs.
fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        _ => url.to_string(),
    }
}

/// `HERALD_CORS__ALLOWED_ORIGINS` -> `cors.allowed_origins`; a few short aliases for the common ones.
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("HERALD_")?;
    let alias = match rest {
        "CONFIG" => return None,
        "JWT_KEY" => "auth.jwt_key",
        "PUBLISHER_JWT_KEY" => "auth.publisher_jwt_key",
        "SUBSCRIBER_JWT_KEY" => "auth.subscriber_jwt_key",
        "ALLOW_ANONYMOUS" => "auth.allow_anonymous",
        "CORS_ORIGINS" => "cors.allowed_origins",
        "PUBLISH_ORIGINS" => "auth.publish_origins",
        _ => "",
    };
    if !alias.is_empty() {
        return Some(alias.to_string());
    }
    let key = rest.to_ascii_lowercase().replace("__", ".");
    // Only variables naming a real setting are config: other HERALD_* variables (a test harness's
    // HERALD_BIN, the HERALD_LOG_LEVEL filter) must not break start-up.
    let top = key.split('.').next().unwrap_or("");
    TOP_LEVEL_KEYS.contains(&top).then_some(key)
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "shutdown_timeout",
    "log",
    "engine",
    "auth",
    "cors",
    "mercure",
    "centrifugo",
    "limits",
    "retention",
    "console",
    "inbox",
    "yjs",
];

/// Boolean settings that are unset by default (so the defaults cannot tell they are booleans).
const OPTIONAL_BOOLS: &[&str] = &["console.enabled"];

/// Whether the table converts to a `Config`; the message says why not.
fn check(table: &toml::Table) -> Result<(), String> {
    toml::Value::Table(table.clone())
        .try_into::<Config>()
        .map(|_| ())
        .map_err(|e| e.message().to_string())
}

/// The default value at a dotted key, if the key is a setting with a plain value.
fn default_at<'a>(defaults: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut cur = defaults.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_table()?.get(p)?;
    }
    Some(cur)
}

/// Sets a dotted key. The value is read as a TOML literal when it is one (`true`, `25`, `["a","b"]`),
/// otherwise as a string; a comma list is accepted for the `*origins` lists; a boolean setting also
/// takes `1`/`0`, `yes`/`no`, `on`/`off`, as environment variables usually spell them.
fn set_key(
    table: &mut toml::Table,
    key: &str,
    raw: &str,
    defaults: &toml::Table,
) -> Result<(), String> {
    let boolean = matches!(default_at(defaults, key), Some(toml::Value::Boolean(_)))
        || OPTIONAL_BOOLS.contains(&key);
    let lenient_bool = match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "on" | "true" => Some(true),
        "0" | "no" | "off" | "false" => Some(false),
        _ => None,
    };
    let value = match (boolean, lenient_bool) {
        (true, Some(b)) => toml::Value::Boolean(b),
        _ => match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
            Err(_) => toml::Value::String(raw.into()),
        },
    };
    let value = match value {
        toml::Value::String(s) if key.ends_with("origins") => toml::Value::Array(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        v => v,
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("empty config key in {key:?}"))?;
    let mut cur = table;
    for p in parts {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{key}: {p} is not a section"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\n[mercure]\nheartbeat = \"5s\"\n[auth]\nallow_anonymous = false\n",
        )
        .unwrap();
        let env = vec![
            ("HERALD_LISTEN".to_string(), "127.0.0.1:2".to_string()),
            ("HERALD_ALLOW_ANONYMOUS".to_string(), "true".to_string()),
            (
                "HERALD_CORS_ORIGINS".to_string(),
                "https://a.com, https://*.b.com".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
            ("HERALD_BIN".to_string(), "/somewhere/herald".to_string()),
        ];
        let flags = vec![("listen".to_string(), "127.0.0.1:3".to_string())];
        let c = Config::load(Some(&file), env, &flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3");
        assert!(c.auth.allow_anonymous);
        assert_eq!(c.mercure.heartbeat, Duration::from_secs(5));
        assert_eq!(c.cors.allowed_origins, ["https://a.com", "https://*.b.com"]);
    }

    #[test]
    fn inbox_on_redis_takes_its_prefix_from_the_engine_unless_set() {
        let redis = |extra: &[(&str, &str)]| {
            let mut o: Vec<(String, String)> = vec![
                ("inbox.enabled".into(), "true".into()),
                ("engine.kind".into(), "\"redis\"".into()),
                ("engine.url".into(), "\"redis://127.0.0.1:6379\"".into()),
                ("engine.prefix".into(), "\"app1\"".into()),
            ];
            o.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Config::load(None, vec![], &o)
        };
        assert_eq!(redis(&[]).unwrap().inbox_prefix(), "app1:inbox");
        assert_eq!(
            redis(&[("inbox.prefix", "\"notes\"")])
                .unwrap()
                .inbox_prefix(),
            "notes"
        );
        let err = redis(&[("inbox.prefix", "\"\"")]).unwrap_err().to_string();
        assert!(err.contains("inbox.prefix"), "{err}");
    }

    #[test]
    fn push_is_accepted_on_every_engine_and_its_settings_checked() {
        let mut o: Vec<(String, String)> = vec![
            ("inbox.enabled".into(), "true".into()),
            ("inbox.push.enabled".into(), "true".into()),
            (
                "inbox.push.subject".into(),
                "\"mailto:ops@example.com\"".into(),
            ),
        ];
        assert!(Config::load(None, vec![], &o).is_ok());
        let mut redis = o.clone();
        redis.push(("engine.kind".into(), "\"redis\"".into()));
        let c = Config::load(None, vec![], &redis).expect("push on the Redis engine");
        assert!(c.inbox.push.enabled);
        o.push(("engine.kind".into(), "\"nats\"".into()));
        o.push(("engine.url".into(), "\"nats://127.0.0.1:4222\"".into()));
        let c = Config::load(None, vec![], &o).expect("push on the NATS engine");
        assert!(c.inbox.push.enabled);
        // Push settings are still checked on a cluster engine.
        redis.retain(|(k, _)| k != "inbox.push.subject");
        let err = Config::load(None, vec![], &redis).unwrap_err().to_string();
        assert!(err.contains("inbox.push.subject"), "{err}");
    }

    #[test]
    fn star_with_credentials_is_refused() {
        let err = Config::load(None, vec![], &[("cors.allowed_origins".into(), "*".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_credentials"), "{err}");
        let ok = Config::load(
            None,
            vec![],
            &[
                ("cors.allowed_origins".into(), "*".into()),
                ("cors.allow_credentials".into(), "false".into()),
            ],
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn admission_limits_have_defaults_and_are_validated() {
        let c = Config::load(None, vec![], &[]).unwrap();
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_sockets, 0, "auto");
        assert_eq!(c.limits.max_sockets_per_ip, 0, "off");
        let c = Config::load(
            None,
            vec![],
            &[
                ("limits.header_read_timeout".into(), "1500ms".into()),
                ("limits.max_sockets".into(), "20".into()),
                ("limits.max_sockets_per_ip".into(), "5".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.header_read_timeout, Duration::from_millis(1500));
        assert_eq!((c.limits.max_sockets, c.limits.max_sockets_per_ip), (20, 5));
        let err = Config::load(
            None,
            vec![],
            &[("limits.header_read_timeout".into(), "0s".into())],
        )
        .unwrap_err();
        assert!(err.to_string().contains("header_read_timeout"), "{err}");
        let err =
            Config::load(None, vec![], &[("limits.max_sockets".into(), "-1".into())]).unwrap_err();
        assert!(err.to_string().contains("invalid"), "{err}");
        let err =
            Config::load(None, vec![], &[("limits.max_socket".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("max_socket"), "{err}");
    }

    #[test]
    fn errors_name_their_source_and_booleans_are_lenient() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(&file, "[mercure]\nheartbeat = \"5s\"\nhartbeat = 1\n").unwrap();
        let e = Config::load(Some(&file), vec![], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("h.toml") && e.contains("line 3") && e.contains("hartbeat"),
            "{e}"
        );
        let env = vec![(
            "HERALD_LIMITS__MAX_CONNECTIONS".to_string(),
            "lots".to_string(),
        )];
        let e = Config::load(None, env, &[]).unwrap_err().to_string();
        assert!(
            e.contains("HERALD_LIMITS__MAX_CONNECTIONS") && e.contains("limits.max_connections"),
            "{e}"
        );
        for (raw, want) in [("yes", true), ("1", true), ("off", false), ("0", false)] {
            let env = vec![("HERALD_ALLOW_ANONYMOUS".to_string(), raw.to_string())];
            assert_eq!(
                Config::load(None, env, &[]).unwrap().auth.allow_anonymous,
                want
            );
        }
        let flags = vec![("listen".to_string(), "\"localhost:8083\"".to_string())];
        let c = Config::load(None, vec![], &flags).unwrap();
        let addr = c.listen_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() == 8083, "{addr}");
    }

    #[test]
    fn the_console_is_on_for_loopback_and_needs_a_password_elsewhere() {
        let c = Config::load(None, vec![], &[]).unwrap();
        assert!(c.console_enabled(), "127.0.0.1 by default");
        let c = Config::load(
            None,
            vec![],
            &[("listen".into(), "\"0.0.0.0:8080\"".into())],
        )
        .unwrap();
        assert!(
            !c.console_enabled(),
            "off on a public address unless enabled"
        );
        let env = vec![("HERALD_CONSOLE__ENABLED".to_string(), "yes".to_string())];
        let e = Config::load(None, env, &[("listen".into(), "\"0.0.0.0:8080\"".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("console.password"), "{e}");
        let c = Config::load(
            None,
            vec![],
            &[
                ("listen".into(), "\"0.0.0.0:8080\"".into()),
                ("console.enabled".into(), "true".into()),
                (
                    "console.password".into(),
                    "env:HERALD_TEST_CONSOLE_PW_UNSET".into(),
                ),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(c.contains("HERALD_TEST_CONSOLE_PW_UNSET"), "{c}");
        let c = Config::load(
            None,
            vec![],
            &[
                ("listen".into(), "\"0.0.0.0:8080\"".into()),
                ("console.enabled".into(), "1".into()),
                ("console.password".into(), "pw".into()),
            ],
        )
        .unwrap();
        assert!(c.console_enabled());
        assert_eq!(c.console_password().unwrap().unwrap(), b"pw");
        assert!(c.to_redacted_toml().contains("<redacted>"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err =
            Config::load(None, vec![], &[("mercure.hartbeat".into(), "1s".into())]).unwrap_err();
        assert!(err.to_string().contains("hartbeat"), "{err}");
    }
}
