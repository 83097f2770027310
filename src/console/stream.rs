//! The console's live views, as SSE streams: a stats snapshot every second, and the tail of a channel.
//!
//! The UI reads them with `fetch` (so the admin token travels in a header, as for every other call), not
//! with `EventSource`. Both end when the hub shuts down, so they never hold up a graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior};

use super::api::publication_json;
use super::Admin;
use crate::access::Identity;
use crate::error::ApiError;
use crate::hub::{Delivery, HubStats, SubscribeSpec};
use crate::server::ConnKill;
use crate::state::AppState;
use crate::topic::Selector;

/// How often the stats stream sends a snapshot.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// A comment on a quiet tail, so proxies keep it open.
const TAIL_HEARTBEAT: Duration = Duration::from_secs(15);

/// What the overview shows: one snapshot of the server.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub time_ms: i64,
    pub version: &'static str,
    pub hub: HubStats,
    /// Per second, since the previous snapshot of the same stream (absent in the first).
    pub rates: Option<Rates>,
    pub websocket: WsCounts,
    pub engine: EngineState,
    /// The public development JWT key is in use.
    pub dev_key: bool,
}

#[derive(Debug, Serialize)]
pub struct Rates {
    pub publications: f64,
    pub deliveries: f64,
}

#[derive(Debug, Serialize)]
pub struct WsCounts {
    /// Connected clients (after their `connect` command) on this node.
    pub clients: usize,
    pub users: usize,
}

/// Storage, as `/readyz` sees it.
#[derive(Debug, Serialize)]
pub struct EngineState {
    pub kind: &'static str,
    pub history: String,
    pub durable: bool,
    pub ready: bool,
    pub error: Option<String>,
}

async fn snapshot(st: &AppState) -> Snapshot {
    let (clients, users) = st.clients.counts();
    let ready = match tokio::time::timeout(Duration::from_secs(2), st.hub.ready()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the engine did not answer within 2 s".to_string()),
    };
    let kind = match st.config.engine.kind {
        crate::config::EngineKind::Local => "local",
        crate::config::EngineKind::Redis => "redis",
        crate::config::EngineKind::Nats => "nats",
    };
    Snapshot {
        time_ms: crate::hub::now_ms(),
        version: env!("CARGO_PKG_VERSION"),
        hub: st.hub.stats(),
        rates: None,
        websocket: WsCounts { clients, users },
        engine: EngineState {
            kind,
            history: st.config.history_location(),
            durable: st.config.engine.kind != crate::config::EngineKind::Local
                || (st.config.log.durable
                    && st.config.log.backend == crate::config::LogBackend::Sqlite),
            ready: ready.is_ok(),
            error: ready.err(),
        },
        dev_key: st.config.uses_dev_key(),
    }
}

/// `GET /console/api/overview`: one snapshot.
pub async fn overview(_: Admin, State(st): State<AppState>) -> Json<Snapshot> {
    Json(snapshot(&st).await)
}

/// An SSE response of `chunks`.
fn sse(stream: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures_util::StreamExt;
    let mut resp = Response::new(Body::from_stream(stream.map(Ok::<_, Infallible>)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn event(v: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    Bytes::from(format!("data: {json}\n\n"))
}

/// `GET /console/api/stats/stream`: a [`Snapshot`] every second, with rates since the previous one.
pub async fn stats(_: Admin, State(st): State<AppState>) -> Response {
    let shutdown = st.hub.shutdown_token();
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = (st, tick, None::<(Instant, HubStats)>);
    sse(futures_util::stream::unfold(
        state,
        move |(st, mut tick, prev)| {
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tick.tick() => {}
                }
                let mut snap = snapshot(&st).await;
                let now = Instant::now();
                if let Some((at, before)) = &prev {
                    let secs = now.duration_since(*at).as_secs_f64().max(0.001);
                    snap.rates = Some(Rates {
                        publications: snap.hub.publications.saturating_sub(before.publications)
                            as f64
                            / secs,
                        deliveries: snap.hub.deliveries.saturating_sub(before.deliveries) as f64
                            / secs,
                    });
                }
                let chunk = event(&snap);
                Some((chunk, (st, tick, Some((now, snap.hub)))))
            }
        },
    ))
}

#[derive(Debug, Deserialize)]
pub struct TailQuery {
    /// A topic, a URI template, or `*`.
    topic: String,
}

/// `GET /console/api/tail?topic=…`: every publication the selector matches, as it is dispatched, private
/// ones included: the hub reads it on the admin's behalf, with a grant of everything.
pub async fn tail(
    _: Admin,
    State(st): State<AppState>,
    Query(q): Query<TailQuery>,
    kill: Option<axum::Extension<ConnKill>>,
) -> Result<Response, ApiError> {
    if q.topic.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "give the topic to tail (a channel, a URI template, or *)",
        ));
    }
    let admin = Arc::new(Identity {
        user: String::new(),
        authenticated: true,
        grants: vec![Selector::Any],
    });
    let mut spec = SubscribeSpec::new(
        vec![Selector::parse(&q.topic)],
        admin,
        format!("urn:herald:console:{}", uuid::Uuid::new_v4()),
    );
    spec.payload = Some(Box::new(Value::String("console tail".into())));
    // An operator watching, not a reader: not counted, not listed to clients, never taken for the user
    // of an inbox channel being connected.
    spec.observer = true;
    let (outbox, rx) = st.hub.outbox(kill.map(|k| k.0 .0.clone()));
    let sub = st.hub.subscribe(spec, &outbox)?;
    drop(outbox);
    let shutdown = st.hub.shutdown_token();
    let mut heartbeat = tokio::time::interval_at(Instant::now() + TAIL_HEARTBEAT, TAIL_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = (Some(sub), rx, heartbeat, false);
    Ok(sse(futures_util::stream::unfold(
        state,
        move |(sub, mut rx, mut heartbeat, opened)| {
            let shutdown = shutdown.clone();
            async move {
                let sub = sub?;
                if !opened {
                    // At once, so the client knows the tail is registered.
                    return Some((
                        Bytes::from_static(b": tail\n\n"),
                        (Some(sub), rx, heartbeat, true),
                    ));
                }
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = heartbeat.tick() => {
                            return Some((Bytes::from_static(b":\n\n"), (Some(sub), rx, heartbeat, true)));
                        }
                        d = rx.recv() => match d {
                            Some(Delivery::Pub { publication, .. }) => {
                                let chunk = event(&publication_json(&publication.record));
                                return Some((chunk, (Some(sub), rx, heartbeat, true)));
                            }
                            Some(_) => continue,
                            None => return None,
                        },
                    }
                }
            }
        },
    )))
}
