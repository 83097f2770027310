//! The console's JSON endpoints: channels, presence, history pages, publish, disconnect, connections, and
//! development tokens. Everything goes through the hub (and, for a disconnect, `Hub::control`, so it
//! reaches the connection on whichever node holds it).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Admin;
use crate::auth::{Claims, MercureClaim};
use crate::centrifugo::Control;
use crate::error::ApiError;
use crate::hub::{ConnMeta, DisconnectReason, NewPublication, Transport};
use crate::log::Record;
use crate::state::AppState;

/// A stored or live publication as the console shows it.
pub fn publication_json(r: &Record) -> Value {
    let (data, encoding) = match std::str::from_utf8(&r.data) {
        Ok(text) => (text.to_string(), "text"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&r.data),
            "base64",
        ),
    };
    json!({
        "seq": r.seq,
        "id": r.id,
        "topics": r.topics,
        "data": data,
        "encoding": encoding,
        "private": r.private,
        "type": r.event_type,
        "time_ms": r.time_ms,
        "info": r.info.as_deref().and_then(|i| serde_json::from_str::<Value>(i).ok()),
        "tags": r.tags,
    })
}

fn conn_json(m: &ConnMeta, now_ms: i64) -> Value {
    json!({
        "transport": m.transport,
        "remote": m.remote().map(|r| r.to_string()),
        "opened_ms": m.opened_ms,
        "age_s": (now_ms - m.opened_ms).max(0) / 1000,
    })
}

#[derive(Debug, Deserialize)]
pub struct ChannelsQuery {
    #[serde(default)]
    filter: String,
    limit: Option<usize>,
}

/// `GET /console/api/channels?filter=…&limit=…`: channels with subscribers, with subscriber and presence
/// counts, by name.
pub async fn channels(
    _: Admin,
    State(st): State<AppState>,
    Query(q): Query<ChannelsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(200).clamp(1, 2000);
    let all = st.hub.channels();
    let total = all.len();
    let matching: Vec<(String, usize)> = all
        .into_iter()
        .filter(|(c, _)| q.filter.is_empty() || c.contains(&q.filter))
        .collect();
    let shown = matching.len().min(limit);
    let mut out = Vec::with_capacity(shown);
    for (name, subscribers) in matching.iter().take(limit) {
        let presence = st.hub.presence(name).await.map(|p| p.len()).ok();
        out.push(json!({"name": name, "subscribers": subscribers, "presence": presence}));
    }
    Ok(Json(json!({
        "channels": out,
        "matching": matching.len(),
        "total": total,
    })))
}

#[derive(Debug, Deserialize)]
pub struct ChannelQuery {
    channel: String,
    before: Option<u64>,
    limit: Option<usize>,
}

fn channel_param(c: &str) -> Result<&str, ApiError> {
    if c.is_empty() {
        return Err(ApiError::bad_request(
            "missing_channel",
            "give the channel (its first topic)",
        ));
    }
    Ok(c)
}

/// `GET /console/api/presence?channel=…`: who is in a channel.
pub async fn presence(
    _: Admin,
    State(st): State<AppState>,
    Query(q): Query<ChannelQuery>,
) -> Result<Json<Value>, ApiError> {
    let channel = channel_param(&q.channel)?;
    let clients = st.hub.presence(channel).await?;
    Ok(Json(json!({ "channel": channel, "presence": clients })))
}

/// `GET /console/api/history?channel=…&before=SEQ&limit=N`: a page of a channel's history, newest first;
/// `older` is the `before` of the next (older) page, absent on the last one.
pub async fn history(
    _: Admin,
    State(st): State<AppState>,
    Query(q): Query<ChannelQuery>,
) -> Result<Json<Value>, ApiError> {
    let channel = channel_param(&q.channel)?;
    let limit = q.limit.unwrap_or(20).clamp(1, 500);
    let before = q.before.unwrap_or(i64::MAX as u64);
    let records = st
        .hub
        .engine()
        .read_channel_back(channel.to_string(), before, limit)
        .await
        .map_err(crate::hub::HubError::from)?;
    let older = (records.len() == limit)
        .then(|| records.last().map(|r| r.seq))
        .flatten();
    Ok(Json(json!({
        "channel": channel,
        "publications": records.iter().map(publication_json).collect::<Vec<_>>(),
        "older": older,
    })))
}

