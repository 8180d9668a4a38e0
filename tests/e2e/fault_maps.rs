//! Maps far too small for what is traced: drops are counted and exported by reason, the
//! totals stay consistent (every tracked block is in them, nothing else), and memtrace
//! keeps running.

use crate::agent_util::*;
use crate::util::*;

/// Live blocks memtrace may track: the exact fixture keeps ~110 live at its end.
const TINY_ALLOCS: &str = "8";

#[test]
fn fault_tiny_maps_top() {
    let _serial = serial();
    require_root();
    let finished = run_top(&["--max-allocations", TINY_ALLOCS], &fixture("exact"), &[]);
    assert!(
        finished.status.success(),
        "memtrace with a {TINY_ALLOCS}-entry live-block map failed\n{}",
        finished.describe()
    );
    let report = parse_report(&finished);
    let raw: serde_json::Value = serde_json::from_str(finished.stdout.trim()).unwrap();
    let t = report.totals;
    let full = raw["totals"]["drops"]["allocs_map_full"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        full > 0 && t.dropped_events >= full,
        "a full live-block map must show as drops (allocs_map_full {full}, dropped_events {})\n{}",
        t.dropped_events,
        finished.describe()
    );
    assert!(
        finished.stderr.contains("drop"),
        "memtrace top must warn about drops on stderr\n{}",
        finished.describe()
    );
    // Consistent: what is outstanding is what was allocated and not freed, and no more
    // blocks than the map holds.
    assert_eq!(
        t.allocated_bytes - t.freed_bytes,
        t.outstanding_bytes,
        "allocated - freed != outstanding with a full map\n{}",
        report.summary()
    );
    // Anonymous mappings are kept in their own map (MMAPS), which stays full-sized.
    let capacity: u64 = TINY_ALLOCS.parse().unwrap();
    let blocks = t.outstanding_allocations - report.site("leak_mmap").outstanding_allocations;
    assert!(
        blocks <= capacity,
        "{blocks} heap blocks outstanding with a {capacity}-entry map\n{}",
        report.summary()
    );
    let stacks_outstanding: u64 = report.stacks.iter().map(|s| s.outstanding_bytes).sum();
    assert!(
        stacks_outstanding <= t.outstanding_bytes,
        "stacks hold {stacks_outstanding} B, more than the process total {}\n{}",
        t.outstanding_bytes,
        report.summary()
    );
    // Frees of the untracked blocks are unmatched, not subtracted from anything.
    assert!(t.unmatched_frees > 0, "{}", report.summary());
}

#[test]
fn fault_tiny_maps_agent() {
    let _serial = serial();
    require_root();
    let mut cgroups = TestCgroups::new("tinymaps");
    let cgroup = cgroups.create("leaky");
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
        "--max-allocations",
        TINY_ALLOCS,
    ]);
    agent.wait_ready();
    // Every feature memtrace uses is there on the test machines, and exported.
    let scrape = agent.scrape();
    for feature in ["uprobes", "btf", "tracepoint_rss_stat"] {
        assert_eq!(
            scrape.value("memtrace_feature_available", &[("feature", feature)]),
            Some(1.0),
            "memtrace_feature_available{{feature={feature:?}}}\n{}",
            scrape.memtrace_lines()
        );
    }

    let fixture = start_shape(&cgroup, &["fixed", "200", "1000"]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    fixture.signal(libc::SIGUSR1);
    fixture.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
        l.trim() == "done"
    });
    let dropped = agent.wait_for("allocs_map_full drops", WAIT_TIMEOUT, |s| {
        s.value(
            "memtrace_dropped_events_total",
            &[("reason", "allocs_map_full")],
        )
        .filter(|v| *v > 0.0)
    });
    let capacity: f64 = TINY_ALLOCS.parse().unwrap();
    // 200 blocks of 1000 B were leaked; at most the map's capacity are tracked.
    let scrape = agent.scrape();
    let outstanding = scrape
        .value(
            "memtrace_outstanding_bytes",
            &[("container", cgroup.label.as_str())],
        )
        .unwrap_or(0.0);
    assert!(
        outstanding <= capacity * 1000.0 + 16.0 * 1024.0,
        "{outstanding} B outstanding with a {capacity}-entry map ({dropped} drops)\n{}",
        scrape.memtrace_lines()
    );
    // Still serving, still tracing.
    assert_eq!(agent.get("/healthz").status, 200, "{}", agent.stderr());
    agent.wait_traced(1, WAIT_TIMEOUT);
    drop(fixture);
    drop(agent);
}
