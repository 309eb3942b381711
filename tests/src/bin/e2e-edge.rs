//! The edge's command line, built into this package so fault tests can run it as a process
//! (Cargo gives integration tests the paths of their own package's binaries only).

/// The shipped binary's allocator, so tests of memory measure what ships.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    relay_edge::cli::main_from(std::env::args_os())
}
