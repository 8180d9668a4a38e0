use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("MEMTRACE_LOG", "warn"))
        .format_timestamp(None)
        .init();
    let cli = memtrace::cli::Cli::parse();
    match memtrace::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memtrace: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