#[derive(Debug, Deserialize)]
pub struct Publish {
    topic: String,
    /// More topics (alternates), after the first.
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    data: String,
    /// `text` (default) or `json`: JSON is checked before it is published.
    #[serde(default)]
    format: String,
    #[serde(default)]
    private: bool,
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
}

/// `POST /console/api/publish {"topic", "data", "format": "text"|"json", "private", "id", "type"}`.
pub async fn publish(
    _: Admin,
    State(st): State<AppState>,
    Json(p): Json<Publish>,
) -> Result<Json<Value>, ApiError> {
    if p.topic.is_empty() {
        return Err(ApiError::bad_request("missing_topic", "give a topic"));
    }
    match p.format.as_str() {
        "" | "text" => {}
        "json" => {
            serde_json::from_str::<Value>(&p.data).map_err(|e| {
                ApiError::bad_request("invalid_json", format!("the data is not JSON: {e}"))
            })?;
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_format",
                format!("format {other:?}: use text or json"),
            ))
        }
    }
    let published = st
        .hub
        .publish(NewPublication {
            id: p.id.filter(|i| !i.is_empty()),
            topics: std::iter::once(p.topic)
                .chain(p.topics.into_iter().filter(|t| !t.is_empty()))
                .collect(),
            data: p.data.into(),
            private: p.private,
            event_type: p.event_type.filter(|t| !t.is_empty()),
            ..Default::default()
        })
        .await?;
    Ok(Json(
        json!({"id": published.record.id, "seq": published.record.seq}),
    ))
}

#[derive(Debug, Deserialize)]
pub struct Disconnect {
    /// A WebSocket user: all its connections (or only `client`), on whichever node they are.
    user: Option<String>,
    client: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
    /// An SSE subscription (its id in `connections`).
    subscription: Option<u64>,
}

/// `POST /console/api/disconnect {"user", "client"?, "code"?, "reason"?}` or `{"subscription": id}`.
pub async fn disconnect(
    _: Admin,
    State(st): State<AppState>,
    Json(d): Json<Disconnect>,
) -> Result<Json<Value>, ApiError> {
    if let Some(id) = d.subscription {
        let known = st.hub.subscriptions().iter().any(|s| s.id == id);
        if !known {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_subscription",
                format!("no live subscription {id}"),
            ));
        }
        st.hub.disconnect(id, DisconnectReason::Server);
        return Ok(Json(json!({"disconnected": 1})));
    }
    let Some(user) = d.user else {
        return Err(ApiError::bad_request(
            "missing_user",
            "give the user (and optionally the client) to disconnect, or an SSE subscription id",
        ));
    };
    let client = d.client.filter(|c| !c.is_empty());
    let here = st
        .clients
        .list(usize::MAX)
        .iter()
        .filter(|c| c.user == user && client.as_ref().is_none_or(|want| *want == c.client))
        .count();
    let ctl = Control::Disconnect {
        code: d.code.unwrap_or(3503),
        reason: d
            .reason
            .unwrap_or_else(|| "disconnected by the admin".into()),
        whitelist: Vec::new(),
    };
    let payload = serde_json::to_vec(&ctl).map_err(|e| ApiError::internal(e.to_string()))?;
    st.hub
        .control(&user, client.as_deref(), payload.into())
        .await?;
    Ok(Json(json!({"connected_here": here})))
}

#[derive(Debug, Deserialize)]
pub struct ConnectionsQuery {
    limit: Option<usize>,
}

