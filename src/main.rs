//! The `synapse-edge` binary: all behaviour lives in the library.

/// mimalloc: the request path allocates small, short-lived buffers at a
/// high rate, where glibc's malloc showed as the largest user-space cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    synapse_edge::process::prepare();
    synapse_edge::cli::main()
}

/// mimalloc asks for transparent huge pages on its arenas; with thousands
/// of client connections each touching a little of them, a 2 MiB page is
/// made resident for a few KiB used (load benchmark: a kept-alive client
/// connection 32.8 KiB of RSS with them, 21.6 KiB without).
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of ours; failure (an old kernel) leaves the default, which is fine.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
