//! Channel names, as both faces spell them. A Mercure topic and a Centrifugo channel are the same thing
//! here: one string that names one stream. Its syntax carries two access rules, so it lives in the core and
//! not in one transport:
//! - `ns:rest` puts the channel in namespace `ns` (its options come from the config); a name without `:`
//!   (or whose `#` comes before the first `:`) is in the default namespace `""`;
//! - `#` makes a channel user-limited: `dialog#42,43` is for users 42 and 43 only, `personal:#42` for 42.

/// Longest channel name the Centrifugo face accepts (Mercure topics, usually URLs, may be longer).
pub const MAX_CHANNEL_LEN: usize = 255;

/// The namespace part of `name`, `""` when it has none.
pub fn namespace_of(name: &str) -> &str {
    match name.split_once(':') {
        Some((ns, _)) if !ns.contains('#') => ns,
        _ => "",
    }
}

/// The users a user-limited channel is for (the comma list after `#`), or `None` if it is not limited.
pub fn users_of(name: &str) -> Option<&str> {
    name.split_once('#').map(|(_, users)| users)
}

/// True when `user` is one of the users of the list returned by [`users_of`]. The empty user (no `sub`)
/// is never one of them.
pub fn lists_user(users: &str, user: &str) -> bool {
    !user.is_empty() && users.split(',').any(|u| u == user)
}

/// Whether `name` is acceptable as a channel on the Centrifugo face.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CHANNEL_LEN && !name.chars().any(char::is_control)
}

/// The personal channel of `user` in namespace `ns` (`ns:#user`), if both are set.
pub fn personal(ns: &str, user: &str) -> Option<String> {
    (!ns.is_empty() && !user.is_empty()).then(|| format!("{ns}:#{user}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_and_user_lists() {
        assert_eq!(namespace_of("chat:lobby"), "chat");
        assert_eq!(namespace_of("lobby"), "");
        assert_eq!(
            namespace_of("a#b:c"),
            "",
            "':' after '#' is not a namespace"
        );
        assert_eq!(namespace_of("https://example.com/x"), "https");
        assert_eq!(users_of("dialog#42,43"), Some("42,43"));
        assert_eq!(users_of("chat:lobby"), None);
        assert!(lists_user("42,43", "43") && !lists_user("42,43", "4"));
        assert!(!lists_user("", "") && !lists_user("42,", ""));
        assert_eq!(personal("personal", "42").as_deref(), Some("personal:#42"));
        assert_eq!(personal("", "42"), None);
        assert!(!is_valid("") && !is_valid(&"x".repeat(256)) && !is_valid("a\nb"));
    }
}
