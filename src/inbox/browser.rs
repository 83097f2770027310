//! The browser's inbox API under `/inbox`, with the user's own token: the token's `sub` owns the inbox,
//! and nothing in a request can name another user's. Reads and changes of an item outside the caller's
//! inbox answer 404, whoever owns it, so ids reveal nothing. A token that came as a cookie must come with
//! an allowed `Origin` for a change (the CSRF rule of cookie-authenticated publishes). Changes count
//! against `inbox.user_rate` per user: over it, 429 with `Retry-After`.

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use super::api::{inbox, ChangeParams};
use super::push::{Push, SubscriptionInput};
use super::{Inbox, InboxError, ListQuery, Page, Patch, Position, Preferences, Target};
use crate::auth::{Role, TokenSource};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/inbox", get(list))
        .route("/inbox/counts", get(counts))
        .route(
            "/inbox/items/{id}",
            get(item).post(change_item).delete(remove_item),
        )
        .route("/inbox/update", post(update))
        .route("/inbox/remove", post(remove))
        .route("/inbox/preferences", get(preferences).put(set_preferences))
        .route("/inbox/push/vapid", get(push_vapid))
        .route(
            "/inbox/push/subscriptions",
            get(push_list).post(push_add).delete(push_remove),
        )
}

/// A page with what a client needs to follow the inbox live from exactly where the page was read.
#[derive(Debug, Serialize)]
pub struct LivePage {
    #[serde(flatten)]
    pub page: Page,
    /// The user's inbox channel.
    pub channel: String,
    /// Subscribe from here and ignore events whose `version` is at or below the page's.
    pub position: Position,
}

/// Reads a page together with the position to follow it from. The position is taken before the read:
/// every event of a change the page does not show comes after it.
pub async fn page(inbox: &Inbox, user: String, q: ListQuery) -> Result<LivePage, InboxError> {
    let position = inbox.position();
    let channel = inbox.channel(&user);
    let page = inbox.store().list(user, q).await?;
    Ok(LivePage {
        page,
        channel,
        position,
    })
}

/// The caller's user id, from a verified token with a `sub`.
fn caller(
    st: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    change: bool,
) -> Result<String, ApiError> {
    let (token, source) = st
        .auth
        .extract(headers, query)?
        .ok_or_else(|| st.auth.missing_token(Role::Subscriber))?;
    let claims = st.auth.verify(Role::Subscriber, &token)?;
    if change && source == TokenSource::Cookie {
        st.auth.check_publish_origin(headers)?;
    }
    let user = claims.sub.unwrap_or_default();
    if user.is_empty() {
        return Err(ApiError::forbidden(
            "user_required",
            "the inbox belongs to the token's sub, and this token has none",
        ));
    }
    super::check_user(&user)?;
    Ok(user)
}

/// A refusal: Herald's error body, with `Retry-After` when the user is over their rate.
#[derive(Debug)]
pub enum Refused {
    Api(ApiError),
    Inbox(InboxError),
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Refused::Api(e)
    }
}

impl From<InboxError> for Refused {
    fn from(e: InboxError) -> Self {
        Refused::Inbox(e)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let e = match self {
            Refused::Api(e) => return e.into_response(),
            Refused::Inbox(e) => e,
        };
        let retry = match &e {
            InboxError::RateLimited(d) => Some(d.as_secs_f64().ceil().max(1.0) as u64),
            _ => None,
        };
        let mut resp = ApiError::from(e).into_response();
        if let Some(s) = retry {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// A change's caller, counted against the per-user rate.
fn changer<'a>(
    st: &'a AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(String, &'a Inbox), Refused> {
    let inbox = inbox(st)?;
    let user = caller(st, headers, query, true)?;
    inbox.limit(&user)?;
    Ok((user, inbox))
}

fn json_body<T: serde::de::DeserializeOwned>(b: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(b)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}

fn ok(v: impl Serialize) -> Response {
    Json(v).into_response()
}

/// Bad query parameters and path ids answer with Herald's error body, as every other refusal does.
fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", e.body_text())
}

fn item_id(p: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    p.map(|Path(id)| id).map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "item_not_found",
            "an item id is a number",
        )
    })
}

