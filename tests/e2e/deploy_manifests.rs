//! `kubectl kustomize` renders the base and every overlay of `deploy/kubernetes/`; every
//! rendered object parses into its k8s-openapi type, and a round trip through the typed
//! value loses no field (a misspelled key is silently dropped by the API server, and by
//! k8s-openapi: that is how it is caught). Then what the agent needs is checked on the
//! typed objects. No cluster and no network needed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::deploy_util::*;

/// Every kustomization we ship, relative to `deploy/`, with the kinds it must render
/// besides the base's ([`BASE_KINDS`]).
const KUSTOMIZATIONS: &[(&str, &[&str])] = &[
    ("kubernetes", &[]),
    ("kubernetes/base", &[]),
    ("kubernetes/overlays/capabilities", &[]),
    (
        "kubernetes/overlays/prometheus-operator",
        &["ServiceMonitor", "PrometheusRule"],
    ),
    (
        "kubernetes/overlays/prometheus-operator-podmonitor",
        &["PodMonitor", "PrometheusRule"],
    ),
];

/// What every kustomization renders: the base.
const BASE_KINDS: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "DaemonSet",
    "Service",
];

/// The Prometheus Operator's custom resources (no k8s-openapi type): checked as generic
/// YAML.
const OPERATOR_KINDS: &[&str] = &["ServiceMonitor", "PodMonitor", "PrometheusRule"];

const PORT: i32 = 9464;

/// The typed objects of one rendered kustomization.
#[derive(Default)]
struct Rendered {
    kinds: Vec<String>,
    daemonsets: Vec<DaemonSet>,
    services: Vec<Service>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    accounts: Vec<ServiceAccount>,
    priority_classes: Vec<PriorityClass>,
    namespaces: Vec<Namespace>,
    operator: Vec<Value>,
}

/// Paths (`a.b[2].c`) present in `original` whose value the typed round trip lost or
/// changed.
fn lost_fields(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (key, value) in o {
                let here = format!("{path}.{key}");
                match t.get(key) {
                    Some(tv) => lost_fields(value, tv, &here, out),
                    // An explicit null is the same as an absent field.
                    None if value.is_null() => {}
                    None => out.push(format!("{here} (dropped: unknown or misspelled key?)")),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            if o.len() != t.len() {
                out.push(format!("{path}: {} items became {}", o.len(), t.len()));
            }
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                lost_fields(ov, tv, &format!("{path}[{i}]"), out);
            }
        }
        (o, t) if o == t => {}
        (o, t) => out.push(format!("{path}: {o} became {t}")),
    }
}

/// Deserializes `object` as `T`, serializes it back, and panics if a field was lost.
fn round_trip<T: DeserializeOwned + Serialize>(object: &Value, what: &str) -> T {
    let typed: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| {
        panic!("{what}: does not parse as its Kubernetes type: {e}\n{object:#}")
    });
    let back = serde_json::to_value(&typed).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut lost = Vec::new();
    lost_fields(object, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{what}: the typed round trip lost fields:\n  {}\n--- rendered ---\n{object:#}",
        lost.join("\n  ")
    );
    typed
}

