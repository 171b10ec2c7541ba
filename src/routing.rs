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

    pub fn backend_name(&self, idx: usize) -> &str {
        &self.backends[idx]
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

/// `*` matches any run of characters (dots included), `?` exactly one.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
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
