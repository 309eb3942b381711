//! The `relay-edge` binary: the command line lives in [`relay_edge::cli`].

fn main() -> std::process::ExitCode {
    relay_edge::cli::main()
}
