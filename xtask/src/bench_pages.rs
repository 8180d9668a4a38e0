//! The always-on tier on a page-touching program (`tests/fixtures/pages.c`): does
//! `memtrace top --tier growth` name its growth site, with the bytes it populated, and what
//! does counting its page faults cost it? Untraced and traced runs alternate; the program
//! times itself (`PAGES_TIMING`), so memtrace's own start and stop are not counted. Tables
//! in `target/bench-pages.md`.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use crate::{
    bench_self_timed::{SelfTimed, cost_table, range},
    bench_tiers::{TopReport, page_size},
};

/// Rounds of the program: each populates 16 new pages in `leak_pages` (and the first, 64
/// in `reuse_buffer`).
const ROUNDS: u64 = 4_000;
const LEAK_PAGES: u64 = 16;
const REUSED_PAGES: u64 = 64;
/// Runs of each mode, alternating.
const REPEATS: usize = 7;

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let memtrace = target_dir.join("release/memtrace");
    let bench_dir = target_dir.join("bench");
    let pages = bench_dir.join("pages");
    crate::compile_c(&root.join("tests/fixtures/pages.c"), &pages)?;
    let page = page_size();
    println!("xtask: page-touching program: {REPEATS} runs untraced and under the always-on tier");
    let program = SelfTimed {
        program: pages,
        env: "PAGES_TIMING",
        rounds: ROUNDS,
    };
    let runs = program.measure(&memtrace, "growth", &bench_dir, REPEATS)?;

    let expected_leak = ROUNDS * LEAK_PAGES * page;
    let expected_reuse = REUSED_PAGES * page;
    let machine = crate::bench::machine();
    let found = found_table(&runs.reports, expected_leak, expected_reuse)?;
    let cost = cost_table(
        &runs,
        "always-on tier",
        "populated page",
        ROUNDS * LEAK_PAGES + REUSED_PAGES,
    )?;
    println!();
    println!("`pages {ROUNDS}` under `memtrace top --tier growth` ({machine}):");
    println!();
    print!("{found}");
    println!();
    print!("{cost}");
    let markdown = format!(
        "`tests/fixtures/pages.c` run with {ROUNDS} rounds ({LEAK_PAGES} new pages kept per \
         round in `leak_pages`, {REUSED_PAGES} pages rewritten each round in `reuse_buffer`), \
         {REPEATS} runs under `memtrace top --tier growth --format json` alternating with \
         {REPEATS} untraced runs, measured by `cargo xtask bench` ({machine}):\n\n{found}\n\
         The program's own run time (from its first round to its last):\n\n{cost}"
    );
    let report = target_dir.join("bench-pages.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: tables written to {}", report.display());
    Ok(())
}

fn found_table(reports: &[TopReport], expected_leak: u64, expected_reuse: u64) -> Result<String> {
    let top_is_leak = reports
        .iter()
        .filter(|r| r.top_site() == Some("leak_pages"))
        .count();
    let mut table = String::new();
    writeln!(
        table,
        "| growth site | populated bytes seen | expected | runs where it is the top site |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: |")?;
    writeln!(
        table,
        "| `leak_pages` | {} | {expected_leak} | {top_is_leak} of {} |",
        range(reports, |r| r.site_bytes("leak_pages")),
        reports.len()
    )?;
    writeln!(
        table,
        "| `reuse_buffer` | {} | {expected_reuse} | — |",
        range(reports, |r| r.site_bytes("reuse_buffer"))
    )?;
    writeln!(
        table,
        "| whole process | {} | ≥ {} | — |",
        range(reports, |r| r.outstanding_bytes),
        expected_leak + expected_reuse
    )?;
    Ok(table)
}
