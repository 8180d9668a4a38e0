//! The agent follows the processes of its cgroups: processes started after the agent is
//! ready are picked up (and their container's series appear); one that exits is dropped
//! with its allocations; once the last one exits the container's series are retired from
//! /metrics.

use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

/// The agent's interval in this test.
const INTERVAL: Duration = Duration::from_millis(500);
/// "Within a few intervals".
const FEW_INTERVALS: Duration = Duration::from_secs(5);
/// The first process leaks A_LEAKS x A_SIZE, the second B_LEAKS x B_SIZE.
const A_LEAKS: u64 = 50;
const A_SIZE: u64 = 4096;
const B_LEAKS: u64 = 30;
const B_SIZE: u64 = 1000;

fn outstanding(scrape: &Scrape, container: &str) -> Option<f64> {
    scrape.value("memtrace_outstanding_bytes", &[("container", container)])
}

#[test]
fn agent_follows_processes() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("follow");
    let cg = cgroups.create("app");
    let pattern = format!("{}/app", cgroups.root_pattern());
    let agent = Agent::start(&[
        "--cgroup",
        &pattern,
        "--interval",
        &format!("{}ms", INTERVAL.as_millis()),
        "--window",
        "15s",
    ]);
    agent.wait_ready();
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value("memtrace_traced_processes", &[]),
        Some(0.0),
        "nothing is in {} yet\n{}",
        cg.label,
        scrape.memtrace_lines()
    );
    assert!(
        scrape.lines_of_container(&cg.label).is_empty(),
        "series of the empty container {}:\n{}",
        cg.label,
        scrape.memtrace_lines()
    );
    // The fixed metrics are there from the start.
    assert_eq!(
        scrape
            .series("memtrace_build_info", &[])
            .map(|s| (s.label("version").is_empty(), s.value))
            .collect::<Vec<_>>(),
        [(false, 1.0)],
        "memtrace_build_info{{version}} 1\n{}",
        scrape.memtrace_lines()
    );
    for name in [
        "memtrace_attached_probes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            scrape.value(name, &[]).is_some(),
            "no {name}\n{}",
            scrape.text
        );
    }
    assert!(
        scrape
            .series("memtrace_dropped_events_total", &[])
            .all(|s| !s.label("reason").is_empty()),
        "memtrace_dropped_events_total without a reason\n{}",
        scrape.memtrace_lines()
    );

    // A first process.
    let a = start_shape(&cg, &["fixed", &A_LEAKS.to_string(), &A_SIZE.to_string()]);
    agent.wait_traced(1, FEW_INTERVALS);
    let probes = agent
        .scrape()
        .value("memtrace_attached_probes", &[])
        .unwrap_or(0.0);
    assert!(
        probes > 0.0,
        "a traced process but memtrace_attached_probes is {probes}"
    );
    a.signal(libc::SIGUSR1);
    a.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
        l.starts_with("done")
    });
    agent.wait_outstanding(&cg.label, A_LEAKS * A_SIZE, FEW_INTERVALS);
    let scrape = agent.scrape();
    for name in [
        "memtrace_allocated_bytes_total",
        "memtrace_freed_bytes_total",
        "memtrace_leak_suspects",
    ] {
        assert!(
            scrape.value(name, &[("container", &cg.label)]).is_some(),
            "no {name} series for {}\n{}",
            cg.label,
            scrape.memtrace_lines()
        );
    }
    let allocated = scrape
        .value(
            "memtrace_allocated_bytes_total",
            &[("container", &cg.label)],
        )
        .unwrap_or(0.0);
    assert!(
        allocated >= (A_LEAKS * A_SIZE) as f64,
        "memtrace_allocated_bytes_total {allocated} < the {} bytes leaked",
        A_LEAKS * A_SIZE
    );
    assert!(
        scrape
            .series("memtrace_leak_suspicion", &[("container", &cg.label)])
            .any(|s| site_is(s.label("site"), "fixed_leak")),
        "no memtrace_leak_suspicion series for the fixed_leak stack of {}\n{}",
        cg.label,
        scrape.memtrace_lines()
    );

    // A second process in the same container: its allocations add up.
    let b = start_shape(&cg, &["fixed", &B_LEAKS.to_string(), &B_SIZE.to_string()]);
    agent.wait_traced(2, FEW_INTERVALS);
    b.signal(libc::SIGUSR1);
    b.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
        l.starts_with("done")
    });
    agent.wait_outstanding(
        &cg.label,
        A_LEAKS * A_SIZE + B_LEAKS * B_SIZE,
        FEW_INTERVALS,
    );

    // The first exits (killed and reaped): its allocations go with it, the second's stay.
    drop(a);
    let a_gone = std::time::Instant::now();
    let b_leak = B_LEAKS * B_SIZE;
    let left = agent.wait_for(
        &format!(
            "memtrace_traced_processes == 1 and {}'s outstanding bytes < {}",
            cg.label,
            A_LEAKS * A_SIZE
        ),
        FEW_INTERVALS,
        |s| {
            (s.value("memtrace_traced_processes", &[]) == Some(1.0))
                .then(|| outstanding(s, &cg.label))
                .flatten()
                .filter(|v| *v < (A_LEAKS * A_SIZE) as f64)
        },
    );
    eprintln!("follow: first process dropped after {:?}", a_gone.elapsed());
    assert!(
        left >= b_leak as f64 && left <= (b_leak + RUNTIME_SLACK_BYTES) as f64,
        "after the first process exited, {} has {left} bytes outstanding, expected the second's {b_leak} \
         (+ at most {RUNTIME_SLACK_BYTES})",
        cg.label
    );

    // The last one exits.
    drop(b);
    let b_gone = std::time::Instant::now();
    agent.wait_for(
        &format!(
            "memtrace_traced_processes == 0 and no series of {}",
            cg.label
        ),
        FEW_INTERVALS,
        |s| {
            (s.value("memtrace_traced_processes", &[]) == Some(0.0)
                && s.lines_of_container(&cg.label).is_empty())
            .then_some(())
        },
    );
    eprintln!("follow: last process retired after {:?}", b_gone.elapsed());
    // The probes go after a grace period (three intervals), in case a process comes back.
    agent.wait_for(
        "memtrace_attached_probes == 0 with no process traced",
        FEW_INTERVALS,
        |s| (s.value("memtrace_attached_probes", &[]) == Some(0.0)).then_some(()),
    );
    assert!(
        agent.suspects().iter().all(|s| s.container != cg.label),
        "a suspect of the gone container {}",
        cg.label
    );
    let pprof = agent.get(&format!(
        "/debug/pprof/heap?container={}",
        url_encode(&cg.label)
    ));
    assert_eq!(
        pprof.status, 404,
        "the profile of the gone container {} is still served",
        cg.label
    );
    drop(agent);
}
