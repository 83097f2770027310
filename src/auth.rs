//! Who may publish and subscribe: token extraction, JWT verification, and grants from claims.
//!
//! Tokens are looked for in the Mercure order: `Authorization: Bearer` header, else the `authorization`
//! query parameter, else a cookie. A header that is present is used even if a cookie is also there (the
//! spec says so, and it makes precedence testable). Every refusal says why, because an unexplained 401 is
//! the most common Mercure support question.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, DEV_JWT_KEY};
use crate::cors::OriginList;
use crate::error::ApiError;
use crate::topic::Selector;

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Query,
    Cookie,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MercureClaim {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// The claims of every token Herald verifies, on both faces: one struct, so a claim means the same thing
/// whichever way the token arrives (see `access` for how the Mercure and Centrifugo claims combine).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Not valid before (checked with the same leeway as `exp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mercure: Option<MercureClaim>,
    /// Centrifugo: channels the connection is subscribed to at connect; each is also a read grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// Centrifugo: server-side subscriptions with options, by channel; each is also a read grant.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub subs: std::collections::BTreeMap<String, serde_json::Value>,
    /// Centrifugo: what presence and join/leave show about this connection (or subscription).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Centrifugo subscription token: the one channel it grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Yjs documents this token may open (see `access::DocRight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docs: Option<DocsClaim>,
}

/// The `docs` claim: selectors (`*`, a document name, an RFC 6570 template such as `team/{id}`) over
/// document names, as Mercure's `subscribe` selects topics. `write` implies `read`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DocsClaim {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write: Vec<String>,
}

impl Claims {
    pub fn publish_selectors(&self) -> Vec<Selector> {
        self.mercure
            .as_ref()
            .and_then(|m| m.publish.as_ref())
            .map(|v| v.iter().map(|s| Selector::parse(s)).collect())
            .unwrap_or_default()
    }
    pub fn subscribe_selectors(&self) -> Vec<Selector> {
        self.mercure
            .as_ref()
            .and_then(|m| m.subscribe.as_ref())
            .map(|v| v.iter().map(|s| Selector::parse(s)).collect())
            .unwrap_or_default()
    }
    pub fn payload(&self) -> Option<serde_json::Value> {
        self.mercure.as_ref().and_then(|m| m.payload.clone())
    }
}

/// A verification key and the algorithms it accepts.
pub struct VerifyKey {
    key: DecodingKey,
    alg: Algorithm,
    algs: Vec<Algorithm>,
}

pub struct Auth {
    publisher: VerifyKey,
    subscriber: VerifyKey,
    pub cookie_name: String,
    pub allow_anonymous: bool,
    pub publish_origins: OriginList,
    /// The server API key, resolved (`env:`/`file:`); `None` turns the API off.
    pub api_key: Option<Vec<u8>>,
}

pub fn parse_alg(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>().map_err(|_| {
        format!("unknown JWT algorithm {name:?} (use HS256, HS384, HS512, RS256, ES256, EdDSA, …)")
    })
}

/// Resolves a secret setting: `env:VAR`, `file:/path`, or the value itself. Every secret the config
/// accepts goes through here, so the documented forms work for all of them.
pub fn resolve_key_material(spec: &str) -> Result<Vec<u8>, String> {
    if let Some(var) = spec.strip_prefix("env:") {
        return std::env::var(var)
            .map(String::into_bytes)
            .map_err(|_| format!("the environment variable {var} is not set"));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        return std::fs::read(path).map_err(|e| format!("cannot read the key file {path}: {e}"));
    }
    Ok(spec.as_bytes().to_vec())
}

/// The algorithms of the same family as `alg`: a secret can check any HS*, an RSA key any RS*/PS*.
fn family(alg: Algorithm) -> Vec<Algorithm> {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => vec![HS256, HS384, HS512],
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            vec![RS256, RS384, RS512, PS256, PS384, PS512]
        }
        ES256 | ES384 => vec![alg],
        EdDSA => vec![EdDSA],
    }
}

