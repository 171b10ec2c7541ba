//! Settings of a NATS backend (`[backends.<name>]` with `type = "nats"`) and their validation.

use crate::config::value::{invalid, ConfigError, Dur, Provisioning, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs; the client picks one and fails over to the others.
    pub servers: Vec<String>,
    /// Connection name, shown by the server's monitoring.
    pub name: String,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub nkey_seed: Option<Secret>,
    pub creds_file: Option<String>,
    pub tls_required: bool,
    pub tls_ca_file: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub connect_timeout: Dur,
    /// How long a JetStream publish waits for its PubAck (and API calls for their answer).
    pub ack_timeout: Dur,
    /// JetStream publishes awaiting their PubAck at once (the window).
    pub max_in_flight: u32,
    /// Longest wait between reconnect attempts (the delay doubles up to this).
    pub reconnect_delay_max: Dur,
    /// What `auto` topics use: `persistent` (JetStream) or `ephemeral` (core NATS).
    pub persistence: Persistence,
    /// Topic name or glob -> its persistence. Topics matching none use `persistence`.
    pub topics: BTreeMap<String, TopicSettings>,
    pub provisioning: Provisioning,
    /// Stream name -> settings, provisioned at start-up.
    pub streams: BTreeMap<String, StreamSettings>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec!["nats://127.0.0.1:4222".into()],
            name: "outbox-relay".into(),
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            creds_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Dur::secs(5),
            ack_timeout: Dur::secs(10),
            max_in_flight: 4096,
            reconnect_delay_max: Dur::secs(5),
            persistence: Persistence::Persistent,
            topics: BTreeMap::new(),
            provisioning: Provisioning::Skip,
            streams: BTreeMap::new(),
        }
    }
}

/// How a topic is published, as the EventBus had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Persistence {
    /// JetStream: stored, acknowledged by a PubAck, deduplicated by event id.
    #[default]
    Persistent,
    /// Core NATS: fire and forget; the flush is the acknowledgement.
    Ephemeral,
    /// Follows the backend's `persistence`.
    Auto,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    pub persistence: Persistence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    #[default]
    Limits,
    Interest,
    WorkQueue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    #[default]
    Old,
    New,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Subjects the stream stores; NATS wildcards (`*` one token, `>` the rest) allowed.
    pub subjects: Vec<String>,
    pub storage: Storage,
    pub retention: Retention,
    /// "0s" = no limit.
    pub max_age: Dur,
    /// -1 = no limit.
    pub max_bytes: i64,
    /// -1 = no limit.
    pub max_messages: i64,
    /// -1 = no limit (the server's max_payload still applies).
    pub max_message_size: i32,
    pub replicas: usize,
    pub discard: Discard,
    /// How long the server remembers a Nats-Msg-Id to drop a re-publish.
    pub duplicate_window: Dur,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            subjects: Vec::new(),
            storage: Storage::File,
            retention: Retention::Limits,
            max_age: Dur::secs(0),
            max_bytes: -1,
            max_messages: -1,
            max_message_size: -1,
            replicas: 1,
            discard: Discard::Old,
            duplicate_window: Dur::secs(120),
        }
    }
}

/// NATS subject rules for a publish: the general topic rules plus no empty tokens (a leading,
/// trailing or doubled '.') and no wildcard tokens.
pub fn validate_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("subject is empty".into());
    }
    if let Some((i, ch)) = subject
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "subject {subject:?}: character {ch:?} (U+{:04X}) at position {} is not allowed \
             in a NATS subject",
            ch as u32,
            i + 1
        ));
    }
    for (n, token) in subject.split('.').enumerate() {
        if token.is_empty() {
            return Err(format!(
                "subject {subject:?}: token {} is empty (a leading, trailing or doubled '.')",
                n + 1
            ));
        }
        if token == "*" || token == ">" {
            return Err(format!(
                "subject {subject:?}: token {} is the wildcard {token:?}, which cannot be \
                 published to",
                n + 1
            ));
        }
    }
    Ok(())
}

