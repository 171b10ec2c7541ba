use super::secrets::register_secret;
use super::*;
use crate::envelope::{cloudevents, CloudEventsFormat, CloudEventsMode};
use crate::publisher::kafka::KafkaConfig;
use crate::publisher::nats::NatsConfig;
use crate::publisher::pulsar::PulsarConfig;
use std::io::Write;
use std::time::Duration;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    Config::load_from(
        Some(f.path()),
        &Overrides::default(),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn empty_file_gives_defaults_with_stdout_catch_all() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.relay.batch_size, 1000);
    assert!(matches!(c.backends["stdout"], BackendConfig::Stdout {}));
    assert_eq!(c.routes[0].topic, "*");
    assert_eq!(c.database.max_connections, c.relay.pipeline_depth + 2);
}

#[test]
fn unknown_key_is_rejected_naming_it() {
    let err = load("[relay]\nbatch_sise = 10\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch_sise"), "{err}");
    let err = load("[relais]\n", &[]).unwrap_err().to_string();
    assert!(err.contains("relais"), "{err}");
    let err = load("[backends.k]\ntype = \"stdout\"\nbroker = 1\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("broker"), "{err}");
}

#[test]
fn environment_overrides_file_and_names_bad_keys() {
    let c = load(
        "[relay]\nbatch_size = 10\n",
        &[("RELAY__RELAY__BATCH_SIZE", "20")],
    )
    .unwrap();
    assert_eq!(c.relay.batch_size, 20);
    let c = load("", &[("RELAY__RELAY__POLL_INTERVAL", "250ms")]).unwrap();
    assert_eq!(c.relay.poll_interval.0, Duration::from_millis(250));
    let err = load("", &[("RELAY__RELAY__BATCHSIZE", "20")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("batchsize"), "{err}");
}

#[test]
fn invalid_values_name_the_key_and_the_allowed_range() {
    let err = load("[relay]\nbatch_size = 0\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("relay.batch_size") && err.contains("1 to 50000"),
        "{err}"
    );
    let err = load("[database]\ntable = \"Out-box\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("database.table") && err.contains("Out-box"),
        "{err}"
    );
    let err = load("[relay]\npoll_interval = \"5 parsecs\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("poll_interval") && err.contains("parsecs"),
        "{err}"
    );
    let err = load(
        "[backends.a]\ntype = \"stdout\"\n[[routes]]\ntopic = \"*\"\nbackend = \"b\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("routes[0].backend") && err.contains("\"b\""),
        "{err}"
    );
    let err = load("[backends.a]\ntype = \"carrier-pigeon\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("carrier-pigeon"), "{err}");
}

#[test]
fn secrets_do_not_print() {
    let c = load("[database]\nurl = \"postgres://u:hunter2@h/db\"\n", &[]).unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
    assert_eq!(
        redact_url("postgres://u:hunter2@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
}

#[test]
fn the_documented_relay_toml_parses_and_states_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml");
    let c = Config::load_from(Some(&path), &Overrides::default(), Vec::new()).unwrap();
    let mut d = Config::default();
    d.apply_defaults();
    assert_eq!(format!("{:?}", c.database), format!("{:?}", d.database));
    assert_eq!(c.database.url.expose(), d.database.url.expose());
    assert_eq!(format!("{:?}", c.relay), format!("{:?}", d.relay));
    assert_eq!(format!("{:?}", c.log), format!("{:?}", d.log));
    assert_eq!(format!("{:?}", c.http), format!("{:?}", d.http));
    assert_eq!(format!("{:?}", c.monitor), format!("{:?}", d.monitor));
    assert_eq!(format!("{:?}", c.tracing), format!("{:?}", d.tracing));
    assert_eq!(format!("{:?}", c.backends), format!("{:?}", d.backends));
    assert_eq!(format!("{:?}", c.routes), format!("{:?}", d.routes));
}

/// The Kafka, NATS and Pulsar sections of relay.toml are commented out (no broker by default);
/// uncommented, they must parse and state the defaults.
#[test]
fn the_documented_broker_sections_state_the_defaults() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml")).unwrap();
    let section = |from: &str, to: Option<&str>| -> String {
        let start = text.find(from).expect(from);
        let end = to.map(|t| text.find(t).expect(t)).unwrap_or(text.len());
        text[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    #[derive(Deserialize)]
    struct Doc {
        backends: BTreeMap<String, BackendConfig>,
    }
    let kafka: Doc = toml::from_str(&section("# ---- Kafka", Some("# ---- NATS"))).unwrap();
    let BackendConfig::Kafka(mut k) = kafka.backends["kafka"].clone() else {
        panic!("a kafka backend")
    };
    assert_eq!(k.topics.len(), 1, "the example topic");
    k.topics.clear();
    assert_eq!(format!("{k:?}"), format!("{:?}", KafkaConfig::default()));
    let nats: Doc = toml::from_str(&section("# ---- NATS", Some("# ---- Pulsar"))).unwrap();
    let BackendConfig::Nats(mut n) = nats.backends["nats"].clone() else {
        panic!("a nats backend")
    };
    let orders = n.streams.remove("ORDERS").expect("the example stream");
    assert_eq!(
        orders,
        crate::publisher::nats::config::StreamSettings {
            subjects: vec!["orders.>".into()],
            ..Default::default()
        }
    );
    n.topics.clear();
    assert_eq!(format!("{n:?}"), format!("{:?}", NatsConfig::default()));
    let pulsar: Doc = toml::from_str(&section("# ---- Pulsar", Some("# Routes:"))).unwrap();
    let BackendConfig::Pulsar(mut p) = pulsar.backends["pulsar"].clone() else {
        panic!("a pulsar backend")
    };
    assert_eq!(p.topics.len(), 1, "the example topic");
    p.topics.clear();
    p.validate("backends.pulsar", Dur::secs(30)).unwrap();
    assert_eq!(format!("{p:?}"), format!("{:?}", PulsarConfig::default()));
}

#[test]
fn urls_are_redacted_in_every_form() {
    assert_eq!(
        redact_url("postgres://u:hunter2@h:5432/db?sslmode=require&password=hunter3"),
        "postgres://u:***@h:5432/db?sslmode=require&password=***"
    );
    assert_eq!(
        redact_url("postgres://u:p@ss/w@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(redact_url("nats://s3cr3tt0ken@h:4222"), "nats://***@h:4222");
    let kv = redact_url("host=h user=u password=hunter2");
    assert!(!kv.contains("hunter2"), "{kv}");
}

#[test]
fn secret_names_exclude_file_locations() {
    for k in [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "ssl.key.pem",
        "token",
        "nkey_seed",
        "sasl_password",
    ] {
        assert!(is_secret_key(k), "{k}");
    }
    for k in [
        "ssl.key.location",
        "ssl.keystore.location",
        "sasl.kerberos.keytab",
        "tls_key_file",
        "linger.ms",
        "acks",
    ] {
        assert!(!is_secret_key(k), "{k}");
    }
}

#[test]
fn type_errors_about_secrets_do_not_show_them() {
    // A numeric password from the environment is a password, digits kept.
    let c = load(
        "[backends.n]\ntype = \"nats\"\nuser = \"u\"\n",
        &[("RELAY__BACKENDS__N__PASSWORD", "0071234")],
    )
    .unwrap();
    let BackendConfig::Nats(n) = &c.backends["n"] else {
        panic!("nats")
    };
    assert_eq!(n.password.as_ref().unwrap().expose(), "0071234");
    let err = load(
        "[backends.n]\ntype = \"nats\"\nuser = \"u\"\npassword = [\"hunter2-list\"]\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains("hunter2-list"), "{err}");
    // A secret put where a number belongs: serde would print it.
    let err = load(
        "[backends.k]\ntype = \"kafka\"\nsasl_password = \"hunter2-pw\"\n",
        &[("RELAY__RELAY__BATCH_SIZE", "hunter2-pw")],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("batch_size") && !err.contains("hunter2-pw"),
        "{err}"
    );
    let err = load(
        "[backends.k]\ntype = \"kafka\"\n[backends.k.properties]\n\
         \"sasl.password\" = { x = \"hunter2-map\" }\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains("hunter2-map"), "{err}");
}

#[test]
fn database_urls_are_checked_without_showing_them() {
    let err = load("[database]\nurl = \"host=h password=hunter2-kv\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("database.url") && err.contains("postgres://") && !err.contains("hunter2"),
        "{err}"
    );
    let err = load(
        "[database]\nurl = \"postgres://u@h/db?sslpassword=hunter2-q\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"sslpassword\"") && !err.contains("hunter2-q"),
        "{err}"
    );
    let err = load(
        "[database]\nurl = \"postgres://u@h/db?sslmode=allow\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("verify-full") && err.contains("allow"),
        "{err}"
    );
    let err = load(
        "[database]\nurl = \"postgres://u@h/db?sslmode=require\"\nssl_mode = \"verify-full\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("database.ssl_mode"), "{err}");
    let err = load(
        "[database]\nssl_mode = \"verify-ca\"\nssl_root_cert = \"/nonexistent/ca.pem\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("database.ssl_root_cert") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let err = load("[database]\nssl_mode = \"strict\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("database.ssl_mode") && err.contains("strict"),
        "{err}"
    );
    let c = load(
        "[database]\nurl = \"postgres://u:pw@h/db?sslmode=verify-full&application_name=x\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.database.tls().mode.as_deref(), Some("verify-full"));
    assert!(!c.database.tls().client_cert);
    // A client certificate or key in the URL is a TLS setting too.
    for param in [
        "sslcert=/c.crt",
        "ssl-cert=/c.crt",
        "sslkey=/c.key",
        "ssl-key=/c.key",
    ] {
        let c = load(
            &format!("[database]\nurl = \"postgres://u@127.0.0.1/db?{param}\"\n"),
            &[],
        )
        .unwrap();
        assert!(c.database.tls().client_cert, "{param}");
    }
}

#[test]
fn registered_secrets_are_scrubbed_from_any_text() {
    register_url_secrets("postgres://u:Hunter%2F99@h/db");
    assert_eq!(
        redact_secrets("auth failed for Hunter/99 and Hunter%2F99"),
        "auth failed for *** and ***"
    );
    // Too short to scrub without masking ordinary words.
    register_secret("ab");
    assert_eq!(redact_secrets("abc"), "abc");
}

#[test]
fn cloudevents_routes_take_a_mode_and_a_required_source() {
    let route = |keys: &str| {
        load(
            &format!("[backends.a]\ntype = \"stdout\"\n[[routes]]\ntopic = \"*\"\nbackend = \"a\"\n{keys}"),
            &[],
        )
    };
    let c =
        route("format = \"cloudevents\"\ncloudevents_source = \"urn:example:orders\"\n").unwrap();
    let BodyFormat::CloudEvents(ce) = c.routes[0].format else {
        panic!("cloudevents: {:?}", c.routes[0].format)
    };
    assert_eq!(ce.mode, CloudEventsMode::Binary, "the default mode");
    assert_eq!(ce.source.as_str(), "urn:example:orders");
    let c = route(
        "format = \"cloudevents\"\ncloudevents_mode = \"structured\"\n\
         cloudevents_source = \"https://orders.example.com\"\n",
    )
    .unwrap();
    assert!(matches!(
        c.routes[0].format,
        BodyFormat::CloudEvents(CloudEventsFormat {
            mode: CloudEventsMode::Structured,
            ..
        })
    ));
    assert_eq!(
        c.routes[0].format.to_string(),
        "cloudevents (structured, source \"https://orders.example.com\")"
    );

    let err = route("format = \"cloudevents\"\n").unwrap_err().to_string();
    assert!(
        err.contains("routes[0].cloudevents_source") && err.contains("required"),
        "{err}"
    );
    let err = route("format = \"cloudevents\"\ncloudevents_source = \"orders service\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[0].cloudevents_source") && err.contains("position 7"),
        "{err}"
    );
    let err = route(
        "format = \"cloudevents\"\ncloudevents_mode = \"batch\"\ncloudevents_source = \"/x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch") && err.contains("binary"), "{err}");
    // A CloudEvents key on another format would be ignored: it is refused, named.
    let err = route("format = \"envelope\"\ncloudevents_source = \"/x\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cloudevents_source") && err.contains("\"envelope\""),
        "{err}"
    );
    let err = route("cloudevents_mode = \"binary\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cloudevents_mode") && err.contains("\"raw\""),
        "{err}"
    );
    let err = route("format = \"cloudevent\"\n").unwrap_err().to_string();
    assert!(err.contains("cloudevent"), "{err}");
    let err = route("fromat = \"raw\"\n").unwrap_err().to_string();
    assert!(err.contains("fromat"), "{err}");
}

/// relay.toml's commented CloudEvents route, uncommented, is a valid route.
#[test]
fn the_documented_cloudevents_route_parses() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml")).unwrap();
    let start = text
        .find("# A CloudEvents route")
        .expect("the example route");
    let example: String = text[start..]
        .lines()
        .skip(1)
        .map_while(|l| l.strip_prefix("# "))
        .collect::<Vec<_>>()
        .join("\n");
    #[derive(Deserialize)]
    struct Doc {
        routes: Vec<RouteConfig>,
    }
    let doc: Doc = toml::from_str(&example).unwrap();
    let BodyFormat::CloudEvents(ce) = doc.routes[0].format else {
        panic!("{example}")
    };
    assert_eq!(ce.mode, CloudEventsMode::default());
    assert_eq!(cloudevents::source_problem(ce.source.as_str()), None);
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    let long = parse_duration("99999999999999999999d").unwrap_err();
    assert!(
        long.contains("99999999999999999999d") && long.contains("too long"),
        "{long}"
    );
    assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5y").unwrap_err().contains("\"y\""));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(
        parse_duration(" 2d ").unwrap(),
        Duration::from_secs(172_800)
    );
    for bad in ["", "s", ".s", "1..5s", "-1s", "1e3s", "ms5"] {
        let e = parse_duration(bad).unwrap_err();
        assert!(e.contains(&format!("{:?}", bad.trim())), "{bad:?}: {e}");
    }
}
