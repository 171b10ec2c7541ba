//! The `outbox-relay` binary: everything lives in the library (`outbox_relay::main`, the
//! command line; its commands in `src/cli/`).

// The relay allocates small, short-lived buffers per event (headers, bodies, futures) on two
// or more threads; mimalloc's thread-local free lists make that markedly cheaper than glibc's
// allocator, for librdkafka's allocations too (see `outbox_relay::allocator`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads allocate anything.
    outbox_relay::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(outbox_relay::main()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
