//! The capabilities overlay's list is enough to trace: `memtrace top --pid` runs with
//! exactly those capabilities in its bounding set (and as root, so they are its
//! effective set) and attaches to a process. Checks the list on this machine's kernel.

use std::process::Command;

use crate::deploy_util::*;
use crate::util::*;

#[test]
fn deploy_capabilities() {
    let _serial = serial();
    require_root();
    let dir = deploy_dir().join("kubernetes/overlays/capabilities");
    let text = run_tool_ok("kubectl", &["kustomize", "."], &dir);
    let daemonset = yaml_documents(&text, "overlays/capabilities")
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let caps: Vec<String> = daemonset["spec"]["template"]["spec"]["containers"][0]
        ["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("+{}", c.as_str().expect("a name").to_lowercase()))
        .collect();
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));

    let mut target = Command::new("sleep");
    target.arg("60");
    let target = Proc::spawn("sleep 60", target);
    let mut cmd = Command::new("setpriv");
    cmd.args([&bounding, "--inh-caps=-all", "--"])
        .arg(memtrace_bin())
        .args(["top", "--format", "json", "--duration", "2", "--pid"])
        .arg(target.pid().to_string());
    let finished = Proc::spawn(format!("setpriv {bounding} memtrace top"), cmd).wait(RUN_TIMEOUT);
    assert!(
        finished.status.success() && finished.stderr.contains("attached"),
        "memtrace with only the overlay's capabilities ({caps:?}) could not trace:\n{}",
        finished.describe()
    );
    drop(target);
}
