//! The agent's benchmarks, run by `cargo xtask bench` after the overhead table:
//!
//! 1. `/metrics` on a big node: the scrape benchmark (`memtrace/benches/scrape.rs`,
//!    criterion) renders and serves 1,000 containers of synthetic state.
//! 2. The agent's own cost: `memtrace agent` tracing 1, 10 and 100 copies of a small C
//!    churn program, each in a cgroup of its own under a parent cgroup this benchmark
//!    creates (and removes), for its CPU, its resident memory, and the latency of real
//!    scrapes over HTTP.
//!
//! Both tables are printed and written to `target/bench-agent.md`. Every wait is bounded,
//! and the processes and cgroups a run creates are removed when it ends, also on error.
use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};

/// Traced process counts, one agent run each.
const PROCESS_COUNTS: &[usize] = &[1, 10, 100];
/// The agent's settings during the measurement.
const INTERVAL: &str = "2s";
const WINDOW: &str = "2m";
/// Each churn process makes `ALLOCS_PER_BATCH` allocations, then sleeps `BATCH_SLEEP_US`:
/// at most 500 allocations (and as many frees) a second per process. Traced, a pair of this
/// workload costs about 10 µs of the process's CPU (cold caches after each sleep, deeper
/// stacks than the overhead benchmark's), so 100 processes take about half of one of the 2
/// CPUs this was written on and leave the agent room: its numbers are then its own, not
/// CPU contention (at 2,000 a second, 100 processes saturated both CPUs).
const ALLOCS_PER_BATCH: u32 = 20;
const BATCH_SLEEP_US: u32 = 40_000;
/// One allocation in this many is never freed (a slow, steady leak).
const LEAK_EVERY: u32 = 1_000;
/// How long processes may take to be in their cgroups and to have exec'd the churn binary.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to attach to every process.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(180);
/// Ticks left to the agent after it attached to every process, before measuring.
const WARM_UP: Duration = Duration::from_secs(4);
/// The measurement: CPU and memory over this long, one scrape a second meanwhile.
const MEASURE: Duration = Duration::from_secs(20);
const SCRAPES: u32 = 20;
/// How long the agent may take to exit after SIGTERM before it is killed, and then after
/// SIGKILL. Closing thousands of uprobe perf events takes the kernel minutes (an RCU grace
/// period or more each), and a killed agent takes as long to exit as a stopped one.
const STOP_TIMEOUT: Duration = Duration::from_secs(400);
const KILL_TIMEOUT: Duration = Duration::from_secs(400);
/// How long a cgroup may take to become removable after its processes were killed.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the cgroups this benchmark creates, directly under the cgroup v2 mount.
const CGROUP_PREFIX: &str = "memtrace-bench-";

/// The traced workload: malloc/free churn of 16–4096-byte blocks from a few call sites,
/// a live set of 256 blocks, and a small leak from its own call site.
const CHURN_C: &str = r#"/* memtrace agent benchmark workload (written by `cargo xtask bench`).
 * usage: churn ALLOCS_PER_BATCH SLEEP_US LEAK_EVERY */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 256

struct leaked { struct leaked *next; };

static void *slots[SLOTS];
static struct leaked *leaks;
static uint64_t state = 0x2545f4914f6cdd1dull;

