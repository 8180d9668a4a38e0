use std::process::ExitCode;

use clap::Parser;

/// memtrace's own allocations do not go through libc's malloc: the agent's probes are
/// shared node-wide per libc file, and would otherwise trap on memtrace itself (an agent
/// on the host shares the host's libc with the processes it traces).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
