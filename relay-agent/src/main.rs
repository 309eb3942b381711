//! The `relay-agent` binary: the command line lives in [`relay_agent::cli`].

fn main() -> std::process::ExitCode {
    relay_agent::cli::main()
}
