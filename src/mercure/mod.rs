//! The Mercure draft-07 hub over SSE: `GET` subscribes, `POST` publishes, and the active-subscriptions API.
//! The hub does the work; this module speaks HTTP and the Mercure rules (token roles, private updates,
//! `Last-Event-ID` semantics, subscription events).

use axum::routing::get;
use axum::Router;

use crate::state::AppState;

pub(crate) mod publish;
pub(crate) mod subscribe;
mod subscriptions;

pub const HUB_PATH: &str = "/.well-known/mercure";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(HUB_PATH, get(subscribe::subscribe).post(publish::publish))
        .route(
            &format!("{HUB_PATH}/subscriptions"),
            get(subscriptions::list_all),
        )
        .route(
            &format!("{HUB_PATH}/subscriptions/{{topic}}"),
            get(subscriptions::list_topic),
        )
        .route(
            &format!("{HUB_PATH}/subscriptions/{{topic}}/{{subscriber}}"),
            get(subscriptions::get_one),
        )
}