impl VerifyKey {
    pub fn new(spec: &str, alg: &str) -> Result<Self, String> {
        let alg = parse_alg(alg)?;
        let material = resolve_key_material(spec)?;
        use Algorithm::*;
        let key = match alg {
            HS256 | HS384 | HS512 => DecodingKey::from_secret(&material),
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
                DecodingKey::from_rsa_pem(&material)
                    .map_err(|e| format!("{alg:?} needs an RSA public key in PEM: {e}"))?
            }
            ES256 | ES384 => DecodingKey::from_ec_pem(&material)
                .map_err(|e| format!("{alg:?} needs an EC public key in PEM: {e}"))?,
            EdDSA => DecodingKey::from_ed_pem(&material)
                .map_err(|e| format!("EdDSA needs an Ed25519 public key in PEM: {e}"))?,
        };
        Ok(VerifyKey {
            key,
            alg,
            algs: family(alg),
        })
    }
}

/// A signing key, for `herald token` and tests.
pub fn encoding_key(spec: &str, alg: Algorithm) -> Result<EncodingKey, String> {
    let material = resolve_key_material(spec)?;
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Ok(EncodingKey::from_secret(&material)),
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            EncodingKey::from_rsa_pem(&material).map_err(|e| format!("RSA private key: {e}"))
        }
        ES256 | ES384 => {
            EncodingKey::from_ec_pem(&material).map_err(|e| format!("EC private key: {e}"))
        }
        EdDSA => {
            EncodingKey::from_ed_pem(&material).map_err(|e| format!("Ed25519 private key: {e}"))
        }
    }
}

