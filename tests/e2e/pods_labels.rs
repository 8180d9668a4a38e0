//! On Kubernetes (a fake API server serving real Pod JSON to the agent's kube client), the
//! agent finds the containers of the node's kubepods hierarchy by itself and labels their
//! series by pod: a container whose pod is not known yet is traced under its container id
//! and relabelled when the pod appears; an API outage keeps the labels (and is counted);
//! deleting the pod retires its series even while its process lingers.

use std::time::Duration;

use crate::agent_util::*;
use crate::pods_util::*;
use crate::util::*;

const FEW_INTERVALS: Duration = Duration::from_secs(10);
const LEAKS: u64 = 40;
const SIZE: u64 = 4096;

fn leak(proc: &Proc) {
    proc.signal(libc::SIGUSR1);
    proc.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
        l.starts_with("done")
    });
}

fn fixed_leak_args() -> [String; 3] {
    ["fixed".into(), LEAKS.to_string(), SIZE.to_string()]
}

fn start_fixed(cgroup: &Cgroup) -> Proc {
    let args = fixed_leak_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_shape(cgroup, &args)
}

fn series_of_pod(scrape: &Scrape, pod: &str) -> usize {
    scrape
        .series("memtrace_outstanding_bytes", &[("pod", pod)])
        .count()
}

#[test]
fn pods_label_series_by_pod() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("pods");
    let web = FakePod::new("shop", "web-1", &pod_uid(1), &[("app", &container_id(1))]);
    // A pod of another node: the field selector must keep it from the agent.
    let mut elsewhere = FakePod::new("shop", "db-1", &pod_uid(9), &[("db", &container_id(9))]);
    elsewhere.node = "other-node".into();
    let api = FakeApiServer::start(&[web.clone(), elsewhere.clone()]);

    let web_cg = kubelet_cgroup(&mut cgroups, &web.uid, &container_id(1));
    let stray_cg = kubelet_cgroup(&mut cgroups, &elsewhere.uid, &container_id(9));
    // web-1's sandbox: a container cgroup its statuses do not name; never traced.
    let sandbox_cg = kubelet_cgroup(&mut cgroups, &web.uid, &container_id(100));
    let a = start_fixed(&web_cg);
    let stray = start_fixed(&stray_cg);
    let sandbox = start_fixed(&sandbox_cg);

    // No --cgroup: node-wide discovery finds both containers.
    let agent = start_pod_agent(&api, &[], &[]);
    agent.wait_ready();
    agent.wait_traced(2, FEW_INTERVALS);
    assert_eq!(
        agent.scrape().value("memtrace_kubernetes_pods", &[]),
        Some(1.0),
        "one pod of this node"
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains(&format!("fieldSelector=spec.nodeName%3D{NODE}"))),
        "the agent did not ask for this node's pods: {:?}",
        api.requests()
    );

    leak(&a);
    leak(&stray);
    let bytes = agent.wait_for("web-1's outstanding bytes", FEW_INTERVALS, |s| {
        pod_value(s, "memtrace_outstanding_bytes", "shop", "web-1", "app")
            .filter(|v| *v >= (LEAKS * SIZE) as f64)
    });
    assert!(bytes < (LEAKS * SIZE + 64 * 1024) as f64, "{bytes}");
    // The always-on tier's series carry the pod's labels too.
    agent.wait_for("web-1's anonymous memory series", FEW_INTERVALS, |s| {
        pod_value(s, "memtrace_anon_memory_bytes", "shop", "web-1", "app")
    });
    // The other node's pod is unknown here: traced under its container id.
    agent.wait_for("the stray container under its id", FEW_INTERVALS, |s| {
        pod_value(s, "memtrace_outstanding_bytes", "", "", &container_id(9))
            .filter(|v| *v >= (LEAKS * SIZE) as f64)
    });
    let scrape = agent.scrape();
    assert_eq!(series_of_pod(&scrape, "db-1"), 0);
    assert_eq!(
        scrape.value("memtrace_traced_processes", &[]),
        Some(2.0),
        "web-1's app and the stray container, not web-1's sandbox\n{}",
        agent.stderr()
    );

    // A container started after the agent, before the API reports its pod.
    let late = FakePod::new(
        "shop",
        "web-2",
        &pod_uid(2),
        &[("sidecar", &container_id(2))],
    );
    let late_cg = kubelet_cgroup(&mut cgroups, &late.uid, &container_id(2));
    let b = start_fixed(&late_cg);
    agent.wait_traced(3, FEW_INTERVALS);
    leak(&b);
    agent.wait_for("the new container under its id", FEW_INTERVALS, |s| {
        pod_value(s, "memtrace_outstanding_bytes", "", "", &container_id(2))
            .filter(|v| *v >= (LEAKS * SIZE) as f64)
    });
    // The kubelet reports it: relabelled, the id's series retired.
    api.add(late.clone());
    agent.wait_for("web-2 relabelled", FEW_INTERVALS, |s| {
        let by_pod = pod_value(s, "memtrace_outstanding_bytes", "shop", "web-2", "sidecar")
            .filter(|v| *v >= (LEAKS * SIZE) as f64);
        let anon_by_pod =
            pod_value(s, "memtrace_anon_memory_bytes", "shop", "web-2", "sidecar").is_some();
        let by_id = ["memtrace_outstanding_bytes", "memtrace_anon_memory_bytes"]
            .iter()
            .map(|name| s.series(name, &[("container", &container_id(2))]).count())
            .sum::<usize>();
        by_pod.filter(|_| anon_by_pod && by_id == 0)
    });

    // An API outage: errors are counted, the labels stay.
    api.set_failing(true);
    agent.wait_for("counted API errors", FEW_INTERVALS, |s| {
        s.value("memtrace_kubernetes_errors_total", &[("reason", "status")])
            .filter(|v| *v >= 1.0)
    });
    let scrape = agent.scrape();
    assert!(
        pod_value(
            &scrape,
            "memtrace_outstanding_bytes",
            "shop",
            "web-1",
            "app"
        )
        .is_some()
            && pod_value(
                &scrape,
                "memtrace_outstanding_bytes",
                "shop",
                "web-2",
                "sidecar"
            )
            .is_some(),
        "labels lost during the outage\n{}",
        scrape.memtrace_lines()
    );
    api.set_failing(false);

    // Deleting web-1 retires its series, though its process is still there.
    api.delete(&web);
    agent.wait_for("web-1's series retired", Duration::from_secs(40), |s| {
        (series_of_pod(s, "web-1") == 0 && s.value("memtrace_traced_processes", &[]) == Some(2.0))
            .then_some(())
    });
    assert!(
        std::path::Path::new(&format!("/proc/{}", a.pid())).exists(),
        "web-1's process should still run"
    );
    let scrape = agent.scrape();
    assert!(
        pod_value(
            &scrape,
            "memtrace_outstanding_bytes",
            "shop",
            "web-2",
            "sidecar"
        )
        .is_some(),
        "web-2 should still be there\n{}",
        scrape.memtrace_lines()
    );
    drop(agent);
    drop((a, b, stray, sandbox));
}

