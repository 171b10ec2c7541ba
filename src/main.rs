//! The `outbox-relay` binary: everything lives in the library (see `outbox_relay::cli`).

// The relay allocates small, short-lived buffers per event (headers, bodies, futures) on two
// or more threads; mimalloc's thread-local free lists make that markedly cheaper than glibc's
// allocator (see docs/ARCHITECTURE.md, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_relay::cli::main().await
}
