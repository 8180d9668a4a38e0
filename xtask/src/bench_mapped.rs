//! The always-on tier's mmap view on a program of large blocks (`tests/fixtures/mapped.c`):
//! does `memtrace top --tier mapped` find the leaking function with its exact bytes, and
//! what does following its mappings cost it? Untraced and traced runs alternate; the
//! program times itself (`MAPPED_TIMING`). Tables in `target/bench-mapped.md`.
use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::bench_tiers::{Spread, TopReport, TopRun, plus_minus};

/// Rounds: each maps a 256 KiB block kept in `leak_blocks` and maps and unmaps one in
/// `churn_blocks` (three mapping syscalls per round).
const ROUNDS: u64 = 5_000;
const REPEATS: usize = 7;

/// The program's own timing line: `mapped: ROUNDS rounds in WALL_NS ns wall CPU_NS ns cpu`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Timing {
    wall_ns: f64,
    cpu_ns: f64,
}

impl Timing {
    fn find(stderr: &str) -> Result<Self> {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("mapped: "))
            .with_context(|| format!("no timing line from the mapped program in:\n{stderr}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [
            "mapped:",
            _,
            "rounds",
            "in",
            wall,
            "ns",
            "wall",
            cpu,
            "ns",
            "cpu",
        ] = fields[..]
        else {
            bail!("the mapped program printed {line:?}");
        };
        Ok(Self {
            wall_ns: wall.parse()?,
            cpu_ns: cpu.parse()?,
        })
    }
}

fn run_untraced(program: &Path) -> Result<Timing> {
    let out = Command::new("timeout")
        .arg("60")
        .arg(program)
        .arg(ROUNDS.to_string())
        .env("MAPPED_TIMING", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!("the mapped program failed: {}", out.status);
    }
    Timing::find(&String::from_utf8_lossy(&out.stderr))
}

fn run_traced(memtrace: &Path, program: &Path, log_dir: &Path) -> Result<(Timing, TopReport)> {
    let program = program.to_string_lossy();
    let rounds = ROUNDS.to_string();
    let top = TopRun::start(
        memtrace,
        &[
            "--tier",
            "mapped",
            "--interval",
            "60",
            "--",
            &program,
            &rounds,
        ],
        &[("MAPPED_TIMING", "1")],
        log_dir,
        "mapped-top",
    )?;
    let (report, stderr) = top.finish()?;
    Ok((Timing::find(&stderr)?, report))
}

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let memtrace = target_dir.join("release/memtrace");
    let bench_dir = target_dir.join("bench");
    let program = bench_dir.join("mapped");
    crate::compile_c(&root.join("tests/fixtures/mapped.c"), &program)?;
    let page = crate::bench_pages::page_size()?;
    let block = (256 * 1024 + 16u64).div_ceil(page) * page;
    println!("xtask: large-block program: {REPEATS} runs untraced and under the mmap view");
    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut reports = Vec::new();
    for repeat in 0..REPEATS {
        if repeat % 2 == 0 {
            untraced.push(run_untraced(&program)?);
        }
        let (timing, report) = run_traced(&memtrace, &program, &bench_dir)?;
        traced.push(timing);
        reports.push(report);
        if repeat % 2 == 1 {
            untraced.push(run_untraced(&program)?);
        }
    }
    let machine = crate::bench::machine();
    let found = found_table(&reports, ROUNDS * block)?;
    let cost = cost_table(&untraced, &traced, 3 * ROUNDS)?;
    println!();
    println!("`mapped {ROUNDS}` under `memtrace top --tier mapped` ({machine}):");
    println!();
    print!("{found}");
    println!();
    print!("{cost}");
    let markdown = format!(
        "`tests/fixtures/mapped.c` run with {ROUNDS} rounds (a 256 KiB block kept in \
         `leak_blocks`, one mapped and freed in `churn_blocks`), {REPEATS} runs under \
         `memtrace top --tier mapped --format json` alternating with {REPEATS} untraced \
         runs, measured by `cargo xtask bench` ({machine}):\n\n{found}\n\
         The program's own run time (from its first round to its last):\n\n{cost}"
    );
    let report = target_dir.join("bench-mapped.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: tables written to {}", report.display());
    Ok(())
}

fn found_table(reports: &[TopReport], expected_leak: u64) -> Result<String> {
    let top_is_leak = reports
        .iter()
        .filter(|r| r.top_site() == Some("leak_blocks"))
        .count();
    let range = |bytes: &dyn Fn(&TopReport) -> u64| {
        let values: Vec<u64> = reports.iter().map(bytes).collect();
        match (values.iter().min(), values.iter().max()) {
            (Some(min), Some(max)) if min == max => format!("{min}"),
            (Some(min), Some(max)) => format!("{min}–{max}"),
            _ => "—".to_owned(),
        }
    };
    let mut table = String::new();
    writeln!(
        table,
        "| site | mapped bytes outstanding | expected | runs where it is the top site |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: |")?;
    writeln!(
        table,
        "| `leak_blocks` | {} | {expected_leak} | {top_is_leak} of {} |",
        range(&|r| r.site_bytes("leak_blocks")),
        reports.len()
    )?;
    writeln!(
        table,
        "| `churn_blocks` | {} | 0 | — |",
        range(&|r| r.site_bytes("churn_blocks"))
    )?;
    Ok(table)
}

fn cost_table(untraced: &[Timing], traced: &[Timing], syscalls: u64) -> Result<String> {
    let wall = |t: &[Timing]| Spread::of(&t.iter().map(|t| t.wall_ns).collect::<Vec<_>>());
    let cpu = |t: &[Timing]| Spread::of(&t.iter().map(|t| t.cpu_ns).collect::<Vec<_>>());
    let mut table = String::new();
    writeln!(
        table,
        "| mode | wall ms | CPU ms | CPU cost | extra CPU per mmap/munmap |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: | ---: |")?;
    let base = cpu(untraced).mean;
    for (label, timings, is_traced) in [("untraced", untraced, false), ("mmap view", traced, true)]
    {
        let extra = cpu(timings).mean - base;
        let (cost, per_call) = if is_traced {
            (
                format!("{:+.1} %", extra / base * 100.0),
                format!("{:.2} µs", extra / syscalls as f64 / 1000.0),
            )
        } else {
            ("—".to_owned(), "—".to_owned())
        };
        writeln!(
            table,
            "| {label} | {} | {} | {cost} | {per_call} |",
            plus_minus(wall(timings), 1e-6, 1),
            plus_minus(cpu(timings), 1e-6, 1),
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_programs_timing() {
        let stderr =
            "memtrace: following\nmapped: 5000 rounds in 177917269 ns wall 139286968 ns cpu\n";
        assert_eq!(
            Timing::find(stderr).unwrap(),
            Timing {
                wall_ns: 177917269.0,
                cpu_ns: 139286968.0
            }
        );
        assert!(Timing::find("mapped: 5 rounds\n").is_err());
    }
}
