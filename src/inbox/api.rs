//! The backend's inbox methods, beside the server API and in its style: `POST /api/inbox_<method>` with the
//! API key and a JSON body, answered with `{"result": …}`. Unlike the Centrifugo methods (which answer
//! HTTP 200 with an error object, as Centrifugo's SDKs expect), these are Herald's own, so a refusal is an
//! HTTP status with Herald's error body: 400 for bad input, 404 for an item outside the inbox, 503 when the
//! store cannot commit.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Inbox, ListQuery, NewItem, Patch, Target};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/inbox_notify", post(notify))
        .route("/api/inbox_list", post(list))
        .route("/api/inbox_counts", post(counts))
        .route("/api/inbox_update", post(update))
        .route("/api/inbox_remove", post(remove))
        .route("/api/inbox_preferences", post(preferences))
        .route("/api/inbox_stats", post(stats))
}

/// The inbox, after checking the API key: 404 when the inbox is off.
pub(crate) fn inbox(st: &AppState) -> Result<&Inbox, ApiError> {
    st.inbox.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "inbox_disabled",
            "the inbox is off: set inbox.enabled = true",
        )
    })
}

fn body<T: serde::de::DeserializeOwned + Default>(b: &Bytes) -> Result<T, ApiError> {
    if b.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(b)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}

fn setup<'a>(st: &'a AppState, headers: &HeaderMap) -> Result<&'a Inbox, ApiError> {
    crate::centrifugo::api::authorize(st, headers)?;
    inbox(st)
}

fn result(v: impl serde::Serialize) -> Json<Value> {
    Json(json!({ "result": v }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct NotifyParams {
    users: Vec<String>,
    /// Instead of `users`: `{"all": true}`, every user that has an inbox.
    audience: Option<Audience>,
    item: NewItem,
    idempotency_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Audience {
    all: bool,
}

async fn notify(
    State(st): State<AppState>,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    let p: NotifyParams = body(&b)?;
    if let Some(a) = &p.audience {
        if !a.all || !p.users.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_audience",
                "give either users or audience {\"all\": true}",
            ));
        }
        let r = inbox.notify_all(p.item, p.idempotency_key).await?;
        return Ok(result(json!({ "audience": r })));
    }
    Ok(result(
        inbox.notify(p.users, p.item, p.idempotency_key).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UserParams {
    user: String,
    #[serde(flatten)]
    query: ListQuery,
}

fn user(u: &str) -> Result<&str, ApiError> {
    super::check_user(u)?;
    Ok(u)
}

async fn list(
    State(st): State<AppState>,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    let p: UserParams = body(&b)?;
    let u = user(&p.user)?.to_string();
    Ok(result(super::browser::page(inbox, u, p.query).await?))
}

async fn counts(
    State(st): State<AppState>,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    let p: UserParams = body(&b)?;
    let u = user(&p.user)?.to_string();
    let (counts, version) = inbox.store().counts(u).await?;
    Ok(result(json!({"counts": counts, "version": version})))
}

/// Which items: `ids`, or every item up to `upto` (optionally of one `category`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ChangeParams {
    pub user: String,
    pub ids: Option<Vec<i64>>,
    pub upto: Option<i64>,
    pub category: Option<String>,
    pub set: Option<Patch>,
}

impl ChangeParams {
    pub(crate) fn target(&self) -> Result<Target, ApiError> {
        match (&self.ids, self.upto) {
            (Some(ids), None) if self.category.is_none() => Ok(Target::Ids(ids.clone())),
            (None, Some(upto)) => Ok(Target::UpTo {
                upto,
                category: self.category.clone(),
            }),
            _ => Err(ApiError::bad_request(
                "invalid_target",
                "give either ids, or upto (with an optional category)",
            )),
        }
    }
}

async fn update(
    State(st): State<AppState>,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    let p: ChangeParams = body(&b)?;
    let target = p.target()?;
    let u = user(&p.user)?;
    let patch = p.set.clone().unwrap_or_default();
    Ok(result(inbox.update(u, target, patch).await?))
}

async fn remove(
    State(st): State<AppState>,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    let p: ChangeParams = body(&b)?;
    if p.set.is_some() {
        return Err(ApiError::bad_request(
            "invalid_target",
            "remove takes no `set`",
        ));
    }
    let target = p.target()?;
    let u = user(&p.user)?;
    Ok(result(inbox.remove(u, target).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PreferencesParams {
    user: String,
    /// When given, replaces the preferences; otherwise they are read.
    set: Option<super::Preferences>,
}

async fn preferences(
    State(st): State<AppState>,
    headers: HeaderMap,
    b: Bytes,
) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    let p: PreferencesParams = body(&b)?;
    let u = user(&p.user)?;
    match p.set {
        Some(prefs) => Ok(result(inbox.set_preferences(u, prefs).await?)),
        None => Ok(result(
            json!({"preferences": inbox.store().preferences(u.to_string()).await?}),
        )),
    }
}

async fn stats(State(st): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let inbox = setup(&st, &headers)?;
    Ok(result(inbox.store().stats().await?))
}
