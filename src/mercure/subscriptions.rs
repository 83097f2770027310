//! Active subscriptions (Mercure "Active Subscriptions"): a private update on
//! `/.well-known/mercure/subscriptions/{topic}/{subscriber}` when a subscription starts and ends, and a
//! JSON-LD API listing the live ones. Updates go through the hub like any other, so they are in the log and
//! a client can resume them with the `lastEventID` the API returns.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};

use super::HUB_PATH;
use crate::access::Identity;
use crate::auth::Role;
use crate::error::ApiError;
use crate::hub::{Hub, NewPublication};
use crate::state::AppState;
use crate::topic;

/// RFC 6570 simple expansion encodes everything but unreserved characters.
const EXPANSION: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn subscription_iri(topic: &str, subscriber: &str) -> String {
    format!(
        "{HUB_PATH}/subscriptions/{}/{}",
        utf8_percent_encode(topic, EXPANSION),
        utf8_percent_encode(subscriber, EXPANSION)
    )
}

fn document(topic: &str, subscriber: &str, active: bool, payload: &Option<Value>) -> Value {
    let mut doc = json!({
        "id": subscription_iri(topic, subscriber),
        "type": "Subscription",
        "topic": topic,
        "subscriber": subscriber,
        "active": active,
    });
    if let (Some(p), Some(obj)) = (payload, doc.as_object_mut()) {
        obj.insert("payload".into(), p.clone());
    }
    doc
}

/// Publishes `active: true` now and `active: false` when dropped (the stream ended).
pub struct ActiveSubscriptions {
    hub: Hub,
    subscriber: String,
    topics: Vec<String>,
    payload: Option<Value>,
}

impl ActiveSubscriptions {
    pub fn start(
        hub: Hub,
        subscriber: String,
        topics: Vec<String>,
        payload: Option<Value>,
    ) -> Self {
        let a = ActiveSubscriptions {
            hub,
            subscriber,
            topics,
            payload,
        };
        a.announce(true);
        a
    }

    fn announce(&self, active: bool) {
        for t in &self.topics {
            let mut doc = document(t, &self.subscriber, active, &self.payload);
            if let Some(obj) = doc.as_object_mut() {
                obj.insert("@context".into(), json!("https://mercure.rocks/"));
            }
            let update = NewPublication {
                topics: vec![subscription_iri(t, &self.subscriber)],
                data: doc.to_string().into(),
                private: true,
                ..Default::default()
            };
            let hub = self.hub.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.publish(update).await {
                    tracing::debug!(error = %e, "subscription event not published");
                }
            });
        }
    }
}

impl Drop for ActiveSubscriptions {
    fn drop(&mut self) {
        if !self.hub.is_shutting_down() {
            self.announce(false);
        }
    }
}

/// The API needs a subscriber token whose `mercure.subscribe` matches the requested URL. Returns who asks:
/// a subscription to a topic that identity may not read is not listed to it.
fn authorize(
    st: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    url: &str,
) -> Result<Identity, ApiError> {
    if !st.config.mercure.subscriptions {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "subscriptions_disabled",
            "the subscriptions API is off; set mercure.subscriptions = true",
        ));
    }
    let (token, _) = st
        .auth
        .extract(headers, query)?
        .ok_or_else(|| st.auth.missing_token(Role::Subscriber))?;
    let claims = st.auth.verify(Role::Subscriber, &token)?;
    if !topic::any_match(&claims.subscribe_selectors(), [url]) {
        return Err(ApiError::forbidden(
            "topic_not_granted",
            format!("the token's mercure.subscribe claim does not match {url}"),
        ));
    }
    Ok(Identity::from_claims(&claims))
}

fn collect(st: &AppState, who: &Identity, filter: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    // An operator's tail is not a subscription of the hub's clients: not listed.
    for s in st.hub.subscriptions().into_iter().filter(|s| !s.observer) {
        for t in &s.selectors {
            if filter(t, &s.subscriber) && st.access.check_read(who, t, None).is_ok() {
                out.push(document(t, &s.subscriber, true, &s.payload));
            }
        }
    }
    out
}

fn ld_json(mut body: Value, hub: &Hub) -> Response {
    if let Some(obj) = body.as_object_mut() {
        obj.insert("@context".into(), json!("https://mercure.rocks/"));
        obj.insert(
            "lastEventID".into(),
            json!(hub.last_event_id().unwrap_or_else(|| "earliest".into())),
        );
    }
    let mut resp = body.to_string().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/ld+json"),
    );
    resp
}

pub async fn list_all(
    State(st): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = format!("{HUB_PATH}/subscriptions");
    let who = authorize(&st, &headers, q.as_deref(), &url)?;
    let subs = collect(&st, &who, |_, _| true);
    Ok(ld_json(
        json!({"id": url, "type": "Subscriptions", "subscriptions": subs}),
        &st.hub,
    ))
}

pub async fn list_topic(
    State(st): State<AppState>,
    Path(topic): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = format!(
        "{HUB_PATH}/subscriptions/{}",
        utf8_percent_encode(&topic, EXPANSION)
    );
    let who = authorize(&st, &headers, q.as_deref(), &url)?;
    let subs = collect(&st, &who, |t, _| t == topic);
    Ok(ld_json(
        json!({"id": url, "type": "Subscriptions", "subscriptions": subs}),
        &st.hub,
    ))
}

pub async fn get_one(
    State(st): State<AppState>,
    Path((topic, subscriber)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = subscription_iri(&topic, &subscriber);
    let who = authorize(&st, &headers, q.as_deref(), &url)?;
    let doc = collect(&st, &who, |t, s| t == topic && s == subscriber)
        .into_iter()
        .next()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "subscription_not_found",
                "no such active subscription",
            )
        })?;
    Ok(ld_json(doc, &st.hub))
}
