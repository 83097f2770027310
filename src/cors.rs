//! Origin allowlists, shared by CORS, the CSRF check of cookie-authenticated publishes and (later) the
//! WebSocket upgrade, so that one list in the config means the same thing everywhere.
//!
//! Patterns: an exact origin (`https://app.example.com`), a wildcard subdomain (`https://*.example.com`
//! matches `https://a.example.com` and `https://a.b.example.com`, not `https://example.com`), any port
//! (`http://localhost:*`), or `*`. CORS itself is tower-http's `CorsLayer`; we only supply the predicate,
//! and the layer adds `Vary: Origin` so caches never serve one origin's answer to another.

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    Any,
    Exact(String),
    /// `scheme://*.suffix[:port]`: `suffix` kept with its leading dot.
    Subdomain {
        scheme: String,
        suffix: String,
    },
    /// `scheme://host:*`
    AnyPort {
        prefix: String,
    },
}

impl OriginPattern {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim().trim_end_matches('/');
        if raw == "*" {
            return Ok(OriginPattern::Any);
        }
        let (scheme, rest) = raw.split_once("://").ok_or_else(|| {
            format!("origin {raw:?} must look like scheme://host[:port] (for example https://app.example.com)")
        })?;
        if rest.is_empty() || rest.contains('/') {
            return Err(format!("origin {raw:?} must not have a path"));
        }
        if let Some(suffix) = rest.strip_prefix("*.") {
            if suffix.contains('*') || suffix.is_empty() {
                return Err(format!("origin {raw:?}: only one leading *. is allowed"));
            }
            return Ok(OriginPattern::Subdomain {
                scheme: scheme.to_ascii_lowercase(),
                suffix: format!(".{}", suffix.to_ascii_lowercase()),
            });
        }
        if let Some(host) = rest.strip_suffix(":*") {
            if host.contains('*') {
                return Err(format!(
                    "origin {raw:?}: * only as a leading label or as the port"
                ));
            }
            return Ok(OriginPattern::AnyPort {
                prefix: format!(
                    "{}://{}:",
                    scheme.to_ascii_lowercase(),
                    host.to_ascii_lowercase()
                ),
            });
        }
        if rest.contains('*') {
            return Err(format!(
                "origin {raw:?}: * only as a leading label or as the port"
            ));
        }
        Ok(OriginPattern::Exact(raw.to_ascii_lowercase()))
    }

    pub fn matches(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(o) => *o == origin,
            OriginPattern::Subdomain { scheme, suffix } => origin
                .strip_prefix(scheme.as_str())
                .and_then(|r| r.strip_prefix("://"))
                .is_some_and(|host| {
                    let host_only = host.split(':').next().unwrap_or(host);
                    let port = &host[host_only.len()..];
                    let suffix_host = suffix.split(':').next().unwrap_or(suffix);
                    let suffix_port = &suffix[suffix_host.len()..];
                    host_only.len() > suffix_host.len()
                        && host_only.ends_with(suffix_host)
                        && port == suffix_port
                        && !host_only[..host_only.len() - suffix_host.len()].is_empty()
                }),
            OriginPattern::AnyPort { prefix } => origin
                .strip_prefix(prefix.as_str())
                .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())),
        }
    }
}

/// A parsed allowlist.
#[derive(Debug, Clone, Default)]
pub struct OriginList(Vec<OriginPattern>);

impl OriginList {
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|s| OriginPattern::parse(s))
            .collect::<Result<_, _>>()
            .map(OriginList)
    }

    pub fn allows(&self, origin: &str) -> bool {
        self.0.iter().any(|p| p.matches(origin))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn is_any(&self) -> bool {
        self.0.contains(&OriginPattern::Any)
    }
}

/// The CORS layer for the whole router.
pub fn layer(cfg: &CorsConfig) -> Result<CorsLayer, String> {
    let list = OriginList::parse(&cfg.allowed_origins)?;
    let allow_origin = if list.is_any() && !cfg.allow_credentials {
        AllowOrigin::any()
    } else {
        AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|o| list.allows(o))
        })
    };
    Ok(CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_credentials(cfg.allow_credentials)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CACHE_CONTROL,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-api-key"),
        ])
        .expose_headers([HeaderName::from_static("last-event-id")])
        .max_age(Duration::from_secs(cfg.max_age.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let sub = OriginPattern::parse("https://*.example.com").unwrap();
        assert!(sub.matches("https://a.example.com"));
        assert!(sub.matches("https://a.b.example.com"));
        assert!(!sub.matches("https://example.com"));
        assert!(!sub.matches("https://evilexample.com"));
        assert!(!sub.matches("http://a.example.com"));
        assert!(!sub.matches("https://a.example.com.evil.org"));
        assert!(!sub.matches("https://a.example.com:8443"));
        let port = OriginPattern::parse("http://localhost:*").unwrap();
        assert!(port.matches("http://localhost:5173"));
        assert!(!port.matches("http://localhost.evil.org:80"));
        let exact = OriginPattern::parse("https://App.example.com/").unwrap();
        assert!(exact.matches("https://app.example.com"));
        assert!(OriginPattern::parse("example.com").is_err());
        assert!(OriginPattern::parse("https://a.*.com").is_err());
    }
}
