//! `cargo xtask bench` (Django part): the Django fixture (`tests/fixtures/django_app.py`,
//! pyenv's CPython 3.12 with Django from PyPI, served by wsgiref) untraced and under
//! `memtrace top --pid` in each tier and `--python` mode, as requests per second and the
//! server's CPU per request. Table to `target/bench-django.md`. Measured, never asserted.
//!
//! Like the request loop's benchmark (`bench_python.rs`): one server process serves every
//! measurement; each round measures every mode once, in an order that rotates from round
//! to round, and each traced mode's cost is taken against the untraced measurement of its
//! round. The CPU is the server's own (its threads' run time, which includes the time the
//! kernel spends on its traps), so the client's work and the machine's other jobs weigh
//! less than in wall time. An estimate from what memtrace counted (events per request x
//! the per-call cost `memtrace calibrate` measures) stands beside each measured cost: on
//! this shared machine, a cost below a few percent is under the noise of measurement, and
//! where the cost is large enough to measure, the estimate shows how far it falls short
//! (deep Python stacks, two traps per call with a return probe).
use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::bench_tiers::{
    RequestTiming as Timing, Spread, TopRun, page_size, paired_costs, plus_minus, rotated,
};

/// Rounds; each measures every mode once.
const ROUNDS: usize = 6;
/// An untraced measurement runs about this long (the request count is sized to it).
const MEASURE_SECONDS: f64 = 1.5;
/// Requests of the warm-up and of the sizing run.
const SIZING_REQUESTS: u64 = 500;
/// The server's own deadline: it shuts down by itself after this long.
const SERVER_SECONDS: u64 = 3600;
/// Python growth mode's goal (the CPython issue): well under 1 % of the server's CPU.
const GROWTH_GOAL: f64 = 0.01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    AlwaysOn,
    Growth,
    Escalated,
    Exact,
}

const MODES: [Mode; 5] = [
    Mode::Untraced,
    Mode::AlwaysOn,
    Mode::Growth,
    Mode::Escalated,
    Mode::Exact,
];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::AlwaysOn => "always-on tier (`--tier growth`: page faults, no probe)",
            Mode::Growth => "`--python growth --no-libc` (pool refills)",
            Mode::Escalated => "`--python growth` (+ libc's allocator: the agent escalated)",
            Mode::Exact => "`--python exact` (every object)",
        }
    }

    /// `memtrace top` arguments for this mode, if traced.
    fn top_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Untraced => None,
            Mode::AlwaysOn => Some(&["--tier", "growth"]),
            Mode::Growth => Some(&["--python", "growth", "--no-libc"]),
            Mode::Escalated => Some(&["--python", "growth"]),
            Mode::Exact => Some(&["--python", "exact"]),
        }
    }
}

/// What memtrace reported for one traced measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Seen {
    /// Allocation events (probe hits) per request; pages populated per request for the
    /// always-on tier.
    events_per_request: f64,
}

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let Some(python) = pyenv_python("3.12") else {
        println!("xtask: no pyenv CPython 3.12: the Django benchmark is skipped");
        return Ok(());
    };
    let bench_dir = target_dir.join("bench-django");
    std::fs::create_dir_all(&bench_dir)?;
    let venv_python = django_venv(&python, &bench_dir)?;
    let memtrace = target_dir.join("release/memtrace");
    if !memtrace.is_file() {
        crate::run_cmd(crate::cargo(root).args(["build", "--release", "-p", "memtrace"]))?;
    }
    let per_call_us = calibrated_alloc_us(&memtrace)?;
    let app = root.join("tests/fixtures/django_app.py");
    let server = DjangoServer::start(&venv_python, &app, &bench_dir)?;
    server.run(SIZING_REQUESTS)?;
    let sizing = server.run(SIZING_REQUESTS)?;
    let requests = ((MEASURE_SECONDS * sizing.requests_per_second()) as u64).max(200);

    let mut timings: Vec<(Mode, usize, Timing)> = Vec::new();
    let mut seen: Vec<(Mode, Seen)> = Vec::new();
    for round in 0..ROUNDS {
        for mode in order(round) {
            let Some(args) = mode.top_args() else {
                timings.push((mode, round, server.run(requests)?));
                continue;
            };
            let pid = server.pid().to_string();
            let mut top_args = args.to_vec();
            top_args.extend(["--pid", &pid, "--interval", "60"]);
            let mut top = TopRun::start(&memtrace, &top_args, &[], &bench_dir, "django-top")?;
            top.wait_ready()?;
            let timing = server.run(requests)?;
            top.interrupt();
            let (report, _) = top.finish()?;
            let events = match mode {
                Mode::AlwaysOn => report.allocated_bytes / page_size(),
                _ => report.allocations,
            };
            if events == 0 && mode != Mode::AlwaysOn {
                bail!(
                    "{}: memtrace counted no allocation in {requests} requests: it does not \
                     trace the server",
                    mode.label()
                );
            }
            timings.push((mode, round, timing));
            seen.push((
                mode,
                Seen {
                    events_per_request: events as f64 / requests as f64,
                },
            ));
        }
        println!("xtask: Django: round {}/{ROUNDS} done", round + 1);
    }
    drop(server);

    let table = table(&timings, &seen, per_call_us)?;
    let summary = summary(&timings, &seen, per_call_us);
    let markdown = format!(
        "Django fixture (CPython 3.12, wsgiref, {requests} sequential requests per measurement \
         alternating a leaking and a non-leaking view; {ROUNDS} rounds of every mode in \
         rotating order; {}), untraced and under `memtrace top --pid`:\n\n{table}\n{summary}",
        crate::bench::machine()
    );
    println!("\n{markdown}");
    let report = target_dir.join("bench-django.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: table written to {}", report.display());
    Ok(())
}

