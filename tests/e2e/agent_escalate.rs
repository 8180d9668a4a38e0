//! Escalation (`--probes escalate`): the always-on tier watches every container without
//! allocator probes; a container whose memory keeps growing gets probes for
//! `--escalate-for`, then loses them, keeping what was learned; a steady container never
//! gets any. The growth sites come from page faults, with no probe at all. An escalated
//! process gets probes of its own: no other process traps on them, while shared probes
//! (`--probes always`) also trap in the untraced users of the same libc, which memtrace
//! counts.

use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

const INTERVAL: Duration = Duration::from_millis(500);
const ESCALATE_FOR: Duration = Duration::from_secs(4);
/// The detector needs a few points of steady growth; then the window runs.
const WITHIN: Duration = Duration::from_secs(60);

#[test]
fn escalation_attaches_and_detaches_on_schedule() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("escalate");
    let grower_cg = cgroups.create("grower");
    let steady_cg = cgroups.create("steady");
    // 16 new pages every 20 ms: ~3 MiB/s of anonymous memory, for a long while.
    let _grower = start_in_cgroup(&grower_cg, "pages", &["100000", "20"]);
    // malloc and free in a hot loop, no growth: never escalated, and a process that would
    // trap on shared probes of the same libc.
    let _steady = start_in_cgroup(&steady_cg, "busy", &["1", "0", "0"]);

    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        &format!("{}ms", INTERVAL.as_millis()),
        "--window",
        "10s",
        "--probes",
        "escalate",
        "--escalate-for",
        &format!("{}s", ESCALATE_FOR.as_secs()),
    ]);
    agent.wait_ready();
    let grower = [("container", grower_cg.label.as_str())];
    let steady = [("container", steady_cg.label.as_str())];

    // Watched, not probed: the always-on tier sees both containers' memory.
    agent.wait_for("both containers watched", WITHIN, |s| {
        (s.value("memtrace_anon_memory_bytes", &grower).is_some()
            && s.value("memtrace_anon_memory_bytes", &steady).is_some())
        .then_some(())
    });
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value("memtrace_traced_processes", &[]),
        Some(0.0),
        "no process has probes before anything grows\n{}",
        scrape.memtrace_lines()
    );

    // The grower is escalated: its process gets the allocator probes.
    agent.wait_for("the growing container escalated", WITHIN, |s| {
        (s.value("memtrace_escalated", &grower) == Some(1.0)
            && s.value("memtrace_traced_processes", &[]) == Some(1.0)
            && s.value("memtrace_attached_probes", &[]).unwrap_or(0.0) > 0.0)
            .then_some(())
    });
    // The exact tier counts its leak while the window lasts.
    let scrape = agent.wait_for("exact outstanding bytes of the grower", WITHIN, |s| {
        (s.value("memtrace_outstanding_bytes", &grower)
            .unwrap_or(0.0)
            > 0.0
            && s.value("memtrace_escalated", &grower) == Some(1.0))
        .then_some(s.clone())
    });
    // Its probes are its own: the steady container's malloc loop, on the same libc file,
    // never hit them (nor did any other process of this machine).
    assert_eq!(
        scrape.value("memtrace_untraced_probe_hits_total", &[]),
        Some(0.0),
        "an escalated process's probes trap in no other process\n{}",
        scrape.memtrace_lines()
    );
    // The window ends: probes off, what was learned stays.
    agent.wait_for("the escalation window over", WITHIN, |s| {
        (s.value("memtrace_escalated", &grower) == Some(0.0)
            && s.value("memtrace_traced_processes", &[]) == Some(0.0))
        .then_some(())
    });
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value("memtrace_escalations_total", &grower),
        Some(1.0),
        "one window so far (the next one waits for the back-off)\n{}",
        scrape.memtrace_lines()
    );
    assert!(
        scrape
            .value("memtrace_outstanding_bytes", &grower)
            .unwrap_or(0.0)
            > 0.0,
        "the exact tier's numbers stay after the window\n{}",
        scrape.memtrace_lines()
    );
    assert!(
        scrape
            .value("memtrace_populated_bytes_total", &grower)
            .unwrap_or(0.0)
            > 0.0,
        "the always-on tier counts the grower's new pages\n{}",
        scrape.memtrace_lines()
    );
    assert_eq!(
        scrape.value("memtrace_escalations_total", &steady),
        None,
        "the steady container is never escalated\n{}",
        scrape.memtrace_lines()
    );
    // The always-on tier names the function that touches the new pages.
    let growth = agent.get("/api/v1/growth").text();
    let sites: Vec<serde_json::Value> =
        serde_json::from_str(&growth).unwrap_or_else(|e| panic!("{e}: {growth}"));
    let top = sites
        .iter()
        .find(|s| s["container"] == grower_cg.label.as_str())
        .unwrap_or_else(|| panic!("no growth site of the grower: {growth}"));
    assert!(
        top["site"]
            .as_str()
            .is_some_and(|s| s.starts_with("leak_pages")),
        "the grower's top growth site is leak_pages: {growth}"
    );
    // The same growth as a flame graph, by tier; an unknown tier is refused.
    let svg = agent.get(&format!(
        "/flamegraph.svg?tier=growth&container={}",
        url_encode(&grower_cg.label)
    ));
    assert_eq!(svg.status, 200, "{}", svg.text());
    assert!(
        svg.text().contains("leak_pages"),
        "the growth flame graph shows leak_pages"
    );
    let bad = agent.get("/flamegraph.svg?tier=bogus");
    assert_eq!(bad.status, 400, "{}", bad.text());
}

/// `--probes always` shares one set of probes per libc file: a process that maps the file
/// but is not traced takes the traps too, and memtrace counts them.
#[test]
fn shared_probes_count_untraced_hits() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("shared");
    let traced_cg = cgroups.create("traced");
    let bystander_cg = cgroups.create("bystander");
    let _traced = start_in_cgroup(&traced_cg, "waiter", &["5", "0", "16"]);
    let _bystander = start_in_cgroup(&bystander_cg, "busy", &["1", "0", "0"]);

    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/traced", cgroups.root_pattern()),
        "--interval",
        &format!("{}ms", INTERVAL.as_millis()),
        "--probes",
        "always",
    ]);
    agent.wait_ready();
    let scrape = agent.wait_for("the bystander's traps counted", WITHIN, |s| {
        (s.value("memtrace_untraced_probe_hits_total", &[])
            .unwrap_or(0.0)
            > 0.0)
            .then_some(s.clone())
    });
    assert_eq!(
        scrape.value("memtrace_traced_processes", &[]),
        Some(1.0),
        "only the process of the matching cgroup is traced\n{}",
        scrape.memtrace_lines()
    );
}
