//! The agent's always-on tier follows anonymous mappings per stack (`fixtures/mapped.c`):
//! `/api/v1/growth` lists the stacks holding mapped memory with the detector's verdict,
//! `memtrace_mapped_bytes` counts it per container, the `mapped` flame graph draws it.
//! No allocator probe is involved.

use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

const ROUNDS: u64 = 60;
const PAUSE_MS: u64 = 250;
const WITHIN: Duration = Duration::from_secs(60);

fn block_bytes() -> u64 {
    (256 * 1024 + 16u64).div_ceil(PAGE) * PAGE
}

#[test]
fn agent_follows_mapped_memory_per_stack() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("mapped");
    let cg = cgroups.create("mapper");
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
        "--window",
        "20s",
        "--probes",
        "escalate",
    ]);
    agent.wait_ready();
    let mapper = start_in_cgroup(&cg, "mapped", &[&ROUNDS.to_string(), &PAUSE_MS.to_string()]);
    let container = [("container", cg.label.as_str())];
    // Its first mapping waits until the agent watches it.
    agent.wait_for("the container watched", WITHIN, |s| {
        s.value("memtrace_anon_memory_bytes", &container)
    });
    mapper.signal(libc::SIGUSR1);
    let feature = [("feature", "mapped_view")];
    assert_eq!(
        agent.scrape().value("memtrace_feature_available", &feature),
        Some(1.0),
        "the mmap view runs on this kernel"
    );

    // While it leaks, the detector judges leak_blocks' mapped bytes a suspect.
    let leak_suspect = |sites: &[serde_json::Value]| {
        mapped_site(sites, &cg.label, "leak_blocks")
            .is_some_and(|s| s["assessment"]["suspect"] == true)
    };
    let mut suspected = false;
    // Once done, leak_blocks holds every block it mapped; churn_blocks none.
    let sites = agent.wait_for("all of leak_blocks' blocks mapped", WITHIN, |_| {
        let sites = growth_sites(&agent);
        suspected |= leak_suspect(&sites);
        let leak = mapped_site(&sites, &cg.label, "leak_blocks")?;
        (leak["mapped_bytes"].as_u64() == Some(ROUNDS * block_bytes())).then_some(sites)
    });
    assert!(
        suspected,
        "leak_blocks was never a suspect while it grew: {sites:?}"
    );
    if let Some(churn) = mapped_site(&sites, &cg.label, "churn_blocks") {
        assert_eq!(churn["mapped_bytes"].as_u64(), Some(0), "{churn}");
    }
    let trimmed = mapped_site(&sites, &cg.label, "map_and_trim")
        .unwrap_or_else(|| panic!("no map_and_trim site: {sites:?}"));
    assert_eq!(
        trimmed["mapped_bytes"].as_u64(),
        Some(12 * PAGE),
        "{trimmed}"
    );

    let scrape = agent.scrape();
    let mapped = scrape
        .value("memtrace_mapped_bytes", &container)
        .unwrap_or(0.0) as u64;
    assert!(
        mapped >= ROUNDS * block_bytes() + 12 * PAGE,
        "memtrace_mapped_bytes {mapped} holds at least the leak and the trimmed mapping\n{}",
        scrape.memtrace_lines()
    );
    let svg = agent.get(&format!(
        "/flamegraph.svg?tier=mapped&container={}",
        url_encode(&cg.label)
    ));
    assert_eq!(svg.status, 200, "{}", svg.text());
    assert!(
        svg.text().contains("leak_blocks"),
        "the mapped flame graph shows leak_blocks"
    );
}

fn growth_sites(agent: &Agent) -> Vec<serde_json::Value> {
    let text = agent.get("/api/v1/growth").text();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The mapped-memory site of `container` whose first frame is `function`.
fn mapped_site<'a>(
    sites: &'a [serde_json::Value],
    container: &str,
    function: &str,
) -> Option<&'a serde_json::Value> {
    sites.iter().find(|s| {
        s["source"] == "mapped"
            && s["container"] == container
            && s["frames"][0]["function"] == function
    })
}
