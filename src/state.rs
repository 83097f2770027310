//! What every HTTP handler shares.

use std::sync::Arc;

use crate::access::Access;
use crate::auth::Auth;
use crate::centrifugo::Clients;
use crate::config::Config;
use crate::cors::OriginList;
use crate::hub::Hub;

#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub auth: Arc<Auth>,
    /// The one access model: every read path asks it.
    pub access: Arc<Access>,
    pub config: Arc<Config>,
    /// `cors.allowed_origins`, parsed once: CORS and the WebSocket origin check share it.
    pub origins: Arc<OriginList>,
    pub clients: Arc<Clients>,
    /// Results of server API publishes made with an idempotency key.
    pub idempotency: Arc<crate::centrifugo::Idempotency>,
    /// The notification centre, when `inbox.enabled`.
    pub inbox: Option<crate::inbox::Inbox>,
}
