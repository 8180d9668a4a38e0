//! A process the agent cannot trace (no C library, no allocator of its own) is logged
//! once, counted, retried with back-off, and does not stop the agent from tracing the others.

use std::process::Command;
use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

#[test]
fn agent_attach_errors() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("attach-errors");
    let bad = cgroups.create("nolibc");
    let good = cgroups.create("app");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(bad.dir.join("cgroup.procs"))
        .arg(nolibc_fixture());
    let bad_proc = Proc::spawn("nolibc fixture", cmd);
    let app = start_shape(&good, &["fixed", "10", "1000"]);

    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "300ms",
    ]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    app.signal(libc::SIGUSR1);
    agent.wait_outstanding(&good.label, 10 * 1000, WAIT_TIMEOUT);
    // Retried: 1, 2, 4 intervals apart, so a few attempts within seconds.
    let errors = agent.wait_for(
        "memtrace_attach_errors_total >= 3",
        Duration::from_secs(20),
        |s| {
            s.value("memtrace_attach_errors_total", &[])
                .filter(|v| *v >= 3.0)
        },
    );
    assert!(errors >= 3.0);
    let pid = bad_proc.pid().to_string();
    // Logged when the quick retries of a just-started process are over.
    agent.proc.wait_for_line(
        Stream::Stderr,
        "`cannot trace pid` line",
        WAIT_TIMEOUT,
        |l| l.contains("cannot trace pid") && l.contains(&pid),
    );
    let stderr = agent.stderr();
    let logged = stderr
        .lines()
        .filter(|l| l.contains("cannot trace pid") && l.contains(&pid))
        .count();
    assert_eq!(logged, 1, "the failure must be logged once\n{stderr}");
    assert!(
        stderr.contains("no allocator of its own"),
        "the log line must say why\n{stderr}"
    );
    assert_eq!(
        agent.scrape().value("memtrace_traced_processes", &[]),
        Some(1.0),
        "only the process with an allocator is traced"
    );
    drop(app);
    drop(bad_proc);
}
