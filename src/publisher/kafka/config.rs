//! Settings of a Kafka backend (`[backends.<name>]` with `type = "kafka"`), their validation,
//! and the librdkafka properties they turn into.

use crate::config::value::{invalid, ConfigError, Dur, Provisioning, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

pub use super::topics::{
    is_pattern, validate_kafka_topic, CleanupPolicy, Compression, Preset, TopicSettings,
};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated host:port list.
    pub bootstrap_servers: String,
    /// ASCII only; brokers log and quota by it.
    pub client_id: String,
    /// Idempotent producer (acks=all, no duplicates or reordering from librdkafka's retries).
    pub idempotence: bool,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    pub ssl_ca_location: Option<String>,
    pub ssl_certificate_location: Option<String>,
    pub ssl_key_location: Option<String>,
    pub ssl_key_password: Option<Secret>,
    /// Any librdkafka producer property; wins over everything above. Values may be written as
    /// strings, numbers or booleans.
    #[serde(deserialize_with = "crate::config::value::scalar_map")]
    pub properties: BTreeMap<String, String>,
    /// Lets `properties` and `idempotence` weaken delivery (acks other than all, idempotence
    /// off). Off: such settings stop the start, naming the key.
    pub allow_weak_delivery: bool,
    /// How long `check` and readiness wait for the broker's metadata.
    pub health_timeout: Dur,
    pub provisioning: Provisioning,
    /// Topic name (or glob over existing topics) -> settings to provision.
    pub topics: BTreeMap<String, TopicSettings>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            client_id: "outbox-relay".into(),
            idempotence: true,
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            properties: BTreeMap::new(),
            allow_weak_delivery: false,
            health_timeout: Dur::secs(5),
            provisioning: Provisioning::Skip,
            topics: BTreeMap::new(),
        }
    }
}

/// Property names whose values are secrets: masked wherever settings are printed. The rule is
/// [`crate::config::secrets::is_secret_key`]'s: a name with "password", "secret", "token", "key" (and
/// the like) unless it names a file location.
pub fn is_secret_property(key: &str) -> bool {
    crate::config::secrets::is_secret_key(key)
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) { "***" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client_id", &self.client_id)
            .field("idempotence", &self.idempotence)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &self.ssl_key_password)
            .field("properties", &props)
            .field("allow_weak_delivery", &self.allow_weak_delivery)
            .field("health_timeout", &self.health_timeout)
            .field("provisioning", &self.provisioning)
            .field("topics", &self.topics)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn as_rdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

