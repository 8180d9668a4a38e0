//! What the Python and page-touching benchmarks share: running `memtrace top` beside a
//! workload (bounded waits, always stopped and reaped), reading its JSON report, and the
//! mean and spread of repeated measurements.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How long memtrace may take to load its programs and attach.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long memtrace may take to exit: detaching uprobes is slow (~0.1 s each).
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Mean and sample standard deviation of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Spread {
    pub(crate) mean: f64,
    pub(crate) sd: f64,
    pub(crate) n: usize,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Self {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n.max(1) as f64;
        let sd = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self { mean, sd, n }
    }

    /// Half-width of an approximate 95% interval of the mean (2 standard errors).
    pub(crate) fn half_interval(&self) -> f64 {
        2.0 * self.sd / (self.n.max(1) as f64).sqrt()
    }
}

/// The parts of `memtrace top --format json` the benchmarks read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TopReport {
    pub(crate) allocated_bytes: u64,
    /// Allocation events counted (0 in reports that do not say).
    pub(crate) allocations: u64,
    pub(crate) outstanding_bytes: u64,
    /// (innermost function, outstanding bytes) per stack, in the report's order (largest
    /// first).
    pub(crate) stacks: Vec<(String, u64)>,
}

impl TopReport {
    pub(crate) fn parse(json: &str) -> Result<Self> {
        let report: serde_json::Value =
            serde_json::from_str(json.trim()).context("memtrace's report is not JSON")?;
        let number = |value: &serde_json::Value, what: &str| {
            value
                .as_u64()
                .with_context(|| format!("the report has no {what}"))
        };
        let totals = &report["totals"];
        let stacks = report["stacks"]
            .as_array()
            .context("the report has no stacks")?
            .iter()
            .map(|stack| {
                let leaf = stack["frames"][0]["function"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned();
                Ok((leaf, number(&stack["outstanding_bytes"], "stack bytes")?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            allocated_bytes: number(&totals["allocated_bytes"], "totals.allocated_bytes")?,
            allocations: totals["allocations"].as_u64().unwrap_or(0),
            outstanding_bytes: number(&totals["outstanding_bytes"], "totals.outstanding_bytes")?,
            stacks,
        })
    }

    /// The innermost function of the largest stack.
    pub(crate) fn top_site(&self) -> Option<&str> {
        self.stacks.first().map(|(leaf, _)| leaf.as_str())
    }

    /// Outstanding bytes of every stack whose innermost function is `function`.
    pub(crate) fn site_bytes(&self, function: &str) -> u64 {
        self.stacks
            .iter()
            .filter(|(leaf, _)| leaf == function)
            .map(|(_, bytes)| bytes)
            .sum()
    }
}

/// A running `memtrace top --format json`, its stdout and stderr in files; stopped
/// (SIGINT, then SIGKILL) and reaped when dropped.
pub(crate) struct TopRun {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl TopRun {
    /// Starts `memtrace top --format json ARGS...`, with `env` set for it (and its child).
    pub(crate) fn start(
        memtrace: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
        name: &str,
    ) -> Result<Self> {
        let stdout = log_dir.join(format!("{name}.json"));
        let stderr = log_dir.join(format!("{name}.log"));
        let child = Command::new(memtrace)
            .args(["top", "--format", "json"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {}", memtrace.display()))?;
        Ok(Self {
            child: Some(child),
            stdout,
            stderr,
        })
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("memtrace already reaped")
    }

    /// Waits until memtrace says it traces (`memtrace: attached` for the exact tier,
    /// `memtrace: counting` for the growth tier, `probes on the interpreter` for CPython
    /// without libc probes).
    pub(crate) fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.stderr();
            if log.contains("memtrace: attached")
                || log.contains("memtrace: counting")
                || log.contains("probes on the interpreter")
            {
                return Ok(());
            }
            if let Some(status) = self.child().try_wait()? {
                bail!(
                    "memtrace exited ({status}) before tracing:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!("memtrace did not start tracing within {READY_TIMEOUT:?}:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks memtrace to stop (SIGINT: it prints its final report) and waits for it.
    pub(crate) fn interrupt(&mut self) {
        if let Some(child) = &mut self.child
            && matches!(child.try_wait(), Ok(None))
        {
            // SAFETY: signalling our own child, not yet reaped, so its pid is still ours.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        }
    }

    /// Waits (bounded) for memtrace to exit, then reads its report and its stderr.
    pub(crate) fn finish(mut self) -> Result<(TopReport, String)> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child().try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("memtrace did not exit within {EXIT_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        if !status.success() {
            bail!("memtrace failed ({status}):\n{}", self.stderr());
        }
        let json = std::fs::read_to_string(&self.stdout)?;
        let stderr = self.stderr();
        let report =
            TopReport::parse(&json).with_context(|| format!("memtrace's stderr:\n{stderr}"))?;
        Ok((report, stderr))
    }
}

impl Drop for TopRun {
    fn drop(&mut self) {
        self.interrupt();
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + EXIT_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One measurement of a server: requests served, their wall time, and the server's CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RequestTiming {
    pub(crate) requests: u64,
    pub(crate) wall_s: f64,
    pub(crate) cpu_s: f64,
}

impl RequestTiming {
    pub(crate) fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.wall_s
    }

    pub(crate) fn cpu_us_per_request(&self) -> f64 {
        self.cpu_s * 1e6 / self.requests as f64
    }
}

/// `modes` in the order of round `round`: each leads a round in turn, so drift (the
/// machine is shared) falls on all alike.
pub(crate) fn rotated<M: Copy, const N: usize>(mut modes: [M; N], round: usize) -> [M; N] {
    modes.rotate_left(round % N.max(1));
    modes
}

/// Each measurement of `mode`'s CPU per request against the `untraced` one of its round,
/// less 1.
pub(crate) fn paired_costs<M: PartialEq + Copy>(
    timings: &[(M, usize, RequestTiming)],
    mode: M,
    untraced: M,
) -> Vec<f64> {
    timings
        .iter()
        .filter(|(m, _, _)| *m == mode)
        .filter_map(|(_, round, timing)| {
            let base = timings
                .iter()
                .find(|(m, r, _)| *m == untraced && r == round)?;
            Some(timing.cpu_us_per_request() / base.2.cpu_us_per_request() - 1.0)
        })
        .collect()
}

/// This machine's page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// `12.3 ± 0.4` with `digits` decimals.
pub(crate) fn plus_minus(spread: Spread, scale: f64, digits: usize) -> String {
    format!(
        "{:.digits$} ± {:.digits$}",
        spread.mean * scale,
        spread.sd * scale
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_measurements() {
        let spread = Spread::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(spread.mean, 2.5);
        assert!((spread.sd - 1.290_994).abs() < 1e-6);
        assert!((spread.half_interval() - 1.290_994).abs() < 1e-6);
        assert_eq!(Spread::of(&[5.0]).sd, 0.0);
    }

    #[test]
    fn every_mode_leads_a_round_in_turn() {
        let firsts: Vec<u8> = (0..3).map(|round| rotated([0u8, 1, 2], round)[0]).collect();
        assert_eq!(firsts, [0, 1, 2]);
        assert_eq!(rotated([0u8, 1, 2], 3), [0, 1, 2]);
        assert_eq!(rotated([0u8, 1, 2], 1), [1, 2, 0]);
    }

    #[test]
    fn costs_are_paired_by_round() {
        let timing = |cpu_s| RequestTiming {
            requests: 1000,
            wall_s: 1.0,
            cpu_s,
        };
        // Mode 0 is the untraced one.
        let timings = [
            (0u8, 0, timing(1.0)),
            (1, 0, timing(1.1)),
            (0, 1, timing(2.0)),
            (1, 1, timing(2.0)),
            (2, 1, timing(3.0)),
            (2, 2, timing(9.0)), // no untraced run in round 2: not paired
        ];
        let costs = paired_costs(&timings, 1, 0);
        assert!(
            (costs[0] - 0.1).abs() < 1e-9 && costs[1].abs() < 1e-9,
            "{costs:?}"
        );
        assert_eq!(paired_costs(&timings, 2, 0), vec![0.5]);
    }

    #[test]
    fn reads_a_top_report() {
        let json = r#"{"target": {"pid": 7, "command": "pages 10"}, "duration_secs": 1.0,
            "sample_bytes": 1,
            "totals": {"allocated_bytes": 917504, "freed_bytes": 0,
                       "outstanding_bytes": 917504, "outstanding_allocations": 224,
                       "dropped_events": 0, "unmatched_frees": 0, "drops": {}},
            "stacks": [
              {"stack_id": "1", "outstanding_bytes": 655360, "outstanding_allocations": 160,
               "allocated_bytes": 655360,
               "frames": [{"function": "leak_pages", "module": "pages"},
                          {"function": "main", "module": "pages"}]},
              {"stack_id": "2", "outstanding_bytes": 262144, "outstanding_allocations": 64,
               "allocated_bytes": 262144,
               "frames": [{"function": "reuse_buffer"}, {"function": "main"}]},
              {"stack_id": "3", "outstanding_bytes": 4096, "outstanding_allocations": 1,
               "allocated_bytes": 4096, "frames": [{"function": "leak_pages"}]},
              {"stack_id": "4", "outstanding_bytes": 8192, "outstanding_allocations": 2,
               "allocated_bytes": 8192, "frames": []}]}"#;
        let report = TopReport::parse(json).unwrap();
        assert_eq!(report.allocated_bytes, 917504);
        assert_eq!(report.outstanding_bytes, 917504);
        assert_eq!(report.top_site(), Some("leak_pages"));
        assert_eq!(report.site_bytes("leak_pages"), 655360 + 4096);
        assert_eq!(report.site_bytes("reuse_buffer"), 262144);
        assert_eq!(report.site_bytes("?"), 8192);
        assert_eq!(report.site_bytes("main"), 0);
    }

    #[test]
    fn rejects_a_report_without_totals() {
        assert!(TopReport::parse(r#"{"stacks": []}"#).is_err());
        assert!(TopReport::parse("memtrace: error").is_err());
    }

    #[test]
    fn formats_mean_and_spread() {
        let spread = Spread::of(&[0.001, 0.003]);
        assert_eq!(plus_minus(spread, 1000.0, 2), "2.00 ± 1.41");
    }
}
