//! A plain Python request loop (`tests/fixtures/requests.py`) untraced, under the always-on
//! tier (`memtrace top --tier growth --pid`: page faults, no probe on the allocator) and
//! escalated (`memtrace top --pid`: the exact tier's allocator probes), as requests per
//! second and CPU per request.
//!
//! One Python process serves every measurement, so its warm state is the same in each.
//! Each round measures every mode once, in an order that rotates from round to round, so
//! drift (the machine is shared) falls on all modes alike; each traced mode's cost is taken
//! against the untraced measurement of its own round. Table in `target/bench-python.md`.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, channel},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::bench_tiers::{
    RequestTiming as Timing, Spread, TopRun, page_size, paired_costs, plus_minus, rotated,
};

/// Rounds; each measures every mode once.
const ROUNDS: usize = 12;
/// Each measurement runs about this long (the request count is sized to it).
const MEASURE_SECONDS: f64 = 1.0;
/// Requests of the sizing run (and of the warm-up before it).
const SIZING_REQUESTS: u64 = 3_000;
/// How long one `run` may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes the script populates (and frees) before each measurement: what both tiers must see.
const TOUCH_BYTES: u64 = 4 << 20;
/// The always-on tier may cost at most this fraction of the loop's CPU.
const ALWAYS_ON_GOAL: f64 = 0.005;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    AlwaysOn,
    Escalated,
}

const MODES: [Mode; 3] = [Mode::Untraced, Mode::AlwaysOn, Mode::Escalated];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::AlwaysOn => "always-on tier (`top --tier growth`)",
            Mode::Escalated => "escalated (`top`, allocator probes)",
        }
    }

    /// `memtrace top` arguments for this mode, if traced.
    fn top_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Untraced => None,
            Mode::AlwaysOn => Some(&["--tier", "growth"]),
            Mode::Escalated => Some(&[]),
        }
    }
}

/// Parses the script's answer `done N WALL_SECONDS CPU_SECONDS`.
fn parse_answer(line: &str) -> Result<Timing> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [done, requests, wall, cpu] = fields[..] else {
        bail!("the request loop answered {line:?}");
    };
    if done != "done" {
        bail!("the request loop answered {line:?}");
    }
    let timing = Timing {
        requests: requests.parse()?,
        wall_s: wall.parse()?,
        cpu_s: cpu.parse()?,
    };
    if timing.requests == 0 || timing.wall_s <= 0.0 || timing.cpu_s <= 0.0 {
        bail!("the request loop answered {line:?}");
    }
    Ok(timing)
}

/// The Python request loop, driven over stdin/stdout; killed and reaped when dropped.
struct RequestLoop {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pid: u32,
}

impl RequestLoop {
    fn start(python: &Path, script: &Path) -> Result<Self> {
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (send, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut this = Self {
            child,
            stdin,
            lines,
            pid: 0,
        };
        let ready = this.answer()?;
        this.pid = ready
            .strip_prefix("ready ")
            .and_then(|pid| pid.trim().parse().ok())
            .with_context(|| format!("the request loop started with {ready:?}"))?;
        Ok(this)
    }

    fn answer(&mut self) -> Result<String> {
        self.lines
            .recv_timeout(ANSWER_TIMEOUT)
            .with_context(|| format!("no answer from the request loop in {ANSWER_TIMEOUT:?}"))
    }

    fn run(&mut self, requests: u64) -> Result<Timing> {
        writeln!(self.stdin, "run {requests}")?;
        self.stdin.flush()?;
        parse_answer(&self.answer()?)
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPython 3.12 of pyenv (a shared build, like most distributions'), else the system's.
fn find_python() -> PathBuf {
    let root = Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let newest_312 = root.and_then(|root| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("3.12"))
            .map(|e| e.path().join("bin/python"))
            .filter(|python| python.exists())
            .collect();
        versions.sort();
        versions.pop()
    });
    newest_312.unwrap_or_else(|| PathBuf::from("/usr/bin/python3"))
}

fn python_version(python: &Path) -> String {
    Command::new(python)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "Python ?".to_owned())
}

/// The order of the modes in round `round`: rotated, so each comes first as often.
fn order(round: usize) -> [Mode; 3] {
    rotated(MODES, round)
}

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let memtrace = target_dir.join("release/memtrace");
    let log_dir = target_dir.join("bench");
    std::fs::create_dir_all(&log_dir)?;
    let python = find_python();
    let version = python_version(&python);
    println!(
        "xtask: Python request loop on {version} ({})",
        python.display()
    );

    let mut server = RequestLoop::start(&python, &root.join("tests/fixtures/requests.py"))?;
    server.run(SIZING_REQUESTS)?;
    let sizing = server.run(SIZING_REQUESTS)?;
    let requests = ((MEASURE_SECONDS * sizing.requests_per_second()) as u64).max(1_000);

    let mut timings: Vec<(Mode, usize, Timing)> = Vec::new();
    let mut seen: Vec<(Mode, u64)> = Vec::new();
    for round in 0..ROUNDS {
        for mode in order(round) {
            let Some(args) = mode.top_args() else {
                timings.push((mode, round, server.run(requests)?));
                continue;
            };
            let pid = server.pid.to_string();
            let mut top_args = args.to_vec();
            top_args.extend(["--pid", &pid, "--interval", "60"]);
            let mut top = TopRun::start(&memtrace, &top_args, &[], &log_dir, "python-top")?;
            top.wait_ready()?;
            let timing = server.run(requests)?;
            top.interrupt();
            let (report, _) = top.finish()?;
            // Both tiers must have seen the 4 MiB the script populated before timing.
            if report.allocated_bytes < TOUCH_BYTES {
                bail!(
                    "{}: memtrace saw {} bytes, less than the {TOUCH_BYTES} the request loop \
                     populated: it does not trace the loop",
                    mode.label(),
                    report.allocated_bytes
                );
            }
            timings.push((mode, round, timing));
            seen.push((mode, report.allocated_bytes));
        }
        println!(
            "xtask: Python request loop: round {}/{ROUNDS} done",
            round + 1
        );
    }
    drop(server);