static uint64_t next_random(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

/* Each writes to its block, which also keeps the call from becoming a tail call. */
__attribute__((noinline)) char *alloc_small(void) {
    char *p = malloc(16 + next_random() % 241);
    if (p) p[0] = 1;
    return p;
}

__attribute__((noinline)) char *alloc_medium(void) {
    char *p = malloc(256 + next_random() % 769);
    if (p) p[0] = 2;
    return p;
}

__attribute__((noinline)) char *alloc_large(void) {
    char *p = malloc(1024 + next_random() % 3073);
    if (p) p[0] = 3;
    return p;
}

__attribute__((noinline)) char *parse_request(void) {
    char *p = (next_random() & 1) ? alloc_small() : alloc_medium();
    if (p) p[1] = 4;
    return p;
}

__attribute__((noinline)) char *build_response(void) {
    char *p = (next_random() & 1) ? alloc_medium() : alloc_large();
    if (p) p[1] = 5;
    return p;
}

__attribute__((noinline)) void leak_session(void) {
    struct leaked *p = malloc(64 + next_random() % 449);
    if (!p) return;
    p->next = leaks;
    leaks = p;
}

int main(int argc, char **argv) {
    long per_batch = argc > 1 ? atol(argv[1]) : 20;
    long sleep_us = argc > 2 ? atol(argv[2]) : 10000;
    long leak_every = argc > 3 ? atol(argv[3]) : 1000;
    if (per_batch < 1) per_batch = 1;
    if (leak_every < 1) leak_every = 1;
    state ^= (uint64_t)getpid() * 0x9e3779b97f4a7c15ull;
    struct timespec pause = { sleep_us / 1000000, (sleep_us % 1000000) * 1000 };
    uint64_t n = 0;
    for (;;) {
        for (long i = 0; i < per_batch; i++, n++) {
            unsigned slot = next_random() % SLOTS;
            free(slots[slot]);
            switch (n % 4) {
            case 0: slots[slot] = parse_request(); break;
            case 1: slots[slot] = build_response(); break;
            case 2: slots[slot] = alloc_small(); break;
            default: slots[slot] = alloc_large(); break;
            }
            if (n % leak_every == 0) leak_session();
        }
        nanosleep(&pause, NULL);
    }
}
"#;

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let machine = crate::bench::machine();
    let scrape = scrape_table(root, target_dir)?;

    println!("xtask: building memtrace (release) for the agent benchmark");
    crate::run_cmd(crate::cargo(root).args(["build", "--release", "-p", "memtrace"]))?;
    let memtrace = target_dir.join("release/memtrace");
    let bench_dir = target_dir.join("bench");
    std::fs::create_dir_all(&bench_dir)
        .with_context(|| format!("creating {}", bench_dir.display()))?;
    let churn = compile_churn(&bench_dir)?;
    let mount = cgroup2_mount()?;
    remove_stale_cgroups(&mount);

    let mut rows = Vec::new();
    for &processes in PROCESS_COUNTS {
        println!("xtask: agent benchmark: tracing {processes} process(es)");
        let mut run = Run::new(&mount, processes)?;
        let measured = run.measure(&memtrace, &churn, &bench_dir, processes);
        let leftovers = run.teardown();
        let row = measured?;
        if !leftovers.is_empty() {
            bail!("could not clean up: {}", leftovers.join("; "));
        }
        rows.push(row);
    }
    verify_nothing_left(&mount)?;

    let agent = agent_table(&rows)?;
    println!();
    println!("/metrics with 1,000 containers of synthetic state ({machine}):");
    println!();
    print!("{scrape}");
    println!();
    println!("The agent tracing 1, 10 and 100 processes ({machine}):");
    println!();
    print!("{agent}");
    println!();
    print!("{}", agent_notes());

    let markdown = format!(
        "`/metrics` with 1,000 containers of synthetic state (5 per-container series and the \
         top 5 stacks' suspicion and growth each), measured by `cargo xtask bench` \
         ({machine}):\n\n{scrape}\nThe agent (`--interval {INTERVAL} --window {WINDOW}`) \
         tracing 1, 10 and 100 processes, one cgroup each, measured by `cargo xtask bench` \
         ({machine}):\n\n{agent}\n{}",
        agent_notes()
    );
    let report = target_dir.join("bench-agent.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: agent tables written to {}", report.display());
    Ok(())
}

