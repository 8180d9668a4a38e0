//! Test 1: exact per-function numbers for every traced allocator
//! (`fixtures/exact.c`), on a shared libc and in a statically linked build (whose own copy
//! of the allocator memtrace probes).

use crate::util::*;

/// Leak sites: (function, outstanding bytes, outstanding allocations).
/// Each leaks once per allocation, so allocated == outstanding.
const LEAKS: &[(&str, u64, u64)] = &[
    ("leak_malloc", 10 * 1000, 10),
    ("leak_calloc", 10 * 30 * 37, 10),
    ("leak_realloc_null", 10 * 1200, 10),
    ("leak_realloc_grow", 10 * 1300, 10),
    ("leak_reallocarray", 10 * 35 * 40, 10),
    ("leak_posix_memalign", 10 * 1500, 10),
    ("leak_aligned_alloc", 10 * 1664, 10),
    ("leak_memalign", 10 * 1700, 10),
    ("leak_valloc", 10 * 1800, 10),
    // pvalloc(5000) rounds up to two pages.
    ("leak_pvalloc", 10 * 2 * PAGE, 10),
    // mmap(10000) counts three pages.
    ("leak_mmap", 4 * 3 * PAGE, 4),
];

const CHURN_ITERATIONS: u64 = 3000;

/// Sites that free everything: (function, allocated bytes).
const CHURN: &[(&str, u64)] = &[
    // grow_base's 100-byte blocks are all moved/grown by realloc in
    // leak_realloc_grow: freed here, counted there.
    ("grow_base", 10 * 100),
    ("churn_malloc", CHURN_ITERATIONS * 1000),
    ("churn_calloc", CHURN_ITERATIONS * 20 * 50),
    // realloc(NULL, 700) then realloc(p, 1400): both count at this site.
    ("churn_realloc", CHURN_ITERATIONS * (700 + 1400)),
    // realloc(NULL, 900) then realloc(p, 0), which frees.
    ("churn_realloc_zero", CHURN_ITERATIONS * 900),
    ("churn_reallocarray", CHURN_ITERATIONS * 10 * 60),
    ("churn_posix_memalign", CHURN_ITERATIONS * 800),
    ("churn_aligned_alloc", CHURN_ITERATIONS * 640),
    ("churn_memalign", CHURN_ITERATIONS * 1100),
    ("churn_valloc", CHURN_ITERATIONS * 300),
    // pvalloc(100) rounds up to one page.
    ("churn_pvalloc", CHURN_ITERATIONS * PAGE),
    ("churn_mmap", CHURN_ITERATIONS * 3 * PAGE),
];

#[test]
fn exact_per_function() {
    let _serial = serial();
    require_root();
    let slack = slack_bytes();
    check_exact(&trace_fixture("exact", &[], &[]), slack);
}

#[test]
fn exact_per_function_static() {
    let _serial = serial();
    require_root();
    let slack = slack_bytes();
    let program = static_build("exact");
    let finished = run_top(&[], &program, &[]);
    assert!(finished.status.success(), "{}", finished.describe());
    assert!(
        finished
            .stderr
            .contains(&format!("probes to {}", program.display())),
        "the probes go on the program's own allocator, not a libc\n{}",
        finished.describe()
    );
    let report = parse_report(&finished);
    report.check_shape();
    check_exact(&report, slack);
}

fn check_exact(report: &Report, slack: u64) {
    assert_eq!(
        report.sample_bytes,
        1,
        "default --sample-bytes is 1\n{}",
        report.summary()
    );

    for &(function, bytes, count) in LEAKS {
        assert_site(
            report,
            Expect {
                function,
                outstanding_bytes: bytes,
                outstanding_allocations: count,
                allocated_bytes: bytes,
            },
        );
    }
    for &(function, allocated) in CHURN {
        assert_site(
            report,
            Expect {
                function,
                outstanding_bytes: 0,
                outstanding_allocations: 0,
                allocated_bytes: allocated,
            },
        );
    }

    let leaked: u64 = LEAKS.iter().map(|l| l.1).sum();
    let t = &report.totals;
    assert!(
        t.outstanding_bytes >= leaked,
        "totals.outstanding_bytes {} < the fixture's leaks {leaked}\n{}",
        t.outstanding_bytes,
        report.summary()
    );
    // Allocator-internal calls (reallocarray -> realloc, valloc/pvalloc ->
    // memalign, ...) must not be counted a second time.
    assert!(
        t.outstanding_bytes <= leaked + slack,
        "totals.outstanding_bytes {} exceeds the fixture's leaks {leaked} by more than the \
         C runtime's baseline allowance {slack}: something is counted twice; elsewhere: {:?}\n{}",
        t.outstanding_bytes,
        report.outstanding_elsewhere(&LEAKS.iter().map(|l| l.0).collect::<Vec<_>>()),
        report.summary()
    );
}
