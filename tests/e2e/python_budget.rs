//! The CPU budget on a CPython process: exact mode's probes (a trap per object) cost far
//! more than `--max-overhead`, so the agent lets them go, and keeps the cheapest probe
//! that still names Python lines: pymalloc's pool refills.
use std::time::Duration;

use crate::{agent_util::*, python_util::*, util::*};

/// Calibration, then enough CPU time of the process to judge it, take seconds.
const JUDGED_WITHIN: Duration = Duration::from_secs(60);

#[test]
fn budget_keeps_pool_refills_of_a_cpython_process() {
    let _serial = serial();
    require_root();
    let python = pyenv_python("3.12");
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");
    // Long enough to still be leaking once its exact probes are gone.
    let target = PythonFixture::start(&python, &fixture, &["1500000"]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&[
        "--pid",
        &pid,
        "--interval",
        "500ms",
        "--python",
        "exact",
        "--max-overhead",
        "1",
        "--budget-retry",
        "10m",
    ]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    wait_cpython_line(&agent.proc);
    target.go();

    let container = agent.wait_for("a budget detach", JUDGED_WITHIN, |s| {
        s.series("memtrace_budget_detaches_total", &[])
            .find(|x| x.value >= 1.0)
            .map(|x| x.label("container").to_owned())
    });
    agent.proc.wait_for_line(
        Stream::Stderr,
        "the pool-refills-only line",
        WAIT_TIMEOUT,
        |l| l.contains(&format!("pid {pid}")) && l.contains("pool refills only"),
    );
    // Its map entries went with the exact probes: what names the leak now is counted by
    // the pool refills alone.
    let site = format!("leak (python_leak.py:{leak_line})");
    agent.wait_for("the leak's line in the flame graph", WAIT_TIMEOUT, |s| {
        if s.value("memtrace_traced_processes", &[]) != Some(1.0) {
            return None;
        }
        let svg = agent
            .get(&format!(
                "/flamegraph.svg?container={}",
                url_encode(&container)
            ))
            .text();
        svg.contains(&site).then_some(())
    });
    let scrape = agent.scrape();
    assert_eq!(
        scrape
            .series("memtrace_budget_detaches_total", &[])
            .map(|x| x.value)
            .sum::<f64>(),
        1.0,
        "the pool refills stay within the budget: no second detach\n{}",
        scrape.memtrace_lines()
    );
    drop(target);
}
