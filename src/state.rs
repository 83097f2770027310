//! What every HTTP handler shares.

use std::sync::Arc;

use crate::auth::Auth;
use crate::config::Config;
use crate::hub::Hub;

#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
}