/// `GET /console/api/connections`: the WebSocket clients (user, client id, remote address, channels, age)
/// and SSE subscribers (subscriber id, topics, remote address, age) of this node.
pub async fn connections(
    _: Admin,
    State(st): State<AppState>,
    Query(q): Query<ConnectionsQuery>,
) -> Json<Value> {
    let limit = q.limit.unwrap_or(500).clamp(1, 10_000);
    let now = crate::hub::now_ms();
    let subs = st.hub.subscriptions();
    let mut channels_of: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut sse = Vec::new();
    let mut sse_total = 0;
    for s in &subs {
        match s.conn.as_deref() {
            Some(m) if m.transport == Transport::WebSocket => channels_of
                .entry(s.subscriber.as_str())
                .or_default()
                .extend(s.selectors.iter().map(String::as_str)),
            Some(m) => {
                sse_total += 1;
                if sse.len() < limit {
                    let mut v = conn_json(m, now);
                    v["subscription"] = json!(s.id);
                    v["subscriber"] = json!(s.subscriber);
                    v["topics"] = json!(s.selectors);
                    v["payload"] = json!(s.payload);
                    sse.push(v);
                }
            }
            None => {}
        }
    }
    let clients = st.clients.list(usize::MAX);
    let websocket: Vec<Value> = clients
        .iter()
        .take(limit)
        .map(|c| {
            let mut v = conn_json(&c.meta, now);
            v["user"] = json!(c.user);
            v["client"] = json!(c.client);
            v["channels"] = json!(channels_of
                .get(c.client.as_str())
                .cloned()
                .unwrap_or_default());
            v
        })
        .collect();
    let stats = st.hub.stats();
    Json(json!({
        "websocket": websocket,
        "websocket_total": clients.len(),
        // Upgraded but not yet past their `connect` command.
        "websocket_pending": stats.websocket_connections.saturating_sub(clients.len()),
        "sse": sse,
        "sse_total": sse_total,
    }))
}

#[derive(Debug, Deserialize)]
pub struct MintToken {
    sub: Option<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    channels: Vec<String>,
    info: Option<Value>,
    /// Lifetime, e.g. `1h`, `15m`; `0s` for none. Default: 1 hour.
    ttl: Option<String>,
}

/// `POST /console/api/token`: a token for the given claims, signed with the public development key; only
/// while that key is in use (a server with a key of its own never signs tokens for the console).
pub async fn token(
    _: Admin,
    State(st): State<AppState>,
    Json(t): Json<MintToken>,
) -> Result<Json<Value>, ApiError> {
    if !st.config.uses_dev_key() {
        return Err(ApiError::forbidden(
            "dev_key_not_in_use",
            "this server has a JWT key of its own, so the console mints no tokens: mint them where the \
             key is kept (your backend, or `herald token` with the server's config)",
        ));
    }
    let ttl = match t.ttl.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => Duration::from_secs(3600),
        Some(s) => humantime::parse_duration(s).map_err(|e| {
            ApiError::bad_request("invalid_ttl", format!("ttl {s:?}: {e} (e.g. 1h, 15m, 0s)"))
        })?,
    };
    let nonempty = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let (subscribe, publish) = (nonempty(t.subscribe), nonempty(t.publish));
    let claims = Claims {
        sub: t.sub.filter(|s| !s.is_empty()),
        exp: (!ttl.is_zero()).then(|| crate::auth::unix_now() + ttl.as_secs()),
        mercure: (!subscribe.is_empty() || !publish.is_empty()).then(|| MercureClaim {
            publish: (!publish.is_empty()).then_some(publish),
            subscribe: (!subscribe.is_empty()).then_some(subscribe),
            payload: None,
        }),
        channels: nonempty(t.channels),
        info: t.info.filter(|i| !i.is_null()),
        ..Default::default()
    };
    let key = crate::auth::encoding_key(crate::config::DEV_JWT_KEY, jsonwebtoken::Algorithm::HS256)
        .map_err(ApiError::internal)?;
    let token = crate::auth::sign(&claims, jsonwebtoken::Algorithm::HS256, &key)
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"token": token, "claims": claims})))
}
