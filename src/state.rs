//! What every HTTP handler shares.

use std::sync::Arc;

use crate::auth::Auth;
use crate::centrifugo::Clients;
use crate::config::Config;
use crate::cors::OriginList;
use crate::hub::Hub;

#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
    /// `cors.allowed_origins`, parsed once: CORS and the WebSocket origin check share it.
    pub origins: Arc<OriginList>,
    pub clients: Arc<Clients>,
}