fn order(round: usize) -> [Mode; 5] {
    rotated(MODES, round)
}

/// What one probed allocator call costs here, from `memtrace calibrate --json`.
fn calibrated_alloc_us(memtrace: &Path) -> Result<f64> {
    let out = Command::new(memtrace)
        .args(["calibrate", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running memtrace calibrate")?;
    if !out.status.success() {
        bail!("memtrace calibrate failed ({})", out.status);
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("memtrace calibrate --json did not print JSON")?;
    json["cost"]["alloc_ns"]
        .as_f64()
        .map(|ns| ns / 1000.0)
        .context("memtrace calibrate --json has no cost.alloc_ns")
}

fn of_mode(timings: &[(Mode, usize, Timing)], mode: Mode, f: fn(&Timing) -> f64) -> Spread {
    let values: Vec<f64> = timings
        .iter()
        .filter(|(m, _, _)| *m == mode)
        .map(|(_, _, t)| f(t))
        .collect();
    Spread::of(&values)
}

fn events_per_request(seen: &[(Mode, Seen)], mode: Mode) -> f64 {
    let values: Vec<f64> = seen
        .iter()
        .filter(|(m, _)| *m == mode)
        .map(|(_, s)| s.events_per_request)
        .collect();
    Spread::of(&values).mean
}

/// The cost the counted probe hits come to: hits per request x the calibrated cost of one,
/// against the untraced CPU per request. (Page faults of the always-on tier cost less than
/// a probed call: ~0.6 µs each, see the page-touching benchmark; this uses the larger.)
fn estimate(
    timings: &[(Mode, usize, Timing)],
    seen: &[(Mode, Seen)],
    mode: Mode,
    per_call_us: f64,
) -> f64 {
    let untraced = of_mode(timings, Mode::Untraced, Timing::cpu_us_per_request).mean;
    events_per_request(seen, mode) * per_call_us / untraced
}

fn table(
    timings: &[(Mode, usize, Timing)],
    seen: &[(Mode, Seen)],
    per_call_us: f64,
) -> Result<String> {
    let mut table = String::new();
    writeln!(
        table,
        "| mode | requests/s (wall) | server CPU µs per request | CPU cost vs untraced (same round) | memtrace counted per request | cost estimated from the count |"
    )?;
    writeln!(table, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for mode in MODES {
        let rate = of_mode(timings, mode, Timing::requests_per_second);
        let cpu = of_mode(timings, mode, Timing::cpu_us_per_request);
        let (cost, counted, bounded) = match mode {
            Mode::Untraced => ("—".to_owned(), "—".to_owned(), "—".to_owned()),
            _ => {
                let unit = if mode == Mode::AlwaysOn {
                    "pages populated"
                } else {
                    "probe hits"
                };
                (
                    format!(
                        "{} %",
                        plus_minus(
                            Spread::of(&paired_costs(timings, mode, Mode::Untraced)),
                            100.0,
                            1
                        )
                    ),
                    format!("{:.3} {unit}", events_per_request(seen, mode)),
                    format!(
                        "{:.3} %",
                        estimate(timings, seen, mode, per_call_us) * 100.0
                    ),
                )
            }
        };
        writeln!(
            table,
            "| {} | {} | {} | {cost} | {counted} | {bounded} |",
            mode.label(),
            plus_minus(rate, 1.0, 0),
            plus_minus(cpu, 1.0, 1),
        )?;
    }
    Ok(table)
}

fn summary(timings: &[(Mode, usize, Timing)], seen: &[(Mode, Seen)], per_call_us: f64) -> String {
    let measured = Spread::of(&paired_costs(timings, Mode::Growth, Mode::Untraced));
    let estimated = estimate(timings, seen, Mode::Growth, per_call_us);
    // Where a cost is large enough to measure, how much more it came to than its estimate.
    let escalated_shortfall = Spread::of(&paired_costs(timings, Mode::Escalated, Mode::Untraced))
        .mean
        / estimate(timings, seen, Mode::Escalated, per_call_us);
    let verdict = if estimated * escalated_shortfall.max(1.0) < GROWTH_GOAL {
        "within the goal"
    } else {
        "not shown to be within the goal"
    };
    format!(
        "Python growth mode (pool refills, no libc probe): measured {:.1} ± {:.1} % of the \
         server's CPU per request (~95% interval ± {:.1} %); from what memtrace counted, \
         {:.3} refills per request x {per_call_us:.2} µs per probed call (`memtrace \
         calibrate`) = {:.3} %; the escalated mode's measured cost came to {:.1}x its \
         estimate, and growth mode's estimate times that is {:.3} % (goal < {:.0} %): \
         {verdict}.\n",
        measured.mean * 100.0,
        measured.sd * 100.0,
        measured.half_interval() * 100.0,
        events_per_request(seen, Mode::Growth),
        estimated * 100.0,
        escalated_shortfall,
        estimated * escalated_shortfall.max(1.0) * 100.0,
        GROWTH_GOAL * 100.0,
    )
}

/// The Django fixture serving on loopback; killed and reaped when dropped.
struct DjangoServer {
    child: Child,
    addr: SocketAddr,
}

impl DjangoServer {
    fn start(python: &Path, app: &Path, dir: &Path) -> Result<Self> {
        let port_file = dir.join("port");
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(python)
            .arg(app)
            .arg(&port_file)
            .arg(SERVER_SECONDS.to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the Django fixture")?;
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse()?;
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("the Django fixture exited ({status}) before serving");
            }
            if Instant::now() > deadline {
                bail!("the Django fixture wrote no port within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        server.addr.set_port(port);
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `requests` sequential requests, alternating the leaking and the non-leaking view.
    fn run(&self, requests: u64) -> Result<Timing> {
        let cpu_before = cpu_ns(self.pid())?;
        let started = Instant::now();
        for i in 0..requests {
            get(self.addr, if i % 2 == 0 { "/leak" } else { "/fine" })?;
        }
        let wall_s = started.elapsed().as_secs_f64();
        let cpu_s = (cpu_ns(self.pid())? - cpu_before) as f64 / 1e9;
        Ok(Timing {
            requests,
            wall_s,
            cpu_s,
        })
    }
}

impl Drop for DjangoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's CPU time in ns: the run time of all its threads (`/proc/PID/task/*/schedstat`),
/// which counts the kernel's work on its uprobe traps and, unlike `stat`'s ticks, to the ns.
fn cpu_ns(pid: u32) -> Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(total)
}

fn pyenv_python(minor: &str) -> Option<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| {
            let out = Command::new("pyenv").arg("root").output().ok()?;
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(minor))
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|e| e.path().join("bin").join(format!("python{minor}")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// A virtualenv with Django from PyPI, made once.
fn django_venv(python: &Path, dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let venv_python = venv.join("bin/python");
    let has_django = || {
        Command::new(&venv_python)
            .args(["-c", "import django"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_django() {
        crate::run_cmd(
            Command::new(python)
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
        )?;
        crate::run_cmd(Command::new(&venv_python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "Django>=5,<6",
        ]))?;
    }
    Ok(venv_python)
}

fn get(addr: SocketAddr, path: &str) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    if !response.starts_with(b"HTTP/1.0 200") && !response.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&response[..response.len().min(200)])
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_estimated_from_the_count() {
        let timing = |cpu_s| Timing {
            requests: 1000,
            wall_s: 1.0,
            cpu_s,
        };
        let timings = [
            (Mode::Untraced, 0, timing(1.0)),
            (Mode::Growth, 0, timing(1.1)),
            (Mode::Untraced, 1, timing(2.0)),
            (Mode::Growth, 1, timing(2.0)),
        ];
        // 1.5 ms of CPU per request untraced; 0.01 hits per request at 3 µs: 0.002 %.
        let seen = [(
            Mode::Growth,
            Seen {
                events_per_request: 0.01,
            },
        )];
        assert!((estimate(&timings, &seen, Mode::Growth, 3.0) - 0.00002).abs() < 1e-12);
    }
}
