//! Secrets in settings: which names hold one, URLs shown without them, and a registry of every
//! secret value so any text (a log line, an error, a panic message) can be scrubbed of them.

/// Names whose values are secrets, wherever they appear: configuration keys, librdkafka
/// properties, URL query parameters, libpq `key=value` words.
///
/// A name holding "password", "secret", "token", "seed", "credential", "jaas",
/// "oauthbearer.config" or "key" is secret, unless it names a file (ends in `location`, `file`,
/// `path` or `keytab`): `ssl.key.password` and `ssl.key.pem` are, `ssl.key.location` is not.
/// Masking a harmless value costs little; printing a secret one cannot be undone.
pub fn is_secret_key(name: &str) -> bool {
    let k = name.to_ascii_lowercase();
    let file = [
        ".location",
        "_location",
        ".file",
        "_file",
        ".path",
        "_path",
        "keytab",
    ];
    if file.iter().any(|f| k.ends_with(f)) {
        return false;
    }
    [
        "password",
        "passwd",
        "secret",
        "token",
        "seed",
        "credential",
        "jaas",
        "oauthbearer.config",
        "key",
        ".pem",
    ]
    .iter()
    .any(|w| k.contains(w))
}

/// `%XX` decoded (and `+` as a space in a query), for comparing URL parts with what a client
/// sends.
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL cut into what redaction and validation need.
pub(super) struct UrlParts<'a> {
    pub(super) scheme: &'a str,
    /// Between `://` and the last `@` before the path or query; None without an `@`.
    pub(super) userinfo: Option<&'a str>,
    /// After the userinfo, up to the query.
    pub(super) rest: &'a str,
    /// The raw query pairs, undecoded.
    pub(super) query: Vec<(&'a str, &'a str)>,
}

pub(super) fn url_parts(url: &str) -> Option<UrlParts<'_>> {
    let s = url.find("://")?;
    let scheme = &url[..s];
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return None;
    }
    let after = &url[s + 3..];
    let (before_query, query) = match after.find('?') {
        Some(q) => (&after[..q], &after[q + 1..]),
        None => (after, ""),
    };
    // A raw '/' or '@' in a password is common; the host is after the last '@'.
    let (userinfo, rest) = match before_query.rfind('@') {
        Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
        None => (None, before_query),
    };
    let query = query
        .split('#')
        .next()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    Some(UrlParts {
        scheme,
        userinfo,
        rest,
        query,
    })
}

pub(super) fn is_postgres_scheme(scheme: &str) -> bool {
    scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
}

/// The URL with its secrets replaced, for logs and messages: the password of the userinfo (all
/// of a userinfo without a password outside Postgres URLs: NATS takes it as a token), and every
/// query parameter with a secret name (`?password=`). Anything that is not a URL (a libpq
/// `key=value` string) is not shown at all.
pub fn redact_url(url: &str) -> String {
    let Some(p) = url_parts(url) else {
        return "(not shown: not a URL)".into();
    };
    let mut out = format!("{}://", p.scheme);
    if let Some(u) = p.userinfo {
        match u.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None if is_postgres_scheme(p.scheme) => out.push_str(&format!("{u}@")),
            None => out.push_str("***@"),
        }
    }
    out.push_str(p.rest);
    if !p.query.is_empty() {
        let q: Vec<String> = p
            .query
            .iter()
            .map(|(k, v)| {
                if is_secret_key(&percent_decode(k, true)) {
                    format!("{k}=***")
                } else if v.is_empty() {
                    k.to_string()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// Every secret value known to this process (from the configuration), so text that reaches a
/// log line, an error or a panic message can be scrubbed of them whatever code produced it.
static SECRETS: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Secrets shorter than this are not scrubbed from free text: they would mask ordinary words.
const MIN_SCRUBBED: usize = 4;

/// Remembers `value` as a secret: [`redact_secrets`] replaces it from now on.
pub fn register_secret(value: &str) {
    let v = value.trim();
    if v.chars().count() < MIN_SCRUBBED {
        return;
    }
    let mut all = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !all.iter().any(|s| s == v) {
        all.push(v.to_string());
        // Longest first, so a secret containing another is replaced whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the secrets inside a URL (userinfo, secret query parameters), in the forms they
/// are written and decoded; or, for a libpq `key=value` string, the values of secret keys.
pub fn register_url_secrets(url: &str) {
    match url_parts(url) {
        Some(p) => {
            if let Some(u) = p.userinfo {
                match u.split_once(':') {
                    Some((_, pw)) => {
                        register_secret(pw);
                        register_secret(&percent_decode(pw, false));
                    }
                    None if !is_postgres_scheme(p.scheme) => {
                        register_secret(u);
                        register_secret(&percent_decode(u, false));
                    }
                    None => {}
                }
            }
            for (k, v) in p.query {
                if is_secret_key(&percent_decode(k, true)) {
                    register_secret(v);
                    register_secret(&percent_decode(v, true));
                }
            }
        }
        None => {
            for word in url.split_whitespace() {
                if let Some((k, v)) = word.split_once('=') {
                    if is_secret_key(k.trim()) {
                        register_secret(v.trim_matches(['\'', '"']));
                    }
                }
            }
        }
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn redact_secrets(text: &str) -> String {
    let all = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for s in all.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

/// Registers every secret of a configuration tree before it is typed, so even a message
/// about a value of the wrong type (which serde prints) cannot show one.
pub(super) fn collect_secrets(key: &str, v: &figment::value::Value) {
    use figment::value::Value;
    match v {
        Value::Dict(_, d) => {
            for (k, v) in d {
                collect_secrets(k, v);
            }
        }
        Value::Array(_, a) => {
            for v in a {
                collect_secrets(key, v);
            }
        }
        leaf => {
            let text = match serde_json::to_value(leaf) {
                Ok(serde_json::Value::String(s)) => s,
                Ok(other) => other.to_string(),
                Err(_) => return,
            };
            if is_secret_key(key) {
                register_secret(&text);
            } else if key == "url" || key == "servers" || text.contains("://") {
                register_url_secrets(&text);
            }
            if key == "creds_file" {
                register_creds_file(&text);
            }
        }
    }
}

/// A NATS creds file holds a JWT and an nkey seed between `-----` marker lines.
fn register_creds_file(path: &str) {
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with("--") && !line.contains(' ') {
                register_secret(line);
            }
        }
    }
}
