//! Process-wide set-up for holding many connections, done once at start,
//! before any thread is spawned.

use std::sync::OnceLock;

use rustix::io::fcntl_dupfd_cloexec;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The descriptor table is reserved up to this many entries (8 bytes each,
/// so 512 KiB); past it, the kernel grows it as it needs.
const RESERVED_DESCRIPTORS: u64 = 65_536;

/// What [`prepare`] did, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// The open-file (soft) limit now in force.
    pub open_files: u64,
    /// Descriptors the table holds without growing.
    pub reserved: u64,
}

/// Below this open-file limit the start-up log warns: each client
/// connection, and each request waiting on a worker, holds a descriptor.
pub const LOW_OPEN_FILES: u64 = 8_192;

static PREPARED: OnceLock<Prepared> = OnceLock::new();

/// Raises the open-file limit to its ceiling and reserves the descriptor
/// table; see [`raise_open_file_limit`] and [`reserve_descriptor_table`].
/// The binary calls it first thing, while the process has one thread.
pub fn prepare() -> Prepared {
    *PREPARED.get_or_init(|| {
        let open_files = raise_open_file_limit();
        let reserved = reserve_descriptor_table(open_files.min(RESERVED_DESCRIPTORS));
        Prepared {
            open_files,
            reserved,
        }
    })
}

/// What [`prepare`] did, if it ran.
pub fn prepared() -> Option<Prepared> {
    PREPARED.get().copied()
}

/// Raises the soft open-file limit to the hard one, as Nginx's
/// `worker_rlimit_nofile` is set and Go programs do at start: systemd's
/// default soft limit (1,024) is well under what a homeserver's clients,
/// each parked in `/sync` with a worker connection of its own, take.
/// Returns the soft limit in force afterwards (`u64::MAX`: unlimited).
pub fn raise_open_file_limit() -> u64 {
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    if lim.current.is_some() && lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return lim.maximum.unwrap_or(u64::MAX);
        }
    }
    current
}

/// Grows the process's table of file descriptors to hold `count` at once.
///
/// The kernel grows the table by doubling when a new descriptor does not
/// fit, and in a process with more than one thread each growth waits for an
/// RCU grace period (`expand_files` → `synchronize_rcu`), the thread that
/// opened the descriptor blocked all the while: 10 to 25 ms per growth on
/// the benchmark machine, seen as stalls of every request on a serving
/// thread while thousands of long-polls were parked (the table grows at
/// 1,024, 2,048, 4,096...). Nginx's single-threaded workers never wait. Grown
/// here, before any thread starts, it costs no wait, and it never shrinks.
///
/// Returns the table's size afterwards (0 if it cannot be read).
pub fn reserve_descriptor_table(count: u64) -> u64 {
    if count > 1
        && let Ok(top) = i32::try_from(count - 1)
        && let Ok(null) = std::fs::File::open("/dev/null")
    {
        // The lowest free number at or above the top: the table grows to
        // hold it; the duplicate is closed again when dropped.
        drop(fcntl_dupfd_cloexec(&null, top));
    }
    descriptor_table_size()
}

/// The size of this process's descriptor table (`FDSize` in
/// `/proc/self/status`), 0 where there is no such file.
pub fn descriptor_table_size() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
