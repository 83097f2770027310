//! The document API for backends, behind the server API key (`centrifugo.api_key`), like the rest of the
//! server API: list documents, read one as a Yjs update or as the JSON of one of its shared types, and
//! apply an update server-side (stored and sent to every client like a client's own).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::doc::{channel_of, valid_name, DocError, Docs, CHANNEL_PREFIX};
use crate::centrifugo::api::authorize;
use crate::error::ApiError;
use crate::state::AppState;

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

#[derive(Deserialize)]
pub struct DocQuery {
    name: String,
    /// `read_json`: the root type's name.
    #[serde(rename = "type")]
    root: Option<String>,
    /// `read_json`: text (default), map, array or xml.
    kind: Option<String>,
}

fn doc_error(e: DocError) -> ApiError {
    match e {
        DocError::Corrupt(_) => ApiError::bad_request("update_corrupt", e.to_string()),
        DocError::UpdateTooLarge { .. } | DocError::DocumentFull(_) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
        }
        DocError::TooMany(_) | DocError::Unloaded => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
        }
        DocError::Hub(_) | DocError::Log(_) => ApiError::internal(e.to_string()),
    }
}

fn checked_name(name: &str) -> Result<&str, ApiError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(ApiError::bad_request(
            "invalid_document",
            "`name` must be 1 to 255 bytes without control characters",
        ))
    }
}

/// `GET /api/yjs/docs?prefix=&after=&limit=`: stored documents, by name, in pages.
pub async fn list(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let after = if q.after.is_empty() {
        String::new()
    } else {
        channel_of(&q.after)
    };
    let channels = st
        .hub
        .engine()
        .channels(format!("{CHANNEL_PREFIX}{}", q.prefix), after, limit)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let names: Vec<&str> = channels
        .iter()
        .filter_map(|c| c.strip_prefix(CHANNEL_PREFIX))
        .collect();
    Ok(Json(json!({"docs": names, "loaded": docs.loaded_names()})))
}

/// `GET /api/yjs/doc?name=`: the whole document as one Yjs v1 update (`Y.applyUpdate` reads it).
pub async fn read(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let doc = docs.open(checked_name(&q.name)?).await.map_err(doc_error)?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        doc.state_update(),
    )
        .into_response())
}

/// `GET /api/yjs/doc/json?name=&type=&kind=`: the content of one shared type as JSON (a text as a string).
pub async fn read_json(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let root = q.root.as_deref().ok_or_else(|| {
        ApiError::bad_request("missing_type", "add `type`, the shared type's name")
    })?;
    let kind = q.kind.as_deref().unwrap_or("text");
    if !matches!(kind, "text" | "map" | "array" | "xml") {
        return Err(ApiError::bad_request(
            "invalid_kind",
            "`kind` is text, map, array or xml",
        ));
    }
    let doc = docs.open(checked_name(&q.name)?).await.map_err(doc_error)?;
    let value = doc.root_json(root, kind).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "type_not_found",
            format!("document {} has no shared type {root:?}", q.name),
        )
    })?;
    Ok(Json(
        json!({"doc": q.name, "type": root, "kind": kind, "value": value}),
    ))
}

/// `POST /api/yjs/doc/update?name=` with a Yjs v1 update as the body: stored, then sent to every client.
pub async fn apply_update(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let doc = docs.open(checked_name(&q.name)?).await.map_err(doc_error)?;
    docs.submit_update(&doc, None, body)
        .await
        .map_err(doc_error)?;
    Ok(Json(json!({"doc": q.name, "applied": true})))
}
