//! The always-on tier's mmap view on a program of large blocks (`tests/fixtures/mapped.c`):
//! does `memtrace top --tier mapped` find the leaking function with its exact bytes, and
//! what does following its mappings cost it? Untraced and traced runs alternate; the
//! program times itself (`MAPPED_TIMING`). Tables in `target/bench-mapped.md`.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use crate::{
    bench_self_timed::{SelfTimed, cost_table, range},
    bench_tiers::TopReport,
};

/// Rounds: each maps a 256 KiB block kept in `leak_blocks` and maps and unmaps one in
/// `churn_blocks` (three mapping syscalls per round).
const ROUNDS: u64 = 5_000;
const REPEATS: usize = 7;

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let memtrace = target_dir.join("release/memtrace");
    let bench_dir = target_dir.join("bench");
    let mapped = bench_dir.join("mapped");
    crate::compile_c(&root.join("tests/fixtures/mapped.c"), &mapped)?;
    let page = crate::bench_tiers::page_size();
    let block = (256 * 1024 + 16u64).div_ceil(page) * page;
    println!("xtask: large-block program: {REPEATS} runs untraced and under the mmap view");
    let program = SelfTimed {
        program: mapped,
        env: "MAPPED_TIMING",
        rounds: ROUNDS,
    };
    let runs = program.measure(&memtrace, "mapped", &bench_dir, REPEATS)?;
    let machine = crate::bench::machine();
    let found = found_table(&runs.reports, ROUNDS * block)?;
    let cost = cost_table(&runs, "mmap view", "mmap/munmap", 3 * ROUNDS)?;
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
    let mut table = String::new();
    writeln!(
        table,
        "| site | mapped bytes outstanding | expected | runs where it is the top site |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: |")?;
    writeln!(
        table,
        "| `leak_blocks` | {} | {expected_leak} | {top_is_leak} of {} |",
        range(reports, |r| r.site_bytes("leak_blocks")),
        reports.len()
    )?;
    writeln!(
        table,
        "| `churn_blocks` | {} | 0 | — |",
        range(reports, |r| r.site_bytes("churn_blocks"))
    )?;
    Ok(table)
}
