//! CPython: Python frames (function, file, line) in the stacks of a leak into a
//! module-level cache, next to churn that frees what it allocates
//! (`fixtures/python_leak.py`), on pyenv's 3.11, 3.12 and 3.13 (shared libpython).
//! Exact mode is checked against tracemalloc's account from inside the same process.
use crate::{python_util::*, util::*};

const KIB: u64 = 1024;

/// tracemalloc's own bookkeeping (its hash tables), allocated inside whatever Python
/// frame allocates: not the program's memory.
fn is_tracemalloc_bookkeeping(stack: &StackEntry) -> bool {
    stack.frames.iter().any(|f| {
        f.function
            .as_deref()
            .is_some_and(|n| n.contains("tracemalloc_add_trace") || n.contains("hashtable"))
    })
}

/// Outstanding bytes of every stack that runs `function` (any frame).
fn outstanding_in(report: &Report, function: &str) -> u64 {
    report
        .stacks
        .iter()
        .filter(|s| !is_tracemalloc_bookkeeping(s))
        .filter(|s| {
            s.frames
                .iter()
                .any(|f| f.function.as_deref().is_some_and(|n| n.contains(function)))
        })
        .map(|s| s.outstanding_bytes)
        .sum()
}

/// The top stack runs the leaking line of `fixtures/python_leak.py` (`leak_line`); returns
/// it. `what` names the run in failure messages.
fn top_runs_leak<'a>(report: &'a Report, what: &str, leak_line: u64) -> &'a StackEntry {
    let top = report.stacks.first().expect("no stacks at all");
    assert!(
        top.frames
            .iter()
            .any(|f| is_python_frame(f, "leak", "python_leak.py", leak_line)),
        "{what}: the top stack does not run leak (python_leak.py:{leak_line})\n{}",
        describe_stacks(report, 5)
    );
    top
}

/// Growth mode: the leaking line is the top growth site, and churn, which frees what it
/// allocates, grew less than a tenth of it.
fn assert_leak_tops_growth(report: &Report, what: &str, leak_line: u64) {
    let top = top_runs_leak(report, what, leak_line);
    let churn = outstanding_in(report, "churn");
    assert!(
        churn * 10 < top.outstanding_bytes,
        "{what}: churn grew {churn} bytes, the leak {}\n{}",
        top.outstanding_bytes,
        describe_stacks(report, 5)
    );
}

fn exact_mode(minor: &str) {
    let _serial = serial();
    require_root();
    let python = pyenv_python(minor);
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");
    let iterations = 10_000;
    let run = trace_python(
        &python,
        &fixture,
        &[&iterations.to_string(), "--tracemalloc"],
        &["--python", "exact"],
    );
    let report = &run.report;
    let stacks = describe_stacks(report, 5);
    top_runs_leak(report, minor, leak_line);
    let churn = outstanding_in(report, "churn");
    assert!(
        churn < 64 * KIB,
        "{minor}: churn, which frees everything, holds {churn} bytes\n{stacks}"
    );

    // tracemalloc's bytes for the leaking line, against memtrace's for the stacks whose
    // innermost Python frame is that line (tracemalloc's own bookkeeping, allocated in
    // the same Python frame by its hash tables, is not the program's memory).
    let tracemalloc = run
        .tracemalloc
        .expect("the fixture printed no tracemalloc line");
    assert_eq!(tracemalloc.leak_line, leak_line);
    let ours: u64 = report
        .stacks
        .iter()
        .filter(|s| {
            innermost_python(s)
                .is_some_and(|f| is_python_frame(f, "leak", "python_leak.py", leak_line))
                && !is_tracemalloc_bookkeeping(s)
        })
        .map(|s| s.outstanding_bytes)
        .sum();
    let theirs = tracemalloc.tracemalloc_leak_bytes;
    let ratio = ours as f64 / theirs as f64;
    eprintln!("{minor}: leaking line: memtrace {ours} bytes, tracemalloc {theirs} ({ratio:.3})");
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{minor}: memtrace {ours} bytes vs tracemalloc {theirs} at line {leak_line} \
         (ratio {ratio:.3})\n{stacks}"
    );

    let summary = &run.raw["python"];
    assert!(
        summary["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(minor)),
        "{summary}"
    );
    let live = summary["live_objects"].as_i64().unwrap_or(0);
    assert!(
        live >= iterations,
        "{minor}: {live} live objects, but {iterations} strings are cached\n{summary}"
    );
    let collections: u64 = summary["gc"]
        .as_array()
        .map(|g| g.iter().filter_map(|g| g["collections"].as_u64()).sum())
        .unwrap_or(0);
    assert!(
        collections > 0,
        "{minor}: churn makes a list per iteration, yet no collection was seen\n{summary}"
    );
}

fn growth_mode(minor: &str) {
    let _serial = serial();
    require_root();
    let python = pyenv_python(minor);
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");
    let run = trace_python(&python, &fixture, &["20000"], &["--python", "growth"]);
    assert_leak_tops_growth(&run.report, minor, leak_line);
    let refills = run.raw["python"]["counters"]["python_pool_refills"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        refills > 0,
        "{minor}: no pool refill counted\n{}",
        run.raw["python"]
    );
}

#[test]
fn python_3_11_exact() {
    exact_mode("3.11");
}

#[test]
fn python_3_12_exact() {
    exact_mode("3.12");
}

#[test]
fn python_3_13_exact() {
    exact_mode("3.13");
}

#[test]
fn python_3_11_growth() {
    growth_mode("3.11");
}

#[test]
fn python_3_12_growth() {
    growth_mode("3.12");
}

#[test]
fn python_3_13_growth() {
    growth_mode("3.13");
}

/// CPython 3.10 has another frame layout: native stacks only, and one line saying so.
#[test]
fn python_unsupported_version_keeps_native_stacks() {
    let _serial = serial();
    require_root();
    let python = pyenv_python("3.10");
    let fixture = python_fixture("python_leak.py");
    let run = trace_python(&python, &fixture, &["2000"], &["--python", "exact"]);
    let notes: Vec<&str> = run
        .memtrace_stderr
        .lines()
        .filter(|l| l.contains("Python frames are off"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", run.memtrace_stderr);
    assert!(notes[0].contains("3.10"), "{}", notes[0]);
    assert!(
        !run.report.stacks.is_empty()
            && run.report.stacks.iter().all(|s| s
                .frames
                .iter()
                .all(|f| f.module.as_deref() != Some("[python]"))),
        "{}",
        describe_stacks(&run.report, 3)
    );
}

/// Debian's `python3.11`: static libpython, LTO+PGO, stripped. pymalloc's fast path is
/// inlined into its callers, so only growth mode applies, with the refill function found
/// in the separate debug file (`python3.11-dbg`, installed by `cargo xtask test`).
#[test]
fn python_debian_static_growth() {
    let _serial = serial();
    require_root();
    let python = std::path::Path::new("/usr/bin/python3.11");
    assert!(
        python.is_file(),
        "Debian's python3.11 is missing (apt-get install python3.11 python3.11-dbg)"
    );
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");
    let run = trace_python(python, &fixture, &["20000"], &["--python", "growth"]);
    assert!(
        !run.memtrace_stderr.contains("no debug file"),
        "python3.11-dbg is not installed (cargo xtask test installs it)\n{}",
        run.memtrace_stderr
    );
    assert_leak_tops_growth(&run.report, "Debian's python3.11", leak_line);
}