async fn list(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    q: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let inbox = inbox(&st)?;
    let Query(q) = q.map_err(bad_query)?;
    let user = caller(&st, &headers, raw.as_deref(), false)?;
    Ok(ok(page(inbox, user, q).await?))
}

async fn counts(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let inbox = inbox(&st)?;
    let user = caller(&st, &headers, raw.as_deref(), false)?;
    let (counts, version) = inbox.store().counts(user).await?;
    Ok(ok(json!({"counts": counts, "version": version})))
}

async fn item(
    State(st): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let inbox = inbox(&st)?;
    let user = caller(&st, &headers, raw.as_deref(), false)?;
    let id = item_id(id)?;
    Ok(ok(inbox.store().get(user, id).await?))
}

async fn change_item(
    State(st): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let id = item_id(id)?;
    let patch: Patch = json_body(&b)?;
    Ok(ok(inbox
        .update(&user, Target::Ids(vec![id]), patch)
        .await?))
}

async fn remove_item(
    State(st): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let id = item_id(id)?;
    Ok(ok(inbox.remove(&user, Target::Ids(vec![id])).await?))
}

fn browser_target(p: &ChangeParams) -> Result<Target, ApiError> {
    if !p.user.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_target",
            "the inbox is the token's: a request names no user",
        ));
    }
    p.target()
}

/// Bulk changes: `{"ids": [..], "set": {..}}`, or `{"upto": ID, "category": .., "set": {"read": true}}`
/// ("mark all read" up to the newest item the client has shown, so newer ones stay unread).
async fn update(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let p: ChangeParams = json_body(&b)?;
    let target = browser_target(&p)?;
    let patch = p.set.clone().unwrap_or_default();
    Ok(ok(inbox.update(&user, target, patch).await?))
}

async fn remove(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let p: ChangeParams = json_body(&b)?;
    let target = browser_target(&p)?;
    if p.set.is_some() {
        return Err(ApiError::bad_request("invalid_target", "remove takes no `set`").into());
    }
    Ok(ok(inbox.remove(&user, target).await?))
}

async fn preferences(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let inbox = inbox(&st)?;
    let user = caller(&st, &headers, raw.as_deref(), false)?;
    let prefs = inbox.store().preferences(user).await?;
    Ok(ok(json!({ "preferences": prefs })))
}

async fn set_preferences(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let prefs: Preferences = json_body(&b)?;
    Ok(ok(inbox.set_preferences(&user, prefs).await?))
}

/// Web Push, when on: 404 otherwise, so a page can tell "not offered here" from a failure.
fn push(inbox: &Inbox) -> Result<&Push, ApiError> {
    inbox.push().ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "push_disabled",
            "Web Push is off: set inbox.push.enabled = true",
        )
    })
}

/// The VAPID public key for `pushManager.subscribe({applicationServerKey})`. Public by nature, so no
/// token is needed.
async fn push_vapid(State(st): State<AppState>) -> Result<Response, ApiError> {
    let push = push(inbox(&st)?)?;
    Ok(ok(json!({ "public_key": push.public_key() })))
}

async fn push_list(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let push = push(inbox(&st)?)?;
    let user = caller(&st, &headers, raw.as_deref(), false)?;
    Ok(ok(
        json!({ "subscriptions": push.subscriptions(&user).await? }),
    ))
}

/// Registers a browser's `PushSubscription` (its `toJSON()`) for the caller: 201 with what was kept.
async fn push_add(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let push = push(inbox)?;
    let input: SubscriptionInput = json_body(&b)?;
    let sub = push.subscribe(&user, input).await.map_err(ApiError::from)?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({ "subscription": sub })),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct EndpointParams {
    endpoint: String,
}

/// Forgets one of the caller's subscriptions (`{"endpoint": ..}`); 404 when they have none with it.
async fn push_remove(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Response, Refused> {
    let (user, inbox) = changer(&st, &headers, raw.as_deref())?;
    let push = push(inbox)?;
    let p: EndpointParams = json_body(&b)?;
    if !push
        .unsubscribe(&user, &p.endpoint)
        .await
        .map_err(ApiError::from)?
    {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "subscription_not_found",
            "no subscription of yours has this endpoint",
        )
        .into());
    }
    Ok(ok(json!({ "removed": true })))
}
