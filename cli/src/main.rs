//! `ril`: every role and tool of the system behind one binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ril_cli::Cli::parse();
    if let Err(e) = ril_cli::logging::init(cli.log_format, &cli.log_level) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    match ril_cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "command failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
