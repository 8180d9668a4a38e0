//! Test 5: four threads leaking from the same function (`fixtures/threads.c`).

use crate::util::*;

#[test]
fn threads() {
    let _serial = serial();
    require_root();
    let report = trace_fixture("threads", &[], &[]);
    assert_site(
        &report,
        Expect {
            function: "leak_in_thread",
            outstanding_bytes: 4 * 25 * 999,
            outstanding_allocations: 4 * 25,
            allocated_bytes: 4 * 25 * 999,
        },
    );
    assert_site(
        &report,
        Expect {
            function: "churn_in_thread",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: 4 * 3000 * 500,
        },
    );
    assert!(
        report.totals.outstanding_bytes >= 4 * 25 * 999,
        "totals.outstanding_bytes below the threads' leaks\n{}",
        report.summary()
    );
}
