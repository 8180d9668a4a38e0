//! The always-on tier's mmap view (`top --tier mapped`): anonymous mappings per call site,
//! outstanding until unmapped, with no uprobe (`fixtures/mapped.c`: glibc maps each
//! 256 KiB block on its own).

use crate::util::*;

const ROUNDS: u64 = 40;
/// glibc maps a 256 KiB request with its 16-byte header, rounded up to pages.
fn block_bytes() -> u64 {
    (256 * 1024 + 16u64).div_ceil(PAGE) * PAGE
}

#[test]
fn mapped_view_counts_large_blocks_and_their_releases() {
    let _serial = serial();
    require_root();
    let report = trace_fixture("mapped", &["--tier", "mapped"], &[&ROUNDS.to_string()]);
    let leak = report.site("leak_blocks");
    assert_eq!(
        (leak.outstanding_bytes, leak.outstanding_allocations),
        (ROUNDS * block_bytes(), ROUNDS),
        "leak_blocks keeps {ROUNDS} blocks of {} bytes\n{}",
        block_bytes(),
        report.summary()
    );
    assert_eq!(leak.allocated_bytes, ROUNDS * block_bytes());
    // Freed blocks are unmapped: mapped as often, nothing outstanding.
    let churn = report.site("churn_blocks");
    assert_eq!(
        (
            churn.allocated_bytes,
            churn.outstanding_bytes,
            churn.outstanding_allocations
        ),
        (ROUNDS * block_bytes(), 0, 0),
        "churn_blocks frees every block it maps\n{}",
        report.summary()
    );
    // 16 pages mapped, 4 in the middle unmapped: 12 pages left, in two pieces.
    let trimmed = report.site("map_and_trim");
    assert_eq!(
        (
            trimmed.allocated_bytes,
            trimmed.outstanding_bytes,
            trimmed.outstanding_allocations
        ),
        (16 * PAGE, 12 * PAGE, 2),
        "map_and_trim's mapping lost its middle\n{}",
        report.summary()
    );
    // realloc to 160 KiB: glibc shrinks the mapping in place (mremap); the rest stays at
    // the stack that mapped it. 160 KiB + 16 bytes of header + 8 rounded up to pages.
    let shrunk = report.site("shrink_block");
    let kept = (160 * 1024 + 16 + 8u64).div_ceil(PAGE) * PAGE;
    assert_eq!(
        (
            shrunk.allocated_bytes,
            shrunk.outstanding_bytes,
            shrunk.outstanding_allocations
        ),
        (block_bytes(), kept, 1),
        "shrink_block's block was shrunk to {kept} bytes\n{}",
        report.summary()
    );
    // Aligned for huge pages by the kernel, and still found when unmapped.
    let huge = report.site("map_huge");
    assert_eq!(
        (huge.allocated_bytes, huge.outstanding_bytes),
        (4 << 20, 0),
        "map_huge's 4 MiB mapping was unmapped\n{}",
        report.summary()
    );
    assert_eq!(
        report.stacks[0].leaf_function(),
        Some("leak_blocks"),
        "the top site is the leak\n{}",
        report.summary()
    );
    assert_eq!(report.totals.dropped_events, 0, "{}", report.summary());
}
