//! Probes are attached per libc *file*: processes that map the same file share one set,
//! a process whose libc is another file (a container image's own copy; here a copy of the
//! host's libc in a separate root, run through the copied loader) gets a set of its own,
//! and that set goes when its last process does.

use std::time::Duration;

use crate::agent_util::*;
use crate::pods_util::*;
use crate::util::*;

const FEW_INTERVALS: Duration = Duration::from_secs(10);

fn attached_probes(agent: &Agent) -> f64 {
    agent
        .scrape()
        .value("memtrace_attached_probes", &[])
        .unwrap_or(0.0)
}

/// The libc file a process maps.
fn mapped_libc(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn pods_one_probe_set_per_libc_file() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("libc");
    let cg = cgroups.create("app");
    let other = cgroups.create("other");
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
    ]);
    agent.wait_ready();

    // Two containers on the host's libc: one set of probes.
    let a = start_shape(&cg, &["fixed", "10", "1000"]);
    let b = start_shape(&other, &["fixed", "10", "1000"]);
    assert_eq!(mapped_libc(a.pid()), mapped_libc(b.pid()));
    agent.wait_traced(2, FEW_INTERVALS);
    let one_set = attached_probes(&agent);
    assert!(one_set > 0.0, "no probes for two traced processes");

    // A copy of libc (and of the loader that finds it) in a root of its own.
    let host_libc = mapped_libc(a.pid());
    let root = tempfile::tempdir().unwrap();
    let lib = root.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let loader = lib.join("ld-linux-x86-64.so.2");
    std::fs::copy("/lib64/ld-linux-x86-64.so.2", &loader).unwrap();
    std::fs::copy(&host_libc, lib.join("libc.so.6")).unwrap();
    let shapes = fixture("shapes");
    let c = start_in(
        &other,
        &loader,
        &[
            "--library-path",
            lib.to_str().unwrap(),
            shapes.to_str().unwrap(),
            "fixed",
            "10",
            "1000",
        ],
    );
    assert_eq!(
        mapped_libc(c.pid()),
        lib.join("libc.so.6").display().to_string(),
        "the third process must run on the copy"
    );
    agent.wait_traced(3, FEW_INTERVALS);
    agent.wait_for("a second set of probes", FEW_INTERVALS, |s| {
        (s.value("memtrace_attached_probes", &[]) == Some(2.0 * one_set)).then_some(())
    });
    // The copy's probes count: only the third process allocates.
    c.signal(libc::SIGUSR1);
    agent.wait_outstanding(&other.label, 10 * 1000, FEW_INTERVALS);

    // Its last user gone, the copy's set is detached; the shared one stays.
    drop(c);
    agent.wait_traced(2, FEW_INTERVALS);
    agent.wait_for("the copy's probes detached", FEW_INTERVALS, |s| {
        (s.value("memtrace_attached_probes", &[]) == Some(one_set)).then_some(())
    });
    drop(agent);
    drop((a, b));
}