fn agent_notes() -> String {
    let rate = ALLOCS_PER_BATCH as u64 * 1_000_000 / BATCH_SLEEP_US as u64;
    format!(
        "Each traced process makes up to {rate} allocations (16–4096 bytes) and as many \
         frees a second from five call sites, and leaks one block in {LEAK_EVERY}. Agent CPU \
         is its user + system time over {secs} s (one scrape a second included), in % of one \
         core; RSS is at the end of that, peak RSS (VmHWM) since the agent started; scrape \
         times are whole `GET /metrics` requests on loopback (new connection each); tracked \
         stacks are `memtrace_bpf_map_entries{{map=\"usage\"}}`. The BPF programs run in the \
         traced processes, not in the agent: their cost is in the workload CPU column (all \
         traced processes together, % of one core), not in the agent's. Agent stop is from \
         SIGTERM to its exit with the workload still running: mostly the kernel closing one \
         uprobe perf event per probe and process.\n",
        secs = MEASURE.as_secs()
    )
}

// ---------------------------------------------------------------------------------------
// /metrics with 1,000 containers (criterion)

const SCRAPE_GROUP: &str = "scrape";
const SCRAPE_FUNCTIONS: &[(&str, &str)] = &[
    ("render", "`Metrics::render()` (the body)"),
    ("http_get", "`GET /metrics` over loopback HTTP"),
];

fn scrape_table(root: &Path, target_dir: &Path) -> Result<String> {
    let criterion_dir = target_dir.join("criterion");
    let out = target_dir.join("bench/scrape.txt");
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    let _ = std::fs::remove_file(&out);
    // Results older than this run are not this run's.
    let started = SystemTime::now() - Duration::from_secs(1);
    crate::run_cmd(
        crate::cargo(root)
            .args(["bench", "-p", "memtrace", "--bench", "scrape"])
            .env("CRITERION_HOME", &criterion_dir)
            .env("MEMTRACE_SCRAPE_BENCH_OUT", &out),
    )?;
    let facts = std::fs::read_to_string(&out)
        .with_context(|| format!("the scrape benchmark wrote no {}", out.display()))?;
    let fact = |key: &str| -> Result<u64> {
        facts
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .with_context(|| format!("no {key} in {}", out.display()))
    };
    let series = fact("series ")?;
    let body_bytes = fact("body_bytes ")?;

    let mut table = String::new();
    writeln!(table, "| scrape | per scrape (ms) | 95% CI (ms) | body |")?;
    writeln!(table, "| --- | ---: | ---: | ---: |")?;
    for (function, title) in SCRAPE_FUNCTIONS {
        let path = criterion_dir
            .join(SCRAPE_GROUP)
            .join(function)
            .join("new/estimates.json");
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .with_context(|| format!("{function}: no criterion result at {}", path.display()))?;
        if modified < started {
            bail!("{function}: {} is from an earlier run", path.display());
        }
        let json = std::fs::read_to_string(&path)?;
        let crate::bench::Mean {
            point_ns: point,
            lower_ns: lower,
            upper_ns: upper,
        } = crate::bench::Mean::parse(&json)
            .with_context(|| format!("reading the mean from {}", path.display()))?;
        writeln!(
            table,
            "| {title} | {:.2} | {:.2}–{:.2} | {series} series, {:.2} MiB |",
            point / 1e6,
            lower / 1e6,
            upper / 1e6,
            body_bytes as f64 / (1024.0 * 1024.0)
        )?;
    }
    Ok(table)
}

// ---------------------------------------------------------------------------------------
// The agent tracing N processes

struct Row {
    processes: usize,
    agent_cpu_percent: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
    scrape_median_ms: f64,
    scrape_max_ms: f64,
    scrape_body_bytes: usize,
    tracked_stacks: u64,
    probes: u64,
    workload_cpu_percent: f64,
    /// From SIGTERM to the agent's exit, the workload still running.
    stop_seconds: f64,
}

