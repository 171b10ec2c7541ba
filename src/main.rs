//! The `outbox-relay` binary: everything lives in the library (see `outbox_relay::cli`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_relay::cli::main().await
}
