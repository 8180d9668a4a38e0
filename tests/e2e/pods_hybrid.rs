//! Hybrid hosts whose kubelet uses the cgroupfs driver (issue 5): container cgroups exist
//! only in v1 hierarchies, and every container process shares one v2 cgroup (the one BPF
//! sees). The test mounts a named v1 hierarchy of its own (`name=memtrace-e2e-<pid>`, no
//! controller; `<pid>-<test>` in fact), creates kubelet cgroupfs-style container cgroups in it
//! (`/kubepods/burstable/pod<UID>/<ID>`), and moves two fixture processes into two of
//! them while both stay in the same v2 cgroup: exactly the hybrid case. Their series must
//! be apart and labelled by their pods, in the exact tier (outstanding bytes) and in the
//! always-on tier (anonymous memory, populated bytes: the processes are watched one by one,
//! not through their shared v2 cgroup).
//!
//! The hierarchy has no controller, so the agent's anonymous memory comes from the
//! processes' `RssAnon` here (the v1 memory controller's `memory.stat` is used when the
//! container is in it; that parse is a unit test). Everything is unmounted and removed at
//! the end, also on failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::pods_util::*;
use crate::util::*;

const FEW_INTERVALS: Duration = Duration::from_secs(15);
const MIB: f64 = 1024.0 * 1024.0;

/// A named cgroup v1 hierarchy mounted by the test. Dropping it kills the processes still
/// in its cgroups (only the test's can be there), removes them, unmounts it and makes sure
/// the kernel let go of the hierarchy.
struct V1Hierarchy {
    name: String,
    dir: PathBuf,
    /// Created cgroups, parents first.
    cgroups: Vec<PathBuf>,
}

impl V1Hierarchy {
    /// Mounts `name=memtrace-e2e-<pid>-<tag>` (a name of its own per test: a hierarchy the
    /// kernel is still freeing cannot be mounted again under its name).
    fn mount(tag: &str) -> V1Hierarchy {
        let name = format!("memtrace-e2e-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let hierarchy = V1Hierarchy {
            name,
            dir,
            cgroups: Vec::new(),
        };
        hierarchy.mount_once();
        hierarchy
    }

