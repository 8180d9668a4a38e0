//! A traced process forks, execs and exits thousands of times while the agent follows its
//! cgroup: the agent keeps up, keeps serving, counts what it could not attach, and its
//! numbers for the long-lived parent stay right.

use crate::agent_util::*;
use crate::util::*;

const CHILDREN: &str = "2000";

#[test]
fn fault_fork_exec_exit_churn() {
    let _serial = serial();
    require_root();
    let mut cgroups = TestCgroups::new("churn");
    let cgroup = cgroups.create("forker");
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "200ms",
    ]);
    agent.wait_ready();

    let mut cmd = std::process::Command::new("sh");
    let churn = fixture("forker");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cgroup.dir.join("cgroup.procs"))
        .arg(&churn)
        .arg(CHILDREN)
        .arg(&churn);
    let parent = Proc::spawn("churn", cmd);
    parent.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    agent.wait_traced(1, WAIT_TIMEOUT);
    parent.signal(libc::SIGUSR1);
    parent.wait_for_line(Stream::Stdout, "`done` line", RUN_TIMEOUT, |l| {
        l.trim() == "done"
    });

    // The children are gone: only the parent stays traced, and its leak shows exactly
    // (100 x 1000 B in parent_leak; its churn frees everything).
    agent.wait_traced(1, WAIT_TIMEOUT);
    agent.wait_outstanding(&cgroup.label, 100_000, WAIT_TIMEOUT);
    let scrape = agent.scrape();
    let outstanding = scrape
        .value(
            "memtrace_outstanding_bytes",
            &[("container", cgroup.label.as_str())],
        )
        .unwrap();
    assert!(
        outstanding <= 100_000.0 + 16.0 * 1024.0,
        "{outstanding} B outstanding; the parent leaked 100000 and its children are gone\n{}",
        scrape.memtrace_lines()
    );
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
    drop(parent);
    drop(agent);
}
