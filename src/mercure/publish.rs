//! `POST /.well-known/mercure`: publish an update. The body is form-encoded as the spec requires; JSON is
//! accepted too (`{"topic": "…" | ["…"], "data": "…", "private": true, "id", "type", "retry"}`) for
//! publishers that find forms awkward. The response (200 `text/plain`, the id) is sent only once the update
//! is in the log.

use axum::body::{to_bytes, Body};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::auth::{Role, TokenSource};
use crate::error::ApiError;
use crate::hub::NewPublication;
use crate::state::AppState;
use crate::topic;

pub async fn publish(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (token, source) = st
        .auth
        .extract(&headers, query.as_deref())?
        .ok_or_else(|| st.auth.missing_token(Role::Publisher))?;
    let claims = st.auth.verify(Role::Publisher, &token)?;
    if source == TokenSource::Cookie {
        st.auth.check_publish_origin(&headers)?;
    }
    let allowed = claims.publish_selectors();
    if allowed.is_empty() {
        return Err(ApiError::forbidden(
            "publish_not_allowed",
            "the token has no mercure.publish claim (or it is empty): it cannot publish",
        ));
    }

    // Form overhead (percent-encoding) can triple the size of `data`; the data limit is checked exactly
    // by the hub.
    let limit = st.config.limits.max_message_size * 3 + 16 * 1024;
    let bytes = to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("request body over {limit} bytes"),
        )
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/x-www-form-urlencoded");
    let update = if content_type.starts_with("application/json") {
        parse_json(&bytes)?
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        parse_form(&bytes)?
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("publish with application/x-www-form-urlencoded (or application/json), not {content_type}"),
        ));
    };
    if update.topics.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "add at least one `topic` field",
        ));
    }
    if let Some(t) = update.topics.iter().find(|t| crate::access::is_reserved(t)) {
        return Err(ApiError::forbidden(
            "topic_reserved",
            format!("topics starting with $ are Herald's own: {t:?} cannot be published to"),
        ));
    }
    if let Some(t) = update
        .topics
        .iter()
        .find(|t| st.inbox.as_ref().is_some_and(|i| i.owns(t)))
    {
        return Err(ApiError::forbidden(
            "topic_reserved",
            format!("{t:?} is an inbox channel: its events come from the inbox only (use /api/inbox_notify)"),
        ));
    }
    if let Some(t) = update
        .topics
        .iter()
        .find(|t| !topic::any_match(&allowed, [t.as_str()]))
    {
        return Err(ApiError::forbidden(
            "topic_not_granted",
            format!("the token's mercure.publish claim does not match topic {t:?}; nothing was published"),
        ));
    }
    let published = st.hub.publish(update).await?;
    let mut resp = published.record.id.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

fn parse_retry(v: &str) -> Result<u64, ApiError> {
    v.trim().parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_retry",
            format!("retry must be a number of milliseconds, got {v:?}"),
        )
    })
}

pub(crate) fn parse_form(body: &[u8]) -> Result<NewPublication, ApiError> {
    let mut p = NewPublication::default();
    for (k, v) in form_urlencoded::parse(body) {
        match &*k {
            "topic" => p.topics.push(v.into_owned()),
            "data" => p.data = v.into_owned().into(),
            "private" => p.private = true,
            "id" => p.id = Some(v.into_owned()).filter(|s| !s.is_empty()),
            "type" => p.event_type = Some(v.into_owned()).filter(|s| !s.is_empty()),
            "retry" => p.retry = Some(parse_retry(&v)?),
            _ => {}
        }
    }
    Ok(p)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonUpdate {
    topic: OneOrMany,
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    private: bool,
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    retry: Option<u64>,
}

pub(crate) fn parse_json(body: &[u8]) -> Result<NewPublication, ApiError> {
    let u: JsonUpdate = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON update: {e}")))?;
    Ok(NewPublication {
        topics: match u.topic {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        },
        // A JSON string is sent as is; any other JSON value is sent as its JSON text.
        data: match u.data {
            None => Default::default(),
            Some(serde_json::Value::String(s)) => s.into(),
            Some(v) => v.to_string().into(),
        },
        private: u.private,
        id: u.id,
        event_type: u.event_type,
        retry: u.retry,
        ..Default::default()
    })
}
