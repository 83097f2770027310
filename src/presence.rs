//! Who is in a channel: a seam of its own, apart from the log, because presence is state that expires
//! with its holder rather than history that is kept. One node keeps it in memory; a cluster engine keeps
//! it where every node sees it (with an expiry, so a node that dies takes its clients with it).
//!
//! `add` and `remove` never wait: they are called from connection code that must not block on a remote
//! store (and from `Drop`, when a connection ends however it ends). A remote store writes in the
//! background. `list` is the only read, and it is async.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::engine::BoxFuture;
use crate::hub::ClientInfo;
use crate::log::LogError;

pub trait PresenceStore: Send + Sync + 'static {
    /// `info.client` is now in `channel`.
    fn add(&self, channel: &str, info: Arc<ClientInfo>);

    /// `client` left `channel`; returns what it was present as, if it was.
    fn remove(&self, channel: &str, client: &str) -> Option<Arc<ClientInfo>>;

    /// The clients present in `channel` (on every node, for a cluster store), sorted by client id.
    fn list(&self, channel: &str) -> BoxFuture<'_, Result<Vec<ClientInfo>, LogError>>;
}

/// Presence of this node only, in memory: channel -> client id -> info, one shared copy per present
/// client (join/leave deliveries point at the same one).
#[derive(Default)]
pub struct LocalPresence {
    channels: RwLock<HashMap<String, HashMap<String, Arc<ClientInfo>>>>,
}

impl LocalPresence {
    /// This node's clients in `channel`, sorted by client id.
    pub fn snapshot(&self, channel: &str) -> Vec<ClientInfo> {
        let mut v: Vec<ClientInfo> = self
            .channels
            .read()
            .get(channel)
            .map(|m| m.values().map(|i| ClientInfo::clone(i)).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        v
    }

    /// Every entry this node holds (a cluster store refreshes them so they do not expire).
    pub fn all(&self) -> Vec<(String, Arc<ClientInfo>)> {
        self.channels
            .read()
            .iter()
            .flat_map(|(ch, m)| m.values().map(move |i| (ch.clone(), i.clone())))
            .collect()
    }
}

impl PresenceStore for LocalPresence {
    fn add(&self, channel: &str, info: Arc<ClientInfo>) {
        self.channels
            .write()
            .entry(channel.to_string())
            .or_default()
            .insert(info.client.clone(), info);
    }

    fn remove(&self, channel: &str, client: &str) -> Option<Arc<ClientInfo>> {
        let mut channels = self.channels.write();
        let info = channels.get_mut(channel).and_then(|m| m.remove(client));
        if channels.get(channel).is_some_and(HashMap::is_empty) {
            channels.remove(channel);
        }
        info
    }

    fn list(&self, channel: &str) -> BoxFuture<'_, Result<Vec<ClientInfo>, LogError>> {
        let v = self.snapshot(channel);
        Box::pin(async move { Ok(v) })
    }
}
