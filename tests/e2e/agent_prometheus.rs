//! A real Prometheus scrapes the agent: the leaky container's suspicion reaches the
//! threshold in Prometheus's own query API, the churning container's does not.

use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::prometheus::Prometheus;
use crate::util::*;

const ALARM_DEADLINE: Duration = Duration::from_secs(45);

#[test]
fn agent_prometheus_scrape() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("prometheus");
    let leaky = cgroups.create("leaky");
    let calm = cgroups.create("calm");
    let pattern = format!("{}/*", cgroups.root_pattern());
    let agent = Agent::start(&[
        "--cgroup",
        &pattern,
        "--interval",
        "500ms",
        "--window",
        "15s",
        "--threshold",
        &THRESHOLD.to_string(),
    ]);
    agent.wait_ready();
    let prometheus = Prometheus::start(agent.addr);

    let leaky_fixture = start_shape(&leaky, &["steady"]);
    let calm_fixture = start_shape(&calm, &["churn"]);
    agent.wait_traced(2, WAIT_TIMEOUT);
    leaky_fixture.signal(libc::SIGUSR1);
    calm_fixture.signal(libc::SIGUSR1);
    let started = Instant::now();

    const SUSPICION: &str = "max by (container)(memtrace_leak_suspicion)";
    const OUTSTANDING: &str = "memtrace_outstanding_bytes";
    let mut leaky_max: Option<f64> = None;
    let mut calm_max: Option<f64> = None;
    let mut outstanding_seen = (false, false);
    loop {
        let leaky_now = prometheus.container_value(SUSPICION, &leaky.label);
        let calm_now = prometheus.container_value(SUSPICION, &calm.label);
        for (max, now) in [(&mut leaky_max, leaky_now), (&mut calm_max, calm_now)] {
            if let Some(v) = now {
                *max = Some(max.unwrap_or(0.0).max(v));
            }
        }
        if !(outstanding_seen.0 && outstanding_seen.1) {
            outstanding_seen = (
                prometheus
                    .container_value(OUTSTANDING, &leaky.label)
                    .is_some_and(|v| v > 0.0),
                prometheus
                    .container_value(OUTSTANDING, &calm.label)
                    .is_some_and(|v| v > 0.0),
            );
        }
        let done = leaky_now.is_some_and(|v| v >= THRESHOLD)
            && calm_now.is_some()
            && outstanding_seen.0
            && outstanding_seen.1;
        if done || started.elapsed() >= ALARM_DEADLINE {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let ran = started.elapsed();

    let describe = || {
        format!(
            "after {ran:?}: Prometheus says\n  {SUSPICION}: {:?}\n  {OUTSTANDING}: {:?}\n  up: {:?}\n\
             --- agent /metrics (memtrace_*) ---\n{}\n--- agent stderr ---\n{}\n--- prometheus stderr ---\n{}",
            prometheus.query(SUSPICION),
            prometheus.query(OUTSTANDING),
            prometheus.query("up"),
            agent.scrape().memtrace_lines(),
            agent.stderr(),
            prometheus.proc.stderr_so_far()
        )
    };
    assert!(
        outstanding_seen.0 && outstanding_seen.1,
        "memtrace_outstanding_bytes of {} and {} never both > 0 in Prometheus\n{}",
        leaky.label,
        calm.label,
        describe()
    );
    assert!(
        leaky_max.is_some_and(|v| v >= THRESHOLD),
        "{}: max suspicion in Prometheus never reached {THRESHOLD} (highest {leaky_max:?})\n{}",
        leaky.label,
        describe()
    );
    assert!(
        calm_max.is_some(),
        "{}: no memtrace_leak_suspicion series in Prometheus\n{}",
        calm.label,
        describe()
    );
    assert!(
        calm_max.is_some_and(|v| v < THRESHOLD),
        "{} (constant live set): suspicion in Prometheus reached {calm_max:?} >= {THRESHOLD}\n{}",
        calm.label,
        describe()
    );
    drop(calm_fixture);
    drop(leaky_fixture);
    drop(prometheus);
    drop(agent);
}
