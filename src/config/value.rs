//! The building blocks every section's settings are made of: the error that names a key,
//! durations, secrets, and the checks shared by several sections.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A configuration problem, naming the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration file {path}: {message}")]
    File { path: String, message: String },
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A value that must never be printed (a URL with a password, a token).
///
/// It takes any scalar (a numeric password given as `RELAY__...=12345` arrives as a number),
/// and its deserialization errors never carry the value: serde's "invalid type: found ..."
/// messages would otherwise print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor("a string (a secret; its value is not shown)"))
            .map(Secret)
    }
}

/// Any scalar as its text; anything else is an error that names only its kind.
struct ScalarVisitor(&'static str);

impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// A map of names to scalars, each kept as its text (librdkafka properties: `linger.ms = 5`
/// and `linger.ms = "5"` alike). A value of the wrong kind is reported without the value.
pub fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct Scalar(#[serde(deserialize_with = "scalar")] String);
    fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(ScalarVisitor("a string, number or boolean"))
    }
    let m: BTreeMap<String, Scalar> = BTreeMap::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A duration written as `250ms`, `1.5s`, `30s`, `5m`, `2h`, `1d` or `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn ms(n: u64) -> Self {
        Dur(Duration::from_millis(n))
    }
    pub const fn secs(n: u64) -> Self {
        Dur(Duration::from_secs(n))
    }
}

/// The units a duration key takes. humantime, which parses the value, knows more (`y`, `M`,
/// `w`, `us`, ...); those are refused, so a typo like `5y` for `5s` is an error, not five years.
const UNITS: [&str; 5] = ["ms", "s", "m", "h", "d"];

/// A duration as `250ms`, `1.5s`, `5m`, `2h`, `1d` or a sum like `1h30m`, parsed by humantime;
/// the error names the value and what is allowed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let mut units = s
        .split(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
        .filter(|u| !u.is_empty())
        .peekable();
    if units.peek().is_none() {
        return Err(format!(
            "{s:?} has no unit; write it like 250ms, 30s, 5m, 2h or 1d"
        ));
    }
    if let Some(other) = units.find(|u| !UNITS.contains(u)) {
        return Err(format!(
            "{s:?} has unit {other:?}; allowed units are ms, s, m, h, d"
        ));
    }
    let too_long = || format!("{s:?} is too long; durations go up to {MAX_DAYS}d");
    match humantime::parse_duration(s) {
        Ok(d) if d > MAX_DURATION => Err(too_long()),
        Ok(d) => Ok(d),
        Err(humantime::DurationError::NumberOverflow) => Err(too_long()),
        Err(e) => Err(format!(
            "{s:?} is not a duration like 250ms, 30s, 5m, 2h or 1d ({e})"
        )),
    }
}

/// The longest duration a key takes: a hundred years. Longer ones are typos, and the relay adds
/// durations to the clock (`Instant + d`), which panics past the clock's range.
const MAX_DAYS: u64 = 36_500;
const MAX_DURATION: Duration = Duration::from_secs(MAX_DAYS * 86_400);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration string like 250ms, 30s, 5m, 2h or 1d")
        })?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// `v` within `lo..=hi`, else an error naming `key`, the value and the range.
pub(crate) fn in_range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        Err(invalid(
            key,
            format!("{v} is not allowed, must be {lo} to {hi}"),
        ))
    } else {
        Ok(())
    }
}

/// Each duration more than zero, else an error naming its key.
pub(crate) fn non_zero(durations: &[(&str, Dur)]) -> Result<(), ConfigError> {
    match durations.iter().find(|(_, d)| d.0.is_zero()) {
        Some((key, _)) => Err(invalid(*key, "must be more than 0")),
        None => Ok(()),
    }
}

/// A lowercase SQL identifier, so it never needs quoting and is safe to put into SQL text.
pub fn validate_identifier(key: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "{value:?} is not allowed: a lowercase SQL identifier of 1 to {max} characters \
                 (a-z, 0-9, _; not starting with a digit)"
            ),
        ))
    }
}

/// What the relay does at start-up about the topics (Kafka) or streams (JetStream) it is
/// configured with. Never per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Provisioning {
    /// Assume they exist; no admin calls at all.
    #[default]
    Skip,
    /// Create the missing ones; leave existing ones as they are.
    CreateOnly,
    /// Create the missing ones and bring existing ones to the configured settings.
    CreateOrUpdate,
    /// Change nothing; report every difference from the configured settings.
    ValidateOnly,
}