#[test]
fn pods_policy_selects_pods() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("policy");
    let opted_in = FakePod::new("shop", "in", &pod_uid(11), &[("app", &container_id(11))])
        .annotate("memtrace.io/trace", "true");
    let silent = FakePod::new(
        "shop",
        "silent",
        &pod_uid(12),
        &[("app", &container_id(12))],
    );
    let system = FakePod::new(
        "kube-system",
        "dns",
        &pod_uid(13),
        &[("dns", &container_id(13))],
    )
    .annotate("memtrace.io/trace", "true");
    let other = FakePod::new("shop", "other", &pod_uid(14), &[("app", &container_id(14))])
        .annotate("memtrace.io/trace", "true");
    let api = FakeApiServer::start(&[
        opted_in.clone(),
        silent.clone(),
        system.clone(),
        other.clone(),
    ]);
    let mut procs = Vec::new();
    for (pod, n) in [(&opted_in, 11), (&silent, 12), (&system, 13), (&other, 14)] {
        let cg = kubelet_cgroup(&mut cgroups, &pod.uid, &container_id(n));
        procs.push(start_fixed(&cg));
    }
    // Flags from the environment, as in the DaemonSet.
    let agent = start_pod_agent(
        &api,
        &[],
        &[
            ("MEMTRACE_TRACE_DEFAULT", "opt-in"),
            ("MEMTRACE_EXCLUDE_NAMESPACE", "kube-*"),
            ("MEMTRACE_POD_SELECTOR", "app in (in, silent, dns)"),
        ],
    );
    agent.wait_ready();
    agent.wait_traced(1, FEW_INTERVALS);
    for p in &procs {
        leak(p);
    }
    agent.wait_for("the opted-in pod's bytes", FEW_INTERVALS, |s| {
        pod_value(s, "memtrace_outstanding_bytes", "shop", "in", "app")
            .filter(|v| *v >= (LEAKS * SIZE) as f64)
    });
    // A few more intervals: still one process, nothing of the others.
    std::thread::sleep(Duration::from_millis(1500));
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value("memtrace_traced_processes", &[]),
        Some(1.0),
        "{}",
        scrape.memtrace_lines()
    );
    for pod in ["silent", "dns", "other"] {
        assert_eq!(
            series_of_pod(&scrape, pod),
            0,
            "{pod}\n{}",
            scrape.memtrace_lines()
        );
    }
    // Opting out by annotation stops tracing.
    api.modify(opted_in.clone().annotate("memtrace.io/trace", "false"));
    agent.wait_for("the opted-out pod dropped", FEW_INTERVALS, |s| {
        (s.value("memtrace_traced_processes", &[]) == Some(0.0) && series_of_pod(s, "in") == 0)
            .then_some(())
    });
    drop(agent);
    drop(procs);
}
