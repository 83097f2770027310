//! The web console: the UI at `/` (files from `ui/`, inside the binary) and its API under `/console/api/`.
//!
//! What it shows comes from the hub and the registries the transports already keep ([`crate::Hub::stats`],
//! the subscription registry, [`crate::centrifugo::Clients`]); what it does goes through the hub like any
//! other publisher or the server API (publish, `Hub::control` with a Centrifugo disconnect). Live views are
//! SSE streams of this API ([`stream`]): a stats snapshot every second, and a tail of any channel read as an
//! admin, private updates included.
//!
//! Who may use it, like Centrifugo's admin ([`Console::authorize`]):
//! - off: every API route answers 404 `console_disabled` (the default on a non-loopback address);
//! - a password (`console.password`): `POST /console/api/login` exchanges it for an admin JWT, signed with a
//!   key of this process (random, or `console.admin_jwt_key`), which the UI sends as `Authorization: Bearer`;
//!   a header, never a cookie, so another site cannot make a browser act with it;
//! - no password, allowed only on a loopback address: no login, but only for requests from this machine (a
//!   loopback peer, a loopback `Host` so a DNS-rebinding page is refused, and no foreign `Origin`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::auth::unix_now;
use crate::config::{Config, ConfigError};
use crate::error::ApiError;
use crate::state::AppState;

mod api;
mod assets;
pub use assets::index as page;
mod stream;

/// The audience (and subject) of admin tokens: a Herald token for publishers or subscribers is not one.
const AUDIENCE: &str = "herald-console";
/// Wrong passwords accepted per minute (for the whole server) before logins are refused for a while.
const MAX_FAILURES_PER_MINUTE: u32 = 10;

/// The UI and the console API. The console's state travels as a request extension of these routes only,
/// not in [`AppState`], which every WebSocket connection keeps a copy of.
///
/// The console's page is at `/console`; the standalone server also serves it at `/` (see
/// [`crate::Server`]), but the router leaves `/` to the application it is mounted in.
pub fn routes(console: Arc<Console>) -> Router<AppState> {
    Router::new()
        .route("/console", get(assets::index))
        .route("/console/{*file}", get(assets::file))
        .route("/console/api/session", get(session))
        .route("/console/api/login", post(login))
        .route("/console/api/overview", get(stream::overview))
        .route("/console/api/stats/stream", get(stream::stats))
        .route("/console/api/tail", get(stream::tail))
        .route("/console/api/channels", get(api::channels))
        .route("/console/api/presence", get(api::presence))
        .route("/console/api/history", get(api::history))
        .route("/console/api/publish", post(api::publish))
        .route("/console/api/disconnect", post(api::disconnect))
        .route("/console/api/connections", get(api::connections))
        .route("/console/api/token", post(api::token))
        .route(
            "/console/api/{*rest}",
            get(api_not_found).post(api_not_found),
        )
        .layer(Extension(console))
}

enum Mode {
    Off,
    /// No password: requests from this machine only.
    Local,
    Password(Vec<u8>),
}

/// The console's settings and keys, resolved once at start-up.
pub struct Console {
    mode: Mode,
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    /// Wrong passwords in the current minute, and when it began.
    failures: parking_lot::Mutex<(Instant, u32)>,
    dev_key: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct AdminClaims {
    sub: String,
    aud: String,
    iat: u64,
    exp: u64,
}

impl Console {
    pub fn from_config(c: &Config) -> Result<Console, ConfigError> {
        let password = c.console_password()?;
        let mode = match (c.console_enabled(), password) {
            (false, _) => Mode::Off,
            (true, Some(pw)) => Mode::Password(pw),
            (true, None) => Mode::Local,
        };
        let secret = match &c.console.admin_jwt_key {
            Some(spec) => {
                let key = crate::auth::resolve_key_material(spec)
                    .map_err(|e| ConfigError::Invalid(format!("console.admin_jwt_key: {e}")))?;
                if key.len() < 16 {
                    return Err(ConfigError::Invalid(
                        "console.admin_jwt_key is shorter than 16 bytes".into(),
                    ));
                }
                key
            }
            // 244 random bits from the OS (v4 UUIDs come from getrandom).
            None => [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
                .iter()
                .flat_map(|u| *u.as_bytes())
                .collect(),
        };
        Ok(Console {
            mode,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            ttl: c.console.session_ttl,
            failures: parking_lot::Mutex::new((Instant::now(), 0)),
            dev_key: c.uses_dev_key(),
        })
    }

    fn login_required(&self) -> bool {
        matches!(self.mode, Mode::Password(_))
    }

    /// Whether this request may use the console API; the error says what to do.
    pub fn authorize(&self, parts: &Parts) -> Result<(), ApiError> {
        match &self.mode {
            Mode::Off => Err(disabled()),
            Mode::Local => local_only(parts),
            Mode::Password(_) => self.verify(parts),
        }
    }

    fn verify(&self, parts: &Parts) -> Result<(), ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "admin_token_missing",
                    "log in: POST /console/api/login with {\"password\": …} (console.password), then send \
                     the token as `Authorization: Bearer <token>`",
                )
            })?;
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[AUDIENCE]);
        v.leeway = 0;
        match jsonwebtoken::decode::<AdminClaims>(token, &self.decoding, &v) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(ApiError::unauthorized(
                    "admin_token_expired",
                    "the admin session has expired: log in again",
                ))
            }
            Err(_) => Err(ApiError::unauthorized(
                "admin_token_invalid",
                "this is not an admin token of this server (tokens signed with a random key end when the \
                 server restarts): log in again",
            )),
        }
    }

    /// Counts a wrong password; `Err` once there were too many this minute.
    fn throttle(&self, failed: bool) -> Result<(), ApiError> {
        let mut f = self.failures.lock();
        if f.0.elapsed() >= Duration::from_secs(60) {
            *f = (Instant::now(), 0);
        }
        if f.1 >= MAX_FAILURES_PER_MINUTE {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many wrong passwords: wait a minute",
            ));
        }
        if failed {
            f.1 += 1;
        }
        Ok(())
    }

    fn issue(&self) -> Result<(String, u64), ApiError> {
        let now = unix_now();
        let exp = now + self.ttl.as_secs().max(1);
        let claims = AdminClaims {
            sub: AUDIENCE.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ApiError::internal(format!("cannot sign the admin token: {e}")))?;
        Ok((token, exp))
    }
}

