//! What the page-touching and large-block benchmarks share: a C fixture that times its own
//! rounds (so memtrace's start and stop are not counted), run untraced and under `memtrace
//! top --tier TIER` in alternation, and the tables of what memtrace found and what it cost.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::bench_tiers::{Spread, TopReport, TopRun, plus_minus};

/// How long one untraced run may take, in seconds.
const RUN_TIMEOUT_SECS: u32 = 60;

/// A fixture that, with `env` set, prints `NAME: ROUNDS rounds in WALL_NS ns wall CPU_NS ns
/// cpu` on stderr, `NAME` being its file name.
pub(crate) struct SelfTimed {
    pub(crate) program: PathBuf,
    pub(crate) env: &'static str,
    pub(crate) rounds: u64,
}

/// One run's own timing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Timing {
    pub(crate) wall_ns: f64,
    pub(crate) cpu_ns: f64,
}

impl Timing {
    /// Finds `name`'s timing line in `stderr`.
    pub(crate) fn find(stderr: &str, name: &str) -> Result<Self> {
        let prefix = format!("{name}:");
        let line = stderr
            .lines()
            .find(|l| l.split_whitespace().next() == Some(prefix.as_str()))
            .with_context(|| format!("no timing line from the {name} program in:\n{stderr}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, _, "rounds", "in", wall, "ns", "wall", cpu, "ns", "cpu"] = fields[..] else {
            bail!("the {name} program printed {line:?}");
        };
        Ok(Self {
            wall_ns: wall.parse()?,
            cpu_ns: cpu.parse()?,
        })
    }
}

/// Timings untraced and traced, and memtrace's reports of the traced runs.
pub(crate) struct Runs {
    pub(crate) untraced: Vec<Timing>,
    pub(crate) traced: Vec<Timing>,
    pub(crate) reports: Vec<TopReport>,
}

impl SelfTimed {
    fn name(&self) -> String {
        self.program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `repeats` runs under `memtrace top --tier TIER` and as many untraced, alternating
    /// which goes first so that drift falls on both alike.
    pub(crate) fn measure(
        &self,
        memtrace: &Path,
        tier: &str,
        log_dir: &Path,
        repeats: usize,
    ) -> Result<Runs> {
        let mut runs = Runs {
            untraced: Vec::new(),
            traced: Vec::new(),
            reports: Vec::new(),
        };
        for repeat in 0..repeats {
            if repeat % 2 == 0 {
                runs.untraced.push(self.run_untraced()?);
            }
            let (timing, report) = self.run_traced(memtrace, tier, log_dir)?;
            runs.traced.push(timing);
            runs.reports.push(report);
            if repeat % 2 == 1 {
                runs.untraced.push(self.run_untraced()?);
            }
        }
        Ok(runs)
    }

    /// One untraced run, bounded.
    fn run_untraced(&self) -> Result<Timing> {
        let name = self.name();
        let out = Command::new("timeout")
            .arg(RUN_TIMEOUT_SECS.to_string())
            .arg(&self.program)
            .arg(self.rounds.to_string())
            .env(self.env, "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if !out.status.success() {
            bail!(
                "the {name} program failed ({}; killed after {RUN_TIMEOUT_SECS} s if 124)",
                out.status
            );
        }
        Timing::find(&String::from_utf8_lossy(&out.stderr), &name)
    }

    /// One run under `memtrace top --tier TIER --format json`.
    fn run_traced(
        &self,
        memtrace: &Path,
        tier: &str,
        log_dir: &Path,
    ) -> Result<(Timing, TopReport)> {
        let name = self.name();
        let program = self.program.to_string_lossy();
        let rounds = self.rounds.to_string();
        let top = TopRun::start(
            memtrace,
            &["--tier", tier, "--interval", "60", "--", &program, &rounds],
            &[(self.env, "1")],
            log_dir,
            &format!("{name}-top"),
        )?;
        // memtrace exits when the program does; the program's line is in memtrace's stderr.
        let (report, stderr) = top.finish()?;
        Ok((Timing::find(&stderr, &name)?, report))
    }
}

/// The range of `bytes` over the reports: `N`, or `MIN–MAX`.
pub(crate) fn range(reports: &[TopReport], bytes: impl Fn(&TopReport) -> u64) -> String {
    let values: Vec<u64> = reports.iter().map(bytes).collect();
    match (values.iter().min(), values.iter().max()) {
        (Some(min), Some(max)) if min == max => format!("{min}"),
        (Some(min), Some(max)) => format!("{min}–{max}"),
        _ => "—".to_owned(),
    }
}

/// Wall and CPU time untraced and traced (as `label`), the CPU cost, and the extra CPU per
/// one of `events` (`per`, e.g. "populated page").
pub(crate) fn cost_table(runs: &Runs, label: &str, per: &str, events: u64) -> Result<String> {
    let wall = |t: &[Timing]| Spread::of(&t.iter().map(|t| t.wall_ns).collect::<Vec<_>>());
    let cpu = |t: &[Timing]| Spread::of(&t.iter().map(|t| t.cpu_ns).collect::<Vec<_>>());
    let mut table = String::new();
    writeln!(
        table,
        "| mode | wall ms | CPU ms | CPU cost | extra CPU per {per} |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: | ---: |")?;
    let base = cpu(&runs.untraced).mean;
    for (label, timings, is_traced) in [
        ("untraced", &runs.untraced, false),
        (label, &runs.traced, true),
    ] {
        let extra = cpu(timings).mean - base;
        let (cost, per_event) = if is_traced {
            (
                format!("{:+.1} %", extra / base * 100.0),
                format!("{:.2} µs", extra / events as f64 / 1000.0),
            )
        } else {
            ("—".to_owned(), "—".to_owned())
        };
        writeln!(
            table,
            "| {label} | {} | {} | {cost} | {per_event} |",
            plus_minus(wall(timings), 1e-6, 1),
            plus_minus(cpu(timings), 1e-6, 1),
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_programs_timing() {
        let stderr = "memtrace: counting the page faults\n\
                      pages: 4000 rounds in 177917269 ns wall 139286968 ns cpu\n";
        assert_eq!(
            Timing::find(stderr, "pages").unwrap(),
            Timing {
                wall_ns: 177917269.0,
                cpu_ns: 139286968.0
            }
        );
        assert!(Timing::find(stderr, "mapped").is_err());
        assert!(Timing::find("memtrace: error\n", "pages").is_err());
        assert!(Timing::find("pages: 4000 rounds in x ns wall 1 ns cpu", "pages").is_err());
        assert!(Timing::find("pages: 4000 rounds\n", "pages").is_err());
    }
}
