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
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only move the bytes"
)]
pub enum Command {
    /// Trace one process and show the stacks holding its outstanding memory.
    #[command(after_help = TOP_EXAMPLES)]
    Top(TopArgs),
    /// Run the node agent: trace chosen processes, detect leaks, serve Prometheus metrics.
    #[command(after_help = AGENT_EXAMPLES)]
    Agent(AgentArgs),
    /// Measure what memtrace's allocator probes cost per call on this machine.
    Calibrate(CalibrateArgs),
    /// Show what this kernel offers memtrace: features, BPF verifier verdicts, probe spots.
    Check(crate::check::CheckArgs),
}

const AGENT_EXAMPLES: &str = "\
EXAMPLES:
    memtrace agent --cgroup 'system.slice/*.service'      every service of the host
    memtrace agent --pid 1234 --interval 5s --window 10m
    memtrace agent --kubeconfig ~/.kube/config --node-name n1 --exclude-namespace 'kube-*'
    NODE_NAME=n1 memtrace agent       in a pod: every selected container of the node
";

/// `10s`, `500ms`, `30m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("{text:?} must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Trace these processes (repeatable; comma-separated in the environment).
    #[arg(long, env = "MEMTRACE_PID", value_delimiter = ',')]
    pub pid: Vec<u32>,

    /// Trace the processes of the cgroups whose path (relative to the cgroup v2 mount)
    /// matches this glob; `*` stays within a level, `**` crosses levels. Repeatable.
    #[arg(long, env = "MEMTRACE_CGROUP", value_delimiter = ',')]
    pub cgroup: Vec<String>,

    /// How often to read the maps, discover processes and update metrics.
    #[arg(long, env = "MEMTRACE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub interval: std::time::Duration,

    /// How far back growth is judged.
    #[arg(long, env = "MEMTRACE_WINDOW", default_value = "30m", value_parser = parse_duration)]
    pub window: std::time::Duration,

    /// Points kept per stack series (memory bound; older points are thinned out).
    #[arg(long, env = "MEMTRACE_MAX_POINTS", default_value_t = 360)]
    pub max_points: usize,

    /// Stacks tracked per container; the least suspect are evicted (and counted).
    #[arg(long, env = "MEMTRACE_MAX_STACKS", default_value_t = 500)]
    pub max_stacks: usize,

    /// Stacks per container exported as labelled suspicion series.
    #[arg(long, env = "MEMTRACE_TOP_K", default_value_t = 5)]
    pub top_k: usize,

    /// Suspicion at or over which a stack counts as a leak suspect.
    #[arg(long, env = "MEMTRACE_THRESHOLD", default_value_t = 0.8)]
    pub threshold: f64,

    /// Where to serve /metrics, /healthz, /readyz, /api/v1/suspects, /debug/pprof/heap,
    /// /flamegraph.svg.
    #[arg(long, env = "MEMTRACE_LISTEN", default_value = "0.0.0.0:9464")]
    pub listen: std::net::SocketAddr,

    /// Sample each allocated byte with probability 1/N (1 = exact).
    #[arg(long, env = "MEMTRACE_SAMPLE_BYTES", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_bytes: u64,

    /// Capacity of the live-allocation map (kernel memory: ~100 bytes each).
    #[arg(long, env = "MEMTRACE_MAX_ALLOCATIONS", default_value_t = memtrace_common::capacity::ALLOCS)]
    pub max_allocations: u32,

    /// Capacity of the kernel's stack-trace map (distinct call stacks; ~1 KiB each).
    #[arg(long, env = "MEMTRACE_MAX_STACK_TRACES", default_value_t = memtrace_common::capacity::STACKS)]
    pub max_stack_traces: u32,

    /// Watch this node's pods through the API server of this kubeconfig file (otherwise
    /// in-cluster config when running in a pod, or no Kubernetes at all).
    #[arg(long, env = "MEMTRACE_KUBECONFIG", help_heading = "Kubernetes")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// This node's name [default: $NODE_NAME, which the DaemonSet sets to `spec.nodeName`;
    /// else the host name].
    #[arg(long, env = "MEMTRACE_NODE_NAME", help_heading = "Kubernetes")]
    pub node_name: Option<String>,

    /// How long the API server may send nothing before a request counts as hung (and is
    /// retried): connect, list, and every read of a watch. Watches ask the server to end
    /// them a little earlier, so a quiet watch is never taken for a hung one.
    #[arg(long, env = "MEMTRACE_KUBE_TIMEOUT", default_value = "5m", value_parser = parse_duration, help_heading = "Kubernetes")]
    pub kube_timeout: std::time::Duration,

    /// Trace only pods of namespaces matching these globs (repeatable).
    #[arg(
        long,
        env = "MEMTRACE_NAMESPACE",
        value_delimiter = ',',
        help_heading = "Kubernetes"
    )]
    pub namespace: Vec<String>,

    /// Never trace pods of namespaces matching these globs (repeatable).
    #[arg(
        long,
        env = "MEMTRACE_EXCLUDE_NAMESPACE",
        value_delimiter = ',',
        help_heading = "Kubernetes"
    )]
    pub exclude_namespace: Vec<String>,

    /// Trace only pods whose labels match this selector (`app=web,tier in (a,b),!canary`).
    #[arg(long, env = "MEMTRACE_POD_SELECTOR", help_heading = "Kubernetes")]
    pub pod_selector: Option<String>,

    /// Pods without a `memtrace.io/trace` annotation: traced (`all`) or not (`opt-in`).
    #[arg(long, env = "MEMTRACE_TRACE_DEFAULT", value_enum, default_value_t = crate::policy::TraceDefault::All, help_heading = "Kubernetes")]
    pub trace_default: crate::policy::TraceDefault,

    /// CPU budget: the most the allocator probes may cost a traced process, in percent of
    /// its own CPU time (estimated from its calls and `memtrace calibrate`'s per-call
    /// cost). A process over it is detached, and retried after --budget-retry. 0 = no budget.
    #[arg(long, env = "MEMTRACE_MAX_OVERHEAD", default_value_t = 1.0)]
    pub max_overhead: f64,

    /// When the allocator probes go on: `escalate` (default) watches every container with
    /// the always-on tier (page faults, anonymous memory; no trap per allocation) and gives
    /// a container probes for --escalate-for when its memory grows; `always` puts probes on
    /// every traced process from the start.
    #[arg(long, env = "MEMTRACE_PROBES", value_enum, default_value_t = ProbeMode::Escalate)]
    pub probes: ProbeMode,

    /// How long one escalation keeps a container's allocator probes on (then off, with a
    /// doubling pause while it keeps growing).
    #[arg(long, env = "MEMTRACE_ESCALATE_FOR", default_value = "10m", value_parser = parse_duration)]
    pub escalate_for: std::time::Duration,

    /// Always-on tier: walk the stack of every Nth populating page fault per CPU.
    #[arg(long, env = "MEMTRACE_FAULT_SAMPLE", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub fault_sample: u64,

    /// How long a process detached for its budget stays untraced.
    #[arg(long, env = "MEMTRACE_BUDGET_RETRY", default_value = "10m", value_parser = parse_duration)]
    pub budget_retry: std::time::Duration,

    /// CPython processes: `growth` (Python frames, pymalloc's pool refills, GC
    /// statistics: cheap), `exact` (also every object allocation: a trap per object),
    /// `frames` (frames and GC only), `off`.
    #[arg(long, env = "MEMTRACE_PYTHON", value_enum, default_value_t = crate::python::PythonMode::Growth)]
    pub python: crate::python::PythonMode,
}

