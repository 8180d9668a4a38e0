//! `promtool check rules` and `promtool test rules` pass on `deploy/prometheus/`.

use crate::deploy_util::*;

#[test]
fn deploy_rules() {
    let dir = deploy_dir().join("prometheus");
    let checked = run_tool_ok("promtool", &["check", "rules", "memtrace-rules.yml"], &dir);
    assert!(
        checked.contains("SUCCESS"),
        "promtool check rules:\n{checked}"
    );
    let tested = run_tool_ok(
        "promtool",
        &["test", "rules", "memtrace-rules.test.yml"],
        &dir,
    );
    assert!(tested.contains("SUCCESS"), "promtool test rules:\n{tested}");
}
