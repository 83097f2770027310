//! The `herald` command line: `serve`, `publish`, `token`, `config`. Every subcommand reads the same
//! configuration (file, `HERALD_*` variables, flags), so `herald token` signs with the key `herald serve`
//! verifies with, and `herald config` shows exactly what `serve` would use.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::auth::{self, Claims, MercureClaim};
use crate::config::{Config, DEV_JWT_KEY};

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "Real-time messaging server: pushes over SSE (Mercure) and WebSocket (the Centrifugo protocol, \
             JSON and Protobuf), with durable history, JWT auth and CORS",
    after_help = "Examples:\n  herald serve                                  # 127.0.0.1:8080, history in ./herald-data\n  \
                  herald serve --allow-anonymous --cors-origin http://localhost:3000\n  \
                  herald publish --topic news --data '{\"headline\":\"hi\"}'\n  \
                  herald token --sub alice --subscribe 'https://example.com/{x}'\n  \
                  herald config --config herald.toml         # what serve would use\n\n\
                  Docs: docs/USAGE.md (configuration, auth, the two protocols), docs/SECURITY.md."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    #[command(after_help = "Examples:\n  herald serve\n  \
                  herald serve --config herald.toml --listen 0.0.0.0:8080 --jwt-key env:HERALD_SECRET\n  \
                  herald serve --memory --allow-anonymous --cors-origin 'https://*.example.com'\n  \
                  HERALD_LOG_LEVEL=debug herald serve --log-json\n\n\
                  Prints `listening on http://ADDR` on stdout when ready; logs go to stderr.")]
    Serve(ServeArgs),
    /// Publish an update to a running hub (Mercure POST), signing a short-lived publisher token with the
    /// configured key unless --token is given.
    #[command(
        after_help = "Examples:\n  herald publish --topic https://example.com/books/1 --data '{\"title\":\"Dune\"}'\n  \
                  herald publish --url http://hub.internal:8080 --topic news --data hi --private\n  \
                  herald publish --json '{\"topic\":\"news\",\"data\":{\"n\":1}}'"
    )]
    Publish(PublishArgs),
    /// Mint a JWT for development (Mercure and Centrifugo claims), signed with the configured key.
    #[command(
        after_help = "Examples:\n  herald token --publish '*'                       # a publisher token\n  \
                  herald token --sub alice --ttl 15m               # a WebSocket connection token\n  \
                  herald token --subscribe 'https://example.com/{x}' --payload '{\"user\":1}'\n  \
                  herald token --alg RS256 --key file:private.pem --publish '*'"
    )]
    Token(TokenArgs),
    /// Print the effective configuration (secrets masked, where each comes from).
    #[command(
        after_help = "Examples:\n  herald config\n  herald config --config herald.toml --set limits.max_connections=50000"
    )]
    Config(ConfigCmdArgs),
}

/// Where the configuration comes from, for every subcommand. Later wins: built-in defaults, the file,
/// `HERALD_*` variables, flags.
#[derive(Args, Debug, Clone, Default)]
struct Sources {
    /// TOML config file (also HERALD_CONFIG).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Set any config key, as dotted in the file; repeatable (e.g. --set mercure.heartbeat=10s).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    set: Vec<(String, String)>,
    /// JWT key for publishers and subscribers (auth.jwt_key): a secret, env:VAR, file:/path.pem or PEM.
    #[arg(long, value_name = "KEY")]
    jwt_key: Option<String>,
}