fn agent_table(rows: &[Row]) -> Result<String> {
    let mut table = String::new();
    writeln!(
        table,
        "| processes | agent CPU % | RSS MiB | peak RSS MiB | scrape ms (median) | \
         scrape ms (max) | /metrics KiB | tracked stacks | probes | workload CPU % | \
         agent stop s |"
    )?;
    writeln!(
        table,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for row in rows {
        writeln!(
            table,
            "| {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {} | {} | {:.1} | {:.1} |",
            row.processes,
            row.agent_cpu_percent,
            row.rss_kib as f64 / 1024.0,
            row.peak_rss_kib as f64 / 1024.0,
            row.scrape_median_ms,
            row.scrape_max_ms,
            row.scrape_body_bytes as f64 / 1024.0,
            row.tracked_stacks,
            row.probes,
            row.workload_cpu_percent,
            row.stop_seconds,
        )?;
    }
    Ok(table)
}

/// The processes and cgroups of one measurement; `teardown` (or dropping it) removes them.
struct Run {
    /// The parent cgroup, first, then one per process.
    cgroups: Vec<PathBuf>,
    /// The parent's path relative to the mount.
    relative: String,
    churns: Vec<Child>,
    agent: Option<Child>,
}

impl Run {
    fn new(mount: &Path, processes: usize) -> Result<Self> {
        let relative = format!("{CGROUP_PREFIX}{}-n{processes}", std::process::id());
        let parent = mount.join(&relative);
        std::fs::create_dir(&parent)
            .with_context(|| format!("creating cgroup {}", parent.display()))?;
        Ok(Self {
            cgroups: vec![parent],
            relative,
            churns: Vec::new(),
            agent: None,
        })
    }

    fn measure(
        &mut self,
        memtrace: &Path,
        churn: &Path,
        bench_dir: &Path,
        processes: usize,
    ) -> Result<Row> {
        for i in 0..processes {
            let dir = self.cgroups[0].join(format!("p{i}"));
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            self.cgroups.push(dir.clone());
            let child = Command::new("sh")
                .arg("-c")
                .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" "$3" "$4" "$5""#)
                .arg("sh")
                .arg(&dir)
                .arg(churn)
                .arg(ALLOCS_PER_BATCH.to_string())
                .arg(BATCH_SLEEP_US.to_string())
                .arg(LEAK_EVERY.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a churn process")?;
            self.churns.push(child);
        }
        self.wait_for_churns()?;

        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log_path = bench_dir.join(format!("agent-{processes}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let agent = Command::new(memtrace)
            .arg("agent")
            .args(["--cgroup", &format!("{}/*", self.relative)])
            .args(["--interval", INTERVAL, "--window", WINDOW])
            // The agent's cost with every process traced: probes on from the start, and
            // no CPU budget to let go of the churn processes (their probes cost them ~50 %).
            .args(["--probes", "always", "--max-overhead", "0"])
            .args(["--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", memtrace.display()))?;
        let agent_pid = agent.id();
        self.agent = Some(agent);

        let attach_started = Instant::now();
        loop {
            if let Some(status) = self.agent.as_mut().expect("started").try_wait()? {
                bail!(
                    "the agent exited ({status}) before tracing {processes} processes:\n{}",
                    log_tail(&log_path)
                );
            }
            let traced = scrape(addr)
                .ok()
                .and_then(|(_, body)| metric(&body, "memtrace_traced_processes"));
            if traced == Some(processes as f64) {
                break;
            }
            if attach_started.elapsed() > ATTACH_TIMEOUT {
                bail!(
                    "the agent traced {traced:?} of {processes} processes after {:?}:\n{}",
                    ATTACH_TIMEOUT,
                    log_tail(&log_path)
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
        println!(
            "xtask: the agent traces all {processes} after {:.1} s; measuring for {} s",
            attach_started.elapsed().as_secs_f64(),
            MEASURE.as_secs()
        );
        thread::sleep(WARM_UP);

        let ticks = clock_ticks();
        let churn_pids: Vec<u32> = self.churns.iter().map(Child::id).collect();
        let agent_cpu_start = cpu_ticks(agent_pid)?;
        let workload_cpu_start = churn_pids
            .iter()
            .filter_map(|&p| cpu_ticks(p).ok())
            .sum::<u64>();
        let start = Instant::now();
        let mut latencies = Vec::new();
        let mut last_body = String::new();
        for i in 0..SCRAPES {
            let due = start + MEASURE * (2 * i + 1) / (2 * SCRAPES);
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let (took, body) = scrape(addr).context("scraping the agent")?;
            latencies.push(took.as_secs_f64() * 1000.0);
            last_body = body;
        }
        thread::sleep((start + MEASURE).saturating_duration_since(Instant::now()));
        let elapsed = start.elapsed().as_secs_f64();
        let agent_cpu = cpu_ticks(agent_pid)? - agent_cpu_start;
        let workload_cpu = churn_pids
            .iter()
            .filter_map(|&p| cpu_ticks(p).ok())
            .sum::<u64>()
            - workload_cpu_start;
        let rss_kib = status_kib(agent_pid, "VmRSS")?;
        let peak_rss_kib = status_kib(agent_pid, "VmHWM")?;

        let traced = metric(&last_body, "memtrace_traced_processes");
        if traced != Some(processes as f64) {
            bail!("the agent traced {traced:?} processes at the end, not {processes}");
        }
        let tracked_stacks = metric(&last_body, r#"memtrace_bpf_map_entries{map="usage"}"#)
            .context("no memtrace_bpf_map_entries{map=\"usage\"} in /metrics")?
            as u64;
        let probes = metric(&last_body, "memtrace_attached_probes").unwrap_or(0.0) as u64;
        println!("xtask: stopping the agent ({probes} probes attached)");
        let stop_seconds = self.stop_agent()?.as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        let median = (latencies[latencies.len() / 2 - 1] + latencies[latencies.len() / 2]) / 2.0;
        let percent = |t: u64| t as f64 / ticks as f64 / elapsed * 100.0;
        Ok(Row {
            processes,
            agent_cpu_percent: percent(agent_cpu),
            rss_kib,
            peak_rss_kib,
            scrape_median_ms: median,
            scrape_max_ms: *latencies.last().expect("scraped"),
            scrape_body_bytes: last_body.len(),
            tracked_stacks,
            probes,
            workload_cpu_percent: percent(workload_cpu),
            stop_seconds,
        })
    }

    /// Stops the agent with SIGTERM (so it detaches), SIGKILL if it does not exit in time;
    /// returns how long it took to exit.
    fn stop_agent(&mut self) -> Result<Duration> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(Duration::ZERO);
        };
        let pid = agent.id();
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let mut deadline = started + STOP_TIMEOUT;
        let mut killed = false;
        loop {
            if agent.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                if killed {
                    bail!(
                        "the agent (pid {pid}) did not exit {:?} after SIGKILL",
                        KILL_TIMEOUT
                    );
                }
                eprintln!(
                    "xtask: the agent (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?}; killing it"
                );
                let _ = agent.kill();
                killed = true;
                deadline = Instant::now() + KILL_TIMEOUT;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every churn process is in its cgroup and runs the churn binary.
    fn wait_for_churns(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            let mut pending = 0;
            for (child, dir) in self.churns.iter_mut().zip(&self.cgroups[1..]) {
                if let Some(status) = child.try_wait()? {
                    bail!("a churn process exited early: {status}");
                }
                let pid = child.id().to_string();
                let in_cgroup = std::fs::read_to_string(dir.join("cgroup.procs"))
                    .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid));
                let exec_done = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "churn");
                if !(in_cgroup && exec_done) {
                    pending += 1;
                }
            }
            if pending == 0 {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "{pending} churn processes not running in their cgroups after {START_TIMEOUT:?}"
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent if it still runs, kills the churn processes and removes the cgroups.
    /// Returns what could not be stopped or removed.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.stop_agent() {
            problems.push(format!("{e:#}"));
        }
        for child in &mut self.churns {
            let _ = child.kill();
        }
        for mut child in self.churns.drain(..) {
            let _ = child.wait();
        }
        // Children first, the parent last.
        for dir in self.cgroups.drain(..).rev() {
            if let Err(e) = remove_cgroup(&dir) {
                problems.push(e);
            }
        }
        problems
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for problem in self.teardown() {
            eprintln!("xtask: {problem}");
        }
    }
}

/// Removes a cgroup this benchmark made: kills what is still in it (only our processes
/// are) and retries rmdir until the kernel lets go of it.
pub(crate) fn remove_cgroup(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    loop {
        let populated = std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| !procs.trim().is_empty());
        if populated {
            // cgroup v2 (Linux 5.14+): SIGKILL everything in the cgroup.
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot remove cgroup {}: {e}", dir.display()));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Removes cgroups left by an earlier run of this benchmark that was killed (its xtask
/// process is gone).
pub(crate) fn remove_stale_cgroups(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(CGROUP_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if owner == std::process::id().to_string() || Path::new("/proc").join(owner).exists() {
            continue;
        }
        eprintln!("xtask: removing the stale cgroup {name}");
        let parent = entry.path();
        if let Ok(children) = std::fs::read_dir(&parent) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                if let Err(e) = remove_cgroup(&child.path()) {
                    eprintln!("xtask: {e}");
                }
            }
        }
        if let Err(e) = remove_cgroup(&parent) {
            eprintln!("xtask: {e}");
        }
    }
}

/// Fails when a churn process or a cgroup of this run is still there.
fn verify_nothing_left(mount: &Path) -> Result<()> {
    let ours = format!("{CGROUP_PREFIX}{}-", std::process::id());
    let cgroups: Vec<String> = std::fs::read_dir(mount)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&ours))
        .collect();
    if !cgroups.is_empty() {
        bail!("cgroups left behind: {}", cgroups.join(", "));
    }
    let churns = Command::new("pgrep")
        .args(["-x", "churn"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if !churns.is_empty() {
        bail!("churn processes left behind: {}", churns.replace('\n', " "));
    }
    Ok(())
}

pub(crate) fn compile_churn(bench_dir: &Path) -> Result<PathBuf> {
    let source = bench_dir.join("churn.c");
    let binary = bench_dir.join("churn");
    std::fs::write(&source, CHURN_C).with_context(|| format!("writing {}", source.display()))?;
    crate::run_cmd(
        Command::new("cc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&binary)
            .arg(&source),
    )?;
    Ok(binary)
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
pub(crate) fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 file system in /proc/self/mountinfo: the agent benchmark needs it")
}

/// A loopback port nobody listens on now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `GET /metrics` on a new connection: how long it took and the body.
pub(crate) fn scrape(addr: SocketAddr) -> Result<(Duration, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let took = started.elapsed();
    let response = String::from_utf8(response).context("a response that is not UTF-8")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an incomplete response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "/metrics answered {:?}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok((took, body.to_owned()))
}

/// The value of the sample `name` (with its labels, if any) in a text exposition.
pub(crate) fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// utime + stime of a process (all its threads), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at field 3, the state.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc/PID/stat without a command")?
        .1
        .split_whitespace()
        .collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// A `kB` line of /proc/PID/status.
pub(crate) fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_and_without_labels() {
        let body = "# HELP x\nmemtrace_traced_processes 10\n\
                    memtrace_bpf_map_entries{map=\"allocs\"} 7\n\
                    memtrace_bpf_map_entries{map=\"usage\"} 42\n";
        assert_eq!(metric(body, "memtrace_traced_processes"), Some(10.0));
        assert_eq!(
            metric(body, r#"memtrace_bpf_map_entries{map="usage"}"#),
            Some(42.0)
        );
        assert_eq!(metric(body, "memtrace_traced"), None);
    }

    #[test]
    fn reads_cpu_ticks_of_this_process() {
        assert!(cpu_ticks(std::process::id()).is_ok());
    }
}
