//! `cargo xtask bench`: runs the overhead benchmark (`memtrace/benches/overhead.rs`,
//! criterion) and prints its modes side by side, from one run, as a table; the same table
//! goes to `target/bench-overhead.md` for the README.
//!
//! Speed is measured, not asserted: a missed target is reported, never an error.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};

const GROUP: &str = "malloc_free_pair";
/// The benchmark's functions, in the order it measures them.
const MODES: &[&str] = &[
    "untraced",
    "trap_floor",
    "trap_floor_offset0",
    "empty_bpf",
    "memtrace_exact",
    "memtrace_sampled",
    "bpftrace_memleak",
];
/// The bare perf uprobe events (no BPF program), at memtrace's placement and at offset 0.
const FLOORS: &[&str] = &["trap_floor", "trap_floor_offset0"];
const EXACT: &str = "memtrace_exact";
const BPFTRACE: &str = "bpftrace_memleak";
const EMPTY_BPF: &str = "empty_bpf";
/// Goal: memtrace exact costs at most this many times the cheapest trap floor...
const FLOOR_GOAL: f64 = 1.3;
/// ...and is at least this many times cheaper than the bpftrace memleak-style script.
const BPFTRACE_GOAL: f64 = 4.0;

/// The benchmark's parts, each with its own table(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Overhead,
    Python,
    Pages,
    Django,
    Agent,
}

/// Runs every part (or only `only`), in one run.
pub fn run(root: &Path, only: Option<Part>) -> Result<()> {
    let target_dir = target_dir(root);
    let wanted = |part| only.is_none_or(|only| only == part);
    if wanted(Part::Overhead) {
        guarded("overhead", &target_dir.join("bench-overhead.md"), || {
            overhead(root, &target_dir)
        })?;
    }
    if wanted(Part::Python) || wanted(Part::Pages) || wanted(Part::Django) {
        println!("xtask: building memtrace (release) for the tier benchmarks");
        crate::run_cmd(crate::cargo(root).args(["build", "--release", "-p", "memtrace"]))?;
    }
    // A Python request loop and a page-touching program under the tiers.
    if wanted(Part::Python) {
        guarded("python", &target_dir.join("bench-python.md"), || {
            crate::bench_python::run(root, &target_dir)
        })?;
    }
    if wanted(Part::Pages) {
        guarded("pages", &target_dir.join("bench-pages.md"), || {
            crate::bench_pages::run(root, &target_dir)
        })?;
        // The mmap view on a program of large blocks, with `--only pages` too.
        guarded("mapped", &target_dir.join("bench-mapped.md"), || {
            crate::bench_mapped::run(root, &target_dir)
        })?;
    }
    // Django requests/s untraced and per `--python` mode.
    if wanted(Part::Django) {
        guarded("django", &target_dir.join("bench-django.md"), || {
            crate::bench_django::run(root, &target_dir)
        })?;
    }
    // The agent's own cost and its /metrics scrape. It puts node-wide probes on libc
    // itself, so only what was there before it counts.
    if wanted(Part::Agent) {
        let note = crate::bench_quiet::wait_until_quiet("agent")?;
        crate::bench_agent::run(root, &target_dir)?;
        if let Some(note) = note {
            flag(&target_dir.join("bench-agent.md"), &note)?;
        }
    }
    Ok(())
}

/// Runs a part once no other tracer's uprobes are on libc's allocator (bounded wait); when
/// some were there before or after it, its table (`report`) says its numbers are not valid.
fn guarded(part: &str, report: &Path, run: impl FnOnce() -> Result<()>) -> Result<()> {
    let before = crate::bench_quiet::wait_until_quiet(part)?;
    run()?;
    let after = crate::bench_quiet::foreign_probes()?;
    let note = match (before, after.is_empty()) {
        (Some(note), _) => note,
        (None, false) => crate::bench_quiet::note(&after),
        (None, true) => return Ok(()),
    };
    flag(report, &note)
}

/// Appends `note` to a part's table file and prints it.
fn flag(report: &Path, note: &str) -> Result<()> {
    println!("xtask: {note}");
    let mut text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    text.push('\n');
    text.push_str(note);
    std::fs::write(report, text).with_context(|| format!("writing {}", report.display()))
}

