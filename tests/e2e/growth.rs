//! The always-on tier (`top --tier growth`): page faults that populate new memory,
//! attributed to the function that touched the pages, with no allocator probe
//! (`fixtures/pages.c`).

use crate::util::*;

const ROUNDS: u64 = 300;
const LEAK_PAGES: u64 = 16;
const REUSED_PAGES: u64 = 64;

#[test]
fn growth_tier_finds_the_page_touching_leak() {
    let _serial = serial();
    require_root();
    let report = trace_fixture("pages", &["--tier", "growth"], &[&ROUNDS.to_string()]);
    let leak = report.site("leak_pages");
    // Each page is populated by exactly one fault, in the function that writes it.
    assert_eq!(
        leak.outstanding_bytes,
        ROUNDS * LEAK_PAGES * PAGE,
        "leak_pages populated {ROUNDS} x {LEAK_PAGES} pages\n{}",
        report.summary()
    );
    assert_eq!(leak.outstanding_allocations, ROUNDS * LEAK_PAGES);
    // The reused buffer grows once, on its first round, then never again.
    let reuse = report.site("reuse_buffer");
    assert_eq!(
        reuse.outstanding_bytes,
        REUSED_PAGES * PAGE,
        "reuse_buffer populates its {REUSED_PAGES} pages once\n{}",
        report.summary()
    );
    assert_eq!(
        report.stacks[0].leaf_function(),
        Some("leak_pages"),
        "the top growth site is the leak\n{}",
        report.summary()
    );
    // The growth tier puts no probe on the allocator: no uprobe area in the target
    // is what would show one; memtrace's own line says what it counted instead.
    assert!(report.totals.outstanding_bytes >= leak.outstanding_bytes);
}

#[test]
fn growth_tier_samples_faults() {
    let _serial = serial();
    require_root();
    let report = trace_fixture(
        "pages",
        &["--tier", "growth", "--fault-sample", "4"],
        &[&ROUNDS.to_string()],
    );
    let leak = report.site("leak_pages");
    let exact = ROUNDS * LEAK_PAGES * PAGE;
    // Every 4th fault per CPU stands for 4 pages: within a few samples of the truth.
    let slack = 4 * 4 * PAGE * 2;
    assert!(
        leak.outstanding_bytes + slack >= exact && leak.outstanding_bytes <= exact + slack,
        "sampled growth of leak_pages {} is not within {slack} of {exact}\n{}",
        leak.outstanding_bytes,
        report.summary()
    );
}

#[test]
fn growth_tier_needs_no_shared_libc() {
    let _serial = serial();
    require_root();
    // The growth tier puts no probe on a statically linked program's allocator and sees
    // the pages it populates all the same.
    let report = trace_program(&static_fixture(), &["--tier", "growth"], &[]);
    assert!(
        report.totals.outstanding_bytes >= PAGE,
        "a process populates pages as it runs\n{}",
        report.summary()
    );
    assert!(
        report.stacks.iter().any(|s| !s.frames.is_empty()),
        "growth is attributed to stacks\n{}",
        report.summary()
    );
}
