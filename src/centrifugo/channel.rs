//! Channel names of the Centrifugo protocol: `ns:name` selects a namespace (its options come from the
//! config); `#` makes a channel user-limited: `dialog#42,43` can only be subscribed by users 42 and 43, and
//! `personal:#42` only by user 42. These rules are checked before any token: a user-limited channel needs no
//! token because the connection's user already proves who may join.

use crate::config::{CentrifugoConfig, NamespaceConfig};

pub const MAX_CHANNEL_LEN: usize = 255;

#[derive(Debug)]
pub struct Channel<'a> {
    pub name: &'a str,
    pub namespace: NamespaceConfig,
    /// Users allowed by the `#` suffix, if the channel is user-limited.
    pub users: Option<Vec<&'a str>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ChannelError {
    Invalid,
    UnknownNamespace,
}

pub fn parse<'a>(name: &'a str, cfg: &CentrifugoConfig) -> Result<Channel<'a>, ChannelError> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN || name.chars().any(char::is_control) {
        return Err(ChannelError::Invalid);
    }
    let ns_name = match name.split_once(':') {
        Some((ns, _)) if !ns.contains('#') => ns,
        _ => "",
    };
    let namespace = cfg
        .namespace(ns_name)
        .ok_or(ChannelError::UnknownNamespace)?;
    let users = name
        .split_once('#')
        .map(|(_, users)| users.split(',').filter(|u| !u.is_empty()).collect());
    Ok(Channel {
        name,
        namespace,
        users,
    })
}

impl Channel<'_> {
    /// False when the channel is user-limited and `user` is not among its users.
    pub fn allows_user(&self, user: &str) -> bool {
        match &self.users {
            None => true,
            Some(users) => !user.is_empty() && users.contains(&user),
        }
    }
}

/// The personal channel of `user`, if personal channels are on.
pub fn personal(cfg: &CentrifugoConfig, user: &str) -> Option<String> {
    (!cfg.personal_namespace.is_empty() && !user.is_empty())
        .then(|| format!("{}:#{user}", cfg.personal_namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CentrifugoConfig {
        CentrifugoConfig {
            namespaces: vec![NamespaceConfig {
                name: "chat".into(),
                join_leave: true,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn namespaces_and_user_limits() {
        let c = cfg();
        let ch = parse("chat:lobby", &c).unwrap();
        assert!(ch.namespace.join_leave && ch.allows_user(""));
        assert_eq!(
            parse("nope:x", &c).unwrap_err(),
            ChannelError::UnknownNamespace
        );
        assert_eq!(parse("", &c).unwrap_err(), ChannelError::Invalid);
        let dialog = parse("dialog#42,43", &c).unwrap();
        assert_eq!(dialog.namespace.name, "");
        assert!(dialog.allows_user("42") && dialog.allows_user("43"));
        assert!(!dialog.allows_user("44") && !dialog.allows_user(""));
        let personal_ch = personal(&c, "42").unwrap();
        let p = parse(&personal_ch, &c).unwrap();
        assert_eq!(p.namespace.name, "personal");
        assert!(p.allows_user("42") && !p.allows_user("4"));
        assert_eq!(
            parse("a#b:c", &c).unwrap().namespace.name,
            "",
            "':' after '#' is not a namespace"
        );
    }
}
