//! The `synapse-edge` binary: all behaviour lives in the library.

/// mimalloc: the request path allocates small, short-lived buffers at a
/// high rate, where glibc's malloc showed as the largest user-space cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    synapse_edge::cli::main()
}
