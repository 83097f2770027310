//! `GET /.well-known/mercure`: an SSE stream.
//!
//! Order of a stream: a comment (so the response headers leave at once and `onopen` fires only once the
//! subscription is registered), then the history the client missed, read from the log in pages, then live
//! publications from the outbox. Registration happens before the history is read, and the hub's
//! registration boundary (`registered_at`) splits the two exactly, so nothing falls between them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;

use super::subscriptions::ActiveSubscriptions;
use crate::access::Identity;
use crate::auth::Role;
use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::frame::sse::COMMENT;
use crate::frame::Publication;
use crate::hub::{
    ConnectionGuard, Delivery, DisconnectReason, Hub, SubscribeSpec, Subscription, Transport,
};
use crate::server::ConnKill;
use crate::state::AppState;
use crate::topic::Selector;

const EARLIEST: &str = "earliest";

pub async fn subscribe(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    kill: Option<axum::Extension<ConnKill>>,
    remote: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
) -> Result<Response, ApiError> {
    let (topics, query_last_id) = parse_query(query.as_deref().unwrap_or(""));

    let claims = match st.auth.extract(&headers, query.as_deref())? {
        Some((token, _)) => Some(st.auth.verify(Role::Subscriber, &token)?),
        None if st.auth.allow_anonymous => None,
        None => return Err(st.auth.missing_token(Role::Subscriber)),
    };
    if topics.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "add at least one `topic` query parameter (a topic, a URI template, or *)",
        ));
    }

    check_selector_cost(&st.config.limits, &topics)?;
    let selectors: Vec<Selector> = topics.iter().map(|t| Selector::parse(t)).collect();
    let who = match &claims {
        Some(c) => Arc::new(Identity::from_claims(c)),
        None => Identity::anonymous(),
    };
    let filter = st
        .access
        .reader(who, &selectors, None)
        .map_err(|(topic, denied)| {
            ApiError::forbidden(
                "topic_not_allowed",
                format!("topic {topic:?} cannot be read with this token: {denied}"),
            )
        })?;
    let guard = st.hub.connect(Transport::Sse, remote.map(|r| r.0 .0))?;
    let subscriber = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let payload = claims.as_ref().and_then(|c| c.payload());
    let spec = SubscribeSpec {
        selectors,
        filter,
        subscriber: subscriber.clone(),
        payload: payload.clone().map(Box::new),
        join_leave: false,
        conn: Some(guard.meta().clone()),
        observer: false,
    };
    let (outbox, rx) = st.hub.outbox(kill.map(|k| k.0 .0.clone()));
    let sub = st.hub.subscribe(spec, &outbox)?;

    // Header wins over the query parameter (spec, "Reconnection").
    let requested = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .or(query_last_id.filter(|v| !v.is_empty()));
    let (replay_after, response_last_id) = match &requested {
        None => (None, None),
        Some(id) if id == EARLIEST => (Some(0), Some(EARLIEST.to_string())),
        Some(id) => match st.hub.find_id(id.clone()).await? {
            Some(seq) => (Some(seq), Some(id.clone())),
            // Unknown (or aged out of retention): replay what is retained and say so with `earliest`.
            None => (Some(0), Some(EARLIEST.to_string())),
        },
    };

    let active = st
        .config
        .mercure
        .subscriptions
        .then(|| ActiveSubscriptions::start(st.hub.clone(), subscriber, topics, payload));

    let heartbeat = st.config.mercure.heartbeat;
    let expires = claims.as_ref().and_then(|c| c.exp);
    let stream = SseStream {
        hub: st.hub.clone(),
        skip_upto: replay_after.unwrap_or(0),
        replay: replay_after.map(|after| (after, sub.registered_at)),
        page: st.config.mercure.history_page.max(1),
        heartbeat: (!heartbeat.is_zero()).then(|| {
            let mut i = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        }),
        expires: expires.map(|exp| Box::pin(tokio::time::sleep(until_unix(exp)))),
        shutdown: st.hub.shutdown_token(),
        opened: false,
        sub,
        rx,
        _guard: guard,
        _active: active,
    };
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut s| async move {
        s.next().await.map(|b| (Ok::<_, Infallible>(b), s))
    }));

    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate, max-age=0"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("0"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(id) = response_last_id {
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert("last-event-id", v);
        }
    }
    Ok(resp)
}

/// The `topic` parameters and the last `lastEventID` of a raw query string.
pub(crate) fn parse_query(query: &str) -> (Vec<String>, Option<String>) {
    let mut topics = Vec::new();
    let mut last_id = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "topic" => topics.push(v.into_owned()),
            "lastEventID" => last_id = Some(v.into_owned()),
            _ => {}
        }
    }
    (topics, last_id)
}