/// The per-pair overhead table (criterion), in target/bench-overhead.md.
fn overhead(root: &Path, target_dir: &Path) -> Result<()> {
    ensure_bpftrace()?;
    let criterion_dir = target_dir.join("criterion");
    // Results older than this run are not this run's: they must not fill the table.
    let started = SystemTime::now() - Duration::from_secs(1);
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["bench", "-p", "memtrace", "--bench", "overhead"])
        .current_dir(root)
        .env("CRITERION_HOME", &criterion_dir)
        .status()
        .context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench -p memtrace --bench overhead failed: {status}");
    }

    let mut rows = Vec::new();
    for mode in MODES {
        let path = criterion_dir
            .join(GROUP)
            .join(mode)
            .join("new/estimates.json");
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .with_context(|| format!("{mode}: no criterion result at {}", path.display()))?;
        if modified < started {
            bail!(
                "{mode}: {} is from an earlier run; this run did not measure it",
                path.display()
            );
        }
        let json = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mean = Mean::parse(&json)
            .with_context(|| format!("reading the mean from {}", path.display()))?;
        rows.push((*mode, mean));
    }
    let point = |mode: &str| {
        rows.iter()
            .find(|(m, _)| *m == mode)
            .map(|(_, mean)| mean.point_ns)
            .expect("every mode measured")
    };
    let (floor_mode, floor) = FLOORS
        .iter()
        .map(|mode| (*mode, point(mode)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("floors measured");
    let exact = point(EXACT);

    let mut table = String::new();
    writeln!(
        table,
        "| mode | CPU per pair (µs) | 95% CI (µs) | vs cheapest trap floor |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: |")?;
    for (mode, mean) in &rows {
        writeln!(
            table,
            "| {mode} | {} | {}–{} | {} |",
            micros(mean.point_ns),
            micros(mean.lower_ns),
            micros(mean.upper_ns),
            ratio(mean.point_ns / floor)
        )?;
    }
    let summary = summary(floor_mode, floor, exact, point(BPFTRACE), point(EMPTY_BPF));
    let machine = match bpftrace_version() {
        Some(bpftrace) => format!("{}, {bpftrace}", machine()),
        None => machine(),
    };

    println!();
    println!("Overhead per malloc+free pair ({machine}):");
    println!();
    print!("{table}");
    println!();
    print!("{summary}");

    let markdown = format!(
        "Overhead per `malloc` + `free` pair (16–272 bytes), as the measuring thread's CPU \
         time, all modes measured in one run of `cargo xtask bench` ({machine}):\n\n{table}\n\
         {summary}"
    );
    let report = target_dir.join("bench-overhead.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: table written to {}", report.display());

    Ok(())
}

/// The goals' verdicts, from the per-pair means (ns).
fn summary(floor_mode: &str, floor: f64, exact: f64, bpftrace: f64, empty_bpf: f64) -> String {
    let verdict = |met: bool| if met { "goal met" } else { "goal missed" };
    let vs_floor = exact / floor;
    let vs_bpftrace = bpftrace / exact;
    let mut text = format!(
        "memtrace exact costs {} the cheapest trap floor ({floor_mode}: bare perf uprobe \
         events, no BPF program) per malloc+free pair (goal ≤ {FLOOR_GOAL}×): {}.\n\
         memtrace exact is {} cheaper than the bpftrace memleak-style script (goal ≥ \
         {BPFTRACE_GOAL}×): {}.\n",
        ratio(vs_floor),
        verdict(vs_floor <= FLOOR_GOAL),
        ratio(vs_bpftrace),
        verdict(vs_bpftrace >= BPFTRACE_GOAL),
    );
    if empty_bpf < floor {
        // Said, so that the goal's floor is not taken for the least a trap can cost.
        text.push_str(&format!(
            "Empty BPF programs at memtrace's spots cost less than the bare perf events \
             ({} the trap floor; memtrace exact is {} of them): for a bare event the kernel \
             also fills a perf trace record per hit, which a BPF program returning 0 skips.\n",
            ratio(empty_bpf / floor),
            ratio(exact / empty_bpf),
        ));
    }
    text
}

/// Installs Debian's bpftrace (the benchmark's comparison point) when it is not on PATH.
fn ensure_bpftrace() -> Result<()> {
    let found = Command::new("bpftrace")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Ok(());
    }
    println!("xtask: installing bpftrace (the benchmark compares memtrace with it)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "bpftrace"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let updated = Command::new("apt-get")
            .arg("update")
            .status()
            .context("running apt-get update")?;
        if !updated.success() {
            bail!("apt-get update failed: {updated}");
        }
        if !install() {
            bail!("apt-get install bpftrace failed");
        }
    }
    Ok(())
}