    let table = table(&timings, &seen)?;
    let summary = summary(&timings);
    let machine = crate::bench::machine();
    println!();
    println!("Python request loop, {requests} requests per measurement ({version}, {machine}):");
    println!();
    print!("{table}");
    println!();
    print!("{summary}");
    let markdown = format!(
        "A plain Python request loop (`tests/fixtures/requests.py`, {version}), {requests} \
         requests per measurement, {ROUNDS} rounds of every mode in rotating order, measured \
         by `cargo xtask bench` ({machine}):\n\n{table}\n{summary}"
    );
    let report = target_dir.join("bench-python.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: table written to {}", report.display());
    Ok(())
}

/// The lowest CPU per request of a mode: the run least disturbed by the machine's other work.
fn best_cpu(timings: &[(Mode, usize, Timing)], mode: Mode) -> f64 {
    timings
        .iter()
        .filter(|(m, _, _)| *m == mode)
        .map(|(_, _, t)| t.cpu_us_per_request())
        .fold(f64::INFINITY, f64::min)
}

fn table(timings: &[(Mode, usize, Timing)], seen: &[(Mode, u64)]) -> Result<String> {
    let mut table = String::new();
    writeln!(
        table,
        "| mode | requests/s (wall) | CPU µs per request | best CPU µs per request | CPU cost vs untraced (same round) | cost, best vs best | memtrace saw per run |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let best_untraced = best_cpu(timings, Mode::Untraced);
    for mode in MODES {
        let of = |f: fn(&Timing) -> f64| {
            let values: Vec<f64> = timings
                .iter()
                .filter(|(m, _, _)| *m == mode)
                .map(|(_, _, t)| f(t))
                .collect();
            Spread::of(&values)
        };
        let rate = of(Timing::requests_per_second);
        let cpu = of(Timing::cpu_us_per_request);
        let best = best_cpu(timings, mode);
        let (cost, best_cost) = match mode {
            Mode::Untraced => ("—".to_owned(), "—".to_owned()),
            _ => (
                format!(
                    "{} %",
                    plus_minus(
                        Spread::of(&paired_costs(timings, mode, Mode::Untraced)),
                        100.0,
                        2
                    )
                ),
                format!("{:+.2} %", (best / best_untraced - 1.0) * 100.0),
            ),
        };
        let saw: Vec<f64> = seen
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, bytes)| *bytes as f64)
            .collect();
        let saw = match mode {
            Mode::Untraced => "—".to_owned(),
            Mode::AlwaysOn => {
                // Less the pages the script populated on purpose, outside the timed loop.
                let pages = (Spread::of(&saw).mean - TOUCH_BYTES as f64) / page_size() as f64;
                format!("{pages:.0} pages populated in the timed loop (+ the 4 MiB probe)")
            }
            Mode::Escalated => format!("{:.1} MiB allocated", Spread::of(&saw).mean / 1048576.0),
        };
        writeln!(
            table,
            "| {} | {} | {} | {best:.2} | {cost} | {best_cost} | {saw} |",
            mode.label(),
            plus_minus(rate, 1.0, 0),
            plus_minus(cpu, 1.0, 2),
        )?;
    }
    Ok(table)
}

fn summary(timings: &[(Mode, usize, Timing)]) -> String {
    let cost = Spread::of(&paired_costs(timings, Mode::AlwaysOn, Mode::Untraced));
    let (low, high) = (
        cost.mean - cost.half_interval(),
        cost.mean + cost.half_interval(),
    );
    let verdict = if high < ALWAYS_ON_GOAL {
        "goal met"
    } else if low >= ALWAYS_ON_GOAL {
        "goal missed"
    } else if cost.mean < ALWAYS_ON_GOAL {
        "goal met by the mean, but within this run's noise"
    } else {
        "goal missed by the mean, but within this run's noise"
    };
    let best = best_cpu(timings, Mode::AlwaysOn) / best_cpu(timings, Mode::Untraced) - 1.0;
    format!(
        "The always-on tier cost {:.2} % of the loop's CPU per request (mean of {} rounds, \
         each against the untraced run of its round; ~95% interval {:.2} to {:.2} %; best \
         run against best run {:+.2} %; goal < {:.1} %): {verdict}.\n",
        cost.mean * 100.0,
        cost.n,
        low * 100.0,
        high * 100.0,
        best * 100.0,
        ALWAYS_ON_GOAL * 100.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_loops_answer() {
        assert_eq!(
            parse_answer("done 20000 1.050588 0.672637").unwrap(),
            Timing {
                requests: 20000,
                wall_s: 1.050588,
                cpu_s: 0.672637
            }
        );
        assert!(parse_answer("error: unknown command 'x'").is_err());
        assert!(parse_answer("done 0 1.0 1.0").is_err());
        assert!(parse_answer("done 10 1.0").is_err());
        assert!(parse_answer("ready 10 1.0 2.0").is_err());
    }
}
