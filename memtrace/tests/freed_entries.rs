//! Freed `ALLOCS` entries (see `memtrace::sweep`): a free marks its entry, the next block
//! at that address reuses it, and entries left freed for a whole epoch are swept. Real BPF
//! on this test's own process (needs root, as CI has).
use std::{collections::HashSet, ffi::c_void, hint::black_box};

use memtrace::{
    process::own_libc,
    tracer::{Tracer, TracerOptions},
};

/// Distinct blocks made and freed at a time.
const BLOCKS: usize = 2000;
const SIZE: usize = 48;

/// Allocates `BLOCKS` blocks into `out` (capacity reserved beforehand, so the vector
/// itself does not allocate meanwhile).
fn allocate(out: &mut Vec<*mut c_void>) {
    for _ in 0..BLOCKS {
        // SAFETY: malloc with any size is sound; every block is freed by `free_all`.
        out.push(unsafe { libc::malloc(black_box(SIZE)) });
    }
}

fn free_all(blocks: &mut Vec<*mut c_void>) {
    for block in blocks.drain(..) {
        // SAFETY: each block came from malloc and is freed once.
        unsafe { libc::free(block) };
    }
}

#[test]
fn freed_entries_are_reused_in_place_and_swept() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test loads eBPF programs and must run as root"
    );
    let libc = own_libc().expect("this process maps a libc");
    // Attached from another thread while this one makes no allocator call.
    let mut tracer = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut tracer = Tracer::load(&TracerOptions::default()).expect("loading BPF");
                tracer
                    .attach_libc(std::process::id(), &libc)
                    .expect("attaching to this process's libc");
                tracer
            })
            .join()
            .expect("attaching thread")
    });
    let pid = HashSet::from([std::process::id()]);
    let outstanding = |tracer: &mut Tracer| -> i64 {
        let snapshot = tracer.snapshot(&pid).expect("reading the maps");
        snapshot
            .totals
            .iter()
            .map(|(_, t)| t.outstanding_count)
            .sum()
    };
    let mut blocks = Vec::with_capacity(BLOCKS);

    let before = tracer.freed_entries().unwrap();
    let live_before = outstanding(&mut tracer);
    allocate(&mut blocks);
    free_all(&mut blocks);
    let freed = tracer.freed_entries().unwrap() - before;
    assert!(
        freed >= BLOCKS as i64,
        "{BLOCKS} frees marked only {freed} entries freed"
    );
    // The same sizes again: the allocator hands the freed addresses out first, and
    // their entries are reused instead of new ones being inserted.
    allocate(&mut blocks);
    let reused = freed - (tracer.freed_entries().unwrap() - before);
    assert!(
        reused >= BLOCKS as i64 * 9 / 10,
        "only {reused} of {BLOCKS} freed entries were reused by blocks at the same addresses"
    );
    assert!(
        outstanding(&mut tracer) >= live_before + BLOCKS as i64,
        "the reused entries hold live blocks"
    );
    free_all(&mut blocks);
    assert!(tracer.freed_entries().unwrap() - before >= BLOCKS as i64);

    // Swept only once they stayed freed for a whole epoch: not by the sweep that ends
    // the epoch they were freed in, but by the one after.
    let first = tracer.sweep_freed(true).unwrap();
    assert_eq!(first.deleted, 0, "entries freed this epoch are kept");
    let second = tracer.sweep_freed(true).unwrap();
    assert!(
        second.deleted >= BLOCKS as u64,
        "the next sweep deletes the {BLOCKS} entries that stayed freed a whole epoch: {second:?}"
    );
    assert!(
        tracer.freed_entries().unwrap() < BLOCKS as i64 / 10,
        "freed entries left after the sweep: {}",
        tracer.freed_entries().unwrap()
    );
    // Exactness is untouched: the blocks are gone from the totals.
    assert!(outstanding(&mut tracer) < live_before + BLOCKS as i64 / 10);
}
