//! Centrifugo's server HTTP API: `POST /api/<method>` with a JSON body, authenticated by API key
//! (`X-API-Key: KEY` or `Authorization: apikey KEY`). Method results are `{"result": …}` or
//! `{"error": {"code", "message"}}` with HTTP 200, as Centrifugo answers, so its server SDKs work; transport
//! problems (no key, bad JSON, unknown method) are HTTP errors with Herald's JSON error body.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::conn::{channel_refusal, history_result, presence_result, refusal_parts};
use super::Control;
use crate::error::ApiError;
use crate::hub::NewPublication;
use crate::state::AppState;

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The OpenAPI 3 description of this API.
pub async fn openapi() -> Response {
    let mut resp = include_str!("openapi.json").into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

const METHODS: &[&str] = &[
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "refresh",
    "presence",
    "presence_stats",
    "history",
    "history_remove",
    "channels",
    "info",
    "batch",
];

pub async fn call(
    State(st): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    STARTED.get_or_init(Instant::now);
    authorize(&st, &headers)?;
    if !METHODS.contains(&method.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "method_not_found",
            format!("no API method {method:?}; see /api/openapi.json"),
        ));
    }
    let params: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?
    };
    let out = if method == "batch" {
        let commands = params
            .get("commands")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut replies = Vec::with_capacity(commands.len());
        for c in commands {
            let reply = match c.as_object().and_then(|o| o.iter().next()) {
                Some((m, p)) if m != "batch" && METHODS.contains(&m.as_str()) => {
                    wrap(Some(m), dispatch(&st, m, p.clone()).await)
                }
                _ => json!({"error": {"code": 104, "message": "method not found"}}),
            };
            replies.push(reply);
        }
        json!({ "replies": replies })
    } else {
        wrap(None, dispatch(&st, &method, params).await)
    };
    Ok(axum::Json(out).into_response())
}

fn wrap(method: Option<&str>, r: Result<Value, (u32, String)>) -> Value {
    match (method, r) {
        (None, Ok(v)) => json!({ "result": v }),
        (Some(m), Ok(v)) => json!({ m: v }),
        (_, Err((code, message))) => json!({"error": {"code": code, "message": message}}),
    }
}

fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = st.auth.api_key.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "api_disabled",
            "the server API is off: set centrifugo.api_key",
        ));
    };
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("apikey "))
        });
    match given {
        None => Err(ApiError::unauthorized(
            "api_key_missing",
            "send the API key in X-API-Key or `Authorization: apikey KEY`",
        )),
        Some(g) if bool::from(g.trim().as_bytes().ct_eq(key)) => Ok(()),
        Some(_) => Err(ApiError::unauthorized(
            "api_key_invalid",
            "the API key does not match",
        )),
    }
}

fn str_param<'a>(p: &'a Value, name: &str) -> Result<&'a str, (u32, String)> {
    p.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| (107, format!("bad request: {name} is required")))
}

fn check_channel(st: &AppState, name: &str) -> Result<(), (u32, String)> {
    st.access
        .channel(name)
        .map(|_| ())
        .map_err(|e| refusal_parts(channel_refusal(e, name)))
}

