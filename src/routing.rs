//! Routes: which backend (and body format) a topic goes to. First matching pattern wins.

use crate::config::value::{invalid, ConfigError};
use crate::envelope::{cloudevents, BodyFormat, CeSource, CloudEventsFormat, CloudEventsMode};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RouteToml")]
pub struct RouteConfig {
    /// Glob over the topic: `*` any run of characters, `?` one character.
    pub topic: String,
    pub backend: String,
    /// The body format, with a CloudEvents route's mode and source inside it.
    pub format: BodyFormat,
}

/// A route as written in the file: `format` names the format, and a CloudEvents route adds
/// `cloudevents_mode` and `cloudevents_source` beside it (flat keys, like every other
/// section). [`validate_routes`] checks the source, naming the key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteToml {
    topic: String,
    backend: String,
    #[serde(default)]
    format: FormatName,
    cloudevents_mode: Option<CloudEventsMode>,
    cloudevents_source: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FormatName {
    #[default]
    Raw,
    Envelope,
    Cloudevents,
}

impl TryFrom<RouteToml> for RouteConfig {
    type Error = String;

    fn try_from(r: RouteToml) -> Result<Self, String> {
        let format = match r.format {
            FormatName::Cloudevents => BodyFormat::CloudEvents(CloudEventsFormat {
                mode: r.cloudevents_mode.unwrap_or_default(),
                // A missing source is reported by `validate_routes` with the route's index.
                source: CeSource::new(r.cloudevents_source.as_deref().unwrap_or_default()),
            }),
            other => {
                // A CloudEvents key on another format is a mistake the route would ignore.
                let stray = [
                    ("cloudevents_mode", r.cloudevents_mode.is_some()),
                    ("cloudevents_source", r.cloudevents_source.is_some()),
                ];
                if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "route {:?}: {key} applies only to format = \"cloudevents\", this \
                         route's format is {:?}",
                        r.topic,
                        format!("{other:?}").to_ascii_lowercase()
                    ));
                }
                match other {
                    FormatName::Envelope => BodyFormat::Envelope,
                    _ => BodyFormat::Raw,
                }
            }
        };
        Ok(RouteConfig {
            topic: r.topic,
            backend: r.backend,
            format,
        })
    }
}

/// Every route names a configured backend (`backends`), has a usable topic pattern and, for
/// CloudEvents, a valid source; the error names `routes[i].key`.
pub(crate) fn validate_routes(
    routes: &[RouteConfig],
    backends: &[&str],
) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        if !backends.contains(&route.backend.as_str()) {
            return Err(invalid(
                format!("routes[{i}].backend"),
                format!(
                    "{:?} is not a configured backend; configured: {}",
                    route.backend,
                    backends.join(", ")
                ),
            ));
        }
        if route.topic.is_empty() || route.topic.contains(char::is_whitespace) {
            return Err(invalid(
                format!("routes[{i}].topic"),
                format!(
                    "{:?} is not a topic pattern: non-empty, no spaces",
                    route.topic
                ),
            ));
        }
        if let BodyFormat::CloudEvents(ce) = route.format {
            if let Some(problem) = cloudevents::source_problem(ce.source.as_str()) {
                return Err(invalid(format!("routes[{i}].cloudevents_source"), problem));
            }
        }
    }
    Ok(())
}

/// Compiled routes over a list of backends (by index).
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(String, Pattern, usize, BodyFormat)>,
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
                Some((r.topic.clone(), Pattern::new(&r.topic), idx, r.format))
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
            .find(|(_, pattern, _, _)| pattern.matches(topic))
            .map(|(_, _, b, f)| (*b, *f))
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
        let patterns: Vec<&str> = self.routes.iter().map(|(p, _, _, _)| p.as_str()).collect();
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
            .find(|(pat, _)| pat.contains(['*', '?']) && glob_match(pat, topic))
            .map(|(_, s)| s)
    })
}

/// A route or topic-setting pattern, compiled: `*` matches any run of characters (dots and
/// slashes included), `?` exactly one byte, and every other character only itself. The
/// language is kept to these two so a topic or subject with `[`, `{` or `\` in it (NATS
/// allows them) means what it says; globset does the matching.
#[derive(Debug, Clone)]
pub struct Pattern(Option<globset::GlobMatcher>);

impl Pattern {
    pub fn new(pattern: &str) -> Self {
        let mut glob = String::with_capacity(pattern.len() + 8);
        let mut buf = [0u8; 4];
        for c in pattern.chars() {
            match c {
                // `**` is globset's "any number of folders" beside a `/`; here it is one `*`.
                '*' if glob.ends_with('*') => {}
                '*' | '?' => glob.push(c),
                _ => glob.push_str(&globset::escape(c.encode_utf8(&mut buf))),
            }
        }
        // Every character is now a wildcard or a literal, so the build cannot fail; were it to,
        // the pattern would match nothing rather than everything.
        let built = globset::GlobBuilder::new(&glob)
            .literal_separator(false)
            .backslash_escape(false)
            .build();
        Pattern(built.ok().map(|g| g.compile_matcher()))
    }

    /// Per row on the hot path: 30 to 60 ns for the usual patterns (`*`, `orders.*`, a literal),
    /// measured; a one-glob `GlobSet` with its literal and prefix strategies was no faster.
    pub fn matches(&self, topic: &str) -> bool {
        self.0.as_ref().is_some_and(|m| m.is_match(topic))
    }
}

/// Whether `pattern` (a route's or a topic setting's) matches `topic`. Patterns come from the
/// configuration, so each is compiled once per thread and kept.
pub fn glob_match(pattern: &str, topic: &str) -> bool {
    thread_local! {
        static COMPILED: std::cell::RefCell<rustc_hash::FxHashMap<String, Pattern>> =
            Default::default();
    }
    COMPILED.with_borrow_mut(|compiled| {
        if let Some(p) = compiled.get(pattern) {
            return p.matches(topic);
        }
        let p = Pattern::new(pattern);
        let hit = p.matches(topic);
        compiled.insert(pattern.to_string(), p);
        hit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        let m = |p: &str, t: &str| glob_match(p, t);
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
        // Only `*` and `?` are wildcards: brackets, braces and backslashes are themselves.
        assert!(m("a[b]*", "a[b]c"));
        assert!(!m("a[b]*", "abc"));
        assert!(m("{x,y}.*", "{x,y}.z"));
        assert!(!m("{x,y}.*", "x.z"));
        assert!(m("a\\*", "a\\b"));
        assert!(m("a/*", "a/b/c"));
        // Two stars are one star, slashes or not (not globset's "any number of folders").
        assert!(!m("a/**/b", "a/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(!m("**/x", "x"));
        assert!(m("orders.**", "orders.created"));
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
