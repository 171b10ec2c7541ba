//! Routes: which backend (and body format) a topic goes to. First matching pattern wins.

use crate::config::RouteConfig;
use crate::envelope::BodyFormat;

/// Compiled routes over a list of backends (by index).
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(String, usize, BodyFormat)>,
    backends: Vec<String>,
}

impl Router {
    /// `backends` are the backend names in the order their publishers are held; routes naming
    /// an unknown backend were rejected by config validation.
    pub fn new(routes: &[RouteConfig], backends: &[String]) -> Self {
        let routes = routes
            .iter()
            .filter_map(|r| {
                let idx = backends.iter().position(|b| *b == r.backend)?;
                Some((r.topic.clone(), idx, r.format))
            })
            .collect();
        Router {
            routes,
            backends: backends.to_vec(),
        }
    }

    pub fn route(&self, topic: &str) -> Option<(usize, BodyFormat)> {
        self.routes
            .iter()
            .find(|(pattern, _, _)| glob_match(pattern.as_bytes(), topic.as_bytes()))
            .map(|(_, b, f)| (*b, *f))
    }

    /// How many backends routes may name (held by index).
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub fn backend_name(&self, idx: usize) -> &str {
        self.backends.get(idx).map_or("?", String::as_str)
    }

    /// The text a row without a route is failed with.
    pub fn no_route_reason(&self, topic: &str) -> String {
        let patterns: Vec<&str> = self.routes.iter().map(|(p, _, _)| p.as_str()).collect();
        format!(
            "no route for topic {topic:?}: it matches none of the configured route patterns [{}]",
            patterns.join(", ")
        )
    }
}

/// A backend's per-topic settings for `topic`: its own entry, else the first pattern (in name
/// order) that matches it.
pub fn setting_for<'a, T>(
    settings: &'a std::collections::BTreeMap<String, T>,
    topic: &str,
) -> Option<&'a T> {
    settings.get(topic).or_else(|| {
        settings
            .iter()
            .find(|(pat, _)| {
                pat.contains(['*', '?']) && glob_match(pat.as_bytes(), topic.as_bytes())
            })
            .map(|(_, s)| s)
    })
}

/// `*` matches any run of characters (dots included), `?` exactly one.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while let Some(&c) = text.get(t) {
        match pattern.get(p) {
            // A star first: taken as a literal it would match a '*' in the topic and lose
            // its place to backtrack to ("*" did not match "*x").
            Some(b'*') => {
                star = Some(p);
                mark = t;
                p += 1;
            }
            Some(&pc) if pc == b'?' || pc == c => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some(s) => {
                    p = s + 1;
                    mark += 1;
                    t = mark;
                }
                None => return false,
            },
        }
    }
    while pattern.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", "anything.at.all"));
        assert!(m("orders.*", "orders.created"));
        assert!(!m("orders.*", "billing.created"));
        assert!(m("*.created", "orders.created"));
        assert!(m("o?ders", "orders"));
        assert!(!m("orders", "orders.created"));
        assert!(m("a*b*c", "axxbyyc"));
        // A star in the topic is a literal character like any other.
        assert!(m("*", "*x"));
        assert!(m("orders.*", "orders.*x"));
        assert!(m("orders.cr\u{e9}\u{e9}d", "orders.cr\u{e9}\u{e9}d"));
    }

    #[test]
    fn first_matching_route_wins() {
        let r = Router::new(
            &[
                RouteConfig {
                    topic: "orders.audit".into(),
                    backend: "b".into(),
                    format: BodyFormat::Envelope,
                },
                RouteConfig {
                    topic: "orders.*".into(),
                    backend: "a".into(),
                    format: BodyFormat::Raw,
                },
            ],
            &["a".into(), "b".into()],
        );
        assert_eq!(r.route("orders.audit"), Some((1, BodyFormat::Envelope)));
        assert_eq!(r.route("orders.created"), Some((0, BodyFormat::Raw)));
        assert_eq!(r.route("users.created"), None);
        assert!(r.no_route_reason("users.created").contains("orders.*"));
    }
}