/// Does the NATS subject filter `filter` (with `*` and `>`) cover `subject`?
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() || filter.contains(char::is_whitespace) {
        return Err(format!("{filter:?} is not a subject: non-empty, no spaces"));
    }
    let tokens: Vec<&str> = filter.split('.').collect();
    for (n, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(format!("{filter:?}: token {} is empty", n + 1));
        }
        if *t == ">" && n + 1 != tokens.len() {
            return Err(format!("{filter:?}: '>' must be the last token"));
        }
    }
    Ok(())
}

impl NatsConfig {
    /// The persistence `topic` is published with: its own entry, else the first pattern
    /// matching it, else the backend's `persistence`; `auto` resolves to the latter.
    pub fn persistence_for(&self, topic: &str) -> Persistence {
        let own = crate::routing::setting_for(&self.topics, topic);
        match own.map(|s| s.persistence) {
            Some(Persistence::Auto) | None => self.default_persistence(),
            Some(p) => p,
        }
    }

    pub fn default_persistence(&self) -> Persistence {
        match self.persistence {
            Persistence::Auto => Persistence::Persistent,
            p => p,
        }
    }

    /// Checks every key; `key` is this backend's prefix (`backends.<name>`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        self.validate_connection(key)?;
        self.validate_limits(key)?;
        for (name, s) in &self.streams {
            validate_stream(&format!("{key}.streams.{name}"), name, s)?;
        }
        Ok(())
    }

    /// Server URLs, the client name, one way to authenticate, TLS files in pairs.
    fn validate_connection(&self, key: &str) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(invalid(
                format!("{key}.servers"),
                "is empty; give at least one URL like nats://127.0.0.1:4222",
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            s.parse::<async_nats::ServerAddr>().map_err(|e| {
                invalid(
                    format!("{key}.servers[{i}]"),
                    format!(
                        "{:?} is not a server URL: {e}",
                        crate::config::secrets::redact_url(s)
                    ),
                )
            })?;
        }
        if !self.name.is_ascii() {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} is not allowed: ASCII only", self.name),
            ));
        }
        if self.password.is_some() != self.user.is_some() {
            return Err(invalid(
                format!("{key}.password"),
                "user and password go together; set both or neither",
            ));
        }
        let auths = [
            self.token.is_some(),
            self.user.is_some(),
            self.nkey_seed.is_some(),
            self.creds_file.is_some(),
        ];
        if auths.iter().filter(|a| **a).count() > 1 {
            return Err(invalid(
                format!("{key}.token"),
                "token, user/password, nkey_seed and creds_file are alternatives; set one",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                format!("{key}.tls_key_file"),
                "tls_cert_file and tls_key_file go together; set both or neither",
            ));
        }
        Ok(())
    }

    /// Timeouts, the window of unacknowledged publishes, topic subjects.
    fn validate_limits(&self, key: &str) -> Result<(), ConfigError> {
        for (k, d) in [
            ("connect_timeout", self.connect_timeout),
            ("ack_timeout", self.ack_timeout),
            ("reconnect_delay_max", self.reconnect_delay_max),
        ] {
            if d.0.is_zero() {
                return Err(invalid(format!("{key}.{k}"), "must be more than 0"));
            }
        }
        if !(1..=100_000).contains(&self.max_in_flight) {
            return Err(invalid(
                format!("{key}.max_in_flight"),
                format!("{} is not allowed, must be 1 to 100000", self.max_in_flight),
            ));
        }
        for topic in self.topics.keys() {
            if !topic.contains(['*', '?']) {
                validate_subject(topic)
                    .map_err(|m| invalid(format!("{key}.topics.{topic:?}"), m))?;
            }
        }
        Ok(())
    }
}

