//! Who may read what: the one answer, for every read path of every transport.
//!
//! Herald has two faces over one log (Mercure over SSE, Centrifugo over WebSocket), and either face can
//! publish what the other reads. When each face kept its own rules, one face leaked what the other
//! protected. So every read path (SSE live, replay and resume; WebSocket subscribe, publications, history,
//! recovery, presence, join/leave; the subscriptions API) asks this module, and nothing else decides.
//!
//! The model, in the order it is applied (docs/USAGE.md, "Who can read what", says the same for users):
//! 1. **Who**: an [`Identity`] from one verified token, whichever face it came through: `sub` is the user,
//!    and the explicit grants are `mercure.subscribe` (selectors) plus the channels of `channels` and
//!    `subs` (Centrifugo). No token: anonymous, only where `auth.allow_anonymous` lets a connection in.
//! 2. **The channel's rules** (a name in a configured namespace, or without `:`): a `#` user list admits only
//!    its users, and nothing overrides that; then the namespace's `subscribe` policy: `public` admits
//!    everyone connected, `authenticated` needs a user, `token` needs an explicit grant of the channel (a
//!    subscription token for it, or a matching grant in the token). A topic in no configured namespace (a
//!    Mercure URL such as `https://example.com/books/1`) has no channel rules.
//! 3. **The record's flag**: a `private` publication is readable only with an explicit grant of one of its
//!    topics (a matching grant, a subscription token for it, or a `#` list naming the user).
//!
//! Yjs documents (their own endpoint, `yjs`) are decided here too, by [`Access::doc_right`].
//!
//! A record reaches a subscription when one of its topics is selected by the subscription *and* passes 2
//! for this identity, and it passes 3. Exact selectors are checked when subscribing (refused with a clear
//! error); wildcards and templates cannot be, so the same check runs per record, live and in history.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use crate::auth::Claims;
use crate::channel;
use crate::config::{
    AnonymousDocs, CentrifugoConfig, NamespaceConfig, PublishPolicy, SubscribePolicy,
};
use crate::log::Record;
use crate::topic::Selector;

/// Who is reading, from one verified token (or none).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The token's `sub`; empty when it had none or there was no token.
    pub user: String,
    /// False for a connection without a token.
    pub authenticated: bool,
    /// Explicit read grants: `mercure.subscribe`, and the channels of `channels` and `subs`.
    pub grants: Vec<Selector>,
}

impl Identity {
    /// The identity of a connection without a token.
    pub fn anonymous() -> Arc<Identity> {
        static ANON: OnceLock<Arc<Identity>> = OnceLock::new();
        ANON.get_or_init(|| Arc::new(Identity::default())).clone()
    }

    pub fn from_claims(c: &Claims) -> Identity {
        let mut grants = c.subscribe_selectors();
        grants.extend(
            c.channels
                .iter()
                .chain(c.subs.keys())
                .map(|ch| Selector::Exact(ch.as_str().into())),
        );
        Identity {
            user: c.sub.clone().unwrap_or_default(),
            authenticated: true,
            grants,
        }
    }

    /// Explicitly granted `topic`: by a grant, by `extra` (a subscription token's channel), or by a `#`
    /// list that names this user.
    fn granted(&self, topic: &str, extra: Option<&str>) -> bool {
        extra == Some(topic)
            || self.grants.iter().any(|g| g.matches(topic))
            || channel::users_of(topic).is_some_and(|u| channel::lists_user(u, &self.user))
    }
}

/// Why a read or a client publish was refused. The message is for people; the face maps the variant to
/// its own code (403 `topic_not_allowed` on SSE, error 103 on WebSocket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the channel is limited to other users")]
    OtherUsers,
    #[error("the channel's namespace is for authenticated users (a token with sub)")]
    NeedsUser,
    #[error(
        "the channel's namespace needs a subscription token or a grant of the channel in the token"
    )]
    NeedsGrant,
    #[error(
        "channels starting with $ are Herald's own (documents' storage), read through their protocol only"
    )]
    Reserved,
    #[error("clients may not publish into this channel")]
    PublishOff,
    #[error("only subscribers may publish into this channel")]
    NotSubscribed,
}

/// Why a name is not a channel on the Centrifugo face.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    Invalid,
    UnknownNamespace,
}

/// Channels whose names start with `$` are Herald's own (a document's updates, snapshots and awareness):
/// no client reads them over SSE or the Centrifugo protocol, and no publisher writes into them.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('$')
}

/// What a connection may do with one Yjs document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DocRight {
    None,
    Read,
    Write,
}

