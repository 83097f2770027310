//! Topic selectors (Mercure draft-07 "Topic Selectors").
//!
//! A selector is `*`, an exact string, or an RFC 6570 URI template. Templates are compiled once into an
//! anchored regex when a subscription or a token is accepted, so the fan-out path only runs a match and never
//! parses. A string that is not a valid template still works as an exact selector: that is what the spec asks
//! (step 2 compares strings before step 3 tries the template).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use regex::Regex;

/// A compiled topic selector.
#[derive(Debug, Clone)]
pub enum Selector {
    /// `*`: every topic.
    Any,
    /// A plain string, compared byte for byte.
    Exact(Box<str>),
    /// A URI template; `raw` is kept for exact comparison (a template also matches itself).
    Template { raw: Box<str>, re: Arc<Regex> },
}

/// The URI template expressions (`{…}`) in `raw`. A compiled template costs memory in proportion to its
/// expressions (tens of KB for a handful, megabytes for thousands), so subscriptions are limited by this
/// count before anything is compiled.
pub fn expressions(raw: &str) -> usize {
    raw.bytes().filter(|&b| b == b'{').count()
}

/// Templates compiled once per process and shared while any subscription uses them: ten thousand
/// subscribers of `https://example.com/books/{id}` hold one regex, not ten thousand.
static COMPILED: Mutex<Option<Compiled>> = Mutex::new(None);

#[derive(Default)]
struct Compiled {
    by_template: HashMap<Box<str>, Weak<Regex>>,
    /// Entries at the last sweep of dead ones: the map is swept when it has doubled since.
    swept_at: usize,
}

fn compiled(raw: &str) -> Option<Arc<Regex>> {
    let mut guard = COMPILED.lock();
    let cache = guard.get_or_insert_with(Compiled::default);
    if let Some(re) = cache.by_template.get(raw).and_then(Weak::upgrade) {
        return Some(re);
    }
    let re = Arc::new(template_regex(raw)?);
    if cache.by_template.len() >= 2 * cache.swept_at.max(64) {
        cache.by_template.retain(|_, w| w.strong_count() > 0);
        cache.by_template.shrink_to_fit();
        cache.swept_at = cache.by_template.len();
    }
    cache.by_template.insert(raw.into(), Arc::downgrade(&re));
    Some(re)
}

impl Selector {
    pub fn parse(raw: &str) -> Selector {
        if raw == "*" {
            return Selector::Any;
        }
        if !raw.contains('{') {
            return Selector::Exact(raw.into());
        }
        match compiled(raw) {
            Some(re) => Selector::Template {
                raw: raw.into(),
                re,
            },
            None => Selector::Exact(raw.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Selector::Any => "*",
            Selector::Exact(s) => s,
            Selector::Template { raw, .. } => raw,
        }
    }

    /// The exact topic this selector stands for, when it can only ever match one string. The hub indexes
    /// such subscribers by topic so a publication does not scan them.
    pub fn exact(&self) -> Option<&str> {
        match self {
            Selector::Exact(s) => Some(s),
            _ => None,
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Selector::Any => true,
            Selector::Exact(s) => &**s == topic,
            Selector::Template { raw, re } => &**raw == topic || re.is_match(topic),
        }
    }
}

/// True when any of `topics` matches any of `selectors`.
pub fn any_match<'a>(selectors: &[Selector], topics: impl IntoIterator<Item = &'a str>) -> bool {
    topics
        .into_iter()
        .any(|t| selectors.iter().any(|s| s.matches(t)))
}

// Character classes of RFC 3986 as used by RFC 6570 expansions.
const UNRESERVED: &str = r"A-Za-z0-9\-._~";
const RESERVED: &str = r":/?#\[\]@!$&'()*+,;=";
const PCT: &str = r"%[0-9A-Fa-f]{2}";

