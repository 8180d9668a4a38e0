//! `memtrace.io/escalate: "true"` on a pod gives its containers the allocator probes with
//! `--probes escalate` although their memory does not grow; a pod without it waits for growth.

use std::time::Duration;

use crate::agent_util::*;
use crate::pods_util::*;
use crate::util::*;

const WITHIN: Duration = Duration::from_secs(30);

#[test]
fn the_escalate_annotation_asks_for_probes() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("pods-escalate");
    let asking = FakePod::new("shop", "web-1", &pod_uid(1), &[("app", &container_id(1))])
        .annotate("memtrace.io/escalate", "true");
    let quiet = FakePod::new("shop", "web-2", &pod_uid(2), &[("app", &container_id(2))]);
    let api = FakeApiServer::start(&[asking.clone(), quiet.clone()]);
    let asking_cg = kubelet_cgroup(&mut cgroups, &asking.uid, &container_id(1));
    let quiet_cg = kubelet_cgroup(&mut cgroups, &quiet.uid, &container_id(2));
    // Neither grows: both wait for a signal that never comes.
    let _asking = start_in_cgroup(&asking_cg, "waiter", &["5", "0", "16"]);
    let _quiet = start_in_cgroup(&quiet_cg, "waiter", &["5", "0", "16"]);

    let agent = start_pod_agent(&api, &["--probes", "escalate", "--escalate-for", "1h"], &[]);
    agent.wait_ready();
    let scrape = agent.wait_for("web-1 escalated by its annotation", WITHIN, |s| {
        (pod_value(s, "memtrace_escalated", "shop", "web-1", "app") == Some(1.0)
            && s.value("memtrace_traced_processes", &[]) == Some(1.0))
        .then_some(s.clone())
    });
    assert!(
        pod_value(
            &scrape,
            "memtrace_anon_memory_bytes",
            "shop",
            "web-2",
            "app"
        )
        .is_some(),
        "web-2 is watched by the always-on tier\n{}",
        scrape.memtrace_lines()
    );
    assert_ne!(
        pod_value(&scrape, "memtrace_escalated", "shop", "web-2", "app"),
        Some(1.0),
        "web-2 neither grows nor asks: no probes\n{}",
        scrape.memtrace_lines()
    );
    assert!(
        agent
            .stderr()
            .contains("its pod asks for probes (memtrace.io/escalate)"),
        "the agent says why it escalated:\n{}",
        agent.stderr()
    );
}