/// The channel rules of the config, resolved once.
#[derive(Debug)]
pub struct Access {
    namespaces: HashMap<String, NamespaceConfig>,
    personal: String,
    anonymous_docs: AnonymousDocs,
}

impl Access {
    pub fn new(cfg: &CentrifugoConfig) -> Access {
        let mut namespaces: HashMap<String, NamespaceConfig> = cfg
            .namespaces
            .iter()
            .map(|n| (n.name.clone(), n.clone()))
            .collect();
        // The default namespace and the personal one exist even when not configured.
        for implicit in ["", cfg.personal_namespace.as_str()] {
            namespaces
                .entry(implicit.to_string())
                .or_insert_with(|| NamespaceConfig {
                    name: implicit.to_string(),
                    ..Default::default()
                });
        }
        Access {
            namespaces,
            personal: cfg.personal_namespace.clone(),
            anonymous_docs: AnonymousDocs::None,
        }
    }

    /// What a connection without a token may do with documents (`yjs.anonymous`).
    pub fn with_anonymous_docs(mut self, anonymous: AnonymousDocs) -> Access {
        self.anonymous_docs = anonymous;
        self
    }

    /// May the holder of `claims` (`None`: no token) read or edit the Yjs document `name`? The `docs`
    /// claim grants on top of the anonymous right, which is everyone's floor. Documents live on their own
    /// endpoint, so this is their whole read check: no channel rule of either face applies to them.
    pub fn doc_right(&self, claims: Option<&Claims>, name: &str) -> DocRight {
        let floor = match self.anonymous_docs {
            AnonymousDocs::None => DocRight::None,
            AnonymousDocs::Read => DocRight::Read,
            AnonymousDocs::Write => DocRight::Write,
        };
        let Some(docs) = claims.and_then(|c| c.docs.as_ref()) else {
            return floor;
        };
        let matches = |list: &[String]| list.iter().any(|s| Selector::parse(s).matches(name));
        let granted = if matches(&docs.write) {
            DocRight::Write
        } else if matches(&docs.read) {
            DocRight::Read
        } else {
            DocRight::None
        };
        granted.max(floor)
    }

    /// The namespace whose rules govern `name`, or `None` for a topic in no configured namespace.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceConfig> {
        self.namespaces.get(channel::namespace_of(name))
    }

    /// `name` as the Centrifugo face accepts it: a valid name in a known namespace.
    pub fn channel(&self, name: &str) -> Result<&NamespaceConfig, ChannelError> {
        if !channel::is_valid(name) {
            return Err(ChannelError::Invalid);
        }
        self.namespace(name).ok_or(ChannelError::UnknownNamespace)
    }

    /// The personal channel of `user`, if personal channels are configured.
    pub fn personal_channel(&self, user: &str) -> Option<String> {
        channel::personal(&self.personal, user)
    }

    /// May `who` read the stream `name` (rule 2 of the module doc)? `extra` is a subscription token's channel.
    pub fn check_read(
        &self,
        who: &Identity,
        name: &str,
        extra: Option<&str>,
    ) -> Result<(), Denied> {
        if is_reserved(name) {
            return Err(Denied::Reserved);
        }
        let Some(ns) = self.namespace(name) else {
            return Ok(());
        };
        if let Some(users) = channel::users_of(name) {
            if !channel::lists_user(users, &who.user) {
                return Err(Denied::OtherUsers);
            }
        }
        match ns.subscribe {
            SubscribePolicy::Public => Ok(()),
            SubscribePolicy::Authenticated if !who.user.is_empty() => Ok(()),
            SubscribePolicy::Authenticated => Err(Denied::NeedsUser),
            SubscribePolicy::Token if who.granted(name, extra) => Ok(()),
            SubscribePolicy::Token => Err(Denied::NeedsGrant),
        }
    }

    /// The filter of a subscription of `who` to `selectors`, after checking every exact selector: an exact
    /// topic that `who` may not read is refused up front (`Err` names it), which is clearer than a stream
    /// that never delivers anything.
    pub fn reader(
        self: &Arc<Self>,
        who: Arc<Identity>,
        selectors: &[Selector],
        extra: Option<&str>,
    ) -> Result<ReadFilter, (String, Denied)> {
        for topic in selectors.iter().filter_map(Selector::exact) {
            self.check_read(&who, topic, extra)
                .map_err(|d| (topic.to_string(), d))?;
        }
        Ok(ReadFilter {
            access: Some(self.clone()),
            who,
            extra: extra.map(Into::into),
        })
    }

    /// May `who` publish from a client connection into `name` (namespace `ns`)?
    pub fn check_client_publish(
        &self,
        who: &Identity,
        name: &str,
        ns: &NamespaceConfig,
        subscribed: bool,
    ) -> Result<(), Denied> {
        match ns.publish {
            PublishPolicy::None => Err(Denied::PublishOff),
            PublishPolicy::Subscribers if subscribed => Ok(()),
            PublishPolicy::Subscribers => Err(Denied::NotSubscribed),
            PublishPolicy::Any => match channel::users_of(name) {
                Some(users) if !channel::lists_user(users, &who.user) => Err(Denied::OtherUsers),
                _ => Ok(()),
            },
        }
    }
}

