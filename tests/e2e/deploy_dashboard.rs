//! Every query of `deploy/grafana/memtrace.json` runs against a real Prometheus that has
//! scraped a real agent, and returns data, unless it needs a metric listed in
//! [`NEEDS_ABSENT`] (an exporter this test does not have). The agent runs as the DaemonSet
//! does (`--probes escalate`, a CPU budget, the default `--python`) over one container that
//! exercises both tiers: a page-touching leak that gets it escalated and becomes a leak
//! suspect of the exact tier, a hot allocator that the budget detaches, and a leaking
//! CPython service whose escalation brings exact mode's probes (live objects) and the
//! garbage collector's.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent_util::*;
use crate::deploy_util::*;
use crate::prometheus::Prometheus;
use crate::python_util::*;
use crate::util::*;

/// How long the container gets to be escalated, to become a suspect (and a leak event), and
/// to lose its hot process to the budget, in Prometheus. Escalation waits for the detector
/// to see the anonymous memory grow (half of `--window`), the suspect as long again.
const LEAK_DEADLINE: Duration = Duration::from_secs(60);

/// The label matcher the namespace/pod/container variables start from: every watched
/// container has the always-on tier's anonymous memory; outstanding bytes stand in where
/// the always-on tier cannot run (with `--probes always`).
const WATCHED_SELECTOR: &str = r#"label_values({__name__=~"memtrace_anon_memory_bytes|memtrace_outstanding_bytes", job=~"$job""#;

/// Less than any uprobe trap costs per call (~1 µs here): a calibration under it is wrong.
const MIN_PLAUSIBLE_COST_SECONDS: f64 = 1e-7;

/// Metrics of the two tiers, escalation and the budget that some panel must show.
const MUST_SHOW: &[&str] = &[
    "memtrace_anon_memory_bytes",
    "memtrace_populated_bytes_total",
    "memtrace_escalated",
    "memtrace_escalations_total",
    "memtrace_overhead_ratio",
    "memtrace_budget_detaches_total",
    "memtrace_probe_cost_seconds",
    "memtrace_outstanding_bytes",
    "memtrace_leak_suspicion",
    "memtrace_bpf_map_entries",
    "memtrace_python_live_objects",
    "memtrace_python_gc_collections_total",
    "memtrace_python_gc_duration_seconds_bucket",
];

/// The DaemonSet's settings this test runs the agent with (its own interval, window and
/// escalation window are shorter, to fit a test). `None`: the DaemonSet leaves the
/// variable unset, and so does the test (the agent's default).
const DAEMONSET_SETTINGS: &[(&str, Option<&str>)] = &[
    ("MEMTRACE_PROBES", Some("escalate")),
    ("MEMTRACE_MAX_OVERHEAD", Some("1")),
    ("MEMTRACE_PYTHON", None),
];

/// Metrics the dashboard uses that this test cannot produce, and why. A query that names
/// one of them may return nothing; every entry must be used by some query.
const NEEDS_ABSENT: &[(&str, &str)] = &[(
    "django_http_requests_total_by_method_total",
    "the request-rate metric (django-prometheus), from the application",
)];

/// Values for the dashboard's variables (Grafana's built-ins included).
fn substitute(expr: &str, vars: &[(&str, String)]) -> String {
    let mut out = expr.to_owned();
    // Longest names first, `${x}` before `$x`, so that `$pod` does not eat `$pods`.
    let mut sorted: Vec<&(&str, String)> = vars.iter().collect();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in sorted {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    out
}

/// `(panel title, refId, expr)` of every target, rows' nested panels included.
fn targets(panels: &Value, out: &mut Vec<(String, String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {target}"));
            let ref_id = target["refId"].as_str().unwrap_or_default().to_owned();
            out.push((title.clone(), ref_id, expr.to_owned()));
        }
        targets(&panel["panels"], out);
    }
}

