//! The process's allocator: mimalloc, for the relay's own allocations and, through its
//! `override` feature, for the C libraries linked in too. librdkafka allocates every Kafka
//! message and each of its headers with `malloc` on the relay's thread and frees them on its
//! delivery thread; under glibc's allocator that cost about 15% of the relay's CPU in a Kafka
//! drain (see docs/PERFORMANCE.md).

use std::ffi::c_int;

/// `PR_SET_THP_DISABLE` from `<linux/prctl.h>`.
#[cfg(target_os = "linux")]
const PR_SET_THP_DISABLE: c_int = 41;

#[cfg(target_os = "linux")]
extern "C" {
    fn prctl(option: c_int, ...) -> c_int;
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas
/// (where the system allows them on request, as Debian's `madvise` default does), and with
/// librdkafka's threads allocating too, 2 MiB pages raised the relay's peak resident memory
/// in a 1M-event Kafka drain from about 32 MB to about 80 MB, for no measurable speed. Left
/// alone when the operator set `MIMALLOC_ALLOW_THP`. Call first thing in `main`.
pub fn tune() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with an integer option and integer arguments; failure (an old
        // kernel) leaves huge pages on, which is only more memory.
        unsafe {
            prctl(
                PR_SET_THP_DISABLE,
                1 as std::ffi::c_ulong,
                0 as std::ffi::c_ulong,
                0 as std::ffi::c_ulong,
                0 as std::ffi::c_ulong,
            );
        }
    }
}
