//! The Centrifugo client protocol v2 (JSON) over WebSocket at `/connection/websocket`, and Centrifugo's
//! server HTTP API at `/api/<method>`, so the `centrifuge` SDKs and the `cent` server SDKs work unchanged.
//!
//! A channel here is a Mercure topic there: a publication has one identity (its log `seq`, which is the
//! channel offset here) whichever transport carries it, and the epoch is the log's.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hub::ConnMeta;
use crate::state::AppState;

pub(crate) mod api;
pub use api::Idempotency;
pub(crate) mod conn;

pub const WS_PATH: &str = "/connection/websocket";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(WS_PATH, get(conn::upgrade))
        .route("/api/openapi.json", get(api::openapi))
        .route("/api/{method}", post(api::call))
}

/// A command from the server API to one live connection. Serialized, because in a cluster it travels
/// through the engine to the node that holds the connection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Control {
    Subscribe {
        channel: String,
        /// Presence info of the subscription (JSON bytes).
        info: Option<Vec<u8>>,
        /// Sent to the client with the subscribe push.
        data: Option<Vec<u8>>,
        /// When the subscription expires (Unix seconds), if it does.
        expire_at: Option<u64>,
    },
    Unsubscribe {
        channel: String,
    },
    Disconnect {
        code: u16,
        reason: String,
        /// Client ids of the user that stay connected.
        #[serde(default)]
        whitelist: Vec<String>,
    },
    Refresh {
        expire_at: Option<u64>,
        expired: bool,
        info: Option<serde_json::Value>,
    },
    /// One of the connection's deadlines is due (from [`Deadlines`]); never sent between nodes.
    #[serde(skip)]
    Deadline,
}

/// Live WebSocket connections of this node by user and client id, so the server API can reach them; and
/// the one clock their deadlines share.
#[derive(Default)]
pub struct Clients {
    /// user -> client id -> entry; the client id is the connection's own, shared, not a copy.
    by_user: RwLock<HashMap<String, HashMap<Arc<str>, Entry>>>,
    deadlines: OnceLock<Arc<Deadlines>>,
}

/// One registered connection: where its controls go, and what it is (for listings).
struct Entry {
    tx: crate::queue::Sender<Control>,
    meta: Arc<ConnMeta>,
}

/// A connected WebSocket client as [`Clients::list`] shows it.
#[derive(Debug, Clone)]
pub struct ClientListing {
    pub user: String,
    pub client: String,
    pub meta: Arc<ConnMeta>,
}

/// A connection's place in [`Clients`]; dropping it removes it, however the connection ends. It shares the
/// connection's user and client id rather than copying them: an idle connection pays for every byte.
pub struct Registration {
    clients: Arc<Clients>,
    who: Arc<crate::access::Identity>,
    client: Arc<str>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut m = self.clients.by_user.write();
        if let Some(c) = m.get_mut(self.who.user.as_str()) {
            c.remove(&*self.client);
            if c.is_empty() {
                m.remove(self.who.user.as_str());
            }
        }
    }
}

impl Clients {
    /// The deadline clock, started with the first connection; it ends (telling every connection) when
    /// `shutdown` is cancelled.
    pub fn deadlines(&self, shutdown: &CancellationToken) -> Arc<Deadlines> {
        self.deadlines
            .get_or_init(|| Deadlines::start(shutdown.clone()))
            .clone()
    }

    pub fn add(
        self: &Arc<Self>,
        who: Arc<crate::access::Identity>,
        client: Arc<str>,
        tx: crate::queue::Sender<Control>,
        meta: Arc<ConnMeta>,
    ) -> Registration {
        self.by_user
            .write()
            .entry(who.user.clone())
            .or_default()
            .insert(client.clone(), Entry { tx, meta });
        Registration {
            clients: self.clone(),
            who,
            client,
        }
    }

