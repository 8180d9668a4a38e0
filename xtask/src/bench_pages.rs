//! The always-on tier on a page-touching program (`tests/fixtures/pages.c`): does
//! `memtrace top --tier growth` name its growth site, with the bytes it populated, and what
//! does counting its page faults cost it? Untraced and traced runs alternate; the program
//! times itself (`PAGES_TIMING`), so memtrace's own start and stop are not counted. Tables
//! in `target/bench-pages.md`.
use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::bench_tiers::{Spread, TopReport, TopRun, plus_minus};

/// Rounds of the program: each populates 16 new pages in `leak_pages` (and the first, 64
/// in `reuse_buffer`).
const ROUNDS: u64 = 4_000;
const LEAK_PAGES: u64 = 16;
const REUSED_PAGES: u64 = 64;
/// Runs of each mode, alternating.
const REPEATS: usize = 7;
/// How long one untraced run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The program's own timing line: `pages: ROUNDS rounds in WALL_NS ns wall CPU_NS ns cpu`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PagesTiming {
    wall_ns: f64,
    cpu_ns: f64,
}

impl PagesTiming {
    fn find(stderr: &str) -> Result<Self> {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("pages: "))
            .with_context(|| format!("no timing line from the pages program in:\n{stderr}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [
            "pages:",
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
            bail!("the pages program printed {line:?}");
        };
        Ok(Self {
            wall_ns: wall.parse()?,
            cpu_ns: cpu.parse()?,
        })
    }
}

pub(crate) fn page_size() -> Result<u64> {
    let out = Command::new("getconf").arg("PAGESIZE").output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf PAGESIZE")
}

/// One untraced run, bounded.
fn run_untraced(pages: &Path) -> Result<PagesTiming> {
    let mut child = Command::new(pages)
        .arg(ROUNDS.to_string())
        .env("PAGES_TIMING", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the pages program did not finish within {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the pages program failed: {}", out.status);
    }
    PagesTiming::find(&String::from_utf8_lossy(&out.stderr))
}

/// One run under `memtrace top --tier growth --format json`.
fn run_traced(memtrace: &Path, pages: &Path, log_dir: &Path) -> Result<(PagesTiming, TopReport)> {
    let pages = pages.to_string_lossy();
    let rounds = ROUNDS.to_string();
    let top = TopRun::start(
        memtrace,
        &[
            "--tier",
            "growth",
            "--interval",
            "60",
            "--",
            &pages,
            &rounds,
        ],
        &[("PAGES_TIMING", "1")],
        log_dir,
        "pages-top",
    )?;
    // memtrace exits when the program does; the program's line is in memtrace's stderr.
    let (report, stderr) = top.finish()?;
    Ok((PagesTiming::find(&stderr)?, report))
}

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let memtrace = target_dir.join("release/memtrace");
    let bench_dir = target_dir.join("bench");
    let pages = bench_dir.join("pages");
    crate::compile_c(&root.join("tests/fixtures/pages.c"), &pages)?;
    let page = page_size()?;
    println!("xtask: page-touching program: {REPEATS} runs untraced and under the always-on tier");

    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut reports = Vec::new();
    for repeat in 0..REPEATS {
        // Alternate which goes first, so drift falls on both alike.
        if repeat % 2 == 0 {
            untraced.push(run_untraced(&pages)?);
        }
        let (timing, report) = run_traced(&memtrace, &pages, &bench_dir)?;
        traced.push(timing);
        reports.push(report);
        if repeat % 2 == 1 {
            untraced.push(run_untraced(&pages)?);
        }
    }

    let expected_leak = ROUNDS * LEAK_PAGES * page;
    let expected_reuse = REUSED_PAGES * page;
    let machine = crate::bench::machine();
    let found = found_table(&reports, expected_leak, expected_reuse)?;
    let cost = cost_table(&untraced, &traced, ROUNDS * LEAK_PAGES + REUSED_PAGES)?;
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
    let range = |bytes: &dyn Fn(&TopReport) -> u64| {
        let values: Vec<u64> = reports.iter().map(bytes).collect();
        let (min, max) = (values.iter().min(), values.iter().max());
        match (min, max) {
            (Some(min), Some(max)) if min == max => format!("{min}"),
            (Some(min), Some(max)) => format!("{min}–{max}"),
            _ => "—".to_owned(),
        }
    };
    let mut table = String::new();
    writeln!(
        table,
        "| growth site | populated bytes seen | expected | runs where it is the top site |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: |")?;
    writeln!(
        table,
        "| `leak_pages` | {} | {expected_leak} | {top_is_leak} of {} |",
        range(&|r| r.site_bytes("leak_pages")),
        reports.len()
    )?;
    writeln!(
        table,
        "| `reuse_buffer` | {} | {expected_reuse} | — |",
        range(&|r| r.site_bytes("reuse_buffer"))
    )?;
    writeln!(
        table,
        "| whole process | {} | ≥ {} | — |",
        range(&|r| r.outstanding_bytes),
        expected_leak + expected_reuse
    )?;
    Ok(table)
}

fn cost_table(untraced: &[PagesTiming], traced: &[PagesTiming], faults: u64) -> Result<String> {
    let wall = |t: &[PagesTiming]| Spread::of(&t.iter().map(|t| t.wall_ns).collect::<Vec<_>>());
    let cpu = |t: &[PagesTiming]| Spread::of(&t.iter().map(|t| t.cpu_ns).collect::<Vec<_>>());
    let mut table = String::new();
    writeln!(
        table,
        "| mode | wall ms | CPU ms | CPU cost | extra CPU per populated page |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: | ---: |")?;
    let base = cpu(untraced).mean;
    for (label, timings, is_traced) in [
        ("untraced", untraced, false),
        ("always-on tier", traced, true),
    ] {
        let extra = cpu(timings).mean - base;
        let (cost, per_page) = if !is_traced {
            ("—".to_owned(), "—".to_owned())
        } else {
            (
                format!("{:+.1} %", extra / base * 100.0),
                format!("{:.2} µs", extra / faults as f64 / 1000.0),
            )
        };
        writeln!(
            table,
            "| {label} | {} | {} | {cost} | {per_page} |",
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
        let stderr = "memtrace: counting the page faults\n\
                      pages: 4000 rounds in 177917269 ns wall 139286968 ns cpu\n";
        assert_eq!(
            PagesTiming::find(stderr).unwrap(),
            PagesTiming {
                wall_ns: 177917269.0,
                cpu_ns: 139286968.0
            }
        );
        assert!(PagesTiming::find("memtrace: error\n").is_err());
        assert!(PagesTiming::find("pages: 4000 rounds in x ns wall 1 ns cpu").is_err());
        assert!(PagesTiming::find("pages: 4000 rounds\n").is_err());
    }
}
