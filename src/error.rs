//! The HTTP error every endpoint answers with: a status, a stable machine-readable `code` and a human
//! `message`. A client should never have to guess why it got a 401: the message names the cause (no token
//! where we looked, bad signature, expired, topic not granted) and where the token was expected.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(&self)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        // For the access log (`log_refusals`), which knows the request this answers.
        resp.extensions_mut().insert(self);
        resp
    }
}

/// Logs every refused request with its method, path, status, code and message: an operator must be able
/// to see why clients get 401s and 403s without asking them. Auth and permission refusals (and other
/// 4xx that point at a client bug) at info, server-side failures at warn, plain 404s at debug.
pub async fn log_refusals(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if let Some(e) = resp.extensions().get::<ApiError>() {
        let (status, code, message) = (e.status.as_u16(), e.code, e.message.as_str());
        match e.status {
            s if s.is_server_error() => {
                tracing::warn!(%method, path, status, code, message, "request failed")
            }
            StatusCode::NOT_FOUND => {
                tracing::debug!(%method, path, status, code, message, "request refused")
            }
            _ => tracing::info!(%method, path, status, code, message, "request refused"),
        }
    }
    resp
}

impl From<crate::hub::HubError> for ApiError {
    fn from(e: crate::hub::HubError) -> Self {
        use crate::hub::HubError as H;
        match &e {
            H::TooManyConnections(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                e.to_string(),
            ),
            H::TooManyTopics { .. } => ApiError::bad_request("too_many_topics", e.to_string()),
            H::MessageTooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                e.to_string(),
            ),
            H::InvalidId(_) => ApiError::bad_request("invalid_id", e.to_string()),
            H::NoTopic => ApiError::bad_request("missing_topic", e.to_string()),
            H::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            H::Log(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                e.to_string(),
            ),
        }
    }
}