/// `memtrace calibrate`.
#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Calibrate at this byte-sampling rate (as the agent's --sample-bytes).
    #[arg(long, env = "MEMTRACE_SAMPLE_BYTES", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_bytes: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("2").unwrap().as_secs(), 2);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
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

    /// Capacity of the kernel's stack-trace map (distinct call stacks; ~1 KiB each).
    #[arg(long, env = "MEMTRACE_MAX_STACK_TRACES", default_value_t = memtrace_common::capacity::STACKS)]
    pub max_stack_traces: u32,

    /// What to trace: `exact` puts probes on the allocator (every call traps: outstanding
    /// bytes per stack); `growth` counts the page faults that populate new memory (no
    /// probe on the allocator: which stacks touch new pages; works on static binaries).
    #[arg(long, env = "MEMTRACE_TIER", value_enum, default_value_t = Tier::Exact)]
    pub tier: Tier,

    /// Growth tier: walk the stack of every Nth populating page fault per CPU.
    #[arg(long, env = "MEMTRACE_FAULT_SAMPLE", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub fault_sample: u64,

    /// CPython processes: `frames` puts Python frames in stacks; `growth` also counts
    /// pymalloc's pool refills (cheap); `exact` also traces every object allocation
    /// (a trap per object: for bounded investigations); `off` shows native stacks only.
    #[arg(long, env = "MEMTRACE_PYTHON", value_enum, default_value_t = crate::python::PythonMode::Frames)]
    pub python: crate::python::PythonMode,

    /// Attach no probe to libc: with `--python growth`, only pymalloc's pool refills trap
    /// (the cheapest way to watch a Python process; its native allocations go unseen).
    #[arg(long, env = "MEMTRACE_NO_LIBC")]
    pub no_libc: bool,

    /// The command to start and trace from its first instruction.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// When the agent attaches allocator probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProbeMode {
    /// To every traced process, from the start.
    Always,
    /// To the processes of containers whose memory grows, for --escalate-for at a time.
    Escalate,
}

/// Which of memtrace's two tiers `top` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Tier {
    /// Allocator probes: exact outstanding bytes per stack, a trap per call.
    Exact,
    /// Page faults that populate new memory: growth per stack, no trap per call.
    Growth,
    /// Anonymous mappings (glibc's blocks of 128 KiB and more), outstanding until
    /// unmapped, per stack; no trap per call.
    Mapped,
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Top(args) => crate::top::run(args),
        Command::Agent(args) => crate::agent::run(args),
        Command::Calibrate(args) => crate::calibrate::run(args.json, args.sample_bytes),
        Command::Check(args) => crate::check::run(args),
    }
}