/// Server settings: what `serve` runs with, and what `config` shows.
#[derive(Args, Debug, Clone, Default)]
struct ServerFlags {
    /// Address to listen on, host:port (listen; default 127.0.0.1:8080; :0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Directory of the SQLite history (data_dir; default ./herald-data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep history in memory only: lost on restart (log.backend = "memory").
    #[arg(long)]
    memory: bool,
    /// Let clients without a token read public channels (auth.allow_anonymous).
    #[arg(long)]
    allow_anonymous: bool,
    /// Serve with the public development key on a non-loopback address anyway (auth.allow_dev_key).
    #[arg(long)]
    allow_dev_key: bool,
    /// Allow a browser origin for CORS and WebSocket (cors.allowed_origins); repeatable; wildcards like
    /// https://*.example.com and http://localhost:* work.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// The effective config from `sources` and, for `serve` and `config`, the server flags.
fn load(sources: &Sources, server: Option<&ServerFlags>) -> anyhow::Result<Config> {
    let mut o: Vec<(String, String)> = Vec::new();
    if let Some(f) = server {
        if let Some(l) = &f.listen {
            o.push(("listen".into(), format!("{l:?}")));
        }
        if let Some(d) = &f.data_dir {
            o.push(("data_dir".into(), format!("{:?}", d.display().to_string())));
        }
        if f.memory {
            o.push(("log.backend".into(), "\"memory\"".into()));
        }
        if f.allow_anonymous {
            o.push(("auth.allow_anonymous".into(), "true".into()));
        }
        if f.allow_dev_key {
            o.push(("auth.allow_dev_key".into(), "true".into()));
        }
        if !f.cors_origins.is_empty() {
            o.push(("cors.allowed_origins".into(), f.cors_origins.join(",")));
        }
    }
    if let Some(k) = &sources.jwt_key {
        o.push(("auth.jwt_key".into(), format!("{k:?}")));
    }
    o.extend(sources.set.iter().cloned());
    Ok(Config::load(
        sources.config.as_deref(),
        std::env::vars(),
        &o,
    )?)
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    sources: Sources,
    #[command(flatten)]
    server: ServerFlags,
    /// Log as JSON lines instead of text (HERALD_LOG_LEVEL sets the level, e.g. debug).
    #[arg(long)]
    log_json: bool,
}

#[derive(Args, Debug)]
struct ConfigCmdArgs {
    #[command(flatten)]
    sources: Sources,
    #[command(flatten)]
    server: ServerFlags,
}

#[derive(Args, Debug)]
struct PublishArgs {
    #[command(flatten)]
    sources: Sources,
    /// The hub: its base URL (http://host:port) or its full Mercure URL; default: the configured listen
    /// address.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Topic; repeat for alternates (the first is canonical).
    #[arg(long, value_name = "TOPIC")]
    topic: Vec<String>,
    /// The update's data (text; JSON is sent as is).
    #[arg(long, default_value = "")]
    data: String,
    /// Only subscribers granted one of the topics receive it.
    #[arg(long)]
    private: bool,
    /// The update's id (must not start with #; the hub generates one when absent).
    #[arg(long)]
    id: Option<String>,
    /// The SSE event type.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// The SSE reconnection delay to suggest, in milliseconds.
    #[arg(long, value_name = "MS")]
    retry: Option<u64>,
    /// A whole update as JSON instead of the flags above: '{"topic":"t","data":"x"}'.
    #[arg(long, conflicts_with_all = ["topic", "data", "private", "id", "event_type", "retry"])]
    json: Option<String>,
    /// Publisher JWT to use instead of minting one from the configured key.
    #[arg(long)]
    token: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct TokenArgs {
    #[command(flatten)]
    sources: Sources,
    /// Topic selector the token may publish to (mercure.publish); repeatable.
    #[arg(long, value_name = "SELECTOR")]
    publish: Vec<String>,
    /// Topic selector the token may read private updates and token channels of (mercure.subscribe);
    /// repeatable.
    #[arg(long, value_name = "SELECTOR")]
    subscribe: Vec<String>,
    /// Channel to subscribe the WebSocket connection to at connect (channels); repeatable.
    #[arg(long = "channel", value_name = "CHANNEL")]
    channels: Vec<String>,
    /// JSON attached to the subscription (mercure.payload).
    #[arg(long, value_name = "JSON")]
    payload: Option<String>,
    /// JSON shown in presence and join/leave (info).
    #[arg(long, value_name = "JSON")]
    info: Option<String>,
    /// Subject: the user id (sub).
    #[arg(long, value_name = "USER")]
    sub: Option<String>,
    /// Lifetime, e.g. 1h, 15m; 0s for a token without exp.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Signing algorithm; default: the configured one (auth.jwt_alg).
    #[arg(long)]
    alg: Option<String>,
    /// Signing key: a secret, env:VAR or file:private.pem; default: the configured key. RS*/ES*/EdDSA
    /// tokens need the private key here (the server holds the public one).
    #[arg(long)]
    key: Option<String>,
}

pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Publish(a) => publish(a).await,
        Command::Token(a) => {
            println!("{}", token(&a)?);
            Ok(())
        }
        Command::Config(a) => {
            let config = load(&a.sources, Some(&a.server))?;
            for line in config.secret_sources() {
                println!("{line}");
            }
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    // A filter that does not parse is an error, not a silent fallback: the operator asked for something.
    let filter = match std::env::var("HERALD_LOG_LEVEL") {
        // A lone word that is not a level would parse as a target name and silence everything.
        Ok(spec)
            if !spec.contains(['=', ',', ':'])
                && spec.trim().parse::<tracing::level_filters::LevelFilter>().is_err() =>
        {
            anyhow::bail!(
                "HERALD_LOG_LEVEL={spec:?} is not a level: use error, warn, info, debug, trace or off \
                 (or directives like herald=debug,info)"
            )
        }
        Ok(spec) => tracing_subscriber::EnvFilter::try_new(&spec).map_err(|e| {
            anyhow::anyhow!(
                "HERALD_LOG_LEVEL={spec:?} is not a log filter ({e}); use a level (error, warn, info, \
                 debug, trace) or directives like herald=debug,info"
            )
        })?,
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    // Logs go to stderr; stdout carries only the `listening on` line, which scripts and tests read to find
    // the port when listening on :0. Colours only on a terminal, never into files and pipes.
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if a.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let config = load(&a.sources, Some(&a.server))?;
    if config.uses_dev_key() {
        tracing::warn!(
            "using the public development JWT key {DEV_JWT_KEY:?}: anyone can mint tokens. \
             Set auth.jwt_key (or HERALD_JWT_KEY) before exposing this hub"
        );
    }
    let server = crate::server::Server::bind(config.clone()).await?;
    println!("listening on http://{}", server.local_addr()?);
    tracing::info!(
        addr = %server.local_addr()?,
        anonymous = config.auth.allow_anonymous,
        "herald listening; Mercure hub at /.well-known/mercure, WebSocket at /connection/websocket"
    );
    tracing::info!("history is kept in {}", config.history_location());
    server.run(crate::server::shutdown_signal()).await
}

fn token(a: &TokenArgs) -> anyhow::Result<String> {
    let config = load(&a.sources, None)?;
    let auth_cfg = &config.auth;
    let publisher_only = !a.publish.is_empty() && a.subscribe.is_empty();
    let configured = if publisher_only {
        auth_cfg
            .publisher_jwt_key
            .clone()
            .or(auth_cfg.jwt_key.clone())
    } else if a.publish.is_empty() {
        auth_cfg
            .subscriber_jwt_key
            .clone()
            .or(auth_cfg.jwt_key.clone())
    } else {
        auth_cfg.jwt_key.clone()
    };
    let from_flag = a.key.is_some();
    let key = a
        .key
        .clone()
        .or(configured)
        .unwrap_or_else(|| DEV_JWT_KEY.to_string());
    let alg = auth::parse_alg(a.alg.as_deref().unwrap_or(&auth_cfg.jwt_alg))
        .map_err(anyhow::Error::msg)?;
    let json = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<serde_json::Value>> {
        v.as_deref()
            .map(serde_json::from_str)
            .transpose()
            .with_context(|| format!("{flag} must be JSON"))
    };
    let claims = Claims {
        sub: a.sub.clone(),
        exp: (!a.ttl.is_zero()).then(|| auth::unix_now() + a.ttl.as_secs()),
        mercure: Some(MercureClaim {
            publish: (!a.publish.is_empty()).then(|| a.publish.clone()),
            subscribe: (!a.subscribe.is_empty()).then(|| a.subscribe.clone()),
            payload: json("--payload", &a.payload)?,
        }),
        channels: a.channels.clone(),
        info: json("--info", &a.info)?,
        ..Default::default()
    };
    let enc = auth::encoding_key(&key, alg).map_err(|e| {
        let asymmetric = !matches!(
            alg,
            jsonwebtoken::Algorithm::HS256 | jsonwebtoken::Algorithm::HS384 | jsonwebtoken::Algorithm::HS512
        );
        if asymmetric && !from_flag {
            anyhow::anyhow!(
                "{alg:?} tokens are signed with a private key, and the configured key is what the server \
                 verifies with (a public key): pass the private one with --key file:/path/private.pem ({e})"
            )
        } else {
            anyhow::anyhow!("{alg:?} signing key: {e}")
        }
    })?;
    auth::sign(&claims, alg, &enc).map_err(anyhow::Error::msg)
}

/// One POST with hyper's client (already in the binary for the server side): the CLI needs nothing more,
/// and a whole HTTP client library would cost every build of Herald its compile time.
async fn post(
    url: &str,
    token: &str,
    content_type: &str,
    body: String,
) -> anyhow::Result<(http::StatusCode, String)> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(url)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .context("invalid URL")?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("no answer within 30 s")??;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// The hub's Mercure URL from `--url`: a base URL (`http://host:port`) gets the hub path.
fn hub_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let has_path = trimmed
        .split_once("://")
        .map(|(_, rest)| rest.contains('/'))
        .unwrap_or(false);
    if has_path {
        url.to_string()
    } else {
        format!("{trimmed}{}", crate::mercure::HUB_PATH)
    }
}

async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let config = load(&a.sources, None)?;
    let url = match &a.url {
        Some(u) => hub_url(u),
        None => format!("http://{}{}", config.listen, crate::mercure::HUB_PATH),
    };
    let token = match &a.token {
        Some(t) => t.clone(),
        None => token(&TokenArgs {
            sources: a.sources.clone(),
            publish: vec!["*".into()],
            subscribe: vec![],
            channels: vec![],
            payload: None,
            info: None,
            sub: None,
            ttl: Duration::from_secs(60),
            alg: None,
            key: None,
        })?,
    };
    let (content_type, body) = match &a.json {
        Some(j) => {
            serde_json::from_str::<serde_json::Value>(j).context("--json is not valid JSON")?;
            ("application/json", j.clone())
        }
        None => {
            if a.topic.is_empty() {
                bail!("give at least one --topic (or --json)");
            }
            let mut form = form_urlencoded::Serializer::new(String::new());
            for t in &a.topic {
                form.append_pair("topic", t);
            }
            form.append_pair("data", &a.data);
            if a.private {
                form.append_pair("private", "on");
            }
            if let Some(id) = &a.id {
                form.append_pair("id", id);
            }
            if let Some(t) = &a.event_type {
                form.append_pair("type", t);
            }
            if let Some(r) = a.retry {
                form.append_pair("retry", &r.to_string());
            }
            ("application/x-www-form-urlencoded", form.finish())
        }
    };
    let (status, body) = post(&url, &token, content_type, body)
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    if !status.is_success() {
        bail!("publish refused: {status}: {body}");
    }
    println!("{body}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_base_url_gets_the_hub_path() {
        assert_eq!(
            super::hub_url("http://h:8080"),
            "http://h:8080/.well-known/mercure"
        );
        assert_eq!(
            super::hub_url("http://h:8080/"),
            "http://h:8080/.well-known/mercure"
        );
        assert_eq!(
            super::hub_url("http://h/prefix/.well-known/mercure"),
            "http://h/prefix/.well-known/mercure"
        );
    }
}