fn disabled() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "console_disabled",
        "the console is off on this server: it is on by default only when Herald listens on a loopback \
         address; elsewhere set console.enabled = true and console.password",
    )
}

/// Without a password: only requests from this machine, addressed to this machine, from no other site.
fn local_only(parts: &Parts) -> Result<(), ApiError> {
    let refuse = |why: &str| {
        Err(ApiError::forbidden(
            "console_local_only",
            format!(
                "without console.password the console answers only requests from this machine ({why}); \
                 set console.password to use it from elsewhere"
            ),
        ))
    };
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    match peer {
        Some(p) if p.ip().is_loopback() => {}
        Some(_) => return refuse("this request comes from another address"),
        None => return refuse("the client's address is unknown where Herald is mounted"),
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    if !is_loopback_host(host) {
        return refuse("the Host is not a loopback name or address");
    }
    if let Some(origin) = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        let same = origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest == host);
        if !same {
            return refuse("the request comes from a page of another origin");
        }
    }
    Ok(())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Proof that a request passed [`Console::authorize`]; every API handler but `session` and `login` takes it.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<Arc<Console>>() {
            Some(c) => c.authorize(parts).map(|()| Admin),
            None => Err(disabled()),
        }
    }
}

/// `GET /console/api/session`: whether a login is needed, and whether this request is already allowed.
async fn session(
    Extension(c): Extension<Arc<Console>>,
    parts: Parts,
) -> Result<Json<Value>, ApiError> {
    if matches!(c.mode, Mode::Off) {
        return Err(disabled());
    }
    if matches!(c.mode, Mode::Local) {
        local_only(&parts)?;
    }
    Ok(Json(json!({
        "login_required": c.login_required(),
        "authenticated": c.authorize(&parts).is_ok(),
        "version": env!("CARGO_PKG_VERSION"),
        "dev_key": c.dev_key,
    })))
}

#[derive(Deserialize)]
struct Login {
    password: String,
}

/// `POST /console/api/login {"password": …}` → `{"token", "expires_at"}`.
async fn login(
    Extension(c): Extension<Arc<Console>>,
    Json(body): Json<Login>,
) -> Result<Json<Value>, ApiError> {
    let expected = match &c.mode {
        Mode::Off => return Err(disabled()),
        Mode::Local => {
            return Err(ApiError::bad_request(
                "no_password",
                "no console.password is set: the console needs no login on this machine",
            ))
        }
        Mode::Password(pw) => pw,
    };
    c.throttle(false)?;
    if !bool::from(body.password.as_bytes().ct_eq(expected)) {
        c.throttle(true)?;
        return Err(ApiError::unauthorized(
            "wrong_password",
            "wrong password (console.password)",
        ));
    }
    let (token, exp) = c.issue()?;
    Ok(Json(json!({"token": token, "expires_at": exp})))
}

async fn api_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such console API endpoint",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "127.8.9.1",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "example.com",
            "evil.localhost.example:80",
            "10.0.0.1:80",
            "",
            "[::2]:1",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