async fn publish_one(st: &AppState, channel: &str, data: &Value) -> Result<Value, (u32, String)> {
    check_channel(st, channel)?;
    let p = st
        .hub
        .publish(NewPublication {
            topics: vec![channel.to_string()],
            data: data.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| match e {
            crate::hub::HubError::MessageTooLarge { .. } => (106, e.to_string()),
            other => (100, other.to_string()),
        })?;
    Ok(json!({"offset": p.record.seq, "epoch": st.hub.log().epoch()}))
}

async fn dispatch(st: &AppState, method: &str, p: Value) -> Result<Value, (u32, String)> {
    match method {
        "publish" => {
            let data = p
                .get("data")
                .ok_or((107, "bad request: data is required".to_string()))?;
            publish_one(st, str_param(&p, "channel")?, data).await
        }
        "broadcast" => {
            let data = p
                .get("data")
                .ok_or((107, "bad request: data is required".to_string()))?;
            let channels: Vec<String> = p
                .get("channels")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if channels.is_empty() {
                return Err((107, "bad request: channels is required".into()));
            }
            let mut responses = Vec::new();
            for c in &channels {
                responses.push(wrap(None, publish_one(st, c, data).await));
            }
            Ok(json!({ "responses": responses }))
        }
        "subscribe" => {
            let channel = str_param(&p, "channel")?;
            check_channel(st, channel)?;
            let ctl = Control::Subscribe {
                channel: channel.to_string(),
                info: p.get("info").cloned(),
            };
            st.clients
                .send(str_param(&p, "user")?, client_param(&p), ctl);
            Ok(json!({}))
        }
        "unsubscribe" => {
            let ctl = Control::Unsubscribe {
                channel: str_param(&p, "channel")?.to_string(),
            };
            st.clients
                .send(str_param(&p, "user")?, client_param(&p), ctl);
            Ok(json!({}))
        }
        "disconnect" => {
            let d = p.get("disconnect");
            let code = d
                .and_then(|d| d.get("code"))
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(3503);
            let reason = d
                .and_then(|d| d.get("reason"))
                .and_then(Value::as_str)
                .unwrap_or("force disconnect")
                .to_string();
            st.clients.send(
                str_param(&p, "user")?,
                client_param(&p),
                Control::Disconnect { code, reason },
            );
            Ok(json!({}))
        }
        "refresh" => {
            let ctl = Control::Refresh {
                expire_at: p.get("expire_at").and_then(Value::as_u64),
                expired: p.get("expired").and_then(Value::as_bool).unwrap_or(false),
                info: p.get("info").cloned(),
            };
            st.clients
                .send(str_param(&p, "user")?, client_param(&p), ctl);
            Ok(json!({}))
        }
        "presence" | "presence_stats" => {
            let channel = str_param(&p, "channel")?;
            check_channel(st, channel)?;
            Ok(presence_result(st, channel, method == "presence_stats"))
        }
        "history" => {
            let channel = str_param(&p, "channel")?;
            check_channel(st, channel)?;
            let limit = p.get("limit").and_then(Value::as_i64).unwrap_or(0) as i32;
            let since = p.get("since").map(|s| {
                (
                    s.get("offset").and_then(Value::as_u64).unwrap_or(0),
                    s.get("epoch")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                )
            });
            let reverse = p.get("reverse").and_then(Value::as_bool).unwrap_or(false);
            history_result(st, channel, limit, since, reverse, None)
                .await
                .map_err(refusal_parts)
        }
        "history_remove" => {
            let channel = str_param(&p, "channel")?.to_string();
            st.hub
                .with_log(move |log| log.remove_channel(&channel))
                .await
                .map_err(|e| (100, e.to_string()))?;
            Ok(json!({}))
        }
        "channels" => {
            let pattern = p.get("pattern").and_then(Value::as_str).unwrap_or("");
            let channels: serde_json::Map<String, Value> = st
                .hub
                .channels()
                .into_iter()
                .filter(|(c, _)| pattern.is_empty() || glob(pattern, c))
                .map(|(c, n)| (c, json!({ "num_clients": n })))
                .collect();
            Ok(json!({ "channels": channels }))
        }
        "info" => {
            let (clients, users) = st.clients.counts();
            Ok(json!({"nodes": [{
                "uid": st.hub.log().epoch(),
                "name": "herald",
                "version": env!("CARGO_PKG_VERSION"),
                "num_clients": clients,
                "num_users": users,
                "num_channels": st.hub.channels().len(),
                "num_subs": st.hub.subscriptions().len(),
                "uptime": STARTED.get().map(|s| s.elapsed().as_secs()).unwrap_or(0),
            }]}))
        }
        _ => Err((104, "method not found".into())),
    }
}

fn client_param(p: &Value) -> Option<&str> {
    p.get("client")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
}

/// `*` matches any run of characters; everything else is literal.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first)
        || !s[first.len()..].ends_with(last)
        || s.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_matches() {
        assert!(super::glob("chat:*", "chat:lobby"));
        assert!(super::glob("*:lobby", "chat:lobby"));
        assert!(super::glob("a*c*e", "abcde"));
        assert!(!super::glob("chat:*", "news:1"));
        assert!(super::glob("exact", "exact") && !super::glob("exact", "exactly"));
    }
}