fn describe(results: &[Value]) -> String {
    results
        .iter()
        .take(3)
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn deploy_dashboard() {
    let path = deploy_dir().join("grafana/memtrace.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    // Provisionable: a uid, a schema version, every query through the datasource variable.
    assert_eq!(dashboard["uid"], "memtrace");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(
        dashboard["id"].is_null(),
        "provisioned dashboards carry no id"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["namespace", "pod", "container"] {
        let definition = var(name)["definition"].as_str().unwrap_or_default();
        assert!(
            definition.starts_with(WATCHED_SELECTOR) && definition.ends_with(&format!(", {name})")),
            "variable {name}: {definition}"
        );
    }
    let request_metric = var("request_rate_metric")["current"]["value"]
        .as_str()
        .expect("request_rate_metric has a default")
        .to_owned();
    var("agent_url");
    let mut all = Vec::new();
    targets(&dashboard["panels"], &mut all);
    assert!(all.len() >= 20, "only {} queries", all.len());
    let mut panels_without_source = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] != "row" && panel["datasource"]["uid"] != "${datasource}" {
            panels_without_source.push(panel["title"].to_string());
        }
    }
    assert!(
        panels_without_source.is_empty(),
        "panels not on ${{datasource}}: {panels_without_source:?}"
    );
    for (metric, _) in NEEDS_ABSENT {
        assert!(
            all.iter().any(|(_, _, e)| e.contains(metric)) || *metric == request_metric,
            "NEEDS_ABSENT lists {metric}, which no query uses"
        );
    }
    for metric in MUST_SHOW {
        assert!(
            all.iter()
                .any(|(_, _, e)| e.contains(&format!("{metric}{{"))),
            "no panel queries {metric}"
        );
    }
    let flame_link = text.contains("${agent_url}/flamegraph.svg?container=");
    assert!(flame_link, "no data link to the agent's flame graph");
    let growth_link = text.contains("${agent_url}/flamegraph.svg?tier=growth&container=");
    assert!(
        growth_link,
        "no data link to the agent's growth (always-on) flame graph"
    );

    // A real agent, configured like the DaemonSet (escalation, a 1% CPU budget, the
    // default Python mode), scraped by a real Prometheus.
    let daemonset = daemonset_env(&deploy_dir().join("kubernetes/base/daemonset.yaml"));
    for (name, value) in DAEMONSET_SETTINGS {
        assert_eq!(
            daemonset.get(*name).map(String::as_str),
            *value,
            "the DaemonSet's {name} is not what this test runs the agent with"
        );
    }
    let _serial = serial();
    require_root();
    let mut cgroups = TestCgroups::new("dashboard");
    let leaky = cgroups.create("leaky");
    // 16 new pages every 20 ms (mmap'd and kept, ~3 MiB/s): the anonymous memory grows, so
    // the container is escalated, and the exact tier then sees leak_pages as a suspect.
    let _grower = start_in_cgroup(&leaky, "pages", &["100000", "20"]);
    // One thread churning malloc/free: over the budget as soon as it has probes.
    let hot = start_in_cgroup(&leaky, "busy", &["1", "0", "0"]);
    // A CPython service (pyenv's 3.12: exact mode needs pymalloc's symbols) leaking a few
    // objects every 20 ms, leaving cycles for the garbage collector. Mostly idle, so its
    // exact probes last a few seconds of its CPU before the budget detaches it too.
    let _python = start_python_in_cgroup(
        &leaky,
        &pyenv_python("3.12"),
        &python_fixture("python_service.py"),
        &["10000", "20"],
    );
    let pattern = format!("{}/*", cgroups.root_pattern());
    let agent = Agent::start(&[
        "--cgroup",
        &pattern,
        "--interval",
        "500ms",
        "--window",
        "15s",
        "--threshold",
        &THRESHOLD.to_string(),
        "--probes",
        "escalate",
        // Longer than the test: the window stays open, so the exact tier's series last.
        "--escalate-for",
        "10m",
        "--max-overhead",
        "1",
        "--budget-retry",
        "10m",
    ]);
    agent.wait_ready();
    let prometheus = Prometheus::start(agent.addr);

    // The budget needs the per-call cost the agent measures at start. That measurement,
    // made inside the agent, sometimes comes out near zero (no trap costs under 100 ns;
    // `memtrace calibrate` gives microseconds): then nothing can go over the budget, and
    // the queries of budget detaches are allowed to be empty in this run.
    let alloc_cost = agent.wait_for("the calibrated probe cost", WAIT_TIMEOUT, |s| {
        s.value("memtrace_probe_cost_seconds", &[("call", "alloc")])
    });
    let budget_works = alloc_cost >= MIN_PLAUSIBLE_COST_SECONDS;
    let mut absent_here: Vec<(&str, String)> = Vec::new();
    if !budget_works {
        let why = format!(
            "the agent calibrated a traced malloc at {:.3} µs, too little to detach anything",
            alloc_cost * 1e6
        );
        eprintln!("warning: {why}: budget detaches are not checked in this run");
        absent_here.push(("memtrace_budget_detaches_total", why));
    }

    // Wait until the container was escalated, its leak is a suspect, and the hot process
    // was detached for its budget, all in Prometheus.
    let container = format!("{{container={:?}}}", leaky.label);
    let mut wanted = vec![
        format!("memtrace_escalations_total{container} > 0"),
        format!("memtrace_leak_events_total{container} > 0"),
        // Only exact mode counts live objects: the escalation brought it.
        format!("memtrace_python_live_objects{container} > 0"),
        format!("memtrace_python_gc_collections_total{container} > 0"),
        format!("memtrace_python_gc_duration_seconds_count{container} > 0"),
    ];
    if budget_works {
        wanted.push(format!("memtrace_budget_detaches_total{container} > 0"));
    }
    let started = Instant::now();
    loop {
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|q| !prometheus.try_query(q).is_ok_and(|r| !r.is_empty()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < LEAK_DEADLINE,
            "no {missing:?} in Prometheus within {LEAK_DEADLINE:?}\n--- agent /metrics ---\n{}\n--- agent stderr ---\n{}",
            agent.scrape().memtrace_lines(),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let stderr = agent.stderr();
    assert!(
        !budget_works
            || stderr.contains(&format!("pid {}", hot.pid())) && stderr.contains("over the budget"),
        "the budget detached the hot process, not another one\n{stderr}"
    );
    // A few more scrapes, so that every rate has two points after the event.
    std::thread::sleep(Duration::from_secs(3));

    let vars: Vec<(&str, String)> = vec![
        ("namespace", ".*".into()),
        ("pod", ".*".into()),
        ("container", leaky.label.clone()),
        ("job", "memtrace".into()),
        ("request_rate_metric", request_metric.clone()),
        ("__rate_interval", "1m".into()),
        ("__interval", "15s".into()),
        ("__range", "5m".into()),
    ];
    // The variables' own queries return something (namespace and pod are empty labels
    // off Kubernetes, so only their selectors are checked).
    for name in ["job", "namespace", "pod", "container"] {
        let definition = var(name)["definition"].as_str().unwrap_or_default();
        let selector = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.rsplit_once(", "))
            .map(|(s, _)| s)
            .unwrap_or_else(|| panic!("variable {name}: {definition}"));
        let promql = substitute(selector, &vars);
        let result = prometheus
            .try_query(&promql)
            .unwrap_or_else(|e| panic!("variable {name}: {promql}: {e}"));
        assert!(
            !result.is_empty(),
            "variable {name}: {promql} returns nothing"
        );
    }

    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (title, ref_id, expr) in &all {
        let promql = substitute(expr, &vars);
        assert!(
            !promql.contains('$'),
            "{title} {ref_id}: unsubstituted variable in {promql}"
        );
        let absent = NEEDS_ABSENT
            .iter()
            .map(|(m, why)| (*m, why.to_string()))
            .chain(absent_here.iter().cloned())
            .find(|(m, _)| promql.contains(m));
        match prometheus.try_query(&promql) {
            Err(e) => failures.push(format!("{title} {ref_id}: {promql}\n    error: {e}")),
            Ok(r) if r.is_empty() && absent.is_none() => {
                failures.push(format!("{title} {ref_id}: {promql}\n    returned no data"))
            }
            Ok(r) => report.push(format!(
                "{title} {ref_id}: {} series{}",
                r.len(),
                absent
                    .map(|(m, why)| format!(" (needs {m}: {why})"))
                    .unwrap_or_default()
            )),
        }
    }
    // The alert rules' expressions are valid against the same data (whether they fire is
    // promtool's business: deploy_rules).
    let rules = yaml_file(&deploy_dir().join("prometheus/memtrace-rules.yml"));
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let expr = rule["expr"].as_str().unwrap_or_default();
            if let Err(e) = prometheus.try_query(expr) {
                failures.push(format!("alert {}: {expr}\n    error: {e}", rule["alert"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed:\n  {}\n--- passed ---\n  {}\n--- up ---\n{}",
        failures.len(),
        all.len(),
        failures.join("\n  "),
        report.join("\n  "),
        prometheus
            .try_query("up")
            .map(|r| describe(&r))
            .unwrap_or_else(|e| e)
    );
    eprintln!("dashboard queries:\n  {}", report.join("\n  "));
    drop(prometheus);
    drop(agent);
}