    /// Hands `ctl` to the user's connections on this node (or only `client`); returns how many took it.
    pub fn send(&self, user: &str, client: Option<&str>, ctl: Control) -> usize {
        let targets: Vec<(Arc<str>, crate::queue::Sender<Control>)> = self
            .by_user
            .read()
            .get(user)
            .map(|m| {
                m.iter()
                    .filter(|(c, _)| client.is_none_or(|want| want == &***c))
                    .map(|(c, e)| (c.clone(), e.tx.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let spared = |c: &str| match &ctl {
            Control::Disconnect { whitelist, .. } => whitelist.iter().any(|w| w == c),
            _ => false,
        };
        targets
            .iter()
            .filter(|(c, _)| !spared(c))
            .filter(|(_, tx)| tx.try_send(ctl.clone()).is_ok())
            .count()
    }

    /// The hub's control sink: a serialized [`Control`] from any node, for this node's connections.
    pub fn deliver(&self, user: &str, client: Option<&str>, payload: &[u8]) {
        match serde_json::from_slice::<Control>(payload) {
            Ok(ctl) => {
                self.send(user, client, ctl);
            }
            Err(e) => tracing::warn!(error = %e, "undecodable control message"),
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        let m = self.by_user.read();
        (m.values().map(HashMap::len).sum(), m.len())
    }

    /// The connected clients of this node, by user then client id, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<ClientListing> {
        let m = self.by_user.read();
        let mut out: Vec<ClientListing> = m
            .iter()
            .flat_map(|(user, clients)| {
                clients.iter().map(|(client, e)| ClientListing {
                    user: user.clone(),
                    client: client.to_string(),
                    meta: e.meta.clone(),
                })
            })
            .collect();
        drop(m);
        out.sort_by(|a, b| (&a.user, &a.client).cmp(&(&b.user, &b.client)));
        out.truncate(limit);
        out
    }
}

/// The deadlines of every connection (connect timeout, pings and pongs, token expiry), on one clock that
/// wakes a connection only when one of its own is due. An idle connection is woken once per ping interval,
/// not several times a second; a timer per connection would be another allocation and timer-wheel entry
/// per idle connection. At shutdown every connection is woken at once (it then sees the shutdown).
pub struct Deadlines {
    heap: Mutex<BinaryHeap<Reverse<Due>>>,
    changed: Notify,
}

struct Due {
    at: Instant,
    tx: crate::queue::Sender<Control>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Deadlines {
    fn start(shutdown: CancellationToken) -> Arc<Deadlines> {
        let d = Arc::new(Deadlines {
            heap: Mutex::new(BinaryHeap::new()),
            changed: Notify::new(),
        });
        tokio::spawn(d.clone().run(shutdown));
        d
    }

    /// Wakes the connection behind `tx` (with [`Control::Deadline`]) at `at`.
    pub fn schedule(&self, at: Instant, tx: crate::queue::Sender<Control>) {
        let earliest = {
            let mut heap = self.heap.lock();
            heap.push(Reverse(Due { at, tx }));
            heap.peek().is_some_and(|Reverse(d)| d.at == at)
        };
        if earliest {
            self.changed.notify_one();
        }
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.heap.lock().peek().map(|Reverse(d)| d.at);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.changed.notified() => continue,
                _ = sleep => {}
            }
            let now = Instant::now();
            let due: Vec<Due> = {
                let mut heap = self.heap.lock();
                let mut due = Vec::new();
                while heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
                    if let Some(Reverse(d)) = heap.pop() {
                        due.push(d);
                    }
                }
                due
            };
            for d in due {
                metrics::counter!("herald_ws_deadline_wakeups_total").increment(1);
                if let Err(crate::queue::TrySendError::Full(_)) = d.tx.try_send(Control::Deadline) {
                    // Its control queue is full: it is busy, and will look at its deadlines soon. Retry.
                    self.schedule(now + Duration::from_millis(100), d.tx);
                }
            }
        }
        // Shutdown: wake everyone still waiting, so each closes with 3001.
        let all: Vec<Due> = self.heap.lock().drain().map(|Reverse(d)| d).collect();
        for d in all {
            let _ = d.tx.try_send(Control::Deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection task that panics still leaves the registry: its place is a guard, dropped while
    /// unwinding.
    #[tokio::test]
    async fn a_panicking_task_leaves_the_registry() {
        let clients = Arc::new(Clients::default());
        let (tx, _rx) = crate::queue::channel(4);
        let hub = crate::hub::Hub::new(
            Arc::new(crate::engine::LocalEngine::new(
                Arc::new(crate::log::MemoryLog::new()),
                Default::default(),
                Duration::from_secs(60),
            )),
            Default::default(),
        )
        .await
        .unwrap();
        let guard = hub.connect(crate::hub::Transport::WebSocket, None).unwrap();
        let c = clients.clone();
        let task = tokio::spawn(async move {
            let who = Arc::new(crate::access::Identity {
                user: "u".into(),
                ..Default::default()
            });
            let _registered = c.add(who, "c1".into(), tx, guard.meta().clone());
            assert_eq!(c.counts(), (1, 1));
            panic!("injected: the connection task panics");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(clients.counts(), (0, 0));
    }

    /// The deadline clock wakes a connection when its deadline is due, and everyone at shutdown.
    #[tokio::test]
    async fn deadlines_wake_when_due_and_at_shutdown() {
        let shutdown = CancellationToken::new();
        let clients = Clients::default();
        let d = clients.deadlines(&shutdown);
        let (soon_tx, mut soon) = crate::queue::channel(4);
        let (later_tx, mut later) = crate::queue::channel(4);
        d.schedule(Instant::now() + Duration::from_secs(3600), later_tx);
        d.schedule(Instant::now() + Duration::from_millis(20), soon_tx);
        assert!(matches!(soon.recv().await, Some(Control::Deadline)));
        assert!(later.try_recv().is_none(), "not woken before its time");
        shutdown.cancel();
        assert!(
            matches!(later.recv().await, Some(Control::Deadline)),
            "woken at shutdown"
        );
    }
}
