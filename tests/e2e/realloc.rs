//! Test 2: realloc semantics (`fixtures/realloc.c`).

use crate::util::*;

#[test]
fn realloc_semantics() {
    let _serial = serial();
    require_root();
    let report = trace_fixture("realloc", &[], &[]);

    // realloc(p, 0) frees: nothing outstanding where the blocks were made,
    // and realloc(p, 0) itself allocates nothing.
    assert_site(
        &report,
        Expect {
            function: "zero_alloc",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: 10 * 5000,
        },
    );
    assert_nothing_outstanding(&report, "zero_free");
    assert_eq!(
        report.site("zero_free").allocated_bytes,
        0,
        "realloc(p, 0) allocated something\n{}",
        report.summary()
    );

    // A failing realloc leaves the old block live, at its original site.
    assert_site(
        &report,
        Expect {
            function: "keep_alloc",
            outstanding_bytes: 8 * 3000,
            outstanding_allocations: 8,
            allocated_bytes: 8 * 3000,
        },
    );
    assert_nothing_outstanding(&report, "fail_realloc");
    assert_eq!(
        report.site("fail_realloc").allocated_bytes,
        0,
        "a failed realloc counted an allocation\n{}",
        report.summary()
    );

    // A realloc chain ends up entirely at the last realloc's site.
    assert_site(
        &report,
        Expect {
            function: "chain_start",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: 5 * 16,
        },
    );
    assert_site(
        &report,
        Expect {
            function: "chain_grow_small",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: 5 * (32 + 64 + 128),
        },
    );
    assert_site(
        &report,
        Expect {
            function: "chain_grow_large",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: 5 * (256 + 512 + 1024 + 2048 + 4096 + 8192),
        },
    );
    assert_site(
        &report,
        Expect {
            function: "chain_final",
            outstanding_bytes: 5 * 70000,
            outstanding_allocations: 5,
            allocated_bytes: 5 * 70000,
        },
    );

    let leaked = 8 * 3000 + 5 * 70000;
    let slack = slack_bytes();
    let t = report.totals;
    assert!(
        t.outstanding_bytes >= leaked && t.outstanding_bytes <= leaked + slack,
        "totals.outstanding_bytes {} not within [{leaked}, {leaked} + {slack}]\n{}",
        t.outstanding_bytes,
        report.summary()
    );
}
