//! The agent on a CPython process: Python frames in its flame graph, garbage-collector
//! counts and durations, and live objects (exact mode) on /metrics.
use std::time::Duration;

use crate::{agent_util::*, python_util::*, util::*};

#[test]
fn python_agent_metrics() {
    let _serial = serial();
    require_root();
    let python = pyenv_python("3.12");
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");
    let iterations = 10_000;
    let target = PythonFixture::start(&python, &fixture, &[&iterations.to_string()]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&["--pid", &pid, "--interval", "500ms", "--python", "exact"]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    wait_cpython_line(&agent.proc);
    target.go();
    target.wait_done();

    let container = agent.wait_for("Python GC and live objects", WAIT_TIMEOUT, |s| {
        let collections: f64 = s
            .series("memtrace_python_gc_collections_total", &[])
            .map(|x| x.value)
            .sum();
        let timed: f64 = s
            .series("memtrace_python_gc_duration_seconds_count", &[])
            .map(|x| x.value)
            .sum();
        let live = s
            .series("memtrace_python_live_objects", &[])
            .map(|x| x.value)
            .fold(0.0, f64::max);
        let container = s
            .series("memtrace_python_live_objects", &[])
            .next()
            .map(|x| x.label("container").to_owned())?;
        (collections > 0.0 && timed == collections && live >= iterations as f64)
            .then_some(container)
    });
    let scrape = agent.scrape();
    assert!(
        scrape
            .series(
                "memtrace_python_gc_duration_seconds_bucket",
                &[("le", "+Inf")]
            )
            .next()
            .is_some(),
        "the GC histogram has no +Inf bucket\n{}",
        scrape.memtrace_lines()
    );
    let svg = agent
        .get(&format!(
            "/flamegraph.svg?container={}",
            url_encode(&container)
        ))
        .text();
    assert!(
        svg.contains(&format!("leak (python_leak.py:{leak_line})")),
        "the flame graph has no Python frame leak (python_leak.py:{leak_line})"
    );
    // Python stacks are labelled with their Python line, not the native allocator.
    let site = format!("leak (python_leak.py:{leak_line})");
    let deadline = std::time::Instant::now() + WAIT_TIMEOUT;
    while !scrape_has_site(&agent, &site) {
        assert!(
            std::time::Instant::now() < deadline,
            "no memtrace_leak_suspicion series with site {site:?}\n{}",
            agent.scrape().memtrace_lines()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(target);
}

fn scrape_has_site(agent: &Agent, site: &str) -> bool {
    agent
        .scrape()
        .series("memtrace_leak_suspicion", &[("site", site)])
        .next()
        .is_some()
}

/// Two CPython processes on one libpython share one set of interpreter probes (growth
/// mode), both get Python frames, and the probes go when the last of them does.
#[test]
fn python_agent_shares_interpreter_probes() {
    let _serial = serial();
    require_root();
    let python = pyenv_python("3.12");
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");
    let mut targets: Vec<PythonFixture> = (0..2)
        .map(|_| PythonFixture::start(&python, &fixture, &["20000"]))
        .collect();
    let pids = format!("{},{}", targets[0].pid(), targets[1].pid());
    let agent = Agent::start(&["--pid", &pids, "--interval", "500ms", "--python", "growth"]);
    agent.wait_traced(2, WAIT_TIMEOUT);
    let lines = [
        wait_cpython_line(&agent.proc),
        wait_cpython_line(&agent.proc),
    ];
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("probes on the interpreter"))
            .count(),
        1,
        "{lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("sharing the probes"))
            .count(),
        1,
        "{lines:?}"
    );
    for target in &targets {
        target.go();
    }
    for target in &targets {
        target.wait_done();
    }
    let site = format!("leak (python_leak.py:{leak_line})");
    agent.wait_for("the leak's Python site", WAIT_TIMEOUT, |s| {
        s.series("memtrace_leak_suspicion", &[("site", &site)])
            .next()
            .map(|_| ())
    });
    targets.clear(); // kills both
    agent.wait_for("every probe detached", WAIT_TIMEOUT, |s| {
        (s.value("memtrace_attached_probes", &[]) == Some(0.0)).then_some(())
    });
}

/// `--probes escalate` with the default `--python growth`: an escalated container's CPython
/// processes get exact mode's probes where the interpreter allows it (pyenv's 3.12: live
/// objects are counted), and keep growth mode's on an LTO build (Debian's python3.11, whose
/// inlined fast path exact mode would miss).
#[test]
fn python_agent_escalation_brings_exact_mode() {
    let _serial = serial();
    require_root();
    let debian = std::path::Path::new("/usr/bin/python3.11");
    assert!(
        debian.is_file(),
        "Debian's python3.11 is missing (apt-get install python3.11 python3.11-dbg)"
    );
    let mut cgroups = TestCgroups::new("pyescalate");
    let cg = cgroups.create("app");
    // The container's memory grows (~3 MiB/s of new pages): it gets escalated.
    let _grower = start_in_cgroup(&cg, "pages", &["100000", "20"]);
    let service = python_fixture("python_service.py");
    let pyenv = start_python_in_cgroup(&cg, &pyenv_python("3.12"), &service, &["10000", "20"]);
    let lto = start_python_in_cgroup(&cg, debian, &service, &["10000", "20"]);
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
        "--window",
        "10s",
        "--probes",
        "escalate",
        "--escalate-for",
        "10m",
        // No budget: the probes stay on for what is checked here.
        "--max-overhead",
        "0",
    ]);
    let lines = [
        wait_cpython_line(&agent.proc),
        wait_cpython_line(&agent.proc),
    ];
    let line_of = |pid: i32| {
        lines
            .iter()
            .find(|l| l.contains(&format!("in pid {pid}:")))
            .unwrap_or_else(|| panic!("no CPython line for pid {pid}: {lines:?}"))
    };
    let exact = line_of(pyenv.pid());
    assert!(
        exact.contains("_PyObject_Malloc") && !exact.contains("allocate_from_new_pool"),
        "pyenv's 3.12 did not get exact mode's probes: {exact}"
    );
    let growth = line_of(lto.pid());
    assert!(
        growth.contains("allocate_from_new_pool") && !growth.contains("_PyObject_Malloc"),
        "Debian's LTO python3.11 did not keep growth mode's probes: {growth}"
    );
    let container = [("container", cg.label.as_str())];
    agent.wait_for(
        "live objects of the escalated container",
        WAIT_TIMEOUT,
        |s| {
            (s.value("memtrace_escalated", &container) == Some(1.0)
                && s.value("memtrace_python_live_objects", &container)
                    .is_some_and(|n| n > 0.0))
            .then_some(())
        },
    );
}
