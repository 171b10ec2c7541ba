//! Logging: readable text by default, JSON lines with `--log-format json`. Logs go to stderr;
//! stdout belongs to the stdout backend.
//!
//! Every line is scrubbed of the configuration's secrets ([`crate::config::redact_secrets`])
//! on its way out, whichever crate wrote it and at whatever level: a client library that logs
//! its server URL at debug level cannot leak the password in it. Panic messages are scrubbed
//! the same way.

use crate::config::{redact_secrets, LogConfig, LogFormat};
use std::io::Write;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber and the panic hook. `RUST_LOG`, when set, overrides
/// `log.level`.
pub fn init(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(with_quiet_clients(&cfg.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Scrubbed(std::io::stderr()))
        .with_target(false);
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    install_panic_hook();
}

/// The Pulsar client logs every connection and producer at info: at warn unless the filter
/// names its target.
fn with_quiet_clients(level: &str) -> String {
    if level.contains("pulsar") {
        level.to_string()
    } else {
        format!("{level},pulsar=warn")
    }
}

/// A writer that scrubs secrets. The formatter hands over each event in one write, so a
/// secret is never split between two calls.
struct Scrubbed<W: Write>(W);

impl<W: Write> Write for Scrubbed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact_secrets(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Panic messages as the default hook prints them, scrubbed of secrets.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "Box<dyn Any>".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let mut text = format!("thread '{name}' panicked{at}:\n{payload}\n");
        let bt = std::backtrace::Backtrace::capture();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            text.push_str(&format!("{bt}\n"));
        }
        let _ = std::io::stderr().write_all(redact_secrets(&text).as_bytes());
    }));
}
