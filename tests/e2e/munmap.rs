//! Test 3: partial munmap and file-backed mappings (`fixtures/munmap.c`).

use crate::util::*;

#[test]
fn munmap_partial() {
    let _serial = serial();
    require_root();
    let report = trace_fixture("munmap", &[], &[]);

    // 8 pages, first, last and one middle page unmapped: 5 pages left. How
    // many "allocations" the remaining pieces count as is not specified.
    let site = report.site("partial_unmap");
    assert_eq!(
        site.outstanding_bytes,
        5 * PAGE,
        "partial_unmap\n{}",
        report.summary()
    );
    assert!(
        site.outstanding_allocations >= 1,
        "partial_unmap: no allocation outstanding\n{}",
        report.summary()
    );
    assert_eq!(
        site.allocated_bytes,
        8 * PAGE,
        "partial_unmap allocated\n{}",
        report.summary()
    );

    // 10 pages, pages 2..5 unmapped: 7 pages left.
    let site = report.site("partial_unmap_range");
    assert_eq!(
        site.outstanding_bytes,
        7 * PAGE,
        "partial_unmap_range\n{}",
        report.summary()
    );
    assert!(
        site.outstanding_allocations >= 1,
        "partial_unmap_range: no allocation outstanding\n{}",
        report.summary()
    );
    assert_eq!(
        site.allocated_bytes,
        10 * PAGE,
        "partial_unmap_range allocated\n{}",
        report.summary()
    );

    // 4 pages unmapped in two halves, 2000 times: nothing left.
    assert_site(
        &report,
        Expect {
            function: "churn_split_unmap",
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            allocated_bytes: 2000 * 4 * PAGE,
        },
    );

    // File-backed mappings are not counted at all.
    let site = report.site("map_file");
    assert_eq!(
        (site.outstanding_bytes, site.allocated_bytes),
        (0, 0),
        "file-backed mmap was counted\n{}",
        report.summary()
    );

    let leaked = 5 * PAGE + 7 * PAGE;
    let slack = slack_bytes();
    let t = report.totals;
    assert!(
        t.outstanding_bytes >= leaked && t.outstanding_bytes <= leaked + slack,
        "totals.outstanding_bytes {} not within [{leaked}, {leaked} + {slack}] \
         (the 2 x 4-page file mappings must not count)\n{}",
        t.outstanding_bytes,
        report.summary()
    );
}
