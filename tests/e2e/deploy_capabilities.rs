//! The capabilities overlay's list is enough for everything the DaemonSet's agent does:
//! with exactly those capabilities in its bounding set (and as root, so they are its
//! effective set), `memtrace top --pid` attaches the allocator probes to a process, the
//! always-on tier (`--tier growth`) counts a process's new pages, and `memtrace calibrate`
//! (what the CPU budget measures at start) times its probes. Checks the list on this
//! machine's kernel.

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
    let with_caps = |what: &str, args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([&bounding, "--inh-caps=-all", "--"])
            .arg(memtrace_bin())
            .args(args);
        let finished =
            Proc::spawn(format!("setpriv {bounding} memtrace {what}"), cmd).wait(RUN_TIMEOUT);
        assert!(
            finished.status.success(),
            "memtrace {what} with only the overlay's capabilities ({caps:?}) failed:\n{}",
            finished.describe()
        );
        finished
    };

    let mut target = Command::new("sleep");
    target.arg("60");
    let target = Proc::spawn("sleep 60", target);
    let pid = target.pid().to_string();
    let finished = with_caps(
        "top",
        &["top", "--format", "json", "--duration", "2", "--pid", &pid],
    );
    assert!(
        finished.stderr.contains("attached"),
        "memtrace with only the overlay's capabilities ({caps:?}) did not attach:\n{}",
        finished.describe()
    );
    drop(target);

    // The always-on tier: a process that touches 16 new pages every 20 ms.
    let mut grower = Command::new(fixture("pages"));
    grower.args(["100000", "20"]);
    let grower = Proc::spawn("pages 100000 20", grower);
    grower.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    let pid = grower.pid().to_string();
    let finished = with_caps(
        "top --tier growth",
        &[
            "top",
            "--tier",
            "growth",
            "--format",
            "json",
            "--duration",
            "2",
            "--pid",
            &pid,
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&finished.stdout)
        .unwrap_or_else(|e| panic!("memtrace top --tier growth: {e}\n{}", finished.describe()));
    assert!(
        report["totals"]["allocated_bytes"].as_u64().unwrap_or(0) > 0,
        "the always-on tier saw no page populated with the overlay's capabilities ({caps:?}):\n{}",
        finished.describe()
    );
    drop(grower);

    // The CPU budget's calibration attaches probes to memtrace itself.
    let finished = with_caps("calibrate", &["calibrate", "--json"]);
    let calibration: serde_json::Value = serde_json::from_str(&finished.stdout)
        .unwrap_or_else(|e| panic!("memtrace calibrate --json: {e}\n{}", finished.describe()));
    assert!(
        calibration["cost"]["alloc_ns"].as_f64().unwrap_or(0.0) > 0.0,
        "calibrating with the overlay's capabilities ({caps:?}) measured no probe cost:\n{}",
        finished.describe()
    );
}