fn render(dir: &str) -> Rendered {
    let path = deploy_dir().join(dir);
    let text = run_tool_ok("kubectl", &["kustomize", "."], &path);
    let mut rendered = Rendered::default();
    for object in yaml_documents(&text, &format!("kubectl kustomize {dir}")) {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{dir}: {kind} {name:?}");
        assert!(!name.is_empty(), "{what}: no metadata.name\n{object:#}");
        match kind.as_str() {
            "DaemonSet" => rendered.daemonsets.push(round_trip(&object, &what)),
            "Service" => rendered.services.push(round_trip(&object, &what)),
            "ClusterRole" => rendered.cluster_roles.push(round_trip(&object, &what)),
            "ClusterRoleBinding" => rendered.bindings.push(round_trip(&object, &what)),
            "ServiceAccount" => rendered.accounts.push(round_trip(&object, &what)),
            "PriorityClass" => rendered.priority_classes.push(round_trip(&object, &what)),
            "Namespace" => rendered.namespaces.push(round_trip(&object, &what)),
            k if OPERATOR_KINDS.contains(&k) => {
                assert_eq!(
                    object["apiVersion"], "monitoring.coreos.com/v1",
                    "{what}: apiVersion"
                );
                assert!(object["spec"].is_object(), "{what}: no spec\n{object:#}");
                rendered.operator.push(object.clone());
            }
            other => panic!(
                "{what}: kind {other:?} is not known to this test: add its k8s-openapi type \
                 to deploy_manifests.rs"
            ),
        }
        rendered.kinds.push(kind);
    }
    rendered
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The environment variables of `memtrace agent`'s flags, from its `--help` (clap prints
/// `[env: NAME=...]` for each).
fn agent_env_settings() -> BTreeSet<String> {
    let finished = crate::util::run_memtrace(["agent", "--help"]);
    assert!(
        finished.status.success(),
        "memtrace agent --help: {}",
        finished.describe()
    );
    let settings: BTreeSet<String> = finished
        .stdout
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    assert!(
        settings.contains("MEMTRACE_CGROUP"),
        "no [env: ...] in memtrace agent --help:\n{}",
        finished.stdout
    );
    settings
}

/// What the agent needs from its DaemonSet, whatever the overlay.
fn check_daemonset(dir: &str, r: &Rendered) {
    assert_eq!(r.daemonsets.len(), 1, "{dir}: one DaemonSet");
    let ds = &r.daemonsets[0];
    let what = format!("{dir}: DaemonSet");
    assert_eq!(
        ds.metadata.namespace.as_deref(),
        Some("memtrace"),
        "{what}: namespace"
    );
    let spec = ds.spec.as_ref().expect("spec");
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(
        !selector.is_empty() && labels_match(&selector, &template_labels),
        "{what}: selector {selector:?} does not match the pod labels {template_labels:?}"
    );
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    for (k, v) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9464"),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(
            annotations.get(k).map(String::as_str),
            Some(v),
            "{what}: annotation {k}"
        );
    }
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_pid, Some(true), "{what}: hostPID");
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "{what}: no toleration of every taint (operator: Exists, no key, no effect)"
    );
    let priority = pod.priority_class_name.as_deref().unwrap_or_default();
    assert!(
        priority == "system-node-critical"
            || r.priority_classes
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(priority)),
        "{what}: priorityClassName {priority:?} is neither system-node-critical nor rendered"
    );
    let account = pod.service_account_name.as_deref().unwrap_or_default();
    assert!(
        r.accounts
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(account)),
        "{what}: serviceAccountName {account:?} not rendered"
    );

    assert_eq!(pod.containers.len(), 1, "{what}: one container");
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_deref(),
        Some(&["agent".to_owned()][..]),
        "{what}: args"
    );
    let env = agent_env(ds);
    let node_name = env
        .get("NODE_NAME")
        .unwrap_or_else(|| panic!("{what}: no NODE_NAME"));
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "{what}: NODE_NAME must come from the downward API"
    );
    // Pods are selected by the agent's pod policy; --cgroup would bypass it.
    assert!(
        !env.contains_key("MEMTRACE_CGROUP"),
        "{what}: MEMTRACE_CGROUP bypasses the pod policy"
    );
    let value = |name: &str| env_value(&env, name, &what);
    let default = value("MEMTRACE_TRACE_DEFAULT");
    assert!(
        ["all", "opt-in"].contains(&default),
        "{what}: MEMTRACE_TRACE_DEFAULT {default:?}"
    );
    // Every MEMTRACE_* variable must be one the agent reads: a flag's variable, as
    // `memtrace agent --help` lists them, or the log filter.
    let settings = agent_env_settings();
    for name in env.keys().filter(|n| n.starts_with("MEMTRACE_")) {
        assert!(
            *name == "MEMTRACE_LOG" || settings.contains(*name),
            "{what}: {name} is not an agent setting (`memtrace agent --help` lists {settings:?})"
        );
    }
    // The tiers and the budget are set explicitly: the always-on tier everywhere, probes
    // only where memory grows, and a CPU budget on.
    assert_eq!(
        value("MEMTRACE_PROBES"),
        "escalate",
        "{what}: MEMTRACE_PROBES"
    );
    value("MEMTRACE_ESCALATE_FOR");
    let budget: f64 = value("MEMTRACE_MAX_OVERHEAD")
        .parse()
        .unwrap_or_else(|e| panic!("{what}: MEMTRACE_MAX_OVERHEAD: {e}"));
    assert!(
        budget > 0.0 && budget <= 5.0,
        "{what}: MEMTRACE_MAX_OVERHEAD {budget}: the budget must be on, and small"
    );
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == PORT)
        .unwrap_or_else(|| panic!("{what}: no container port {PORT}"));
    let port_name = port.name.clone().unwrap_or_default();
    let resolves = |p: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| match p {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n == PORT,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => *s == port_name,
    };
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path), "{what}: probe path");
        assert!(
            resolves(&get.port),
            "{what}: probe {path} not on port {PORT}"
        );
    }
    let resources = c
        .resources
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no resources"));
    for (kind, map) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let map = map.clone().unwrap_or_default();
        for r in ["cpu", "memory"] {
            assert!(map.contains_key(r), "{what}: no {kind}.{r}");
        }
    }

    // Host paths: read-only, and the ones the agent needs.
    let volumes: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    for needed in ["/proc", "/sys/fs/cgroup", "/sys/kernel/btf"] {
        assert!(
            volumes.values().any(|p| *p == needed),
            "{what}: no hostPath volume for {needed}"
        );
    }
    for (name, host) in &volumes {
        let mount = mounts
            .iter()
            .find(|m| m.name == *name)
            .unwrap_or_else(|| panic!("{what}: hostPath {host} is not mounted"));
        assert_eq!(
            mount.read_only,
            Some(true),
            "{what}: hostPath {host} mounted writable"
        );
    }
    let cgroup_mount = mounts
        .iter()
        .find(|m| volumes.get(m.name.as_str()) == Some(&"/sys/fs/cgroup"))
        .expect("cgroup mount");
    assert_eq!(
        cgroup_mount.mount_path, "/sys/fs/cgroup",
        "{what}: the agent looks for the cgroup v2 mount at /sys/fs/cgroup"
    );

    let security = c.security_context.clone().unwrap_or_default();
    assert_eq!(
        security.read_only_root_filesystem,
        Some(true),
        "{what}: readOnlyRootFilesystem"
    );
    if dir.ends_with("capabilities") {
        assert_eq!(security.privileged, Some(false), "{what}: privileged");
        assert_eq!(
            security.allow_privilege_escalation,
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        let caps = security.capabilities.clone().unwrap_or_default();
        assert_eq!(
            caps.drop.unwrap_or_default(),
            vec!["ALL".to_owned()],
            "{what}: drop ALL"
        );
        let add: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
        for cap in ["BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"] {
            assert!(
                add.contains(cap),
                "{what}: capability {cap} missing from {add:?}"
            );
        }
    } else {
        assert_eq!(
            security.privileged,
            Some(true),
            "{what}: privileged by default"
        );
    }
}