    fn mount_once(&self) {
        let status = Command::new("mount")
            .args(["-t", "cgroup", "-o"])
            .arg(format!("none,name={}", self.name))
            .arg("cgroup")
            .arg(&self.dir)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a named cgroup v1 hierarchy at {} failed ({status}): this test needs \
             cgroup v1 support in the kernel",
            self.dir.display()
        );
    }

    /// Creates `path` (and its parents) in the hierarchy.
    fn create_all(&mut self, path: &str) -> PathBuf {
        let mut dir = self.dir.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                self.cgroups.push(dir.clone());
            }
        }
        dir
    }

    fn is_listed(&self) -> bool {
        let needle = format!(":name={}:", self.name);
        std::fs::read_to_string("/proc/self/cgroup").is_ok_and(|t| t.contains(&needle))
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for V1Hierarchy {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in self.cgroups.iter().rev() {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!("warning: cannot remove {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => {}
                }
                for pid in pids_in(dir) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A hierarchy whose last cgroups are still being freed when it is unmounted stays
        // alive, unmounted: mount and unmount it again once they are gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let _ = Command::new("umount").arg(&self.dir).status();
            if !self.is_listed() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            let _ = Command::new("mount")
                .args(["-t", "cgroup", "-o"])
                .arg(format!("none,name={}", self.name))
                .arg("cgroup")
                .arg(&self.dir)
                .status();
        }
        if self.is_listed() {
            eprintln!(
                "warning: the cgroup hierarchy name={} is still there",
                self.name
            );
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Starts `shapes fixed N SIZE` in the v2 cgroup `v2` and the v1 cgroup `v1`.
fn start_hybrid(v2: &Cgroup, v1: &Path, leaks: u64, size: u64) -> Proc {
    start_fixture(
        v2,
        v1,
        "shapes",
        &["fixed", &leaks.to_string(), &size.to_string()],
    )
}

/// Starts fixture `name` in the v2 cgroup `v2` and the v1 cgroup `v1` (the shell moves
/// itself into both, then execs the fixture) and waits for its `ready` line.
fn start_fixture(v2: &Cgroup, v1: &Path, name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && echo $$ > "$1" && shift && exec "$@""#)
        .arg(v2.dir.join("cgroup.procs"))
        .arg(v1.join("cgroup.procs"))
        .arg(fixture(name))
        .args(args);
    let proc = Proc::spawn(format!("{name} in {}", v1.display()), cmd);
    proc.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    proc
}

#[test]
fn pods_hybrid_cgroupfs_containers_apart() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("hybrid");
    let shared = cgroups.create("runtime");
    let mut v1 = V1Hierarchy::mount("hybrid");
    let small = FakePod::new("shop", "web-a", &pod_uid(61), &[("app", &container_id(61))]);
    let big = FakePod::new(
        "shop",
        "web-b",
        &pod_uid(62),
        &[("worker", &container_id(62))],
    );
    let small_dir = v1.create_all(&format!(
        "kubepods/burstable/pod{}/{}",
        small.uid,
        container_id(61)
    ));
    let big_dir = v1.create_all(&format!(
        "kubepods/burstable/pod{}/{}",
        big.uid,
        container_id(62)
    ));
    let api = FakeApiServer::start(&[small.clone(), big.clone()]);

    // 160 KiB for one, 4 MiB for the other: each series must hold its own.
    let (small_bytes, big_bytes) = (40 * 4096_u64, 64 * 65536_u64);
    let a = start_hybrid(&shared, &small_dir, 40, 4096);
    let b = start_hybrid(&shared, &big_dir, 64, 65536);
    assert_eq!(
        cgroup_of(a.pid()),
        cgroup_of(b.pid()),
        "one v2 cgroup for both"
    );
    for (proc, dir) in [(&a, &small_dir), (&b, &big_dir)] {
        assert!(pids_in(dir).contains(&proc.pid()), "{}", dir.display());
        let line = std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).unwrap();
        assert!(
            line.contains(&format!(":name={}:/kubepods/burstable/pod", v1.name)),
            "{line}"
        );
    }

    let agent = start_pod_agent(&api, &[], &[]);
    agent.wait_ready();
    agent.wait_traced(2, FEW_INTERVALS);
    for proc in [&a, &b] {
        proc.signal(libc::SIGUSR1);
        proc.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
            l.starts_with("done")
        });
    }
    let series = |s: &Scrape, name: &str, pod: &FakePod| {
        pod_value(s, name, &pod.namespace, &pod.name, &pod.containers[0].0)
    };
    // The exact tier: each container's outstanding bytes are its own leak.
    let (small_out, big_out) = agent.wait_for("both containers' bytes", FEW_INTERVALS, |s| {
        let small_out = series(s, "memtrace_outstanding_bytes", &small)?;
        let big_out = series(s, "memtrace_outstanding_bytes", &big)?;
        (small_out >= small_bytes as f64 && big_out >= big_bytes as f64)
            .then_some((small_out, big_out))
    });
    let slack = (64 * 1024) as f64;
    assert!(small_out < small_bytes as f64 + slack, "{small_out}");
    assert!(big_out < big_bytes as f64 + slack, "{big_out}");
    // The always-on tier: anonymous memory and populated pages per container, from the
    // processes watched one by one (their shared v2 cgroup is not watched).
    let (small_anon, big_anon, small_pop, big_pop) =
        agent.wait_for("both containers' growth", FEW_INTERVALS, |s| {
            let small_pop = series(s, "memtrace_populated_bytes_total", &small)?;
            let big_pop = series(s, "memtrace_populated_bytes_total", &big)?;
            (small_pop >= small_bytes as f64 && big_pop >= big_bytes as f64).then_some((
                series(s, "memtrace_anon_memory_bytes", &small)?,
                series(s, "memtrace_anon_memory_bytes", &big)?,
                small_pop,
                big_pop,
            ))
        });
    assert!(
        big_anon >= big_bytes as f64 && small_anon < big_bytes as f64,
        "anonymous memory: {small_anon} (web-a), {big_anon} (web-b)"
    );
    assert!(
        small_pop < 2.0 * MIB,
        "web-a populated {small_pop} bytes: web-b's pages ({big_pop}) counted there?"
    );
    let scrape = agent.scrape();
    assert!(
        scrape.lines_of_container(&shared.label).is_empty()
            && !scrape.text.contains("container=\"cgroup-id:"),
        "series of the shared v2 cgroup\n{}",
        scrape.memtrace_lines()
    );
    for pod in [&small, &big] {
        assert_eq!(
            scrape
                .samples
                .iter()
                .filter(|s| s.name == "memtrace_outstanding_bytes" && s.label("pod") == pod.name)
                .count(),
            1,
            "{}\n{}",
            pod.name,
            scrape.memtrace_lines()
        );
    }
    // Growth sites per container, under the pods' labels.
    let growth = agent.get("/api/v1/growth").text();
    assert!(
        growth.contains("\"pod\":\"web-a\"") && growth.contains("\"pod\":\"web-b\""),
        "{growth}"
    );
    drop(agent);
    drop((a, b));
    drop(v1);
    drop(cgroups);
}

