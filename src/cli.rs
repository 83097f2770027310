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
    about = "Real-time messaging hub: SSE (Mercure), durable history, JWT, CORS"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Publish an update to a running hub.
    Publish(PublishArgs),
    /// Mint a JWT for development.
    Token(TokenArgs),
    /// Print the effective configuration (secrets masked).
    Config(ConfigArgs),
}

/// Configuration sources shared by every subcommand. Flags win over `HERALD_*` variables, which win over
/// the file.
#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// TOML config file (also `HERALD_CONFIG`).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the SQLite log.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep history in memory only (lost on restart).
    #[arg(long)]
    memory: bool,
    /// JWT key for publishers and subscribers (secret, env:VAR, file:/path.pem).
    #[arg(long)]
    jwt_key: Option<String>,
    /// Allow subscribers without a token (public updates only).
    #[arg(long)]
    allow_anonymous: bool,
    /// Serve with the public development key on a non-loopback address (`auth.allow_dev_key`).
    #[arg(long)]
    allow_dev_key: bool,
    /// Allowed CORS origin; repeat for several.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Any config key, e.g. --set mercure.heartbeat=10s; repeatable.
    #[arg(long = "set", value_parser = parse_key_value)]
    set: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut o: Vec<(String, String)> = Vec::new();
        if let Some(l) = &self.listen {
            o.push(("listen".into(), format!("{l:?}")));
        }
        if let Some(d) = &self.data_dir {
            o.push(("data_dir".into(), format!("{:?}", d.display().to_string())));
        }
        if self.memory {
            o.push(("log.backend".into(), "\"memory\"".into()));
        }
        if let Some(k) = &self.jwt_key {
            o.push(("auth.jwt_key".into(), format!("{k:?}")));
        }
        if self.allow_anonymous {
            o.push(("auth.allow_anonymous".into(), "true".into()));
        }
        if self.allow_dev_key {
            o.push(("auth.allow_dev_key".into(), "true".into()));
        }
        if !self.cors_origins.is_empty() {
            o.push(("cors.allowed_origins".into(), self.cors_origins.join(",")));
        }
        o.extend(self.set.iter().cloned());
        Ok(Config::load(self.config.as_deref(), std::env::vars(), &o)?)
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[derive(Args, Debug)]
struct PublishArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Hub URL; defaults to the configured listen address.
    #[arg(long)]
    url: Option<String>,
    /// Topic; repeat for alternates (the first is canonical).
    #[arg(long)]
    topic: Vec<String>,
    #[arg(long, default_value = "")]
    data: String,
    #[arg(long)]
    private: bool,
    #[arg(long)]
    id: Option<String>,
    #[arg(long = "type")]
    event_type: Option<String>,
    #[arg(long)]
    retry: Option<u64>,
    /// A whole update as JSON instead of the flags above: '{"topic":"t","data":"x"}'.
    #[arg(long, conflicts_with_all = ["topic", "data", "private", "id", "event_type", "retry"])]
    json: Option<String>,
    /// Publisher JWT; minted from the configured key when absent.
    #[arg(long)]
    token: Option<String>,
}

#[derive(Args, Debug)]
struct TokenArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Topic selector the token may publish to; repeatable.
    #[arg(long)]
    publish: Vec<String>,
    /// Topic selector the token may receive private updates of; repeatable.
    #[arg(long)]
    subscribe: Vec<String>,
    /// JSON for mercure.payload.
    #[arg(long)]
    payload: Option<String>,
    /// Subject (user id).
    #[arg(long)]
    sub: Option<String>,
    /// Lifetime, e.g. 1h, 15m; `0s` for a token without exp.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Signing algorithm; defaults to the configured one.
    #[arg(long)]
    alg: Option<String>,
    /// Signing key (secret, env:VAR, file:private.pem); defaults to the configured key.
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
            let config = a.load()?;
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
    let config = a.config.load()?;
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
        log = ?config.log.backend,
        anonymous = config.auth.allow_anonymous,
        "herald listening; Mercure hub at /.well-known/mercure"
    );
    server.run(crate::server::shutdown_signal()).await
}

fn token(a: &TokenArgs) -> anyhow::Result<String> {
    let config = a.config.load()?;
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
    let key = a
        .key
        .clone()
        .or(configured)
        .unwrap_or_else(|| DEV_JWT_KEY.to_string());
    let alg = auth::parse_alg(a.alg.as_deref().unwrap_or(&auth_cfg.jwt_alg))
        .map_err(anyhow::Error::msg)?;
    let payload = match &a.payload {
        Some(p) => Some(serde_json::from_str(p).context("--payload must be JSON")?),
        None => None,
    };
    let claims = Claims {
        sub: a.sub.clone(),
        exp: (!a.ttl.is_zero()).then(|| auth::unix_now() + a.ttl.as_secs()),
        mercure: Some(MercureClaim {
            publish: (!a.publish.is_empty()).then(|| a.publish.clone()),
            subscribe: (!a.subscribe.is_empty()).then(|| a.subscribe.clone()),
            payload,
        }),
        ..Default::default()
    };
    let enc = auth::encoding_key(&key, alg).map_err(anyhow::Error::msg)?;
    auth::sign(&claims, alg, &enc).map_err(anyhow::Error::msg)
}

async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let config = a.config.load()?;
    let url = a
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}{}", config.listen, crate::mercure::HUB_PATH));
    let token = match &a.token {
        Some(t) => t.clone(),
        None => token(&TokenArgs {
            config: a.config.clone(),
            publish: vec!["*".into()],
            subscribe: vec![],
            payload: None,
            sub: None,
            ttl: Duration::from_secs(60),
            alg: None,
            key: None,
        })?,
    };
    let client = reqwest::Client::new();
    let req = client.post(&url).bearer_auth(token);
    let req = match &a.json {
        Some(j) => {
            serde_json::from_str::<serde_json::Value>(j).context("--json is not valid JSON")?;
            req.header("content-type", "application/json")
                .body(j.clone())
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
            req.header("content-type", "application/x-www-form-urlencoded")
                .body(form.finish())
        }
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("publish refused: {status}: {body}");
    }
    println!("{body}");
    Ok(())
}
