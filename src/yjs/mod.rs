//! Yjs documents over the y-websocket protocol: the stock `WebsocketProvider` of the `y-websocket` npm
//! package connects to `/yjs/<document>` unchanged, documents are stored by the engine (so they survive a
//! restart and are shared by every node of a cluster), and JWTs decide who reads or edits which document
//! (`access::Access::doc_right`).
//!
//! - `conn.rs`: one task per socket (sync steps, updates, awareness, query-awareness, auth refusals);
//! - `doc.rs`: the loaded documents, their storage on reserved channels, compaction, idle unloading,
//!   document events;
//! - `api.rs`: the HTTP API for backends (list, read as an update or as JSON, apply an update; list, take,
//!   read and restore point-in-time snapshots);
//! - `restore.rs`: the edit that makes a document hold a snapshot's content again;
//! - `socket.rs`: the WebSocket upgrade and a socket that keeps no write buffer while idle.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Extension, Router};

use crate::hub::Hub;
use crate::state::AppState;

mod api;
mod conn;
pub mod doc;
pub mod restore;
mod socket;

pub use conn::{
    CLOSE_DOCUMENT_FULL, CLOSE_FORBIDDEN, CLOSE_INVALID, CLOSE_TOO_BIG, CLOSE_UNAUTHORIZED,
};
pub use doc::{DocError, Docs};

/// Where providers connect: their `serverUrl` is `ws(s)://<host>/yjs`.
pub const WS_PREFIX: &str = "/yjs";

/// The document routes, with the documents of this router (their background work starts with the first
/// document opened, so building a router needs no runtime).
pub fn routes(hub: &Hub, config: &crate::config::YjsConfig) -> Router<AppState> {
    if !config.enabled {
        return Router::new();
    }
    let docs = Docs::new(hub.clone(), config.clone());
    Router::new()
        .route("/yjs/{*name}", get(conn::upgrade))
        .route("/api/yjs/docs", get(api::list))
        .route("/api/yjs/doc", get(api::read))
        .route("/api/yjs/doc/json", get(api::read_json))
        .route("/api/yjs/doc/update", post(api::apply_update))
        .route("/api/yjs/doc/snapshots", get(api::list_snapshots))
        .route(
            "/api/yjs/doc/snapshot",
            get(api::read_snapshot).post(api::take_snapshot),
        )
        .route("/api/yjs/doc/snapshot/json", get(api::read_snapshot_json))
        .route("/api/yjs/doc/restore", post(api::restore))
        .layer(Extension::<Arc<Docs>>(docs))
}