fn check_rbac(dir: &str, r: &Rendered) {
    assert_eq!(r.cluster_roles.len(), 1, "{dir}: one ClusterRole");
    let role = &r.cluster_roles[0];
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(
        rules.len(),
        1,
        "{dir}: ClusterRole: one rule, pods only: {rules:?}"
    );
    let rule = &rules[0];
    assert_eq!(
        rule.api_groups.clone().unwrap_or_default(),
        vec![String::new()],
        "{dir}: apiGroups"
    );
    assert_eq!(
        rule.resources.clone().unwrap_or_default(),
        vec!["pods".to_owned()],
        "{dir}: resources"
    );
    let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
    assert_eq!(
        verbs,
        BTreeSet::from(["get", "list", "watch"]),
        "{dir}: verbs"
    );
    assert!(
        rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
        "{dir}: extra rule fields"
    );

    assert_eq!(r.bindings.len(), 1, "{dir}: one ClusterRoleBinding");
    let binding = &r.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        role.metadata.name.as_ref(),
        "{dir}: roleRef"
    );
    let account = &r.accounts[0];
    assert!(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount"
                && Some(&s.name) == account.metadata.name.as_ref()
                && s.namespace == account.metadata.namespace),
        "{dir}: the binding does not name the agent's ServiceAccount"
    );
    assert!(
        r.namespaces
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some("memtrace")),
        "{dir}: Namespace memtrace"
    );
}

