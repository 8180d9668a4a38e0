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
