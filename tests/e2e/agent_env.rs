//! The agent takes its flags from the environment (the DaemonSet way): MEMTRACE_CGROUP,
//! MEMTRACE_LISTEN and MEMTRACE_INTERVAL instead of --cgroup, --listen and --interval.

use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::util::*;

const LEAKS: u64 = 30;
const SIZE: u64 = 2000;

#[test]
fn agent_env_flags() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("env");
    let cg = cgroups.create("app");
    let addr = free_addr();
    let pattern = format!("{}/app", cgroups.root_pattern());
    let agent = Agent::spawn(
        memtrace_command(["agent"]),
        &[
            ("MEMTRACE_CGROUP", &pattern),
            ("MEMTRACE_LISTEN", &addr.to_string()),
            ("MEMTRACE_INTERVAL", "500ms"),
        ],
        addr,
    );
    agent.wait_ready();
    let health = agent.get("/healthz");
    assert_eq!(health.status, 200, "/healthz: {}", health.text());

    // Started right after the first interval: picked up at the next one, 500 ms later
    // (with the default 10 s interval it would take about 10 s).
    let fixture = start_shape(&cg, &["fixed", &LEAKS.to_string(), &SIZE.to_string()]);
    let started = Instant::now();
    agent.wait_traced(1, Duration::from_secs(4));
    let picked_up = started.elapsed();
    fixture.signal(libc::SIGUSR1);
    agent.wait_outstanding(&cg.label, LEAKS * SIZE, Duration::from_secs(4));
    let scrape = agent.scrape();
    assert!(
        scrape
            .series("memtrace_leak_suspicion", &[("container", &cg.label)])
            .any(|s| site_is(s.label("site"), "fixed_leak")),
        "no suspicion series of the fixed_leak stack of {} (picked up after {picked_up:?})\n{}",
        cg.label,
        scrape.memtrace_lines()
    );
    drop(fixture);
    drop(agent);
}
