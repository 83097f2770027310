//! The document API for backends, behind the server API key (`centrifugo.api_key`), like the rest of the
//! server API: list documents, read one as a Yjs update or as the JSON of one of its shared types, and
//! apply an update server-side (stored and sent to every client like a client's own); list, take and read
//! a document's point-in-time snapshots, and restore one (an edit like any other, see `restore.rs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::doc::Loaded;
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
    /// Snapshot endpoints: the snapshot's id (as listed). A string, so that a bad one gets our error.
    id: Option<String>,
}

impl DocQuery {
    fn snapshot_id(&self) -> Result<u64, ApiError> {
        self.id
            .as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&id| id > 0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_snapshot",
                    "`id` must be a snapshot id, as GET /api/yjs/doc/snapshots lists them",
                )
            })
    }

    /// The shared type and kind asked for by a JSON read.
    fn root_kind(&self) -> Result<(&str, &str), ApiError> {
        let root = self.root.as_deref().ok_or_else(|| {
            ApiError::bad_request("missing_type", "add `type`, the shared type's name")
        })?;
        let kind = self.kind.as_deref().unwrap_or("text");
        if !matches!(kind, "text" | "map" | "array" | "xml") {
            return Err(ApiError::bad_request(
                "invalid_kind",
                "`kind` is text, map, array or xml",
            ));
        }
        Ok((root, kind))
    }
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
        DocError::SnapshotNotFound(..) => {
            ApiError::new(StatusCode::NOT_FOUND, "snapshot_not_found", e.to_string())
        }
        DocError::DocumentNotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "document_not_found", e.to_string())
        }
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
    let (root, kind) = q.root_kind()?;
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

fn time_of(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

fn snapshot_json(s: &super::doc::SnapshotInfo) -> serde_json::Value {
    json!({"id": s.id, "time": time_of(s.time_ms), "time_ms": s.time_ms, "size": s.size, "reason": s.reason})
}

/// `GET /api/yjs/doc/snapshots?name=`: the document's point-in-time snapshots, newest first.
pub async fn list_snapshots(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let list = docs
        .snapshots(checked_name(&q.name)?)
        .await
        .map_err(doc_error)?;
    let list: Vec<serde_json::Value> = list.iter().map(snapshot_json).collect();
    Ok(Json(json!({"doc": q.name, "snapshots": list})))
}

/// `POST /api/yjs/doc/snapshot?name=`: takes a snapshot now (before a risky bulk change, say).
pub async fn take_snapshot(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let name = checked_name(&q.name)?;
    if st
        .hub
        .engine()
        .channel_top(channel_of(name), u64::MAX)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .is_none()
    {
        return Err(doc_error(DocError::DocumentNotFound(name.to_string())));
    }
    let doc = docs.open(name).await.map_err(doc_error)?;
    let info = docs
        .take_snapshot(&doc, "api", true)
        .await
        .map_err(doc_error)?
        .ok_or_else(|| ApiError::internal("the snapshot was not taken"))?;
    Ok(Json(
        json!({"doc": q.name, "snapshot": snapshot_json(&info)}),
    ))
}

/// `GET /api/yjs/doc/snapshot?name=&id=`: the snapshot as one Yjs v1 update.
pub async fn read_snapshot(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let id = q.snapshot_id()?;
    let r = docs
        .snapshot(checked_name(&q.name)?, id)
        .await
        .map_err(doc_error)?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        r.data.clone(),
    )
        .into_response())
}

/// `GET /api/yjs/doc/snapshot/json?name=&id=&type=&kind=`: one shared type of the snapshot as JSON.
pub async fn read_snapshot_json(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let id = q.snapshot_id()?;
    let (root, kind) = q.root_kind()?;
    let r = docs
        .snapshot(checked_name(&q.name)?, id)
        .await
        .map_err(doc_error)?;
    let value = Loaded::json_of_update(&r.data, root, kind)
        .map_err(doc_error)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "type_not_found",
                format!("snapshot {id} of {} has no shared type {root:?}", q.name),
            )
        })?;
    Ok(Json(
        json!({"doc": q.name, "snapshot": id, "type": root, "kind": kind, "value": value}),
    ))
}

/// `POST /api/yjs/doc/restore?name=&id=`: makes the document hold the snapshot's content again, as an
/// edit stored and sent to every client like any other.
pub async fn restore(
    State(st): State<AppState>,
    Extension(docs): Extension<Arc<Docs>>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let id = q.snapshot_id()?;
    let done = docs
        .restore(checked_name(&q.name)?, id)
        .await
        .map_err(doc_error)?;
    Ok(Json(json!({
        "doc": q.name,
        "restored": done.snapshot,
        "before": done.before,
        "update_size": done.update_size,
    })))
}
