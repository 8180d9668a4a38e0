//! `cargo xtask soak [--duration 30m]`: the agent under churn for a long time, watched
//! for a leak of its own.
//!
//! Ten processes of the agent benchmark's workload (malloc/free churn from a few call
//! sites and a small leak) run in cgroups the agent follows; every few seconds the oldest
//! is killed and its cgroup removed, and a new one starts in a new cgroup, so the agent
//! keeps attaching, detaching, creating and retiring series. Every sample period the
//! agent's RSS, open file descriptors and what it reports are recorded; the table goes to
//! stdout and `target/soak.md`. The run fails if the agent dies or its fds grow.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::bench_agent::{
    cgroup2_mount, compile_churn, free_port, log_tail, metric, remove_cgroup, remove_stale_cgroups,
    scrape, status_kib,
};

const PROCESSES: usize = 10;
/// One process is replaced this often.
const REPLACE_EVERY: Duration = Duration::from_secs(6);
const SAMPLES: u32 = 12;
const INTERVAL: &str = "2s";
const WINDOW: &str = "5m";
/// The workload's arguments: 20 allocations per 40 ms batch, one leak per 1000.
const WORKLOAD_ARGS: [&str; 3] = ["20", "40000", "1000"];

struct Sample {
    minute: f64,
    rss_kib: u64,
    fds: usize,
    traced: f64,
    probes: f64,
    series: usize,
    replaced: usize,
}

/// One churn process in its own cgroup.
struct Worker {
    cgroup: PathBuf,
    child: Child,
}

