//! The Centrifugo client protocol v2 (JSON) over WebSocket at `/connection/websocket`, and Centrifugo's
//! server HTTP API at `/api/<method>`, so the `centrifuge` SDKs and the `cent` server SDKs work unchanged.
//!
//! A channel here is a Mercure topic there: a publication has one identity (its log `seq`, which is the
//! channel offset here) whichever transport carries it, and the epoch is the log's.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use parking_lot::RwLock;
use tokio::sync::watch;

use crate::state::AppState;

mod api;
pub(crate) mod conn;

pub const WS_PATH: &str = "/connection/websocket";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(WS_PATH, get(conn::upgrade))
        .route("/api/openapi.json", get(api::openapi))
        .route("/api/{method}", post(api::call))
}

/// A command from the server API to one live connection.
#[derive(Debug, Clone)]
pub enum Control {
    Subscribe {
        channel: String,
        info: Option<serde_json::Value>,
    },
    Unsubscribe {
        channel: String,
    },
    Disconnect {
        code: u16,
        reason: String,
    },
    Refresh {
        expire_at: Option<u64>,
        expired: bool,
        info: Option<serde_json::Value>,
    },
}

/// Live WebSocket connections of this node by user and client id, so the server API can reach them.
#[derive(Default)]
pub struct Clients {
    by_user: RwLock<HashMap<String, HashMap<String, crate::queue::Sender<Control>>>>,
    ticks: OnceLock<watch::Receiver<()>>,
}

impl Clients {
    /// One clock for the deadlines of every connection (pings, pong and connect timeouts, token expiry):
    /// a timer per connection would be another allocation per idle connection and as many timer-wheel
    /// entries. The ticking task starts with the first connection and ends with this registry.
    pub fn ticks(&self, period: Duration) -> watch::Receiver<()> {
        self.ticks
            .get_or_init(|| {
                let (tx, rx) = watch::channel(());
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(period);
                    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    every.tick().await;
                    loop {
                        every.tick().await;
                        if tx.send(()).is_err() {
                            break; // the registry, and with it every receiver, is gone
                        }
                    }
                });
                rx
            })
            .clone()
    }

    pub fn add(&self, user: &str, client: &str, tx: crate::queue::Sender<Control>) {
        self.by_user
            .write()
            .entry(user.to_string())
            .or_default()
            .insert(client.to_string(), tx);
    }

    pub fn remove(&self, user: &str, client: &str) {
        let mut m = self.by_user.write();
        if let Some(c) = m.get_mut(user) {
            c.remove(client);
            if c.is_empty() {
                m.remove(user);
            }
        }
    }

    /// Sends `ctl` to the user's connections (or only `client`); returns how many were reached.
    pub fn send(&self, user: &str, client: Option<&str>, ctl: Control) -> usize {
        let targets: Vec<crate::queue::Sender<Control>> = self
            .by_user
            .read()
            .get(user)
            .map(|m| {
                m.iter()
                    .filter(|(c, _)| client.is_none_or(|want| want == c.as_str()))
                    .map(|(_, tx)| tx.clone())
                    .collect()
            })
            .unwrap_or_default();
        targets
            .iter()
            .filter(|tx| tx.try_send(ctl.clone()).is_ok())
            .count()
    }

    pub fn counts(&self) -> (usize, usize) {
        let m = self.by_user.read();
        (m.values().map(HashMap::len).sum(), m.len())
    }
}
