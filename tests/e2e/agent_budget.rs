//! The CPU budget: a process that allocates in a hot loop pays more than `--max-overhead`
//! for its probes and is detached (counted, logged); a quiet process in the same agent
//! stays traced.

use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

const INTERVAL: Duration = Duration::from_millis(500);
/// Calibration, then enough CPU time of the hot process to judge it, take seconds.
const JUDGED_WITHIN: Duration = Duration::from_secs(60);

#[test]
fn budget_detaches_a_hot_allocator_and_keeps_a_quiet_one() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("budget");
    let hot_cg = cgroups.create("hot");
    let quiet_cg = cgroups.create("quiet");
    // busy: one thread churning malloc/free until SIGUSR1 (never sent here).
    let hot = start_in_cgroup(&hot_cg, "busy", &["1", "0", "0"]);
    // waiter: a few allocations, then it blocks.
    let quiet = start_in_cgroup(&quiet_cg, "waiter", &["5", "0", "16"]);

    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        &format!("{}ms", INTERVAL.as_millis()),
        "--max-overhead",
        "1",
        "--budget-retry",
        "10m",
    ]);
    agent.wait_ready();
    agent.wait_traced(2, Duration::from_secs(20));

    // The hot one is detached and counted; the quiet one stays traced.
    agent.wait_for("a budget detach of the hot process", JUDGED_WITHIN, |s| {
        (s.value(
            "memtrace_budget_detaches_total",
            &[("container", hot_cg.label.as_str())],
        ) == Some(1.0)
            && s.value("memtrace_traced_processes", &[]) == Some(1.0))
        .then_some(())
    });
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value(
            "memtrace_budget_detaches_total",
            &[("container", quiet_cg.label.as_str())]
        ),
        None,
        "the quiet process is not detached\n{}",
        scrape.memtrace_lines()
    );
    let cost = scrape
        .value("memtrace_probe_cost_seconds", &[("call", "alloc")])
        .expect("the calibrated cost is exported");
    assert!(cost > 0.0, "calibrated alloc cost {cost}");
    let stderr = agent.stderr();
    assert!(
        stderr.contains(&format!("pid {}", hot.pid())) && stderr.contains("over the budget"),
        "the agent says which process went over its budget\n{stderr}"
    );
    // Detached means no probe traps in it any more: its totals stop moving.
    drop(quiet);
}