/// Decides, per record, what one subscription may see (rules 2 and 3 of the module doc). Built by
/// [`Access::reader`], which has already checked the exact selectors.
#[derive(Debug, Clone)]
pub struct ReadFilter {
    /// `None`: no channel rules apply (only the private flag), see [`ReadFilter::without_rules`].
    access: Option<Arc<Access>>,
    who: Arc<Identity>,
    /// The channel a subscription token granted.
    extra: Option<Box<str>>,
}

impl ReadFilter {
    /// A filter that applies only the private flag: for a hub used without Herald's transports (tests,
    /// embedding with custom rules). Herald's own faces always use [`Access::reader`].
    pub fn without_rules(who: Arc<Identity>) -> ReadFilter {
        ReadFilter {
            access: None,
            who,
            extra: None,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.who
    }

    /// Whether a subscription selecting `selectors` may read `r`.
    pub fn admits(&self, selectors: &[Selector], r: &Record) -> bool {
        let extra = self.extra.as_deref();
        let through = r.topics.iter().any(|t| {
            let mut selected = false;
            for s in selectors {
                if s.exact() == Some(t.as_str()) {
                    return true; // checked by `Access::reader` when subscribing
                }
                selected |= s.matches(t);
            }
            selected
                && self
                    .access
                    .as_ref()
                    .is_none_or(|a| a.check_read(&self.who, t, extra).is_ok())
        });
        through && (!r.private || r.topics.iter().any(|t| self.who.granted(t, extra)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Arc<Access> {
        Arc::new(Access::new(&CentrifugoConfig {
            namespaces: vec![
                NamespaceConfig {
                    name: "secret".into(),
                    subscribe: SubscribePolicy::Token,
                    ..Default::default()
                },
                NamespaceConfig {
                    name: "members".into(),
                    subscribe: SubscribePolicy::Authenticated,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }))
    }

    fn who(user: &str, grants: &[&str]) -> Arc<Identity> {
        Arc::new(Identity {
            user: user.into(),
            authenticated: true,
            grants: grants.iter().map(|g| Selector::parse(g)).collect(),
        })
    }

    fn rec(topics: &[&str], private: bool) -> Record {
        Record {
            seq: 1,
            id: "x".into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            data: Default::default(),
            private,
            event_type: None,
            retry: None,
            time_ms: 0,
            info: None,
            tags: Default::default(),
        }
    }

    #[test]
    fn channel_rules() {
        let a = access();
        let anon = Identity::anonymous();
        assert_eq!(a.check_read(&anon, "news", None), Ok(()));
        assert_eq!(
            a.check_read(&anon, "https://e.com/#x", None),
            Ok(()),
            "no namespace: no rules"
        );
        assert_eq!(
            a.check_read(&anon, "members:x", None),
            Err(Denied::NeedsUser)
        );
        assert_eq!(
            a.check_read(&who("", &[]), "members:x", None),
            Err(Denied::NeedsUser)
        );
        assert_eq!(a.check_read(&who("u", &[]), "members:x", None), Ok(()));
        assert_eq!(
            a.check_read(&who("u", &[]), "secret:x", None),
            Err(Denied::NeedsGrant)
        );
        assert_eq!(
            a.check_read(&who("u", &[]), "secret:x", Some("secret:x")),
            Ok(())
        );
        assert_eq!(
            a.check_read(&who("u", &[]), "secret:x", Some("secret:y")),
            Err(Denied::NeedsGrant)
        );
        assert_eq!(
            a.check_read(&who("", &["secret:{id}"]), "secret:x", None),
            Ok(())
        );
        assert_eq!(
            a.check_read(&who("u", &[]), "secret:#u", None),
            Ok(()),
            "named by the list"
        );
        assert_eq!(
            a.check_read(&anon, "personal:#alice", None),
            Err(Denied::OtherUsers)
        );
        assert_eq!(
            a.check_read(&who("bob", &["*"]), "personal:#alice", None),
            Err(Denied::OtherUsers),
            "nothing overrides a # list"
        );
        assert_eq!(
            a.check_read(&who("alice", &[]), "personal:#alice", None),
            Ok(())
        );
        assert_eq!(
            a.channel("nope:x").unwrap_err(),
            ChannelError::UnknownNamespace
        );
        assert_eq!(a.channel("").unwrap_err(), ChannelError::Invalid);
        assert_eq!(
            a.check_read(&who("u", &["*"]), "$yjs:doc", None),
            Err(Denied::Reserved),
            "reserved for Herald, whatever the grants"
        );
        assert!(a.channel("personal:#1").is_ok() && a.channel("plain").is_ok());
    }

    #[test]
    fn document_rights() {
        let claims = |read: &[&str], write: &[&str]| Claims {
            docs: Some(crate::auth::DocsClaim {
                read: read.iter().map(|s| s.to_string()).collect(),
                write: write.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        };
        let a = Access::new(&CentrifugoConfig::default());
        assert_eq!(a.doc_right(None, "notes"), DocRight::None);
        assert_eq!(
            a.doc_right(Some(&Claims::default()), "notes"),
            DocRight::None
        );
        let c = claims(&["team/{id}"], &["team/7"]);
        assert_eq!(a.doc_right(Some(&c), "team/7"), DocRight::Write);
        assert_eq!(a.doc_right(Some(&c), "team/8"), DocRight::Read);
        assert_eq!(a.doc_right(Some(&c), "other"), DocRight::None);
        assert_eq!(
            a.doc_right(Some(&claims(&[], &["*"])), "x"),
            DocRight::Write
        );
        let anon =
            Access::new(&CentrifugoConfig::default()).with_anonymous_docs(AnonymousDocs::Read);
        assert_eq!(anon.doc_right(None, "notes"), DocRight::Read);
        assert_eq!(anon.doc_right(Some(&c), "team/7"), DocRight::Write);
    }

    #[test]
    fn exact_selectors_are_checked_when_subscribing() {
        let a = access();
        let err = a
            .reader(
                who("bob", &[]),
                &[Selector::parse("news"), Selector::parse("personal:#alice")],
                None,
            )
            .unwrap_err();
        assert_eq!(err, ("personal:#alice".to_string(), Denied::OtherUsers));
        assert!(a
            .reader(who("bob", &[]), &[Selector::parse("*")], None)
            .is_ok());
    }

    #[test]
    fn wildcards_are_filtered_per_record() {
        let a = access();
        let star = [Selector::parse("*")];
        let bob = a.reader(who("bob", &[]), &star, None).unwrap();
        assert!(bob.admits(&star, &rec(&["news"], false)));
        assert!(!bob.admits(&star, &rec(&["personal:#alice"], false)));
        assert!(!bob.admits(&star, &rec(&["secret:x"], false)));
        assert!(
            !bob.admits(&star, &rec(&["news"], true)),
            "private needs a grant"
        );
        // Read through a topic that admits bob: an alternate topic published on purpose.
        assert!(bob.admits(&star, &rec(&["personal:#alice", "personal:#bob"], false)));
        let alice = a.reader(who("alice", &[]), &star, None).unwrap();
        assert!(
            alice.admits(&star, &rec(&["personal:#alice"], true)),
            "named by the list"
        );
        let granted = a.reader(who("", &["news"]), &star, None).unwrap();
        assert!(granted.admits(&star, &rec(&["news"], true)));
        let template = [Selector::parse("personal:{+rest}")];
        let bob_t = a.reader(who("bob", &[]), &template, None).unwrap();
        assert!(!bob_t.admits(&template, &rec(&["personal:#alice"], false)));
        assert!(bob_t.admits(&template, &rec(&["personal:#bob"], false)));
    }

    #[test]
    fn client_publish() {
        let a = access();
        let mut ns = NamespaceConfig::default();
        assert_eq!(
            a.check_client_publish(&who("u", &[]), "x", &ns, true),
            Err(Denied::PublishOff)
        );
        ns.publish = PublishPolicy::Subscribers;
        assert_eq!(
            a.check_client_publish(&who("u", &[]), "x", &ns, false),
            Err(Denied::NotSubscribed)
        );
        assert_eq!(
            a.check_client_publish(&who("u", &[]), "x", &ns, true),
            Ok(())
        );
        ns.publish = PublishPolicy::Any;
        assert_eq!(
            a.check_client_publish(&who("u", &[]), "d#v", &ns, false),
            Err(Denied::OtherUsers)
        );
        assert_eq!(
            a.check_client_publish(&who("v", &[]), "d#v", &ns, false),
            Ok(())
        );
    }
}