/// Translates a URI template into an anchored regex that accepts every expansion of it. Returns `None` for
/// a malformed template (unbalanced braces, unknown operator), which the caller then treats as a plain string.
fn template_regex(template: &str) -> Option<Regex> {
    let mut out = String::from("^");
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let (lit, tail) = rest.split_at(open);
        if lit.contains('}') {
            return None;
        }
        out.push_str(&regex::escape(lit));
        let close = tail.find('}')?;
        let expr = &tail[1..close];
        out.push_str(&expression_regex(expr)?);
        rest = &tail[close + 1..];
    }
    if rest.contains('}') {
        return None;
    }
    out.push_str(&regex::escape(rest));
    out.push('$');
    Regex::new(&out).ok()
}

fn expression_regex(expr: &str) -> Option<String> {
    let (op, vars) = match expr.chars().next()? {
        c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&') => (Some(c), &expr[1..]),
        c if c.is_ascii_alphanumeric() || c == '_' || c == '%' => (None, expr),
        _ => return None,
    };
    let valid_var = |v: &str| {
        let name = v.trim_end_matches('*');
        let name = name.split(':').next().unwrap_or("");
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '%')
    };
    if vars.is_empty() || !vars.split(',').all(valid_var) {
        return None;
    }
    let plain = format!("(?:[{UNRESERVED}]|{PCT})");
    let reserved = format!("(?:[{UNRESERVED}{RESERVED}]|{PCT})");
    Some(match op {
        None => format!("{plain}*(?:,{plain}*)*"),
        Some('+') => format!("{reserved}*"),
        Some('#') => format!("(?:#{reserved}*)?"),
        Some('.') => format!(r"(?:\.{plain}*)*"),
        Some('/') => format!("(?:/{plain}*)*"),
        Some(';') => format!("(?:;(?:[{UNRESERVED}=,]|{PCT})*)*"),
        Some('?') => format!(r"(?:\?(?:[{UNRESERVED}=,&]|{PCT})*)?"),
        Some('&') => format!("(?:&(?:[{UNRESERVED}=,]|{PCT})*)*"),
        Some(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_everything() {
        assert!(Selector::parse("*").matches("anything/at/all"));
    }

    #[test]
    fn exact_compares_strings() {
        let s = Selector::parse("https://example.com/foo");
        assert!(s.matches("https://example.com/foo"));
        assert!(!s.matches("https://example.com/foo/1"));
        assert_eq!(s.exact(), Some("https://example.com/foo"));
    }

    #[test]
    fn simple_template() {
        let s = Selector::parse("https://example.net/foo/{id}");
        assert!(s.matches("https://example.net/foo/abc123"));
        assert!(
            s.matches("https://example.net/foo/{id}"),
            "a template matches itself"
        );
        assert!(!s.matches("https://example.net/foo/a/b"));
        assert!(!s.matches("https://example.net/bar/abc"));
        assert!(!s.matches("https://example.net/foo/will-not-match}"));
    }

    #[test]
    fn operators() {
        assert!(Selector::parse("https://e.com/{+path}").matches("https://e.com/a/b/c"));
        assert!(Selector::parse("https://e.com/users/foo/{?topic}")
            .matches("https://e.com/users/foo/?topic=https%3A%2F%2Fe.com%2Fbooks%2F1"));
        assert!(Selector::parse("https://e.com{/a,b}").matches("https://e.com/x/y"));
        assert!(Selector::parse("/books/{id}.json").matches("/books/12.json"));
    }

    #[test]
    fn identical_templates_share_one_compiled_regex() {
        let (Selector::Template { re: a, .. }, Selector::Template { re: b, .. }) = (
            Selector::parse("https://e.com/shared/{id}"),
            Selector::parse("https://e.com/shared/{id}"),
        ) else {
            panic!("templates");
        };
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(expressions("a/{b}/{c}"), 2);
    }

    #[test]
    fn malformed_template_is_exact() {
        let s = Selector::parse("will-not-match}");
        assert!(s.matches("will-not-match}"));
        let s = Selector::parse("a{b");
        assert!(matches!(s, Selector::Exact(_)));
    }
}