/// One stream's name, subjects, limits and de-duplication window, named under `skey`.
fn validate_stream(skey: &str, name: &str, s: &StreamSettings) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
    {
        return Err(invalid(
            skey,
            format!(
                "{name:?} is not a stream name: printable, no spaces, '.', '*', '>', \
                 '/' or '\\'"
            ),
        ));
    }
    if s.subjects.is_empty() {
        return Err(invalid(
            format!("{skey}.subjects"),
            "is empty; give the subjects the stream stores, like [\"orders.>\"]",
        ));
    }
    for (i, f) in s.subjects.iter().enumerate() {
        validate_filter(f).map_err(|m| invalid(format!("{skey}.subjects[{i}]"), m))?;
    }
    for (k, v) in [("max_bytes", s.max_bytes), ("max_messages", s.max_messages)] {
        if v < -1 || v == 0 {
            return Err(invalid(
                format!("{skey}.{k}"),
                format!("{v} is not allowed: -1 (no limit) or more than 0"),
            ));
        }
    }
    if s.max_message_size < -1 || s.max_message_size == 0 {
        return Err(invalid(
            format!("{skey}.max_message_size"),
            format!(
                "{} is not allowed: -1 (no limit) or more than 0",
                s.max_message_size
            ),
        ));
    }
    if !(1..=5).contains(&s.replicas) {
        return Err(invalid(
            format!("{skey}.replicas"),
            format!("{} is not allowed, must be 1 to 5", s.replicas),
        ));
    }
    if s.duplicate_window.0.is_zero() {
        return Err(invalid(
            format!("{skey}.duplicate_window"),
            "must be more than 0: it is what drops a re-published event",
        ));
    }
    if !s.max_age.0.is_zero() && s.duplicate_window > s.max_age {
        return Err(invalid(
            format!("{skey}.duplicate_window"),
            format!(
                "{:?} is longer than max_age ({:?})",
                s.duplicate_window.0, s.max_age.0
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_nats_rules() {
        assert!(validate_subject("orders.created").is_ok());
        let e = validate_subject("orders..created").unwrap_err();
        assert!(e.contains("token 2 is empty"), "{e}");
        let e = validate_subject("orders.*").unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
        let e = validate_subject("orders created").unwrap_err();
        assert!(e.contains("position 7"), "{e}");
        assert!(validate_subject(".orders").is_err());
    }

    #[test]
    fn filters_cover_subjects() {
        assert!(subject_matches("orders.>", "orders.a.b"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.*", "orders.a"));
        assert!(!subject_matches("orders.*", "orders.a.b"));
        assert!(subject_matches("orders", "orders"));
    }

    #[test]
    fn persistence_follows_topic_then_default() {
        let c: NatsConfig = toml::from_str(
            "persistence = \"ephemeral\"\n[topics.\"audit.*\"]\npersistence = \"persistent\"\n\
             [topics.\"x\"]\npersistence = \"auto\"\n",
        )
        .unwrap();
        assert_eq!(c.persistence_for("audit.login"), Persistence::Persistent);
        assert_eq!(c.persistence_for("x"), Persistence::Ephemeral);
        assert_eq!(c.persistence_for("other"), Persistence::Ephemeral);
    }

    #[test]
    fn bad_streams_name_the_key() {
        let c: NatsConfig =
            toml::from_str("[streams.orders]\nsubjects = [\"orders.>\"]\nmax_bytes = 0\n").unwrap();
        let e = c.validate("backends.n").unwrap_err().to_string();
        assert!(e.contains("backends.n.streams.orders.max_bytes"), "{e}");
        let c: NatsConfig =
            toml::from_str("[streams.\"or ders\"]\nsubjects = [\"orders.>\"]\n").unwrap();
        let e = c.validate("backends.n").unwrap_err().to_string();
        assert!(e.contains("not a stream name"), "{e}");
        let c: NatsConfig = toml::from_str("[streams.o]\nsubjects = [\"a.>.b\"]\n").unwrap();
        let e = c.validate("backends.n").unwrap_err().to_string();
        assert!(e.contains("subjects[0]"), "{e}");
    }
}
