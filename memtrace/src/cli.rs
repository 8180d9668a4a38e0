//! Command-line interface. Every flag can also come from `MEMTRACE_<FLAG>`.
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "memtrace",
    version,
    about = "eBPF memory-leak detector: which call stacks hold unfreed memory"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace one process and show the stacks holding its outstanding memory.
    #[command(after_help = TOP_EXAMPLES)]
    Top(TopArgs),
}

const TOP_EXAMPLES: &str = "\
EXAMPLES:
    memtrace top --pid 1234                      live view of a running process
    memtrace top --format json -- ./leaky        run ./leaky, report when it exits
    memtrace top --pid 1234 --duration 60 --sample-bytes 4096
";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table (refreshing in place on a terminal).
    Table,
    /// One JSON document at the end.
    Json,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Trace this running process (all its threads).
    #[arg(long, env = "MEMTRACE_PID", conflicts_with = "command")]
    pub pid: Option<u32>,

    /// Stop after this many seconds (default: when the process exits, or on Ctrl-C).
    #[arg(long, env = "MEMTRACE_DURATION")]
    pub duration: Option<f64>,

    /// Seconds between reads of the maps (and refreshes of the table).
    #[arg(long, env = "MEMTRACE_INTERVAL", default_value_t = 5.0)]
    pub interval: f64,

    /// Output format.
    #[arg(long, env = "MEMTRACE_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Show this many stacks (table default 10; JSON default all).
    #[arg(long, env = "MEMTRACE_TOP")]
    pub top: Option<usize>,

    /// Sample each allocated byte with probability 1/N (per-stack numbers become
    /// estimates, process totals stay exact); 1 traces every allocation exactly.
    #[arg(long, env = "MEMTRACE_SAMPLE_BYTES", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_bytes: u64,

    /// Capacity of the live-allocation map (kernel memory: ~100 bytes each).
    #[arg(long, env = "MEMTRACE_MAX_ALLOCATIONS", default_value_t = memtrace_common::capacity::ALLOCS)]
    pub max_allocations: u32,

    /// Capacity of the stack map (distinct call stacks; ~1 KiB each).
    #[arg(long, env = "MEMTRACE_MAX_STACKS", default_value_t = memtrace_common::capacity::STACKS)]
    pub max_stacks: u32,

    /// The command to start and trace from its first instruction.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Top(args) => crate::top::run(args),
    }
}