impl KafkaConfig {
    /// Checks every key; `key` is this backend's prefix (`backends.<name>`).
    pub fn validate(&self, key: &str, publish_timeout: Dur) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid(
                format!("{key}.bootstrap_servers"),
                "is empty; give host:port[,host:port...]",
            ));
        }
        let id = &self.client_id;
        if id.is_empty() || id.len() > 255 || !id.chars().all(|c| c.is_ascii_graphic()) {
            let bad = id
                .chars()
                .enumerate()
                .find(|(_, c)| !c.is_ascii_graphic())
                .map(|(i, c)| format!(": character {c:?} at position {} is not", i + 1))
                .unwrap_or_default();
            return Err(invalid(
                format!("{key}.client_id"),
                format!("{id:?} is not allowed{bad}; 1 to 255 printable ASCII characters"),
            ));
        }
        if self.security_protocol.uses_sasl() && self.sasl_mechanism.is_none() {
            return Err(invalid(
                format!("{key}.sasl_mechanism"),
                format!(
                    "is required with security_protocol {:?} (PLAIN, SCRAM-SHA-256, \
                     SCRAM-SHA-512, OAUTHBEARER)",
                    self.security_protocol.as_rdkafka()
                ),
            ));
        }
        if self.health_timeout.0.is_zero() {
            return Err(invalid(
                format!("{key}.health_timeout"),
                "must be more than 0",
            ));
        }
        for (topic, settings) in &self.topics {
            let tkey = format!("{key}.topics.{topic:?}");
            if !is_pattern(topic) {
                validate_kafka_topic(topic).map_err(|m| invalid(&tkey, m))?;
            }
            settings.validate(&tkey)?;
        }
        // librdkafka checks every property's name and value; no connection is made.
        let props = self.client_properties(publish_timeout);
        let mut conf = rdkafka::ClientConfig::new();
        for (k, v) in &props {
            conf.set(k, v);
        }
        self.refuse_weak_delivery(key)?;
        if let Err(e) = conf.create_native_config() {
            let (prop, why) = match &e {
                // librdkafka's reason quotes the value: not for a secret one.
                rdkafka::error::KafkaError::ClientConfig(_, _, prop, _)
                    if is_secret_property(prop) =>
                {
                    (
                        prop.clone(),
                        "librdkafka refused its value (not shown: a secret)".to_string(),
                    )
                }
                rdkafka::error::KafkaError::ClientConfig(_, why, prop, _) => {
                    (prop.clone(), crate::config::secrets::redact_secrets(why))
                }
                other => (
                    String::new(),
                    crate::config::secrets::redact_secrets(&other.to_string()),
                ),
            };
            let k = if self.properties.contains_key(&prop) {
                format!("{key}.properties.{prop:?}")
            } else {
                format!("{key} (librdkafka property {prop})")
            };
            return Err(invalid(k, why));
        }
        Ok(())
    }

    /// Settings that would let the broker lose or reorder acknowledged events stop the start
    /// unless `allow_weak_delivery` is set: the relay deletes a row once its delivery report
    /// says it was written, so the report must mean "written to every in-sync replica".
    fn refuse_weak_delivery(&self, key: &str) -> Result<(), ConfigError> {
        let p = |name: &str| {
            self.properties
                .get(name)
                .map(|v| v.trim().to_ascii_lowercase())
        };
        // A delivery report only for failures: the relay would never hear of a success.
        if p("delivery.report.only.error").as_deref() == Some("true") {
            return Err(invalid(
                format!("{key}.properties.\"delivery.report.only.error\""),
                "\"true\" is not allowed: the relay marks rows published from the delivery \
                 report of each message",
            ));
        }
        if self.allow_weak_delivery {
            return Ok(());
        }
        let hint =
            format!("; set {key}.allow_weak_delivery = true to accept losing acknowledged events");
        for name in ["acks", "request.required.acks"] {
            if let Some(v) = p(name) {
                if v != "all" && v != "-1" {
                    return Err(invalid(
                        format!("{key}.properties.{name:?}"),
                        format!(
                            "{v:?} weakens delivery (a broker can lose an acknowledged event); \
                             allowed: \"all\" or \"-1\"{hint}"
                        ),
                    ));
                }
            }
        }
        if p("enable.idempotence").as_deref() == Some("false") {
            return Err(invalid(
                format!("{key}.properties.\"enable.idempotence\""),
                format!(
                    "\"false\" weakens delivery (librdkafka's retries may duplicate and \
                     reorder events); allowed: \"true\"{hint}"
                ),
            ));
        }
        if !self.idempotence {
            return Err(invalid(
                format!("{key}.idempotence"),
                format!(
                    "false weakens delivery (librdkafka's retries may duplicate and reorder \
                     events); allowed: true{hint}"
                ),
            ));
        }
        Ok(())
    }

    /// The librdkafka producer properties: our defaults, the typed settings, then `properties`.
    pub fn client_properties(&self, publish_timeout: Dur) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            p.insert(k.to_string(), v);
        };
        set("bootstrap.servers", self.bootstrap_servers.clone());
        set("client.id", self.client_id.clone());
        set("enable.idempotence", self.idempotence.to_string());
        set("acks", "all".into());
        // Batches of up to 1 ms. Under load batches fill long before that; and an aggregate in
        // strict order moves one event per round trip, linger included: 5 ms (librdkafka's
        // default) held one aggregate at ~170 ev/s and 300 aggregates at ~41k ev/s; 1 ms gives
        // ~730 and ~79k, and the 1M drain the same or less CPU per event.
        set("linger.ms", "1".into());
        set("batch.num.messages", "10000".into());
        // librdkafka gives up on a message before the relay's publish timeout does, so the
        // relay hears the broker's reason rather than its own timeout.
        let timeout_ms = (publish_timeout.0.as_millis() as u64 * 9 / 10).max(1000);
        set("message.timeout.ms", timeout_ms.to_string());
        set(
            "security.protocol",
            self.security_protocol.as_rdkafka().into(),
        );
        if let Some(m) = &self.sasl_mechanism {
            set("sasl.mechanism", m.clone());
        }
        if let Some(u) = &self.sasl_username {
            set("sasl.username", u.clone());
        }
        if let Some(pw) = &self.sasl_password {
            set("sasl.password", pw.expose().to_string());
        }
        if let Some(v) = &self.ssl_ca_location {
            set("ssl.ca.location", v.clone());
        }
        if let Some(v) = &self.ssl_certificate_location {
            set("ssl.certificate.location", v.clone());
        }
        if let Some(v) = &self.ssl_key_location {
            set("ssl.key.location", v.clone());
        }
        if let Some(pw) = &self.ssl_key_password {
            set("ssl.key.password", pw.expose().to_string());
        }
        for (k, v) in &self.properties {
            set(k, v.clone());
        }
        p
    }

    /// The settings for `topic`: its own entry, else the first pattern that matches it.
    pub fn settings_for(&self, topic: &str) -> Option<&TopicSettings> {
        crate::routing::setting_for(&self.topics, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> TopicSettings {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn bad_topic_settings_name_the_key() {
        let err = settings("compression = \"gzip\"\ncompression_level = 20")
            .validate("backends.k.topics.\"orders\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("backends.k.topics.\"orders\".compression_level")
                && err.contains("20")
                && err.contains("1 to 9"),
            "{err}"
        );
        let err = settings("partitions = 0")
            .validate("t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.partitions") && err.contains("0 is not allowed"),
            "{err}"
        );
        let err = toml::from_str::<TopicSettings>("compression = \"brotli\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("brotli") && err.contains("zstd"), "{err}");
        let err = settings("compression_level = 3")
            .validate("t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.compression_level"), "{err}");
    }

    #[test]
    fn presets_fill_unset_keys_only() {
        let s = settings("preset = \"high\"\npartitions = 3").resolved();
        assert_eq!(s.partitions, Some(3));
        assert_eq!(s.compression, Some(Compression::Lz4));
        assert!(s.configs().contains(&("retention.ms", "86400000".into())));
    }

    #[test]
    fn kafka_topic_rules() {
        assert!(validate_kafka_topic("orders.v1_x-y").is_ok());
        let e = validate_kafka_topic("orders/v1").unwrap_err();
        assert!(e.contains("'/'") && e.contains("position 7"), "{e}");
        assert!(validate_kafka_topic("..").is_err());
        assert!(validate_kafka_topic(&"a".repeat(250)).is_err());
    }

    #[test]
    fn secret_properties_are_masked() {
        let mut c = KafkaConfig::default();
        c.properties
            .insert("sasl.password".into(), "hunter2".into());
        c.sasl_password = Some(Secret::new("hunter3"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
    }

    #[test]
    fn weak_delivery_is_refused_naming_the_key_unless_allowed() {
        let weak = |k: &str, v: &str| {
            let mut c = KafkaConfig::default();
            c.properties.insert(k.into(), v.into());
            c
        };
        for (k, v) in [
            ("acks", "1"),
            ("acks", "0"),
            ("request.required.acks", "1"),
            ("enable.idempotence", "false"),
        ] {
            let err = weak(k, v)
                .validate("backends.k", Dur::secs(30))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("backends.k.properties.{k:?}"))
                    && err.contains(v)
                    && err.contains("backends.k.allow_weak_delivery"),
                "{err}"
            );
        }
        let c = KafkaConfig {
            idempotence: false,
            ..KafkaConfig::default()
        };
        let err = c
            .validate("backends.k", Dur::secs(30))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("backends.k.idempotence") && err.contains("allow_weak_delivery"),
            "{err}"
        );
        for ok in ["all", "-1", "ALL"] {
            weak("acks", ok).validate("b", Dur::secs(30)).unwrap();
        }
        let allowed = KafkaConfig {
            allow_weak_delivery: true,
            idempotence: false,
            ..weak("acks", "1")
        };
        allowed.validate("b", Dur::secs(30)).unwrap();
        // Never allowed: the relay would not hear of successes at all.
        let err = KafkaConfig {
            allow_weak_delivery: true,
            ..weak("delivery.report.only.error", "true")
        }
        .validate("b", Dur::secs(30))
        .unwrap_err()
        .to_string();
        assert!(err.contains("delivery.report.only.error"), "{err}");
    }

    #[test]
    fn unset_partitions_and_replication_ask_for_the_broker_defaults() {
        let s = settings("retention = \"1d\"");
        assert_eq!((s.partitions(), s.replication_factor()), (-1, -1));
        let s = settings("partitions = 3\nreplication_factor = 3");
        assert_eq!((s.partitions(), s.replication_factor()), (3, 3));
    }

    #[test]
    fn a_refused_secret_property_value_is_not_shown() {
        let mut c = KafkaConfig::default();
        c.properties
            .insert("sasl.oauthbearer.config".into(), "hunter2-oauth".into());
        c.properties
            .insert("sasl.oauthbearer.method".into(), "hunter2-method".into());
        let err = c.validate("b", Dur::secs(30)).unwrap_err().to_string();
        assert!(!err.contains("hunter2-oauth"), "{err}");
    }

    #[test]
    fn unknown_librdkafka_properties_are_rejected_naming_them() {
        let mut c = KafkaConfig::default();
        c.properties.insert("linger.msec".into(), "5".into());
        let err = c
            .validate("backends.k", Dur::secs(30))
            .unwrap_err()
            .to_string();
        assert!(err.contains("linger.msec"), "{err}");
        let c = KafkaConfig {
            client_id: "relé".into(),
            ..KafkaConfig::default()
        };
        let err = c
            .validate("backends.k", Dur::secs(30))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("backends.k.client_id") && err.contains("'é'"),
            "{err}"
        );
    }
}
