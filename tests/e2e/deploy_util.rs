//! Helpers for the `deploy_*` tests: where `deploy/` is, running an external tool
//! (kubectl, promtool) with a bounded wait, and YAML streams as JSON values.

use std::path::{Path, PathBuf};
use std::process::Command;

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
