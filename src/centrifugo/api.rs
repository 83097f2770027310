//! Centrifugo's server HTTP API: `POST /api/<method>` with a JSON body, authenticated by API key
//! (`X-API-Key: KEY` or `Authorization: apikey KEY`). Method results are `{"result": …}` or
//! `{"error": {"code", "message"}}` with HTTP 200, as Centrifugo answers, so its server SDKs work; transport
//! problems (no key, bad JSON, unknown method) are HTTP errors with Herald's JSON error body.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::OnceCell;

use super::conn::{
    channel_refusal, history_result, presence_result, presence_stats_result, Refusal,
};
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
                _ => wrap(None, Err(Refusal::new(104, "unknown batch command"))),
            };
            replies.push(reply);
        }
        json!({ "replies": replies })
    } else {
        wrap(None, dispatch(&st, &method, params).await)
    };
    Ok(axum::Json(out).into_response())
}

fn wrap(method: Option<&str>, r: Result<Value, Refusal>) -> Value {
    match (method, r) {
        (None, Ok(v)) => json!({ "result": v }),
        (Some(m), Ok(v)) => json!({ m: v }),
        (_, Err(r)) => {
            tracing::debug!(code = r.code, detail = %r.detail(), "server API call refused");
            json!({"error": {"code": r.code, "message": r.message()}})
        }
    }
}

pub(crate) fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
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

/// A protocol result as the server API's JSON: the same encoding the JSON client protocol uses.
fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, Refusal> {
    serde_json::to_value(v).map_err(|e| Refusal::new(100, e.to_string()))
}

fn params<T: serde::de::DeserializeOwned>(p: Value) -> Result<T, Refusal> {
    serde_json::from_value(p).map_err(|e| Refusal::new(107, e.to_string()))
}

fn required<'a>(value: &'a str, name: &str) -> Result<&'a str, Refusal> {
    if value.is_empty() {
        return Err(Refusal::new(107, format!("{name} is required")));
    }
    Ok(value)
}

fn check_channel(st: &AppState, name: &str) -> Result<(), Refusal> {
    st.access
        .channel(name)
        .map(|_| ())
        .map_err(|e| channel_refusal(e, name))
}

/// `publish` and `broadcast` parameters beyond the channel(s).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Payload {
    data: Option<Value>,
    /// Binary data, base64: for Protobuf clients (JSON clients get it as text, or as a JSON string).
    b64data: Option<String>,
    skip_history: bool,
    tags: BTreeMap<String, String>,
    /// A repeated key within [`IDEMPOTENCY_WINDOW`] returns the first result and publishes nothing.
    idempotency_key: Option<String>,
}

