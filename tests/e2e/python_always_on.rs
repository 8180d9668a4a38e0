//! The always-on tier on a CPython process: no probe on its interpreter or its libc, yet
//! the pages its leak populates are attributed to the Python line that leaks (its Python
//! frames are read in BPF at each page fault's stack walk).

use std::time::Duration;

use crate::agent_util::*;
use crate::python_util::*;
use crate::util::*;

const WITHIN: Duration = Duration::from_secs(60);

#[test]
fn python_always_on_growth_names_the_leaking_line() {
    let _serial = serial();
    require_root();
    let python = pyenv_python("3.12");
    let fixture = python_fixture("python_leak.py");
    let leak_line = marked_line(&fixture, "LEAK");

    let mut cgroups = TestCgroups::new("pyalways");
    let cg = cgroups.create("py");
    let target = PythonFixture::start_in(&cg, &python, &fixture, &["300000"]);

    // Escalation off by a window longer than the test: only the always-on tier runs.
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
        "--probes",
        "escalate",
        "--escalate-for",
        "1h",
        "--window",
        "1h",
    ]);
    agent.wait_ready();
    let container = [("container", cg.label.as_str())];
    agent.wait_for("the Python process watched", WITHIN, |s| {
        s.value("memtrace_anon_memory_bytes", &container)
            .map(|_| ())
    });
    target.go();
    target.wait_done();

    let deadline = std::time::Instant::now() + WITHIN;
    let growth = loop {
        let growth = agent.get("/api/v1/growth").text();
        let sites: Vec<serde_json::Value> =
            serde_json::from_str(&growth).unwrap_or_else(|e| panic!("{e}: {growth}"));
        let names_the_line = sites.iter().any(|site| {
            site["container"] == cg.label.as_str()
                && site["frames"].as_array().is_some_and(|frames| {
                    frames.iter().any(|f| {
                        f["function"].as_str().is_some_and(|n| n.ends_with("leak"))
                            && f["file"]
                                .as_str()
                                .is_some_and(|p| p.ends_with("python_leak.py"))
                            && f["line"].as_u64() == Some(leak_line)
                    })
                })
        });
        if names_the_line {
            break growth;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no growth site of {} names python_leak.py:{leak_line}: {growth}\n{}",
            cg.label,
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value("memtrace_traced_processes", &[]),
        Some(0.0),
        "no probe went on the process: the always-on tier alone found it\n{growth}"
    );
    assert_eq!(
        scrape.value("memtrace_attached_probes", &[]),
        Some(0.0),
        "no uprobe at all\n{}",
        scrape.memtrace_lines()
    );
}

/// Python frames of the always-on tier outlive an escalation: once the container's window
/// is over (its processes detached from the exact tier), the pages its CPython process
/// populates are still charged to Python lines.
#[test]
fn python_always_on_frames_outlive_an_escalation() {
    let _serial = serial();
    require_root();
    let mut cgroups = TestCgroups::new("pyafter");
    let cg = cgroups.create("app");
    // The container's memory grows (~3 MiB/s of new pages): it gets escalated.
    let _grower = start_in_cgroup(&cg, "pages", &["100000", "20"]);
    let _service = start_python_in_cgroup(
        &cg,
        &pyenv_python("3.12"),
        &python_fixture("python_service.py"),
        &["10000", "20"],
    );
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
        "3s",
        "--max-overhead",
        "0",
        // Every growth site of the container: the pages fixture's would crowd out Python's.
        "--top-k",
        "50",
    ]);
    let container = [("container", cg.label.as_str())];
    agent.wait_for("an escalation window over", WITHIN, |s| {
        (s.value("memtrace_escalations_total", &container) == Some(1.0)
            && s.value("memtrace_escalated", &container) == Some(0.0))
        .then_some(())
    });
    // Bytes charged to the service's Python lines grow on after the window.
    let python_bytes = || -> u64 {
        let growth = agent.get("/api/v1/growth").text();
        let sites: Vec<serde_json::Value> =
            serde_json::from_str(&growth).unwrap_or_else(|e| panic!("{e}: {growth}"));
        sites
            .iter()
            .filter(|s| {
                s["container"] == cg.label.as_str()
                    && s["frames"].as_array().is_some_and(|frames| {
                        frames.iter().any(|f| {
                            f["file"]
                                .as_str()
                                .is_some_and(|p| p.ends_with("python_service.py"))
                        })
                    })
            })
            .filter_map(|s| s["populated_bytes"].as_u64())
            .sum()
    };
    let after_window = python_bytes();
    let deadline = std::time::Instant::now() + WITHIN;
    while python_bytes() <= after_window {
        let scrape = agent.scrape();
        assert!(
            std::time::Instant::now() < deadline
                && scrape.value("memtrace_escalated", &container) == Some(0.0),
            "no page charged to a Python line since the window ended ({after_window} bytes), \
             before the deadline or the next window\n{}",
            agent.get("/api/v1/growth").text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
