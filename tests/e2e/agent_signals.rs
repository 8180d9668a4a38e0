//! SIGTERM and SIGINT stop the agent: it detaches every probe and exits 0 within seconds,
//! leaving the traced processes running. Also when it traces several processes (a node
//! agent traces many; Kubernetes gives it 30 s by default before SIGKILL).

use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::util::*;

const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel removes uprobes one at a time, 80–240 ms each on 6.18, so the bound grows
/// with the probe count (the agent shares one set of ~20 per libc file among the
/// processes that map it, so it stays small).
const STOP_TIMEOUT_PER_PROBE: Duration = Duration::from_millis(300);

fn stops_on(signal: libc::c_int, tag: &str, processes: usize) {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new(tag);
    let groups: Vec<Cgroup> = (0..processes)
        .map(|i| cgroups.create(&format!("app{i}")))
        .collect();
    let mut agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
    ]);
    let fixtures: Vec<Proc> = groups
        .iter()
        .map(|cg| start_shape(cg, &["fixed", "10", "1000"]))
        .collect();
    agent.wait_traced(processes as i64, WAIT_TIMEOUT);
    for (fixture, cg) in fixtures.iter().zip(&groups) {
        fixture.signal(libc::SIGUSR1);
        fixture.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
            l.starts_with("done")
        });
        agent.wait_outstanding(&cg.label, 10 * 1000, WAIT_TIMEOUT);
    }
    let probes = agent
        .scrape()
        .value("memtrace_attached_probes", &[])
        .unwrap_or(0.0);
    assert!(
        probes > 0.0,
        "memtrace_attached_probes is {probes} while tracing"
    );

    let signalled = Instant::now();
    agent.proc.signal(signal);
    let finished = agent
        .proc
        .wait(STOP_TIMEOUT + STOP_TIMEOUT_PER_PROBE * probes as u32);
    let took = signalled.elapsed();
    assert!(
        finished.status.success(),
        "the agent did not exit 0 on signal {signal}\n{}",
        finished.describe()
    );
    assert!(
        finished.stderr.contains("probes detached"),
        "the agent did not say `probes detached`\n{}",
        finished.describe()
    );
    eprintln!(
        "{tag}: the agent tracing {processes} processes ({probes} probes) stopped in {took:?}"
    );
    assert!(
        http_get(agent.addr, "/healthz").is_err(),
        "the agent's listener still answers after it exited"
    );
    // The traced processes outlive the agent, unharmed.
    for fixture in &fixtures {
        let state = std::fs::read_to_string(format!("/proc/{}/stat", fixture.pid()))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().chars().next()))
            .flatten();
        assert!(
            matches!(state, Some('S' | 'R')),
            "a traced fixture is no longer running after the agent stopped (state {state:?})"
        );
    }
    drop(fixtures);
}

#[test]
fn agent_sigterm() {
    stops_on(libc::SIGTERM, "sigterm", 1);
}

#[test]
fn agent_sigint() {
    stops_on(libc::SIGINT, "sigint", 1);
}

#[test]
fn agent_sigterm_tracing_several() {
    stops_on(libc::SIGTERM, "sigterm-several", 6);
}