impl Payload {
    fn bytes(&self) -> Result<bytes::Bytes, Refusal> {
        match (&self.data, &self.b64data) {
            (Some(d), None) => Ok(bytes::Bytes::from(d.to_string())),
            // Centrifugo takes b64data when both are given (SDKs such as cent always send `data`).
            (_, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map(bytes::Bytes::from)
                .map_err(|e| Refusal::new(107, format!("b64data is not base64: {e}"))),
            (None, None) => Err(Refusal::new(107, "data or b64data is required")),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PublishParams {
    channel: String,
    #[serde(flatten)]
    payload: Payload,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BroadcastParams {
    channels: Vec<String>,
    #[serde(flatten)]
    payload: Payload,
}

/// Publications of one `broadcast` in flight at once: enough for group commit to take a whole batch per
/// fsync, bounded so one call of many channels cannot queue thousands of jobs ahead of everyone else.
const BROADCAST_CONCURRENCY: usize = 64;

/// How long an idempotency key is remembered (Centrifugo's default).
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// Results of publishes made with an idempotency key, by (channel, key), for [`IDEMPOTENCY_WINDOW`]. A
/// concurrent repeat waits for the first and gets its result; a failed publish is not remembered, so it can
/// be retried with the same key.
#[derive(Default)]
pub struct Idempotency {
    results: parking_lot::Mutex<HashMap<(String, String), Remembered>>,
}

/// When a key was first used, and its result once there is one.
type Remembered = (Instant, Arc<OnceCell<Value>>);

impl Idempotency {
    fn slot(&self, channel: &str, key: &str) -> Arc<OnceCell<Value>> {
        let now = Instant::now();
        let mut results = self.results.lock();
        if results.len() >= 1024 && results.len().is_power_of_two() {
            results.retain(|_, (at, _)| now.duration_since(*at) < IDEMPOTENCY_WINDOW);
        }
        let entry = results
            .entry((channel.to_string(), key.to_string()))
            .or_insert_with(|| (now, Arc::new(OnceCell::new())));
        if now.duration_since(entry.0) >= IDEMPOTENCY_WINDOW {
            *entry = (now, Arc::new(OnceCell::new()));
        }
        entry.1.clone()
    }
}

async fn publish_one(st: &AppState, channel: &str, p: &Payload) -> Result<Value, Refusal> {
    check_channel(st, channel)?;
    if st.inbox.as_ref().is_some_and(|i| i.owns(channel)) {
        return Err(Refusal::new(
            103,
            format!("{channel:?} is an inbox channel: its events come from the inbox only (inbox_notify)"),
        ));
    }
    let data = p.bytes()?;
    let publish = || async {
        let published = st
            .hub
            .publish(NewPublication {
                topics: vec![channel.to_string()],
                data: data.clone(),
                tags: p.tags.clone(),
                skip_history: p.skip_history,
                ..Default::default()
            })
            .await
            .map_err(|e| match e {
                crate::hub::HubError::MessageTooLarge { .. } => Refusal::new(106, e.to_string()),
                other => Refusal::new(100, other.to_string()),
            })?;
        Ok::<Value, Refusal>(if published.record.seq == 0 {
            json!({})
        } else {
            json!({"offset": published.record.seq, "epoch": st.hub.epoch()})
        })
    };
    match p.idempotency_key.as_deref().filter(|k| !k.is_empty()) {
        None => publish().await,
        Some(key) => {
            let slot = st.idempotency.slot(channel, key);
            slot.get_or_try_init(publish).await.cloned()
        }
    }
}

async fn dispatch(st: &AppState, method: &str, p: Value) -> Result<Value, Refusal> {
    match method {
        "publish" => {
            let p: PublishParams = params(p)?;
            publish_one(st, required(&p.channel, "channel")?, &p.payload).await
        }
        "broadcast" => {
            let p: BroadcastParams = params(p)?;
            if p.channels.is_empty() {
                return Err(Refusal::new(107, "channels is required"));
            }
            // Concurrently, so that the log's group commit takes many channels in one fsync instead of
            // one commit after another; `buffered` keeps the responses in the order of the channels.
            let (channels, payload) = (&p.channels, &p.payload);
            let responses: Vec<Value> = futures_util::stream::iter(0..channels.len())
                .map(|i| async move { wrap(None, publish_one(st, &channels[i], payload).await) })
                .buffered(BROADCAST_CONCURRENCY)
                .collect()
                .await;
            Ok(json!({ "responses": responses }))
        }
        "subscribe" => {
            let channel = str_param(&p, "channel")?;
            check_channel(st, channel)?;
            let info = match (p.get("info"), p.get("b64info").and_then(Value::as_str)) {
                (_, Some(b64)) => Some(decode_b64("b64info", b64)?),
                (Some(info), None) => Some(info.to_string().into_bytes()),
                (None, None) => None,
            };
            let data = match (p.get("data"), p.get("b64data").and_then(Value::as_str)) {
                (_, Some(b64)) => Some(decode_b64("b64data", b64)?),
                (Some(data), None) => Some(data.to_string().into_bytes()),
                (None, None) => None,
            };
            let ctl = Control::Subscribe {
                channel: channel.to_string(),
                info,
                data,
                expire_at: p.get("expire_at").and_then(Value::as_u64),
            };
            control(st, &p, ctl).await
        }
        "unsubscribe" => {
            let channel = str_param(&p, "channel")?;
            check_channel(st, channel)?;
            let ctl = Control::Unsubscribe {
                channel: channel.to_string(),
            };
            control(st, &p, ctl).await
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
            let whitelist = p
                .get("whitelist")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let ctl = Control::Disconnect {
                code,
                reason,
                whitelist,
            };
            control(st, &p, ctl).await
        }
        "refresh" => {
            let ctl = Control::Refresh {
                expire_at: p.get("expire_at").and_then(Value::as_u64),
                expired: p.get("expired").and_then(Value::as_bool).unwrap_or(false),
                info: p.get("info").cloned(),
            };
            control(st, &p, ctl).await
        }
        "presence" | "presence_stats" => {
            let channel = str_param(&p, "channel")?;
            let ns = st
                .access
                .channel(channel)
                .map_err(|e| channel_refusal(e, channel))?;
            if !ns.presence {
                return Err(Refusal::new(
                    108,
                    format!("presence is off for the namespace of {channel}"),
                ));
            }
            if method == "presence" {
                to_json(&presence_result(st, channel).await?)
            } else {
                to_json(&presence_stats_result(st, channel).await?)
            }
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
            let mut v = to_json(&history_result(st, channel, limit, since, reverse, None).await?)?;
            // Server SDKs read `publications` as a list: present even when empty.
            if let Some(obj) = v.as_object_mut() {
                obj.entry("publications").or_insert_with(|| json!([]));
            }
            Ok(v)
        }
        "history_remove" => {
            let channel = str_param(&p, "channel")?.to_string();
            check_channel(st, &channel)?;
            st.hub
                .engine()
                .remove_channel(channel)
                .await
                .map_err(|e| Refusal::new(100, e.to_string()))?;
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
                "uid": st.hub.epoch(),
                "name": "herald",
                "version": env!("CARGO_PKG_VERSION"),
                "num_clients": clients,
                "num_users": users,
                "num_channels": st.hub.channels().len(),
                "num_subs": st.hub.subscriptions().iter().filter(|s| !s.observer).count(),
                "uptime": STARTED.get().map(|s| s.elapsed().as_secs()).unwrap_or(0),
            }]}))
        }
        _ => Err(Refusal::new(104, format!("no method {method:?}"))),
    }
}

fn decode_b64(name: &str, b64: &str) -> Result<Vec<u8>, Refusal> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Refusal::new(107, format!("{name} is not base64: {e}")))
}

fn str_param<'a>(p: &'a Value, name: &str) -> Result<&'a str, Refusal> {
    p.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Refusal::new(107, format!("{name} is required")))
}

/// Sends `ctl` to the live connections of the `user` (and `client`) of `p`, on whichever node they are.
async fn control(st: &AppState, p: &Value, ctl: Control) -> Result<Value, Refusal> {
    let payload = serde_json::to_vec(&ctl).map_err(|e| Refusal::new(100, e.to_string()))?;
    st.hub
        .control(str_param(p, "user")?, client_param(p), payload.into())
        .await
        .map_err(|e| Refusal::new(100, e.to_string()))?;
    Ok(json!({}))
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