/// Escalation is per container there too: of two v1-only containers sharing one v2 cgroup,
/// only the growing one gets allocator probes (on its process alone), and the steady one
/// is never escalated.
#[test]
fn pods_hybrid_escalates_one_container() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("hybrid-escalate");
    let shared = cgroups.create("runtime");
    let mut v1 = V1Hierarchy::mount("escalate");
    let grower = FakePod::new(
        "shop",
        "grower",
        &pod_uid(71),
        &[("app", &container_id(71))],
    );
    let steady = FakePod::new(
        "shop",
        "steady",
        &pod_uid(72),
        &[("app", &container_id(72))],
    );
    let mut dirs = Vec::new();
    for (pod, n) in [(&grower, 71), (&steady, 72)] {
        dirs.push(v1.create_all(&format!(
            "kubepods/besteffort/pod{}/{}",
            pod.uid,
            container_id(n)
        )));
    }
    let api = FakeApiServer::start(&[grower.clone(), steady.clone()]);
    // 16 new pages every 20 ms (~3 MiB/s), and a process that allocates nothing more.
    let growing = start_fixture(&shared, &dirs[0], "pages", &["100000", "20"]);
    let quiet = start_hybrid(&shared, &dirs[1], 1, 64);
    assert_eq!(cgroup_of(growing.pid()), cgroup_of(quiet.pid()));

    let agent = start_pod_agent(
        &api,
        &["--probes", "escalate", "--escalate-for", "30s"],
        &[],
    );
    agent.wait_ready();
    let labels = |pod: &FakePod| {
        [
            ("namespace", "shop".to_string()),
            ("pod", pod.name.clone()),
            ("container", "app".to_string()),
        ]
    };
    let value = |s: &Scrape, name: &str, pod: &FakePod| {
        let l = labels(pod);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s.value(name, &l)
    };
    agent.wait_for(
        "the growing container escalated",
        Duration::from_secs(60),
        |s| {
            (value(s, "memtrace_escalated", &grower) == Some(1.0)
                && s.value("memtrace_traced_processes", &[]) == Some(1.0))
            .then_some(())
        },
    );
    // The exact tier counts the grower's pages (its mmaps) under its pod.
    agent.wait_for("the grower's outstanding bytes", FEW_INTERVALS, |s| {
        value(s, "memtrace_outstanding_bytes", &grower).filter(|v| *v > 0.0)
    });
    let scrape = agent.scrape();
    assert_eq!(
        value(&scrape, "memtrace_escalated", &steady),
        Some(0.0),
        "the steady container shares the grower's v2 cgroup, not its escalation\n{}",
        scrape.memtrace_lines()
    );
    assert_eq!(
        value(&scrape, "memtrace_outstanding_bytes", &steady),
        None,
        "{}",
        scrape.memtrace_lines()
    );
    assert!(
        agent
            .stderr()
            .contains(&format!("tracing pid {} (", growing.pid())),
        "{}",
        agent.stderr()
    );
    drop(agent);
    drop((growing, quiet));
    drop(v1);
    drop(cgroups);
}