fn check_service(dir: &str, r: &Rendered) {
    assert_eq!(r.services.len(), 1, "{dir}: one Service");
    let svc = &r.services[0];
    let spec = svc.spec.as_ref().expect("service spec");
    let pod_labels = r.daemonsets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(
        !selector.is_empty() && labels_match(&selector, &pod_labels),
        "{dir}: Service selector {selector:?} does not select the agent's pods {pod_labels:?}"
    );
    assert!(
        spec.ports.iter().flatten().any(|p| p.port == PORT),
        "{dir}: Service has no port {PORT}"
    );

    // The monitors must select what is there.
    let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
    for monitor in &r.operator {
        let kind = monitor["kind"].as_str().unwrap_or_default();
        let (target_labels, endpoints) = match kind {
            "ServiceMonitor" => (&svc_labels, &monitor["spec"]["endpoints"]),
            "PodMonitor" => (&pod_labels, &monitor["spec"]["podMetricsEndpoints"]),
            _ => continue,
        };
        let selector: BTreeMap<String, String> =
            serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone())
                .unwrap_or_else(|e| panic!("{dir}: {kind}: selector.matchLabels: {e}"));
        assert!(
            !selector.is_empty() && labels_match(&selector, target_labels),
            "{dir}: {kind} selector {selector:?} does not match {target_labels:?}"
        );
        assert_eq!(
            monitor["spec"]["namespaceSelector"]["matchNames"],
            serde_json::json!(["memtrace"]),
            "{dir}: {kind}: namespaceSelector"
        );
        let endpoints = endpoints
            .as_array()
            .unwrap_or_else(|| panic!("{dir}: {kind}: no endpoints"));
        assert!(
            endpoints
                .iter()
                .any(|e| e["port"] == "http-metrics" && e["path"] == "/metrics"),
            "{dir}: {kind}: no endpoint on port http-metrics, path /metrics"
        );
    }
}

/// The PrometheusRule's spec is the rules file.
fn check_prometheus_rule(dir: &str, r: &Rendered) {
    let rules_file = yaml_file(&deploy_dir().join("prometheus/memtrace-rules.yml"));
    for rule in r.operator.iter().filter(|o| o["kind"] == "PrometheusRule") {
        assert!(
            rule["spec"] == rules_file,
            "{dir}: the PrometheusRule's spec differs from deploy/prometheus/memtrace-rules.yml: \
             regenerate it (MEMTRACE_BLESS=1 cargo test -p memtrace-tests deploy_prometheusrule)"
        );
    }
}

#[test]
fn deploy_manifests() {
    for (dir, extra_kinds) in KUSTOMIZATIONS {
        let rendered = render(dir);
        let mut got = rendered.kinds.clone();
        let mut want: Vec<String> = BASE_KINDS
            .iter()
            .chain(extra_kinds.iter())
            .map(|k| k.to_string())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{dir}: rendered kinds");
        check_daemonset(dir, &rendered);
        check_rbac(dir, &rendered);
        check_service(dir, &rendered);
        check_prometheus_rule(dir, &rendered);
    }
}

/// The round-trip check itself catches a misspelled key.
#[test]
fn deploy_manifests_catch_misspelled_keys() {
    let object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"clusterIP": "None", "selectr": {"a": "b"}},
    });
    let typed: Service = serde_json::from_value(object.clone()).unwrap();
    let mut lost = Vec::new();
    lost_fields(
        &object,
        &serde_json::to_value(&typed).unwrap(),
        "",
        &mut lost,
    );
    assert_eq!(
        lost,
        vec![".spec.selectr (dropped: unknown or misspelled key?)".to_owned()]
    );
}

/// The PrometheusRule of the Prometheus Operator overlays is generated from the rules
/// file: the rules file's text, indented under `spec:`. `MEMTRACE_BLESS=1` rewrites it.
#[test]
fn deploy_prometheusrule_is_generated() {
    let deploy = deploy_dir();
    let rules = std::fs::read_to_string(deploy.join("prometheus/memtrace-rules.yml"))
        .expect("reading the rules file");
    let target = deploy.join("kubernetes/components/prometheus-rules/prometheusrule.yaml");
    let expected = generate_prometheus_rule(&rules);
    let current = std::fs::read_to_string(&target).unwrap_or_default();
    if current == expected {
        return;
    }
    if std::env::var_os("MEMTRACE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&target, &expected)
            .unwrap_or_else(|e| panic!("writing {}: {e}", target.display()));
        eprintln!("rewrote {}", target.display());
        return;
    }
    panic!(
        "{} is out of date with deploy/prometheus/memtrace-rules.yml: run \
         `MEMTRACE_BLESS=1 cargo test -p memtrace-tests deploy_prometheusrule`",
        target.display()
    );
}

fn generate_prometheus_rule(rules: &str) -> String {
    let mut out = String::from(
        "# GENERATED from deploy/prometheus/memtrace-rules.yml by the deploy_prometheusrule test\n\
         # (MEMTRACE_BLESS=1 rewrites it). Edit the rules file, not this.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: memtrace\n  namespace: memtrace\n  labels:\n    \
         # kube-prometheus-stack selects rules by its release label by default: set yours.\n    \
         release: prometheus\n\
         spec:\n",
    );
    for line in rules.lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
