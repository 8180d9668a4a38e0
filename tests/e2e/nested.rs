//! Test 4: allocations glibc serves with mmap/mremap internally are counted
//! once, at the user's call (`fixtures/nested.c`).

use crate::util::*;

const MIB: u64 = 1024 * 1024;

const LEAKS: &[(&str, u64)] = &[
    ("leak_big", 4 * MIB),
    ("leak_big_calloc", 3 * MIB),
    ("leak_big_aligned", 2 * MIB),
    ("leak_big_realloc", 6 * MIB),
];

#[test]
fn nested_not_double_counted() {
    let _serial = serial();
    require_root();
    let slack = slack_bytes();
    let base = *baseline();
    let report = trace_fixture("nested", &[], &[]);

    for &(function, bytes) in LEAKS {
        assert_site(
            &report,
            Expect {
                function,
                outstanding_bytes: bytes,
                outstanding_allocations: 1,
                allocated_bytes: bytes,
            },
        );
    }
    assert_site(
        &report,
        Expect {
            function: "big_realloc_base",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: MIB,
        },
    );
    let churn_allocated = 50 * (2 * MIB + 1);
    assert_site(
        &report,
        Expect {
            function: "churn_big",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: churn_allocated,
        },
    );

    // No other stack (e.g. mmap called from inside malloc) holds a large
    // amount: the big blocks must not show up a second time.
    let names: Vec<&str> = LEAKS.iter().map(|l| l.0).collect();
    let elsewhere = report.outstanding_elsewhere(&names);
    let big_elsewhere: Vec<_> = elsewhere.iter().filter(|(_, b)| **b >= 64 * 1024).collect();
    assert!(
        big_elsewhere.is_empty(),
        "large outstanding amounts outside the leak sites (counted twice?): {big_elsewhere:?}\n{}",
        report.summary()
    );

    let leaked: u64 = LEAKS.iter().map(|l| l.1).sum();
    let t = report.totals;
    assert!(
        t.outstanding_bytes >= leaked && t.outstanding_bytes <= leaked + slack,
        "totals.outstanding_bytes {} not within [{leaked}, {leaked} + {slack}]\n{}",
        t.outstanding_bytes,
        report.summary()
    );
    // Same for everything allocated: the internal mmaps of the churn loop
    // must not be added to the user's mallocs.
    let allocated = leaked + MIB + churn_allocated;
    let allocated_slack = base.allocated_bytes + RUNTIME_SLACK_BYTES;
    assert!(
        t.allocated_bytes >= allocated && t.allocated_bytes <= allocated + allocated_slack,
        "totals.allocated_bytes {} not within [{allocated}, {allocated} + {allocated_slack}]\n{}",
        t.allocated_bytes,
        report.summary()
    );
}
