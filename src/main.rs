//! The `synapse-edge` binary: all behaviour lives in the library.

fn main() -> std::process::ExitCode {
    synapse_edge::cli::main()
}
