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
    // `serve --config FILE`: the file's keys become flags before the command line's.
    let expanded = match cli::config_file::expand(std::env::args_os().collect()) {
        Ok(expanded) => expanded,
        Err(error) => return cli::fail(cli::EXIT_USAGE, error),
    };
    let args = match cli::Cli::try_parse_from(&expanded.argv) {
        Ok(args) => args,
        // --help, --version, and mistakes of the command line itself, as clap says them.
        Err(error) if !error.use_stderr() || !expanded.set_by_file(&error) => error.exit(),
        Err(error) => return cli::fail(cli::EXIT_USAGE, expanded.explain(&error)),
    };
    let telemetry = cli::telemetry::init();
    cli::run(args, &telemetry)
}
