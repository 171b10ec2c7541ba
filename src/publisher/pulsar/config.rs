//! Settings of a Pulsar backend (`[backends.<name>]` with `type = "pulsar"`), their validation,
//! and how an outbox topic becomes a Pulsar topic name.

use crate::config::value::{invalid, ConfigError, Dur, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PulsarConfig {
    /// The broker's (or proxy's) service URL: `pulsar://host:6650` or `pulsar+ssl://host:6651`,
    /// or several hosts as the Go and Java clients write them (`pulsar://a:6650,b:6650`),
    /// tried in order until one answers; the cluster's lookups then find the topic owners.
    pub service_url: String,
    /// Tenant and namespace of topics no `topics` entry places elsewhere.
    pub tenant: String,
    pub namespace: String,
    /// What topics without an entry use: `persistent` or `ephemeral` (`non-persistent://`).
    pub persistence: Persistence,
    /// Topic name or glob -> where and how it is published. The first glob that matches wins
    /// (in name order) when the topic has no entry of its own.
    pub topics: BTreeMap<String, TopicSettings>,
    /// How long a send waits for its topic's producer to be created (the creation goes on in
    /// the background and is shared by the sends that need it).
    pub operation_timeout: Dur,
    /// A message not acknowledged this long after it was first sent (resends after a
    /// reconnect included) is reported unavailable and sent again later by the relay. Also
    /// what pulsar-rs gives a lookup or a producer creation. Shorter than
    /// `relay.publish_timeout`, so the relay hears pulsar-rs' verdict before it gives up.
    pub send_timeout: Dur,
    pub connection_timeout: Dur,
    /// Messages sent and not yet acknowledged, over all topics. A full window makes the relay
    /// wait; nothing is dropped.
    pub max_pending_messages: u32,
    pub batching: bool,
    pub batching_max_messages: u32,
    pub batching_max_bytes: u32,
    pub batching_max_publish_delay: Dur,
    pub compression: Compression,
    /// A message larger than this (body, key and properties) fails before it is sent; the
    /// broker's `maxMessageSize` defaults to 5 MiB.
    pub max_message_bytes: u32,
    /// Producer names are `<prefix>-<relay instance>-<n>`, so they are unique per topic.
    pub producer_name_prefix: String,
    pub auth: AuthMethod,
    /// `auth = "token"`: the JWT.
    pub token: Option<Secret>,
    /// `auth = "oauth2"`: client credentials flow.
    pub oauth2_issuer_url: Option<String>,
    /// `file:///path/credentials.json` or `data:application/json;base64,...`; a secret (it
    /// holds the client secret, or points at it).
    pub oauth2_credentials_url: Option<Secret>,
    pub oauth2_audience: Option<String>,
    pub oauth2_scope: Option<String>,
    /// PEM file of the certificate authorities to trust (`pulsar+ssl://`).
    pub tls_ca_file: Option<String>,
    pub tls_hostname_verification: bool,
    /// Accept any server certificate. For tests only.
    pub tls_allow_insecure: bool,
    /// Not supported by pulsar-rs; rejected at start-up, so a configuration that expects mTLS
    /// never runs without it.
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub health_timeout: Dur,
}

impl Default for PulsarConfig {
    fn default() -> Self {
        PulsarConfig {
            service_url: "pulsar://127.0.0.1:6650".into(),
            tenant: "public".into(),
            namespace: "default".into(),
            persistence: Persistence::Persistent,
            topics: BTreeMap::new(),
            operation_timeout: Dur::secs(30),
            send_timeout: Dur::secs(25),
            connection_timeout: Dur::secs(10),
            max_pending_messages: 4096,
            batching: true,
            batching_max_messages: 1000,
            batching_max_bytes: 131_072,
            batching_max_publish_delay: Dur::ms(1),
            compression: Compression::None,
            max_message_bytes: 5_242_880,
            producer_name_prefix: "outbox-relay".into(),
            auth: AuthMethod::None,
            token: None,
            oauth2_issuer_url: None,
            oauth2_credentials_url: None,
            oauth2_audience: None,
            oauth2_scope: None,
            tls_ca_file: None,
            tls_hostname_verification: true,
            tls_allow_insecure: false,
            tls_cert_file: None,
            tls_key_file: None,
            health_timeout: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Persistence {
    /// `persistent://`: stored by the broker, acknowledged once stored.
    #[default]
    Persistent,
    /// `non-persistent://`: delivered to the subscribers connected now, never stored.
    Ephemeral,
    /// Follows the backend's `persistence`.
    Auto,
}

impl Persistence {
    /// The topic name's scheme (`auto` resolved by the caller: it reads as persistent).
    pub fn scheme(self) -> &'static str {
        match self {
            Persistence::Ephemeral => "non-persistent",
            Persistence::Persistent | Persistence::Auto => "persistent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zlib,
    Zstd,
    Snappy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    #[default]
    None,
    Token,
    Oauth2,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    pub persistence: Persistence,
    /// Defaults to the backend's.
    pub tenant: Option<String>,
    pub namespace: Option<String>,
}

/// Characters Pulsar allows in tenant and namespace names (its `NamedEntity` rule) and the
/// relay allows in a topic's local name: letters, digits and `-_=:.`.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_=:.".contains(c)
}

/// Why `name` cannot be a Pulsar tenant, namespace or local topic name, if it cannot.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > 255 {
        return Some(format!("is {} bytes long; at most 255", name.len()));
    }
    name.chars()
        .enumerate()
        .find(|(_, c)| !name_char(*c))
        .map(|(i, c)| {
            format!(
                "{name:?}: character {c:?} (U+{:04X}) at position {} is not allowed; \
                 Pulsar names use ASCII letters, digits and '-', '_', '=', ':', '.'",
                c as u32,
                i + 1
            )
        })
}

impl PulsarConfig {
    /// The settings `topic` is published with: its own entry, else the first glob matching it.
    fn settings_for(&self, topic: &str) -> Option<&TopicSettings> {
        crate::routing::setting_for(&self.topics, topic)
    }

    pub fn persistence_for(&self, topic: &str) -> Persistence {
        match self.settings_for(topic).map(|s| s.persistence) {
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

    /// The full Pulsar topic name of an outbox topic: `persistent://tenant/namespace/topic`
    /// (`non-persistent://` when ephemeral), or the topic itself when it is already a full
    /// name. The error says why the row's topic cannot be a Pulsar topic.
    pub fn pulsar_topic(&self, topic: &str) -> Result<String, String> {
        for scheme in ["persistent://", "non-persistent://"] {
            if let Some(rest) = topic.strip_prefix(scheme) {
                let parts: Vec<&str> = rest.split('/').collect();
                if parts.len() != 3 {
                    return Err(format!(
                        "topic {topic:?} is not a full Pulsar name: \
                         {scheme}<tenant>/<namespace>/<topic>"
                    ));
                }
                for (what, p) in ["tenant", "namespace", "topic"].iter().zip(&parts) {
                    if let Some(problem) = name_problem(p) {
                        return Err(format!("topic {topic:?}: its {what} {problem}"));
                    }
                }
                return Ok(topic.to_string());
            }
        }
        if let Some(problem) = name_problem(topic) {
            return Err(format!("topic {problem}"));
        }
        if let Some((_, n)) = topic.rsplit_once("-partition-") {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "topic {topic:?} ends in -partition-{n}, which Pulsar reads as one \
                     partition of topic {:?}",
                    &topic[..topic.len() - n.len() - "-partition-".len()]
                ));
            }
        }
        let own = self.settings_for(topic);
        let tenant = own
            .and_then(|s| s.tenant.as_deref())
            .unwrap_or(&self.tenant);
        let namespace = own
            .and_then(|s| s.namespace.as_deref())
            .unwrap_or(&self.namespace);
        let scheme = self.persistence_for(topic).scheme();
        Ok(format!("{scheme}://{tenant}/{namespace}/{topic}"))
    }

    /// Checks every key; `key` is this backend's prefix (`backends.<name>`);
    /// `publish_timeout` is `relay.publish_timeout`.
    pub fn validate(&self, key: &str, publish_timeout: Dur) -> Result<(), ConfigError> {
        self.validate_url(key)?;
        self.validate_names(key)?;
        self.validate_limits(key, publish_timeout)?;
        self.validate_auth(key)?;
        self.validate_tls(key)
    }

    /// One `pulsar://` or `pulsar+ssl://` URL with one or more `host:port`, comma-separated.
    fn validate_url(&self, key: &str) -> Result<(), ConfigError> {
        let url = self.service_url.as_str();
        let hosts = url
            .strip_prefix("pulsar://")
            .or_else(|| url.strip_prefix("pulsar+ssl://"))
            .map(|r| r.trim_end_matches('/'));
        let host_ok = |host_port: &str| {
            !host_port.contains(['/', ' ', '?', '#', '@'])
                && host_port.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                })
        };
        if !hosts.is_some_and(|h| h.split(',').all(host_ok)) {
            return Err(invalid(
                format!("{key}.service_url"),
                format!(
                    "{:?} is not allowed: pulsar://host:port or pulsar+ssl://host:port, or \
                     several hosts as pulsar://host1:port,host2:port",
                    crate::config::secrets::redact_url(url)
                ),
            ));
        }
        Ok(())
    }

    /// The service URL once per host (`pulsar://a:1,b:1` is `pulsar://a:1` and
    /// `pulsar://b:1`), in the order they are tried: pulsar-rs takes one host per client.
    pub fn service_urls(&self) -> Vec<String> {
        let url = self.service_url.trim_end_matches('/');
        let (scheme, hosts) = url.split_once("://").unwrap_or(("pulsar", url));
        hosts
            .split(',')
            .map(|host| format!("{scheme}://{host}"))
            .collect()
    }

    /// Tenants, namespaces and topic names Pulsar accepts.
    fn validate_names(&self, key: &str) -> Result<(), ConfigError> {
        for (k, v) in [("tenant", &self.tenant), ("namespace", &self.namespace)] {
            if let Some(problem) = name_problem(v) {
                return Err(invalid(format!("{key}.{k}"), problem));
            }
        }
        for (pattern, t) in &self.topics {
            let tkey = format!("{key}.topics.{pattern:?}");
            if !pattern.contains(['*', '?']) {
                if let Some(problem) = name_problem(pattern) {
                    return Err(invalid(&tkey, format!("topic {problem}")));
                }
            }
            for (k, v) in [("tenant", &t.tenant), ("namespace", &t.namespace)] {
                if let Some(problem) = v.as_deref().and_then(name_problem) {
                    return Err(invalid(format!("{tkey}.{k}"), problem));
                }
            }
        }
        Ok(())
    }

    /// Timeouts and the send queue, then the batches.
    fn validate_limits(&self, key: &str, publish_timeout: Dur) -> Result<(), ConfigError> {
        for (k, d) in [
            ("operation_timeout", self.operation_timeout),
            ("send_timeout", self.send_timeout),
            ("connection_timeout", self.connection_timeout),
            ("health_timeout", self.health_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(format!("{key}.{k}"), "must be more than 0"));
            }
        }
        if !(1..=100_000).contains(&self.max_pending_messages) {
            return Err(invalid(
                format!("{key}.max_pending_messages"),
                format!(
                    "{} is not allowed, must be 1 to 100000",
                    self.max_pending_messages
                ),
            ));
        }
        if self.send_timeout.0 + self.batching_max_publish_delay.0 >= publish_timeout.0 {
            return Err(invalid(
                format!("{key}.send_timeout"),
                format!(
                    "{:?} (plus batching_max_publish_delay) is not shorter than \
                     relay.publish_timeout ({:?}): the relay would give up on a message \
                     pulsar-rs still resends",
                    self.send_timeout.0, publish_timeout.0
                ),
            ));
        }
        self.validate_batching(key)
    }

    /// Batch sizes, the message size they leave room for, and the producer name prefix.
    fn validate_batching(&self, key: &str) -> Result<(), ConfigError> {
        // pulsar-rs sets aside a slot per message of a batch, per producer.
        if !(1..=10_000).contains(&self.batching_max_messages) {
            return Err(invalid(
                format!("{key}.batching_max_messages"),
                format!(
                    "{} is not allowed, must be 1 to 10000",
                    self.batching_max_messages
                ),
            ));
        }
        if !(1024..=16_777_216).contains(&self.batching_max_bytes) {
            return Err(invalid(
                format!("{key}.batching_max_bytes"),
                format!(
                    "{} is not allowed, must be 1024 to 16777216",
                    self.batching_max_bytes
                ),
            ));
        }
        if self.batching && self.batching_max_publish_delay.0.is_zero() {
            return Err(invalid(
                format!("{key}.batching_max_publish_delay"),
                "must be more than 0 while batching is on",
            ));
        }
        let room = if self.batching {
            self.batching_max_bytes
        } else {
            0
        } + super::FRAMING as u32
            + 1024;
        if !(room..=1_073_741_824).contains(&self.max_message_bytes) {
            return Err(invalid(
                format!("{key}.max_message_bytes"),
                format!(
                    "{} is not allowed, must be {room} (batching_max_bytes when batching, plus \
                     16 KiB of framing and 1 KiB) to 1073741824, and at most the broker's \
                     maxMessageSize",
                    self.max_message_bytes
                ),
            ));
        }
        if self.producer_name_prefix.is_empty() || !self.producer_name_prefix.chars().all(name_char)
        {
            return Err(invalid(
                format!("{key}.producer_name_prefix"),
                format!(
                    "{:?} is not allowed: ASCII letters, digits and '-', '_', '=', ':', '.'",
                    self.producer_name_prefix
                ),
            ));
        }
        Ok(())
    }

    /// The credentials `auth` needs, and none it would ignore.
    fn validate_auth(&self, key: &str) -> Result<(), ConfigError> {
        match self.auth {
            AuthMethod::None => {
                if self.token.is_some() || self.oauth2_credentials_url.is_some() {
                    return Err(invalid(
                        format!("{key}.auth"),
                        "is \"none\" but a token or OAuth2 credentials are set; \
                         set auth = \"token\" or \"oauth2\"",
                    ));
                }
            }
            AuthMethod::Token => {
                if self.token.as_ref().is_none_or(|t| t.expose().is_empty()) {
                    return Err(invalid(
                        format!("{key}.token"),
                        "is required with auth = \"token\" (set it in the environment: \
                         RELAY__BACKENDS__<NAME>__TOKEN)",
                    ));
                }
            }
            AuthMethod::Oauth2 => {
                for (k, set) in [
                    ("oauth2_issuer_url", self.oauth2_issuer_url.is_some()),
                    (
                        "oauth2_credentials_url",
                        self.oauth2_credentials_url.is_some(),
                    ),
                ] {
                    if !set {
                        return Err(invalid(
                            format!("{key}.{k}"),
                            "is required with auth = \"oauth2\"",
                        ));
                    }
                }
                let issuer = self.oauth2_issuer_url.as_deref().unwrap_or_default();
                if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
                    return Err(invalid(
                        format!("{key}.oauth2_issuer_url"),
                        format!("{issuer:?} is not allowed: an http(s):// URL"),
                    ));
                }
                let creds = self
                    .oauth2_credentials_url
                    .as_ref()
                    .map(|s| s.expose())
                    .unwrap_or_default();
                if !(creds.starts_with("file://") || creds.starts_with("data:")) {
                    return Err(invalid(
                        format!("{key}.oauth2_credentials_url"),
                        "is not allowed (value not shown): a file:///path/to/credentials.json \
                         or a data: URL",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Server verification only: client certificates are refused, a CA file must be there.
    fn validate_tls(&self, key: &str) -> Result<(), ConfigError> {
        if self.tls_cert_file.is_some() || self.tls_key_file.is_some() {
            let k = if self.tls_cert_file.is_some() {
                "tls_cert_file"
            } else {
                "tls_key_file"
            };
            return Err(invalid(
                format!("{key}.{k}"),
                "client certificates (mTLS) are not supported by the Pulsar client (pulsar-rs); \
                 authenticate with auth = \"token\" or \"oauth2\" over pulsar+ssl://",
            ));
        }
        if let Some(ca) = &self.tls_ca_file {
            if !std::path::Path::new(ca).is_file() {
                return Err(invalid(
                    format!("{key}.tls_ca_file"),
                    format!("{ca:?} is not a readable file"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_full_names_by_entry_then_default() {
        let c: PulsarConfig = toml::from_str(
            "tenant = \"acme\"\nnamespace = \"orders\"\n\
             [topics.\"audit.*\"]\npersistence = \"ephemeral\"\nnamespace = \"audit\"\n\
             [topics.\"billing\"]\ntenant = \"fin\"\n",
        )
        .unwrap();
        c.validate("backends.p", Dur::secs(30)).unwrap();
        assert_eq!(
            c.pulsar_topic("order.created").unwrap(),
            "persistent://acme/orders/order.created"
        );
        assert_eq!(
            c.pulsar_topic("audit.login").unwrap(),
            "non-persistent://acme/audit/audit.login"
        );
        assert_eq!(
            c.pulsar_topic("billing").unwrap(),
            "persistent://fin/orders/billing"
        );
        assert_eq!(
            c.pulsar_topic("persistent://t/n/x").unwrap(),
            "persistent://t/n/x"
        );
    }

    #[test]
    fn a_service_url_may_list_several_hosts_tried_in_order() {
        let c: PulsarConfig =
            toml::from_str("service_url = \"pulsar+ssl://a.example:6651,10.0.0.2:6651/\"").unwrap();
        c.validate("backends.p", Dur::secs(30)).unwrap();
        assert_eq!(
            c.service_urls(),
            ["pulsar+ssl://a.example:6651", "pulsar+ssl://10.0.0.2:6651"]
        );
        assert_eq!(
            PulsarConfig::default().service_urls(),
            ["pulsar://127.0.0.1:6650"]
        );
    }

    #[test]
    fn bad_topics_say_what_is_allowed() {
        let c = PulsarConfig::default();
        let e = c.pulsar_topic("orders créés").unwrap_err();
        assert!(
            e.contains("position 7") && e.contains("ASCII letters"),
            "{e}"
        );
        let e = c.pulsar_topic("a/b").unwrap_err();
        assert!(e.contains("'/'"), "{e}");
        let e = c.pulsar_topic("").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = c.pulsar_topic("persistent://t/x").unwrap_err();
        assert!(e.contains("not a full Pulsar name"), "{e}");
        let e = c.pulsar_topic("orders-partition-3").unwrap_err();
        assert!(e.contains("one partition of topic \"orders\""), "{e}");
        assert!(c.pulsar_topic("orders-partition-x").is_ok());
        let e = c.pulsar_topic(&"x".repeat(300)).unwrap_err();
        assert!(e.contains("at most 255"), "{e}");
    }

    #[test]
    fn bad_settings_name_the_key() {
        let bad = |toml_text: &str, want: &str| {
            let c: PulsarConfig = toml::from_str(toml_text).unwrap();
            let e = c
                .validate("backends.p", Dur::secs(30))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{toml_text}: {e}");
        };
        bad("service_url = \"http://x:1\"", "backends.p.service_url");
        bad("service_url = \"pulsar://a:1,b\"", "backends.p.service_url");
        bad(
            "service_url = \"pulsar://a:1,,b:1\"",
            "backends.p.service_url",
        );
        bad(
            "service_url = \"pulsar://a:1,b:1/x\"",
            "backends.p.service_url",
        );
        bad("tenant = \"a b\"", "backends.p.tenant");
        bad(
            "max_pending_messages = 0",
            "backends.p.max_pending_messages",
        );
        bad("send_timeout = \"0s\"", "backends.p.send_timeout");
        bad("auth = \"token\"", "backends.p.token");
        bad("token = \"t\"", "backends.p.auth");
        bad("auth = \"oauth2\"", "backends.p.oauth2_issuer_url");
        bad(
            "auth = \"oauth2\"\noauth2_issuer_url = \"https://i\"\n\
             oauth2_credentials_url = \"secret-value\"",
            "backends.p.oauth2_credentials_url",
        );
        bad("tls_cert_file = \"/c.pem\"", "mTLS");
        bad(
            "tls_ca_file = \"/nonexistent/ca.pem\"",
            "backends.p.tls_ca_file",
        );
        bad("batching_max_bytes = 10", "backends.p.batching_max_bytes");
        bad("service_url = \"pulsar://:6650\"", "backends.p.service_url");
        bad(
            "service_url = \"pulsar://h:99999\"",
            "backends.p.service_url",
        );
        bad("service_url = \"pulsar://h\"", "backends.p.service_url");
        bad("send_timeout = \"30s\"", "relay.publish_timeout");
        bad("max_message_bytes = 100000", "backends.p.max_message_bytes");
        bad(
            "batching_max_messages = 100000",
            "backends.p.batching_max_messages",
        );
        bad("[topics.\"a b\"]\n", "backends.p.topics");
        let c: PulsarConfig = toml::from_str(
            "auth = \"oauth2\"\noauth2_issuer_url = \"https://i\"\n\
             oauth2_credentials_url = \"secret-value\"",
        )
        .unwrap();
        let e = c
            .validate("backends.p", Dur::secs(30))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret-value"), "{e}");
    }
}
