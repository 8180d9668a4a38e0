//! Helpers for the `deploy_*` tests: where `deploy/` is, running an external tool
//! (kubectl, promtool) with a bounded wait, YAML streams as JSON values, and the agent's
//! environment in its DaemonSet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::EnvVar;
use serde::Deserialize;

use crate::util::*;

/// `<workspace>/deploy`.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .join("deploy")
}

/// Runs `program args` (in `dir`) to completion, at most [`WAIT_TIMEOUT`]; panics when the
/// program is missing. Returns what it left, whatever its exit status.
pub fn run_tool(program: &str, args: &[&str], dir: &Path) -> Finished {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
    assert!(
        found,
        "{program} is not installed: the deploy checks need it \
         (kubectl: the Kubernetes client, for `kubectl kustomize`; promtool: \
         `apt-get install prometheus`)"
    );
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir);
    Proc::spawn(format!("{program} {args:?} in {}", dir.display()), cmd).wait(WAIT_TIMEOUT)
}

/// Like [`run_tool`], and panics with the tool's output unless it exits 0.
pub fn run_tool_ok(program: &str, args: &[&str], dir: &Path) -> String {
    let finished = run_tool(program, args, dir);
    assert!(
        finished.status.success(),
        "`{program} {}` in {} failed:\n{}",
        args.join(" "),
        dir.display(),
        finished.describe()
    );
    finished.stdout
}

/// Every non-empty document of a YAML stream, as JSON values.
pub fn yaml_documents(text: &str, what: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, doc)| {
            serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{what}: document {i} is not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// One YAML file as a JSON value.
pub fn yaml_file(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The environment of the agent's container (the DaemonSet's only one), by name.
pub fn agent_env(ds: &DaemonSet) -> BTreeMap<&str, &EnvVar> {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec");
    assert_eq!(pod.containers.len(), 1, "the DaemonSet has one container");
    pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect()
}

/// The plain value of variable `name` in `env`; panics naming `what` if there is none.
pub fn env_value<'a>(env: &BTreeMap<&str, &'a EnvVar>, name: &str, what: &str) -> &'a str {
    env.get(name)
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{what}: no {name}"))
}

/// The variables with plain values of the DaemonSet in `path` (one YAML document).
pub fn daemonset_env(path: &Path) -> BTreeMap<String, String> {
    let ds: DaemonSet = serde_json::from_value(yaml_file(path))
        .unwrap_or_else(|e| panic!("{}: not a DaemonSet: {e}", path.display()));
    agent_env(&ds)
        .into_iter()
        .filter_map(|(name, e)| Some((name.to_owned(), e.value.clone()?)))
        .collect()
}