/// Signs `claims` into a compact JWT.
pub fn sign(claims: &Claims, alg: Algorithm, key: &EncodingKey) -> Result<String, String> {
    jsonwebtoken::encode(&Header::new(alg), claims, key).map_err(|e| e.to_string())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Auth {
    pub fn from_config(c: &AuthConfig) -> Result<Auth, String> {
        let shared = c.jwt_key.as_deref().unwrap_or(DEV_JWT_KEY);
        let publisher = VerifyKey::new(
            c.publisher_jwt_key.as_deref().unwrap_or(shared),
            c.publisher_jwt_alg.as_deref().unwrap_or(&c.jwt_alg),
        )
        .map_err(|e| format!("publisher key: {e}"))?;
        let subscriber = VerifyKey::new(
            c.subscriber_jwt_key.as_deref().unwrap_or(shared),
            c.subscriber_jwt_alg.as_deref().unwrap_or(&c.jwt_alg),
        )
        .map_err(|e| format!("subscriber key: {e}"))?;
        Ok(Auth {
            publisher,
            subscriber,
            cookie_name: c.cookie_name.clone(),
            allow_anonymous: c.allow_anonymous,
            publish_origins: OriginList::parse(&c.publish_origins)?,
            api_key: None,
        })
    }

    /// Sets the server API key from its setting (`env:VAR`, `file:/path` or the key itself). A key read
    /// from a file loses its trailing line break; an empty key is refused (it would open the API to anyone
    /// sending an empty header).
    pub fn with_api_key(mut self, spec: Option<&str>) -> Result<Auth, String> {
        let Some(spec) = spec else { return Ok(self) };
        let mut key = resolve_key_material(spec).map_err(|e| format!("centrifugo.api_key: {e}"))?;
        if spec.starts_with("file:") {
            while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
                key.pop();
            }
        }
        if key.is_empty() {
            return Err("centrifugo.api_key is empty".into());
        }
        self.api_key = Some(key);
        Ok(self)
    }

    /// Finds the token by precedence. `query` is the raw query string.
    pub fn extract(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<(String, TokenSource)>, ApiError> {
        if let Some(h) = headers.get(header::AUTHORIZATION) {
            let v = h.to_str().unwrap_or("");
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ApiError::unauthorized(
                        "token_malformed",
                        "the Authorization header must be `Bearer <jwt>`",
                    )
                })?;
            return Ok(Some((token.to_string(), TokenSource::Header)));
        }
        if let Some(q) = query {
            if let Some((_, v)) =
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "authorization")
            {
                return Ok(Some((v.into_owned(), TokenSource::Query)));
            }
        }
        for value in headers.get_all(header::COOKIE) {
            let Ok(s) = value.to_str() else { continue };
            for pair in s.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    if k == self.cookie_name {
                        return Ok(Some((v.trim_matches('"').to_string(), TokenSource::Cookie)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Verifies signature, algorithm and `exp`; the error says which failed and for which key.
    pub fn verify(&self, role: Role, token: &str) -> Result<Claims, ApiError> {
        self.verify_as(role, token)
    }

    /// Like [`Auth::verify`], into any claims type (the WebSocket protocol has claims of its own).
    pub fn verify_as<T: serde::de::DeserializeOwned>(
        &self,
        role: Role,
        token: &str,
    ) -> Result<T, ApiError> {
        let key = match role {
            Role::Publisher => &self.publisher,
            Role::Subscriber => &self.subscriber,
        };
        let mut v = Validation::new(key.alg);
        v.algorithms = key.algs.clone();
        v.required_spec_claims = HashSet::new();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = 0;
        v.validate_aud = false;
        match jsonwebtoken::decode::<T>(token, &key.key, &v) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => {
                    ApiError::unauthorized("token_expired", "the token's exp is in the past; get a fresh token")
                }
                ErrorKind::InvalidSignature => ApiError::unauthorized(
                    "token_bad_signature",
                    format!(
                        "the token's signature does not match the {} key (check the secret, and that a \
                         publisher token is not used to subscribe when separate keys are configured)",
                        role.as_str()
                    ),
                ),
                ErrorKind::InvalidAlgorithm => ApiError::unauthorized(
                    "token_bad_algorithm",
                    format!("the token's alg is not accepted by the {} key ({:?})", role.as_str(), key.alg),
                ),
                ErrorKind::ImmatureSignature => {
                    ApiError::unauthorized("token_not_yet_valid", "the token's nbf is in the future")
                }
                _ => ApiError::unauthorized("token_malformed", format!("the token cannot be decoded: {e}")),
            }),
        }
    }

    pub fn missing_token(&self, role: Role) -> ApiError {
        ApiError::unauthorized(
            "token_missing",
            format!(
                "no {} token: send `Authorization: Bearer <jwt>`, the `authorization` query parameter, or \
                 the `{}` cookie (browsers' EventSource cannot set headers: use the cookie with \
                 withCredentials, or the query parameter)",
                role.as_str(),
                self.cookie_name
            ),
        )
    }

    /// CSRF check for cookie-authenticated publishes: the `Origin` (or `Referer`) must be allowed.
    pub fn check_publish_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.publish_origins.is_any() {
            return Ok(());
        }
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                let referer = headers.get(header::REFERER)?.to_str().ok()?;
                let (scheme, rest) = referer.split_once("://")?;
                let host = rest.split('/').next()?;
                Some(format!("{scheme}://{host}"))
            });
        match origin {
            Some(o) if self.publish_origins.allows(&o) => Ok(()),
            Some(o) => Err(ApiError::forbidden(
                "origin_not_allowed",
                format!("a cookie-authenticated publish from origin {o} is refused: add it to auth.publish_origins"),
            )),
            None => Err(ApiError::forbidden(
                "origin_not_allowed",
                "a cookie-authenticated publish needs an Origin or Referer header listed in auth.publish_origins",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::from_config(&AuthConfig {
            jwt_key: Some("secret".into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn token(claims: &Claims, key: &str) -> String {
        sign(
            claims,
            Algorithm::HS256,
            &encoding_key(key, Algorithm::HS256).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn precedence_header_query_cookie() {
        let a = auth();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "x=1; mercureAuthorization=c".parse().unwrap(),
        );
        assert_eq!(
            a.extract(&h, Some("authorization=q")).unwrap().unwrap().1,
            TokenSource::Query
        );
        assert_eq!(
            a.extract(&h, None).unwrap().unwrap(),
            ("c".into(), TokenSource::Cookie)
        );
        h.insert(header::AUTHORIZATION, "Bearer hdr".parse().unwrap());
        assert_eq!(
            a.extract(&h, Some("authorization=q")).unwrap().unwrap(),
            ("hdr".into(), TokenSource::Header)
        );
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(a.extract(&h, None).unwrap_err().code, "token_malformed");
    }

    #[test]
    fn verify_reports_the_cause() {
        let a = auth();
        let ok = Claims {
            exp: Some(unix_now() + 60),
            ..Default::default()
        };
        assert!(a.verify(Role::Subscriber, &token(&ok, "secret")).is_ok());
        assert_eq!(
            a.verify(Role::Subscriber, &token(&ok, "other"))
                .unwrap_err()
                .code,
            "token_bad_signature"
        );
        let expired = Claims {
            exp: Some(unix_now() - 10),
            ..Default::default()
        };
        assert_eq!(
            a.verify(Role::Subscriber, &token(&expired, "secret"))
                .unwrap_err()
                .code,
            "token_expired"
        );
        assert_eq!(
            a.verify(Role::Subscriber, "garbage").unwrap_err().code,
            "token_malformed"
        );
    }
}
