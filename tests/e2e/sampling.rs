//! Test 7: `--sample-bytes` estimates per stack, exact totals
//! (`fixtures/sampling.c`).

use crate::util::*;

#[test]
fn sampling_estimate() {
    let _serial = serial();
    require_root();
    let slack = slack_bytes();
    let slack_allocs = slack_allocations();
    let report = trace_fixture("sampling", &["--sample-bytes", "4096"], &[]);
    assert_eq!(
        report.sample_bytes,
        4096,
        "sample_bytes in the report\n{}",
        report.summary()
    );

    let leaked: u64 = 20_000 * 1000;
    let site = report.site("leak_sampled");
    let low = leaked - leaked / 10;
    let high = leaked + leaked / 10;
    assert!(
        site.outstanding_bytes >= low && site.outstanding_bytes <= high,
        "leak_sampled: estimated outstanding {} not within 10% of {leaked}\n{}",
        site.outstanding_bytes,
        report.summary()
    );

    let t = report.totals;
    assert!(
        t.outstanding_bytes >= leaked && t.outstanding_bytes < leaked + slack,
        "totals must stay exact: outstanding_bytes {} not within [{leaked}, {leaked} + {slack})\n{}",
        t.outstanding_bytes,
        report.summary()
    );
    assert!(
        t.outstanding_allocations >= 20_000 && t.outstanding_allocations < 20_000 + slack_allocs,
        "totals must stay exact: outstanding_allocations {} not within [20000, 20000 + {slack_allocs})\n{}",
        t.outstanding_allocations,
        report.summary()
    );
}
