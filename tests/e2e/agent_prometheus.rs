//! A real Prometheus scrapes the agent: the leaky container's suspicion reaches the
//! threshold in Prometheus's own query API, the churning container's does not.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::util::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const ALARM_DEADLINE: Duration = Duration::from_secs(45);

/// A running Prometheus with a temporary config and TSDB, killed when dropped.
struct Prometheus {
    proc: Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).is_file(),
            "{PROMETHEUS} is missing: this test runs a real Prometheus \
             (`cargo xtask test` installs it; or `apt-get install prometheus`)"
        );
        let dir = tempfile::Builder::new()
            .prefix("memtrace-e2e-prometheus-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory: {e}"));
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: memtrace\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let addr = free_addr();
        let mut cmd = Command::new(PROMETHEUS);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn(format!("prometheus on {addr}"), cmd);
        let prometheus = Prometheus {
            proc,
            addr,
            _dir: dir,
        };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_get(self.addr, "/-/ready") {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = format!("{} {}", r.status, r.text().trim()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "prometheus: /-/ready not 200 within {WAIT_TIMEOUT:?} (last: {last})\n--- stderr ---\n{}",
            self.proc.stderr_so_far()
        );
    }

    /// An instant query: `(labels, value)` per series of the result vector.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let response = http_get(self.addr, &path).unwrap_or_else(|e| {
            panic!(
                "prometheus: {e}\n--- stderr ---\n{}",
                self.proc.stderr_so_far()
            )
        });
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_else(|e| {
            panic!(
                "prometheus: {path} answered {} with non-JSON ({e}): {}",
                response.status,
                response.text()
            )
        });
        assert!(
            response.status == 200 && body["status"] == "success",
            "prometheus: {path} failed: {} {body}",
            response.status
        );
        assert_eq!(body["data"]["resultType"], "vector", "{body}");
        body["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("no result list: {body}"))
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("bad sample value in {r}"));
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of the series whose `container` label is `container`.
    fn container_value(&self, promql: &str, container: &str) -> Option<f64> {
        self.query(promql)
            .into_iter()
            .find(|(labels, _)| labels["container"] == container)
            .map(|(_, v)| v)
    }
}

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
