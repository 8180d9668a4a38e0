//! What the agent is told to trace does not exist: cgroup patterns that match nothing, a
//! pid that is gone. It says so in one line, exports it, and keeps serving.

use crate::agent_util::*;
use crate::util::*;

#[test]
fn fault_nothing_matches() {
    let _serial = serial();
    require_root();
    let pattern = format!("memtrace-e2e-{}-no-such-cgroup/**", std::process::id());
    let agent = Agent::start(&["--cgroup", &pattern, "--interval", "200ms"]);
    agent.wait_ready();
    agent.wait_for("memtrace_matching_cgroups 0", WAIT_TIMEOUT, |s| {
        (s.value("memtrace_matching_cgroups", &[]) == Some(0.0)).then_some(())
    });
    // Several intervals pass: the message is said once, not every interval.
    agent.wait_for("a few intervals", WAIT_TIMEOUT, |s| {
        (s.value("memtrace_traced_processes", &[]) == Some(0.0)).then_some(())
    });
    // An observation window of five intervals: the line must not come back.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let stderr = agent.stderr();
    let said = stderr
        .lines()
        .filter(|l| l.contains("no cgroup under"))
        .count();
    assert_eq!(said, 1, "expected one `no cgroup under` line\n{stderr}");
    assert!(stderr.contains(&pattern), "{stderr}");
    assert_eq!(agent.get("/healthz").status, 200);

    // A pattern that starts matching is picked up.
    let mut cgroups = TestCgroups::new("nomatch");
    let cgroup = cgroups.create("late");
    drop(agent);
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "200ms",
    ]);
    let fixture = start_shape(&cgroup, &["fixed", "10", "1000"]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    agent.wait_for("memtrace_matching_cgroups 1", WAIT_TIMEOUT, |s| {
        (s.value("memtrace_matching_cgroups", &[]) == Some(1.0)).then_some(())
    });
    drop(fixture);
    drop(agent);
}

#[test]
fn fault_pid_gone() {
    let _serial = serial();
    require_root();
    // A pid that existed and is gone (reaped): nobody can have it again this soon.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let agent = Agent::start(&["--pid", &pid.to_string(), "--interval", "200ms"]);
    agent.wait_ready();
    agent.wait_traced(0, WAIT_TIMEOUT);
    assert_eq!(agent.get("/healthz").status, 200);
    assert!(
        agent
            .proc
            .stderr_so_far()
            .lines()
            .all(|l| !l.contains("panicked")),
        "{}",
        agent.stderr()
    );
    drop(agent);
}
