//! `ringfence`: thin command-line dispatcher. Each subcommand lives in `cli/`.
#![forbid(unsafe_code)]

mod cli;

// The request path allocates many small buffers (protobuf fields, log entries) on two
// threads at once; mimalloc measured ~20% less server CPU per record than glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGFENCE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    cli::run(args)
}