pub fn run(root: &Path, duration: Duration) -> Result<()> {
    println!("xtask: building memtrace (release) for the soak");
    crate::run_cmd(crate::cargo(root).args(["build", "--release", "-p", "memtrace"]))?;
    let target = root.join("target");
    let memtrace = target.join("release/memtrace");
    let dir = target.join("soak");
    std::fs::create_dir_all(&dir)?;
    let churn = compile_churn(&dir)?;
    let mount = cgroup2_mount()?;
    remove_stale_cgroups(&mount);
    // `memtrace-bench-<pid>-...`: what remove_stale_cgroups (of any bench run) recognizes as live.
    let relative = format!("memtrace-bench-{}-soak", std::process::id());
    let parent = mount.join(&relative);
    std::fs::create_dir(&parent).with_context(|| format!("creating {}", parent.display()))?;

    let mut workers: Vec<Worker> = Vec::new();
    let mut agent: Option<Child> = None;
    let result = soak(
        &memtrace,
        &churn,
        &dir,
        &parent,
        &relative,
        duration,
        &mut workers,
        &mut agent,
    );
    if let Some(mut agent) = agent {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let mut leftovers = Vec::new();
    for mut worker in workers {
        let _ = worker.child.kill();
        let _ = worker.child.wait();
        if let Err(e) = remove_cgroup(&worker.cgroup) {
            leftovers.push(e);
        }
    }
    if let Err(e) = remove_cgroup(&parent) {
        leftovers.push(e);
    }
    let samples = result?;
    if !leftovers.is_empty() {
        bail!("could not clean up: {}", leftovers.join("; "));
    }
    let table = table(&samples, duration);
    print!("{table}");
    std::fs::write(target.join("soak.md"), &table)?;
    let (first, last) = (&samples[1], samples.last().expect("samples"));
    if last.fds > first.fds + 8 {
        bail!("the agent's fds grew from {} to {}", first.fds, last.fds);
    }
    Ok(())
}

#[expect(clippy::too_many_arguments, reason = "one call, with what run() owns")]
fn soak(
    memtrace: &Path,
    churn: &Path,
    dir: &Path,
    parent: &Path,
    relative: &str,
    duration: Duration,
    workers: &mut Vec<Worker>,
    agent: &mut Option<Child>,
) -> Result<Vec<Sample>> {
    let mut started = 0usize;
    let mut start_worker = |workers: &mut Vec<Worker>| -> Result<()> {
        let cgroup = parent.join(format!("w{started}"));
        started += 1;
        std::fs::create_dir(&cgroup)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" "$3" "$4" "$5""#)
            .arg("sh")
            .arg(&cgroup)
            .arg(churn)
            .args(WORKLOAD_ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        workers.push(Worker { cgroup, child });
        Ok(())
    };
    for _ in 0..PROCESSES {
        start_worker(workers)?;
    }

    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(memtrace)
        .arg("agent")
        .args(["--cgroup", &format!("{relative}/*")])
        .args(["--interval", INTERVAL, "--window", WINDOW])
        // Every worker probed from its start (not only once escalated), and none detached
        // for its budget: the most attaching and detaching the agent can be asked to do.
        .args(["--probes", "always", "--max-overhead", "0"])
        .args(["--listen", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let pid = child.id();
    *agent = Some(child);

    // Started when it serves and traces every worker.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = agent.as_mut().expect("started").try_wait()? {
            bail!("the agent exited ({status}):\n{}", log_tail(&log_path));
        }
        let traced = scrape(addr)
            .ok()
            .and_then(|(_, body)| metric(&body, "memtrace_traced_processes"));
        if traced == Some(PROCESSES as f64) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent traced {traced:?} of {PROCESSES} after 120 s");
        }
        thread::sleep(Duration::from_millis(250));
    }
    println!(
        "xtask: soak for {} min: {PROCESSES} churning processes, one replaced every {} s",
        duration.as_secs() / 60,
        REPLACE_EVERY.as_secs()
    );
    let begin = Instant::now();
    let mut samples = Vec::new();
    let mut replaced = 0usize;
    let mut next_replace = begin + REPLACE_EVERY;
    for i in 0..=SAMPLES {
        let due = begin + duration * i / SAMPLES;
        while Instant::now() < due {
            if let Some(status) = agent.as_mut().expect("started").try_wait()? {
                bail!("the agent exited ({status}):\n{}", log_tail(&log_path));
            }
            if Instant::now() >= next_replace {
                let mut oldest = workers.remove(0);
                let _ = oldest.child.kill();
                let _ = oldest.child.wait();
                remove_cgroup(&oldest.cgroup).map_err(anyhow::Error::msg)?;
                start_worker(workers)?;
                replaced += 1;
                next_replace += REPLACE_EVERY;
            }
            thread::sleep(Duration::from_millis(200).min(due - Instant::now().min(due)));
        }
        let (_, body) = scrape(addr).context("scraping the agent")?;
        let sample = Sample {
            minute: begin.elapsed().as_secs_f64() / 60.0,
            rss_kib: status_kib(pid, "VmRSS")?,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
            traced: metric(&body, "memtrace_traced_processes").unwrap_or(-1.0),
            probes: metric(&body, "memtrace_attached_probes").unwrap_or(-1.0),
            series: body
                .lines()
                .filter(|l| l.starts_with("memtrace_") && !l.starts_with('#'))
                .count(),
            replaced,
        };
        println!(
            "xtask: soak {:.1} min: RSS {:.1} MiB, {} fds, {} traced",
            sample.minute,
            sample.rss_kib as f64 / 1024.0,
            sample.fds,
            sample.traced
        );
        samples.push(sample);
    }
    Ok(samples)
}

fn table(samples: &[Sample], duration: Duration) -> String {
    let mut out = format!(
        "Agent soak: {} min, {PROCESSES} churning processes (one replaced, in a new cgroup, \
         every {} s), `--interval {INTERVAL} --window {WINDOW}`:\n\n\
         | minute | RSS MiB | open fds | traced | probes | memtrace_* series | processes replaced |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        duration.as_secs() / 60,
        REPLACE_EVERY.as_secs()
    );
    for s in samples {
        out.push_str(&format!(
            "| {:.1} | {:.1} | {} | {} | {} | {} | {} |\n",
            s.minute,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.traced,
            s.probes,
            s.series,
            s.replaced
        ));
    }
    out
}
