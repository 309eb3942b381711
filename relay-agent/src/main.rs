//! The `relay-agent` binary: the command line lives in [`relay_agent::cli`].

/// jemalloc rather than the system allocator: see the workspace manifest for the measurement.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    relay_agent::cli::main_from(std::env::args_os())
}