/// Refuses selectors whose compiled form would cost more than the limits allow, before compiling them.
pub(crate) fn check_selector_cost(
    limits: &LimitsConfig,
    topics: &[String],
) -> Result<(), ApiError> {
    let max = limits.max_topics_per_subscription;
    if topics.len() > max {
        return Err(ApiError::bad_request(
            "too_many_topics",
            format!(
                "{} topics in one subscription, at most {max} allowed",
                topics.len()
            ),
        ));
    }
    let bytes: usize = topics.iter().map(String::len).sum();
    if bytes > limits.max_selector_bytes {
        return Err(ApiError::bad_request(
            "selectors_too_large",
            format!(
                "the topic selectors take {bytes} bytes, at most {} allowed (limits.max_selector_bytes)",
                limits.max_selector_bytes
            ),
        ));
    }
    let exprs: usize = topics.iter().map(|t| crate::topic::expressions(t)).sum();
    if exprs > limits.max_template_expressions {
        return Err(ApiError::bad_request(
            "too_many_template_expressions",
            format!(
                "the topic selectors hold {exprs} URI template expressions, at most {} allowed \
                 (limits.max_template_expressions)",
                limits.max_template_expressions
            ),
        ));
    }
    Ok(())
}

fn until_unix(exp: u64) -> Duration {
    Duration::from_secs(exp.saturating_sub(crate::auth::unix_now()))
}

struct SseStream {
    hub: Hub,
    sub: Subscription,
    rx: crate::queue::Receiver<Delivery>,
    /// Replay `(after, upto]` from the log before going live.
    replay: Option<(u64, u64)>,
    /// Live publications at or below this seq were already seen by the client.
    skip_upto: u64,
    page: usize,
    heartbeat: Option<Interval>,
    expires: Option<Pin<Box<Sleep>>>,
    shutdown: CancellationToken,
    opened: bool,
    _guard: ConnectionGuard,
    _active: Option<ActiveSubscriptions>,
}

impl SseStream {
    /// Not already sent by the replay. A publication kept out of history (seq 0) was never in it.
    fn is_new(&self, p: &Publication) -> bool {
        p.record.seq == 0 || p.record.seq > self.skip_upto
    }

    /// The next chunk to write, or `None` to end the response.
    async fn next(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            return Some(Bytes::from_static(COMMENT));
        }
        if let Some((after, upto)) = self.replay {
            match self.replay_page(after, upto).await {
                Ok(Some(chunk)) => return Some(chunk),
                Ok(None) => self.replay = None,
                Err(e) => {
                    tracing::warn!(error = %e, "history replay failed; closing stream");
                    return None;
                }
            }
        }
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                _ = expiry(&mut self.expires) => {
                    self.hub.count_disconnect(DisconnectReason::TokenExpired);
                    return None;
                }
                d = self.rx.recv() => match d {
                    Some(Delivery::Pub { publication: p, .. }) if self.is_new(&p) => {
                        return Some(self.coalesce(p))
                    }
                    Some(_) => continue,
                    None => return None,
                },
                _ = tick(&mut self.heartbeat) => {
                    return Some(Bytes::from_static(COMMENT));
                }
            }
        }
    }

    /// Joins publications already waiting in the outbox into one write; a lone one is passed as is (no
    /// copy: it is the shared encoding).
    fn coalesce(&mut self, first: std::sync::Arc<Publication>) -> Bytes {
        let mut more = Vec::new();
        while more.len() < 63 {
            match self.rx.try_recv() {
                Some(Delivery::Pub { publication, .. }) if self.is_new(&publication) => {
                    more.push(publication)
                }
                Some(_) => continue,
                None => break,
            }
        }
        if more.is_empty() {
            return first.sse();
        }
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(&first.sse());
        for p in more {
            buf.extend_from_slice(&p.sse());
        }
        buf.freeze()
    }

    /// One page of history as one chunk; `None` when the replay is done.
    async fn replay_page(&mut self, after: u64, upto: u64) -> Result<Option<Bytes>, ApiError> {
        let mut cursor = after;
        loop {
            if cursor >= upto {
                return Ok(None);
            }
            // Exact topics are filtered in the store; a wildcard or template reads everything (in pages)
            // and filters here.
            let topics: Option<Vec<String>> = self
                .sub
                .spec
                .selectors
                .iter()
                .map(|s| s.exact().map(str::to_string))
                .collect();
            let records = self.hub.history(cursor, upto, self.page, topics).await?;
            let Some(last) = records.last() else {
                return Ok(None);
            };
            cursor = last.seq;
            let mut buf = bytes::BytesMut::new();
            for r in records.iter().filter(|r| self.sub.spec.wants(r)) {
                buf.extend_from_slice(&crate::frame::sse::encode(r));
            }
            self.replay = Some((cursor, upto));
            if !buf.is_empty() {
                return Ok(Some(buf.freeze()));
            }
        }
    }
}

async fn expiry(sleep: &mut Option<Pin<Box<Sleep>>>) {
    match sleep {
        Some(s) => s.await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