/// Where cargo (and so criterion) writes: `$CARGO_TARGET_DIR`, else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Criterion's estimate of the mean time of one iteration, in ns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Mean {
    pub(crate) point_ns: f64,
    pub(crate) lower_ns: f64,
    pub(crate) upper_ns: f64,
}

impl Mean {
    /// Reads `mean` out of criterion's `estimates.json`:
    /// `{"mean":{"confidence_interval":{"lower_bound":..,"upper_bound":..},"point_estimate":..},..}`.
    pub(crate) fn parse(json: &str) -> Result<Self> {
        let estimates: serde_json::Value = serde_json::from_str(json).context("not JSON")?;
        let mean = &estimates["mean"];
        let number = |value: &serde_json::Value, what: &str| {
            value.as_f64().with_context(|| format!("no mean {what}"))
        };
        Ok(Self {
            point_ns: number(&mean["point_estimate"], "point_estimate")?,
            lower_ns: number(&mean["confidence_interval"]["lower_bound"], "lower_bound")?,
            upper_ns: number(&mean["confidence_interval"]["upper_bound"], "upper_bound")?,
        })
    }
}

fn micros(ns: f64) -> String {
    format!("{:.3}", ns / 1000.0)
}

fn ratio(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.3}×")
    } else {
        format!("{r:.2}×")
    }
}

/// Kernel release, CPU model and count, which the numbers depend on most.
pub(crate) fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .ok();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        });
    let cpus = std::thread::available_parallelism()
        .ok()
        .map(|n| format!("{n} CPUs"));
    [kernel, cpu, cpus]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bpftrace version, if it is installed.
fn bpftrace_version() -> Option<String> {
    Command::new("bpftrace")
        .arg("--version")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_mean() {
        let json = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":2044.5,"upper_bound":2126.8},"point_estimate":2083.8,"standard_error":21.0},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":1.5,"standard_error":0.1},"median_abs_dev":null,"slope":null,"std_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":3e1,"standard_error":0.1}}"#;
        let mean = Mean::parse(json).unwrap();
        assert_eq!(
            mean,
            Mean {
                point_ns: 2083.8,
                lower_ns: 2044.5,
                upper_ns: 2126.8
            }
        );
    }

    #[test]
    fn summary_reports_each_goal() {
        let met = summary("trap_floor", 2000.0, 2500.0, 12000.0, 2100.0);
        assert!(!met.contains("Empty BPF"), "{met}");
        assert!(
            met.contains("1.25× the cheapest trap floor (trap_floor"),
            "{met}"
        );
        assert!(met.contains("(goal ≤ 1.3×): goal met."), "{met}");
        assert!(met.contains("4.80× cheaper"), "{met}");
        assert!(met.contains("(goal ≥ 4×): goal met."), "{met}");
        let missed = summary("trap_floor", 2000.0, 3500.0, 12000.0, 1750.0);
        assert!(missed.contains("(0.88× the trap floor; memtrace exact is 2.00× of them)"));
        assert!(missed.contains("1.75×") && missed.contains("(goal ≤ 1.3×): goal missed."));
        assert!(missed.contains("3.43× cheaper") && missed.contains("(goal ≥ 4×): goal missed."));
    }

    #[test]
    fn rejects_missing_mean() {
        assert!(Mean::parse(r#"{"median":{"point_estimate":1.0}}"#).is_err());
    }
}
