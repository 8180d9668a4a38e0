//! A real Prometheus (Debian's package) for tests: a temporary config and TSDB, scraping
//! one target every second, killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent_util::*;
use crate::util::*;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";

pub struct Prometheus {
    pub proc: Proc,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it scraping `target` and waits until it is ready.
    pub fn start(target: SocketAddr) -> Prometheus {
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

    /// An instant query: `Ok(result list)` or `Err(Prometheus's error)`.
    pub fn try_query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let response = http_get(self.addr, &path).unwrap_or_else(|e| {
            panic!(
                "prometheus: {e}\n--- stderr ---\n{}",
                self.proc.stderr_so_far()
            )
        });
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("{} non-JSON ({e}): {}", response.status, response.text()))?;
        if response.status != 200 || body["status"] != "success" {
            return Err(format!("{} {body}", response.status));
        }
        match &body["data"]["result"] {
            Value::Array(series) => Ok(series.clone()),
            // A scalar or string result: one value.
            other => Ok(vec![other.clone()]),
        }
    }

    /// An instant query that must succeed: `(labels, value)` per series.
    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        self.try_query(promql)
            .unwrap_or_else(|e| panic!("prometheus: {promql} failed: {e}"))
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
    pub fn container_value(&self, promql: &str, container: &str) -> Option<f64> {
        self.query(promql)
            .into_iter()
            .find(|(labels, _)| labels["container"] == container)
            .map(|(_, v)| v)
    }
}
